"""The BlockPilot block-size policy: a small classifier over candidate block sizes, run once per request after
prefill. It reads only what prefill produced (see `features.py`), so it costs one tiny MLP call per request.
"""

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from .configuration import BlockPolicyConfig
from .features import PrefillRepresentation, policy_feature_size, policy_features


class BlockPolicyPreTrainedModel(PreTrainedModel):
    config_class = BlockPolicyConfig
    base_model_prefix = "policy"
    main_input_name = "features"

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                module.bias.zero_()


class BlockPolicy(BlockPolicyPreTrainedModel):
    """MLP `features -> hidden -> (residual hidden blocks) -> logits over config.candidate_block_sizes`.

    Features are standardised with the training set's mean and std, stored as buffers so a saved policy is
    self-contained. Use it as `generate(..., block_policy=policy)`; it implements the `BlockSizePolicy` interface.
    """

    def __init__(self, config: BlockPolicyConfig):
        super().__init__(config)
        if config.input_size is None:
            raise ValueError("BlockPolicyConfig.input_size is not set; build the policy with `BlockPolicy.from_target`.")
        self.register_buffer("feature_mean", torch.zeros(config.input_size))
        self.register_buffer("feature_std", torch.ones(config.input_size))
        self.input_proj = nn.Linear(config.input_size, config.hidden_size)
        self.hidden_layers = nn.ModuleList(
            [nn.Linear(config.hidden_size, config.hidden_size) for _ in range(config.num_hidden_layers - 1)]
        )
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, len(config.candidate_block_sizes))
        self.post_init()

    @classmethod
    def from_target(cls, target, drafter=None, candidate_block_sizes=None, radius: int = 2, **config_kwargs):
        """A fresh policy for `target` (and `drafter`, whose training block size B centres the default candidates
        `B - radius ... B + radius`)."""
        tc = target.config.get_text_config()
        vocab = target.get_output_embeddings().weight.shape[0]
        if candidate_block_sizes is None:
            center = drafter.config.block_size if drafter is not None else 16
            candidate_block_sizes = list(range(max(2, center - radius), center + radius + 1))
        feature = config_kwargs.pop("feature", "prefill_summary")
        config = BlockPolicyConfig(
            candidate_block_sizes=candidate_block_sizes,
            feature=feature,
            input_size=policy_feature_size(feature, tc.hidden_size, vocab),
            target_hidden_size=tc.hidden_size,
            target_vocab_size=vocab,
            target_name_or_path=getattr(target.config, "_name_or_path", None) or None,
            drafter_name_or_path=getattr(drafter.config, "_name_or_path", None) if drafter is not None else None,
            drafter_block_size=drafter.config.block_size if drafter is not None else None,
            **config_kwargs,
        )
        return cls(config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the candidate block sizes, shape `(batch, len(candidate_block_sizes))`."""
        x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        x = self.dropout(torch.relu(self.input_proj(x)))
        for layer in self.hidden_layers:
            x = x + self.dropout(torch.relu(layer(x)))
        return self.classifier(x)

    def features(self, prefill: PrefillRepresentation) -> torch.Tensor:
        c = self.config
        if c.target_vocab_size not in (None, prefill.last_logits.shape[-1]) or prefill.last_hidden_state.shape[-1] != c.target_hidden_size:
            raise ValueError(
                f"This block policy was trained for a target with vocabulary {c.target_vocab_size} and hidden size "
                f"{c.target_hidden_size} ({c.target_name_or_path}), but the target has "
                f"{prefill.last_logits.shape[-1]} and {prefill.last_hidden_state.shape[-1]}. Train a policy for this "
                "target with `blockpilot collect-labels` and `blockpilot train-policy`."
            )
        return policy_features(prefill, c.feature, c.summary_top_k)

    @torch.no_grad()
    def choose_block_sizes(self, prefill: PrefillRepresentation) -> torch.LongTensor:
        """One block size per sequence, picked among `config.candidate_block_sizes`."""
        features = self.features(prefill).to(self.device)
        choice = self.eval()(features).argmax(dim=-1)
        return torch.tensor(self.config.candidate_block_sizes, device=choice.device)[choice]

    def check_compatible(self, drafter=None) -> None:
        """Raise if this policy was trained for a drafter with another block size."""
        expected = self.config.drafter_block_size
        if drafter is not None and expected is not None and drafter.config.block_size != expected:
            raise ValueError(
                f"This block policy was trained for a drafter with block size {expected}, but the drafter's is "
                f"{drafter.config.block_size}. Use the policy trained with this drafter, or retrain one."
            )


AutoConfig.register(BlockPolicyConfig.model_type, BlockPolicyConfig)
AutoModel.register(BlockPolicyConfig, BlockPolicy)

"""The BlockPilot block-size policy, run once per request after prefill. It reads only what prefill produced (see
`features.py`), so it costs one tiny MLP call per request.

The paper's policy classifies a request into its tau-best block size. Ours predicts tau at every candidate size and
decides afterwards, because the best size depends on more than the request: on how much a longer block costs on this
hardware and at this batch size. With a table of measured step costs (`config.step_costs`, and one per machine in
`config.step_costs_by_machine`: CPUs alike in cores still rank the sizes differently) it picks the size that
maximises predicted tokens per second, which may be 1 (plain decoding, no drafter) where drafting does not pay;
without one it picks the tau-best size, the paper's objective.

With `config.copy_tokens` it also predicts tau with a chain copied from the context verified beside the drafter's
block (`prompt_lookup_num_tokens`), and for that chain alone, and switches the chain on for a batch where it pays.

Sampling accepts less than greedy decoding (a proposal must equal a sample), so the best arm moves with the
temperature. A policy trained on labels at several temperatures (`config.label_temperatures`) has one tau head per
temperature on a shared trunk and predicts for a request's temperature by interpolating between them. The trunk
and the first head are trained on the first temperature's labels alone, the other heads on the frozen trunk
(`training.policy.fit_policy`): a sampled head cannot move what the policy does when greedy.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import logging

from .configuration import Arm, BlockPolicyConfig, checked_machine_name, normalized_step_costs
from .features import PrefillRepresentation, policy_feature_size, policy_features
from .hardware import device_type_of, machine_of

logger = logging.get_logger(__name__)


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
    """MLP `features -> hidden -> (residual hidden blocks) -> predicted tau at each of `config.arms` (the candidate
    block sizes, and with `config.copy_tokens` the same with the copy chain and the chain alone).

    Features are standardised with the training set's mean and std, stored as buffers so a saved policy is
    self-contained. Use it as `generate(..., block_policy=policy)`; it implements the `BlockSizePolicy` interface.
    """

    def __init__(self, config: BlockPolicyConfig):
        super().__init__(config)
        if config.input_size is None:
            raise ValueError(
                "BlockPolicyConfig.input_size is not set; build the policy with `BlockPolicy.from_target`."
            )
        if getattr(config, "label_objective", None) is not None:
            raise ValueError(
                "This block policy was saved by an earlier blockpilot-hf as a classifier (its config has "
                "`label_objective`); this version predicts tau per block size. Retrain it from its labels with "
                "`blockpilot train-policy`."
            )
        self.register_buffer("feature_mean", torch.zeros(config.input_size))
        self.register_buffer("feature_std", torch.ones(config.input_size))
        self.input_proj = nn.Linear(config.input_size, config.hidden_size)
        self.hidden_layers = nn.ModuleList(
            [nn.Linear(config.hidden_size, config.hidden_size) for _ in range(config.num_hidden_layers - 1)]
        )
        self.dropout = nn.Dropout(config.dropout)
        self.tau_head = nn.Linear(config.hidden_size, len(config.arms))  # at label_temperatures[0]
        # One more per further label temperature; none for a policy of one (its weights are named as they always were).
        self.temperature_heads = nn.ModuleList(
            [nn.Linear(config.hidden_size, len(config.arms)) for _ in config.label_temperatures[1:]]
        )
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

    def forward(self, features: torch.Tensor, temperatures=None) -> torch.Tensor:
        """Predicted tau (at least 1: every step commits a token) at each of `config.arms`, shape
        `(batch, len(config.arms))`, for sampling at `temperatures` (a float or one per row; `None` or 0: greedy)."""
        x = self.trunk(features)
        if not self.temperature_heads:
            return tau_of(self.tau_head(x))
        tau = torch.stack([tau_of(head(x)) for head in [self.tau_head, *self.temperature_heads]], dim=1)
        temperatures = torch.as_tensor(0.0 if temperatures is None else temperatures, dtype=tau.dtype)
        weights = temperature_weights(self.config.label_temperatures, temperatures.to(tau.device).expand(x.shape[0]))
        return (weights[:, :, None] * tau).sum(1)

    def trunk(self, features: torch.Tensor) -> torch.Tensor:
        """The shared hidden representation the tau heads read, `(batch, hidden_size)`."""
        x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        x = self.dropout(torch.relu(self.input_proj(x)))
        for layer in self.hidden_layers:
            x = x + self.dropout(torch.relu(layer(x)))
        return x

    def features(self, prefill: PrefillRepresentation) -> torch.Tensor:
        c = self.config
        if (
            c.target_vocab_size not in (None, prefill.last_logits.shape[-1])
            or prefill.last_hidden_state.shape[-1] != c.target_hidden_size
        ):
            raise ValueError(
                f"This block policy was trained for a target with vocabulary {c.target_vocab_size} and hidden size "
                f"{c.target_hidden_size} ({c.target_name_or_path}), but the target has "
                f"{prefill.last_logits.shape[-1]} and {prefill.last_hidden_state.shape[-1]}. Train a policy for this "
                "target with `blockpilot collect-labels` and `blockpilot train-policy`."
            )
        return policy_features(prefill, c.feature, c.summary_top_k)

    @property
    def copy_tokens(self) -> int:
        """The length of the copy chain this policy may switch on (0: it never does)."""
        return self.config.copy_tokens

    def set_step_costs(self, step_costs: dict | None, device: str | None = None, machine: str | None = None) -> None:
        """Decide by these step costs from now on: `{batch size: {arm key: seconds}}` (`Arm.key`), e.g. `blockpilot
        bench --step-costs` on the machine that serves (`training.policy.load_step_costs` reads its file,
        `step_costs_device` and `step_costs_machine` where it was measured). What the policy predicts does not depend
        on the hardware, so it moves to other hardware with a new table, without retraining. Saved with the policy.

        Without `machine`, the table is the policy's default, for every machine of the `device` type (`None`: of any
        type); `step_costs=None` then decides by predicted tau alone. With `machine` (`hardware.machine_of(device)`),
        the table is that machine's alone, used where the policy serves on it, beside the default; `step_costs=None`
        removes it."""
        if machine is None:
            self.config.step_costs = normalized_step_costs(step_costs, self.config.arms)
            self.config.step_costs_device = device if step_costs is not None else None
            self.config.step_costs_machine = None
            return
        machine = checked_machine_name(machine)
        if device is not None and device != device_type_of(machine):
            raise ValueError(f"device={device!r} is not the device type of machine={machine!r}; leave device out.")
        if step_costs is None:
            self.config.step_costs_by_machine.pop(machine, None)
        else:
            self.config.step_costs_by_machine[machine] = normalized_step_costs(step_costs, self.config.arms)

    def step_costs_for(self, batch_size: int, machine: str | None = None) -> dict[str, float] | None:
        """`{arm key: seconds}` measured at the batch size nearest to `batch_size` (on a log scale, the smaller on
        ties): from `machine`'s own table where the policy has one, else from the default table; `None` without."""
        table = self.config.step_costs_by_machine.get(machine) or self.config.step_costs
        if not table:
            return None
        nearest = min(table, key=lambda n: (abs(math.log(int(n) / batch_size)), int(n)))
        return dict(table[nearest])

    def serving_step_costs(self, batch_size: int, device: torch.device) -> dict[str, float] | None:
        """The step costs the policy decides by when serving on `device`: that machine's table, else the default
        table if it holds for the device type (with a word, once, where it was measured on another machine), else
        none (predicted tau alone, with a warning)."""
        machine = machine_of(device)
        if machine in self.config.step_costs_by_machine:
            return self.step_costs_for(batch_size, machine)
        costs = self.step_costs_for(batch_size)
        measured_on = self.config.step_costs_device
        if costs is not None and measured_on not in (None, device.type):
            logger.warning_once(
                f"This block policy's step costs were measured on {measured_on}, but the target runs on "
                f"{device.type}: it decides by predicted tau alone. Measure this machine's with `blockpilot bench "
                "--step-costs` and load them with `policy.set_step_costs(load_step_costs(path), "
                "machine=step_costs_machine(path))`."
            )
            return None
        if costs is not None and self.config.step_costs_machine not in (None, machine):
            logger.warning_once(
                "This block policy decides by step costs measured on another machine "
                f"({self.config.step_costs_machine}; this is {machine}), which may rank block sizes differently. "
                "Measure this machine's with `blockpilot bench --step-costs` and add them with "
                "`policy.set_step_costs(load_step_costs(path), machine=step_costs_machine(path))`."
            )
        return costs

    def choose_block_sizes(self, prefill: PrefillRepresentation) -> torch.LongTensor:
        """One block size per sequence: among `config.candidate_block_sizes` (or 1, where the cost table says plain
        decoding, or the copy chain alone, is faster). `choose_block_sizes_and_copy` also says whether to copy."""
        return self.choose_block_sizes_and_copy(prefill)[0]

    @torch.no_grad()
    def choose_block_sizes_and_copy(
        self, prefill: PrefillRepresentation, copy_tokens: int | None = None
    ) -> tuple[torch.LongTensor, int]:
        """One block size per sequence and the copy chain of the batch (0: none, else `config.copy_tokens`).

        `copy_tokens` is what the request fixed, if it did (`prompt_lookup_num_tokens`): `None` leaves the chain to
        the policy; 0 keeps it off; more turns it on, and the policy picks sizes by its predictions with its chain."""
        features = self.features(prefill).to(self.device)
        self._warn_outside_label_temperatures(prefill.temperature)
        predicted_tau = self.eval()(features, prefill.temperature).float().cpu()
        costs = self.serving_step_costs(predicted_tau.shape[0], prefill.last_hidden_state.device)
        return decide_for_batch(predicted_tau, self.config.arms, costs, copy_tokens)

    def _warn_outside_label_temperatures(self, temperature: float) -> None:
        learnt = self.config.label_temperatures
        if min(learnt) <= temperature <= max(learnt):
            return
        if max(learnt) == 0:
            logger.warning_once(
                f"This block policy learnt from greedy labels only, but the request samples (temperature "
                f"{temperature:g}): acceptance is lower when sampling, so it may choose blocks or a copy chain that do "
                "not pay. Train one on labels at that temperature too (`blockpilot collect-labels --temperature T`, "
                "then `train-policy --labels GREEDY.jsonl,SAMPLED.jsonl`)."
            )
        else:
            logger.warning_once(
                f"This block policy learnt from labels at temperatures {learnt}; the request's ({temperature:g}) is "
                "outside them, so it predicts as for the nearest. Add labels at that temperature (`blockpilot "
                "collect-labels --temperature T`) for a policy that knows it."
            )

    def check_compatible(self, drafter=None) -> None:
        """Raise if this policy was trained for a drafter with another block size."""
        expected = self.config.drafter_block_size
        if drafter is not None and expected is not None and drafter.config.block_size != expected:
            raise ValueError(
                f"This block policy was trained for a drafter with block size {expected}, but the drafter's is "
                f"{drafter.config.block_size}. Use the policy trained with this drafter, or retrain one."
            )


def tau_of(head_output: torch.Tensor) -> torch.Tensor:
    """A head's outputs as tau: at least 1, since every step commits a token."""
    return 1.0 + F.softplus(head_output)


def temperature_weights(label_temperatures: list[float], temperatures: torch.Tensor) -> torch.Tensor:
    """`(batch, len(label_temperatures))` weights of each labelled temperature's prediction at `temperatures`:
    piecewise-linear between the two around each (sorted `label_temperatures`), all on the nearest outside them."""
    grid = torch.tensor(label_temperatures, dtype=temperatures.dtype, device=temperatures.device)
    if len(grid) == 1:
        return torch.ones(len(temperatures), 1, dtype=temperatures.dtype, device=temperatures.device)
    t = temperatures.clamp(grid[0], grid[-1])
    upper = torch.searchsorted(grid, t, right=True).clamp(1, len(grid) - 1)
    lower = upper - 1
    fraction = (t - grid[lower]) / (grid[upper] - grid[lower])
    weights = torch.zeros(len(t), len(grid), dtype=t.dtype, device=t.device)
    weights.scatter_(1, lower[:, None], (1 - fraction)[:, None])
    weights.scatter_add_(1, upper[:, None], fraction[:, None])
    return weights


def block_sizes_for_batch(
    predicted_tau: torch.Tensor, candidate_block_sizes: list[int], step_costs: dict[int, float] | None
) -> torch.LongTensor:
    """Block size per sequence from predicted tau `(batch, candidates)`; ties go to the smaller size.

    Without costs each sequence takes its tau-best size. With costs (seconds of one step of this batch at each block
    size, maybe including 1: plain decoding, tau exactly 1), the batch is verified in blocks of one size B, the
    largest any sequence takes (`decoding.py`), so B is chosen for the batch: the one maximising the tokens a step
    commits, summed over sequences each at its best size up to B, per second of a step at B. Each sequence then takes
    its tau-best size up to B.
    """
    return _sizes_and_rate(predicted_tau, candidate_block_sizes, step_costs)[0]


def _sizes_and_rate(predicted_tau, candidate_block_sizes, step_costs) -> tuple[torch.LongTensor, float]:
    # `block_sizes_for_batch`, with what it maximised: tokens per second of a step (per step, without costs).
    order = sorted(range(len(candidate_block_sizes)), key=lambda i: candidate_block_sizes[i])
    sizes = [candidate_block_sizes[i] for i in order]
    tau = predicted_tau[:, order]
    if step_costs is None:
        best = tau.max(dim=-1)  # keeps the first (smallest) of tied maxima
        return torch.tensor(sizes)[best.indices], float(best.values.sum())
    if 1 in step_costs and 1 not in sizes:
        sizes, tau = [1, *sizes], torch.cat([torch.ones_like(tau[:, :1]), tau], dim=1)
    best_tau, best_size = tau[:, 0], torch.full((tau.shape[0],), sizes[0])
    best_rate, chosen = -1.0, best_size
    for j, size in enumerate(sizes):
        better = tau[:, j] > best_tau
        best_tau, best_size = torch.where(better, tau[:, j], best_tau), torch.where(better, size, best_size)
        rate = float(best_tau.sum()) / step_costs[size]
        if rate > best_rate:
            best_rate, chosen = rate, best_size.clone()
    return chosen, best_rate


def decide_for_batch(
    predicted_tau: torch.Tensor,
    arms: list[Arm],
    step_costs: dict[str, float] | None = None,
    copy_tokens: int | None = None,
) -> tuple[torch.LongTensor, int]:
    """Block size per sequence and the copy chain of the batch, from predicted tau `(batch, len(arms))`.

    A batch verifies one tree (`decoding/tree.py`): every sequence copies or none does. So for each copy setting the
    policy has (none, and its chain) the sizes are chosen as `block_sizes_for_batch` does, with that setting's costs
    (`step_costs`: `{arm key: seconds}`; `"1"` is plain decoding), and the setting that commits more tokens per second
    (per step, without costs) wins; ties keep the chain off. `copy_tokens` fixes the setting where the request did
    (`None`: free; 0: off; more: on).
    """
    settings = sorted({arm.copy_tokens for arm in arms})
    if copy_tokens is not None:
        settings = [settings[-1]] if copy_tokens else [0]  # on: the policy's own chain, if it has one
    chosen, chosen_copy, chosen_rate = None, 0, -1.0
    for setting in settings:
        columns = [i for i, arm in enumerate(arms) if arm.copy_tokens == setting]
        sizes = [arms[i].block_size for i in columns]
        costs = None
        if step_costs is not None:
            costs = {b: step_costs[Arm(b, setting).key] for b in sizes}
            if not setting and "1" in step_costs:
                costs[1] = step_costs["1"]
        block_sizes, rate = _sizes_and_rate(predicted_tau[:, columns], sizes, costs)
        if rate > chosen_rate:
            chosen, chosen_copy, chosen_rate = block_sizes, setting, rate
    return chosen, chosen_copy


AutoConfig.register(BlockPolicyConfig.model_type, BlockPolicyConfig)
AutoModel.register(BlockPolicyConfig, BlockPolicy)

"""Configurations of the two artifacts this library trains and ships: the DFlash drafter and the block policy.

Both record *which target they were made for* (name, hidden size, layer count, vocabulary) but never contain it, so a
mismatched target is detected at `generate` time with an error instead of silently producing garbage drafts.
"""

from typing import NamedTuple

from transformers import PretrainedConfig

from .version import __version__


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Target layers whose outputs feed the drafter, spread through the network as in the DFlash reference.

    `round(1 + i * (n_target - 4) / (n_draft - 1))` for `i = 0..n_draft-1`; a single draft layer reads the middle layer.
    A 36-layer target with 5 draft layers gives `[1, 9, 17, 25, 33]`.
    """
    if num_target_layers < 4:
        # The formula needs room for its margins; tiny test targets simply use every layer but the last.
        return list(range(max(1, num_target_layers - 1)))[: max(1, num_draft_layers)]
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def check_attention_layout(layer_types: list[str], num_layers: int, sliding_window: int | None) -> None:
    """A drafter's `layer_types` and `sliding_window` are consistent (shared by the config and the training arguments,
    which check them before any data is generated)."""
    if len(layer_types) != num_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(
            f"layer_types={layer_types} must name 'full_attention' or 'sliding_attention' for each of the "
            f"{num_layers} draft layers."
        )
    if "sliding_attention" in layer_types and not (sliding_window or 0) > 0:
        raise ValueError("Sliding-window draft layers need a positive `sliding_window` in the drafter config.")


class DFlashDrafterConfig(PretrainedConfig):
    r"""
    Configuration of a [`DFlashDrafter`]: a few non-causal decoder layers that denoise a block `[anchor, MASK, ...]`
    while attending to fused hidden states of the target model.

    The drafter has no embedding table or LM head of its own: it borrows the target's. Its width therefore equals the
    target's `hidden_size`.

    Args:
        hidden_size (`int`): width of the drafter, equal to the target's hidden size.
        intermediate_size (`int`): SwiGLU inner size.
        num_hidden_layers (`int`): number of draft decoder layers.
        num_attention_heads / num_key_value_heads / head_dim: attention geometry (GQA supported).
        rms_norm_eps (`float`), rope_theta (`float`), attention_bias (`bool`), use_qk_norm (`bool`): layer details.
        block_size (`int`): the block size the drafter was trained with (anchor included). Decoding may override it.
        target_layer_ids (`list[int]`): target layers whose outputs (`hidden_states[i + 1]`) form the context features.
        num_target_layers (`int`): number of layers of the target the drafter was made for.
        target_hidden_size (`int`): hidden size of that target (width of each context feature).
        target_vocab_size (`int`): vocabulary size of that target (the drafter reads its embedding and LM head).
        target_model_type / target_name_or_path: identity of that target, recorded for error messages and cards.
        mask_token_id (`int`): token id whose *target* embedding fills the masked block positions. It must be a token the
            target never produces in normal text (e.g. an unused special token); see `blockpilot_hf.modeling_drafter.choose_mask_token_id`.
        max_block_size (`int`): the largest block size decoding accepts with this drafter.
        draft_vocab_size (`int`, *optional*): when set, the drafter proposes only this many target tokens (its buffer
            `draft_token_ids`, see `DFlashDrafter.set_draft_vocabulary`); `None`: the whole vocabulary.
        layer_types (`list[str]`, *optional*): per draft layer, `"full_attention"` (default for all) or
            `"sliding_attention"` (z-lab's field): a sliding layer's block queries see the context keys of the last
            `sliding_window` positions before their own, and their whole block.
        sliding_window (`int`, *optional*): the window of the sliding layers.
        bos_token_id / eos_token_id / pad_token_id (*optional*): the target's special tokens. The drafter speaks the
            target's vocabulary; code that compares an assistant's special tokens with its target's to decide whether
            they share a tokenizer (transformers' pipelines) finds the same ones.
    """

    model_type = "dflash_drafter"
    # The drafter proposes over the target's vocabulary; code that asks an assistant for `vocab_size` gets it.
    attribute_map = {"vocab_size": "target_vocab_size"}

    def __init__(
        self,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 100000.0,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        use_qk_norm: bool = True,
        initializer_range: float = 0.02,
        block_size: int = 16,
        max_block_size: int = 64,
        target_layer_ids: list[int] | None = None,
        num_target_layers: int = 30,
        target_hidden_size: int | None = None,
        target_vocab_size: int | None = None,
        target_model_type: str | None = None,
        target_name_or_path: str | None = None,
        mask_token_id: int | None = None,
        draft_vocab_size: int | None = None,
        layer_types: list[str] | None = None,
        sliding_window: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        blockpilot_version: str = __version__,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_qk_norm = use_qk_norm
        self.initializer_range = initializer_range
        self.block_size = block_size
        self.max_block_size = max_block_size
        self.num_target_layers = num_target_layers
        self.target_layer_ids = (
            list(target_layer_ids)
            if target_layer_ids is not None
            else default_target_layer_ids(num_target_layers, num_hidden_layers)
        )
        self.target_hidden_size = target_hidden_size if target_hidden_size is not None else hidden_size
        self.target_vocab_size = target_vocab_size
        self.target_model_type = target_model_type
        self.target_name_or_path = target_name_or_path
        self.mask_token_id = mask_token_id
        self.draft_vocab_size = draft_vocab_size
        self.layer_types = list(layer_types) if layer_types is not None else ["full_attention"] * num_hidden_layers
        self.sliding_window = sliding_window
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.blockpilot_version = blockpilot_version
        super().__init__(**kwargs)
        self._validate()

    def _validate(self):
        if not 1 <= self.block_size <= self.max_block_size:
            raise ValueError(
                f"block_size={self.block_size} must be in [1, max_block_size={self.max_block_size}]; "
                "raise max_block_size in the config if you really want larger blocks."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        vocab = self.target_vocab_size
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= (vocab or self.draft_vocab_size):
            raise ValueError(
                f"draft_vocab_size={self.draft_vocab_size} must be in [1, target_vocab_size={vocab}]; "
                "set it with `DFlashDrafter.set_draft_vocabulary`."
            )
        check_attention_layout(self.layer_types, self.num_hidden_layers, self.sliding_window)
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad or not self.target_layer_ids:
            raise ValueError(
                f"target_layer_ids={self.target_layer_ids} must be a non-empty list of layer indices in "
                f"[0, num_target_layers={self.num_target_layers})."
            )

    @property
    def context_feature_size(self) -> int:
        """Width of the concatenated target features the drafter's `fc` reads."""
        return len(self.target_layer_ids) * self.target_hidden_size


POLICY_FEATURES = ("prefill_distribution", "prefill_summary")


class Arm(NamedTuple):
    """One way to decode a request: blocks of `block_size` (1: no drafter) verified with `copy_tokens` tokens copied
    from the context beside them (0: no copy chain). Cost tables and policy outputs are keyed by `key`: `"4"` for
    block size 4 alone, `"4+5"` with a 5-token copy chain, `"1+5"` for the copy chain alone."""

    block_size: int
    copy_tokens: int = 0

    @property
    def key(self) -> str:
        return f"{self.block_size}+{self.copy_tokens}" if self.copy_tokens else str(self.block_size)

    @classmethod
    def from_key(cls, key) -> "Arm":
        block_size, plus, copy_tokens = str(key).partition("+")
        try:
            arm = cls(int(block_size), int(copy_tokens) if plus else 0)
        except ValueError:
            arm = None
        if arm is None or arm.block_size < 1 or arm.copy_tokens < 0 or (plus and not arm.copy_tokens):
            raise ValueError(
                f"{key!r} is not a block size (`4`) or a block size with a copy chain (`4+5`, block size 4 and 5 "
                "copied tokens)."
            )
        return arm


def policy_arms(candidate_block_sizes: list[int], copy_tokens: int = 0) -> list[Arm]:
    """What a policy predicts tau for: every candidate block size, and with `copy_tokens` the same sizes with the copy
    chain plus the copy chain alone (block size 1). Plain decoding (block size 1, no copy) needs no prediction: its tau
    is 1."""
    arms = [Arm(b) for b in candidate_block_sizes]
    if copy_tokens:
        arms += [Arm(b, copy_tokens) for b in sorted({1, *candidate_block_sizes})]
    return arms


def normalized_step_costs(step_costs: dict | None, arms: list[Arm]) -> dict | None:
    """`{batch size: {arm key: seconds}}` with string keys (as JSON stores them), checked to cover every arm with a
    positive cost."""
    if step_costs is None:
        return None
    table = {}
    for batch_size, costs in step_costs.items():
        if not isinstance(costs, dict) or int(batch_size) < 1:
            raise ValueError(
                f"step_costs must map batch sizes to {{block size: seconds}} tables (`blockpilot bench --step-costs`); "
                f"got {batch_size!r}: {costs!r}."
            )
        costs = {Arm.from_key(b).key: float(c) for b, c in costs.items()}
        missing = [arm.key for arm in arms if arm.key not in costs]
        if missing or any(c <= 0 for c in costs.values()):
            copy_hint = " --copy-tokens N" if any("+" in key for key in missing) else ""
            raise ValueError(
                f"step_costs at batch size {batch_size} must give a positive cost for every block size the policy "
                f"can choose {[arm.key for arm in arms]}; missing {missing}, got {costs}. Measure them with "
                f"`blockpilot bench --step-costs{copy_hint}` at these block sizes."
            )
        table[str(int(batch_size))] = costs
    if not table:
        raise ValueError("step_costs is empty; pass None to choose by predicted tau alone.")
    return table


def checked_machine_name(machine: str) -> str:
    """`machine` if it names a machine as `hardware.machine_of` does (`"cpu: ..."`, `"cuda: ..."`), else an
    error that says how to get one."""
    if not isinstance(machine, str) or ": " not in machine:
        raise ValueError(
            f"{machine!r} does not name a machine as `blockpilot_hf.hardware.machine_of(device)` does (e.g. "
            "\"cpu: AMD EPYC, avx512_bf16\"); `blockpilot bench --step-costs` records it in its file "
            "(`step_costs_machine(path)`)."
        )
    return machine


class BlockPolicyConfig(PretrainedConfig):
    r"""
    Configuration of a [`BlockPolicy`]: a small network that reads the target's prefill representation once per
    request, predicts tau (tokens committed per decoding step) at each of `candidate_block_sizes`, and picks a block
    size from those predictions; with `copy_tokens`, also whether to verify a chain copied from the context beside
    the drafter's block.

    Args:
        candidate_block_sizes (`list[int]`): the block sizes the policy predicts tau for.
        copy_tokens (`int`): the length of the copy chain (`prompt_lookup_num_tokens`) the policy may switch on; 0,
            never. With it the policy predicts tau for every candidate size with and without the chain, and for the
            chain alone (`arms`, in that order: the outputs of the policy's network).
        feature (`str`): which prefill representation the policy reads:
            - `"prefill_distribution"`: the paper's feature, the softmax of the target's last-position prefill logits
              (vocabulary-wide);
            - `"prefill_summary"`: the compact default, the last-position final hidden state plus a few statistics of
              that distribution (entropy, top-1/top-k mass, log prompt length).
        hidden_size (`int`): width of the MLP.
        num_hidden_layers (`int`): number of hidden blocks (the first projects the input, the others are residual).
        dropout (`float`): dropout used in training.
        summary_top_k (`int`): k of the top-k mass statistic.
        input_size (`int`): width of the feature vector (derived from the target when built with `from_target`).
        target_* / drafter_name_or_path: what the policy was trained for, checked at `generate` time.
        step_costs (`dict`, *optional*): seconds of one decoding step (draft + verify) on the hardware the policy
            serves, `{batch size: {arm key: seconds}}` (`Arm.key`: `"4"`, or `"4+5"` with a 5-token copy chain),
            measured by `blockpilot bench --step-costs [--copy-tokens N]`. Every table covers every arm; block size 1
            (plain decoding, no drafter) may be included. With it the policy
            maximises predicted tokens per second for the batch at hand; without it, predicted tau (the paper's
            objective).
        step_costs_device (`str`, *optional*): the device type the table was measured on (`"cpu"`, `"cuda"`, ...).
            Costs do not carry over between device types (a GPU verifies 16 tokens for the price of 1, a CPU does
            not), so a policy serving on another type warns and decides by predicted tau alone. `None` (tables saved
            before this field existed): the table applies everywhere.
        step_costs_machine (`str`, *optional*): the machine `step_costs` was measured on (`hardware.machine_of`:
            `"cpu: AMD EPYC, avx512_bf16"`). Serving on another machine of the same type, with no table of its own in
            `step_costs_by_machine`, the policy decides by this table and says so once.
        step_costs_by_machine (`dict`, *optional*): tables for other machines, `{machine: {batch size: {arm key:
            seconds}}}` (machine names as `hardware.machine_of` gives them). Machines of one device type still rank
            the arms differently (a 2-core Xeon with AMX prices a copy chain at 1.5x a plain step, a 2-core AMD EPYC
            at 1.0x), so a policy serving on a machine named here decides by that machine's table.
        label_temperatures (`list[float]`): the sampling temperatures of the labels the policy learnt from (0: greedy,
            `collect-labels --temperature`), one set of tau predictions each. A request between two of them gets the
            linear interpolation of theirs; one outside the range gets the nearest one's, with a warning (a
            greedy-only policy serving a sampled request overrates acceptance).
    """

    model_type = "block_policy"

    def __init__(
        self,
        candidate_block_sizes: list[int] | None = None,
        copy_tokens: int = 0,
        feature: str = "prefill_summary",
        hidden_size: int = 256,
        num_hidden_layers: int = 2,
        dropout: float = 0.1,
        summary_top_k: int = 10,
        input_size: int | None = None,
        target_hidden_size: int | None = None,
        target_vocab_size: int | None = None,
        target_name_or_path: str | None = None,
        drafter_name_or_path: str | None = None,
        drafter_block_size: int | None = None,
        step_costs: dict | None = None,
        step_costs_device: str | None = None,
        step_costs_machine: str | None = None,
        step_costs_by_machine: dict | None = None,
        label_temperatures: list[float] | None = None,
        blockpilot_version: str = __version__,
        **kwargs,
    ):
        self.candidate_block_sizes = list(candidate_block_sizes) if candidate_block_sizes else [14, 15, 16, 17, 18]
        if feature not in POLICY_FEATURES:
            raise ValueError(f"feature={feature!r} is not one of {POLICY_FEATURES}.")
        if any(b < 1 for b in self.candidate_block_sizes) or len(set(self.candidate_block_sizes)) != len(
            self.candidate_block_sizes
        ):
            raise ValueError(f"candidate_block_sizes={self.candidate_block_sizes} must be distinct sizes >= 1.")
        if isinstance(copy_tokens, bool) or not isinstance(copy_tokens, int) or copy_tokens < 0:
            raise ValueError(f"copy_tokens={copy_tokens!r} must be a whole number of tokens (0: no copy chain).")
        self.copy_tokens = copy_tokens
        self.feature = feature
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.dropout = dropout
        self.summary_top_k = summary_top_k
        self.target_hidden_size = target_hidden_size
        self.target_vocab_size = target_vocab_size
        self.input_size = input_size
        self.target_name_or_path = target_name_or_path
        self.drafter_name_or_path = drafter_name_or_path
        self.drafter_block_size = drafter_block_size
        self.step_costs = normalized_step_costs(step_costs, self.arms)
        self.step_costs_device = step_costs_device if self.step_costs is not None else None
        self.step_costs_machine = (
            checked_machine_name(step_costs_machine) if self.step_costs is not None and step_costs_machine else None
        )
        self.step_costs_by_machine = {
            checked_machine_name(machine): normalized_step_costs(table, self.arms)
            for machine, table in (step_costs_by_machine or {}).items()
        }
        self.label_temperatures = sorted({float(t) for t in label_temperatures}) if label_temperatures else [0.0]
        if any(t < 0 for t in self.label_temperatures):
            raise ValueError(f"label_temperatures={self.label_temperatures} must be >= 0 (0: greedy).")
        self.blockpilot_version = blockpilot_version
        super().__init__(**kwargs)

    @property
    def arms(self) -> list[Arm]:
        """What the policy predicts tau for, in the order of its outputs (`policy_arms`)."""
        return policy_arms(self.candidate_block_sizes, self.copy_tokens)

"""Shared fixtures for the blockpilot_hf core tests: tiny random targets, drafters, and test-only oracle drafters.

Everything is tiny (hidden 32-64, 2-4 layers, vocab <= 128) and fp32 so the whole suite runs in a few minutes on CPU.
Randomness is always seeded inside the factories / tests, never at import time.
"""

import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from transformers.generation.streamers import BaseStreamer

import blockpilot_hf
from blockpilot_hf import DFlashDrafter

VOCAB = 96


# ----------------------------------------------------------------------------------------------- targets


def make_target(
    kind: str = "llama",
    seed: int = 0,
    vocab_size: int = VOCAB,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    eos_token_id=None,
    logit_scale: float | None = None,
    enable: bool = True,
):
    """A tiny random fp32 target. The same `(kind, seed, sizes)` always gives the same weights, whatever `eos_token_id`.

    `logit_scale` multiplies the LM head so the next-token distribution is peaked (useful for sampling tests: a random
    tiny model is otherwise almost uniform).
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        config = LlamaConfig(**common)
        cls = LlamaForCausalLM
    elif kind == "qwen3":
        config = Qwen3Config(head_dim=hidden_size // num_heads, **common)
        cls = Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
    if enable:
        blockpilot_hf.enable(model)
    return model


def make_prompt(seed: int = 0, length: int = 7, vocab_size: int = VOCAB, batch: int = 1) -> torch.LongTensor:
    """A random prompt that never contains the mask token (the last id)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, vocab_size - 1, (batch, length), generator=gen)


def make_drafter(target, num_layers: int = 1, block_size: int = 4, seed: int = 0, cls=DFlashDrafter, **kwargs):
    """A randomly initialised drafter for `target`, mask token = last vocabulary id."""
    torch.manual_seed(10_000 + seed)
    vocab = target.get_input_embeddings().weight.shape[0]
    return cls.from_target(target, num_layers=num_layers, block_size=block_size, mask_token_id=vocab - 1, **kwargs).eval()


def greedy_reference(target, input_ids: torch.LongTensor, max_new_tokens: int, **generate_kwargs) -> torch.LongTensor:
    """Plain greedy `generate` ignoring EOS: the full sequence (prompt + continuation) an oracle copies."""
    saved = copy.deepcopy(target.generation_config)
    try:
        target.generation_config.eos_token_id = None
        out = target.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens, **generate_kwargs)
    finally:
        target.generation_config = saved
    assert out.shape[1] == input_ids.shape[1] + max_new_tokens
    return out


# ----------------------------------------------------------------------------------------------- oracle drafter


def token_hidden_table(lm_head: torch.nn.Linear, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token t, a hidden vector h_t with `argmax(lm_head(h_t)) == t` where one exists.

    Start from the least-squares solution of `W h = 10 * onehot(t) - bias` (`W` is the LM head weight, vocab x hidden,
    usually overdetermined), then refine all rows at once with a few steps of cross-entropy descent. Returns the
    `(vocab, hidden)` table and a boolean mask of the tokens whose construction provably yields the right argmax
    (with a margin, so fp noise cannot flip it).
    """
    weight = lm_head.weight.detach().float()
    bias = lm_head.bias.detach().float() if lm_head.bias is not None else torch.zeros(weight.shape[0])
    vocab = weight.shape[0]
    targets = 10.0 * torch.eye(vocab) - bias[None, :]  # (vocab tokens, vocab logits)
    table = torch.linalg.lstsq(weight, targets.T).solution.T.contiguous()  # (vocab, hidden)
    table = table.clone().requires_grad_(True)
    opt = torch.optim.Adam([table], lr=0.05)
    labels = torch.arange(vocab)
    with torch.enable_grad():
        for _ in range(steps):
            logits = table @ weight.T + bias
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    table = table.detach()
    logits = lm_head(table.to(lm_head.weight.dtype)).float()
    top2 = logits.topk(2, dim=-1)
    achievable = (top2.indices[:, 0] == labels) & (top2.values[:, 0] - top2.values[:, 1] > 1e-3)
    return table, achievable


class OracleDrafter(DFlashDrafter):
    """Test-only drafter that "copies the target": block position k of a block anchored at p proposes `reference[p+k]`.

    It runs the real drafter forward (so the draft KV cache is maintained exactly as in production) and then replaces
    the output hidden states with vectors whose target-LM-head argmax is the wanted token (see `token_hidden_table`).

    * `corrupt_fraction`: a deterministic pseudo-random fraction of (anchor, k) pairs proposes a wrong token, so
      partial-acceptance paths are exercised (the same pair is always corrupted, whatever the block size);
    * `fixed_token`: the "bad" drafter, always proposing that token.
    """

    def setup_oracle(self, target, reference=None, corrupt_fraction: float = 0.0, salt: int = 0, fixed_token=None):
        table, achievable = token_hidden_table(target.get_output_embeddings())
        self._table = table
        self._achievable = achievable
        # one reference row per batch row, indexed by real position (padding removed)
        self._references = None if reference is None else [row.clone() for row in reference]
        self._corrupt_fraction = corrupt_fraction
        self._salt = salt
        self._fixed_token = fixed_token
        self.oracle_calls = []  # (anchor position, proposed tokens) per call
        if reference is not None:
            missing = [t for row in self._references for t in row.tolist() if not achievable[t]]
            assert not missing, f"oracle construction failed for reference tokens {missing}"
        if fixed_token is not None:
            assert achievable[fixed_token], f"oracle construction failed for fixed token {fixed_token}"
        return self

    def _corrupted(self, anchor: int, k: int) -> bool:
        if self._corrupt_fraction <= 0:
            return False
        h = (anchor * 2654435761 + k * 40503 + self._salt * 97) % 1000
        return h < self._corrupt_fraction * 1000

    def _wrong_token(self, good: int, anchor: int, k: int) -> int:
        candidates = [t for t in range(self._table.shape[0]) if self._achievable[t] and t != good]
        return candidates[(anchor * 31 + k * 7 + self._salt) % len(candidates)]

    def wanted_tokens(self, anchor: int, block_len: int, row: int = 0) -> list[int]:
        tokens = []
        for k in range(block_len):
            if self._fixed_token is not None:
                tokens.append(self._fixed_token)
                continue
            pos = anchor + k
            reference = self._references[row]
            good = int(reference[pos]) if pos < reference.shape[0] else int(reference[-1])
            if k > 0 and self._corrupted(anchor, k):
                good = self._wrong_token(good, anchor, k)
            tokens.append(good)
        return tokens

    def forward(self, noise_embeds, context_hidden_states=None, position_ids=None, **kwargs):
        out = super().forward(noise_embeds, context_hidden_states=context_hidden_states, position_ids=position_ids, **kwargs)
        self.real_hidden = out.last_hidden_state.detach().clone()  # what the real drafter computed, before the swap
        block_len = noise_embeds.shape[1]
        rows = []
        for row in range(noise_embeds.shape[0]):
            anchor = int(position_ids[row, -block_len])
            tokens = self.wanted_tokens(anchor, block_len, row)
            if row == 0:
                self.oracle_calls.append((anchor, tokens[1:]))
            rows.append(tokens)
        hidden = self._table[torch.tensor(rows)].to(out.last_hidden_state.dtype)
        out.last_hidden_state = hidden.to(out.last_hidden_state.device)
        return out


def make_oracle(
    target, input_ids, max_new_tokens: int, block_size: int = 4, corrupt_fraction: float = 0.0, salt=0, **generate_kwargs
):
    """An oracle drafter for `target` on `input_ids`, copying the plain greedy continuation (with enough margin for
    blocks running past the end). `generate_kwargs` (e.g. `repetition_penalty`) shape that continuation. For a batch,
    each row's reference is computed alone from its unpadded prompt (`attention_mask` marks the padding)."""
    mask = generate_kwargs.pop("attention_mask", None)
    rows = []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row : row + 1] if mask is None else input_ids[row : row + 1, mask[row].bool()]
        rows.append(greedy_reference(target, ids, max_new_tokens + 24, **generate_kwargs)[0])
    reference = rows
    drafter = make_drafter(target, block_size=block_size, cls=OracleDrafter)
    return drafter.setup_oracle(target, reference, corrupt_fraction=corrupt_fraction, salt=salt)


def make_bad_drafter(target, fixed_token: int = 3, block_size: int = 4):
    drafter = make_drafter(target, block_size=block_size, cls=OracleDrafter)
    return drafter.setup_oracle(target, None, fixed_token=fixed_token)


def draft_from_scratch(target, drafter, tokens: torch.LongTensor, block_size: int) -> torch.LongTensor:
    """The drafter's proposals for a block anchored at the last of `tokens` (shape `(1, n)`), computed from nothing:
    one target forward over `tokens[:, :-1]`, one drafter forward on fresh caches. What the incremental loop must
    reproduce."""
    from blockpilot_hf.decoding import DecodingWorkspace
    from blockpilot_hf.features import context_features

    n = tokens.shape[1]
    with torch.no_grad():
        features = context_features(
            target(tokens[:, :-1], output_hidden_states=True).hidden_states, drafter.config.target_layer_ids
        )
        workspace = DecodingWorkspace(target, drafter, batch_size=1, capacity=n + 2 * block_size, use_graphs=False)
        workspace.reset(torch.ones(1, n - 1, dtype=torch.bool))
        workspace.row_block_sizes.fill_(block_size)
        _, draft = workspace.steps(block_size)
        draft.anchor_ids.fill_(int(tokens[0, -1]))
        draft.anchor_positions.fill_(n - 1)
        return draft.run(features, torch.arange(n - 1)[None], torch.tensor(0))


# ----------------------------------------------------------------------------------------------- streamer


class CollectingStreamer(BaseStreamer):
    """Records every `put` (as a list of ints) and whether `end` was called."""

    def __init__(self):
        self.puts = []
        self.ended = False

    def put(self, value):
        assert not self.ended, "put after end"
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine makes multi-threaded OpenMP spin badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama_target():
    return make_target("llama", seed=0)


@pytest.fixture(scope="session")
def qwen3_target():
    return make_target("qwen3", seed=1, hidden_size=64, num_layers=3)


@pytest.fixture
def prompt():
    return make_prompt(0)


# ----------------------------------------------------------------------------------------------- training helpers
# Shared by test_training / test_labels / test_policy / test_hub / test_benchmark.

SMOL_VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary
SMOL_EOS = 2
SMOL_MASK = 16  # what `choose_mask_token_id` picks for the SmolLM2 tokenizer


def greedy_rows(target, num_prompts: int, prompt_len: int = 6, max_new_tokens: int = 32, seed: int = 100) -> list[dict]:
    """Rows in the `regenerate_responses` format made by `target` itself (greedy, EOS ignored)."""
    vocab = target.get_input_embeddings().weight.shape[0]
    prompts = torch.cat([make_prompt(seed + i, length=prompt_len, vocab_size=vocab) for i in range(num_prompts)])
    out = greedy_reference(target, prompts, max_new_tokens)
    return [
        {"prompt_id": f"p{i}", "mode": "greedy", "prompt_len": prompt_len, "input_ids": row}
        for i, row in enumerate(out.tolist())
    ]


def tiny_training_args(output_dir, **overrides):
    """Drafter training arguments that learn something on a VOCAB-96 target in well under a second."""
    from blockpilot_hf.training.drafter import DrafterTrainingArguments

    kwargs = dict(
        output_dir=str(output_dir), block_size=4, num_layers=1, max_anchors=16, batch_size=8, epochs=1000,
        max_steps=100, learning_rate=3e-2, warmup_ratio=0.1, log_every_steps=5, save_every_steps=10_000,
        mask_token_id=VOCAB - 1,
    )
    kwargs.update(overrides)
    return DrafterTrainingArguments(**kwargs)


@pytest.fixture(scope="session")
def trained_setup(tmp_path_factory):
    """`(target, drafter, rows, output_dir)`: a 1-layer block-4 drafter trained 100 steps on its llama target's own
    greedy outputs (mean acceptance ~2.5 tokens per step), saved by `train_drafter` to `output_dir`."""
    from blockpilot_hf.training.drafter import train_drafter

    target = make_target("llama", seed=0)
    rows = greedy_rows(target, 16)
    output_dir = tmp_path_factory.mktemp("trained_drafter")
    drafter = train_drafter(target, rows, tiny_training_args(output_dir))
    return target, drafter.eval(), rows, output_dir


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (converted from the shipped GGUF on first use, then read from the cache)."""
    from transformers import AutoTokenizer

    from blockpilot_hf.default_model import default_target_path

    return AutoTokenizer.from_pretrained(default_target_path())


def make_smol_target(seed: int = 0, hidden_size: int = 32, num_layers: int = 2, enable: bool = True):
    """A tiny random Llama with the SmolLM2 vocabulary and special tokens (bos 1, eos = pad = 2)."""
    config = LlamaConfig(
        vocab_size=SMOL_VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
        eos_token_id=SMOL_EOS, pad_token_id=SMOL_EOS, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = SMOL_EOS
    model.generation_config.pad_token_id = SMOL_EOS
    model.generation_config.bos_token_id = 1
    if enable:
        blockpilot_hf.enable(model)
    return model


@pytest.fixture(scope="session")
def saved_smol_target(tmp_path_factory, smol_tokenizer):
    """A directory with a tiny random SmolLM2-vocabulary Llama and the real tokenizer, loadable by `cli.load_target`."""
    path = tmp_path_factory.mktemp("smol_target")
    make_smol_target(seed=0, enable=False).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


REAL_LOOKING_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a list and a tuple in Python.",
    "What is the capital of France, and why is it famous?",
    "Give me three tips for writing clear emails.",
    "How does a hash table work?",
    "Write a SQL query that counts orders per customer.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Write a haiku about autumn rain.",
    "What are the main causes of inflation?",
    "Create a bash script that prints the ten largest files in a folder.",
    "Describe how photosynthesis works.",
]


def write_prompts_jsonl(path, prompts: list[str], ids: list[str] | None = None):
    import json

    ids = ids or [f"q{i}" for i in range(len(prompts))]
    with open(path, "w") as f:
        for pid, text in zip(ids, prompts):
            f.write(json.dumps({"prompt_id": pid, "prompt": text}) + "\n")
    return path

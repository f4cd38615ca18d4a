"""The real SmolLM2 tokenizer's constants, and prompt files for the CLI tests that run a SmolLM2-vocabulary target."""

import json

SMOL_VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary
SMOL_EOS = 2
SMOL_MASK = 16  # what `choose_mask_token_id` picks for the SmolLM2 tokenizer

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
    ids = ids or [f"q{i}" for i in range(len(prompts))]
    with open(path, "w") as f:
        for pid, text in zip(ids, prompts):
            f.write(json.dumps({"prompt_id": pid, "prompt": text}) + "\n")
    return path

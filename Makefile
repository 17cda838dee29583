# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   install, then train a tiny GPT on 2 CPU ranks and print the result table
#   make test   install, then run the test suite (make test-fast: the tier without multi-rank or DeepSpeed tests)
# The CPU build of torch is pinned here on purpose: an unpinned torch pulls a multi-GB CUDA build.
# On a cluster: the README's install paragraph.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_CPU)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/harness run launcher.nproc=2 train.micro_batch_size=8 train.steps=10

# Between edits: no multi-rank process group and no DeepSpeed build (README: its duration).
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not multirank and not deepspeed" -n 2 --dist worksteal

# Every test: the single-process tier two at a time (as test-fast), then the multi-rank and DeepSpeed tier one at a
# time (each already starts 2-8 processes on the host's cores); fails if either tier fails.
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	rc=0; \
	$(BIN)/python -m pytest -m "not multirank and not deepspeed" -n 2 --dist worksteal || rc=1; \
	$(BIN)/python -m pytest -m "multirank or deepspeed" || rc=1; \
	exit $$rc

clean:
	rm -rf $(VENV) results/runs .pytest_cache

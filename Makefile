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

# The main job (CPU, offline): pretrain the tiny LM on hh-rlhf dialogues, then train and
# evaluate a preference model from it. The scaling sweep (reward vs sqrt KL) will replace it.
run: setup
	$(PY) -m rlhf_jax.train_lm --config=configs/lm.py:$(PRESET) --workdir=runs/lm_$(PRESET)
	$(PY) -m rlhf_jax.train_pm --config=configs/pm.py:$(PRESET) --workdir=runs/pm_$(PRESET) \
	    --config.init_from=runs/lm_$(PRESET)
	@echo "PM report: runs/pm_$(PRESET)/eval_pm.json, calibration.md, reliability.png"

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/bench_model.py --preset=$(PRESET)

clean:
	rm -rf $(VENV) runs

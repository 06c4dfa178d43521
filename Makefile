# diffviz — every target sets up what it needs, so each works on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned for this CPU machine here, not in the library's own requirements.
TORCH_PIN ?= torch==2.13.0
PORT ?= 5006
DEMO_DIR ?= datasets/demo
PYTEST_ARGS ?=

.PHONY: demo test compat bench site datasets venv chromium clean help

help:
	@echo "make demo   - set up, generate a run with the embedded default model, serve the dashboard"
	@echo "make test   - set up (venv, Chromium) and run the whole test suite"
	@echo "make compat - run the capture tests against the oldest diffusers pyproject.toml allows"
	@echo "make bench  - run the benchmarks and print their ratios"
	@echo "make site   - build the static Pyodide site into site/"
	@echo "make datasets - re-record the shipped runs datasets/default, datasets/compare and datasets/mmdit"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml diffviz.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[capture,test,scale]"
	touch $@

# Debian's Chromium for the browser tests (never `playwright install`).
chromium:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { echo "installing Debian's chromium"; (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; }

demo: venv
	$(VENV)/bin/diffviz generate --prompt "a red circle and a blue square" --num-steps 30 \
	  --output-dir $(DEMO_DIR) --overwrite-output
	$(VENV)/bin/diffviz validate $(DEMO_DIR) --strict
	$(VENV)/bin/diffviz serve --port $(PORT) --dataset $(DEMO_DIR)

# For the self-hosted site test: the npm core of Pyodide (the version `panel convert` targets, pinned in
# package.json) and the micropip wheel that the core lacks (the version its lock file names).
PYODIDE_CORE := node_modules/pyodide/pyodide.js
SELFHOST_WHEELS := node_modules/.diffviz-wheels

$(PYODIDE_CORE): package.json
	@command -v npm >/dev/null 2>&1 || { echo "installing Debian's npm"; (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm) >/dev/null; }
	npm install --no-package-lock --no-audit --no-fund --silent
	touch $@

$(SELFHOST_WHEELS)/.done: $(PYODIDE_CORE) | $(VENV)/.installed
	read -r spec pyver < <($(PY) -c 'import json; d = json.load(open("node_modules/pyodide/pyodide-lock.json")); print("micropip==" + d["packages"]["micropip"]["version"], ".".join(d["info"]["python"].split(".")[:2]))') && \
	  $(PIP) download -q --no-deps --only-binary=:all: --python-version "$$pyver" -d $(SELFHOST_WHEELS) "$$spec"
	touch $@

test: venv chromium $(PYODIDE_CORE) $(SELFHOST_WHEELS)/.done
	$(PY) -m pytest $(PYTEST_ARGS)

# The lower bound of diffusers in pyproject.toml, tested: a second venv that sees the first one's packages (a .pth
# file) but has its own diffusers, so only diffusers differs. Keep COMPAT_DIFFUSERS equal to that bound.
COMPAT_VENV ?= .venv-compat
COMPAT_DIFFUSERS ?= 0.35.2
CAPTURE_TESTS ?= tests/test_capture_observe.py tests/test_recorder.py tests/test_joint.py tests/test_families.py tests/test_new_families.py

compat: venv
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
	  "$$($(COMPAT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_diffviz_main.pth"
	$(COMPAT_VENV)/bin/python -m pip install -q --no-deps "diffusers==$(COMPAT_DIFFUSERS)"
	$(COMPAT_VENV)/bin/python -c 'import diffusers; assert diffusers.__version__ == "$(COMPAT_DIFFUSERS)", diffusers.__file__'
	grep -q '"diffusers>=$(COMPAT_DIFFUSERS)"' pyproject.toml
	$(COMPAT_VENV)/bin/python -m pytest -q $(CAPTURE_TESTS)

bench: venv chromium $(PYODIDE_CORE) $(SELFHOST_WHEELS)/.done
	@set -e; for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done
	@echo "== tests/bench/bench_capture.py --families"; $(PY) tests/bench/bench_capture.py --families --threads 1
	@echo "== tests/bench/bench_capture.py --mmdit-size"; $(PY) tests/bench/bench_capture.py --mmdit-size --threads 1

# The shipped runs: same seed, two prompts that differ in one word.
DATASET_SEED ?= 4
datasets: venv
	$(VENV)/bin/diffviz generate --prompt "a red circle and a blue square" --seed $(DATASET_SEED) \
	  --output-dir datasets/default --overwrite-output --quiet
	$(VENV)/bin/diffviz generate --prompt "a red triangle and a blue square" --seed $(DATASET_SEED) \
	  --output-dir datasets/compare --overwrite-output --quiet
	$(VENV)/bin/diffviz generate --model toyworld-mmdit --prompt "a red circle and a blue square" --seed $(DATASET_SEED) \
	  --output-dir datasets/mmdit --overwrite-output --quiet
	$(VENV)/bin/diffviz validate datasets/default --strict
	$(VENV)/bin/diffviz validate datasets/compare --strict
	$(VENV)/bin/diffviz validate datasets/mmdit --strict

# The npm Pyodide core lets build-site check the install plan against its lock and size the first visit.
site: venv $(PYODIDE_CORE) $(SELFHOST_WHEELS)/.done
	$(VENV)/bin/diffviz build-site --out site

clean:
	rm -rf site dist build *.egg-info test-artifacts $(COMPAT_VENV)

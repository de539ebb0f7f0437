# Two commands after cloning:
#   make lab    set up .venv and open the course in JupyterLab
#   make test   set up .venv and run every test (unit tests, checkers, notebooks)
# and, for developers and instructors: make test-seeds, make test-browser, make chapters, make bench
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# JupyterLab refuses to start as root (containers, some cloud machines) unless told to
LAB_ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test test-solutions test-fast test-seeds test-browser chapters bench clean

# make test-seeds SEEDS="1 2 3": retrain every model with each seed into .seeds/<seed>/ and run the
# solved chapters on those checkpoints (their claims must hold for any seed, not one checkpoint)
SEEDS ?= 1 2 3

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab $(LAB_ROOT_FLAG) --ServerApp.root_dir=. chapters/00_tour.ipynb

# two pytest workers (pytest-xdist): the course's models run on one thread each, so two workers use both cores
# of a 2-core laptop; a notebook's cells stay together in one worker, and so do tests marked with one
# xdist_group (--dist loadgroup)
WORKERS ?= 2

# every chapter runs once here, as a learner who solved every other exercise would run it, with every claim
# asserted and every solution checked (tests/tooling/test_notebooks.py); nbval on the solved chapters runs in
# test-seeds, on retrained models (CI runs both). make test-solutions: nbval on the shipped models.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup -m "not browser" tests

test-solutions: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadscope --nbval-lax --nbval-cell-timeout=600 solutions

test-seeds: $(STAMP)
	@set -e; for seed in $(SEEDS); do \
	  echo "== seed $$seed: retraining every model into .seeds/$$seed (kept and reused while current)"; \
	  $(BIN)/python -m utils.train all --seed $$seed --out .seeds/$$seed --reuse; \
	  echo "== seed $$seed: the solved chapters on these checkpoints"; \
	  CIRCUITS_MODELS_DIR=$(CURDIR)/.seeds/$$seed $(BIN)/python -m pytest -q -p no:cacheprovider -n $(WORKERS) --dist loadscope --nbval-lax --nbval-cell-timeout=600 solutions; \
	done

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup -m "not slow and not browser" tests

# every solutions notebook and every unfilled chapter in a real JupyterLab in headless Chromium
# (Debian's chromium package, installed here when missing; needs root or sudo); screenshots land in
# screenshots/
test-browser: $(STAMP)
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	$(BIN)/python -m pytest -q -m browser tests/tooling/test_browser.py

chapters: $(STAMP)
	$(BIN)/python -m utils.notebooks
	$(BIN)/python -m utils.binder

bench: $(STAMP)
	$(BIN)/python -m utils.bench

clean:
	rm -rf $(VENV)

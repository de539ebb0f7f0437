# Two commands after cloning:
#   make lab    set up .venv and open the course in JupyterLab
#   make test   set up .venv and run every test (unit tests, checkers, notebooks)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# JupyterLab refuses to start as root (containers, some cloud machines) unless told to
LAB_ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test test-fast chapters bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab $(LAB_ROOT_FLAG) --ServerApp.root_dir=. chapters/00_tour.ipynb

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-cell-timeout=600 solutions

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

chapters: $(STAMP)
	$(BIN)/python -m utils.notebooks

bench: $(STAMP)
	$(BIN)/python -m utils.bench

clean:
	rm -rf $(VENV)

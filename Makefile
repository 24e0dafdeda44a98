# Two entry points, both of which create (or reuse) the virtual environment in .venv:
#   make run    the main job: the whole pipeline, locally, on the embedded synthetic dataset
#   make test   the whole test suite, one test file at a time on each of two workers, end-to-end files first
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,spark]'
	touch $(STAMP)

.PHONY: run test install
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/m2rec run

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

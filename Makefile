# Two commands on a fresh machine:  make demo  (install + main job),  make test  (install + tests)
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
export DARE_SHARED ?= ../shared

.PHONY: install demo test clean-runs

$(VENV)/.installed: pyproject.toml constraints.txt requirements/opencompass.txt docs/examples/dare-example-plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0                      # first, from the CPU wheel
	$(PIP) install -q -c constraints.txt -e ".[test]"    # torch kept at 2.13.0 by the constraints
	$(PIP) install -q -c constraints.txt --no-deps -e docs/examples/dare-example-plugin
	# OpenCompass 0.5.4 beside trl/datasets 5.x/numpy 2: without its metadata pins (datasets<4,
	# numpy<2 are not needed on the generation/eval path), then the packages it imports, pinned.
	$(PIP) install -q --no-deps opencompass==0.5.4 mmengine-lite==0.11.0rc3
	$(PIP) install -q -c constraints.txt -r requirements/opencompass.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dare quickstart --seed 0

test: install
	$(PY) -m pytest

clean-runs:
	rm -rf runs

# Two entry points on a fresh machine: `make demo` (main job end to end) and `make test`.
# While working: `make test-quick` (the tests not marked e2e: no training, no recipe stages) and `make lint`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo study-demo test test-quick lint bench clean

$(STAMP): setup.py requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements-lock.txt -r requirements-lock.txt
	$(PY) -m pip install -q -c requirements-lock.txt -e ".[dev,export]"
	$(PY) -m pip install -q --no-deps wespeaker-unofficial==0.0.2 speakerlab==0.0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/voxceleb/demo.py

# Q-Margin and AAM over three training seeds on the 200-test-speaker `study` corpus, two runs at a time;
# prints the verdict pooled over seeds and test speakers (docs/studies.md gives its time on 2 cores).
study-demo: $(STAMP)
	$(PY) recipes/voxceleb/demo.py --seeds 1 2 3 4 5 --jobs 2 --out exp/study_demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not e2e" tests

# Settings in pyproject.toml; `ruff format .` and `ruff check --fix .` repair most of what this reports.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/loss_step.py
	$(PY) bench/metrics.py
	$(PY) bench/large_classes.py
	$(PY) bench/bootstrap.py
	$(PY) bench/inference.py

clean:
	rm -rf $(VENV) build *.egg-info

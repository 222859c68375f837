# Both targets bootstrap .venv (scripts/bootstrap.sh) if it is missing or stale.
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv demo test

venv:
	bash scripts/bootstrap.sh

# The main job on the embedded tiny default.
demo: venv
	$(PY) -m workflows.cli quickstart --workdir work/quickstart

test: venv
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

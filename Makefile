VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench

setup:            ## fresh machine -> working environment in .venv
	bash scripts/setup.sh

test:             ## the test suite (two workers; one file per worker at a time)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo:             ## the main job on the bundled tiny default: data -> train -> predict -> submission
	bash scripts/demo.sh

bench:            ## speed and memory against fairchem's own EquiformerV2
	$(PY) benchmarks/compare_fairchem.py

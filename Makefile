VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench

setup:            ## fresh machine -> working environment in .venv
	bash scripts/setup.sh

# Two workers on two cores, one thread each: with torch's default (a thread per core) in both, their
# OpenMP threads wait on each other and the suite took 5:44 instead of 2:03 (one test 90 s, not 0.1 s).
test:             ## the test suite (two workers, one thread each; one file per worker at a time)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n 2 --dist loadfile tests

demo:             ## the main job on the bundled tiny default: data -> train -> predict -> submission
	bash scripts/demo.sh

bench:            ## speed and memory against fairchem's own EquiformerV2
	$(PY) benchmarks/compare_fairchem.py

VENV ?= .venv
PY := $(VENV)/bin/python
VENV2 ?= .venv-fairchem2
PY2 := $(VENV2)/bin/python

.PHONY: setup test demo bench setup-fairchem2 test-fairchem2

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

setup-fairchem2:  ## the second environment, for fairchem-core 2.x, in .venv-fairchem2 (torch 2.13)
	VENV2=$(VENV2) bash scripts/setup_fairchem2.sh

test-fairchem2:   ## the fairchem 2.x suite (tests_fairchem2/) in .venv-fairchem2
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY2) -m pytest -q -W ignore::DeprecationWarning tests_fairchem2

"""Freed CPU memory stays in the process (see fairchem_equiformerv2/cpu_memory.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Page faults of allocating (and freeing) 128 MB in 16 MB tensors, and 288 MB in 96 MB ones (above glibc's
# largest mmap threshold, 32 MB, and more than the heap holds after the first), before and after
# keep_freed_memory(), then
# whether the first CPU forward of a backbone applies it by itself (in a fresh process each: the
# setting is process-wide).
PROBE = """
import json, resource, sys, torch
from fairchem_equiformerv2 import cpu_memory

def faults(floats=4 * 2**20, count=8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(floats) for _ in range(count)]  # freed together, as in a step
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def large():
    return faults(24 * 2**20, 3)

faults(), large()
default, default_large = faults(), large()
in_effect = cpu_memory.keep_freed_memory()
faults(), faults(), large(), large()
print(json.dumps({"default": default, "kept": faults(), "default_large": default_large, "kept_large": large(), "in_effect": in_effect}))
"""

BACKBONE_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the tests folder
from structures import default_structures, to_batch
from test_model import hydra
from fairchem_equiformerv2 import cpu_memory
before = cpu_memory._in_effect
hydra()(to_batch(default_structures()[:1]))
print(json.dumps({"before": before, "after": cpu_memory._in_effect}))
"""


def probe(code: str, **env) -> dict:
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code, tests], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_memory_is_reused_without_page_faults():
    result = probe(PROBE)
    assert result["in_effect"]
    assert result["default"] > 8000  # 32768 pages of 4 KB, fewer where the kernel gives huge pages
    assert result["kept"] < 500
    assert result["default_large"] > 8000
    assert result["kept_large"] < 500


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_the_environment_variable_turns_it_off():
    result = probe(PROBE, EQUIFORMERV2_KEEP_FREED_MEMORY="0")
    assert not result["in_effect"]
    assert result["kept"] > 8000
    assert result["kept_large"] > 8000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_cpu_forward_applies_it():
    assert probe(BACKBONE_PROBE) == {"before": None, "after": True}

"""The process-wide choices (fairchem_equiformerv2/runtime.py): freed CPU memory stays in the process
once runtime.configure() has run, fairchem's launchers make that call by building a model through the
adapters, and the torch core makes none."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Page faults of allocating (and freeing) 128 MB in 16 MB tensors, and 288 MB in 96 MB ones (above glibc's
# largest mmap threshold, 32 MB, and more than the heap holds after the first), before and after
# runtime.configure(), then
# whether building a backbone through fairchem applies it by itself (in a fresh process each: the
# setting is process-wide).
PROBE = """
import json, resource, sys, torch
from fairchem_equiformerv2 import runtime

def faults(floats=4 * 2**20, count=8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(floats) for _ in range(count)]  # freed together, as in a step
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def large():
    return faults(24 * 2**20, 3)

faults(), large()
default, default_large = faults(), large()
in_effect = runtime.configure().keeps_freed_memory
faults(), faults(), large(), large()
print(json.dumps({"default": default, "kept": faults(), "default_large": default_large, "kept_large": large(), "in_effect": in_effect}))
"""

BACKBONE_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the tests folder
from structures import default_structures, to_batch
from test_model import hydra
from fairchem_equiformerv2 import runtime
before = runtime.choices()
hydra()(to_batch(default_structures()[:1]))
print(json.dumps({"before": before, "after": runtime.choices().keeps_freed_memory}))
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
def test_a_model_built_through_fairchem_applies_it():
    assert probe(BACKBONE_PROBE) == {"before": None, "after": True}


CORE_PROBE = """
import json, sys, torch
from fairchem.core.common.utils import radius_graph_pbc
sys.path.insert(0, sys.argv[1])  # the tests folder
from structures import default_structures, to_batch
from fairchem_equiformerv2 import runtime
from fairchem_equiformerv2.model.backbone import EquiformerV2Backbone
from fairchem_equiformerv2.model.heads import EnergyHead
from fairchem_equiformerv2.nn.ops import dense

class Core(EquiformerV2Backbone):  # the torch core with fairchem's search, and no adapter
    radius_search = staticmethod(radius_graph_pbc)

flag = torch._dynamo.config.optimize_ddp
shape = dict(num_layers=1, sphere_channels=8, attn_hidden_channels=8, num_heads=2, attn_alpha_channels=4,
             attn_value_channels=4, ffn_hidden_channels=8, edge_channels=8, lmax_list=[2], mmax_list=[1])
Core(**shape, torch_compile=True)  # built only: compiling would take minutes
backbone = Core(**shape)
batch = to_batch(default_structures()[:1])
EnergyHead(backbone)(batch, backbone(batch))
print(json.dumps({"choices": runtime.choices(), "route": dense._route, "ddp_flag_kept": torch._dynamo.config.optimize_ddp == flag}))
"""


def test_the_torch_core_changes_no_process_state():
    """Importing, building (torch_compile included) and running the model's own classes chooses no
    matmul route, leaves malloc and torch._dynamo's flags alone."""
    assert probe(CORE_PROBE) == {"choices": None, "route": "torch", "ddp_flag_kept": True}

"""EquiformerV2 for fairchem-core 1.x and 2.x.

Name the classes by dotted path in a fairchem config (``fairchem_equiformerv2.EquiformerV2Backbone``)
and fairchem imports this package by itself. The names below are those of the adapter for the
installed fairchem-core: :mod:`.adapters.fairchem1` (1.x: trainers, ``OCPCalculator``, Noisy Nodes and
the tools) or :mod:`.adapters.fairchem2` (2.x: ``HydraModelV2``, ``load_predict_unit``,
``FAIRChemCalculator``). Each is imported on first use, so importing the package imports no fairchem.

The floors, each importing only those below it (checked by the import-linter contracts in
``pyproject.toml``): :mod:`.so3` (SO(3) math) < :mod:`.nn` (blocks; :mod:`.nn.ops` their kernels) <
:mod:`.model` (on torch alone) < :mod:`.runtime` (process-wide choices) < :mod:`.adapters` (what
fairchem sees) < :mod:`.tools` (checkpoints, submissions, demo data, the CLI).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"

_MODEL_NAMES = ("EquiformerV2Backbone", "EnergyHead", "ForceHead", "StressHead")
#: name -> module, for fairchem-core 1.x
_FAIRCHEM1 = {
    **dict.fromkeys(_MODEL_NAMES, ".adapters.fairchem1"),
    **dict.fromkeys(("NoisyNodesBackbone", "NoisyNodesHead"), ".adapters.fairchem1"),
    **dict.fromkeys(("DeNSBackbone", "DeNSEnergyHead", "DeNSForceHead", "DeNSStressHead"), ".adapters.fairchem1"),
    "ConservativeHead": ".model.conservative",
    **dict.fromkeys(("calculator", "convert_checkpoint", "fix_checkpoint"), ".tools.checkpoints"),
}
_FAIRCHEM2 = dict.fromkeys(_MODEL_NAMES, ".adapters.fairchem2")
#: Modules that moved, by their old names: checkpoints converted for fairchem 2.x before the move name
#: ``fairchem_equiformerv2.fairchem2.EquiformerV2Backbone`` and so on, and keep loading.
_MOVED = {f"{__name__}.fairchem1": f"{__name__}.adapters.fairchem1", f"{__name__}.fairchem2": f"{__name__}.adapters.fairchem2"}
__all__ = list(_FAIRCHEM1)


def fairchem_major_version() -> int | None:
    """The installed fairchem-core's major version (1 or 2), or None when it is not installed."""
    try:
        return int(version("fairchem-core").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return None


def __getattr__(name: str):
    table = _FAIRCHEM2 if fairchem_major_version() == 2 else _FAIRCHEM1
    if name not in table:
        known = name in _FAIRCHEM1 or name in _FAIRCHEM2
        what = f"with fairchem-core {fairchem_major_version()}" if known else ""
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} {what}".rstrip())
    value = getattr(importlib.import_module(table[name], __name__), name)
    globals()[name] = value
    return value


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module of :data:`_MOVED` by its old name as the module at its new place."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in _MOVED else None

    def create_module(self, spec):
        module = importlib.import_module(_MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system gives the module this spec: keep its own
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

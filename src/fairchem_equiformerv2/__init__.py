"""EquiformerV2 for fairchem-core 1.x and 2.x.

Name the classes by dotted path in a fairchem config (``fairchem_equiformerv2.EquiformerV2Backbone``)
and fairchem imports this package by itself. The names below are those of the adapter for the
installed fairchem-core: :mod:`.fairchem1` (1.x: trainers, ``OCPCalculator``, Noisy Nodes and the
tools) or :mod:`.fairchem2` (2.x: ``HydraModelV2``, ``load_predict_unit``, ``FAIRChemCalculator``).
Each is imported on first use, so importing the package imports no fairchem.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"

_MODEL_NAMES = ("EquiformerV2Backbone", "EnergyHead", "ForceHead", "StressHead")
#: name -> module, for fairchem-core 1.x
_FAIRCHEM1 = {
    **dict.fromkeys(_MODEL_NAMES, ".fairchem1"),
    "NoisyNodesBackbone": ".noisy_nodes", "NoisyNodesHead": ".noisy_nodes",
    **dict.fromkeys(("DeNSBackbone", "DeNSEnergyHead", "DeNSForceHead", "DeNSStressHead"), ".fairchem1"),
    "ConservativeHead": ".conservative",
    "calculator": ".checkpoints", "convert_checkpoint": ".checkpoints", "fix_checkpoint": ".checkpoints",
}
_FAIRCHEM2 = dict.fromkeys(_MODEL_NAMES, ".fairchem2")
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

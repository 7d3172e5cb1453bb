"""EquiformerV2 for fairchem-core 1.x.

Name the classes by dotted path in a fairchem config (``fairchem_equiformerv2.EquiformerV2Backbone``)
and fairchem imports this package by itself.
"""
from .backbone import EquiformerV2Backbone
from .checkpoints import calculator, convert_checkpoint, fix_checkpoint
from .heads import EnergyHead, ForceHead, StressHead
from .noisy_nodes import NoisyNodesBackbone, NoisyNodesHead

__version__ = "0.1.0"
__all__ = [
    "EquiformerV2Backbone", "EnergyHead", "ForceHead", "StressHead",
    "NoisyNodesBackbone", "NoisyNodesHead",
    "calculator", "convert_checkpoint", "fix_checkpoint",
]

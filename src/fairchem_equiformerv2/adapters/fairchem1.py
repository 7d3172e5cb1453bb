"""The adapter to fairchem-core 1.x: the backbone and heads as fairchem 1.x's ``BackboneInterface`` /
``HeadInterface`` on its ``Batch``, with its neighbour search.

These are the classes a fairchem 1.x config names (``fairchem_equiformerv2.EquiformerV2Backbone``,
``fairchem_equiformerv2.EnergyHead``, ...; the package exports them when fairchem 1.x is installed).
They add nothing to the computation: the weights are those of :mod:`.backbone` and :mod:`.heads`.
"""
from __future__ import annotations

try:
    from fairchem.core.common.utils import radius_graph_pbc
    from fairchem.core.models.base import BackboneInterface, GraphModelMixin, HeadInterface
except ImportError as error:  # fairchem 2.x moved or removed these
    raise ImportError(
        "fairchem_equiformerv2.adapters.fairchem1 needs fairchem-core 1.x (pip install 'fairchem-core>=1.10,<2'); "
        f"with fairchem-core 2.x use fairchem_equiformerv2.adapters.fairchem2 ({error})"
    ) from error

from .. import runtime
from ..model import backbone, heads
from ..model.denoising import dens, noisy_nodes


class EquiformerV2Backbone(runtime.ConfiguredOnBuild, backbone.EquiformerV2Backbone, GraphModelMixin, BackboneInterface):
    __doc__ = backbone.EquiformerV2Backbone.__doc__
    radius_search = staticmethod(radius_graph_pbc)


class EnergyHead(heads.EnergyHead, HeadInterface):
    __doc__ = heads.EnergyHead.__doc__


class ForceHead(heads.ForceHead, HeadInterface):
    __doc__ = heads.ForceHead.__doc__


class StressHead(heads.StressHead, HeadInterface):
    __doc__ = heads.StressHead.__doc__


class DeNSBackbone(runtime.ConfiguredOnBuild, dens.DeNSBackbone, GraphModelMixin, BackboneInterface):
    __doc__ = dens.DeNSBackbone.__doc__
    radius_search = staticmethod(radius_graph_pbc)


class DeNSEnergyHead(dens.DeNSEnergyHead, HeadInterface):
    __doc__ = dens.DeNSEnergyHead.__doc__


class DeNSForceHead(dens.DeNSForceHead, HeadInterface):
    __doc__ = dens.DeNSForceHead.__doc__


class DeNSStressHead(dens.DeNSStressHead, HeadInterface):
    __doc__ = dens.DeNSStressHead.__doc__


class NoisyNodesBackbone(runtime.ConfiguredOnBuild, noisy_nodes.NoisyNodesBackbone, GraphModelMixin, BackboneInterface):
    __doc__ = noisy_nodes.NoisyNodesBackbone.__doc__
    radius_search = staticmethod(radius_graph_pbc)


class NoisyNodesHead(noisy_nodes.NoisyNodesHead, HeadInterface):
    __doc__ = noisy_nodes.NoisyNodesHead.__doc__

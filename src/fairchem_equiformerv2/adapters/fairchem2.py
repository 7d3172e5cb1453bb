"""The adapter to fairchem-core 2.x: the backbone and heads as fairchem 2.x's ``BackboneInterface`` /
``HeadInterface`` on its ``AtomicData``, with its neighbour search, for ``HydraModel``,
``load_predict_unit``, ``FAIRChemCalculator`` and fairchem 2.x's training unit.

fairchem 2.x deleted EquiformerV2; these classes bring it back with the weights of :mod:`.backbone`
and :mod:`.heads` (the same as the 1.x adapter's: ``fairchem-eqv2 convert-checkpoint SRC DST --to
fairchem2`` writes an inference checkpoint that names them). What fairchem 2.x asks of a backbone:

* heads return ``{task_name: {property: tensor}}`` (``output_name`` is the task's name);
* ``regress_config`` says the forces are direct (the predict unit then runs without gradients);
* the element references read ``atomic_numbers_full`` and ``batch_full`` from the batch the model ran on,
  so ``forward`` writes them there, as UMA's backbone does (the predict unit's own clone of the caller's
  batch; in training, the training unit's batch, which ``compute_loss`` reads);
* :meth:`EquiformerV2Backbone.build_inference_settings` maps ``InferenceSettings`` onto the
  backbone's arguments: ``activation_checkpointing`` -> ``activation_checkpoint``; ``compile`` ->
  the blocks compiled on a GPU (:meth:`prepare_for_inference`; the CPU stays eager, where the
  oneDNN products are faster); ``tf32`` and ``base_precision_dtype`` (float64 too) are applied by the
  predict unit. Settings the model has nothing for are refused, naming the setting.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

try:
    from fairchem.core.graph.radius_graph_pbc import radius_graph_pbc
    from fairchem.core.models.base import BackboneInterface, HeadInterface
except ImportError as error:
    raise ImportError(
        "fairchem_equiformerv2.adapters.fairchem2 needs fairchem-core 2.x (pip install 'fairchem-core>=2.4'); "
        f"with fairchem-core 1.x use fairchem_equiformerv2.adapters.fairchem1 ({error})"
    ) from error

from .. import runtime
from ..model import backbone, heads
from ..errors import ConfigError

logger = logging.getLogger(__name__)

# The orthonormal change of basis from a rank-2 tensor's irreducible parts, (l = 0 | l = 1 | l = 2) =
# (1 | 3 | 5) components, to its 9 Cartesian components (xx, xy, xz, yx, ...), rows in the order of
# fairchem 1.x's ``cg_change_mat(2)``, with which its trainers assemble a decomposed stress.
_S2, _S3, _S6 = 2 ** -0.5, 3 ** -0.5, 6 ** -0.5
IRREPS_TO_CARTESIAN = [
    [_S3, 0, 0, 0, _S3, 0, 0, 0, _S3],          # l = 0: the trace / sqrt(3)
    [0, 0, 0, 0, 0, _S2, 0, -_S2, 0],           # l = 1: the antisymmetric part (zero for stress)
    [0, 0, -_S2, 0, 0, 0, _S2, 0, 0],
    [0, _S2, 0, -_S2, 0, 0, 0, 0, 0],
    [0, 0, _S2, 0, 0, 0, _S2, 0, 0],            # l = 2: the symmetric traceless part
    [0, _S2, 0, _S2, 0, 0, 0, 0, 0],
    [-_S6, 0, 0, 0, 2 * _S6, 0, 0, 0, -_S6],
    [0, 0, 0, 0, 0, _S2, 0, _S2, 0],
    [-_S2, 0, 0, 0, 0, 0, 0, 0, _S2],
]


@dataclass
class RegressConfig:
    """What fairchem 2.x's predict unit reads of a backbone: forces (and stress) come from heads,
    not from gradients of the energy."""

    direct_forces: bool = True
    direct_stress: bool = True
    forces: bool = True
    stress: bool = False
    hessian: bool = False
    hessian_vmap: bool = False


class EquiformerV2Backbone(runtime.ConfiguredOnBuild, backbone.EquiformerV2Backbone, BackboneInterface):
    __doc__ = backbone.EquiformerV2Backbone.__doc__
    radius_search = staticmethod(radius_graph_pbc)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.regress_config = RegressConfig()

    def forward(self, data) -> backbone.BackboneOutput:
        data["atomic_numbers_full"] = data["atomic_numbers"]
        data["batch_full"] = data["batch"]
        return super().forward(data)

    @classmethod
    def build_inference_settings(cls, settings) -> dict:
        """``InferenceSettings`` -> backbone arguments; refuses what EquiformerV2 has no use for."""
        unsupported = {
            "external_graph_gen": (settings.external_graph_gen, False,
                                   "EquiformerV2 builds its own graph (max_radius, max_neighbors of its config)"),
            "edge_chunk_size": (settings.edge_chunk_size, None, "UMA's edge chunking has no EquiformerV2 counterpart"),
            "execution_mode": (settings.execution_mode, None, "UMA's execution modes have no EquiformerV2 counterpart"),
        }
        for name, (value, default, why) in unsupported.items():
            if value not in (default,):
                raise ConfigError(f"InferenceSettings {name}={value!r}: not supported: {why}; leave it at {default!r}")
        for name in ("predict_untrained_forces", "predict_untrained_stress", "predict_untrained_hessian"):
            if getattr(settings, name):
                raise ConfigError(
                    f"InferenceSettings {name}={getattr(settings, name)!r}: this EquiformerV2 predicts forces with a "
                    "direct head, not as gradients of the energy"
                )
        return {"activation_checkpoint": bool(settings.activation_checkpointing)}

    def get_default_untrained_tasks(self, checkpoint_tasks, inference_settings) -> list:
        return []

    def validate_tasks(self, dataset_to_tasks: dict) -> None:
        for dataset, tasks in dataset_to_tasks.items():
            for task in tasks:
                if task.property not in ("energy", "forces", "stress"):
                    raise ConfigError(
                        f"task {task.name!r} (dataset {dataset!r}) asks for {task.property!r}: the fairchem 2.x "
                        "EquiformerV2 heads give 'energy', 'forces' and 'stress'"
                    )

    def prepare_for_inference(self, data, settings):
        """Honour ``settings.compile`` by compiling the equivariant blocks on a GPU (as the backbone's own
        ``torch_compile`` does); the predict unit's whole-model compile is turned off, since inductor's
        CPU kernels fail on scatter-adds and the CPU runs faster eager (oneDNN products). ``settings`` is
        the predict unit's own copy (it deep-copies the caller's), whose ``compile`` it reads after this
        call to decide that compile: setting it False is the one way fairchem 2.x offers to decline it."""
        if settings.compile:
            settings.compile = False
            if data["pos"].device.type == "cuda":
                self.compile_options = {"dynamic": True}
                for module in (self.edge_degree_embedding, *self.blocks):
                    self.compiled(module)
            else:
                logger.info("InferenceSettings compile=True: EquiformerV2 runs eager on the CPU (faster than compiled)")
        return self

    def on_predict_check(self, data) -> None:
        pass

    def validate_atoms_data(self, atoms, task_name: str) -> None:
        pass  # no charge or spin


class _TaskOutputs:
    """Head mix-in: ``{output_name: tensor}`` -> ``{output_name: {property: tensor}}``."""

    property_name: str

    def forward(self, data, emb: backbone.BackboneOutput) -> dict:
        return {name: {self.property_name: value} for name, value in super().forward(data, emb).items()}


class EnergyHead(_TaskOutputs, heads.EnergyHead, HeadInterface):
    __doc__ = heads.EnergyHead.__doc__
    property_name = "energy"


class ForceHead(_TaskOutputs, heads.ForceHead, HeadInterface):
    __doc__ = heads.ForceHead.__doc__
    property_name = "forces"


class StressHead(heads.StressHead, HeadInterface):
    """Stress ``[B, 9]`` (Cartesian, eV/A^3) for fairchem 2.x's ``stress`` task.

    fairchem 1.x's trainers denormalize a decomposed stress head's isotropic ``[B, 1]`` and
    anisotropic ``[B, 5]`` outputs with a normalizer each and assemble the tensor with
    :data:`IRREPS_TO_CARTESIAN`; one 2.x task has one normalizer, so this head does both itself with the
    1.x checkpoint's normalizers (``isotropic_normalizer``, ``anisotropic_normalizer`` or, undecomposed,
    ``normalizer``: ``[mean, rmsd]``), and its task's normalizer is the identity. Otherwise as
    :class:`.heads.StressHead`.
    """

    def __init__(self, backbone, output_name: str = "stress", *, isotropic_normalizer=(0.0, 1.0),
                 anisotropic_normalizer=(0.0, 1.0), normalizer=(0.0, 1.0), **kwargs):
        super().__init__(backbone, output_name=output_name, **kwargs)
        self.normalizers = {"isotropic": tuple(map(float, isotropic_normalizer)),
                            "anisotropic": tuple(map(float, anisotropic_normalizer)), "full": tuple(map(float, normalizer))}
        self.register_buffer("irreps_to_cartesian", torch.tensor(IRREPS_TO_CARTESIAN), persistent=False)

    def forward(self, data, emb: backbone.BackboneOutput) -> dict:
        out, name = super().forward(data, emb), self.output_name
        if not self.decompose:
            mean, rmsd = self.normalizers["full"]
            return {name: {"stress": out[name].reshape(-1, 9) * rmsd + mean}}  # [B, 9]
        (iso_mean, iso_rmsd), (aniso_mean, aniso_rmsd) = self.normalizers["isotropic"], self.normalizers["anisotropic"]
        isotropic = out[f"{name}_isotropic"] * iso_rmsd + iso_mean  # [B, 1]
        anisotropic = out[f"{name}_anisotropic"] * aniso_rmsd + aniso_mean  # [B, 5]
        irreps = torch.cat((isotropic, isotropic.new_zeros(len(isotropic), 3), anisotropic), dim=1)
        return {name: {"stress": irreps @ self.irreps_to_cartesian.to(irreps.dtype)}}  # [B, 9]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalizers={self.normalizers}"

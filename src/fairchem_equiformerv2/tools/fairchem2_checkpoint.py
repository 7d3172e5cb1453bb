"""fairchem 2.x inference checkpoints from the plugin's fairchem 1.x ones, written without fairchem 2.x.

fairchem 2.x loads a pickled ``MLIPInferenceCheckpoint`` dataclass
(``fairchem.core.units.mlip_unit.api.inference``) with four fields: ``model_config`` (a hydra config
that ``hydra.utils.instantiate`` builds: fairchem's ``HydraModel`` naming our
:mod:`.fairchem2` classes), ``model_state_dict``, ``ema_state_dict`` (``torch.optim.swa_utils.
AveragedModel``'s layout: ``module.``-prefixed keys and ``n_averaged``) and ``tasks_config`` (a list
of fairchem 2.x ``Task`` configs, energy, forces and stress, with their normalizers and element
references; a stress head takes its 1.x normalizers along, see :class:`.fairchem2.StressHead`). Old checkpoints
are read in the fairchem 1.10 environment, which has no such class, so the file is pickled with a
stand-in of the same module path and name, and fairchem 2.x unpickles it into its own dataclass.

The weights are the 1.x checkpoint's, key for key (the adapters share them); the 1.x EMA shadow
weights become ``ema_state_dict`` (the 1.x trainers predict with them, the 2.x predict unit always
does); normalizers (``mean``/``rmsd``, or the older ``target``/``grad_target`` with ``std``) and
linear element references carry over, so predictions come out in eV and eV/A.
"""
from __future__ import annotations

import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .checkpoints import strip_prefix
from ..errors import UserInputError

CHECKPOINT_MODULE, CHECKPOINT_CLASS = "fairchem.core.units.mlip_unit.api.inference", "MLIPInferenceCheckpoint"
TASK = "fairchem.core.units.mlip_unit.mlip_unit.Task"
NORMALIZER = "fairchem.core.modules.normalization.normalizer.Normalizer"
ELEMENT_REFERENCES = "fairchem.core.modules.normalization.element_references.ElementReferences"
HYDRA_MODEL = "fairchem.core.models.base.HydraModel"
FAIRCHEM2_CLASSES = {
    "fairchem_equiformerv2.EquiformerV2Backbone": "fairchem_equiformerv2.adapters.fairchem2.EquiformerV2Backbone",
    "fairchem_equiformerv2.EnergyHead": "fairchem_equiformerv2.adapters.fairchem2.EnergyHead",
    "fairchem_equiformerv2.ForceHead": "fairchem_equiformerv2.adapters.fairchem2.ForceHead",
    "fairchem_equiformerv2.StressHead": "fairchem_equiformerv2.adapters.fairchem2.StressHead",
}
#: per head class: (the task's property, its level, its output shape)
TASKS = {
    "fairchem_equiformerv2.EnergyHead": ("energy", "system", [1]),
    "fairchem_equiformerv2.ForceHead": ("forces", "atom", [3]),
    "fairchem_equiformerv2.StressHead": ("stress", "system", [1, 9]),
}
#: fairchem 1.x normalizer names, new then old, per property
NORMALIZER_NAMES = {"energy": ("energy", "target"), "forces": ("forces", "grad_target")}


class Fairchem2ConversionError(UserInputError):
    """A checkpoint that has no fairchem 2.x counterpart; the message names the part."""


@dataclass
class _StandIn:
    model_config: dict
    model_state_dict: dict
    ema_state_dict: dict
    tasks_config: list


def fairchem2_checkpoint(
    plugin_checkpoint: Mapping, trainable_names: list[str], dataset: str
) -> _StandIn:
    """The fields of a fairchem 2.x inference checkpoint for a plugin checkpoint (after
    ``convert_checkpoint_dict``). ``trainable_names``: the model's trainable parameters in order (the
    order of the 1.x EMA's lists); ``dataset``: the name the tasks serve (``FAIRChemCalculator``'s
    ``task_name``)."""
    config = plugin_checkpoint["config"]
    model = config["model"]
    backbone = {**model["backbone"], "model": _fairchem2_class(model["backbone"]["model"], "backbone")}
    heads, tasks = {}, []
    for head_name, head in model["heads"].items():
        if head["module"] not in TASKS:
            raise Fairchem2ConversionError(
                f"head {head_name!r} ({head['module']}) has no fairchem 2.x counterpart yet: energy, direct "
                "forces and stress heads convert"
            )
        prop, level, dim = TASKS[head["module"]]
        args = {k: v for k, v in head.items() if k not in ("module", "output_name")}
        normalizers = plugin_checkpoint.get("normalizers") or {}
        if prop == "stress":  # the head denormalizes (fairchem2.StressHead); its task's normalizer is 1
            args.update(_stress_normalizers(normalizers, head.get("output_name", "stress")))
            normalizers = {}
        heads[head_name] = {"module": _fairchem2_class(head["module"], f"head {head_name!r}"), "output_name": prop, **args}
        tasks.append(_task(prop, level, dim, dataset, normalizers, plugin_checkpoint.get("elementrefs") or {}))
    model_config = {
        "_target_": HYDRA_MODEL, "backbone": backbone, "heads": heads,
        "pass_through_head_outputs": True, "otf_graph": True, "supports_single_atoms": True,
    }
    state = strip_prefix(plugin_checkpoint["state_dict"])
    return _StandIn(model_config, state, _ema_state_dict(plugin_checkpoint.get("ema"), state, trainable_names), tasks)


def _fairchem2_class(name: str, what: str) -> str:
    if name not in FAIRCHEM2_CLASSES:
        raise Fairchem2ConversionError(f"{what}: {name} has no fairchem 2.x counterpart yet")
    return FAIRCHEM2_CLASSES[name]


def _task(prop: str, level: str, dim: list[int], dataset: str, normalizers: Mapping, elementrefs: Mapping) -> dict:
    mean, rmsd = _normalizer(normalizers, NORMALIZER_NAMES.get(prop, (prop,)))
    task = {
        "_target_": TASK, "name": prop, "level": level, "property": prop,
        "out_spec": {"dim": dim, "dtype": "float32"},
        "normalizer": {"_target_": NORMALIZER, "mean": mean, "rmsd": rmsd},
        "datasets": [dataset],
    }
    references = (elementrefs.get(prop) or {}).get("element_references")
    if references is not None:
        task["element_references"] = {
            "_target_": ELEMENT_REFERENCES,
            "element_references": {"_target_": "torch.DoubleTensor", "_args_": [references.double().tolist()]},
        }
    return task


def _normalizer(normalizers: Mapping, names: tuple[str, ...]) -> tuple[float, float]:
    """(mean, rmsd) of the first of ``names`` a 1.x checkpoint has a normalizer for; (0, 1) if none."""
    for name in names:
        state = normalizers.get(name)
        if state:
            scale = state.get("rmsd", state.get("std"))
            return float(state.get("mean", 0.0)), float(1.0 if scale is None else scale)
    return 0.0, 1.0


def _stress_normalizers(normalizers: Mapping, output_name: str) -> dict:
    """The 1.x normalizers of a stress head's outputs, as :class:`.fairchem2.StressHead` takes them."""
    return {
        "isotropic_normalizer": list(_normalizer(normalizers, (f"{output_name}_isotropic",))),
        "anisotropic_normalizer": list(_normalizer(normalizers, (f"{output_name}_anisotropic",))),
        "normalizer": list(_normalizer(normalizers, (output_name,))),
    }


def _ema_state_dict(ema: Mapping | None, state: Mapping[str, torch.Tensor], trainable_names: list[str]) -> dict:
    """``AveragedModel``'s state dict: the EMA shadow weight of each trainable parameter (the model's
    own weight where there is no EMA), every other tensor as it is, and ``n_averaged``."""
    shadow = dict(zip(trainable_names, (ema or {}).get("shadow_params") or []))
    averaged = {f"module.{k}": shadow.get(k, v) for k, v in state.items()}
    averaged["n_averaged"] = torch.tensor(int((ema or {}).get("num_updates") or 1), dtype=torch.long)
    return averaged


@contextmanager
def _stand_in_class() -> Iterator[type]:
    """``_StandIn`` registered under fairchem 2.x's module path and class name while pickling."""
    names = CHECKPOINT_MODULE.split(".")
    added = {}
    for depth in range(1, len(names) + 1):
        name = ".".join(names[:depth])
        if name not in sys.modules:
            added[name] = sys.modules[name] = types.ModuleType(name)
    module = sys.modules[CHECKPOINT_MODULE]
    cls = type(CHECKPOINT_CLASS, (_StandIn,), {"__module__": CHECKPOINT_MODULE, "__qualname__": CHECKPOINT_CLASS})
    previous = getattr(module, CHECKPOINT_CLASS, None)
    setattr(module, CHECKPOINT_CLASS, cls)
    try:
        yield cls
    finally:
        if previous is None:
            delattr(module, CHECKPOINT_CLASS)
        else:
            setattr(module, CHECKPOINT_CLASS, previous)
        for name in added:
            del sys.modules[name]


def serialise(fields: _StandIn) -> bytes:
    """``torch.save`` bytes of the checkpoint, as fairchem 2.x's ``MLIPInferenceCheckpoint``."""
    import io

    buffer = io.BytesIO()
    with _stand_in_class() as cls:
        torch.save(cls(**vars(fields)), buffer)
    return buffer.getvalue()

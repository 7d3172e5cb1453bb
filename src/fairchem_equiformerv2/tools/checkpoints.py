"""The one weight mapping from fairchem's EquiformerV2 key names to ours.

Used by the checkpoint converters, the parity tests and the benchmark; the DDP ``module.``
prefix is read and stripped here too (:func:`ddp_prefix`, :func:`strip_prefix`). Our parameters keep
fairchem's shapes and meanings; only a few module paths differ:

* ``sphere_embedding``                 -> ``atom_embedding.sphere_embedding``
* ``<module>.{source,target}_embedding`` -> ``<module>.edge_types.{source,target}_embedding``
  (``backbone.shared_edge_types`` for the backbone's shared tables)
* the DeNS heads' ``scalar_block`` / ``vector_block`` -> ``energy_block`` / ``force_block``, the
  names of the plain heads' same blocks (``denoising_pos_block`` and the DeNS backbone's
  ``force_embedding`` keep their names)

fairchem also saves buffers that are pure functions of the configuration (coefficient bookkeeping,
S2 grid matrices, index tables); we recompute those, so the mapping recognises them by name
(:data:`DERIVED_BUFFERS`) and leaves them out. Any other key we do not know is an error.

Two layouts are read: the hydra one (``backbone.*``, ``output_heads.<head>.*``) and the older
single-model ``equiformer_v2`` one (everything at the top, ``energy_block``/``force_block`` for the
outputs), which is mapped to hydra heads named ``energy`` and ``forces``.
"""
from __future__ import annotations

import copy
import io
import logging
import numbers
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .safe_write import check_destination, write_bytes_atomically
from ..errors import UserInputError

logger = logging.getLogger(__name__)

DERIVED_BUFFERS = (
    "to_grid_mat", "from_grid_mat", "l_harmonic", "m_harmonic", "m_complex", "res_size", "to_m",
    "m_size", "expand_index", "balance_degree_weight",
)
_DERIVED = re.compile(r"(^|\.)(" + "|".join(DERIVED_BUFFERS) + r")$")

# DeNS heads' blocks, then (for the same key) the first matching rename below
_HEAD_BLOCK_RENAMES = (
    (re.compile(r"^(output_heads\.[^.]+)\.scalar_block\."), r"\1.energy_block."),
    (re.compile(r"^(output_heads\.[^.]+)\.vector_block\."), r"\1.force_block."),
)
_RENAMES = (
    (re.compile(r"^backbone\.sphere_embedding\."), "backbone.atom_embedding.sphere_embedding."),
    (re.compile(r"^backbone\.(source|target)_embedding\."), r"backbone.shared_edge_types.\1_embedding."),
    (re.compile(r"\.(source|target)_embedding\."), r".edge_types.\1_embedding."),
)

# Older single-model layout: output blocks at the top level.
LEGACY_HEADS = {"energy_block": "output_heads.energy.", "force_block": "output_heads.forces."}


class WeightMappingError(KeyError):
    """Keys that do not map; the message lists them."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def is_derived_buffer(key: str) -> bool:
    return bool(_DERIVED.search(key))


def hydra_key(key: str) -> str:
    """A key of fairchem's older single-model layout, without ``module.``, in the hydra layout."""
    head = key.split(".", 1)[0]
    if head in LEGACY_HEADS:
        return LEGACY_HEADS[head] + key
    return "backbone." + key


def plugin_key(key: str) -> str:
    """A fairchem hydra key -> the same weight's key in our model (the DeNS head-block renames, then
    the first matching rename)."""
    for pattern, replacement in _HEAD_BLOCK_RENAMES:
        key = pattern.sub(replacement, key)
    for pattern, replacement in _RENAMES:
        if pattern.search(key):
            return pattern.sub(replacement, key)
    return key


def is_legacy_layout(keys: Iterable[str]) -> bool:
    """True for the older single-model layout (no ``backbone.`` keys, the DDP prefix stripped)."""
    return not any(k.startswith("backbone.") for k in keys)


DDP_PREFIX = "module."


def ddp_prefix(keys: Iterable[str]) -> str:
    """:data:`DDP_PREFIX` when every key has it (a DDP/DataParallel-wrapped model's state dict), else ``""``."""
    keys = list(keys)
    return DDP_PREFIX if keys and all(k.startswith(DDP_PREFIX) for k in keys) else ""


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` without its DDP/DataParallel prefix (:func:`ddp_prefix`), if it has one."""
    prefix = ddp_prefix(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def fairchem_key_table(keys: Iterable[str]) -> dict[str, str]:
    """fairchem's key (as stored: either layout, with or without ``module.``) -> ours (no prefix), for
    every key that is not a derived buffer: :func:`hydra_key` for the older layout, then :func:`plugin_key`."""
    keys = list(keys)
    prefix = ddp_prefix(keys)
    bare = {key: key[len(prefix):] for key in keys}
    legacy = is_legacy_layout(bare.values())
    return {key: plugin_key(hydra_key(b) if legacy else b) for key, b in bare.items() if not is_derived_buffer(b)}


def _key_differences(keys: Iterable[str], expected: Iterable[str]) -> str:
    """``"unknown keys [...]; missing keys [...]"``: the keys only in ``keys``, then only in ``expected``."""
    unknown, missing = sorted(set(keys) - set(expected)), sorted(set(expected) - set(keys))
    return (f"unknown keys {unknown}; " if unknown else "") + (f"missing keys {missing}" if missing else "")


def map_fairchem_state_dict(
    state_dict: Mapping[str, torch.Tensor], target_keys: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """fairchem EquiformerV2 weights (either layout, with or without ``module.``) -> ours.

    Args:
        state_dict: fairchem's ``state_dict``.
        target_keys: our model's ``state_dict`` keys; when given, keys missing on either side raise
            :class:`WeightMappingError` listing them.
    """
    mapped = {ours: state_dict[theirs] for theirs, ours in fairchem_key_table(state_dict).items()}
    differences = "" if target_keys is None else _key_differences(mapped, target_keys)
    if differences:
        raise WeightMappingError("fairchem weights do not match the plugin model: " + differences)
    return mapped


def load_fairchem_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load fairchem EquiformerV2 weights into our hydra ``model`` (strict, shapes checked)."""
    ours = model.state_dict()
    mapped = map_fairchem_state_dict(state_dict, set(ours))
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in mapped.items() if v.shape != ours[k].shape]
    if wrong:
        raise WeightMappingError("weight shapes do not match the model's configuration: " + "; ".join(wrong))
    model.load_state_dict(mapped)


# ---------------------------------------------------------------------------------------------
# Whole checkpoints: read, check, convert, fix.
#
# A fairchem checkpoint is what ``BaseTrainer.save`` writes with ``torch.save``: a dict with
# ``state_dict`` (weights, keys with ``module.`` when the trainer wrapped the model), ``config``
# (the run's whole config: ``model``, ``outputs``, ``loss_functions``, ``optim``, ``dataset``, ...),
# ``normalizers`` and ``elementrefs`` (``{target: module state_dict}``), ``ema`` (``decay``,
# ``num_updates``, ``shadow_params`` and ``collected_params``: lists of tensors in the order of
# ``model.parameters()`` that require grad), ``amp``, and training state (``optimizer``,
# ``scheduler``, ``epoch``, ``step``, ...).
#
# Loading safety: we read checkpoints with ``torch.load(weights_only=True)``, which only rebuilds
# tensors and plain containers (dict, list, str, int, float, bool, None, OrderedDict), so a
# crafted file cannot run code. fairchem's own checkpoints (1.x) load that way: every value above
# is a tensor or a plain container. What does not: files whose pickle holds other Python objects,
# e.g. numpy scalars or arrays in ``val_metrics``/``config`` written by older OCP versions, or a
# pickled ``argparse.Namespace``. Those are refused with the offending global named; a caller who
# trusts the file may pass ``trust=True`` (``--trust`` on the command line) to unpickle fully.
# fairchem itself (``OCPCalculator``, ``BaseTrainer.load_checkpoint``) always unpickles fully
# (``torch.load`` without ``weights_only``, torch 2.4's default): the files we write contain only
# weights-only types, and :func:`calculator` reads a checkpoint with ``weights_only=True`` before
# handing it to fairchem, so nothing is unpickled by fairchem that we did not check.
# ---------------------------------------------------------------------------------------------

PLUGIN_BACKBONE = "fairchem_equiformerv2.EquiformerV2Backbone"
PLUGIN_DENS_BACKBONE = "fairchem_equiformerv2.DeNSBackbone"
#: fairchem's EquiformerV2 backbones -> ours
#: fairchem's DeNS module; configs of the release that trained the OMat24 models name classes by path
_DENS_MODULE = "fairchem.core.models.equiformer_v2.equiformer_v2_dens."
BACKBONE_MODULES = {
    "equiformer_v2_backbone": PLUGIN_BACKBONE,
    "equiformer_v2_dens_backbone": PLUGIN_DENS_BACKBONE,
    _DENS_MODULE + "EqV2DeNSBackbone": PLUGIN_DENS_BACKBONE,
}
FAIRCHEM_BACKBONES = tuple(BACKBONE_MODULES)
PLUGIN_BACKBONES = frozenset(BACKBONE_MODULES.values())
LEGACY_MODEL = "equiformer_v2"
#: fairchem's EquiformerV2 head modules -> ours (the deprecated wrappers have the same weights).
HEAD_MODULES = {
    "equiformerV2_scalar_head": "fairchem_equiformerv2.EnergyHead",
    "equiformer_v2_energy_head": "fairchem_equiformerv2.EnergyHead",
    "equiformerV2_vector_head": "fairchem_equiformerv2.ForceHead",
    "equiformer_v2_force_head": "fairchem_equiformerv2.ForceHead",
    "rank2_symmetric_head": "fairchem_equiformerv2.StressHead",
    "eqV2_DeNS_scalar_head": "fairchem_equiformerv2.DeNSEnergyHead",
    "eqV2_DeNS_vector_head": "fairchem_equiformerv2.DeNSForceHead",
    "dens_rank2_symmetric_head": "fairchem_equiformerv2.DeNSStressHead",
    # the DeNS heads of the release that trained the OMat24 models (blocks named as the plain heads')
    "equiformer_v2_dens_energy_head": "fairchem_equiformerv2.DeNSEnergyHead",
    "equiformer_v2_dens_force_head": "fairchem_equiformerv2.DeNSForceHead",
    **{_DENS_MODULE + name: f"fairchem_equiformerv2.{ours}" for name, ours in (
        ("DeNSScalarHead", "DeNSEnergyHead"), ("DeNSVectorHead", "DeNSForceHead"), ("DeNSRank2Head", "DeNSStressHead"),
        ("DeNSEnergyHead", "DeNSEnergyHead"), ("DeNSForceHead", "DeNSForceHead"))},
}
CONSERVATIVE_HEAD = "fairchem_equiformerv2.ConservativeHead"
#: the plugin's heads: fairchem's equivalents, and ConservativeHead (energy and its gradients), which has none
PLUGIN_HEADS = frozenset(HEAD_MODULES.values()) | {CONSERVATIVE_HEAD}
#: Task names fairchem 1.10 stores as ``config["trainer"]`` (``new_trainer_context``); they are
#: not trainer names, so ``OCPCalculator(checkpoint_path=...)`` fails on them without ``trainer=``.
TASK_NAMES_SAVED_AS_TRAINER = ("s2ef", "is2re", "ocp", "multitask")
#: The trainer written into converted/fixed checkpoints: fairchem's ``OCPTrainer`` (the same
#: class as its ``forces`` and ``energy`` trainers), which runs every single-task model.
INFERENCE_TRAINER = "ocp"
REQUIRED_KEYS = ("state_dict", "config")


class CheckpointError(UserInputError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> dict:
    """Load a fairchem checkpoint on the CPU after checking it is one.

    Refuses, with :class:`CheckpointError`: a missing path or a directory, an empty, truncated or
    corrupted file (zip CRCs are verified before unpickling), a pickle with Python objects other
    than tensors and plain containers (unless ``trust``), a dict without ``state_dict`` and
    ``config``, and parts not laid out as fairchem's trainer writes them (:func:`_check_layout`).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty")
    if zipfile.is_zipfile(path):  # torch.save's format since torch 1.6
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()  # reads every entry and checks its CRC-32
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {e}") from None
        if bad is not None:
            raise CheckpointError(f"checkpoint {path} is corrupted: entry {bad!r} fails its CRC check")
    elif path.stat().st_size < 1 << 20 and not _looks_like_legacy_torch_file(path):
        # torch.load of a truncated zip that lost its directory lands here too
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch checkpoint (no zip archive found)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        message = str(e)
        if not trust and ("weights_only" in message or "Unsupported global" in message):
            culprit = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
            what = f" ({culprit.group(1)})" if culprit else ""
            raise CheckpointError(
                f"checkpoint {path} holds Python objects other than tensors and plain containers{what}, "
                "which torch.load(weights_only=True) refuses because unpickling them can run code; "
                "if you trust the file's origin, pass trust=True (command line: --trust)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {_first_line(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {_first_line(e)}") from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint {path}: a {type(checkpoint).__name__}, not a fairchem checkpoint (a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a fairchem trainer checkpoint: no {' or '.join(repr(k) for k in missing)} "
            f"(keys: {sorted(map(str, checkpoint))[:12]})"
        )
    if not isinstance(checkpoint["config"], Mapping) or not isinstance(checkpoint["state_dict"], Mapping):
        raise CheckpointError(f"checkpoint {path}: 'config' and 'state_dict' must be dicts")
    try:
        _check_layout(checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    return dict(checkpoint)


def _mapping(value, field: str, *, optional: bool = True) -> Mapping:
    """``value`` when it is a mapping (``{}`` for a missing one when ``optional``); otherwise a
    :class:`CheckpointError` naming ``field`` (a path such as ``config.model.heads``)."""
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{field} is a {type(value).__name__} ({_short(value)}), not a mapping")
    return value


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_layout(checkpoint: Mapping) -> None:
    """Refuse, naming the field, parts of a checkpoint that are not what fairchem's trainer writes:
    ``state_dict`` must map names to tensors; ``ema`` (if any) be a mapping whose ``shadow_params``
    and ``collected_params`` are lists of tensors; ``normalizers`` and ``elementrefs`` (if any) map
    each target to a mapping of tensors or numbers (a module's state dict)."""
    for key, value in checkpoint["state_dict"].items():
        if not isinstance(key, str):
            raise CheckpointError(f"state_dict has a key {key!r} that is not a string")
        if not torch.is_tensor(value):
            raise CheckpointError(f"state_dict[{key!r}] is a {type(value).__name__} ({_short(value)}), not a tensor")
    ema = _mapping(checkpoint.get("ema"), "ema")
    for field in ("shadow_params", "collected_params"):
        values = ema.get(field)
        if values is not None and not isinstance(values, (list, tuple)):
            raise CheckpointError(f"ema.{field} is a {type(values).__name__} ({_short(values)}), not a list of tensors")
        for i, value in enumerate(values or ()):
            if not torch.is_tensor(value):
                raise CheckpointError(f"ema.{field}[{i}] is a {type(value).__name__} ({_short(value)}), not a tensor")
    for section in ("normalizers", "elementrefs"):
        for target, state in _mapping(checkpoint.get(section), section).items():
            for name, value in _mapping(state, f"{section}.{target}", optional=False).items():
                if not (torch.is_tensor(value) or _is_number(value)):
                    raise CheckpointError(
                        f"{section}.{target}.{name} is a {type(value).__name__} ({_short(value)}), not a tensor or number"
                    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _looks_like_legacy_torch_file(path: Path) -> bool:
    """torch.save's pre-1.6 format starts with a pickle protocol header (``0x80``)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


# --- the model a checkpoint describes ----------------------------------------------------------

def checkpoint_kind(config: Mapping) -> str:
    """``"legacy"`` (fairchem's single-model ``equiformer_v2``), ``"hydra"`` (fairchem's backbone
    and heads) or ``"plugin"`` (ours already). Anything else raises :class:`CheckpointError`."""
    model = config.get("model")
    if isinstance(model, str):  # fairchem's older layout: model name + model_attributes
        if model == LEGACY_MODEL:
            _mapping(config.get("model_attributes"), "config.model_attributes", optional=False)
            return "legacy"
        raise CheckpointError(f"the checkpoint's model is {model!r}, not EquiformerV2 ({LEGACY_MODEL!r} or a hydra model)")
    if not isinstance(model, Mapping):
        raise CheckpointError(f"the checkpoint's config has no model section (model: {model!r})")
    name = model.get("name", model.get("model"))
    if name == LEGACY_MODEL:
        return "legacy"
    if name != "hydra":
        raise CheckpointError(f"the checkpoint's model is {name!r}, not EquiformerV2 ({LEGACY_MODEL!r} or a hydra model)")
    backbone = _mapping(model.get("backbone"), "config.model.backbone").get("model")
    heads = {h: _mapping(c, f"config.model.heads.{h}").get("module")
             for h, c in _mapping(model.get("heads"), "config.model.heads").items()}
    if backbone in PLUGIN_BACKBONES:
        known, kind = set(PLUGIN_HEADS), "plugin"
    elif backbone in FAIRCHEM_BACKBONES:
        known, kind = set(HEAD_MODULES), "hydra"
    else:
        raise CheckpointError(
            f"the checkpoint's backbone is {backbone!r}, not EquiformerV2 (one of {list(FAIRCHEM_BACKBONES)} "
            f"or {sorted(PLUGIN_BACKBONES)})"
        )
    unknown = {h: m for h, m in heads.items() if m not in known}
    if unknown:
        raise CheckpointError(f"heads with modules this plugin has no equivalent for: {unknown} (known: {sorted(known)})")
    if not heads:
        raise CheckpointError("the checkpoint's hydra model has no heads")
    return kind


def _legacy_model_config(config: Mapping, state_dict: Mapping) -> tuple[dict, dict]:
    """(hydra model config with our classes, outputs) for fairchem's single-model layout."""
    model = config["model"]
    attributes = dict(config["model_attributes"]) if isinstance(model, str) else dict(model)
    attributes.pop("name", None)
    attributes.pop("model", None)
    keys = strip_prefix(state_dict)
    heads = {"energy": {"module": "fairchem_equiformerv2.EnergyHead"}}
    outputs = {"energy": {"level": "system", "property": "energy"}}
    if any(k.startswith("force_block.") for k in keys):
        heads["forces"] = {"module": "fairchem_equiformerv2.ForceHead"}
        old = (config.get("outputs") or {}).get("forces", {})
        task = config.get("task") or {}
        outputs["forces"] = {
            "level": "atom", "property": "forces",
            "train_on_free_atoms": old.get("train_on_free_atoms", task.get("train_on_free_atoms", False)),
            "eval_on_free_atoms": old.get("eval_on_free_atoms", task.get("eval_on_free_atoms", True)),
        }
    backbone = {"model": PLUGIN_BACKBONE, **attributes}
    return {"name": "hydra", "backbone": backbone, "heads": heads, "otf_graph": True}, outputs


def _legacy_training_sections(config: Mapping, outputs: dict) -> dict:
    """``loss_functions`` and ``evaluation_metrics`` for an older config that lacks them, as
    fairchem's ``update_config`` would write them (so that fairchem does not try again on load)."""
    optim = config.get("optim") or {}
    energy = {"energy": {"fn": optim.get("loss_energy", "mae"), "coefficient": optim.get("energy_coefficient", 1)}}
    if "forces" not in outputs:
        return {"loss_functions": [energy],
                "evaluation_metrics": {"metrics": {"energy": ["mae", "mse", "energy_within_threshold"]}}}
    forces = {"forces": {"fn": optim.get("loss_forces", "l2mae"), "coefficient": optim.get("force_coefficient", 30)}}
    metrics = {"misc": ["energy_forces_within_threshold"], "energy": ["mae"],
               "forces": ["forcesx_mae", "forcesy_mae", "forcesz_mae", "mae", "cosine_similarity", "magnitude_error"]}
    return {"loss_functions": [energy, forces], "evaluation_metrics": {"metrics": metrics}}


#: config sections the converter reads: each a mapping when present (``dataset`` may be a list of them)
CONFIG_SECTIONS = ("outputs", "task", "optim")


def _check_config_sections(config: Mapping) -> None:
    """Refuse, naming the field, a section the converter reads that is not a mapping."""
    for section in CONFIG_SECTIONS:
        _mapping(config.get(section), f"config.{section}")
    for name, output in _mapping(config.get("outputs"), "config.outputs").items():
        _mapping(output, f"config.outputs.{name}", optional=False)
    dataset = config.get("dataset")
    splits = {f"config.dataset[{i}]": split for i, split in enumerate(dataset)} if isinstance(dataset, list) else {
        "config.dataset": dataset}
    for field, split in splits.items():
        _mapping(split, field)


def convert_config(config: Mapping, state_dict: Mapping | None = None) -> dict:
    """A fairchem EquiformerV2 checkpoint config -> the same run with the plugin's classes.

    Keeps everything else (outputs, normalizer settings, optim, task, ...); writes a trainer name
    that ``OCPCalculator(checkpoint_path=...)`` finds; makes ``dataset`` a dict with a ``src`` (as
    ``OCPCalculator`` expects); drops ``finetune_config`` (the weights come from this checkpoint).
    The original model section and trainer are kept under ``config["converted_from"]``.
    """
    kind = checkpoint_kind(config)
    _check_config_sections(config)
    new = copy.deepcopy(dict(config))
    original = {"model": copy.deepcopy(config.get("model")), "trainer": config.get("trainer")}
    if kind == "legacy":
        model, outputs = _legacy_model_config(config, state_dict or {})
        new.pop("model_attributes", None)
        new["model"] = model
        old_outputs = config.get("outputs") or {}
        new["outputs"] = {k: {**old_outputs.get(k, {}), **v} for k, v in outputs.items()}
        if not config.get("loss_functions"):
            for key in ("loss_fns", "eval_metrics"):  # early 2.0 names
                new.pop(key, None)
            new.update(_legacy_training_sections(config, outputs))
        original["model_attributes"] = copy.deepcopy(config.get("model_attributes"))
    else:
        model = new["model"]
        model.pop("finetune_config", None)
        model["backbone"]["model"] = BACKBONE_MODULES.get(model["backbone"]["model"], model["backbone"]["model"])
        for head in model["heads"].values():
            head["module"] = HEAD_MODULES.get(head["module"], head["module"])
        model["otf_graph"] = True
    if kind != "plugin":
        new["converted_from"] = original
    new["trainer"] = loadable_trainer(config.get("trainer"))
    dataset = new.get("dataset")
    if isinstance(dataset, list):
        dataset = dataset[0] if dataset else {}
    new["dataset"] = {"src": "", **(dataset or {})}
    new.setdefault("task", {})
    new.setdefault("optim", {})
    return new


def loadable_trainer(name: str | None) -> str:
    """A trainer name fairchem's registry finds for this checkpoint's ``config["trainer"]``."""
    from fairchem.core.common.registry import registry

    if not name or name in TASK_NAMES_SAVED_AS_TRAINER:
        return INFERENCE_TRAINER
    try:
        found = registry.get_trainer_class(name) is not None
    except Exception:  # noqa: BLE001  (registry raises RuntimeError with a long message)
        found = False
    return name if found else INFERENCE_TRAINER


def build_model(model_config: Mapping) -> torch.nn.Module:
    """Our hydra model (CPU, eval mode) for a converted ``config["model"]``; configuration errors
    are reported as :class:`CheckpointError` naming the argument."""
    import warnings

    from fairchem.core.common.utils import setup_imports
    from fairchem.core.models.base import HydraModel

    setup_imports()
    args = {k: v for k, v in copy.deepcopy(dict(model_config)).items() if k != "name"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HydraModel(**args)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's model configuration does not build: {e}") from None
    return model.eval()


def _check_against_model(mapped: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``mapped`` (our key names, no prefix) has exactly the
    model's keys (derived buffers aside) with the model's shapes."""
    ours = {k: v for k, v in model.state_dict().items() if not is_derived_buffer(k)}
    mapped = {k: v for k, v in mapped.items() if not is_derived_buffer(k)}
    differences = _key_differences(mapped, ours)
    if differences:
        raise CheckpointError("weights do not match the model the checkpoint's config describes: " + differences)
    wrong = [f"{k}: {tuple(v.shape)} in the weights, {tuple(ours[k].shape)} in the config's model"
             for k, v in mapped.items() if tuple(v.shape) != tuple(ours[k].shape)]
    if wrong:
        raise CheckpointError("weights do not match the checkpoint's configuration: " + "; ".join(wrong))


DIVERGED = "the training that wrote this checkpoint diverged; use an earlier checkpoint"
NOT_FINITE_SETTING = "every prediction would be NaN; correct or remove the value"


def _check_finite(tensors: Mapping[str, torch.Tensor | float], what: str, advice: str = DIVERGED) -> None:
    """Refuse NaN or infinite values (in tensors or plain numbers), naming the first entry that holds
    them and how many, then ``advice``: a model with them would predict NaN for every structure."""
    for name, value in tensors.items():
        if _is_number(value):
            value = torch.tensor(float(value))
        if torch.is_tensor(value) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointError(
                    f"{what} {name} holds {bad} NaN or infinite value(s) of {value.numel()}: {advice}"
                )


#: fairchem's older normaliser settings, at the top of the dataset section (``normalize_labels``)
LEGACY_NORMALIZER_KEYS = ("target_mean", "target_std", "grad_target_mean", "grad_target_std")


def _check_normalizers(checkpoint: Mapping) -> None:
    """Refuse a NaN or infinite normaliser or element reference, naming the field: the checkpoint's
    ``normalizers`` and ``elementrefs`` (what fairchem predicts with) and the numbers of its config's
    settings (what fine-tuning starts from, :func:`config_normalizer_values`)."""
    values = {f"{section}.{target}.{name}": value for section in ("normalizers", "elementrefs")
              for target, state in (checkpoint.get(section) or {}).items() for name, value in state.items()}
    _check_normalizer_values({**values, **config_normalizer_values(checkpoint["config"])})


def _check_normalizer_values(values: Mapping[str, object]) -> None:
    """Refuse a NaN or infinite entry of ``values`` (normaliser and element-reference values by their
    paths), naming it as one or the other."""
    def is_reference(path: str) -> bool:
        return path.startswith("elementrefs.") or ".element_references" in path

    for references in (False, True):
        _check_finite({path: value for path, value in values.items() if is_reference(path) == references},
                      "element reference" if references else "normaliser", NOT_FINITE_SETTING)


def config_normalizer_values(config: Mapping, where: str = "config") -> dict[str, object]:
    """Every number of a config's normaliser and element-reference settings, by its path (e.g.
    ``config.dataset.train.transforms.normalizer.energy.mean``, ``config.dataset.target_std``): in
    ``dataset`` (its first entry if a list) and its ``train`` split, ``transforms.normalizer``,
    ``transforms.element_references`` and :data:`LEGACY_NORMALIZER_KEYS`."""
    dataset = config.get("dataset")
    if isinstance(dataset, list):
        dataset, where = (dataset[0] if dataset else None), f"{where}.dataset[0]"
    else:
        where = f"{where}.dataset"
    sections = {where: dataset}
    if isinstance(dataset, Mapping):
        sections[f"{where}.train"] = dataset.get("train")
    values = {}
    for path, section in sections.items():
        if not isinstance(section, Mapping):
            continue
        transforms = section.get("transforms")
        for name in ("normalizer", "element_references"):
            if isinstance(transforms, Mapping):
                values.update(_numbers(transforms.get(name), f"{path}.transforms.{name}"))
        values.update({f"{path}.{key}": section[key] for key in LEGACY_NORMALIZER_KEYS if _is_number(section.get(key))})
    return values


def _numbers(value, path: str) -> dict[str, object]:
    """The numbers and tensors nested in ``value`` (mappings and lists), by their dotted paths."""
    if isinstance(value, Mapping):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{path}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}[{i}]").items()}
    return {path: value} if _is_number(value) or torch.is_tensor(value) else {}


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of ``model.parameters()`` that require grad, in order: the order of EMA lists."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def convert_ema(
    ema: Mapping, fairchem_state_dict: Mapping[str, torch.Tensor], mapped_keys: Mapping[str, str],
    model: torch.nn.Module,
) -> dict:
    """fairchem's EMA state -> ours, parameter by parameter by name.

    ``shadow_params`` (and ``collected_params`` when not empty) follow fairchem's
    ``model.parameters()`` order. ``state_dict`` lists every module's parameters in that same
    order, interleaved with buffers; so fairchem's trainable parameters, in order, are the
    ``state_dict`` keys whose mapped key is one of our trainable parameters. Each list entry is
    paired with its name and shape-checked, then the list is rebuilt in our parameter order.
    """
    ours = dict(model.named_parameters())
    our_order = trainable_parameter_names(model)
    theirs = [mapped_keys[k] for k in fairchem_state_dict if mapped_keys.get(k) in ours and ours[mapped_keys[k]].requires_grad]
    new = dict(ema)
    for field in ("shadow_params", "collected_params"):
        values = ema.get(field)
        if not values:
            continue
        if len(values) != len(theirs):
            raise CheckpointError(
                f"ema.{field} has {len(values)} tensors but the model has {len(theirs)} trainable parameters"
            )
        by_name = {}
        for name, value in zip(theirs, values):
            if tuple(value.shape) != tuple(ours[name].shape):
                raise CheckpointError(
                    f"ema.{field}: the entry for {name} has shape {tuple(value.shape)}, the parameter {tuple(ours[name].shape)}"
                )
            by_name[name] = value
        new[field] = [by_name[n] for n in our_order]
    return new


def convert_checkpoint_dict(checkpoint: Mapping) -> dict:
    """In memory: a fairchem EquiformerV2 checkpoint -> the plugin's (see :func:`convert_checkpoint`)."""
    config, state_dict = checkpoint["config"], checkpoint["state_dict"]
    kind = checkpoint_kind(config)
    new_config = convert_config(config, state_dict)
    model = build_model(new_config["model"])
    mapped = strip_prefix(state_dict) if kind == "plugin" else map_fairchem_state_dict(state_dict)
    _check_against_model(mapped, model)
    _check_finite(mapped, "weight")
    _check_normalizers(checkpoint)

    new = dict(checkpoint)
    new["config"] = new_config
    ordered = [k for k in model.state_dict() if k in mapped]  # our order, for readability
    new["state_dict"] = {ddp_prefix(state_dict) + k: mapped[k] for k in ordered}
    if checkpoint.get("ema") and kind != "plugin":
        new["ema"] = convert_ema(checkpoint["ema"], state_dict, fairchem_key_table(state_dict), model)
    if new.get("ema"):
        names = trainable_parameter_names(model)
        _check_finite(dict(zip(names, new["ema"].get("shadow_params") or [])), "EMA weight")
    if kind != "plugin":
        # optimizer state is indexed by fairchem's parameter order and its scheduler goes with it:
        # they cannot resume our model's training; drop them (the weights and EMA carry over).
        for key in ("optimizer", "scheduler"):
            new.pop(key, None)
    new.setdefault("normalizers", {})
    new.setdefault("elementrefs", {})
    new.setdefault("amp", None)
    return new


#: ``convert_checkpoint(to=...)``: the fairchem major version the checkpoint is written for
TARGETS = ("fairchem1", "fairchem2")


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, trust: bool = False, overwrite: bool = False,
    to: str = "fairchem1", dataset: str = "oc20",
) -> Path:
    """Read a fairchem EquiformerV2 checkpoint and write one that uses the plugin's classes.

    Both fairchem layouts are read: the older single-model one (``config["model"] ==
    "equiformer_v2"`` with ``model_attributes``; weights at the top with ``energy_block`` /
    ``force_block``; the public OC20 checkpoints) becomes a hydra model with heads ``energy`` and
    (when there is a ``force_block``) ``forces``; the hydra one keeps its head names. Weights are
    mapped with :func:`map_fairchem_state_dict` and checked against the model the new config
    builds (keys and shapes); the EMA lists are rebuilt in our parameter order; normalizers,
    element references, ``amp`` and the rest of the config are kept; the optimizer and scheduler
    states are dropped (they are tied to fairchem's parameter order). A checkpoint that already
    uses the plugin is checked and gets a loadable trainer name (as :func:`fix_checkpoint`).

    With ``to="fairchem2"`` the result is a fairchem 2.x inference checkpoint instead
    (:mod:`.fairchem2_checkpoint`: ``load_predict_unit(dst)``, ``FAIRChemCalculator(...,
    task_name=dataset)``), its tasks serving ``dataset``.

    Returns the path written. Raises :class:`CheckpointError` for anything it cannot convert.
    """
    from .fairchem2_checkpoint import Fairchem2ConversionError, fairchem2_checkpoint, serialise

    if to not in TARGETS:
        raise CheckpointError(f"to={to!r}: must be one of {TARGETS}")
    src, dst = Path(src), Path(dst)
    check_destination(dst, [src], overwrite=overwrite, what="destination", error=CheckpointError)
    checkpoint = read_checkpoint(src, trust=trust)
    try:
        new = convert_checkpoint_dict(checkpoint)
        if to == "fairchem2":
            names = trainable_parameter_names(build_model(new["config"]["model"]))
            data = serialise(fairchem2_checkpoint(new, names, dataset))
            write_bytes_atomically(dst, data, overwrite=overwrite, what="destination", error=CheckpointError)
            return dst
    except (CheckpointError, Fairchem2ConversionError) as e:
        raise CheckpointError(f"{src}: {e}") from None
    _atomic_save(new, dst, overwrite=overwrite)
    return dst


def fix_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike | None = None, *, trust: bool = False, overwrite: bool = False
) -> Path:
    """Make a checkpoint trained with the plugin load in ``OCPCalculator(checkpoint_path=...)``.

    fairchem 1.10 saves the task name (``s2ef``, ``is2re``) as ``config["trainer"]`` for runs of its
    ``forces``/``energy``/``equiformerv2_*`` trainers, and ``OCPCalculator`` then fails with
    "Failed to find the trainer 's2ef'". This writes fairchem's ``ocp`` trainer instead (and a
    ``dataset.src`` when missing), after checking the weights against the config. ``dst`` defaults
    to ``src`` (rewritten in place, atomically); another ``dst`` that exists is replaced only with
    ``overwrite``.
    """
    src = Path(src)
    if dst is None:
        dst = src
    else:
        dst = Path(dst)
        check_destination(dst, [src], overwrite=overwrite, what="destination", error=CheckpointError)
    checkpoint = read_checkpoint(src, trust=trust)
    try:
        if checkpoint_kind(checkpoint["config"]) != "plugin":
            raise CheckpointError("not a plugin checkpoint; use convert-checkpoint for fairchem's EquiformerV2")
        new = convert_checkpoint_dict(checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    _atomic_save(new, dst, overwrite=overwrite or dst == src)  # in place: replaces src
    return dst


def _atomic_save(obj, dst: Path, *, overwrite: bool) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomically(dst, buffer.getvalue(), overwrite=overwrite, what="destination", error=CheckpointError)
    logger.info("wrote %s", dst)


def calculator(checkpoint_path: str | os.PathLike, *, cpu: bool = True, trust: bool = False, **kwargs):
    """fairchem's ``OCPCalculator`` for an EquiformerV2 checkpoint, without the trainer-name trap.

    Reads the checkpoint with ``weights_only=True`` first (refusing what :func:`read_checkpoint`
    refuses), checks it describes EquiformerV2 and that its weights fit its config, picks a
    trainer name fairchem finds (unless ``trainer=`` is given) and returns
    ``OCPCalculator(checkpoint_path=..., cpu=cpu, trainer=..., **kwargs)``. A fairchem
    EquiformerV2 checkpoint that was not converted runs on fairchem's own model.
    """
    from fairchem.core.common.relaxation.ase_utils import OCPCalculator

    checkpoint = read_checkpoint(checkpoint_path, trust=trust)
    try:
        kind = checkpoint_kind(checkpoint["config"])
        if kind == "plugin":
            _check_against_model(strip_prefix(checkpoint["state_dict"]), build_model(checkpoint["config"]["model"]))
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint_path}: {e}") from None
    trainer = kwargs.pop("trainer", None) or loadable_trainer(checkpoint["config"].get("trainer"))
    return OCPCalculator(checkpoint_path=str(checkpoint_path), cpu=cpu, trainer=trainer, **kwargs)

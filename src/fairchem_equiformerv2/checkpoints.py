"""The one weight mapping from fairchem's EquiformerV2 key names to ours.

Used by the checkpoint converter, the parity tests and the benchmark. Our parameters keep
fairchem's shapes and meanings; only a few module paths differ:

* ``sphere_embedding``                 -> ``atom_embedding.sphere_embedding``
* ``<module>.{source,target}_embedding`` -> ``<module>.edge_types.{source,target}_embedding``
  (``backbone.shared_edge_types`` for the backbone's shared tables)

fairchem also saves buffers that are pure functions of the configuration (coefficient bookkeeping,
S2 grid matrices, index tables); we recompute those, so the mapping recognises them by name
(:data:`DERIVED_BUFFERS`) and leaves them out. Any other key we do not know is an error.

Two layouts are read: the hydra one (``backbone.*``, ``output_heads.<head>.*``) and the older
single-model ``equiformer_v2`` one (everything at the top, ``energy_block``/``force_block`` for the
outputs), which is mapped to hydra heads named ``energy`` and ``forces``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

DERIVED_BUFFERS = (
    "to_grid_mat", "from_grid_mat", "l_harmonic", "m_harmonic", "m_complex", "res_size", "to_m",
    "m_size", "expand_index", "balance_degree_weight",
)
_DERIVED = re.compile(r"(^|\.)(" + "|".join(DERIVED_BUFFERS) + r")$")

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
    """A fairchem hydra key -> the same weight's key in our model (the first matching rename)."""
    for pattern, replacement in _RENAMES:
        if pattern.search(key):
            return pattern.sub(replacement, key)
    return key


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove a DDP/DataParallel prefix when every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def is_legacy_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for the older single-model layout (no ``backbone.`` keys)."""
    return not any(k.startswith("backbone.") for k in state_dict)


def map_fairchem_state_dict(
    state_dict: Mapping[str, torch.Tensor], target_keys: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """fairchem EquiformerV2 weights (either layout, with or without ``module.``) -> ours.

    Args:
        state_dict: fairchem's ``state_dict``.
        target_keys: our model's ``state_dict`` keys; when given, keys missing on either side raise
            :class:`WeightMappingError` listing them.
    """
    state_dict = strip_prefix(state_dict)
    legacy = is_legacy_layout(state_dict)
    mapped = {}
    for key, value in state_dict.items():
        if is_derived_buffer(key):
            continue
        mapped[plugin_key(hydra_key(key) if legacy else key)] = value
    if target_keys is not None:
        unknown = sorted(set(mapped) - set(target_keys))
        missing = sorted(set(target_keys) - set(mapped))
        if unknown or missing:
            raise WeightMappingError(
                "fairchem weights do not match the plugin model: "
                + (f"unknown keys {unknown}; " if unknown else "")
                + (f"missing keys {missing}" if missing else "")
            )
    return mapped


def load_fairchem_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load fairchem EquiformerV2 weights into our hydra ``model`` (strict, shapes checked)."""
    ours = model.state_dict()
    mapped = map_fairchem_state_dict(state_dict, set(ours))
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in mapped.items() if v.shape != ours[k].shape]
    if wrong:
        raise WeightMappingError("weight shapes do not match the model's configuration: " + "; ".join(wrong))
    model.load_state_dict(mapped)

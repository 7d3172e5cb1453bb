"""A direct-force checkpoint -> a conservative one: the starting point of conservative fine-tuning.

The eSEN recipe (Fu et al. 2025): pre-train with direct forces (cheaper), then fine-tune with forces as
the energy's gradient. :class:`.conservative.ConservativeHead` is an ``EnergyHead`` (the same
``energy_block``), so a direct model's backbone and energy network carry over whole; its force head is
dropped. The result is a fairchem checkpoint whose config has the conservative heads and normalisers:
fine-tune it with fairchem's ``finetune_config`` (``benchmarks/conservative_learning.py`` does), or
load it in ``OCPCalculator``.

The direct checkpoint is read as every checkpoint is (:func:`.checkpoints.read_checkpoint`: weights
only, unless trusted), must be a plugin checkpoint, and is refused, naming the tensor or field, if a
weight, normaliser or element reference it carries is NaN or infinite; the new file is written
atomically and never over an existing one without ``overwrite``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .safe_write import check_destination
from .checkpoints import (
    CONSERVATIVE_HEAD,
    CheckpointError,
    _atomic_save,
    _check_finite,
    _check_normalizer_values,
    _check_normalizers,
    checkpoint_kind,
    config_normalizer_values,
    read_checkpoint,
)
from ..errors import ConfigError

def conservative_checkpoint_dict(checkpoint: dict, conservative_config: dict) -> dict:
    """``checkpoint`` (a fairchem checkpoint dict of a hydra model with this plugin's backbone) with the
    heads and normalisers of ``conservative_config`` (a fairchem config dict whose model has one
    ``ConservativeHead``), the state dict's other heads dropped and its EMA and optimizer state left
    out. The conservative head's weights are those of the direct model's head of the same name."""
    heads = conservative_config["model"]["heads"]
    conservative = [name for name, head in heads.items() if head.get("module") == CONSERVATIVE_HEAD]
    if len(conservative) != 1 or len(heads) != 1:
        raise ConfigError(f"conservative_config's model.heads must be one {CONSERVATIVE_HEAD}, got {heads}")
    old_heads = checkpoint["config"]["model"].get("heads") or {}
    if conservative[0] not in old_heads:
        raise ConfigError(
            f"the direct checkpoint has no head named {conservative[0]!r} (its heads: {sorted(old_heads)}) whose "
            "energy network the ConservativeHead would take over"
        )
    new = {key: value for key, value in checkpoint.items() if key not in ("ema", "optimizer", "scheduler", "amp")}
    config = dict(checkpoint["config"])
    config["model"] = {**config["model"], "heads": heads}
    normalizer = conservative_config["dataset"]["train"]["transforms"]["normalizer"]
    dataset = dict(config.get("dataset") or {})
    section = dict(dataset.get("train", dataset))  # fairchem keeps the train split's section flat
    section["transforms"] = {**(section.get("transforms") or {}), "normalizer": normalizer}
    config["dataset"] = {**dataset, "train": section} if "train" in dataset else section
    new["config"] = config
    new["normalizers"] = {
        key: {"mean": torch.tensor(float(value["mean"])), "rmsd": torch.tensor(float(value["stdev"]))}
        for key, value in normalizer.items()
    }
    keep = f"output_heads.{conservative[0]}."
    new["state_dict"] = {
        key: value for key, value in checkpoint["state_dict"].items()
        if "output_heads." not in key or keep in key
    }
    return new


def to_conservative_checkpoint(
    source: str | os.PathLike, destination: str | os.PathLike, conservative_config: dict, *,
    trust: bool = False, overwrite: bool = False,
) -> Path:
    """Read the direct-force plugin checkpoint ``source`` (``weights_only``, unless ``trust``), write
    :func:`conservative_checkpoint_dict` of it to ``destination``, atomically. Returns ``destination``.

    Raises :class:`.checkpoints.CheckpointError`, writing nothing, for: an existing ``destination``
    (unless ``overwrite``) or one that is ``source``; what :func:`.checkpoints.read_checkpoint`
    refuses; a checkpoint that is not the plugin's (convert fairchem's first); a NaN or infinite
    weight, normaliser or element reference, naming it.
    """
    source, destination = Path(source), Path(destination)
    check_destination(destination, [source], overwrite=overwrite, what="destination", flag="overwrite=True",
                      error=CheckpointError)
    _check_normalizer_values(config_normalizer_values(conservative_config, "conservative_config"))
    checkpoint = read_checkpoint(source, trust=trust)
    try:
        if checkpoint_kind(checkpoint["config"]) != "plugin":
            raise CheckpointError("not a plugin checkpoint; convert it first (fairchem-eqv2 convert-checkpoint)")
        new = conservative_checkpoint_dict(checkpoint, conservative_config)
        _check_finite(new["state_dict"], "weight")
        _check_normalizers(new)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    _atomic_save(new, destination, overwrite=overwrite)
    return destination

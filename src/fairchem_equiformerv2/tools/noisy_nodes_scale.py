"""Statistics of an IS2RE LMDB for Noisy Nodes' normaliser (``fairchem-eqv2 noisy-nodes-scale``):
the free atoms' relaxed displacements, their spread, and the reference's ``pos_std``
(:func:`.noisy_nodes.mean_corrupted_target_norm`). Reads LMDBs with fairchem 1.x's ``LmdbDataset``."""
from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import torch

from ..errors import UserInputError
from ..model.denoising.noisy_nodes import mean_corrupted_target_norm, relaxed_displacement


def lmdb_dataset(src: str | os.PathLike):
    """fairchem's ``LmdbDataset`` of ``src`` (an LMDB file or a folder of ``*.lmdb`` files), after
    checking that it opens and has entries: :class:`UserInputError` names the path of a folder without
    ``*.lmdb``, a file that is not an LMDB, or an empty LMDB (fairchem raises a bare ``AssertionError``
    or ``lmdb.Error``, or later fails on no data). A missing ``src`` is a ``FileNotFoundError``."""
    import lmdb
    from fairchem.core.datasets import LmdbDataset

    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no such file or folder", str(src))
    files = sorted(path.glob("*.lmdb")) if path.is_dir() else [path]
    if not files:
        raise UserInputError(f"{src}: no LMDB here (a folder without *.lmdb files)")
    for file in files:
        try:
            lmdb.open(str(file), subdir=False, readonly=True, lock=False).close()
        except lmdb.Error as error:
            reason = str(error).removeprefix(f"{file}: ")
            raise UserInputError(f"{file}: not a readable LMDB file ({reason})") from None
    dataset = LmdbDataset({"src": str(src)})
    if len(dataset) == 0:
        raise UserInputError(f"{src}: the LMDB has no entries")
    return dataset


def free_displacements(src: str | os.PathLike) -> torch.Tensor:
    """``[M, 3]`` float64: the relaxed displacement (``pos_relaxed - pos``, nearest periodic image) of
    every free atom (``fixed == 0``) of a fairchem IS2RE LMDB (folder or file) ``src``; see
    :func:`lmdb_dataset` for the checks. :class:`UserInputError` also names an entry that is not a
    pickled data object or has no ``pos_relaxed``, and data without free atoms."""
    dataset = lmdb_dataset(src)
    parts = []
    for i in range(len(dataset)):
        try:
            data = dataset[i]
        except pickle.UnpicklingError as error:
            raise UserInputError(f"{src}: entry {i} is not a pickled fairchem data object ({error})") from None
        if "pos_relaxed" not in data:
            raise UserInputError(f"{src}: entry {i} (sid {data.get('sid', '?')}) has no pos_relaxed: not IS2RE data")
        cell = data.cell if "cell" in data else None
        delta = relaxed_displacement(data.pos.double(), data.pos_relaxed.double(), cell,
                                     torch.zeros(data.pos.shape[0], dtype=torch.long) if cell is not None else None)
        free = data.fixed == 0 if "fixed" in data else torch.ones(delta.shape[0], dtype=torch.bool)
        parts.append(delta[free])
    displacement = torch.cat(parts)
    if displacement.shape[0] == 0:
        raise UserInputError(f"{src}: no free atoms (every atom has fixed == 1): nothing to measure")
    return displacement


def displacement_std(src: str | os.PathLike) -> float:
    """The standard deviation of the free atoms' relaxed displacement components over ``src`` (see
    :func:`free_displacements`): one choice of ``pos_std``."""
    return float(free_displacements(src).flatten().std())


def corrupted_target_norm(src: str | os.PathLike, noise_std: float = 0.3, interpolate: bool = True,
                          draws: int = 8, seed: int = 0) -> float:
    """The mean L2 norm of ``pos_relaxed - corrupted input`` over the free atoms of corrupted training
    inputs of ``src``: the reference's choice of ``pos_std`` (Equiformer's OC20 IS2RE code divides the
    target by it), so that the normalised target has mean norm 1. See :func:`mean_corrupted_target_norm`."""
    return mean_corrupted_target_norm(free_displacements(src), noise_std, interpolate, draws, seed)

"""Small S2EF and IS2RE datasets in fairchem's LMDB format, labelled with ASE's EMT.

Layout written by :func:`make_demo_data` (``OUT`` is the output folder)::

    OUT/s2ef/{train,val,test}/data.lmdb      + metadata.npz
    OUT/is2re/{train,val,test}/data.lmdb     + metadata.npz

Each LMDB entry is a ``torch_geometric.data.Data`` built by fairchem's own
``AtomsToGraphs`` (``r_edges=False``: graphs are made on the fly), as in the OC20 LMDBs:

====================  ==================  ==========================================
key                   type / shape        meaning
====================  ==================  ==========================================
``pos``               float32 [N, 3]      positions (Å), wrapped into the cell
``cell``              float32 [1, 3, 3]   lattice vectors as rows (Å)
``atomic_numbers``    uint8 [N]           (what ``AtomsToGraphs`` stores)
``natoms``            int                 N
``tags``              int64 [N]           0 sub-surface (fixed), 1 surface, 2 adsorbate
``fixed``             int32 [N]           1 for fixed atoms, else 0
``sid``               int                 system id, unique over all splits of a task
S2EF only:
``fid``               int                 frame id within system ``sid``
``energy``            float               EMT total energy (eV)
``forces``            float32 [N, 3]      EMT forces (eV/Å), fixed atoms included
IS2RE only:
``y_init``            float               EMT energy of the initial structure (eV)
``y_relaxed``         float               EMT energy of the relaxed structure (eV)
``pos_relaxed``       float32 [N, 3]      relaxed positions: ``pos`` + displacement
====================  ==================  ==========================================

IS2RE entries have no ``fid``: fairchem's ``predict`` names a prediction ``f"{sid}_{fid}"``
when ``fid`` is present and ``f"{sid}"`` otherwise, and IS2RE submissions are keyed by sid.

With ``format="aselmdb"`` (for fairchem 2.x's trainers, which read ASE databases) the S2EF splits
are written as ``OUT/s2ef/{train,val,test}/data.aselmdb`` + ``metadata.npz`` instead: the same
frames as ``ase.Atoms`` with their EMT energy and forces, tags, ``FixAtoms`` and ``sid``/``fid`` in
``data``. (IS2RE is a fairchem 1.x task; it is not written in this format.) Only this format works
without fairchem 1.x installed.

The same ``seed`` (and sizes) gives byte-identical files: every system draws from its own
generator ``numpy.random.default_rng([seed, task, split, system])``, so the sizes of one
split do not change the contents of another.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from ase import Atoms

from .safe_write import check_destination, staged_folder
from .demo_structures import displaced, emt_relaxation, labelled, random_system
from ..errors import UserInputError

if TYPE_CHECKING:  # fairchem 1.x's LMDB entries; imported where they are made, so that the
    from torch_geometric.data import Data  # aselmdb format works in a fairchem 2.x environment

TASKS: tuple[str, ...] = ("s2ef", "is2re")
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Default number of frames (S2EF) / systems (IS2RE) per split.
DEFAULT_S2EF_SIZES: dict[str, int] = {"train": 200, "val": 50, "test": 50}
DEFAULT_IS2RE_SIZES: dict[str, int] = {"train": 60, "val": 20, "test": 20}

#: System ids of split ``k`` (0 train, 1 val, 2 test) start at ``k * SID_STRIDE``.
SID_STRIDE = 1_000_000

#: S2EF: optimizer steps per trajectory, rattled copies per system and their noise (Å).
S2EF_TRAJECTORY_STEPS = 5
S2EF_RATTLED_PER_SYSTEM = 2
S2EF_RATTLE_STDEV = 0.08


@dataclasses.dataclass(frozen=True)
class IS2RERecipe:
    """How IS2RE systems start and relax: the adsorbate's binding atom starts ``U(*height)`` Å above
    the top layer, shifted from its site by ``U(-a, a)`` Å in x and y (``lateral_offset=a``) or, with
    ``None``, by a uniform point of the surface cell; EMT + BFGS relax it to ``fmax`` (eV/Å) in at
    most ``max_steps`` steps."""

    height: tuple[float, float]
    lateral_offset: float | None
    fmax: float
    max_steps: int


#: ``demo``: starts near a site, short relaxations (mean free-atom displacement about 0.15 Å), the
#: quick default. ``oc20``: starts as OC20's initial structures do (2.5-3.5 Å up, anywhere over the
#: surface) and relaxes as OC20's DFT did (fmax 0.05 eV/Å, up to 300 steps), so the relaxations move
#: atoms further, as the Noisy Nodes recipe assumes.
IS2RE_RECIPES: dict[str, IS2RERecipe] = {
    "demo": IS2RERecipe(height=(1.2, 2.2), lateral_offset=0.4, fmax=0.1, max_steps=100),
    "oc20": IS2RERecipe(height=(2.5, 3.5), lateral_offset=None, fmax=0.05, max_steps=300),
}

FORMATS: tuple[str, ...] = ("lmdb", "aselmdb")


def _atoms_to_graphs(labelled: bool):
    from fairchem.core.preprocessing import AtomsToGraphs

    return AtomsToGraphs(r_energy=labelled, r_forces=labelled, r_edges=False, r_fixed=True, r_distances=False)


def make_demo_data(
    out_dir: str | os.PathLike,
    seed: int = 0,
    s2ef_sizes: Mapping[str, int] | None = None,
    is2re_sizes: Mapping[str, int] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    format: str = "lmdb",
    is2re_recipe: str = "demo",
) -> dict[str, dict[str, Path]]:
    """Write the demo S2EF and IS2RE datasets under ``out_dir``.

    Args:
        out_dir: output folder (created if needed).
        seed: the random seed; the same seed and sizes give byte-identical files.
        s2ef_sizes: frames per split, e.g. ``{"train": 200, "val": 50, "test": 50}``;
            missing splits take :data:`DEFAULT_S2EF_SIZES`.
        is2re_sizes: systems per split; missing splits take :data:`DEFAULT_IS2RE_SIZES`.
        progress: show a tqdm progress bar per split.
        overwrite: replace existing demo files; without it they are refused before anything is made,
            and also when another process wrote them while these were being made.
        format: ``"lmdb"`` (fairchem 1.x) or ``"aselmdb"`` (fairchem 2.x; S2EF only).
        is2re_recipe: a key of :data:`IS2RE_RECIPES`: how IS2RE systems start and relax.

    Returns:
        ``{"s2ef": {"train": path, "val": path, "test": path}, "is2re": {...}}``, the paths
        of the ``data.lmdb`` files (each folder also holds ``metadata.npz``).

    The files are made in a hidden folder inside ``out_dir`` and moved into place once all are
    complete (:func:`.staged_folder`): a failure or an interrupt (Ctrl-C) leaves nothing this made.
    """
    sizes = {
        "s2ef": _resolve_sizes(s2ef_sizes, DEFAULT_S2EF_SIZES, "s2ef"),
        "is2re": _resolve_sizes(is2re_sizes, DEFAULT_IS2RE_SIZES, "is2re"),
    }
    if seed < 0:
        raise UserInputError(f"seed {seed}: must be >= 0")
    if format not in FORMATS:
        raise UserInputError(f"format {format!r}: must be one of {', '.join(FORMATS)}")
    if is2re_recipe not in IS2RE_RECIPES:
        raise UserInputError(f"IS2RE recipe {is2re_recipe!r}: must be one of {', '.join(IS2RE_RECIPES)}")
    tasks = TASKS if format == "lmdb" else ("s2ef",)
    out_dir = Path(out_dir)
    for task, split in itertools.product(tasks, SPLITS):  # every refusal before the first split is made
        for name in (f"data.{format}", "metadata.npz"):
            check_destination(out_dir / task / split / name, overwrite=overwrite, what="demo file")
    from tqdm import tqdm

    paths: dict[str, dict[str, Path]] = {}
    with staged_folder(out_dir, overwrite=overwrite, what="demo file") as staging:
        for task in tasks:
            paths[task] = {}
            for split in SPLITS:
                size = sizes[task][split]
                if format == "aselmdb":
                    entries = (frame for frame, _, _ in s2ef_frames(seed, split, size))
                    write = write_aselmdb_split
                elif task == "is2re":
                    entries, write = is2re_entries(seed, split, size, is2re_recipe), write_split
                else:
                    entries, write = s2ef_entries(seed, split, size), write_split
                bar = tqdm(entries, total=size, desc=f"{task}/{split}", unit=" entries", disable=not progress)
                written = write(staging / task / split, list(bar))
                paths[task][split] = out_dir / written.relative_to(staging)
    return paths


def zero_force_mae(src: str | Path) -> float:
    """The force MAE (eV/Å) of predicting zero forces on the S2EF LMDB ``src``, over the free atoms
    (``fixed == 0``) as fairchem scores with ``eval_on_free_atoms``: the baseline a model must beat."""
    from fairchem.core.datasets import LmdbDataset

    dataset = LmdbDataset({"src": str(src)})
    forces = [d.forces[d.fixed == 0].abs() for d in (dataset[i] for i in range(len(dataset)))]
    return float(torch.cat(forces).mean())


def write_split(folder: Path, entries: list[Data]) -> Path:
    """``folder/data.lmdb`` and ``folder/metadata.npz`` (natoms) for ``entries``, replacing them; returns
    the LMDB path."""
    from .lmdb_writer import write_lmdb, write_metadata

    folder.mkdir(parents=True, exist_ok=True)
    write_lmdb(folder / "data.lmdb", entries)
    write_metadata(folder, [data.natoms for data in entries])
    return folder / "data.lmdb"


def write_aselmdb_split(folder: Path, frames: list[Atoms]) -> Path:
    """``folder/data.aselmdb`` (an ASE database in LMDB, which fairchem 2.x's ``ase_db`` datasets read)
    and ``folder/metadata.npz`` (natoms) for labelled ``frames``, replacing them; returns the database path."""
    from ase.db import connect

    from .safe_write import replaced_atomically
    from .lmdb_writer import write_metadata

    path = folder / "data.aselmdb"
    with replaced_atomically(path, overwrite=True) as temporary:
        try:
            with connect(str(temporary), type="aselmdb") as db:
                for frame in frames:
                    db.write(frame, data=frame.info)
        except ValueError as e:  # ASE without ase-db-backends has no aselmdb type
            raise UserInputError(f"cannot write {path}: {e} (pip install ase-db-backends)") from None
        finally:  # LMDB's lock file of the temporary database, which nothing opens again
            Path(f"{temporary}-lock").unlink(missing_ok=True)
    write_metadata(folder, [len(frame) for frame in frames])
    return path


def s2ef_entries(seed: int, split: str, num_frames: int) -> Iterator[Data]:
    """``num_frames`` S2EF entries of ``split`` (:func:`s2ef_frames` in fairchem's LMDB format)."""
    for frame, sid, fid in s2ef_frames(seed, split, num_frames):
        yield s2ef_entry(frame, sid=sid, fid=fid)


def s2ef_frames(seed: int, split: str, num_frames: int) -> Iterator[tuple[Atoms, int, int]]:
    """``num_frames`` labelled S2EF frames of ``split`` with their ``sid`` and ``fid`` (also in
    ``frame.info``): EMT relaxation frames and rattled copies.

    Each system contributes its BFGS trajectory (the start, then up to
    :data:`S2EF_TRAJECTORY_STEPS` steps; ``fid`` 0, 1, ...) followed by
    :data:`S2EF_RATTLED_PER_SYSTEM` rattled copies of random frames of it (next ``fid``\\ s).
    """
    count = 0
    for index in itertools.count():
        rng = _system_rng(seed, "s2ef", split, index)
        start = random_system(rng, rattle_stdev=0.05)
        trajectory = emt_relaxation(start, fmax=0.05, steps=S2EF_TRAJECTORY_STEPS)
        rattled = [
            labelled(displaced(trajectory[rng.integers(len(trajectory))], rng, S2EF_RATTLE_STDEV))
            for _ in range(S2EF_RATTLED_PER_SYSTEM)
        ]
        for fid, frame in enumerate(trajectory + rattled):
            if count == num_frames:
                return
            frame.info.update(sid=_sid(split, index), fid=fid)
            yield frame, _sid(split, index), fid
            count += 1


def is2re_entries(seed: int, split: str, num_systems: int, recipe: str = "demo") -> Iterator[Data]:
    """``num_systems`` IS2RE entries of ``split``: an initial structure and its EMT relaxation, made
    as :data:`IS2RE_RECIPES` ``[recipe]`` says."""
    how = IS2RE_RECIPES[recipe]
    for index in range(num_systems):
        rng = _system_rng(seed, "is2re", split, index)
        initial = random_system(rng, height=how.height, lateral_offset=how.lateral_offset)
        trajectory = emt_relaxation(initial, fmax=how.fmax, steps=how.max_steps)
        yield is2re_entry(trajectory[0], trajectory[-1], sid=_sid(split, index))


def s2ef_entry(frame: Atoms, sid: int, fid: int) -> Data:
    """One S2EF entry from a labelled frame (see the module docstring for the keys)."""
    data = _atoms_to_graphs(labelled=True).convert(frame)
    data.energy = float(data.energy)  # a Python float, as in the OC20 LMDBs (batches as float32)
    return _with_ids(data, frame, sid, fid)


def is2re_entry(initial: Atoms, relaxed: Atoms, sid: int) -> Data:
    """One IS2RE entry from labelled initial and relaxed structures (same atoms, same order).

    ``pos_relaxed`` is ``pos`` (the wrapped initial positions) plus each atom's actual
    displacement during the relaxation, so ``pos_relaxed - pos`` is the true displacement.
    """
    data = _with_ids(_atoms_to_graphs(labelled=False).convert(initial), initial, sid, fid=None)
    displacement = relaxed.get_positions() - initial.get_positions()
    data.pos_relaxed = data.pos + torch.from_numpy(displacement).float()
    data.y_init = float(initial.get_potential_energy(apply_constraint=False))
    data.y_relaxed = float(relaxed.get_potential_energy(apply_constraint=False))
    return data


def _with_ids(data: Data, atoms: Atoms, sid: int, fid: int | None) -> Data:
    """Add ``sid`` (and ``fid``) and int64 ``tags``, as fairchem's OC20 preprocessing does."""
    data.tags = torch.as_tensor(atoms.get_tags(), dtype=torch.long)
    data.sid = int(sid)
    if fid is not None:
        data.fid = int(fid)
    return data


def _sid(split: str, index: int) -> int:
    return SPLITS.index(split) * SID_STRIDE + index


def _system_rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASKS.index(task), SPLITS.index(split), index])


def _resolve_sizes(sizes: Mapping[str, int] | None, defaults: Mapping[str, int], task: str) -> dict[str, int]:
    resolved = dict(defaults)
    for split, size in (sizes or {}).items():
        if split not in SPLITS:
            raise UserInputError(f"{task}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if size is not None:
            resolved[split] = int(size)
    for split, size in resolved.items():
        if not 1 <= size < SID_STRIDE:
            raise UserInputError(f"{task}/{split}: size must be between 1 and {SID_STRIDE - 1}, got {size}")
    return resolved

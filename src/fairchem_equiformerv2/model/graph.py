"""The radius graph: each atom's neighbours within the cutoff, through periodic images only along the
directions in which its structure is periodic.

Which directions are periodic (:func:`periodic_directions`), per structure ``[B, 3]``:

* none when the backbone's ``use_pbc`` is off;
* else the batch's ``pbc`` flags (fairchem's ``AtomsToGraphs(r_pbc=True)``, which its ASE calculator
  uses), or, when the batch has none (fairchem's default for LMDBs without them), all three in a
  structure with a cell and none in a structure without (all nine entries zero: molecules in
  molecular LMDBs);
* never in a structure without atoms (it gets energy 0 and no edges).

A structure that is periodic along a direction needs a cell vector there (:func:`missing_vectors`:
not zero, nor the 1 A vector ASE's ``complete_cell`` puts where a cell has none, which is what a
molecule with ``pbc=True`` and no cell reaches the model with); the other vectors may be zero
(ASE's default for a molecule or a slab built without vacuum). For the neighbour search such a
singular cell is completed with unit vectors orthogonal to the periodic ones (:func:`search_cell`);
the images searched along the periodic directions, and so the graph, are those of the real cell.
Whether vectors are linearly dependent is judged by angles alone (:data:`DEPENDENCE_TOLERANCE`), so
that a cell's scale does not matter.

The search itself is fairchem's ``radius_graph_pbc`` (the same edges, in the same order, as fairchem's
EquiformerV2 on every batch that fairchem's model runs), which each adapter passes in as a
:data:`RadiusSearch` (fairchem 1.x and 2.x have one each, with one signature): this module imports no
fairchem. It runs once per group of structures that share their periodic directions. fairchem's own
graph refuses a batch that mixes them, reads only the first structure's flags of a flat ``pbc``, needs
torch_cluster or pyg-lib for a non-periodic batch and cannot handle a singular cell; this module does
all four.

Atoms closer than :data:`MIN_DISTANCE` (their nearest periodic images included) are refused by
:func:`check_no_close_pairs`: fairchem's search silently drops such pairs, which would leave two
atoms in one place that do not see each other.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..errors import InputError

#: fairchem's ``radius_graph_pbc(data, radius, max_neighbors, enforce_max_neighbors_strictly)`` ->
#: ``(edge_index [2, E], cell_offsets [E, 3], neighbors [B])``, reading ``data.pos``, ``data.natoms``,
#: ``data.cell`` and ``data.pbc``.
RadiusSearch = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

#: Pairs at or below this distance (A) are dropped by fairchem's neighbour search; we refuse them.
MIN_DISTANCE = 0.01
_PAIR_CHUNK = 1 << 22  # atom pairs compared at a time by check_no_close_pairs
AXES = "abc"
#: Cell vectors are linearly dependent where the sine of the angle between one and the span of the
#: others is at or below this (scale-invariant; float32 rounding of a dependent cell gives ~1e-7).
DEPENDENCE_TOLERANCE = 1e-6
#: How close to a 1 A vector orthogonal to the others a cell vector must be to be taken for one that
#: ASE's ``complete_cell`` filled in (relative length and cosines; a float32 cell holds them to ~1e-7).
COMPLETED_TOLERANCE = 1e-6


def _structure_cells(data, num_structures: int, dtype: torch.dtype) -> torch.Tensor:
    """``data.cell`` as ``[B, 3, 3]``, zeros when the batch has none."""
    cell = getattr(data, "cell", None)
    if cell is None:
        return torch.zeros(num_structures, 3, 3, dtype=dtype, device=data.pos.device)
    if cell.numel() != 9 * num_structures:
        raise InputError(f"cell has shape {tuple(cell.shape)}; a batch of {num_structures} structures needs [{num_structures}, 3, 3]")
    return cell.reshape(num_structures, 3, 3).to(dtype)


def periodic_directions(data, use_pbc: bool, cell: torch.Tensor) -> torch.Tensor:
    """Which of the cell vectors a, b, c each structure repeats along: ``[B, 3]`` bool (see the module
    docstring). ``cell [B, 3, 3]``. Raises :class:`InputError` naming a structure that is periodic
    along a direction it has no cell vector for (:func:`missing_vectors`)."""
    num_structures = cell.shape[0]
    periodic = torch.zeros(num_structures, 3, dtype=torch.bool, device=cell.device)
    if not use_pbc:
        return periodic
    pbc = getattr(data, "pbc", None)
    if pbc is None:  # fairchem's default: all three, where there is a cell
        periodic[:] = cell.flatten(1).ne(0).any(dim=1, keepdim=True)
    elif pbc.numel() != 3 * num_structures:
        raise InputError(f"pbc has shape {tuple(pbc.shape)}; a batch of {num_structures} structures needs 3 flags each")
    else:
        periodic = pbc.reshape(num_structures, 3).to(device=cell.device, dtype=torch.bool)
    periodic = periodic & data.natoms.to(cell.device).ne(0).unsqueeze(1)  # no atoms: nothing repeats
    zero, completed = missing_vectors(cell)
    for missing, what in ((zero, "that vector is zero"), (completed, COMPLETED_VECTOR)):
        missing = periodic & missing
        if missing.any():
            s, axis = missing.nonzero()[0].tolist()
            vector = [round(x, 6) for x in cell[s, axis].tolist()]
            raise InputError(_no_cell_vector(s, axis, what.format(vector=vector), flagged=pbc is not None))
    return periodic


COMPLETED_VECTOR = (
    "that vector, {vector}, is the 1 A vector orthogonal to the others that ASE's complete_cell puts "
    "where a cell has none (fairchem's AtomsToGraphs and AtomicData.from_ase call it), so the structure "
    "was given no cell vector there"
)


def _no_cell_vector(structure: int, axis: int, what: str, flagged: bool) -> str:
    """The refusal of a structure periodic along ``axis`` without a cell vector there; ``flagged``:
    the batch has ``pbc`` flags (else every direction of a cell is periodic by default)."""
    if flagged:
        why, fix = f"pbc[{axis}] is True", "or set pbc False there (a molecule without a cell: pbc=False)"
    else:
        why = "the batch has no pbc flags: fairchem's default makes every direction of a cell periodic"
        fix = "store pbc flags with the structures (AtomsToGraphs(r_pbc=True)), or set the backbone's use_pbc False"
    return (
        f"structure {structure} is periodic along cell vector {AXES[axis]} ({why}) but {what}: give the cell a "
        f"length in every periodic direction, {fix}"
    )


def missing_vectors(cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell vectors that stand for no cell vector, ``cell [B, 3, 3]`` -> two ``[B, 3]`` bool: the zero
    ones, and those ASE's ``complete_cell`` made (of length 1 A and orthogonal to the other two,
    within :data:`COMPLETED_TOLERANCE`). fairchem's ``AtomsToGraphs`` and ``AtomicData.from_ase``
    complete every cell, so a molecule with ``pbc=True`` and no cell would otherwise be a crystal with
    a 1 A period; a real cell has no such vector (every atom would be 1 A from its own image)."""
    cell = cell.double()
    norms = cell.norm(dim=2)  # [B, 3]
    cosines = (cell @ cell.transpose(1, 2)).abs() / (norms.unsqueeze(2) * norms.unsqueeze(1)).clamp_min(1e-300)
    cosines = cosines * (1 - torch.eye(3, dtype=cell.dtype, device=cell.device))  # [B, 3, 3], zero diagonal
    orthogonal = cosines.amax(dim=2) <= COMPLETED_TOLERANCE
    return norms.eq(0), orthogonal & (norms - 1).abs().le(COMPLETED_TOLERANCE)


def search_cell(cell: torch.Tensor, periodic: torch.Tensor) -> torch.Tensor:
    """``cell [B, 3, 3]`` with the non-periodic vectors of every singular cell replaced by unit vectors
    orthogonal to the periodic ones and to each other (Gram-Schmidt against the axes), so that the cell
    can be inverted; vectors of non-singular cells are kept. Raises :class:`InputError` where the
    periodic vectors themselves are linearly dependent."""
    num_structures = cell.shape[0]
    tol = DEPENDENCE_TOLERANCE
    lengths = cell.double().norm(dim=2)  # [B, 3]
    # |det| / (|a| |b| |c|): the volume of the cell of unit vectors, 0 where a vector is zero
    singular = torch.linalg.det(cell.double()).abs() <= tol * lengths.prod(dim=1)
    basis = []  # orthonormal rows [B, 3] spanning what is fixed so far (zero rows where nothing)

    def residual(v: torch.Tensor) -> torch.Tensor:  # v [B, ..., 3] minus its projections on basis
        for u in basis:
            u = u.view(num_structures, *([1] * (v.dim() - 2)), 3)
            v = v - (v * u).sum(-1, keepdim=True) * u
        return v

    for axis in range(3):  # the periodic vectors first
        v = residual(cell[:, axis].double() * periodic[:, axis, None])
        norm = v.norm(dim=1, keepdim=True)
        # the sine of the angle between the vector and the span of the periodic ones before it
        dependent = periodic[:, axis] & (norm.squeeze(1) <= tol * lengths[:, axis])
        if dependent.any():
            s = int(dependent.nonzero()[0])
            raise InputError(
                f"structure {s}: the cell vectors of its periodic directions ({cell[s].tolist()}, pbc "
                f"{periodic[s].tolist()}) are linearly dependent"
            )
        basis.append(torch.where(norm > 0, v / norm.clamp_min(1e-300), torch.zeros_like(v)))
    completed = cell.clone()
    axes = torch.eye(3, dtype=torch.float64, device=cell.device).expand(num_structures, 3, 3)
    for axis in range(3):
        candidates = residual(axes)  # [B, 3 candidates, 3]
        norms = candidates.norm(dim=2)
        best = candidates[torch.arange(num_structures), norms.argmax(dim=1)]
        best = best / best.norm(dim=1, keepdim=True)
        replace = singular & ~periodic[:, axis]
        completed[:, axis] = torch.where(replace.unsqueeze(1), best.to(cell.dtype), cell[:, axis])
        basis.append(torch.where(replace.unsqueeze(1), best, torch.zeros_like(best)))
    return completed  # [B, 3, 3]


def _pairs(natoms: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered atom pairs ``(i, j)`` of one structure each, numbered ``start:stop`` over the batch's
    ``sum(natoms**2)`` (fairchem's enumeration in ``radius_graph_pbc``)."""
    squares = natoms * natoms
    ends = torch.cumsum(squares, 0)
    k = torch.arange(start, stop, device=natoms.device)
    s = torch.searchsorted(ends, k, right=True)
    r, n = k - (ends - squares)[s], natoms[s]
    first_atom = (torch.cumsum(natoms, 0) - natoms)[s]
    return first_atom + r // n, first_atom + r % n


def check_no_close_pairs(
    pos: torch.Tensor, cell: torch.Tensor, periodic: torch.Tensor, natoms: torch.Tensor, batch: torch.Tensor
) -> None:
    """Raise :class:`InputError` naming two atoms of one structure (or an atom and a periodic image of
    another) closer than :data:`MIN_DISTANCE`.

    ``pos [N, 3]``, ``cell [B, 3, 3]`` (a :func:`search_cell`, invertible), ``periodic [B, 3]``,
    ``natoms [B]``, ``batch [N]``. Every pair of a structure is compared, in chunks, as the minimum image along the
    periodic directions (exact for distances this small: the nearest image's fractional difference is
    under a half in every direction whose cell height exceeds twice the threshold).
    """
    natoms = natoms.long()
    npairs = int((natoms * natoms).sum())
    if int(natoms.max()) < 2:
        return
    cell = cell.double()
    frac = torch.linalg.solve(cell.transpose(1, 2)[batch], pos.double().unsqueeze(2)).squeeze(2)  # [N, 3]
    for start in range(0, npairs, _PAIR_CHUNK):
        i, j = _pairs(natoms, start, min(npairs, start + _PAIR_CHUNK))
        i, j = i[i < j], j[i < j]
        s = batch[i]
        d = frac[j] - frac[i]
        image = torch.where(periodic[s], torch.round(d), torch.zeros_like(d))
        dist = torch.bmm((d - image).unsqueeze(1), cell[s]).squeeze(1).norm(dim=1)
        close = dist <= MIN_DISTANCE * (1 + 1e-3)
        if close.any():
            e = int(close.nonzero()[0])
            a, b = int(i[e]), int(j[e])
            through = " (through the periodic boundary)" if image[e].any() else ""
            raise InputError(
                f"atoms {a} and {b} are at the same position: {float(dist[e]):.2e} A apart{through}, at "
                f"{pos[a].tolist()} and {pos[b].tolist()}; atoms closer than {MIN_DISTANCE} A are not allowed "
                "(fairchem's neighbour search drops such pairs, so neither atom would see the other)"
            )


@dataclass
class Graph:
    """A batch's radius graph, with the field names of fairchem's ``GraphData``: ``edge_index [2, E]``
    (source, target), ``edge_distance [E]``, ``edge_distance_vec [E, 3]`` (``pos[source] - pos[target]
    + offset``), ``cell_offsets [E, 3]`` (whole cells), ``offset_distances [E, 3]`` (the offset in A),
    ``neighbors [B]`` (edges per structure), ``batch_full [N]``, ``atomic_numbers_full [N]``."""

    edge_index: torch.Tensor
    edge_distance: torch.Tensor
    edge_distance_vec: torch.Tensor
    cell_offsets: torch.Tensor
    offset_distances: torch.Tensor
    neighbors: torch.Tensor
    batch_full: torch.Tensor
    atomic_numbers_full: torch.Tensor
    node_offset: int = 0


@dataclass
class GraphSettings:
    """The backbone's graph arguments, as fairchem names them."""

    use_pbc: bool
    use_pbc_single: bool
    otf_graph: bool
    cutoff: float
    max_neighbors: int
    enforce_max_neighbors_strictly: bool


def build_graph(data, settings: GraphSettings, search: RadiusSearch) -> Graph:
    """The radius graph of a fairchem batch (1.x ``Batch`` or 2.x ``AtomicData``), checked for atoms too
    close together; ``search`` is the installed fairchem's ``radius_graph_pbc``.

    Edge vectors ``pos[source] - pos[target] + offset`` and lengths come in ``data.pos``'s dtype; the
    search itself runs in float32 (fairchem's). ``edge_index [2, E]`` is ``(source, target)``.
    """
    pos, natoms = data.pos, data.natoms.long()
    num_structures = len(natoms)
    cell = _structure_cells(data, num_structures, pos.dtype)
    periodic = periodic_directions(data, settings.use_pbc, cell)
    with torch.no_grad():  # the search's cell and the check only choose edges: no gradient through them
        searched = search_cell(cell, periodic)
        check_no_close_pairs(pos, searched, periodic, natoms, data.batch)

    if not settings.otf_graph and getattr(data, "edge_index", None) is not None:
        edge_index = data.edge_index
        cell_offsets = getattr(data, "cell_offsets", None)
        if cell_offsets is None:
            cell_offsets = pos.new_zeros(edge_index.shape[1], 3)
    else:
        with torch.no_grad():  # indices and whole-cell offsets; the vectors below carry the gradients
            edge_index, cell_offsets = _search(pos, searched, periodic, natoms, data.batch, settings, search)

    source, target = edge_index
    vec = pos[source] - pos[target]
    offsets = torch.bmm(cell_offsets.to(pos.dtype).unsqueeze(1), cell[data.batch[source]]).squeeze(1)
    vec += offsets
    return Graph(
        edge_index=edge_index,
        edge_distance=vec.norm(dim=-1),
        edge_distance_vec=vec,
        cell_offsets=cell_offsets,
        offset_distances=offsets,
        neighbors=torch.bincount(data.batch[target], minlength=num_structures),
        batch_full=data.batch,
        atomic_numbers_full=data.atomic_numbers.long(),
    )


def _search(
    pos, cell, periodic, natoms, batch, settings: GraphSettings, search: RadiusSearch
) -> tuple[torch.Tensor, torch.Tensor]:
    """fairchem's ``radius_graph_pbc`` over groups of structures that share their periodic directions
    (each structure alone with ``use_pbc_single``, as fairchem). Structures without atoms have no
    edges and are left out (fairchem's search fails on a group of them). Returns ``edge_index [2, E]``
    in the batch's atom numbering and ``cell_offsets [E, 3]``."""
    nonempty = natoms.ne(0).nonzero().flatten()
    if settings.use_pbc_single:
        groups = list(nonempty.view(-1, 1))
    else:
        patterns, group_of = torch.unique(periodic[nonempty], dim=0, return_inverse=True)
        groups = [nonempty[group_of == g] for g in range(len(patterns))]
    edges, offsets = [], []
    for structures in groups:
        atoms = torch.isin(batch, structures).nonzero().flatten()
        group = SimpleNamespace(
            pos=pos[atoms].float(), natoms=natoms[structures], cell=cell[structures].float(),
            pbc=periodic[structures[:1]],
        )
        edge_index, cell_offsets, _ = search(group, settings.cutoff, settings.max_neighbors, settings.enforce_max_neighbors_strictly)
        edges.append(atoms[edge_index])
        offsets.append(cell_offsets)
    if len(groups) == 1:
        return edges[0], offsets[0]
    return torch.cat(edges, dim=1), torch.cat(offsets)

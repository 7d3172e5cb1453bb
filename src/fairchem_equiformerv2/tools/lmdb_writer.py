"""Write fairchem-format LMDB files.

The layout is the one fairchem's ``LmdbDataset`` reads and the OC20 preprocessing scripts
(``preprocess_ef.py``, ``preprocess_relaxed.py``) write:

* one LMDB *file* (``subdir=False``), keys ``b"0"``, ``b"1"``, ... (ASCII integers),
  each value a pickled ``torch_geometric.data.Data`` (read back with ``pickle.loads``);
* a ``b"length"`` key holding the pickled number of entries;
* next to it, ``metadata.npz`` with ``natoms`` (int32, one per entry), as written by
  ``fairchem.core.scripts.make_lmdb_sizes``; fairchem needs it for ``load_balancing: atoms``.

Tensors are pickled as ``torch.from_numpy(<numpy array>)`` rather than through torch's
default storage pickling, which embeds the storage's memory address: so equal data give
byte-identical files. Unpickling yields ordinary tensors of the same dtype and shape.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb
import numpy as np
import torch

from .safe_write import replaced_atomically, write_bytes_atomically
from ..errors import UserInputError

if TYPE_CHECKING:
    from torch_geometric.data import Data

#: Address space reserved for one file (sparse: only written pages use disk).
DEFAULT_MAP_SIZE = 1 << 32

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def write_lmdb(
    path: str | os.PathLike, entries: Iterable[Data], map_size: int = DEFAULT_MAP_SIZE, *, overwrite: bool = True
) -> int:
    """Write ``entries`` to the LMDB file ``path``, replacing it atomically.

    The file is written beside ``path`` and renamed once complete (:func:`.replaced_atomically`), so
    an interrupted run never leaves a half-written ``path`` behind.

    Args:
        path: the ``.lmdb`` file to write; its folder must exist.
        entries: ``Data`` objects, stored under keys ``"0"``, ``"1"``, ...
        map_size: the LMDB map size in bytes (an upper bound on the file size).
        overwrite: replace an existing ``path``; without it an existing one is refused (a
            :class:`.UserInputError`) and kept, also one that appeared while this was writing.

    Returns:
        the number of entries written.
    """
    with replaced_atomically(Path(path), overwrite=overwrite) as temporary:
        try:
            env = lmdb.open(str(temporary), map_size=map_size, subdir=False, lock=False, meminit=True, sync=True)
            try:
                count = 0
                with env.begin(write=True) as txn:
                    for count, data in enumerate(entries, start=1):
                        txn.put(f"{count - 1}".encode("ascii"), dumps_deterministic(data))
                    txn.put(b"length", dumps_deterministic(count))
                env.sync()
            finally:
                env.close()
        except lmdb.Error as e:  # a full disk or a read-only folder, in LMDB's words
            raise UserInputError(f"cannot write {path}: {str(e).replace(f'{temporary}: ', '')}") from None
    return count


def dumps_deterministic(obj: object) -> bytes:
    """``pickle.dumps(obj)``, except that tensors pickle as ``torch.from_numpy(array)``.

    The result depends only on the values, never on memory addresses, and loads with
    plain ``pickle.loads``.
    """
    buffer = io.BytesIO()
    _TensorAsNumpyPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class _TensorAsNumpyPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            return torch.from_numpy, (obj.detach().cpu().contiguous().numpy(),)
        return NotImplemented


def write_metadata(folder: str | os.PathLike, natoms: Iterable[int], *, overwrite: bool = True) -> Path:
    """Write ``folder/metadata.npz`` with ``natoms``: int32 array, shape ``[num_entries]``.

    Same content as ``np.savez``, but with fixed zip timestamps so that equal inputs give
    byte-identical files. ``overwrite`` as in :func:`write_lmdb`.
    """
    arrays = {"natoms": np.asarray(list(natoms), dtype=np.int32)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return write_bytes_atomically(Path(folder) / "metadata.npz", buffer.getvalue(), overwrite=overwrite)

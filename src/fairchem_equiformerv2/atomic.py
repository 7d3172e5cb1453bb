"""Writing output files: never over an input, never over an existing file without consent, and never
half a file: readers see the old file or the complete new one.

Every ``fairchem-eqv2`` command that writes goes through :func:`check_destination` before it reads
anything and through :func:`replaced_atomically` (or :func:`write_bytes_atomically`) to write.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserInputError


def check_destination(
    dst: Path, inputs: Iterable[Path | None] = (), *, overwrite: bool, what: str = "output", flag: str = "--force",
    error: type[UserInputError] = UserInputError,
) -> None:
    """Raise ``error`` (a :class:`UserInputError`) when ``dst`` is one of ``inputs`` (also through a
    symbolic or hard link), is a folder, or exists and ``overwrite`` is off. ``what`` and ``flag`` name
    the destination and the consent in the message."""
    for source in inputs:
        if source is not None and _same_file(dst, Path(source)):
            raise error(f"{what} {dst} is the input {source}: writing it would destroy the input; choose another path")
    if dst.is_dir():
        raise error(f"{what} {dst} is a folder; give a file path")
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise error(f"{what} {dst} exists; pass {flag} to replace it")
    parent = next((p for p in dst.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise error(f"{what} {dst}: {parent} is a file, not a folder")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return a.resolve() == b.resolve()


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success it is renamed over
    ``path``.

    The folder is created if needed. On any failure the temporary file is removed and ``path`` is
    left as it was; an ``OSError`` (a full disk, a read-only folder) is raised again naming ``path``.
    The temporary file is created by the caller's writer, so it gets the usual permissions.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        os.replace(temporary, path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> Path:
    """``data`` into ``path`` in one write, all or nothing (see :func:`replaced_atomically`). Writers
    that serialise into memory first (``np.savez``, ``torch.save``) report a full disk as the OS's
    ``OSError`` this way, not as their own failure to close or seek a half-written file."""
    with replaced_atomically(path) as temporary:
        temporary.write_bytes(data)
    return path

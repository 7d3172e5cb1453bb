"""Writing output files: never over an input, never over an existing file without consent, and never
half a file: readers see the old file or the complete new one.

Every ``fairchem-eqv2`` command that writes goes through :func:`check_destination` before it reads
anything and through :func:`replaced_atomically` (or :func:`write_bytes_atomically`, or
:func:`staged_folder` for a set of files) to write. Without ``overwrite`` the last step is no-clobber
too: a file that appeared at the destination meanwhile (another process writing the same output)
is refused, not replaced.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import UserInputError

#: ``os.link`` errors of file systems without hard links; there :func:`publish` checks, then renames.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}


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
        raise _exists(dst, what, flag, error)
    parent = next((p for p in dst.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise error(f"{what} {dst}: {parent} is a file, not a folder")


def _exists(dst: Path, what: str, flag: str, error: type[UserInputError]) -> UserInputError:
    return error(f"{what} {dst} exists; pass {flag} to replace it")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return a.resolve() == b.resolve()


def publish(
    temporary: Path, path: Path, *, overwrite: bool, what: str = "output", flag: str = "--force",
    error: type[UserInputError] = UserInputError,
) -> None:
    """Move the complete file ``temporary`` to ``path`` (same folder or file system) in one step.

    With ``overwrite`` an existing ``path`` is replaced (``os.replace``). Without it ``path`` must
    not exist, checked in the same step (``os.link``, which fails if ``path`` appeared meanwhile):
    a file that another process wrote there after :func:`check_destination` is kept, and this one
    gets the refusal ``check_destination`` gives (``error``, naming ``what`` and ``flag``). An
    ``OSError`` is raised naming ``path``.
    """
    try:
        if overwrite:
            os.replace(temporary, path)
            return
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise _exists(path, what, flag, error) from None
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            if path.exists() or path.is_symlink():  # no hard links here: check, then rename
                raise _exists(path, what, flag, error) from None
            os.replace(temporary, path)
            return
        os.unlink(temporary)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def _temporary_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this process and call (threads included)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def replaced_atomically(
    path: Path, *, overwrite: bool, what: str = "output", error: type[UserInputError] = UserInputError,
) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success it is moved to
    ``path`` by :func:`publish`: over an existing file only with ``overwrite``, else refused with
    ``error`` naming ``what``, the file found there kept.

    The folder is created if needed. On any failure (an interrupt included) the temporary file is
    removed and ``path`` is left as it was; an ``OSError`` (a full disk, a read-only folder) is raised
    again naming ``path``. The temporary file is created by the caller's writer, so it gets the usual
    permissions.
    """
    temporary = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        publish(temporary, path, overwrite=overwrite, what=what, error=error)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_bytes_atomically(
    path: Path, data: bytes, *, overwrite: bool, what: str = "output", error: type[UserInputError] = UserInputError,
) -> Path:
    """``data`` into ``path`` in one write, all or nothing (see :func:`replaced_atomically`). Writers
    that serialise into memory first (``np.savez``, ``torch.save``) report a full disk as the OS's
    ``OSError`` this way, not as their own failure to close or seek a half-written file."""
    with replaced_atomically(path, overwrite=overwrite, what=what, error=error) as temporary:
        temporary.write_bytes(data)
    return path


@contextmanager
def staged_folder(folder: Path, *, overwrite: bool, what: str = "output") -> Iterator[Path]:
    """Yield an empty hidden folder inside ``folder`` for the caller to fill; on success each file in
    it is published (:func:`publish`) to the same relative path under ``folder``, then it is removed.

    So a set of files appears only once all are complete. On any failure (an error, an interrupt, a
    file that exists without ``overwrite``) the staging folder goes, and so does whatever this made
    under ``folder``: the files already published that were new, and the folders it created (files
    replaced with ``overwrite`` stay replaced). Errors name the destination, not the staging folder.
    """
    made: list[Path] = []  # files and folders this created under (and including) folder
    staging = _temporary_name(folder / "staging")
    try:
        made += _make_folders(folder)
        staging.mkdir()
        yield staging
        for temporary in sorted(p for p in staging.rglob("*") if not p.is_dir()):
            destination = folder / temporary.relative_to(staging)
            made += _make_folders(destination.parent)
            new = not (destination.exists() or destination.is_symlink())
            publish(temporary, destination, overwrite=overwrite, what=what)
            made += [destination] if new else []
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        for path in sorted(made, key=lambda p: len(p.parts), reverse=True):  # files, then folders inside out
            with suppress(OSError):  # a folder that holds others' files stays
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
        if isinstance(e, (OSError, UserInputError)):
            raise _renamed(e, staging, folder) from None
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those it created."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _renamed(error: OSError | UserInputError, staging: Path, folder: Path) -> Exception:
    """``error`` with the staging folder's paths as their destinations under ``folder``."""
    def rename(text: str) -> str:
        return text.replace(f"{staging}{os.sep}", f"{folder}{os.sep}")

    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or str(error), rename(str(error.filename or folder)))
    return type(error)(rename(str(error)))


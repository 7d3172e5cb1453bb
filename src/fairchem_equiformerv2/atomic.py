"""Replacing a file so that readers see the old file or the complete new one, never half of one."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success it is renamed over
    ``path``.

    The folder is created if needed. On any failure the temporary file is removed and ``path`` is
    left as it was. The temporary file is created by the caller's writer, so it gets the usual
    permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

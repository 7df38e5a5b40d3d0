"""Files that a crash never leaves half-written: the one atomic-write helper, and file digests.

Every file the engine and its tools write for later reading (checkpoints, metrics JSON, image grids,
reference-feature caches, data shards) goes through :func:`atomic_write`: the bytes go to a temporary
file beside the target, are flushed to the disk (fsync), renamed over the target, and the folder's
entry is flushed too, so after a power cut the path holds either the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to write a temporary file, then make it ``path`` atomically and durably.

    ``tmp`` lies in ``path``'s folder (named ``<name>.tmp``), so the final rename never crosses a
    file system; ``write`` must write the whole file to it (``torch.save``, ``Path.write_text``, a
    PIL save with an explicit ``format=``...). If ``write`` raises, the temporary file is removed and
    ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to the disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (names a network file in cache keys)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

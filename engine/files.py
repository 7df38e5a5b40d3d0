"""Files that a crash never leaves half-written: the one atomic-write helper, free space, and file digests.

Every file the engine and its tools write for later reading (checkpoints, metrics JSON, image grids,
reference-feature caches, data shards) goes through :func:`atomic_write`: the bytes go to a temporary
file beside the target, are flushed to the disk (fsync), renamed over the target, and the folder's
entry is flushed too, so after a power cut the path holds either the old file or the whole new one.
:func:`free_bytes` and :func:`out_of_space` tell a full disk from other failures of such a write.
"""

from __future__ import annotations

import contextlib
import errno
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


def free_bytes(folder: str | Path) -> int:
    """Bytes this process may still write on ``folder``'s file system (``statvfs``: available blocks × size)."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def out_of_space(error: BaseException, folder: str | Path, needed: int) -> OSError | None:
    """Why a failed write of about ``needed`` bytes into ``folder`` ran out of room, or None if it did not.

    A full disk (ENOSPC), a quota (EDQUOT) or the file size limit (EFBIG, ``ulimit -f``) in ``error``'s
    chain is the reason: torch's zip writer replaces the OS error by its own RuntimeError ("unexpected
    pos ..."), which keeps the OS error as its context. Without one, ``statvfs`` decides: a folder whose
    file system has less than ``needed`` bytes free could not have held the file.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return cause
        cause = cause.__cause__ or cause.__context__
    free = free_bytes(folder)
    if free < needed:
        return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free} bytes free, {needed} needed", str(folder))
    return None


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

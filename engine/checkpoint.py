"""Checkpoints: everything needed to sample, reconstruct or continue, written atomically."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gali.engine.config import Config, config_from_dict
from gali.engine.errors import GaliError

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus a format version) to ``path`` via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def latest_checkpoint(path: str | Path, *, log: Callable[[str], None] = print) -> tuple[Path, Config, dict[str, Any]]:
    """The checkpoint a resumed run continues from, read: ``path`` itself, or a run folder's newest readable one.

    In a folder, ``checkpoint-<images>.pt`` files are tried newest first; one that cannot be read
    (cut short by a full disk, say: the rename makes a crash mid-write leave only a ``.tmp``) is
    named through ``log`` and the one before it is taken.
    """
    path = Path(path)
    if path.is_file():
        return path, *load_checkpoint(path)
    if not path.is_dir():
        raise GaliError(f"resume: {path} does not exist; pass a run folder or one of its checkpoint-*.pt files")
    candidates = sorted(path.glob("checkpoint-*.pt"), reverse=True)  # zero-padded image counts sort in time order
    for candidate in candidates:
        try:
            return candidate, *load_checkpoint(candidate)
        except GaliError as exc:
            log(f"resume: skipping {candidate.name}: {exc}")
    what = "no readable checkpoint-*.pt" if candidates else "no checkpoint-*.pt"
    raise GaliError(f"resume: run folder {path} holds {what}; a run writes one every run.snapshot_kimg")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Config, dict[str, Any]]:
    """Read a checkpoint; returns its config and the raw state. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise GaliError(f"checkpoint {path} does not exist; pass a checkpoint-*.pt file from a run folder")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise GaliError(f"checkpoint {path} could not be read ({exc}); it may be truncated") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise GaliError(f"checkpoint {path} is not a gali checkpoint (format {FORMAT_VERSION})")
    return config_from_dict(state["config"], origin=str(path)), state

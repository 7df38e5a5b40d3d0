"""The FID/KID reference features of a split, cached in a file keyed by the data set, split, resolution, image count,
seed and the Inception network file's SHA-256 (``$GALI_CACHE/fid`` by default). Rank 0 alone reads and writes it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gali.engine.files import atomic_write
from gali.pipelines import cache_root, default_digits_root
from gali.pipelines.config import DataConfig


def default_cache_dir() -> Path:
    """``$GALI_CACHE/fid`` (``~/.cache/gali/fid`` by default), beside the digits' cache."""
    return cache_root() / "fid"


def dataset_identity(data: DataConfig) -> dict[str, Any]:
    """What names a data set in the reference cache key: its source, resolved root and backend."""
    if data.root:
        root = str(Path(data.root).expanduser().resolve())
    elif data.source == "digits":
        root = str(default_digits_root(data.resolution).resolve())
    else:
        root = None
    return {"source": data.source, "root": root, "backend": data.backend, "resolution": data.resolution}


class ReferenceCache:
    """The cache file of one key (see the module's docstring); ``log`` says what it did."""

    def __init__(self, key: dict[str, Any], folder: str | None, log: Callable[[str], None]) -> None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.key, self.log = key, log
        self.path = (Path(folder).expanduser() if folder else default_cache_dir()) / f"reference-{digest}.pt"

    def load(self) -> Tensor | None:
        """The cached features, or None where there are none, or they are unreadable or of another key."""
        path = self.path
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged cache file is rebuilt, not fatal
            self.log(f"reference cache {path} unreadable ({exc}); recomputing it")
            return None
        if not isinstance(stored, dict) or stored.get("key") != self.key:
            self.log(f"reference cache {path} has another key; recomputing it")
            return None
        self.log(f"reference features from cache {path}")
        return stored["features"]

    def store(self, features: Tensor) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: torch.save({"key": self.key, "features": features}, tmp))
        self.log(f"reference features of {len(features)} images cached in {self.path}")

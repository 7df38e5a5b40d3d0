"""The data section of the config (owned by gali.pipelines)."""

from __future__ import annotations

from dataclasses import dataclass

from gali.engine.errors import ConfigError

SOURCES = ("digits", "folder")
BACKENDS = ("torch", "synthetic")


@dataclass
class DataConfig:
    """Where images come from and how they are loaded.

    source:     'digits' (scikit-learn's handwritten digits, written once as PNG files into a cache
                folder with a held-out split) or 'folder' (an image-folder tree at ``root``).
    root:       the folder; for 'digits' the cache folder (default: $GALI_CACHE/digits-<res>,
                $GALI_CACHE defaulting to ~/.cache/gali); required for 'folder'.
    resolution: square side the images are resized/cropped to; must match the model's arch.
    backend:    'torch' (Pillow decode in DataLoader workers) or 'synthetic' (device-resident
                random batches, for benchmarks). 'dali' plugs into the same contract later.
    workers:    DataLoader worker processes for the torch backend.
    """

    source: str = "digits"
    root: str | None = None
    resolution: int = 32
    backend: str = "torch"
    workers: int = 2

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid key and the accepted values."""
        if self.source not in SOURCES:
            raise ConfigError("data.source", f"got {self.source!r}; accepted: {', '.join(SOURCES)}")
        if self.backend not in BACKENDS:
            raise ConfigError("data.backend", f"got {self.backend!r}; accepted: {', '.join(BACKENDS)}")
        if self.source == "folder" and not self.root:
            raise ConfigError("data.root", "source 'folder' needs data.root=/path/to/images")
        if self.resolution < 8:
            raise ConfigError("data.resolution", f"got {self.resolution}; must be an integer >= 8")
        if self.workers < 0:
            raise ConfigError("data.workers", f"got {self.workers}; must be >= 0")

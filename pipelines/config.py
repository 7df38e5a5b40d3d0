"""The data section of the config (owned by gali.pipelines)."""

from __future__ import annotations

from dataclasses import dataclass

from gali.engine.errors import ConfigError

SOURCES = ("digits", "folder", "filelist", "webdataset")
BACKENDS = ("torch", "dali", "synthetic", "auto")


@dataclass
class DataConfig:
    """Where images come from and how they are loaded.

    source:     'digits' (scikit-learn's handwritten digits, written once as PNG files into a cache
                folder with a held-out split), 'folder' (an image-folder tree: class folders give
                labels), 'filelist' (text files of '<path> <label>' lines, paths relative to the
                list's folder) or 'webdataset' (tar shards of '<key>.<jpg|png|...>' + '<key>.cls').
    root:       for 'digits' the cache folder (default: $GALI_CACHE/digits-<res>, $GALI_CACHE
                defaulting to ~/.cache/gali); required for the others. A root holding 'train' and
                'test' (folders; 'train.txt'/'test.txt' for filelist) gives the two splits; else the
                whole root is the training split.
    resolution: square side the images are resized/cropped to; must match the model's arch.
    backend:    'torch' (Pillow decode in DataLoader workers), 'dali' (NVIDIA DALI: nvJPEG decode
                on the GPU, DALI's CPU operators with no GPU) or 'synthetic' (device-resident random
                batches, for benchmarks), or 'auto': 'dali' where NVIDIA DALI is installed and the
                run is on a CUDA device, else 'torch' (the ImageNet presets).
    workers:    DataLoader worker processes (torch) or DALI CPU threads (dali).
    prefetch:   batches prepared ahead: DataLoader prefetch_factor (torch), queue depth (dali).
    augment:    training split only: random-resized crop and horizontal flip instead of the
                deterministic resize + center crop (GALI's paper uses none).

    The memory format of the batches is not a data setting: ``make_pipeline(..., channels_last=)``
    takes it from the step's ``compute.channels_last``.
    """

    source: str = "digits"
    root: str | None = None
    resolution: int = 32
    backend: str = "torch"
    workers: int = 2
    prefetch: int = 2
    augment: bool = False

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first invalid key and the accepted values."""
        if self.source not in SOURCES:
            raise ConfigError("data.source", f"got {self.source!r}; accepted: {', '.join(SOURCES)}")
        if self.backend not in BACKENDS:
            raise ConfigError("data.backend", f"got {self.backend!r}; accepted: {', '.join(BACKENDS)}")
        if self.source != "digits" and self.backend != "synthetic" and not self.root:  # synthetic reads nothing
            raise ConfigError("data.root", f"source '{self.source}' needs data.root=/path/to/data")
        if self.resolution < 8:
            raise ConfigError("data.resolution", f"got {self.resolution}; must be an integer >= 8")
        if self.workers < 0:
            raise ConfigError("data.workers", f"got {self.workers}; must be >= 0")
        if self.prefetch < 1:
            raise ConfigError("data.prefetch", f"got {self.prefetch}; must be >= 1")

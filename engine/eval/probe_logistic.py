"""probe-logistic: BigBiGAN's linear probe, top-1 and top-5 of a multinomial logistic regression on E's features.

The features are E's μ, with the pooled trunk features where E has them (BigBiGAN's ``avepool_feat``: the ResNet
encoders of :mod:`gali.engine.nets.biggan`). The training split's are extracted once over the ranks, each rank its
block of whole batches (:mod:`gali.engine.loop.ranks`), and cached as .npy shards that rank 0 memory-maps: a folder
``probe-logistic-<digest>`` beside the FID reference cache, its digest that of a key naming the data set, the
image count, seed and batch size, and the SHA-256 of E's weights as evaluated (moving averages or live, BatchNorm
statistics recomputed or not). Each rank writes its own shards, so the folder must be one that every rank sees.
Rank 0 writes ``manifest.json`` last, once every rank's shards are in: a folder without it is extracted again, one
whose manifest or shards are damaged is refused by name. The evaluation split's features are gathered like
``probe``'s; rank 0 fits on its device (:func:`gali.engine.metrics.logistic.logistic_probe`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gali.engine.errors import GaliError
from gali.engine.eval.context import EvalContext, SplitItem
from gali.engine.eval.metric import Metric, in_batch_order, refuse_train_split
from gali.engine.eval.reference_cache import dataset_identity, default_cache_dir
from gali.engine.files import atomic_write, write_text_atomic
from gali.engine.loop.ranks import progress, rank_block, read_block
from gali.engine.metrics.logistic import LOGISTIC_L2_GRID, logistic_probe, logistic_validation_size
from gali.engine.nets.biggan import ResNetEncoder

SHARD_ROWS = 1 << 16  # rows of one shard (rounded up to whole batches): 568 MB of float32 at 120 + 2048 features
FORMAT = 1


@torch.no_grad()
def probe_features(E: nn.Module, x: Tensor) -> Tensor:
    """(B, F) float32: μ_E(x), then the pooled trunk features where E has them."""
    if isinstance(E, ResNetEncoder):
        out, pooled = E.features(x)
        return torch.cat((out.chunk(2, dim=1)[0], pooled), dim=1).float()
    return E(x)[0].float()


def weights_sha256(network: nn.Module) -> str:
    """Hex SHA-256 of a network's state (names, shapes, dtypes and bytes of every parameter and buffer)."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    atomic_write(path, write)


class FeatureCache:
    """The shard folder of one key (see the module's docstring): shards ``features-<first row>.npy`` (float32,
    (rows, width)) and ``labels-<first row>.npy`` (int64), listed with the key in ``manifest.json``."""

    def __init__(self, key: dict[str, Any], folder: str | None) -> None:
        self.key = key
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = (Path(folder).expanduser() if folder else default_cache_dir()) / f"probe-logistic-{self.digest}"
        self.manifest = self.folder / "manifest.json"

    def damaged(self, path: Path, why: str) -> GaliError:
        return GaliError(
            f"probe-logistic's feature cache {path} (key {self.digest}) {why}; delete the folder {self.folder} and "
            "evaluate again to extract the training features anew"
        )

    def clear(self) -> None:
        """Remove what an interrupted extraction left, before the ranks write."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def write(self, start: int, features: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
        """One shard whose first row is row ``start`` of the split; returns (start, rows)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _save(self.folder / f"features-{start:010d}.npy", features.astype(np.float32, copy=False))
        _save(self.folder / f"labels-{start:010d}.npy", labels.astype(np.int64, copy=False))
        return start, len(labels)

    def commit(self, shards: list[tuple[int, int]], width: int) -> None:
        """Rank 0, once every rank's shards are written: the manifest, which makes the cache whole."""
        entry = {"key": self.key, "width": width, "shards": [list(shard) for shard in sorted(shards)]}
        write_text_atomic(self.manifest, json.dumps(entry, indent=1) + "\n")

    def load(self) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        """The shards memory-mapped, in row order, or None without a manifest; :class:`GaliError` naming the file
        for a manifest or a shard that is unreadable, of another key, or of the wrong shape or type."""
        if not self.manifest.is_file():
            return None
        try:
            entry = json.loads(self.manifest.read_text())
            width, shards = int(entry["width"]), [(int(s), int(n)) for s, n in entry["shards"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise self.damaged(self.manifest, f"is unreadable ({exc})") from exc
        if entry.get("key") != self.key:
            raise self.damaged(self.manifest, "holds another key")
        features, labels, row = [], [], 0
        for start, rows in shards:
            if start != row:
                raise self.damaged(self.manifest, f"lists a shard at row {start} where row {row} follows")
            features.append(self._shard(f"features-{start:010d}.npy", (rows, width), np.float32))
            labels.append(self._shard(f"labels-{start:010d}.npy", (rows,), np.int64))
            row += rows
        if row != self.key["images"]:
            raise self.damaged(self.manifest, f"lists {row} rows where the key says {self.key['images']} images")
        return features, labels

    def _shard(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        path = self.folder / name
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise self.damaged(path, f"is missing or unreadable ({exc}; every rank must see the folder)") from exc
        if array.shape != shape or array.dtype != dtype:
            raise self.damaged(
                path, f"holds {array.dtype} of shape {array.shape} where the manifest says {np.dtype(dtype)} {shape}"
            )
        return array


class ProbeLogistic(Metric):
    name = "probe-logistic"
    about = "BigBiGAN's linear probe: top-1 and top-5 accuracy (%) of a logistic regression on E's features"

    @classmethod
    def check(cls, options) -> None:
        refuse_train_split(cls.name, "fits its classifier", options)
        for option in ("probe_logistic_images", "probe_logistic_validation", "probe_logistic_epochs"):
            value = getattr(options, option)
            if value is not None and value < 1:
                raise GaliError(f"--{option.replace('_', '-')} must be >= 1; got {value}")

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        o = ctx.options
        self.train = ctx.batches("train", limit=o.probe_logistic_images)  # sized before any image is read
        logistic_validation_size(self.train.num_images, o.probe_logistic_validation)
        self.test: list[tuple[int, tuple[np.ndarray, np.ndarray]]] = []
        self.shards: list[tuple[int, int]] = []
        self.width = 0

    def start(self, images: int) -> None:
        """The training features: rank 0 looks for them in the cache (E's weights are final by now: BatchNorm
        statistics recomputed), every rank learns what it found, and on a miss each extracts its block."""
        ctx, o = self.ctx, self.ctx.options
        key = {
            "data": dataset_identity(ctx.data),
            "split": "train",
            "images": self.train.num_images,
            "seed": o.seed,
            "batch_size": o.batch_size,
            "encoder_sha256": weights_sha256(ctx.E),
            "features": self.features_name(),
            "format": FORMAT,
        }
        self.cache = FeatureCache(key, o.cache_dir)
        found, error = "miss", ""
        if ctx.world.is_main:
            try:
                found = "hit" if self.cache.load() is not None else "miss"
            except GaliError as exc:
                found, error = "damaged", str(exc)
            if found == "miss":
                self.cache.clear()
        found, error = ctx.world.broadcast((found, error))  # every rank decides alike, after rank 0 cleared
        if found == "damaged":
            raise GaliError(error)
        self.reused = found == "hit"
        if not self.reused:
            self.shards = self.extract()

    def extract(self) -> list[tuple[int, int]]:
        """This rank's block of the training split through E, in shards of ``SHARD_ROWS`` rows rounded up to whole
        batches (the block's last shard holds what is left)."""
        ctx = self.ctx
        block = rank_block(self.train.num_images, self.train.batch_size, ctx.world)
        held: list[tuple[np.ndarray, np.ndarray]] = []
        shards, first = [], block.start
        batches = progress(read_block(self.train, block), total=block.batches, what="train split", world=ctx.world)
        for _, start, batch in batches:
            if batch.labels is None:
                raise ctx.unlabelled(self.name, "train")
            if not held:
                first = start
            held.append((probe_features(ctx.E, batch.x).cpu().numpy(), batch.labels.cpu().numpy()))
            if sum(len(y) for _, y in held) >= SHARD_ROWS or start + len(batch.labels) == block.end:
                shards.append(self.cache.write(first, *(np.concatenate(part) for part in zip(*held, strict=True))))
                self.width, held = held[0][0].shape[1], []
        return shards

    def features_name(self) -> str:
        return "[mu, pooled trunk features] of E" if isinstance(self.ctx.E, ResNetEncoder) else "mu of E"

    def measure(self, item: SplitItem) -> None:
        labels = item.labels(self.ctx, self.name)
        self.test.append((item.index, (probe_features(self.ctx.E, item.batch.x).cpu().numpy(), labels.cpu().numpy())))

    def local(self) -> tuple[list[tuple[int, int]], int, list[tuple[int, tuple[np.ndarray, np.ndarray]]]]:
        return self.shards, self.width, self.test

    def combine(self, parts: list[Any]) -> dict[str, Any]:
        ctx, o = self.ctx, self.ctx.options
        if not self.reused:
            self.cache.commit([shard for part in parts for shard in part[0]], max(part[1] for part in parts))
        train_x, train_y = self.training_features()
        test_x, test_y = (np.concatenate(a) for a in zip(*in_batch_order([part[2] for part in parts]), strict=True))
        ctx.log(
            f"probe-logistic: {len(train_y)} training images ({'cached' if self.reused else 'extracted'} in "
            f"{self.cache.folder}), features of width {train_x.shape[1]}; fitting {len(LOGISTIC_L2_GRID)} L2 "
            f"weights × {o.probe_logistic_epochs} epochs on {ctx.device}"
        )
        result = logistic_probe(
            train_x,
            train_y,
            torch.from_numpy(test_x).to(ctx.device),
            torch.from_numpy(test_y).to(ctx.device),
            validation=o.probe_logistic_validation,
            l2_grid=LOGISTIC_L2_GRID,
            epochs=o.probe_logistic_epochs,
            seed=o.seed,
        )
        return {
            **result.to_dict(),
            **ctx.common(),
            "train_images": len(train_y),
            "features": self.features_name(),
            "width": train_x.shape[1],
            "cache": str(self.cache.folder),
            "cache_reused": self.reused,
        }

    def training_features(self) -> tuple[Tensor, Tensor]:
        """The cached training features and labels on the evaluation device, copied shard by shard."""
        loaded = self.cache.load()
        if loaded is None:
            raise self.cache.damaged(self.cache.manifest, "is missing")
        features, labels = loaded
        rows, device = sum(len(y) for y in labels), self.ctx.device
        x = torch.empty((rows, features[0].shape[1]), dtype=torch.float32, device=device)
        y = torch.empty(rows, dtype=torch.int64, device=device)
        start = 0
        for shard_x, shard_y in zip(features, labels, strict=True):
            x[start : start + len(shard_y)] = torch.from_numpy(np.array(shard_x))
            y[start : start + len(shard_y)] = torch.from_numpy(np.array(shard_y))
            start += len(shard_y)
        return x, y

    @staticmethod
    def cells(r: dict[str, Any]) -> tuple[str, str]:
        return (
            f"{100 * r['top1']:.2f} %",
            f"top-1; top-{r['top_k']} {100 * r['top5']:.2f} %; L2 {r['chosen_l2']:g} chosen on {r['validation']} "
            f"held-out of {r['train_images']} training images; {r['test']} {r['split']} images, {r['width']} features",
        )


METRIC = ProbeLogistic

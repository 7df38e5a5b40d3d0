"""The shape of one metric of ``gali eval``: what it needs, how it runs on a rank's slice, how the ranks combine.

A :class:`Part` takes part in the pass over the evaluation split: ``measure`` sees each batch of this rank's block
(``SplitItem``), ``local`` hands over what the rank measured (picklable: floats, numpy arrays, CPU tensors), and on
rank 0 ``combine`` receives every rank's ``local`` in rank order (= batch order) and makes the result. A
:class:`Metric` is a Part with a name, a line of help, its option checks, its JSON result and its table cells;
``shares`` names Parts that several metrics use (FID's and KID's Inception features), made once per evaluation
and combined before the metrics (``ctx.shared[PartClass]``). A new metric is a module defining ``METRIC``, named
in :data:`gali.engine.eval.registry.MODULES`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from gali.engine.errors import GaliError
from gali.engine.metrics import summarize
from gali.pipelines.masks import MaskArgs

if TYPE_CHECKING:
    from gali.engine.eval.context import EvalContext, SplitItem
    from gali.engine.eval.options import EvalOptions


class Part:
    """A participant of the pass over the evaluation split (see the module's docstring)."""

    # Images of the split it reads: math.inf every one, 0 none, n the first n (a property where it depends).
    split_images: float = math.inf

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx

    def masks(self) -> MaskArgs | None:
        """The per-sample masks it needs the pipeline to draw with each image, if any."""
        return None

    def start(self, images: int) -> None:
        """Called once the pass's length (images of the split, all ranks) is known, before the first batch."""

    def measure(self, item: SplitItem) -> None:
        """One evaluation batch of this rank's block."""

    def local(self) -> Any:
        """What this rank measured, for rank 0."""
        return None

    def combine(self, parts: list[Any]) -> Any:
        """Rank 0: every rank's ``local()``, in rank order, into the result."""
        return None


class Metric(Part):
    """One metric: ``combine`` returns its JSON object; ``cells`` its table row's (value, details)."""

    name: ClassVar[str]
    about: ClassVar[str]  # one line for ``gali eval --help``
    shares: ClassVar[tuple[type[Part], ...]] = ()

    @classmethod
    def check(cls, options: EvalOptions) -> None:
        """Refuse options this metric cannot run with, before any work, naming the option."""

    def combine(self, parts: list[Any]) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def cells(result: dict[str, Any]) -> tuple[str, str]:
        raise NotImplementedError


def in_batch_order(parts: list[list[tuple[int, Any]]]) -> list[Any]:
    """Every rank's (batch index, value) pairs as one list of values in batch order."""
    return [value for _, value in sorted((pair for part in parts for pair in part), key=lambda pair: pair[0])]


def refuse_train_split(name: str, fitted: str, options: EvalOptions) -> None:
    """A metric that fits on the training split must be tested on another one."""
    if options.split == "train":
        raise GaliError(
            f"metric {name!r} {fitted} on the training split and tests on --split; use --split test "
            f"(a held-out split) for it"
        )


def summary_cells(result: dict[str, Any]) -> tuple[str, str]:
    """The cells of a mean ± std over batches."""
    return (
        f"{result['mean']:.5f} ± {result['std']:.5f}",
        f"{result['n']} batches, {result['images']} {result['split']} images",
    )


class BatchMean(Metric):
    """A figure per evaluation batch (``value``), reported as its mean ± std over the batches (the paper's), and as
    ``image_mean``, the mean over the images (each batch weighted by its images: what a training snapshot logs,
    the two differ where the last batch is partial), with ``settings``."""

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self.values: list[tuple[int, tuple[float, int]]] = []

    def value(self, item: SplitItem) -> float:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        return {}

    def measure(self, item: SplitItem) -> None:
        self.values.append((item.index, (self.value(item), item.batch.x.shape[0])))

    def local(self) -> list[tuple[int, tuple[float, int]]]:
        return self.values

    def combine(self, parts: list[Any]) -> dict[str, Any]:
        values, images = zip(*in_batch_order(parts), strict=True)
        image_mean = sum(v * n for v, n in zip(values, images, strict=True)) / sum(images)
        summary = summarize(values).to_dict()
        return {**summary, "image_mean": image_mean, **self.ctx.common(), **self.settings()}

    cells = staticmethod(summary_cells)

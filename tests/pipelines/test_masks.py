"""Pipeline masks' Python reference (gali.pipelines.masks): the specification, its distribution against
mask_composite's samplers, per-sample determinism, the torch backend's masks and the config that asks for them.

Statistical tolerance: mean coverages over N masks are compared within 4 standard errors of their
difference (sqrt(var_a / N + var_b / N)): a false failure has probability below 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from gali.engine.errors import ConfigError
from gali.engine.loop.config import load_config
from gali.engine.nets.inference import evaluation_box_params
from gali.kernels.mask_composite import mask_composite_ref, sample_box_params, sample_stroke_params
from gali.pipelines import check_batch, make_pipeline
from gali.pipelines.config import DataConfig
from gali.pipelines.masks import MaskSpec, box_mask, draw_masks, stroke_mask

CPU = torch.device("cpu")
N = 3000


def kinds(box: float = 0.0, eval_box: float = 0.0, stroke: float = 0.0, **kwargs) -> MaskSpec:
    return MaskSpec(kind_weights=(box, eval_box, stroke), **kwargs)


def grids(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(h).reshape(-1, 1), np.arange(w).reshape(1, -1)


def coverage_of(masks: np.ndarray | torch.Tensor) -> np.ndarray:
    m = np.asarray(masks, dtype=np.float64)
    return m.reshape(m.shape[0], -1).mean(1)


def assert_same_mean(a: np.ndarray, b: np.ndarray) -> None:
    tolerance = 4 * np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= tolerance, (a.mean(), b.mean(), tolerance)


def image_index(x: torch.Tensor) -> int:
    """The index that the id_folder fixture's solid color encodes, from an image in [-1, 1]."""
    r, g = np.rint((x[:2, 0, 0].double().numpy() + 1.0) * 127.5).astype(int)
    return int(r + 256 * g)


def test_masks_are_binary_of_the_asked_shape_and_a_function_of_seed_sample_and_slot():
    args = kinds(1, 1, 1).args(3, 12, 10)
    masks = draw_masks([5, 9, 5], args)
    assert masks.shape == (3, 3, 12, 10) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert np.array_equal(masks[0], masks[2])  # the same sample, wherever it sits in the batch
    assert np.array_equal(draw_masks([9], args)[0], masks[1])
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[0, 0], masks[0, 1])  # slots are independent draws
    reseeded = draw_masks([5], kinds(1, 1, 1, seed=1).args(3, 12, 10))
    assert not np.array_equal(reseeded[0], masks[0])


def test_box_and_eval_box_distributions_match_the_step_samplers():
    for spec, sampler in ((kinds(box=1), dict(min_size=1)), (kinds(eval_box=1), "eval")):
        ours = coverage_of(draw_masks(range(N), spec.args(1, 32, 32))[:, 0])
        if sampler == "eval":
            params = evaluation_box_params(N, 32, seed=0)
        else:
            params = sample_box_params(N, 32, 32, generator=torch.Generator().manual_seed(0), **sampler)
        theirs = coverage_of(mask_composite_ref(torch.zeros(N, 1, 32, 32), params).mask)
        assert_same_mean(ours, theirs)
    sides = draw_masks(range(200), kinds(eval_box=1).args(1, 64, 64))[:, 0]
    heights = sides.any(2).sum(1)
    assert heights.min() >= 8 and heights.max() <= 54  # the evaluation boxes' 8..54 at 64²


def test_stroke_distribution_matches_the_step_sampler():
    ours = coverage_of(draw_masks(range(N), kinds(stroke=1, num_strokes=3, max_thickness=5).args(1, 24, 24))[:, 0])
    params = sample_stroke_params(N, 24, 24, num_strokes=3, max_thickness=5, generator=torch.Generator().manual_seed(0))
    theirs = coverage_of(mask_composite_ref(torch.zeros(N, 1, 24, 24), params, kind="stroke").mask)
    assert_same_mean(ours, theirs)


def test_stroke_pixels_are_mask_composites_and_strokes_are_connected_of_their_width():
    rows, cols = grids(20, 18)
    seeded = torch.Generator().manual_seed(1)
    params = sample_stroke_params(50, 20, 18, num_strokes=2, max_thickness=6, generator=seeded)
    for sample in params:
        strokes = [(int(x0), int(y0), int(x1), int(y1), int(2 * r)) for x0, y0, x1, y1, r in sample.tolist()]
        want = mask_composite_ref(torch.zeros(1, 1, 20, 18), sample[None], kind="stroke").mask[0, 0].bool().numpy()
        assert np.array_equal(stroke_mask(strokes, rows, cols), want)
        for stroke in strokes:  # one segment is one 8-connected piece
            assert scipy.ndimage.label(stroke_mask([stroke], rows, cols), structure=np.ones((3, 3)))[1] == 1
    for t, width in ((1, 1), (3, 3), (4, 5)):  # odd t: t pixels across; even t: t + 1 (radius t/2 reaches both rows)
        across = stroke_mask([(2, 9, 15, 9, t)], rows, cols)[:, 8]
        assert across.sum() == width


def test_coverage_limits_hold_with_retries_and_the_band_fallback():
    spec = kinds(1, 0, 1, min_coverage=0.2, max_coverage=0.5)
    args = spec.args(2, 16, 16)
    coverage = coverage_of(draw_masks(range(400), args).reshape(-1, 16, 16))
    assert coverage.min() >= 0.2 and coverage.max() <= 0.5
    # Boxes of at most 2×2 px never cover 20 %: every mask is the band of ceil(0.2·256 / 16) = 4 rows.
    band = draw_masks(range(20), kinds(1, box_max=2, min_coverage=0.2, max_tries=2).args(1, 16, 16))[:, 0]
    assert (band.sum((1, 2)) == 64).all() and (band.all(2).sum(1) == 4).all()
    assert len({int(b.argmax() // 16) for b in band}) > 1  # at different rows


def test_box_mask_is_the_half_open_rectangle():
    rows, cols = grids(5, 6)
    mask = box_mask(1, 2, 3, 2, rows, cols)
    assert mask.sum() == 6 and mask[1:4, 2:4].all()


@pytest.mark.parametrize(
    "spec,key",
    [
        (kinds(), "method.mask_kinds"),
        (kinds(box=1, box_max=40), "method.mask_max_size"),
        (kinds(stroke=1, num_strokes=17), "method.mask_strokes"),
        (kinds(box=1, min_coverage=0.6, max_coverage=0.5), "method.mask_min_coverage"),
        (kinds(box=1, max_tries=0), "method.mask_max_tries"),
    ],
)
def test_impossible_specs_name_their_key(spec, key):
    with pytest.raises(ConfigError, match=key):
        spec.args(1, 32, 32)


def test_torch_backend_masks_follow_the_sample_not_the_batch(id_folder):
    """The same image gets the same masks with another batch size, seed (order) or rank; masks meet the contract."""
    root = id_folder(n=24)
    args = kinds(1, 0, 1).args(2, 8, 8)
    cfg = DataConfig(source="folder", root=str(root), resolution=8, workers=0)
    want = draw_masks(range(24), args)  # image i of the folder is sample i of the split
    seen = set()
    for batch_size, seed, rank, world in ((4, 0, 0, 1), (6, 3, 0, 1), (3, 5, 1, 2)):
        pipe = make_pipeline(
            cfg, split="train", batch_size=batch_size, device=CPU, seed=seed, rank=rank, world_size=world, masks=args
        )
        for batch in pipe:
            check_batch(batch, batch_size=batch_size, resolution=8, device=CPU, num_masks=2)
            for x, masks in zip(batch.x, batch.masks, strict=True):
                index = image_index(x)
                assert np.array_equal(masks.numpy(), want[index])
                seen.add(index)
    assert seen == set(range(24))


def test_pipeline_masks_config(tmp_path):
    ok = load_config(
        "demo", ["method.tuples=gali-mix", "method.mask_source=pipeline", "method.mask_kinds=box:0.5,stroke:0.5"]
    )
    args = ok.method.pipeline_masks(4, 32, ok.run.seed)
    assert args.num_masks == 4 and args.kind_weights == (500_000, 0, 500_000)
    assert load_config("demo", ["method.tuples=gali-mix"]).method.pipeline_masks(4, 32, 0) is None
    bad = [
        (["method.mask_source=disk"], "method.mask_source"),
        (["method.mask_kinds=stroke"], "method.mask_kinds.*mask_source=pipeline"),
        (["method.mask_source=pipeline", "method.mask_kinds=circle"], "unknown kind 'circle'"),
        (["method.mask_source=pipeline", "method.mask_kinds=box:x"], "weight 'x' of 'box'"),
        (["method.mask_source=pipeline", "method.tuples=gali4"], "has no mask<n>/mix<n> slot"),
        (["method.mask_source=pipeline", "data.backend=synthetic"], "data.backend"),
        (["method.mask_source=pipeline", "data.source=webdataset", f"data.root={tmp_path}"], "data.source"),
        (["method.mask_source=pipeline", "method.mask_max_size=40"], "method.mask_max_size"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_config("demo", ["method.tuples=gali-mix", *overrides])

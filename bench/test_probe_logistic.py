"""Time of probe-logistic's classifier (``gali.engine.metrics.logistic``) on 20,000 synthetic feature vectors.

Run: ``pytest bench/test_probe_logistic.py --benchmark-json=FILE``; ids ``test_probe_logistic[<case>]``.
The vectors have BigBiGAN's width at the imagenet128 presets (d_z = 120 of μ + 2048 pooled ResNet-50 features) in
100 classes (Gaussian clusters of std 12 about unit-normal centres: about 60 % top-1). case: ``fit`` (one L2
weight, the default 30 epochs over the 18,000 rows left after holding out 2,000) and ``probe`` (the whole probe: the
5 weights of the grid, the held-out choice, top-1 and top-5 on 2,000 test vectors). ``extra_info`` has the time per
epoch and the rate of the two matmuls a minibatch costs (4·rows·width·classes FLOP an epoch).
"""

import pytest
import torch

from gali.engine.metrics.logistic import LOGISTIC_EPOCHS, fit_logistic, logistic_probe

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS, TEST, HELD_OUT, WIDTH, CLASSES = 20_000, 2_000, 2_000, 120 + 2048, 100


def _features(rows: int, seed: int, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (rows,), generator=generator)
    x = centres[labels] + 12.0 * torch.randn(rows, WIDTH, generator=generator)
    return x.to(DEVICE), labels.to(DEVICE)


@pytest.mark.parametrize("case", ["fit", "probe"])
def test_probe_logistic(benchmark, case: str) -> None:
    centres = torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(0))
    (x, y), (tx, ty) = _features(ROWS, 1, centres), _features(TEST, 2, centres)
    fitted = ROWS - HELD_OUT
    result = {}

    def run() -> None:
        if case == "fit":
            fit_logistic(x, y, torch.arange(fitted, device=DEVICE), classes=CLASSES, l2=1e-3)
        else:
            result["probe"] = logistic_probe(x, y, tx, ty, validation=HELD_OUT)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=2 if case == "fit" else 1, warmup_rounds=0, iterations=1)
    seconds = benchmark.stats.stats.median
    epochs = LOGISTIC_EPOCHS * (1 if case == "fit" else 5)
    benchmark.extra_info.update(
        {
            "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "rows_fitted": fitted,
            "width": WIDTH,
            "classes": CLASSES,
            "epochs": epochs,
            "s/epoch": seconds / epochs,
            "GFLOP/s (matmuls)": 4 * fitted * WIDTH * CLASSES * epochs / seconds / 1e9,
            **({"top1": result["probe"].top1, "top5": result["probe"].top5} if result else {}),
        }
    )

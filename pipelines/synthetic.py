"""The synthetic backend: random batches drawn on the device, for benchmarks.

No files, no host work, no host-to-device copies: each batch is drawn on the training device with
a device generator seeded from (seed, epoch, rank), so the data path costs one small kernel per
batch and the step's speed is measured alone. Labels are uniform over ``num_classes``. With
``channels_last`` the images are drawn straight into channels-last memory (an (B, R, R, 3) draw seen as
NCHW), so a channels-last step gets its layout without a copy, as from the file backends.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .contract import Batch, batches_per_rank, check_rank, check_start_batch

# Images per split, the sizes of CIFAR-10: the epoch length the synthetic backend pretends to have.
SPLIT_IMAGES = {"train": 50_000, "test": 10_000}


class SyntheticPipeline:
    """Device-resident random batches of the contract shape.

    An epoch has ``num_images // (batch_size * world_size)`` batches on each rank, like a split of
    ``num_images`` images sharded over ``world_size`` ranks; ranks draw different streams.
    ``channels_last`` delivers ``x`` in ``torch.channels_last`` memory format.
    """

    def __init__(
        self,
        *,
        num_images: int,
        resolution: int,
        batch_size: int,
        device: torch.device | str,
        seed: int,
        num_classes: int = 10,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if resolution < 1 or batch_size < 1 or num_classes < 1 or seed < 0:
            raise ValueError(
                "need resolution, batch_size, num_classes >= 1 and seed >= 0; got "
                f"{resolution}, {batch_size}, {num_classes}, {seed}"
            )
        check_rank(rank, world_size)
        if num_images // world_size < batch_size:
            raise ValueError(
                f"{num_images} synthetic images over {world_size} ranks give less than one batch of {batch_size}"
            )
        self.device = torch.device(device)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_images = num_images
        self.class_names = [str(c) for c in range(num_classes)]
        self._batches = batches_per_rank(num_images, batch_size, world_size)
        self._channels_last = channels_last
        self._seed = seed
        self._rank = rank
        self._epoch = 0
        self._start_batch = 0

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the random stream of the next iteration: it depends on (seed, epoch, rank) only.

        The next iteration starts at batch ``start_batch`` of that stream (the earlier ones are drawn
        and dropped, so the batches are those of an uninterrupted pass).
        """
        check_start_batch(start_batch, self._batches)
        self._epoch, self._start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[Batch]:
        state = np.random.SeedSequence([self._seed, self._epoch, self._rank]).generate_state(1, np.uint64)
        generator = torch.Generator(device=self.device).manual_seed(int(state[0] >> np.uint64(1)))
        b, r = self.batch_size, self.resolution
        for i in range(self._batches):
            if self._channels_last:
                x = torch.rand((b, r, r, 3), generator=generator, device=self.device).permute(0, 3, 1, 2)
            else:
                x = torch.rand((b, 3, r, r), generator=generator, device=self.device)
            x = x.mul_(2.0).sub_(1.0)
            labels = torch.randint(len(self.class_names), (self.batch_size,), generator=generator, device=self.device)
            if i >= self._start_batch:
                yield Batch(x=x, labels=labels)

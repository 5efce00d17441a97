"""Per-channel mean and standard deviation of a data set, exactly, in one streaming parallel pass.

Pixels are uint8, so per-image sums and sums of squares are exact integers; adding them up in any order
(workers finish in any order) gives the same totals as stacking every pixel of every image into one tensor.
Memory stays at one image per worker. An image that cannot be read (missing, undecodable, over the pixel limit) is
skipped and counted, never replaced by another image: a substitute would be counted twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from trainer import storage
from trainer.data.coco_index import DataError
from trainer.data.dataset import CocoDetection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelStats:
    images: int
    pixels: int
    mean: tuple[float, float, float]  # in [0, 1], like the model's image_mean
    std: tuple[float, float, float]
    skipped: tuple[str, ...] = ()  # images that could not be read: not counted

    def as_yaml(self) -> str:
        def fmt(values: tuple[float, ...]) -> str:
            return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"

        return f"data:\n  mean: {fmt(self.mean)}\n  std: {fmt(self.std)}\n"


Sums = tuple[int, torch.Tensor, torch.Tensor, str, str]


class _ImageSums(Dataset[Sums]):
    """(pixel count, per-channel sum, per-channel sum of squares, uri, "") of each image, as int64; an
    unreadable image gives (0, zeros, zeros, uri, why)."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sums:
        uri = self.dataset.uri(index)
        try:
            image = self.dataset.read_image(index).to(torch.int64).flatten(1)
        except (DataError, storage.StorageError) as exc:
            zeros = torch.zeros(3, dtype=torch.int64)
            return 0, zeros, zeros, uri, str(exc)[:300]
        return image.shape[1], image.sum(dim=1), (image * image).sum(dim=1), uri, ""


def channel_stats(dataset: CocoDetection, workers: int = 2) -> ChannelStats:
    """Exact statistics over every pixel of every image (the dataset must not augment or convert images)."""
    loader = DataLoader(_ImageSums(dataset), batch_size=None, num_workers=workers)
    pixels = 0
    total = torch.zeros(3, dtype=torch.int64)
    squares = torch.zeros(3, dtype=torch.int64)
    skipped: list[str] = []
    for count, sums, sq, uri, problem in loader:
        if problem:
            log.warning("skipping unreadable image %s (%s); not counted", uri, problem)
            skipped.append(uri)
            continue
        pixels += int(count)
        total += sums
        squares += sq
    if not pixels:
        raise DataError(f"{dataset.index.uri}: none of the {len(dataset)} images could be read")
    # Exact rational arithmetic on the integer totals, converted to float once at the end.
    means, stds = [], []
    for s, q in zip(total.tolist(), squares.tolist(), strict=True):
        mean = s / pixels
        variance = (q * pixels - s * s) / (pixels * pixels)
        means.append(mean / 255)
        stds.append(max(variance, 0.0) ** 0.5 / 255)
    return ChannelStats(len(dataset) - len(skipped), pixels, tuple(means), tuple(stds),
                        tuple(skipped))

"""Per-channel mean and standard deviation of a data set, exactly, in one streaming parallel pass.

Pixels are uint8, so per-image sums and sums of squares are exact integers; adding them up in any order
(workers finish in any order) gives the same totals as stacking every pixel of every image into one tensor.
Memory stays at one image per worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from trainer.data.dataset import CocoDetection


@dataclass(frozen=True)
class ChannelStats:
    images: int
    pixels: int
    mean: tuple[float, float, float]  # in [0, 1], like the model's image_mean
    std: tuple[float, float, float]

    def as_yaml(self) -> str:
        def fmt(values: tuple[float, ...]) -> str:
            return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"

        return f"data:\n  mean: {fmt(self.mean)}\n  std: {fmt(self.std)}\n"


class _ImageSums(Dataset[tuple[int, torch.Tensor, torch.Tensor]]):
    """(pixel count, per-channel sum, per-channel sum of squares) of each image, as int64."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        image = self.dataset[index][0].as_subclass(torch.Tensor).to(torch.int64).flatten(1)
        return image.shape[1], image.sum(dim=1), (image * image).sum(dim=1)


def channel_stats(dataset: CocoDetection, workers: int = 2) -> ChannelStats:
    """Exact statistics over every pixel of every image (the dataset must not augment or convert images)."""
    loader = DataLoader(_ImageSums(dataset), batch_size=None, num_workers=workers)
    pixels = 0
    total = torch.zeros(3, dtype=torch.int64)
    squares = torch.zeros(3, dtype=torch.int64)
    for count, sums, sq in loader:
        pixels += int(count)
        total += sums
        squares += sq
    # Exact rational arithmetic on the integer totals, converted to float once at the end.
    means, stds = [], []
    for s, q in zip(total.tolist(), squares.tolist(), strict=True):
        mean = s / pixels
        variance = (q * pixels - s * s) / (pixels * pixels)
        means.append(mean / 255)
        stds.append(max(variance, 0.0) ** 0.5 / 255)
    return ChannelStats(len(dataset), pixels, tuple(means), tuple(stds))  # type: ignore[arg-type]

"""Grids of training samples with their boxes and class names drawn, after augmentation, to check it by eye."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, make_grid

from trainer import storage
from trainer.data.dataset import CocoDetection

_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
            "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def _cell(image: torch.Tensor, target: dict, names: Sequence[str], size: int) -> torch.Tensor:
    """One sample resized (with its boxes) to fit a size x size cell, padded, boxes and names drawn."""
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    image = tv_tensors.Image(image)
    boxes = target["boxes"]
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
    image, boxes = F.resize(image, new_size, antialias=True), F.resize(boxes, new_size)
    image = F.pad(image, [0, 0, size - new_size[1], size - new_size[0]], fill=0)
    labels = target["labels"].tolist()
    captions = [names[label - 1] if 0 < label <= len(names) else str(label) for label in labels]
    colours = [_COLOURS[(label - 1) % len(_COLOURS)] for label in labels]
    return draw_bounding_boxes(image.as_subclass(torch.Tensor), boxes.as_subclass(torch.Tensor), labels=captions,
                               colors=colours, width=2)


def render_grids(dataset: CocoDetection, out: str, count: int = 16, per_grid: int = 16, epoch: int = 0,
                 cell: int = 320) -> list[str]:
    """Write ``ceil(count / per_grid)`` PNG grids of samples 0..count-1 under ``out``; returns their URIs."""
    names = dataset.index.category_names
    written = []
    count = min(count, len(dataset))
    for start in range(0, count, per_grid):
        cells = []
        for index in range(start, min(start + per_grid, count)):
            image, target, _ = dataset[(epoch, index)]
            cells.append(_cell(image.as_subclass(torch.Tensor), target, names, cell))
        grid = make_grid(cells, nrow=max(1, round(len(cells) ** 0.5)), padding=4, pad_value=255)
        buffer = io.BytesIO()
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        uri = storage.join(out, f"samples_epoch{epoch}_{start // per_grid:03d}.png")
        storage.write_bytes(uri, buffer.getvalue())
        written.append(uri)
    return written

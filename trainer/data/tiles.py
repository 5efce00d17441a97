"""Training on overlapping tiles of large images, for small objects (aerial, microscopy, documents).

Each image becomes a grid of ``size``-pixel tiles that overlap by ``overlap`` pixels (the last row and column are
shifted back to end at the border). A box is kept in a tile when at least ``min_visibility`` of its area lies
inside the tile; the crop itself is done by torchvision's box-aware v2 crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import box_area
from torchvision.transforms.v2 import functional as F

Tile = tuple[int, int, int, int]  # left, top, right, bottom in pixels


@dataclass(frozen=True)
class TileSpec:
    size: int = 640
    overlap: int = 128
    min_visibility: float = 0.5

    def __post_init__(self) -> None:
        if self.size <= 0 or not 0 <= self.overlap < self.size:
            raise ValueError(f"tiles need size > 0 and 0 <= overlap < size (got size={self.size}, "
                             f"overlap={self.overlap})")
        if not 0 < self.min_visibility <= 1:
            raise ValueError(f"tiles.min_visibility must be in (0, 1], got {self.min_visibility}")


def _starts(length: int, size: int, step: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def plan_tiles(width: int, height: int, spec: TileSpec) -> list[Tile]:
    step = spec.size - spec.overlap
    return [(x, y, min(x + spec.size, width), min(y + spec.size, height))
            for y in _starts(height, spec.size, step) for x in _starts(width, spec.size, step)]


def visible_fraction(boxes: np.ndarray, tile: Tile) -> np.ndarray:
    """Fraction of each XYXY box's area inside the tile (0 for degenerate boxes)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.float32)
    left, top, right, bottom = tile
    w = np.clip(np.minimum(boxes[:, 2], right) - np.maximum(boxes[:, 0], left), 0, None)
    h = np.clip(np.minimum(boxes[:, 3], bottom) - np.maximum(boxes[:, 1], top), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.where(area > 0, w * h / np.maximum(area, 1e-12), 0.0)


def crop_to_tile(image: torch.Tensor, target: dict, tile: Tile, min_visibility: float) -> tuple[torch.Tensor, dict]:
    """The tile's pixels and the boxes at least ``min_visibility`` inside it, clipped to it."""
    left, top, right, bottom = tile
    boxes: tv_tensors.BoundingBoxes = target["boxes"]
    cropped_image = F.crop(image, top, left, bottom - top, right - left)
    cropped = F.crop(boxes, top, left, bottom - top, right - left)
    clamped = F.clamp_bounding_boxes(cropped)
    full_area = box_area(boxes.as_subclass(torch.Tensor))
    kept_area = box_area(clamped.as_subclass(torch.Tensor))
    keep = (full_area > 0) & (kept_area >= min_visibility * full_area)
    out = dict(target)
    out["boxes"] = tv_tensors.wrap(clamped[keep], like=clamped)
    out["labels"] = target["labels"][keep]
    out["tile"] = tile
    return cropped_image, out

"""Detections drawn on images (``trainer predict`` pictures, ``trainer show``): one colour per class name,
the same in every run, captions that stay readable on any box colour.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence

import torch
from torchvision.io import encode_png as _tv_encode_png
from torchvision.utils import draw_bounding_boxes

# Bright, mutually distinct colours (tab10 without its grey, plus a few) so boxes stand out on photos.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 215, 0), (0, 255, 127), (255, 0, 255),
)


def label_color(label: str) -> tuple[int, int, int]:
    """A colour fixed by the label text (crc32, not ``hash``: that is salted per process), same in every run."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light caption backgrounds, white on dark ones."""
    red, green, blue = color
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def _as_rgb_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected a CHW image with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        if not image.is_floating_point():
            raise ValueError(f"expected a uint8 or float image, got {image.dtype}")
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.detach().cpu()
    if image.shape[0] == 1:
        return image.expand(3, -1, -1).clone()
    return image[:3].clone()


def _clamped_boxes(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes clamped into the image, and a mask of those with area left (wholly outside → not drawn)."""
    boxes = boxes.detach().cpu().to(torch.float32).reshape(-1, 4)
    finite = torch.isfinite(boxes).all(dim=1)
    boxes = torch.nan_to_num(boxes)
    if ((boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])).any():
        raise ValueError("boxes must be (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2")
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    visible = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, visible


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: Sequence[str],
                    scores: Sequence[float] | None = None, width: int = 2) -> torch.Tensor:
    """A new uint8 RGB CHW image with xyxy pixel boxes and 'label 0.87' captions, one colour per label name.

    Boxes are clamped to the image; boxes wholly outside it are not drawn. Grayscale input comes back as RGB.
    """
    rgb = _as_rgb_uint8(image)
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        if boxes.numel() == 0:
            return rgb
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if len(labels) != boxes.shape[0] or (scores is not None and len(scores) != boxes.shape[0]):
        raise ValueError(f"{boxes.shape[0]} boxes but {len(labels)} labels"
                         + ("" if scores is None else f" and {len(scores)} scores"))
    clamped, visible = _clamped_boxes(boxes, rgb.shape[1], rgb.shape[2])
    keep = [int(i) for i in torch.nonzero(visible).flatten()]
    if not keep:
        return rgb
    names = [str(labels[i]) for i in keep]
    captions = names if scores is None else [f"{labels[i]} {float(scores[i]):.2f}" for i in keep]
    colors = [label_color(name) for name in names]
    return draw_bounding_boxes(rgb, clamped[keep], captions, colors=colors, width=width, fill_labels=True,
                               label_colors=[_text_color(color) for color in colors])


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 CHW (1 or 3 channels) → PNG bytes."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates torchvision.io in favour of TorchCodec; the encoder itself still works.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        encoded = _tv_encode_png(image.detach().cpu().contiguous())
    return encoded.numpy().tobytes()

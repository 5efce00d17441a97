"""Augmentation presets built only from torchvision.transforms.v2 (box-aware; no hand-written geometry).

Every preset ends with ``SanitizeBoundingBoxes`` (drops boxes that became degenerate, with their labels). Images
stay uint8 by default: they cross from loader workers to the trainer 4x smaller than float32, and the training
step converts them on the device (``to_float=True`` converts here instead, as torchvision's references do).
Normalisation is left to the detector's own transform unless mean/std are given.
Randomness comes from torch's global generator, which the dataset re-seeds per sample from
(seed, epoch, sample index), so a sample is augmented the same way in any worker and after any restart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainer.config import AUGMENT_PRESETS as PRESETS  # one list of preset names, shared with the config


def build_transforms(preset: str, train: bool = True, *, lsj_size: int = 1024,
                     multiscale_sizes: Sequence[int] = tuple(range(480, 801, 32)), max_size: int = 1333,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     to_float: bool = False) -> v2.Compose:
    """The v2 pipeline for a preset; evaluation (``train=False``) never augments."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    steps: list[v2.Transform] = []
    if train and preset == "hflip":
        steps += [v2.RandomHorizontalFlip(p=0.5)]
    elif train and preset == "multiscale":
        steps += [v2.RandomShortestSize(min_size=list(multiscale_sizes), max_size=max_size),
                  v2.RandomHorizontalFlip(p=0.5)]
    elif train and preset == "lsj":
        steps += [v2.ScaleJitter(target_size=(lsj_size, lsj_size), scale_range=(0.1, 2.0)),
                  v2.RandomCrop((lsj_size, lsj_size), pad_if_needed=True, fill=0),
                  v2.RandomHorizontalFlip(p=0.5)]
    elif train and preset == "ssd":
        steps += [v2.RandomPhotometricDistort(p=1.0),
                  v2.RandomZoomOut(fill={tv_tensors.Image: (124, 116, 104), "others": 0}),  # ImageNet mean
                  v2.RandomIoUCrop(),
                  v2.RandomHorizontalFlip(p=0.5)]
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    if to_float or (mean is not None and std is not None):
        steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None and std is not None:
        steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(steps)

"""The registry of torchvision detectors: build one by name, load its starting weights, freeze parameters.

Models are always constructed with ``weights=None, weights_backbone=None``: this module never downloads
anything. Pretrained weights come from ``model.weights`` (a local path, ``s3://``, ``https://`` or a torchvision
weights name found in the torch hub cache) and are read with ``torch.load(weights_only=True)`` only, so a
checkpoint cannot run code.

Building from scratch and then loading weights would lose two things torchvision does when it builds a
pretrained model, so we redo them here, and a config behaves as the torchvision documentation says:

* ``trainable_backbone_layers`` is honoured with or without weights (torchvision ignores it from scratch): we
  freeze backbone stages by parameter name (see ``backbone_stages``; a unit test checks the names against
  torchvision's own freezing for every family and every value). ``null`` means torchvision's default: the
  whole backbone trains from scratch; with weights, the last 3 stages of ResNet/MobileNet FPN models, 4 of
  VGG (SSD300) and all 6 of SSDlite train.
* with weights, the models torchvision builds with ``FrozenBatchNorm2d`` when pretrained (Faster R-CNN
  ResNet50 and MobileNetV3 FPN, RetinaNet and FCOS v1) get the same frozen batch norm in the backbone, as their
  COCO weights were trained with it and detection batches are too small to train batch norm. The v2 models,
  SSD300 and SSDlite keep trainable batch norm, as in torchvision.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.misc import FrozenBatchNorm2d

from trainer.config import SUPPORTED_MODELS, ModelConfig
from trainer.errors import InputError
from trainer.weights import load_weights

log = logging.getLogger(__name__)

# Stages a backbone family has (the range of trainable_backbone_layers is 0..this).
FAMILY_STAGES = {"resnet": 5, "mobilenet": 6, "vgg": 5, "ssdlite": 6}


@dataclass(frozen=True)
class ModelSpec:
    """How to build one detector and what torchvision does for it when it is pretrained."""

    builder: Callable[..., nn.Module]
    family: str  # backbone family: resnet | mobilenet | vgg | ssdlite
    uses_size: bool  # the transform honours min_size/max_size (SSD models resize to a fixed size)
    frozen_bn_with_weights: bool  # torchvision uses FrozenBatchNorm2d in the backbone when pretrained
    trainable_with_weights: int  # torchvision's default trainable_backbone_layers when pretrained


REGISTRY: dict[str, ModelSpec] = {
    "fasterrcnn_resnet50_fpn": ModelSpec(detection.fasterrcnn_resnet50_fpn, "resnet", True, True, 3),
    "fasterrcnn_resnet50_fpn_v2": ModelSpec(detection.fasterrcnn_resnet50_fpn_v2, "resnet", True, False, 3),
    "fasterrcnn_mobilenet_v3_large_fpn": ModelSpec(
        detection.fasterrcnn_mobilenet_v3_large_fpn, "mobilenet", True, True, 3),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ModelSpec(
        detection.fasterrcnn_mobilenet_v3_large_320_fpn, "mobilenet", True, True, 3),
    "retinanet_resnet50_fpn": ModelSpec(detection.retinanet_resnet50_fpn, "resnet", True, True, 3),
    "retinanet_resnet50_fpn_v2": ModelSpec(detection.retinanet_resnet50_fpn_v2, "resnet", True, False, 3),
    "fcos_resnet50_fpn": ModelSpec(detection.fcos_resnet50_fpn, "resnet", True, True, 3),
    "ssd300_vgg16": ModelSpec(detection.ssd300_vgg16, "vgg", False, False, 4),
    "ssdlite320_mobilenet_v3_large": ModelSpec(detection.ssdlite320_mobilenet_v3_large, "ssdlite", False, False, 6),
}
# One source of truth for model names: the config validates against SUPPORTED_MODELS, we build from REGISTRY.
if set(REGISTRY) != set(SUPPORTED_MODELS) or len(REGISTRY) != len(SUPPORTED_MODELS):
    raise RuntimeError(f"trainer.models.REGISTRY {sorted(REGISTRY)} differs from SUPPORTED_MODELS "
                       f"{sorted(SUPPORTED_MODELS)}")


# ------------------------------------------------------------------------------------------- building
def build_model(config: ModelConfig, num_classes: int) -> nn.Module:
    """The detector ``config.name`` with ``num_classes`` outputs (background included, as torchvision counts).

    Order: build from scratch, apply the freezing options (config mistakes fail before any download), then
    load ``config.weights`` if given.
    """
    spec = _spec(config.name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"num_classes must be at least 2 (background + one class), got {num_classes!r}")
    trainable_layers = resolve_trainable_layers(config)

    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if spec.uses_size:
        kwargs.update(min_size=config.min_size, max_size=config.max_size)
    else:
        side = 300 if spec.family == "vgg" else 320
        log.info("%s resizes every image to %dx%d (fixed by the architecture); model.min_size=%d and "
                 "model.max_size=%d are ignored", config.name, side, side, config.min_size, config.max_size)
    kwargs.update(detector_options(config))
    model = spec.builder(**kwargs)
    if config.anchor_sizes is not None or config.aspect_ratios is not None:
        set_anchors(model, config)

    if config.weights and spec.frozen_bn_with_weights:
        converted = freeze_batchnorm(model.backbone.body)  # type: ignore[union-attr,arg-type]
        log.debug("%s: %d backbone batch-norm layers frozen (as torchvision does for pretrained models)",
                  config.name, converted)
    frozen_stages = freeze_backbone_layers(model, config.name, trainable_layers)
    if frozen_stages and not config.weights:
        log.warning("%s: model.trainable_backbone_layers=%d freezes %d backbone stages but no weights are "
                    "loaded, so they keep their random initial values", config.name, trainable_layers, frozen_stages)
    freeze(model, config.freeze, model_name=config.name)
    if config.weights:
        load_weights(model, config.weights, model_name=config.name)

    trainable, total = count_parameters(model)
    tensors = list(model.parameters())
    log.info("%s: %d of %d parameters (%.1f M of %.1f M values) train", config.name,
             sum(p.requires_grad for p in tensors), len(tensors), trainable / 1e6, total / 1e6)
    return model


def detector_options(config: ModelConfig) -> dict[str, Any]:
    """``model.options`` checked against the numeric keyword arguments of the detector class.

    torchvision's builders pass unknown keywords on to the class, which would fail with a TypeError deep inside;
    checking names here gives one line with the closest valid name instead.
    """
    if not config.options:
        return {}
    detector_class = next(cls for prefix, cls in _DETECTOR_CLASSES.items() if config.name.startswith(prefix))
    valid = sorted(name for name, parameter in inspect.signature(detector_class.__init__).parameters.items()
                   if type(parameter.default) in (int, float) and name not in ("min_size", "max_size", "size"))
    for name, value in config.options.items():
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(valid)}"
            raise InputError(f"model.options.{name}: not an option of {config.name} ({hint})")
        if isinstance(value, bool) or (value < 0):
            raise InputError(f"model.options.{name}: expected a number >= 0, got {value!r}")
    return dict(config.options)


_DETECTOR_CLASSES: dict[str, type[nn.Module]] = {"fasterrcnn": detection.FasterRCNN, "retinanet": detection.RetinaNet,
                                                 "fcos": detection.FCOS, "ssd": detection.ssd.SSD}


def set_anchors(model: nn.Module, config: ModelConfig) -> None:
    """Replace the anchor generator of a Faster R-CNN or RetinaNet; a head whose anchor count changes is rebuilt.

    Sizes are per feature level (the model's level count must match); unset parts keep torchvision's defaults.
    """
    if isinstance(model, detection.FasterRCNN):
        old: AnchorGenerator = model.rpn.anchor_generator
    elif isinstance(model, detection.RetinaNet):
        old = model.anchor_generator
    else:
        raise InputError(f"model.anchor_sizes/aspect_ratios: {config.name} has no configurable anchors "
                         "(supported: Faster R-CNN and RetinaNet models)")
    levels = len(old.sizes)
    sizes = tuple(tuple(level) for level in config.anchor_sizes) if config.anchor_sizes else old.sizes
    if len(sizes) != levels:
        raise InputError(f"model.anchor_sizes: {config.name} has {levels} feature levels, got sizes for "
                         f"{len(sizes)}; give one list of sizes per level")
    ratios = ((tuple(config.aspect_ratios),) * levels if config.aspect_ratios else old.aspect_ratios)
    generator = AnchorGenerator(sizes, ratios)
    per_location = generator.num_anchors_per_location()
    if len(set(per_location)) != 1:
        raise InputError("model.anchor_sizes: every level needs the same number of sizes (the head is shared)")
    changed = per_location[0] != old.num_anchors_per_location()[0]
    if isinstance(model, detection.FasterRCNN):
        model.rpn.anchor_generator = generator
        if changed:
            head = model.rpn.head
            model.rpn.head = RPNHead(head.cls_logits.in_channels, per_location[0], conv_depth=len(head.conv))
    else:
        model.anchor_generator = generator
        if changed:
            if config.name.endswith("_v2"):
                raise InputError(f"model.anchor_sizes: {config.name} keeps {old.num_anchors_per_location()[0]} "
                                 "anchors per location (its GroupNorm head is not rebuilt); change sizes, not counts")
            model.head = RetinaNetHead(model.backbone.out_channels, per_location[0],
                                       model.head.classification_head.num_classes)


def _spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"model.name: unknown model {name!r}; choose one of {', '.join(REGISTRY)}") from None


def resolve_trainable_layers(config: ModelConfig) -> int:
    """How many backbone stages train: the configured value (validated), or torchvision's default."""
    spec = _spec(config.name)
    top = FAMILY_STAGES[spec.family]
    value = config.trainable_backbone_layers
    if value is None:
        return spec.trainable_with_weights if config.weights else top
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise InputError(f"model.trainable_backbone_layers: {value!r} is out of range for {config.name}, whose "
                         f"{spec.family} backbone has {top} stages: use 0 (all frozen) to {top} (all trainable)")
    return value


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter values, to log and to check what freezing did."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


# ------------------------------------------------------------------------------------------- freezing
def backbone_stages(model: nn.Module, model_name: str) -> list[list[str]]:
    """Parameter-name prefixes of each backbone stage, input side first, as torchvision's extractors count them.

    ``trainable_backbone_layers = k`` trains the last ``k`` stages and freezes the others (FPN, extra layers and
    heads always train). Per family:

    * ResNet (Faster R-CNN, RetinaNet, FCOS): ``backbone.body.{conv1,bn1}``, then ``backbone.body.layer1`` ..
      ``layer4`` (5 stages).
    * MobileNetV3 FPN: ``backbone.body.<i>`` are the MobileNet feature blocks; a stage starts at block 0, at
      each strided block (torchvision marks them ``_is_cn``) and at the last block: 0-1, 2-3, 4-6, 7-12, 13-15,
      16 (6 stages).
    * VGG16 (SSD300): a stage ends at each max-pool: ``backbone.features.<0-3>``, ``<4-8>``, ``<9-15>``,
      ``<16-22>``, and conv5, which SSD moved to ``backbone.extra.0.<0-6>`` (5 stages; the new fc6/fc7 in
      ``backbone.extra.0.7`` are not part of the backbone).
    * SSDlite MobileNetV3: like MobileNet FPN, but SSDlite splits the features at block 13 (C4):
      ``backbone.features.0.<0-12>`` are blocks 0-12, ``backbone.features.0.13`` plus ``backbone.features.1.0``
      are block 13, ``backbone.features.1.<1-3>`` are blocks 14-16 (6 stages).
    """
    family = _spec(model_name).family
    backbone: Any = model.backbone
    if family == "resnet":
        return [["backbone.body.conv1.", "backbone.body.bn1."]] + [[f"backbone.body.layer{i}."] for i in range(1, 5)]
    if family == "mobilenet":
        blocks = list(backbone.body.named_children())
        starts = [0] + [i for i, (_, b) in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        ends = starts[1:] + [len(blocks)]
        return [[f"backbone.body.{blocks[i][0]}." for i in range(s, e)] for s, e in zip(starts, ends, strict=True)]
    if family == "vgg":
        features = backbone.features
        starts = [0] + [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)] + [len(features)]
        stages = [[f"backbone.features.{i}." for i in range(s, e)] for s, e in itertools.pairwise(starts)]
        conv5 = len(backbone.extra[0]) - 1  # pool4, conv5_1..conv5_3 with their ReLUs, then the fc6/fc7 block
        return stages + [[f"backbone.extra.0.{j}." for j in range(conv5)]]
    if family == "ssdlite":
        head, tail = backbone.features[0], backbone.features[1]
        c4 = len(head) - 1  # the first half holds blocks 0..c4-1 and the expansion of block c4

        def prefixes(i: int) -> list[str]:
            if i < c4:
                return [f"backbone.features.0.{i}."]
            if i == c4:
                return [f"backbone.features.0.{c4}.", "backbone.features.1.0."]
            return [f"backbone.features.1.{i - c4}."]

        last = c4 + len(tail) - 1
        starts = [0] + [i for i in range(c4) if getattr(head[i], "_is_cn", False)] + [c4, last]
        ends = starts[1:] + [last + 1]
        return [[p for i in range(s, e) for p in prefixes(i)] for s, e in zip(starts, ends, strict=True)]
    raise AssertionError(f"unknown backbone family {family}")


def freeze_backbone_layers(model: nn.Module, model_name: str, trainable_layers: int) -> int:
    """Freeze all backbone stages but the last ``trainable_layers``; returns how many stages were frozen.

    torchvision applies ``trainable_backbone_layers`` only when it loads backbone weights itself; doing it by
    name here makes the option work the same way with weights from a URI and from scratch.
    """
    stages = backbone_stages(model, model_name)
    if not 0 <= trainable_layers <= len(stages):
        raise InputError(f"model.trainable_backbone_layers: {trainable_layers} is out of range for {model_name}: "
                         f"use 0 to {len(stages)}")
    names = [name for name, _ in model.named_parameters()]
    for index, prefixes in enumerate(stages):
        if not any(name.startswith(tuple(prefixes)) for name in names):  # torchvision changed its module layout
            raise RuntimeError(f"{model_name}: backbone stage {index} ({prefixes[0]}...) has no parameters")
    frozen = tuple(p for prefixes in stages[: len(stages) - trainable_layers] for p in prefixes)
    if frozen:
        for name, parameter in model.named_parameters():
            if name.startswith(frozen):
                parameter.requires_grad_(False)
    return len(stages) - trainable_layers


def freeze(model: nn.Module, patterns: Iterable[str], model_name: str | None = None) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose names match any fnmatch pattern; returns their names.

    Every pattern must match something: a typo must not silently train everything.
    """
    names = [name for name, _ in model.named_parameters()]
    matched: set[str] = set()
    for pattern in patterns:
        hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            groups = sorted({".".join(name.split(".")[:2]) + ".*" for name in names})
            raise InputError(f"model.freeze: pattern {pattern!r} matches no parameter of "
                             f"{model_name or type(model).__name__} (names start with: {', '.join(groups)})")
        matched.update(hits)
    for name, parameter in model.named_parameters():
        if name in matched:
            parameter.requires_grad_(False)
    return [name for name in names if name in matched]


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every ``BatchNorm2d`` under ``module`` with ``FrozenBatchNorm2d`` (statistics and affine kept).

    The eps is torchvision's FrozenBatchNorm2d default, as in the pretrained models torchvision builds.
    """
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None and child.running_var is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count

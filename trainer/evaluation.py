"""COCO box mAP with pycocotools, over predictions gathered from every rank.

Each rank converts its model outputs to COCO detections (XYWH, COCO category ids); rank 0 gathers them and runs
COCOeval against the ground-truth JSON, so the numbers are pycocotools' own. Per-class AP comes from the same
precision array pycocotools summarises.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.config import EVAL_METRICS
from trainer.distributed import DistEnv, all_gather_objects

STAT_NAMES = EVAL_METRICS


@dataclass
class EvalResult:
    stats: dict[str, float]  # STAT_NAMES → value (pycocotools' -1 for "no such objects" kept as -1)
    per_class: dict[str, float] = field(default_factory=dict)  # class name → AP@[.5:.95]
    detections: int = 0

    @property
    def ap(self) -> float:
        return self.stats["AP"]


def to_coco_detections(outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                       category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """Model outputs (XYXY boxes, labels 1..K, scores) → COCO result dicts (XYWH, category ids)."""
    detections = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].detach().float().cpu()
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, label, score in zip(xywh, output["labels"].tolist(), output["scores"].tolist(), strict=True):
            detections.append({"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                               "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
    return detections


def load_ground_truth(data: bytes | dict[str, Any]) -> COCO:
    """A pycocotools COCO object, quietly, from a validated document (``load_coco_index(..., keep_document=True)
    .document``: ids unique, boxes valid, so pycocotools' per-id tables lose nothing) or from JSON bytes."""
    gt = COCO()
    gt.dataset = json.loads(data) if isinstance(data, bytes | str) else data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def evaluate_detections(gt: COCO, detections: list[dict[str, Any]],
                        image_ids: Sequence[int] | None = None) -> EvalResult:
    """COCOeval bbox over ``image_ids`` (default: every image in the ground truth)."""
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    if not detections:
        return EvalResult({name: 0.0 for name in STAT_NAMES}, {names[c]: 0.0 for c in sorted(names)}, 0)
    with contextlib.redirect_stdout(io.StringIO()):
        results = gt.loadRes(copy.deepcopy(detections))
        evaluator = COCOeval(gt, results, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)}
    precision = evaluator.eval["precision"]  # [IoU thresholds, recall, categories, areas, max dets]
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[names[category_id]] = float(np.mean(values)) if values.size else -1.0
    return EvalResult(stats, per_class, len(detections))


class DistributedEvaluator:
    """Collects this rank's detections per image; ``finish`` gathers all ranks' and evaluates on rank 0.

    Detections are kept per image, so an image seen twice (the sampler's end-of-epoch padding, on one rank or on
    two) counts once.
    """

    def __init__(self, category_ids: Sequence[int]) -> None:
        self.category_ids = list(category_ids)
        self.by_image: dict[int, list[dict[str, Any]]] = {}

    def update(self, outputs: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, Any]]) -> None:
        for output, target in zip(outputs, targets, strict=True):
            image_id = int(target["image_id"])
            if image_id not in self.by_image:
                self.by_image[image_id] = to_coco_detections([output], [image_id], self.category_ids)

    def finish(self, env: DistEnv, gt: COCO) -> EvalResult | None:
        """The result on rank 0 (None on the other ranks)."""
        gathered = all_gather_objects(env, self.by_image)
        if not env.is_main:
            return None
        merged: dict[int, list[dict[str, Any]]] = {}
        for by_image in gathered:
            for image_id, detections in by_image.items():
                merged.setdefault(image_id, detections)
        detections = [d for image_id in sorted(merged) for d in merged[image_id]]
        return evaluate_detections(gt, detections, sorted(merged))

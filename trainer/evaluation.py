"""COCO box mAP with pycocotools or faster-coco-eval, over predictions gathered from every rank.

Each rank converts its model outputs to COCO detections (XYWH, COCO category ids); rank 0 gathers them and runs
COCOeval against the ground truth, so the numbers are the library's own. ``eval.backend`` picks the library:
pycocotools (the reference) or faster-coco-eval (the ``fast-eval`` extra: the same matching and accumulation in
C++, 2.5-5x faster by bench/evaluation.py; tests/unit/test_evaluation.py holds it to pycocotools' numbers).
Per-class AP comes from the same precision array the library summarises.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.config import EVAL_BACKENDS, EVAL_METRICS
from trainer.distributed import DistEnv, all_gather_objects

STAT_NAMES = EVAL_METRICS
FAST = "faster-coco-eval"


@dataclass
class EvalResult:
    stats: dict[str, float]  # STAT_NAMES → value (pycocotools' -1 for "no such objects" kept as -1)
    per_class: dict[str, float] = field(default_factory=dict)  # class name → AP@[.5:.95]
    detections: int = 0

    @property
    def ap(self) -> float:
        return self.stats["AP"]


@dataclass(frozen=True)
class GroundTruth:
    """A ground-truth index and the library that built it: each library evaluates only against its own index."""

    coco: Any  # pycocotools.coco.COCO or faster_coco_eval.COCO
    backend: str = "pycocotools"

    @property
    def dataset(self) -> dict[str, Any]:
        """The COCO document (images, annotations, categories)."""
        return self.coco.dataset


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


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """faster-coco-eval's progress lines ("creating index...", the summary table): not for the trainer's log."""


def _fast() -> Any:
    """The faster_coco_eval module, imported on first use: pycocotools users never need the extra installed."""
    import faster_coco_eval

    library_log = logging.getLogger("faster_coco_eval")
    if library_log.level == logging.NOTSET:  # objects it makes inside loadRes log progress at debug/info
        library_log.setLevel(logging.WARNING)
    return faster_coco_eval


def load_ground_truth(data: bytes | dict[str, Any], backend: str = "pycocotools") -> GroundTruth:
    """The ground truth indexed by ``backend``'s COCO class, quietly, from a validated document
    (``load_coco_index(..., keep_document=True).document``: ids unique, boxes valid, so the per-id tables lose
    nothing) or from JSON bytes. Load it once per run, not per evaluation: indexing grows with the objects."""
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"unknown evaluation backend {backend!r}; choose one of {', '.join(EVAL_BACKENDS)}")
    dataset = json.loads(data) if isinstance(data, bytes | str) else data
    if backend == FAST:
        return GroundTruth(_fast().COCO(dataset, print_function=_quiet), backend)
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return GroundTruth(gt, backend)


def evaluate_detections(gt: GroundTruth, detections: list[dict[str, Any]],
                        image_ids: Sequence[int] | None = None) -> EvalResult:
    """COCOeval bbox over ``image_ids`` (default: every image in the ground truth), by ``gt``'s backend."""
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    if not detections:
        return EvalResult({name: 0.0 for name in STAT_NAMES}, {names[c]: 0.0 for c in sorted(names)}, 0)
    results = [dict(d) for d in detections]  # loadRes adds keys to each record; the caller's stay as they were
    with contextlib.redirect_stdout(io.StringIO()):
        if gt.backend == FAST:
            evaluator = _fast().COCOeval_faster(gt.coco, gt.coco.loadRes(results), "bbox", print_function=_quiet)
        else:
            evaluator = COCOeval(gt.coco, gt.coco.loadRes(results), "bbox")
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
        per_class[names[int(category_id)]] = float(np.mean(values)) if values.size else -1.0
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

    def finish(self, env: DistEnv, gt: GroundTruth | None) -> EvalResult | None:
        """The result on rank 0, by ``gt``'s backend (None on the other ranks, which need no ground truth)."""
        gathered = all_gather_objects(env, self.by_image)
        if not env.is_main:
            return None
        if gt is None:
            raise ValueError("rank 0 evaluates: it needs the ground truth (load_ground_truth)")
        merged: dict[int, list[dict[str, Any]]] = {}
        for by_image in gathered:
            for image_id, detections in by_image.items():
                merged.setdefault(image_id, detections)
        detections = [d for image_id in sorted(merged) for d in merged[image_id]]
        return evaluate_detections(gt, detections, sorted(merged))

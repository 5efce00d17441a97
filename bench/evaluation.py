"""COCO box mAP: ``eval.backend: faster-coco-eval`` against pycocotools, on the same detections in the same run.

Generates a seeded validation set (default 5,000 images of 640-1333 px, 10 classes, about 7 objects per image
with COCO-like sizes: about 45% small, 30% medium, 25% large, 1% crowd) and exactly 100 detections per image
(most objects found with jittered boxes, the rest false positives; true positives score higher on average). For
each backend it times, as the trainer calls them:
  * ``load_ground_truth`` (index the ground truth; a run does this once);
  * ``evaluate_detections`` end to end (loadRes, evaluate, accumulate, summarize, per-class AP): the wait on
    rank 0 after every evaluation;
  * the trainer's scoring from model outputs: ``DistributedEvaluator.update`` with each image's output tensors
    (XYXY boxes, labels, scores, as the detector returns them) and ``finish`` (one process): what an evaluation
    adds to the model's own forward passes;
wall and CPU time, then prints the ratios fast / pycocotools (target: evaluation <= 0.3x) and the largest
difference over the twelve stats and the per-class APs (must be <= 1e-4).
Run: ``.venv/bin/python bench/evaluation.py [--images 5000] [--dets 100] [--classes 10] [--repeat 1]``
(``--images 500`` for a quick run).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.distributed import DistEnv  # noqa: E402
from trainer.evaluation import (  # noqa: E402
    STAT_NAMES,
    DistributedEvaluator,
    EvalResult,
    GroundTruth,
    evaluate_detections,
    load_ground_truth,
)

BACKENDS = ("pycocotools", "faster-coco-eval")
TOLERANCE = 1e-4


def box_in(rng: np.random.Generator, width: int, height: int) -> list[float]:
    """A box whose side is log-uniform in 6..250 px (COCO's mix of small, medium and large), aspect 1:3..3:1."""
    side = float(np.exp(rng.uniform(np.log(6), np.log(250))))
    aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
    w, h = min(side * aspect ** 0.5, width - 1.0), min(side / aspect ** 0.5, height - 1.0)
    return [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]


def ground_truth(images: int, classes: int, rng: np.random.Generator) -> dict[str, Any]:
    doc: dict[str, Any] = {"images": [], "annotations": [],
                           "categories": [{"id": k + 1, "name": f"class_{k:02d}"} for k in range(classes)]}
    for image_id in range(1, images + 1):
        width, height = int(rng.integers(640, 1334)), int(rng.integers(480, 801))
        doc["images"].append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height})
        for _ in range(int(rng.poisson(7))):
            box = box_in(rng, width, height)
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": image_id,
                                       "category_id": int(rng.integers(1, classes + 1)), "bbox": box,
                                       "area": box[2] * box[3], "iscrowd": int(rng.random() < 0.01)})
    return doc


def detections_for(doc: dict[str, Any], per_image: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """``per_image`` detections on every image: 85% of the objects found (boxes jittered by 7% of their size,
    5% with the wrong class), false positives for the rest, rounded as ``to_coco_detections`` rounds them."""
    classes = len(doc["categories"])
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    detections = []
    for image in doc["images"]:
        found = [a for a in by_image.get(image["id"], []) if rng.random() < 0.85][:per_image]
        for ann in found:
            x, y, w, h = ann["bbox"]
            dx, dy, dw, dh = rng.normal(0, 0.07, 4) * [w, h, w, h]
            category = ann["category_id"] if rng.random() > 0.05 else int(rng.integers(1, classes + 1))
            detections.append((image["id"], category, [x + dx, y + dy, max(w + dw, 1), max(h + dh, 1)],
                               rng.beta(5, 2)))
        for _ in range(per_image - len(found)):
            detections.append((image["id"], int(rng.integers(1, classes + 1)),
                               box_in(rng, image["width"], image["height"]), rng.beta(2, 5)))
    return [{"image_id": image_id, "category_id": category, "bbox": [round(float(v), 3) for v in box],
             "score": round(float(score), 5)} for image_id, category, box, score in detections]


def model_outputs(doc: dict[str, Any], detections: list[dict[str, Any]],
                  ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """The detections as a detector returns them (one dict of tensors per image; labels 1..K) and the targets
    the evaluation loader yields with them."""
    per_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in doc["images"]}
    for detection in detections:
        per_image[detection["image_id"]].append(detection)
    label_of = {c["id"]: k + 1 for k, c in enumerate(doc["categories"])}
    outputs, targets = [], []
    for image_id, found in per_image.items():
        xywh = torch.tensor([d["bbox"] for d in found], dtype=torch.float32).reshape(-1, 4)
        outputs.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
                        "labels": torch.tensor([label_of[d["category_id"]] for d in found], dtype=torch.int64),
                        "scores": torch.tensor([d["score"] for d in found], dtype=torch.float32)})
        targets.append({"image_id": image_id})
    return outputs, targets


def score_outputs(gt: GroundTruth, category_ids: list[int], outputs: list[dict[str, torch.Tensor]],
                  targets: list[dict[str, Any]], batch: int = 8) -> EvalResult:
    """The trainer's scoring path, batch by batch as ``inference.evaluate`` feeds it, then rank 0's finish."""
    evaluator = DistributedEvaluator(category_ids)
    for start in range(0, len(outputs), batch):
        evaluator.update(outputs[start:start + batch], targets[start:start + batch])
    result = evaluator.finish(DistEnv(), gt)
    assert result is not None
    return result


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float, float]:
    """The result and the fastest wall and CPU seconds over ``repeat`` calls."""
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeat):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return result, best_wall, best_cpu


def max_difference(a: EvalResult, b: EvalResult) -> tuple[float, float]:
    stats = max(abs(a.stats[n] - b.stats[n]) for n in STAT_NAMES)
    assert list(a.per_class) == list(b.per_class)
    per_class = max(abs(a.per_class[k] - b.per_class[k]) for k in a.per_class)
    return stats, per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="validation images")
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1, help="runs per backend; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    doc = ground_truth(args.images, args.classes, rng)
    detections = detections_for(doc, args.dets, rng)
    image_ids = [image["id"] for image in doc["images"]]  # as DistributedEvaluator.finish passes them
    areas = np.array([a["area"] for a in doc["annotations"]])
    crowd = np.mean([a["iscrowd"] for a in doc["annotations"]])
    print(f"{args.images} images, {len(doc['annotations'])} objects ({np.mean(areas < 32 ** 2):.0%} small, "
          f"{np.mean(areas > 96 ** 2):.0%} large, {crowd:.1%} crowd), {len(detections)} detections, "
          f"{args.classes} classes; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    outputs, targets = model_outputs(doc, detections)
    category_ids = [c["id"] for c in doc["categories"]]
    rows: dict[str, tuple[float, ...]] = {}
    results: dict[str, EvalResult] = {}
    for backend in BACKENDS:
        gt, load_wall, load_cpu = timed(lambda b=backend: load_ground_truth(copy.deepcopy(doc), b), args.repeat)
        result, wall, cpu = timed(lambda g=gt: evaluate_detections(g, detections, image_ids), args.repeat)
        scored, trainer_wall, trainer_cpu = timed(lambda g=gt: score_outputs(g, category_ids, outputs, targets),
                                                  args.repeat)
        rows[backend], results[backend] = (load_wall, load_cpu, wall, cpu, trainer_wall, trainer_cpu), result
        print(f"{backend:>17}: load_ground_truth {load_wall:6.2f} s wall {load_cpu:6.2f} s CPU | "
              f"evaluate_detections {wall:6.2f} s wall {cpu:6.2f} s CPU | from model outputs {trainer_wall:6.2f} s "
              f"wall {trainer_cpu:6.2f} s CPU | AP {result.ap:.4f} (from outputs {scored.ap:.4f})")
        del gt
    slow, fast = rows["pycocotools"], rows["faster-coco-eval"]
    ratio = fast[2] / slow[2]
    print(f"fast / pycocotools: load_ground_truth {fast[0] / slow[0]:.2f}x wall {fast[1] / slow[1]:.2f}x CPU | "
          f"evaluate_detections {ratio:.3f}x wall {fast[3] / slow[3]:.3f}x CPU "
          f"({'within' if ratio <= 0.3 else 'over'} the 0.3x target) | from model outputs "
          f"{fast[4] / slow[4]:.3f}x wall {fast[5] / slow[5]:.3f}x CPU")
    stats, per_class = max_difference(results["pycocotools"], results["faster-coco-eval"])
    verdict = "agree" if max(stats, per_class) <= TOLERANCE else "DIFFER"
    print(f"max |difference|: {stats:.2e} over the 12 stats, {per_class:.2e} over the per-class APs "
          f"({verdict} within {TOLERANCE:g}); load average {os.getloadavg()[0]:.2f} at the end")
    if verdict == "DIFFER":
        raise SystemExit(1)


if __name__ == "__main__":
    main()

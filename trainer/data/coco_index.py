"""Read and validate a COCO detection JSON into compact per-image records (no pixels, no torch).

The JSON comes from users (``trainer convert`` or any COCO export), so every structural problem is one clear
``DataError`` that names the file and the offending entry.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from trainer import storage
from trainer.errors import InputError

log = logging.getLogger(__name__)


class DataError(InputError):
    """Bad data set input: the message names the file or object and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(_unwrap_worker_message(message))


def _unwrap_worker_message(message: str) -> str:
    """A DataLoader worker's exception is re-raised in the main process as ``type(text of the whole worker
    traceback)``; keep only the original one-line message, so a training log still gets one clear line."""
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") and ": " in last else last


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32, XYXY in pixels of the annotated image
    labels: np.ndarray  # (n,) int64, contiguous 1..K
    iscrowd: np.ndarray  # (n,) uint8
    area: np.ndarray  # (n,) float32

    @property
    def training_box_count(self) -> int:
        return int((self.iscrowd == 0).sum())


@dataclass(frozen=True)
class CocoIndex:
    uri: str
    images: list[ImageRecord]
    category_ids: list[int]  # COCO category id of label 1..K (position + 1)
    category_names: list[str]
    # The repaired COCO document (images, annotations, categories) when asked for: the ground truth evaluation
    # runs pycocotools on, so its numbers are those of the data training saw.
    document: dict[str, Any] | None = None
    repairs: dict[str, int] = field(default_factory=dict)  # kind → how many entries were repaired or dropped

    @property
    def num_classes(self) -> int:
        """Classes including background (label 0), as torchvision detectors count them."""
        return len(self.category_ids) + 1


def _require(condition: bool, uri: str, message: str) -> None:
    if not condition:
        raise DataError(f"{uri}: {message}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."


class _Repairs:
    """What was repaired, by kind: counted, with the first example, and logged as one warning per kind."""

    MEANING: ClassVar[dict[str, str]] = {
        "missing_id": "had no integer 'id' and were given one",
        "duplicate_id": "repeated another annotation's id and were renumbered",
        "invalid_bbox": "had a bbox that is not 4 finite numbers and were dropped",
        "degenerate_bbox": "had a zero or negative width or height and were dropped",
        "outside_image": "lay entirely outside their image and were dropped",
        "clipped_bbox": "reached outside their image and were clipped to it",
        "bad_area": "had a missing, non-finite or non-positive 'area', replaced by the box's w*h",
    }

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, kind: str, example: str) -> None:
        self.count[kind] += 1
        self.first.setdefault(kind, example)

    def log(self, uri: str) -> None:
        for kind, count in self.count.items():
            log.warning("%s: %d annotations %s (first: %s)", uri, count, self.MEANING[kind], self.first[kind])


def load_coco_index(uri: str, keep_document: bool = False) -> CocoIndex:
    """Parse and validate ``uri`` (local or s3://) into records; labels are the categories sorted by id, 1..K.

    What is unambiguous is repaired with one warning per kind (annotation ids missing or repeated: renumbered;
    boxes not finite, of zero or negative size or outside the image: dropped; boxes reaching outside: clipped);
    everything else (duplicate image or category ids, references to unlisted images or categories, ...) is a
    DataError, before any training step. ``keep_document`` also keeps the repaired JSON for pycocotools.
    """
    raw = storage.read_bytes(uri)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri}: not valid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri}: not UTF-8 text (byte {exc.start})") from exc
    except RecursionError:
        raise DataError(f"{uri}: the JSON nests too deeply") from None
    _require(isinstance(doc, dict), uri, "the top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        _require(isinstance(doc.get(key), list), uri, f"missing or non-list '{key}'")
    categories = _categories(doc["categories"], uri)
    category_ids = sorted(categories)
    label_of = {cid: i for i, cid in enumerate(category_ids, start=1)}
    meta = _images(doc["images"], uri)
    repairs = _Repairs()
    annotations = _annotations(doc["annotations"], meta, label_of, uri, repairs)
    repairs.log(uri)

    per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in meta}
    for ann in annotations:
        per_image[ann["image_id"]].append(ann)
    records = []
    for image_id, (name, width, height) in meta.items():
        rows = per_image[image_id]
        records.append(ImageRecord(
            image_id, name, width, height,
            np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in rows], dtype=np.float32).reshape(-1, 4),
            np.array([label_of[a["category_id"]] for a in rows], dtype=np.int64),
            np.array([a["iscrowd"] for a in rows], dtype=np.uint8),
            np.array([a["area"] for a in rows], dtype=np.float32),
        ))
    document = None
    if keep_document:
        document = {"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h) in meta.items()],
                    "annotations": annotations,
                    "categories": [{"id": c, "name": categories[c]} for c in category_ids]}
    return CocoIndex(uri, records, category_ids, [categories[c] for c in category_ids], document,
                     dict(repairs.count))


def _categories(entries: list[Any], uri: str) -> dict[int, str]:
    """Category id → name; ids and names must be unique (a repeated one makes the classes ambiguous)."""
    categories: dict[int, str] = {}
    for n, cat in enumerate(entries):
        _require(isinstance(cat, dict) and _integer(cat.get("id")) and isinstance(cat.get("name"), str),
                 uri, f"categories[{n}] needs an integer 'id' and a string 'name'")
        _require(cat["id"] not in categories, uri, f"categories[{n}]: duplicate category id {cat['id']}")
        same = [c for c, name in categories.items() if name == cat["name"]]
        _require(not same, uri, f"categories[{n}]: the name {_short(cat['name'])} is also category id "
                                f"{same[0] if same else ''}; class names must be unique")
        categories[cat["id"]] = cat["name"]
    _require(bool(categories), uri, "no categories")
    return categories


def _images(entries: list[Any], uri: str) -> dict[int, tuple[str, int, int]]:
    meta: dict[int, tuple[str, int, int]] = {}
    for n, img in enumerate(entries):
        ok = isinstance(img, dict) and _integer(img.get("id")) and isinstance(img.get("file_name"), str)
        _require(ok, uri, f"images[{n}] needs an integer 'id' and a string 'file_name'")
        width, height = img.get("width"), img.get("height")
        _require(_integer(width) and _integer(height) and width > 0 and height > 0, uri,
                 f"images[{n}] (id {img['id']}): width and height must be positive integers")
        name = img["file_name"]
        _require(bool(name) and ".." not in name.replace("\\", "/").split("/") and not name.startswith("/")
                 and "\0" not in name, uri,
                 f"images[{n}] (id {img['id']}): file_name {_short(name)} must be a relative path inside the "
                 "image root")
        _require(img["id"] not in meta, uri, f"images[{n}]: duplicate image id {img['id']} (which image do its "
                                             "annotations belong to?)")
        meta[img["id"]] = (name, width, height)
    return meta


def _annotations(entries: list[Any], meta: dict[int, tuple[str, int, int]], label_of: dict[int, int], uri: str,
                 repairs: _Repairs) -> list[dict[str, Any]]:
    """The usable annotations, repaired, in file order, as pycocotools reads them (XYWH boxes)."""
    taken = {a["id"] for a in entries if isinstance(a, dict) and _integer(a.get("id"))}
    next_id = max(taken, default=0) + 1
    seen_ids: set[int] = set()
    kept = []
    for n, ann in enumerate(entries):
        _require(isinstance(ann, dict), uri, f"annotations[{n}] must be an object")
        image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        _require(_integer(image_id) and image_id in meta, uri,
                 f"annotations[{n}] refers to image id {_short(image_id)}, which is not listed")
        _require(_integer(category_id) and category_id in label_of, uri,
                 f"annotations[{n}] has unknown category_id {_short(category_id)}")
        where = f"annotations[{n}] (image {image_id})"
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            repairs.add("invalid_bbox", f"{where} bbox {_short(bbox)}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            repairs.add("degenerate_bbox", f"{where} bbox {_short(bbox)}")
            continue
        _, width, height = meta[image_id]
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x1 <= x0 or y1 <= y0:
            repairs.add("outside_image", f"{where} bbox {_short(bbox)} in a {width}x{height} image")
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            repairs.add("clipped_bbox", f"{where} bbox {_short(bbox)} in a {width}x{height} image")
            bbox = [x0, y0, x1 - x0, y1 - y0]
        ann_id = ann.get("id")
        if not _integer(ann_id):
            repairs.add("missing_id", f"{where} id {_short(ann_id)} → {next_id}")
            ann_id, next_id = next_id, next_id + 1
        elif ann_id in seen_ids:
            repairs.add("duplicate_id", f"{where} id {ann_id} → {next_id}")
            ann_id, next_id = next_id, next_id + 1
        seen_ids.add(ann_id)
        area = ann.get("area")
        if not (_number(area) and area > 0):
            area = (bbox[2] * bbox[3])
            repairs.add("bad_area", f"{where} area {_short(ann.get('area'))}")
        kept.append({"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
                     "area": float(area), "iscrowd": 1 if ann.get("iscrowd") else 0})
    return kept

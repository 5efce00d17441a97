"""Read and validate a COCO detection JSON into compact per-image records (no pixels, no torch).

The JSON comes from users (``trainer convert`` or any COCO export), so every structural problem is one clear
``DataError`` that names the file and the offending entry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from trainer import storage
from trainer.errors import InputError


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

    @property
    def num_classes(self) -> int:
        """Classes including background (label 0), as torchvision detectors count them."""
        return len(self.category_ids) + 1


def _require(condition: bool, uri: str, message: str) -> None:
    if not condition:
        raise DataError(f"{uri}: {message}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_coco_index(uri: str) -> CocoIndex:
    """Parse ``uri`` (local or s3://) into records; labels are the categories sorted by id, numbered 1..K."""
    raw = storage.read_bytes(uri)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri}: not valid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri}: not UTF-8 text (byte {exc.start})") from exc
    _require(isinstance(doc, dict), uri, "the top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        _require(isinstance(doc.get(key), list), uri, f"missing or non-list '{key}'")

    categories: dict[int, str] = {}
    for n, cat in enumerate(doc["categories"]):
        _require(isinstance(cat, dict) and isinstance(cat.get("id"), int) and isinstance(cat.get("name"), str),
                 uri, f"categories[{n}] needs an integer 'id' and a string 'name'")
        _require(cat["id"] not in categories, uri, f"categories[{n}]: duplicate category id {cat['id']}")
        categories[cat["id"]] = cat["name"]
    _require(bool(categories), uri, "no categories")
    category_ids = sorted(categories)
    label_of = {cid: i for i, cid in enumerate(category_ids, start=1)}

    meta: dict[int, tuple[str, int, int]] = {}
    for n, img in enumerate(doc["images"]):
        ok = isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
        _require(ok, uri, f"images[{n}] needs an integer 'id' and a string 'file_name'")
        width, height = img.get("width"), img.get("height")
        _require(isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0, uri,
                 f"images[{n}] (id {img['id']}): width and height must be positive integers")
        name = img["file_name"]
        _require(bool(name) and ".." not in name.replace("\\", "/").split("/") and not name.startswith("/"), uri,
                 f"images[{n}] (id {img['id']}): file_name {name!r} must be a relative path inside the image root")
        _require(img["id"] not in meta, uri, f"images[{n}]: duplicate image id {img['id']}")
        meta[img["id"]] = (name, width, height)

    per_image: dict[int, list[tuple[list[float], int, int, float]]] = {i: [] for i in meta}
    for n, ann in enumerate(doc["annotations"]):
        _require(isinstance(ann, dict), uri, f"annotations[{n}] must be an object")
        image_id, category_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        _require(image_id in meta, uri, f"annotations[{n}] refers to image id {image_id!r}, which is not listed")
        _require(category_id in label_of, uri, f"annotations[{n}] has unknown category_id {category_id!r}")
        _require(isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox), uri,
                 f"annotations[{n}]: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        area = ann.get("area", w * h)
        per_image[image_id].append(([x, y, x + w, y + h], label_of[category_id], 1 if ann.get("iscrowd") else 0,
                                    float(area) if _number(area) else w * h))

    records = []
    for image_id, (name, width, height) in meta.items():
        rows = per_image[image_id]
        records.append(ImageRecord(
            image_id, name, width, height,
            np.array([r[0] for r in rows], dtype=np.float32).reshape(-1, 4),
            np.array([r[1] for r in rows], dtype=np.int64),
            np.array([r[2] for r in rows], dtype=np.uint8),
            np.array([r[3] for r in rows], dtype=np.float32),
        ))
    return CocoIndex(uri, records, category_ids, [categories[c] for c in category_ids])

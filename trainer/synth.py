"""A generated COCO data set of coloured shapes on noisy backgrounds: proof that training learns, in minutes on a CPU.

Circles, squares and triangles of varied sizes and colours, 1-4 per image, placed without heavy overlap, on a
background of random gradients and noise. Everything derives from ``seed``: the same call writes the same bytes.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from trainer import storage

CLASSES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class SynthResult:
    train_uri: str
    val_uri: str
    images_uri: str
    train_images: int
    val_images: int
    objects: int


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(40, 200, size=3)
    gradient = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-40, 40, size=3)
    gradient = gradient + np.linspace(-1, 1, size)[:, None, None] * rng.uniform(-40, 40, size=3)
    noise = rng.normal(0, 12, size=(size, size, 3))
    return np.clip(base + gradient + noise, 0, 255).astype(np.uint8)


def render_image(rng: np.random.Generator, size: int) -> tuple[bytes, list[tuple[int, list[float]]]]:
    """One JPEG and its objects as (category id 1..3, [x, y, w, h])."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float, float]] = []
    objects: list[tuple[int, list[float]]] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            extent = float(rng.uniform(size * 0.12, size * 0.4))
            x0, y0 = (float(v) for v in rng.uniform(0, size - extent, size=2))
            box = (x0, y0, x0 + extent, y0 + extent)
            if all(_iou(box, other) < 0.2 for other in placed):
                break
        else:
            continue
        kind = int(rng.integers(0, len(CLASSES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
        placed.append(box)
        objects.append((kind + 1, [round(x0, 2), round(y0, 2), round(extent, 2), round(extent, 2)]))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return out.getvalue(), objects


def make_shapes_dataset(out: str, n: int = 400, size: int = 192, seed: int = 0,
                        val_fraction: float = 0.2) -> SynthResult:
    """Write ``<out>/train.json``, ``<out>/val.json`` and ``<out>/images/*.jpg`` (local or s3://)."""
    if n < 2:
        raise ValueError("--n must be at least 2 (one train and one val image)")
    rng = np.random.default_rng(seed)
    images_uri = storage.join(out, "images")
    docs = {split: {"images": [], "annotations": [],
                    "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]}
            for split in ("train", "val")}
    n_val = max(1, round(n * val_fraction))
    payloads: list[tuple[str, bytes]] = []
    annotation_id = 0
    for index in range(n):
        data, objects = render_image(rng, size)
        name = f"shape_{index:05d}.jpg"
        payloads.append((storage.join(images_uri, name), data))
        doc = docs["val" if index >= n - n_val else "train"]
        doc["images"].append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for category, bbox in objects:
            annotation_id += 1
            doc["annotations"].append({"id": annotation_id, "image_id": index + 1, "category_id": category,
                                       "bbox": bbox, "area": round(bbox[2] * bbox[3], 4), "iscrowd": 0})
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: storage.write_bytes(*item), payloads))
    uris = {}
    for split, doc in docs.items():
        uris[split] = storage.join(out, f"{split}.json")
        storage.write_text(uris[split], json.dumps(doc))
    return SynthResult(uris["train"], uris["val"], images_uri, n - n_val, n_val, annotation_id)

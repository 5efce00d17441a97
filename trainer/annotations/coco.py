"""Build COCO detection JSON from converted boxes: stable ids, exact floats, byte-identical output.

Serialisation formats each record with a fixed template instead of ``json.dumps`` on dicts: the same bytes every
run, and several times faster for hundreds of thousands of boxes. Strings go through ``json.dumps``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from trainer import __version__


@dataclass(frozen=True, slots=True)
class Box:
    """One output box in COCO convention (x, y = top-left; w, h > 0), before ids are assigned."""

    category: str
    x: float
    y: float
    w: float
    h: float
    iscrowd: int
    difficult: int
    truncated: int


@dataclass(slots=True)
class ImageEntry:
    id: int
    file_name: str
    width: int
    height: int
    boxes: list[Box]
    first_annotation_id: int = 0  # annotation ids are global, so an object keeps its id in every split


def _num(value: float) -> str:
    """Shortest exact text of a coordinate; integral values print as integers (``12`` not ``12.0``)."""
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    if not math.isfinite(value):
        raise ValueError(f"non-finite coordinate {value!r}")
    return repr(value)


def image_json(image: ImageEntry) -> str:
    return (f'{{"id":{image.id},"file_name":{json.dumps(image.file_name, ensure_ascii=False)},'
            f'"width":{image.width},"height":{image.height}}}')


def annotations_json(image: ImageEntry, category_ids: dict[str, int]) -> list[str]:
    rows = []
    for offset, box in enumerate(image.boxes):
        rows.append(
            f'{{"id":{image.first_annotation_id + offset},"image_id":{image.id},'
            f'"category_id":{category_ids[box.category]},'
            f'"bbox":[{_num(box.x)},{_num(box.y)},{_num(box.w)},{_num(box.h)}],'
            f'"area":{_num(round(box.w * box.h, 6))},"iscrowd":{box.iscrowd},'
            f'"difficult":{box.difficult},"truncated":{box.truncated}}}'
        )
    return rows


def coco_document(images: Iterable[ImageEntry], categories: Sequence[str], description: str) -> bytes:
    """The whole COCO JSON document for these images (in the order given) and categories (ids 1..K)."""
    category_ids = {name: i for i, name in enumerate(categories, start=1)}
    image_rows: list[str] = []
    annotation_rows: list[str] = []
    for image in images:
        image_rows.append(image_json(image))
        annotation_rows.extend(annotations_json(image, category_ids))
    category_rows = [f'{{"id":{i},"name":{json.dumps(name, ensure_ascii=False)},"supercategory":"none"}}'
                     for name, i in category_ids.items()]
    info = json.dumps({"description": description, "version": "1.0",
                       "contributor": f"detection-trainer {__version__} (trainer convert)"},
                      ensure_ascii=False, separators=(",", ":"))
    text = (f'{{"info":{info},"licenses":[],\n"categories":[\n' + ",\n".join(category_rows)
            + '\n],\n"images":[\n' + ",\n".join(image_rows)
            + '\n],\n"annotations":[\n' + ",\n".join(annotation_rows) + "\n]}\n")
    return text.encode("utf-8")

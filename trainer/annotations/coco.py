"""Build COCO detection JSON from converted boxes: stable ids, exact floats, byte-identical output.

Serialisation formats each record with a fixed template instead of ``json.dumps`` on dicts: the same bytes every
run, and several times faster for hundreds of thousands of boxes. Strings go through the json encoder; each box's
text after its ids comes formatted from the converter's workers (``convert.plain_boxes`` and ``convert_boxes``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from trainer import __version__

# (category name, the annotation's JSON text from "bbox" to the closing brace)
AnnotationRow = tuple[str, str]


@dataclass(slots=True)
class ImageEntry:
    id: int
    file_name: str
    width: int
    height: int
    boxes: list[AnnotationRow]
    first_annotation_id: int = 0  # annotation ids are global, so an object keeps its id in every split


# json.dumps(text, ensure_ascii=False) builds a new encoder on every call (its options differ from the default):
# for one string per image that took most of the time of writing the image's row.
_json_string = json.JSONEncoder(ensure_ascii=False).encode


def image_json(image: ImageEntry) -> str:
    return (f'{{"id":{image.id},"file_name":{_json_string(image.file_name)},'
            f'"width":{image.width},"height":{image.height}}}')


def annotations_json(image: ImageEntry, category_fields: dict[str, str]) -> list[str]:
    """The image's annotation rows; ``category_fields`` maps each category to its id followed by a comma."""
    head = f',"image_id":{image.id},"category_id":'
    return [f'{{"id":{annotation_id}{head}{category_fields[category]}{text}'
            for annotation_id, (category, text) in enumerate(image.boxes, image.first_annotation_id)]


def write_coco(stream: IO[bytes], images: Sequence[ImageEntry], categories: Sequence[str], description: str) -> None:
    """Write the COCO JSON document for these images (in the order given) and categories (ids 1..K).

    Rows are written in batches, so memory stays flat however many boxes there are.
    """
    category_rows = [f'{{"id":{i},"name":{_json_string(name)},"supercategory":"none"}}'
                     for i, name in enumerate(categories, start=1)]
    category_fields = {name: f"{i}," for i, name in enumerate(categories, start=1)}
    info = json.dumps({"description": description, "version": "1.0",
                       "contributor": f"detection-trainer {__version__} (trainer convert)"},
                      ensure_ascii=False, separators=(",", ":"))
    categories_text = ",\n".join(category_rows)
    stream.write(f'{{"info":{info},"licenses":[],\n"categories":[\n{categories_text}\n],\n"images":['.encode())
    for start in range(0, len(images), 1000):
        batch = ",\n".join(image_json(image) for image in images[start : start + 1000])
        stream.write(("\n" if start == 0 else ",\n").encode() + batch.encode())
    stream.write(b'\n],\n"annotations":[')
    first = True
    for start in range(0, len(images), 1000):
        rows = [row for image in images[start : start + 1000] for row in annotations_json(image, category_fields)]
        if rows:
            stream.write(("\n" if first else ",\n").encode() + ",\n".join(rows).encode())
            first = False
    stream.write(b"\n]}\n")

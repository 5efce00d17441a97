"""Real image files and COCO JSON for data-pipeline tests (made with PIL, decoded by torchvision)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

RECT_COLOR = (250, 20, 20)


def image_with_rectangles(width: int, height: int, boxes: list[tuple[int, int, int, int]],
                          fmt: str = "PNG", mode: str = "RGB", exif_orientation: int | None = None) -> bytes:
    """A dark image with each XYXY box painted solid red (PNG by default: lossless, so colours are exact)."""
    image = Image.new("RGB", (width, height), (10, 40, 10))
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=RECT_COLOR)
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[str]) -> Path:
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": i, "name": n} for i, n in enumerate(categories, start=1)]}
    path.write_text(json.dumps(doc))
    return path


def simple_dataset(root: Path, count: int = 12, size: tuple[int, int] = (96, 64)) -> tuple[Path, Path]:
    """``count`` PNGs, each with one or two painted boxes, and their COCO JSON; returns (json, image dir)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    width, height = size
    for i in range(count):
        boxes = [(4 + i % 7, 6, 30 + i % 7, 30), (50, 10 + i % 5, 90, 50)][: 1 + i % 2]
        name = f"img_{i:03d}.png"
        (images_dir / name).write_bytes(image_with_rectangles(width, height, boxes))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1 + j,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return write_coco(root / "coco.json", images, annotations, ["a", "b"]), images_dir


def bomb_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG of ``width`` x ``height`` black pixels, compressed as far as zlib goes (30000² is
    875 KB on disk and 2.7 GB as decoded RGB): a decompression bomb, streamed so making it costs little memory."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    rows_per_block = max(1, min(height, (32 << 20) // (width + 1)))
    block = b"\0" * ((width + 1) * rows_per_block)  # each row: filter byte 0, then the pixels
    parts = []
    done = 0
    while done < height:
        rows = min(rows_per_block, height - done)
        parts.append(compressor.compress(block[: rows * (width + 1)]))
        done += rows
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")

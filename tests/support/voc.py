"""Build small Pascal VOC trees for converter tests (real JPEG headers come from the BCCD sample)."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from tests.conftest import BCCD

SAMPLE_JPEG = BCCD / "JPEGImages" / "BloodImage_00000.jpg"  # 640x480


def voc_xml(filename: str | None, objects: list[tuple], size: tuple[int, int] | None = (640, 480),
            extra: str = "") -> str:
    """objects: (name, xmin, ymin, xmax, ymax[, difficult[, truncated]]) with any text values."""
    parts = ["<annotation>", "<folder>JPEGImages</folder>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for obj in objects:
        name, x0, y0, x1, y1, *flags = obj
        difficult = flags[0] if flags else 0
        truncated = flags[1] if len(flags) > 1 else 0
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>{truncated}</truncated>"
                     f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    parts.append(extra)
    parts.append("</annotation>")
    return "\n".join(parts)


def make_voc(root: Path, xmls: dict[str, str | bytes], images: list[str],
             splits: dict[str, list[str]] | None = None) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for name, content in xmls.items():
        data = content.encode() if isinstance(content, str) else content
        (root / "Annotations" / name).write_bytes(data)
    for image in images:
        shutil.copyfile(SAMPLE_JPEG, root / "JPEGImages" / image)
    if splits:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for split, ids in splits.items():
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def gc_state_chunk(uris: list[str], rules: object) -> list[tuple[str, None, None, None, list[str], str]]:
    """Stands in for convert.parse_chunk_packed in a worker: one packed record per file, named after whether the
    worker's cyclic garbage collector is on (a module-level function, so the pool can send it to a worker)."""
    return [(f"gc enabled: {gc.isenabled()}", None, None, None, [], "") for _ in uris]

"""Pascal VOC → COCO conversion over local paths or s3:// URIs (``trainer convert`` and the chart's init job).

Shape of a run: list ``Annotations/`` and ``JPEGImages/`` once; parse every XML in worker processes (each worker
fetches its S3 objects with threads); resolve each annotation to an image file; settle the class list; write one
COCO JSON per split. Ids depend only on the input (sorted file names), never on ``--workers`` or timing, so the
same input gives byte-identical files. One bad file never stops the others: every problem is counted by kind.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from trainer import storage
from trainer.annotations.coco import Box, ImageEntry, coco_document
from trainer.annotations.image_size import header_size
from trainer.annotations.voc import VocError, VocObject, normalise_name, parse_voc

log = logging.getLogger(__name__)

DifficultMode = Literal["keep", "crowd", "drop"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_FETCH_THREADS = 16

# Every kind of problem the converter reports, with its severity:
#   error   - a file could not be converted at all (exit status 1);
#   warning - repaired or skipped, output still correct (exit status 1 only with --strict);
#   info    - normal but worth counting.
SEVERITY: dict[str, str] = {
    "empty_file": "error", "malformed_xml": "error", "unsafe_xml": "error", "bad_encoding": "error",
    "not_voc": "error", "unreadable": "error", "no_size": "error", "duplicate_image": "error",
    "unsafe_filename": "error",
    "missing_image": "warning", "missing_annotation": "warning", "filename_mismatch": "warning",
    "filename_missing_extension": "warning", "filename_has_directory": "warning", "size_from_image": "warning",
    "degenerate_box": "warning", "clipped_box": "warning", "outside_image": "warning", "bad_coordinate": "warning",
    "missing_bndbox": "warning", "missing_name": "warning", "bad_flag": "warning", "unknown_class": "warning",
    "class_case_mismatch": "warning", "no_objects": "info", "part_ignored": "info", "difficult_dropped": "info",
}


class ConvertError(Exception):
    """The conversion cannot run at all (missing folders, unreadable labels file, bad options)."""


@dataclass
class ConvertOptions:
    voc_root: str
    out: str
    splits: list[str] | None = None  # None: every split file present
    all: bool = False
    labels: str | None = None
    voc_offset: bool = False
    difficult: DifficultMode = "crowd"
    strict: bool = False
    workers: int = max(1, min(8, os.cpu_count() or 1))
    report: str | None = None


@dataclass
class ConvertResult:
    outputs: dict[str, str] = field(default_factory=dict)  # split → URI written
    split_images: dict[str, int] = field(default_factory=dict)
    split_objects: dict[str, int] = field(default_factory=dict)
    images: int = 0
    objects_per_class: dict[str, int] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    problems: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # kind → [(file, detail)]
    strict: bool = False

    def count(self, severity: str) -> int:
        return sum(len(v) for k, v in self.problems.items() if SEVERITY[k] == severity)

    @property
    def exit_code(self) -> int:
        failing = self.count("error") + (self.count("warning") if self.strict else 0)
        return 1 if failing else 0


# ------------------------------------------------------------------------------------ worker side
@dataclass(slots=True)
class Parsed:
    """One XML's outcome, as sent back from a worker (plain values: cheap to pickle)."""

    xml: str
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    objects: list[VocObject] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (kind, message) when the file is unusable


def _parse_one(name: str, data: bytes | storage.StorageError) -> Parsed:
    if isinstance(data, storage.StorageError):
        return Parsed(name, error=("unreadable", data.cause))
    try:
        record = parse_voc(data)
    except VocError as exc:
        return Parsed(name, error=(exc.kind, str(exc)))
    return Parsed(name, record.filename, record.width, record.height, record.objects, record.problems)


def _read(uri: str) -> bytes | storage.StorageError:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as exc:
        return exc


def parse_chunk(uris: list[str]) -> list[Parsed]:
    """Read and parse a chunk of XML files (in a worker process); S3 objects are fetched by threads."""
    if uris and storage.is_s3(uris[0]):
        with ThreadPoolExecutor(_FETCH_THREADS) as pool:
            contents: Iterable[bytes | storage.StorageError] = list(pool.map(_read, uris))
    else:
        contents = map(_read, uris)
    return [_parse_one(storage.basename(uri), data) for uri, data in zip(uris, contents, strict=True)]


def parse_all(uris: list[str], workers: int) -> list[Parsed]:
    """Parse every XML; results come back in input order whatever the number of workers."""
    if workers <= 1 or len(uris) < 64:
        return parse_chunk(uris)
    size = max(32, min(1000, len(uris) // (workers * 8) or 1))
    chunks = [uris[i : i + size] for i in range(0, len(uris), size)]
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return [parsed for chunk in pool.map(parse_chunk, chunks) for parsed in chunk]


# ----------------------------------------------------------------------------------- boxes
def convert_boxes(objects: list[VocObject], width: int, height: int, voc_offset: bool,
                  problems: list[tuple[str, str]]) -> list[tuple[VocObject, float, float, float, float]]:
    """COCO (x, y, w, h) for each object: offset applied, clipped to the image, degenerate boxes dropped."""
    out = []
    for obj in objects:
        x0, y0, x1, y1 = obj.xmin, obj.ymin, obj.xmax, obj.ymax
        if voc_offset:  # VOC devkit: 1-based pixel indices, max inclusive
            x0, y0 = x0 - 1, y0 - 1
        if x1 <= x0 or y1 <= y0:
            problems.append(("degenerate_box", f"{obj.name} box ({obj.xmin}, {obj.ymin}, {obj.xmax}, {obj.ymax}) "
                                               "is inverted or has zero area; dropped"))
            continue
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            if cx1 <= cx0 or cy1 <= cy0:
                problems.append(("outside_image", f"{obj.name} box ({obj.xmin}, {obj.ymin}, {obj.xmax}, "
                                                  f"{obj.ymax}) lies outside the {width}x{height} image; dropped"))
                continue
            problems.append(("clipped_box", f"{obj.name} box ({obj.xmin}, {obj.ymin}, {obj.xmax}, {obj.ymax}) "
                                            f"clipped to the {width}x{height} image"))
        out.append((obj, cx0, cy0, round(cx1 - cx0, 6), round(cy1 - cy0, 6)))
    return out


# ----------------------------------------------------------------------------------- driver
class _Problems:
    def __init__(self) -> None:
        self.by_kind: dict[str, list[tuple[str, str]]] = {}

    def add(self, kind: str, file: str, detail: str) -> None:
        self.by_kind.setdefault(kind, []).append((file, detail))


def _list_names(uri: str, what: str) -> dict[str, str]:
    """basename → URI of the files directly inside a folder or prefix."""
    try:
        return {storage.basename(info.uri): info.uri
                for info in storage.list_objects(uri, recursive=False) if not info.is_dir}
    except storage.NotFound as exc:
        if isinstance(exc, storage.BucketNotFound):
            raise
        return {}


def read_labels(uri: str) -> list[str]:
    names: list[str] = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        name = normalise_name(line.split("#", 1)[0])
        if not name:
            continue
        if name in names:
            raise ConvertError(f"{uri}: line {number}: class {name!r} is listed twice")
        folded = [n for n in names if n.casefold() == name.casefold()]
        if folded:
            raise ConvertError(f"{uri}: line {number}: class {name!r} differs only by case from {folded[0]!r}")
        names.append(name)
    if not names:
        raise ConvertError(f"{uri}: the labels file lists no classes")
    return names


def read_splits(sets_dir: str, wanted: list[str] | None) -> dict[str, list[str]]:
    """split name → ids, from ImageSets/Main/<split>.txt (per-class files with two columns are not splits)."""
    files = {name[:-4]: uri for name, uri in _list_names(sets_dir, "splits").items() if name.endswith(".txt")}
    splits: dict[str, list[str]] = {}
    for name in wanted if wanted is not None else sorted(files):
        if name not in files:
            raise ConvertError(f"{storage.join(sets_dir, name + '.txt')}: no such split file "
                               f"(present: {', '.join(sorted(files)) or 'none'})")
        rows = [line.split() for line in storage.read_text(files[name]).splitlines()]
        rows = [row for row in rows if row]
        if wanted is None and any(len(row) != 1 for row in rows):
            continue  # e.g. aeroplane_train.txt: "<id> 1/-1" per line
        splits[name] = list(dict.fromkeys(row[0] for row in rows))
    return splits


def _resolve_image(parsed: Parsed, images: dict[str, str], by_stem: dict[str, list[str]],
                   problems: _Problems) -> str | None:
    """The JPEGImages file an annotation describes; never a path outside the image folder."""
    xml_stem = PurePosixPath(parsed.xml).stem
    given = parsed.filename or ""
    base = PurePosixPath(given.replace("\\", "/")).name
    if base != given.strip():
        problems.add("filename_has_directory", parsed.xml, f"<filename> {given!r} has directory parts; "
                                                           f"using {base!r} inside the image folder")
    if base in ("", ".", ".."):
        if given:
            problems.add("unsafe_filename", parsed.xml, f"<filename> {given!r} names no file")
            return None
    elif base in images:
        if PurePosixPath(base).stem != xml_stem:
            problems.add("filename_mismatch", parsed.xml, f"<filename> {base!r} differs from the XML's name")
        return base
    elif PurePosixPath(base).suffix.lower() not in IMAGE_EXTENSIONS and by_stem.get(base):
        problems.add("filename_missing_extension", parsed.xml,
                     f"<filename> {base!r} has no image extension; using {by_stem[base][0]!r}")
        return by_stem[base][0]
    if by_stem.get(xml_stem):
        found = by_stem[xml_stem][0]
        if base:
            problems.add("filename_mismatch", parsed.xml, f"<filename> {base!r} is not in the image folder; "
                                                          f"using {found!r}, named like the XML")
        return found
    problems.add("missing_image", parsed.xml, f"no image {base or xml_stem!r} in the image folder")
    return None


def _settle_classes(names: Counter[str], labels: list[str] | None,
                    problems: _Problems, files_by_name: dict[str, str]) -> tuple[list[str], dict[str, str | None]]:
    """The category list and, for every name seen, the category it maps to (None: skipped)."""
    mapping: dict[str, str | None] = {}
    if labels is not None:
        folded = {name.casefold(): name for name in labels}
        for name in names:
            if name in labels:
                mapping[name] = name
            elif name.casefold() in folded:
                mapping[name] = folded[name.casefold()]
                problems.add("class_case_mismatch", files_by_name[name],
                             f"class {name!r} read as {mapping[name]!r} from the labels file")
            else:
                mapping[name] = None
        return labels, mapping
    groups: dict[str, list[str]] = {}
    for name in sorted(names):
        groups.setdefault(name.casefold(), []).append(name)
    for spellings in groups.values():
        canonical = max(spellings, key=lambda s: (names[s], [-ord(c) for c in s]))
        for spelling in spellings:
            mapping[spelling] = canonical
            if spelling != canonical:
                problems.add("class_case_mismatch", files_by_name[spelling],
                             f"class {spelling!r} differs only by case from {canonical!r}; merged into it")
    return sorted({c for c in mapping.values() if c is not None}), mapping


def convert(options: ConvertOptions, on_progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert a VOC tree; returns what was written and every problem. Raises ConvertError/StorageError
    only when nothing sensible can be produced."""
    say = on_progress or (lambda text: log.info("%s", text))
    if options.difficult not in ("keep", "crowd", "drop"):
        raise ConvertError(f"--difficult must be keep, crowd or drop, not {options.difficult!r}")
    root = options.voc_root.rstrip("/") if storage.is_s3(options.voc_root) else options.voc_root
    ann_dir, img_dir = storage.join(root, "Annotations"), storage.join(root, "JPEGImages")
    problems = _Problems()
    result = ConvertResult(strict=options.strict)

    labels = read_labels(options.labels) if options.labels else None
    xmls = {n: u for n, u in _list_names(ann_dir, "annotations").items() if n.lower().endswith(".xml")}
    if not xmls:
        raise ConvertError(f"{ann_dir}: no .xml annotation files found (expected a Pascal VOC folder)")
    images = {n: u for n, u in _list_names(img_dir, "images").items()
              if PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS}
    if not images:
        raise ConvertError(f"{img_dir}: no image files found (expected a Pascal VOC folder)")
    by_stem: dict[str, list[str]] = {}
    for name in sorted(images, key=lambda n: (IMAGE_EXTENSIONS.index(PurePosixPath(n).suffix.lower()), n)):
        by_stem.setdefault(PurePosixPath(name).stem, []).append(name)

    if options.all:
        splits = {"all": None}
    else:
        found = read_splits(storage.join(root, "ImageSets", "Main"), options.splits)
        splits = dict(found) if found else {"all": None}  # type: ignore[arg-type]

    names = sorted(xmls)
    say(f"parsing {len(names)} annotation files from {ann_dir} with {options.workers} workers")
    parsed_list = parse_all([xmls[n] for n in names], options.workers)

    # Resolve images, sizes and duplicates in sorted order: the first XML naming an image keeps it.
    kept: dict[str, tuple[Parsed, str]] = {}  # xml stem → (parsed, image file)
    owner: dict[str, str] = {}
    need_size: list[tuple[Parsed, str]] = []
    for parsed in parsed_list:
        if parsed.error:
            problems.add(parsed.error[0], parsed.xml, parsed.error[1])
            continue
        for kind, detail in parsed.problems:
            problems.add(kind, parsed.xml, detail)
        image = _resolve_image(parsed, images, by_stem, problems)
        if image is None:
            continue
        if image in owner:
            problems.add("duplicate_image", parsed.xml, f"names image {image!r}, already annotated by {owner[image]}")
            continue
        owner[image] = parsed.xml
        kept[PurePosixPath(parsed.xml).stem] = (parsed, image)
        if parsed.width is None or parsed.height is None:
            need_size.append((parsed, image))
    _fill_sizes(need_size, images, problems)

    # Classes.
    seen: Counter[str] = Counter()
    first_file: dict[str, str] = {}
    for parsed, _ in kept.values():
        if parsed.width is None:
            continue
        for obj in parsed.objects:
            seen[obj.name] += 1
            first_file.setdefault(obj.name, parsed.xml)
    categories, mapping = _settle_classes(seen, labels, problems, first_file)

    # Boxes → entries with global ids (sorted XML order), so ids are the same in every split.
    entries: dict[str, ImageEntry] = {}
    next_image_id = next_annotation_id = 1
    per_class: Counter[str] = Counter()
    for stem in sorted(kept):
        parsed, image = kept[stem]
        if parsed.width is None or parsed.height is None:
            continue
        file_problems: list[tuple[str, str]] = []
        boxes: list[Box] = []
        for obj, x, y, w, h in convert_boxes(parsed.objects, parsed.width, parsed.height, options.voc_offset,
                                             file_problems):
            category = mapping.get(obj.name)
            if category is None:
                file_problems.append(("unknown_class", f"class {obj.name!r} is not in the labels file; skipped"))
                continue
            if obj.difficult and options.difficult == "drop":
                file_problems.append(("difficult_dropped", f"a difficult {category} object was dropped"))
                continue
            iscrowd = 1 if obj.difficult and options.difficult == "crowd" else 0
            boxes.append(Box(category, x, y, w, h, iscrowd, obj.difficult, obj.truncated))
            per_class[category] += 1
        for kind, detail in file_problems:
            problems.add(kind, parsed.xml, detail)
        if not boxes:
            problems.add("no_objects", parsed.xml, "no usable objects (kept as an image without boxes)")
        entries[stem] = ImageEntry(next_image_id, image, parsed.width, parsed.height, boxes, next_annotation_id)
        next_image_id += 1
        next_annotation_id += len(boxes)

    # Splits.
    documents: dict[str, bytes] = {}
    for split, ids in splits.items():
        members = list(entries) if ids is None else ids
        chosen: list[ImageEntry] = []
        for image_id in members:
            entry = entries.get(image_id)
            if entry is not None:
                chosen.append(entry)
            elif ids is not None and image_id not in kept and f"{image_id}.xml" not in xmls:
                problems.add("missing_annotation", f"ImageSets/Main/{split}.txt",
                             f"id {image_id!r} has no Annotations/{image_id}.xml")
        chosen.sort(key=lambda e: e.id)
        documents[split] = coco_document(chosen, categories, f"{split} split, converted from Pascal VOC")
        result.split_images[split] = len(chosen)
        result.split_objects[split] = sum(len(e.boxes) for e in chosen)

    result.images = len(entries)
    result.objects_per_class = {name: per_class[name] for name in categories}
    result.categories = categories
    result.problems = {kind: problems.by_kind[kind] for kind in sorted(problems.by_kind)}

    if options.strict and result.exit_code:
        say("not writing outputs: --strict and problems were found")
    else:
        for split, document in documents.items():
            uri = storage.join(options.out, f"{split}.json")
            storage.write_bytes(uri, document)
            result.outputs[split] = uri
    if options.report:
        storage.write_text(options.report, json.dumps(report_dict(result), indent=2, ensure_ascii=False) + "\n")
    return result


def _fill_sizes(need: list[tuple[Parsed, str]], images: dict[str, str], problems: _Problems) -> None:
    """Width and height from the image header for annotations whose <size> is missing or zero."""
    def probe(item: tuple[Parsed, str]) -> tuple[int, int] | None:
        try:
            with storage.open_read(images[item[1]], buffer_size=64 * 1024) as stream:
                return header_size(stream)
        except storage.StorageError:
            return None

    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        sizes = list(pool.map(probe, need))
    for (parsed, image), size in zip(need, sizes, strict=True):
        if size is None:
            problems.add("no_size", parsed.xml, f"<size> is missing or zero and {image!r} has no readable header")
            continue
        parsed.width, parsed.height = size
        problems.add("size_from_image", parsed.xml, f"<size> missing or zero; read {size[0]}x{size[1]} from {image}")


# ----------------------------------------------------------------------------------- reporting
def report_dict(result: ConvertResult) -> dict[str, Any]:
    return {
        "ok": result.exit_code == 0,
        "images": result.images,
        "splits": {s: {"images": result.split_images[s], "objects": result.split_objects[s],
                       "uri": result.outputs.get(s)} for s in result.split_images},
        "categories": result.categories,
        "objects_per_class": result.objects_per_class,
        "problems": {kind: {"severity": SEVERITY[kind], "count": len(items),
                            "items": [{"file": f, "detail": d} for f, d in items]}
                     for kind, items in result.problems.items()},
    }


def summary_text(result: ConvertResult, examples: int = 3) -> str:
    """The one-screen summary printed on stderr."""
    lines = [f"{'split':<12}{'images':>8}{'objects':>9}  output"]
    for split, count in result.split_images.items():
        lines.append(f"{split:<12}{count:>8}{result.split_objects[split]:>9}  "
                     f"{result.outputs.get(split, '(not written)')}")
    classes = ", ".join(f"{name} {count}" for name, count in result.objects_per_class.items())
    lines.append(f"images converted: {result.images}; objects per class: {classes or 'none'}")
    if result.problems:
        lines.append("problems:")
        order = {"error": 0, "warning": 1, "info": 2}
        for kind, items in sorted(result.problems.items(), key=lambda kv: (order[SEVERITY[kv[0]]], kv[0])):
            files = list(dict.fromkeys(f for f, _ in items))
            shown = ", ".join(files[:examples]) + (f", ... (+{len(files) - examples} files)"
                                                   if len(files) > examples else "")
            lines.append(f"  {SEVERITY[kind]:<8}{kind:<27}{len(items):>6}  {shown}")
            if SEVERITY[kind] == "error":
                lines.append(f"{'':43}first: {items[0][1]}")
    errors, warnings = result.count("error"), result.count("warning")
    verdict = "FAILED" if result.exit_code else "OK"
    lines.append(f"{verdict}: {errors} errors, {warnings} warnings"
                 + (" (--strict: warnings fail the run)" if result.strict and warnings else ""))
    return "\n".join(lines)

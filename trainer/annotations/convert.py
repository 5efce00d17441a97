"""Pascal VOC → COCO conversion over local paths or s3:// URIs (``trainer convert`` and the chart's init job).

Shape of a run: list ``Annotations/`` and ``JPEGImages/`` once; parse every XML in worker processes (each worker
fetches its S3 objects with threads); resolve each annotation to an image file; settle the class list; write one
COCO JSON per split. Ids depend only on the input (sorted file names), never on ``--workers`` or timing, so the
same input gives byte-identical files. One bad file never stops the others: every problem is counted by kind.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, repeat
from math import copysign
from operator import eq, floordiv, itemgetter, lt, mod, mul, sub, truediv
from pathlib import Path
from typing import Any, Literal

from trainer import storage
from trainer.annotations.coco import AnnotationRow, ImageEntry, write_coco
from trainer.annotations.voc import (
    PlainObjects,
    VocError,
    VocObject,
    normalise_name,
    parse_plain_columns,
    parse_voc_tree,
)
from trainer.errors import InputError

log = logging.getLogger(__name__)

DifficultMode = Literal["keep", "crowd", "drop"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_FETCH_THREADS = 16
# The largest annotation file read. 5,000 objects take about 1.5 MB; a larger file is refused before it is read
# (file_too_large), where it would otherwise be held whole in memory, in each of a worker's fetch threads.
MAX_ANNOTATION_BYTES = 64 * 1024 * 1024
MAX_LABELS_BYTES = 16 << 20  # --labels: one class name a line
MAX_SPLIT_BYTES = 256 << 20  # ImageSets/Main/<split>.txt: 20 million ids
_CHUNK_FILES = 500  # files parsed per task: their bytes are held together while a worker (or this process) parses

# Every kind of problem the converter reports, with its severity:
#   error   - a file could not be converted at all (exit status 1);
#   warning - repaired or skipped, output still correct (exit status 1 only with --strict);
#   info    - normal but worth counting.
SEVERITY: dict[str, str] = {
    "empty_file": "error", "malformed_xml": "error", "unsafe_xml": "error", "bad_encoding": "error",
    "not_voc": "error", "unreadable": "error", "no_size": "error", "duplicate_image": "error",
    "unsafe_filename": "error", "file_too_large": "error",
    "missing_image": "warning", "missing_annotation": "warning", "filename_mismatch": "warning",
    "filename_missing_extension": "warning", "filename_has_directory": "warning", "size_from_image": "warning",
    "degenerate_box": "warning", "clipped_box": "warning", "outside_image": "warning", "bad_coordinate": "warning",
    "missing_bndbox": "warning", "missing_name": "warning", "bad_flag": "warning", "unknown_class": "warning",
    "class_case_mismatch": "warning", "no_objects": "info", "part_ignored": "info", "difficult_dropped": "info",
}


class ConvertError(InputError):
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
    annotations_only: bool = False  # no JPEGImages/: images named by <filename>, sizes from <size>


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
@dataclass(frozen=True)
class BoxRules:
    """How objects become COCO boxes; applied in the workers."""

    voc_offset: bool = False
    difficult: DifficultMode = "crowd"


# A converted box: (class name as written, the annotation's JSON text after "category_id":N, ...).
# Workers format everything but the ids and the category id, so the parent process only inserts those.
BoxText = tuple[str, str]
_class_name, _box_text = itemgetter(0), itemgetter(1)  # of a BoxText (or an AnnotationRow)


@dataclass(slots=True)
class Parsed:
    """One XML's outcome, as sent back from a worker (plain values: cheap to pickle)."""

    xml: str
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    objects: list[VocObject] = field(default_factory=list)  # raw objects, kept only while the size is unknown
    boxes: list[BoxText] | None = None  # converted once the image size is known
    problems: list[tuple[str, str]] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (kind, message) when the file is unusable

    def finish(self, rules: BoxRules) -> None:
        """Convert the raw objects now that width and height are known."""
        assert self.width is not None and self.height is not None
        self.boxes = convert_boxes(self.objects, self.width, self.height, rules, self.problems)
        self.objects = []


def _parse_one(name: str, data: bytes | storage.StorageError, rules: BoxRules) -> Parsed:
    if isinstance(data, storage.TooLarge):
        return Parsed(name, error=("file_too_large", f"{data.size} bytes: larger than any annotation file "
                                                     f"({data.limit} at most); not read"))
    if isinstance(data, storage.StorageError):
        return Parsed(name, error=("unreadable", data.cause))
    plain = parse_plain_columns(data)  # most files: no XML parser, no per-object Python (see voc.py)
    if plain is not None:
        filename, width, height, columns = plain
        boxes = plain_boxes(columns, width, height, rules)
        if boxes is not None:
            return Parsed(name, filename, width, height, [], boxes, [])
        parsed = Parsed(name, filename, width, height, columns.objects())
        parsed.finish(rules)  # some box is clipped, dropped or degenerate: the full rules say which and why
        return parsed
    try:
        record = parse_voc_tree(data)
    except VocError as exc:
        return Parsed(name, error=(exc.kind, str(exc)))
    parsed = Parsed(name, record.filename, record.width, record.height, record.objects, None, record.problems)
    if parsed.width is not None and parsed.height is not None:
        parsed.finish(rules)
    return parsed


def _read(uri: str) -> bytes | storage.StorageError:
    try:
        return storage.read_bytes(uri, max_bytes=MAX_ANNOTATION_BYTES)
    except storage.StorageError as exc:
        return exc


def _read_local(path: str) -> bytes | storage.StorageError:
    """A local file read with two system calls (open() and the storage layer's URI handling cost more than the
    read itself); any failure goes through the storage layer again, for its exact message."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return _read(path)
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:  # a long file: the storage layer reads it, within MAX_ANNOTATION_BYTES
            return _read(path)
        return data
    except OSError:  # e.g. a directory named like an XML file
        return _read(path)
    finally:
        os.close(fd)


def parse_chunk(uris: list[str], rules: BoxRules) -> list[Parsed]:
    """Read and parse a chunk of XML files (in a worker process); S3 objects are fetched by threads."""
    failed = False
    contents: Iterable[bytes | storage.StorageError]
    if uris and storage.is_s3(uris[0]):
        with ThreadPoolExecutor(_FETCH_THREADS) as pool:
            contents = list(pool.map(_read, uris))
        failed = any(isinstance(data, storage.StorageError) for data in contents)
    else:
        contents = map(_read_local if all("://" not in uri for uri in uris) else _read, uris)
    parsed = [_parse_one(storage.basename(uri), data, rules) for uri, data in zip(uris, contents, strict=True)]
    if failed:
        del contents  # the failed reads' exceptions: garbage from here on
        _collect_failed_reads()
    return parsed


# A chunk's results on their way from a worker: a file whose boxes are all converted and that has nothing to report
# travels as a tuple (xml, filename, width, height, class names, box texts joined by newlines), which pickles about
# ten times faster than a Parsed (a slots dataclass pickles through a Python __getstate__ per object, and each box
# as its own tuple); any other file travels as its Parsed.
PackedFile = tuple[str, str | None, int | None, int | None, list[str], str]
_BOX_SEPARATOR = "\n"  # never inside a box text: numbers, punctuation and key names only


def _pack(parsed: Parsed) -> PackedFile | Parsed:
    if parsed.boxes is None or parsed.objects or parsed.problems or parsed.error:
        return parsed
    names = list(map(_class_name, parsed.boxes))
    return (parsed.xml, parsed.filename, parsed.width, parsed.height, names,
            _BOX_SEPARATOR.join(map(_box_text, parsed.boxes)))


def _unpack(item: PackedFile | Parsed) -> Parsed:
    if isinstance(item, Parsed):
        return item
    xml, filename, width, height, names, texts = item
    boxes = list(zip(names, texts.split(_BOX_SEPARATOR), strict=True)) if names else []
    return Parsed(xml, filename, width, height, [], boxes, [])


def parse_chunk_packed(uris: list[str], rules: BoxRules) -> list[PackedFile | Parsed]:
    """parse_chunk in a worker process, its results packed for the trip back."""
    return list(map(_pack, parse_chunk(uris, rules)))


def parse_all(uris: list[str], rules: BoxRules, workers: Workers | None = None) -> Iterator[Parsed]:
    """Parse every XML, yielding results in input order (whatever the number of workers) as they arrive,
    so the caller works on early chunks while the workers parse later ones. Workers are handed every chunk now,
    before the first result is asked for; without them, files are parsed when the results are."""
    if workers is None or len(uris) < 64:
        return _parse_here(uris, rules)
    size = max(32, min(_CHUNK_FILES, len(uris) // (workers.count * 8) or 1))
    chunks = [uris[i : i + size] for i in range(0, len(uris), size)]
    return map(_unpack, chain.from_iterable(workers.pool.map(parse_chunk_packed, chunks, repeat(rules))))


def _parse_here(uris: list[str], rules: BoxRules) -> Iterator[Parsed]:
    """In this process, a chunk at a time: parse_chunk holds the bytes of its whole chunk (fetched by threads)."""
    for start in range(0, len(uris), _CHUNK_FILES):
        yield from parse_chunk(uris[start : start + _CHUNK_FILES], rules)


@dataclass(frozen=True)
class Workers:
    pool: Executor
    count: int


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Workers | None]:
    """The processes that list the folders and parse the XML files (None for ``workers <= 1``: all in this one).

    They declare that they start no S3 readers, so the fast S3 client serves their reads and listings from the
    first one, and this process never starts that client's runtime before it forks them. If the conversion
    fails, work not yet started is cancelled instead of run."""
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker)
    try:
        yield Workers(pool, workers)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _start_worker() -> None:
    gc.enable()  # forked from a process that may have its collector paused
    storage.forks_no_readers()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause this process's cyclic garbage collector (see :func:`convert`), restoring its state on the way out."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _collect_failed_reads() -> None:
    """Free what failed S3 reads left: each (a missing object, access denied) leaves about 25 KB in reference
    cycles (the clients' exceptions and their tracebacks), which only the collector frees, and a conversion pauses
    it. Called after a batch of reads that had a failure, so memory stays bounded by one batch's failures.
    Switching the collector on for the reads instead would race with another conversion's pause in a thread."""
    gc.collect()


# ----------------------------------------------------------------------------------- boxes
# The annotation's JSON after its ids. %r is the shortest text that reads back as the same float; the replaces
# print integral values as integers ("12", not "12.0").
_BOX_JSON = '"bbox":[%r,%r,%r,%r],"area":%r,"iscrowd":%d,"difficult":%d,"truncated":%d}'


def plain_boxes(columns: PlainObjects, width: int, height: int, rules: BoxRules) -> list[BoxText] | None:
    """convert_boxes for objects given column by column, when every box is kept as it is (inside the image, not
    degenerate, not dropped): the same text, computed by C loops (map) instead of a Python loop per object.
    None when some box needs convert_boxes (to be clipped, dropped or reported)."""
    if not columns.names:
        return []
    if columns.scale and max(width, height) <= _SCALED_SIDE_LIMIT and (columns.scale == 1 or not rules.voc_offset):
        return _scaled_boxes(columns, width, height, rules)
    names, difficult, truncated = columns.names, columns.difficult, columns.truncated
    x0, y0, x1, y1 = columns.floats()
    if rules.voc_offset:
        x0, y0 = list(map(sub, x0, repeat(1))), list(map(sub, y0, repeat(1)))
    if not _kept_as_written(x0, y0, x1, y1, width, height, difficult, rules):
        return None
    crowd = difficult if rules.difficult == "crowd" else repeat(0)  # (difficult and crowd) for 0/1 flags
    signed_zero = _negative_zero(x0) or _negative_zero(y0)
    if not signed_zero and _integral_boxes(x0, y0, x1, y1, width, height):  # most tools write integers: %d
        w, h = list(map(sub, x1, x0)), list(map(sub, y1, y0))
        area = list(map(mul, w, h))
        if max(area) < _EXACT:
            texts = map(_INT_BOX_JSON.__mod__, zip(x0, y0, w, h, area, crowd, difficult, truncated, strict=False))
            return list(zip(names, texts, strict=True))
    elif not signed_zero and max(width, height) < _FIXED_LIMIT:
        fixed = _fixed_point_texts(x0, y0, x1, y1, crowd, difficult, truncated)
        if fixed is not None:
            return list(zip(names, fixed, strict=True))
    w = list(map(round, map(sub, x1, x0), repeat(6)))  # as convert_boxes computes them, value for value
    h = list(map(round, map(sub, y1, y0), repeat(6)))
    rounded_area = map(round, map(mul, w, h), repeat(6))
    texts = map(_BOX_JSON.__mod__, zip(x0, y0, w, h, rounded_area, crowd, difficult, truncated, strict=False))
    return list(zip(names, map(_integral, texts), strict=True))


def _kept_as_written(x0: list[Any], y0: list[Any], x1: list[Any], y1: list[Any], right: int, bottom: int,
                     difficult: list[int], rules: BoxRules) -> bool:
    """Whether every box lies inside the image (``right`` x ``bottom``), has an area and is not dropped."""
    return not (min(x0) < 0 or min(y0) < 0 or max(x1) > right or max(y1) > bottom or not all(map(lt, x0, x1))
                or not all(map(lt, y0, y1)) or (rules.difficult == "drop" and any(difficult)))


# Coordinates read as integers x scale (PlainObjects.scale: every coordinate written with 0, 1 or 2 decimals) give
# the texts of the integer and fixed-point paths below without float(): the same values, as integers, so the same
# text. Up to this image side every area (at most side x side) is below _FIXED_AREA_LIMIT and 2**53, where those
# paths are exact; larger images take the float paths. The VOC offset is subtracted from integers (exactly, as
# from an integral float); from decimals it goes the float way, whose result is not always the exact decimal
# (8.3 - 1 is 7.300000000000001).
_SCALED_SIDE_LIMIT = 31_622


def _scaled_boxes(columns: PlainObjects, width: int, height: int, rules: BoxRules) -> list[BoxText] | None:
    names, x0, y0, x1, y1, difficult, truncated, scale = columns
    if rules.voc_offset:  # integers only (scale 1)
        x0, y0 = list(map(sub, x0, repeat(1))), list(map(sub, y0, repeat(1)))
    if not _kept_as_written(x0, y0, x1, y1, width * scale, height * scale, difficult, rules):
        return None
    crowd = difficult if rules.difficult == "crowd" else repeat(0)
    w, h = list(map(sub, x1, x0)), list(map(sub, y1, y0))
    area = list(map(mul, w, h))
    texts: Iterable[str]
    if scale == 1:
        texts = map(_INT_BOX_JSON.__mod__, zip(x0, y0, w, h, area, crowd, difficult, truncated, strict=False))
    else:
        texts = _fixed_texts(scale, x0, y0, w, h, area, crowd, difficult, truncated)  # type: ignore[arg-type]
    return list(zip(names, texts, strict=True))


# Integers below 2**53 are exact floats: differences and products of such coordinates are the values round()
# would give, and repr prints them as "12.0" (no exponent below 1e16), which _integral makes "12", as %d does.
_EXACT = 2.0**53
_INT_BOX_JSON = _BOX_JSON.replace("%r", "%d")


def _integral_boxes(x0: list[float], y0: list[float], x1: list[float], y1: list[float], width: int,
                    height: int) -> bool:
    return (width < _EXACT and height < _EXACT
            and all(map(float.is_integer, x0)) and all(map(float.is_integer, y0))
            and all(map(float.is_integer, x1)) and all(map(float.is_integer, y1)))


def _negative_zero(values: list[float]) -> bool:
    """-0.0 among values that are all >= 0: repr keeps its sign ("-0"), the integer paths would not."""
    return 0.0 in values and -1.0 in map(copysign, repeat(1.0), values)


# Coordinates with one or two decimals (labelling tools that write "12.5" or "12.25"), done in integers scaled by
# 10 or 100. With coordinates below 2**24 the float differences are within 1e-8 of the exact decimal, so
# round(x1 - x0, 6) is that decimal's float, and its repr is the decimal written out (at most 15 digits, at least
# 0.01). The area's float product is within 3.4e-16 of itself of w * h, and that (at most 4 decimals, at least
# 1e-4) is what round(w * h, 6) gives while it stays below 1e9. Texts are built from the integer quotient and a
# table of fraction texts ("" for .0, as _integral writes them).
_FIXED_LIMIT = 2**24
_FIXED_AREA_LIMIT = 10**9
_FIXED_BOX_JSON = _BOX_JSON.replace("%r", "%d%s")


def _fraction_texts(digits: int) -> list[str]:
    return [("." + f"{r:0{digits}d}").rstrip("0") if r else "" for r in range(10**digits)]


_FIXED_SCALES = (10, 100)


@functools.cache
def _fraction_tables(scale: int) -> tuple[list[str], list[str]]:
    """The fraction texts of coordinates (x scale) and of areas (x scale**2); built on first use (the 10,000 texts
    of two-decimal areas take 2 ms, which a conversion of integer coordinates need not spend)."""
    digits = len(str(scale)) - 1
    return _fraction_texts(digits), _fraction_texts(2 * digits)


def _scaled(values: list[float], scale: int) -> list[int] | None:
    """values x scale as integers, when each value is exactly the float of such an integer / scale."""
    scaled = list(map(round, map(mul, values, repeat(scale))))
    return scaled if all(map(eq, values, map(truediv, scaled, repeat(scale)))) else None


def _fixed_point_texts(x0: list[float], y0: list[float], x1: list[float], y1: list[float], crowd: Iterable[int],
                       difficult: list[int], truncated: list[int]) -> list[str] | None:
    """The box texts of the general path, for coordinates that all have at most one (or two) decimals; None
    otherwise."""
    for scale in _FIXED_SCALES:
        if ((sx0 := _scaled(x0, scale)) is None or (sy0 := _scaled(y0, scale)) is None
                or (sx1 := _scaled(x1, scale)) is None or (sy1 := _scaled(y1, scale)) is None):
            continue
        sw, sh = list(map(sub, sx1, sx0)), list(map(sub, sy1, sy0))
        area = list(map(mul, sw, sh))
        if max(area) >= _FIXED_AREA_LIMIT * scale * scale:
            return None
        return _fixed_texts(scale, sx0, sy0, sw, sh, area, crowd, difficult, truncated)
    return None


def _fixed_texts(scale: int, sx0: list[int], sy0: list[int], sw: list[int], sh: list[int], area: list[int],
                 crowd: Iterable[int], difficult: list[int], truncated: list[int]) -> list[str]:
    """Box texts from x0, y0, width, height (x scale) and area (x scale**2), all integers."""
    fractions, area_fractions = _fraction_tables(scale)
    parts = [*_decimal_parts(sx0, scale, fractions), *_decimal_parts(sy0, scale, fractions),
             *_decimal_parts(sw, scale, fractions), *_decimal_parts(sh, scale, fractions),
             *_decimal_parts(area, scale * scale, area_fractions)]
    return list(map(_FIXED_BOX_JSON.__mod__, zip(*parts, crowd, difficult, truncated, strict=False)))


def _decimal_parts(scaled: list[int], divisor: int, fractions: list[str]) -> tuple[Iterator[int], Iterator[str]]:
    """The integer part and the fraction text of each scaled / divisor."""
    return map(floordiv, scaled, repeat(divisor)), map(fractions.__getitem__, map(mod, scaled, repeat(divisor)))


def _integral(text: str) -> str:
    return text.replace(".0,", ",").replace(".0]", "]")


def convert_boxes(objects: list[VocObject], width: int, height: int, rules: BoxRules,
                  problems: list[tuple[str, str]]) -> list[BoxText]:
    """COCO boxes for each object: offset applied, clipped to the image, degenerate boxes dropped,
    difficult objects kept, marked crowd or dropped."""
    out = []
    fw, fh = float(width), float(height)
    crowd = rules.difficult == "crowd"
    for obj in objects:
        x0, y0, x1, y1 = obj.xmin, obj.ymin, obj.xmax, obj.ymax
        if rules.voc_offset:  # VOC devkit: 1-based pixel indices, max inclusive
            x0, y0 = x0 - 1, y0 - 1
        if x1 <= x0 or y1 <= y0:
            problems.append(("degenerate_box", f"{obj.name} box ({obj.xmin}, {obj.ymin}, {obj.xmax}, {obj.ymax}) "
                                               "is inverted or has zero area; dropped"))
            continue
        if x0 < 0 or y0 < 0 or x1 > fw or y1 > fh:
            cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(x1, fw), min(y1, fh)
            if cx1 <= cx0 or cy1 <= cy0:
                problems.append(("outside_image", f"{obj.name} box ({obj.xmin}, {obj.ymin}, {obj.xmax}, "
                                                  f"{obj.ymax}) lies outside the {width}x{height} image; dropped"))
                continue
            problems.append(("clipped_box", f"{obj.name} box ({obj.xmin}, {obj.ymin}, {obj.xmax}, {obj.ymax}) "
                                            f"clipped to the {width}x{height} image"))
            x0, y0, x1, y1 = cx0, cy0, cx1, cy1
        difficult = obj.difficult
        if difficult and rules.difficult == "drop":
            problems.append(("difficult_dropped", f"a difficult {obj.name} object was dropped"))
            continue
        w, h = round(x1 - x0, 6), round(y1 - y0, 6)  # 30.75 - 10.3 is 20.449999999999999 in binary
        text = _BOX_JSON % (x0, y0, w, h, round(w * h, 6), difficult and crowd, difficult, obj.truncated)
        out.append((obj.name, _integral(text)))
    return out


# ----------------------------------------------------------------------------------- driver
def _split_name(name: str) -> tuple[str, str]:
    """os.path.splitext of a base name. A conversion splits every file name (40,000 and more for a 20,000-image
    set), and the general function took a fifth of the main process's time for listing and resolving them: a name
    with a dot after a first character that is not a dot splits at its last dot; any other goes the general way."""
    dot = name.rfind(".")
    if dot > 0 and name[0] != "." and "/" not in name:
        return name[:dot], name[dot:]
    return os.path.splitext(name)


def _stem(name: str) -> str:
    return _split_name(name)[0]


def _suffix(name: str) -> str:
    return _split_name(name)[1].lower()


class _Problems:
    def __init__(self) -> None:
        self.by_kind: dict[str, list[tuple[str, str]]] = {}

    def add(self, kind: str, file: str, detail: str) -> None:
        self.by_kind.setdefault(kind, []).append((file, detail))


def _list_names(uri: str) -> dict[str, str]:
    """basename → URI of the files directly inside a folder or prefix."""
    local = _list_local_names(uri) if uri and "://" not in uri else None
    if local is not None:
        return local
    try:
        return {storage.basename(info.uri): info.uri
                for info in storage.list_objects(uri, recursive=False) if not info.is_dir}
    except storage.NotFound as exc:
        if isinstance(exc, storage.BucketNotFound):
            raise
        return {}


def _list_local_names(path: str) -> dict[str, str] | None:
    """What storage.list_objects lists in a local folder, without its stat() and ObjectInfo per file (a tenth of
    the time for 20,000 files); None for anything but a readable folder: the storage layer lists it and says why."""
    try:
        with os.scandir(Path(path)) as entries:
            found = [(entry.name, entry.path) for entry in entries if storage._TMP_MARKER not in entry.name
                     and not entry.is_dir(follow_symlinks=False) and entry.is_file()]
    except OSError:
        return None
    return dict(sorted(found))


def read_labels(uri: str) -> list[str]:
    names: list[str] = []
    for number, line in enumerate(storage.read_text(uri, max_bytes=MAX_LABELS_BYTES).splitlines(), start=1):
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
    files = {name[:-4]: uri for name, uri in _list_names(sets_dir).items() if name.endswith(".txt")}
    splits: dict[str, list[str]] = {}
    for name in wanted if wanted is not None else sorted(files):
        if name not in files:
            raise ConvertError(f"{storage.join(sets_dir, name + '.txt')}: no such split file "
                               f"(present: {', '.join(sorted(files)) or 'none'})")
        rows = [line.split() for line in storage.read_text(files[name], max_bytes=MAX_SPLIT_BYTES).splitlines()]
        rows = [row for row in rows if row]
        if wanted is None and any(len(row) != 1 for row in rows):
            continue  # e.g. aeroplane_train.txt: "<id> 1/-1" per line
        splits[name] = list(dict.fromkeys(row[0] for row in rows))
    return splits


def _resolve_image(parsed: Parsed, xml_stem: str, images: dict[str, str], by_stem: dict[str, list[str]],
                   problems: _Problems) -> str | None:
    """The JPEGImages file an annotation (named ``xml_stem`` + ".xml") describes; never a path outside the image
    folder."""
    given = parsed.filename or ""
    base = given.replace("\\", "/").rstrip("/").rpartition("/")[2]
    if base != given.strip():
        problems.add("filename_has_directory", parsed.xml, f"<filename> {given!r} has directory parts; "
                                                           f"using {base!r} inside the image folder")
    if base in ("", ".", ".."):
        if given:
            problems.add("unsafe_filename", parsed.xml, f"<filename> {given!r} names no file")
            return None
    elif base in images:
        if _stem(base) != xml_stem:
            problems.add("filename_mismatch", parsed.xml, f"<filename> {base!r} differs from the XML's name")
        return base
    elif _suffix(base) not in IMAGE_EXTENSIONS and by_stem.get(base):
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


def _name_image(parsed: Parsed, problems: _Problems) -> str | None:
    """--annotations-only: the image is the base name of <filename> (there is no folder to look in)."""
    given = (parsed.filename or "").strip()
    base = given.replace("\\", "/").rstrip("/").rpartition("/")[2]
    if not given:
        problems.add("missing_image", parsed.xml, "no <filename>: with --annotations-only the image is named only "
                                                  "by it; skipped")
        return None
    if base in ("", ".", ".."):
        problems.add("unsafe_filename", parsed.xml, f"<filename> {given!r} names no file")
        return None
    if base != given:
        problems.add("filename_has_directory", parsed.xml, f"<filename> {given!r} has directory parts; "
                                                           f"using {base!r}")
    return base


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


@dataclass
class _VocTree:
    """What a VOC folder holds, listed once: annotation files, image files (by name and by stem), the splits."""

    ann_dir: str
    xmls: dict[str, str]  # file name -> URI
    images: dict[str, str]
    by_stem: dict[str, list[str]]  # image stem -> file names, preferred extension first
    splits: dict[str, list[str] | None]  # split -> image ids (None: every image)


@_collector_paused()
def convert(options: ConvertOptions, on_progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert a VOC tree; returns what was written and every problem. Raises ConvertError/StorageError
    only when nothing sensible can be produced.

    The cyclic garbage collector of this process is paused for the whole conversion (the workers run with theirs):
    the records it builds, one or more per file, hold no reference cycles, yet with 20,000 of them alive each of
    the collector's passes walked them all: pausing it took about a tenth off a 20,000-file conversion, with one
    worker or two (numbering the annotations alone ran three times as fast). What failed S3 reads leave is
    collected after each batch that had one (:func:`_collect_failed_reads`); the little cyclic garbage the rest
    leaves (boto3's: a few objects per request) is collected once the conversion returns."""
    say = on_progress or (lambda text: log.info("%s", text))
    if options.difficult not in ("keep", "crowd", "drop"):
        raise ConvertError(f"--difficult must be keep, crowd or drop, not {options.difficult!r}")
    problems = _Problems()
    result = ConvertResult(strict=options.strict)
    labels = read_labels(options.labels) if options.labels else None
    rules = BoxRules(options.voc_offset, options.difficult)
    with worker_pool(options.workers) as workers:
        listing = _TreeListing(options, workers)
        xmls = listing.annotations()
        names = sorted(xmls)
        say(f"parsing {len(names)} annotation files from {listing.ann_dir} with {options.workers} workers")
        parsed = parse_all([xmls[n] for n in names], rules, workers)  # the workers start on them now
        tree = listing.tree(xmls)
        kept = _keep_annotated(parsed, tree, options, problems, rules)
    categories, mapping, per_class = _classes(kept, labels, problems)
    entries = _entries(kept, mapping, problems)
    members_by_split = _split_members(tree, entries, kept, problems)
    for split, chosen in members_by_split.items():
        result.split_images[split] = len(chosen)
        result.split_objects[split] = sum(len(e.boxes) for e in chosen)
    result.images = len(entries)
    result.objects_per_class = {name: per_class[name] for name in categories}
    result.categories = categories
    result.problems = {kind: problems.by_kind[kind] for kind in sorted(problems.by_kind)}

    if options.strict and result.exit_code:
        say("not writing outputs: --strict and problems were found")
    else:
        for split, chosen in members_by_split.items():
            uri = storage.join(options.out, f"{split}.json")
            with storage.open_write(uri) as stream:
                write_coco(stream, chosen, categories, f"{split} split, converted from Pascal VOC")
            result.outputs[split] = uri
    if options.report:
        storage.write_text(options.report, json.dumps(report_dict(result), indent=2, ensure_ascii=False) + "\n")
    return result


class _TreeListing:
    """A VOC folder's two listings, started together (in two workers when there is a pool: for 20,000 images that
    is 40,000 names, which this process then only unpickles). The annotation files are taken first, so the workers
    can start parsing them while the image folder, the longer listing, is still being listed."""

    def __init__(self, options: ConvertOptions, workers: Workers | None) -> None:
        self.options = options
        self.root = options.voc_root.rstrip("/") if storage.is_s3(options.voc_root) else options.voc_root
        self.ann_dir, self.img_dir = storage.join(self.root, "Annotations"), storage.join(self.root, "JPEGImages")
        run = workers.pool.submit if workers is not None else _run_now
        self._xmls = run(_list_xmls, self.ann_dir)
        self._images = None if options.annotations_only else run(_list_images, self.img_dir)

    def annotations(self) -> dict[str, str]:
        """Annotation file name -> URI."""
        xmls: dict[str, str] = self._xmls.result()
        if not xmls:
            if self._images is not None:
                self._images.cancel()
            raise ConvertError(f"{self.ann_dir}: no .xml annotation files found (expected a Pascal VOC folder)")
        return xmls

    def tree(self, xmls: dict[str, str]) -> _VocTree:
        """The whole tree, once the image folder is listed, with the split files read."""
        images, by_stem = self._images.result() if self._images is not None else ({}, {})
        if not images and not self.options.annotations_only:
            raise ConvertError(f"{self.img_dir}: no image files found (expected a Pascal VOC folder); if the images "
                               "are stored elsewhere, --annotations-only converts from the XML alone (sizes from "
                               "<size>)")
        splits: dict[str, list[str] | None] = {"all": None}
        if not self.options.all:
            found = read_splits(storage.join(self.root, "ImageSets", "Main"), self.options.splits)
            splits = {name: ids for name, ids in found.items()} if found else splits
        return _VocTree(self.ann_dir, xmls, images, by_stem, splits)


def _list_voc_tree(options: ConvertOptions, workers: Workers | None = None) -> _VocTree:
    """The listed tree, all at once (what a caller that parses nothing meanwhile needs)."""
    listing = _TreeListing(options, workers)
    return listing.tree(listing.annotations())


def _run_now(fn: Callable[[str], Any], arg: str) -> Future[Any]:
    done: Future[Any] = Future()
    try:
        done.set_result(fn(arg))
    except BaseException as exc:
        done.set_exception(exc)
    return done


def _list_xmls(ann_dir: str) -> dict[str, str]:
    return {n: u for n, u in _list_names(ann_dir).items() if n.lower().endswith(".xml")}


def _list_images(img_dir: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(image file name -> URI, image stem -> file names with the preferred extension first)."""
    listed = _list_names(img_dir)
    split = {name: _split_name(name) for name in listed}  # once per image: 20,000 images are common
    images = {name: uri for name, uri in listed.items() if split[name][1].lower() in IMAGE_EXTENSIONS}
    by_stem: dict[str, list[str]] = {}
    for name in sorted(images, key=lambda n: (IMAGE_EXTENSIONS.index(split[n][1].lower()), n)):
        by_stem.setdefault(split[name][0], []).append(name)
    return images, by_stem


def _keep_annotated(parsed_list: Iterable[Parsed], tree: _VocTree, options: ConvertOptions, problems: _Problems,
                    rules: BoxRules) -> dict[str, tuple[Parsed, str]]:
    """xml stem -> (parsed, image file) for every usable annotation, with its image size. Resolved in sorted
    order: the first XML naming an image keeps it."""
    kept: dict[str, tuple[Parsed, str]] = {}
    owner: dict[str, str] = {}
    need_size: list[tuple[Parsed, str]] = []
    for parsed in parsed_list:
        if parsed.error:
            problems.add(parsed.error[0], parsed.xml, parsed.error[1])
            continue
        for kind, detail in parsed.problems:
            problems.add(kind, parsed.xml, detail)
        parsed.problems.clear()  # what finish() adds later is reported with the boxes
        xml_stem = _stem(parsed.xml)
        image = _name_image(parsed, problems) if options.annotations_only else \
            _resolve_image(parsed, xml_stem, tree.images, tree.by_stem, problems)
        if image is None:
            continue
        if image in owner:
            problems.add("duplicate_image", parsed.xml, f"names image {image!r}, already annotated by {owner[image]}")
            continue
        owner[image] = parsed.xml
        kept[xml_stem] = (parsed, image)
        if parsed.width is None or parsed.height is None:
            need_size.append((parsed, image))
    if options.annotations_only:
        for parsed, image in need_size:
            problems.add("no_size", parsed.xml, f"<size> is missing or zero and --annotations-only reads no image "
                                                f"header (for {image!r})")
    else:
        _fill_sizes(need_size, tree.images, problems, rules)
    return kept


def _classes(kept: dict[str, tuple[Parsed, str]], labels: list[str] | None,
             problems: _Problems) -> tuple[list[str], dict[str, str | None], Counter[str]]:
    """The categories; for every class name seen, its category (None: not in the labels file); and the number
    of objects of each category (the boxes _entries keeps: those of every kept file with a size)."""
    seen: Counter[str] = Counter()
    first_file: dict[str, str] = {}
    for parsed, _ in kept.values():
        seen.update(map(_class_name, parsed.boxes or ()))
        if len(seen) > len(first_file):  # names not seen before
            for name in seen.keys() - first_file.keys():
                first_file[name] = parsed.xml
    categories, mapping = _settle_classes(seen, labels, problems, first_file)
    per_category: Counter[str] = Counter()
    for name, count in seen.items():
        category = mapping[name]
        if category is not None:
            per_category[category] += count
    return categories, mapping, per_category


def _entries(kept: dict[str, tuple[Parsed, str]], mapping: dict[str, str | None],
             problems: _Problems) -> dict[str, ImageEntry]:
    """Boxes -> entries with global ids (sorted XML order), so ids are the same in every split."""
    renamed = {name for name, category in mapping.items() if category != name}  # case merges, unknown classes
    entries: dict[str, ImageEntry] = {}
    next_image_id = next_annotation_id = 1
    for stem in sorted(kept):
        parsed, image = kept[stem]
        if parsed.boxes is None or parsed.width is None or parsed.height is None:
            continue  # no size: reported as no_size
        for kind, detail in parsed.problems:
            problems.add(kind, parsed.xml, detail)
        rows: list[AnnotationRow] = parsed.boxes  # (name, json) already: only renamed classes need work
        if renamed and any(name in renamed for name, _ in rows):
            rows = []
            for name, text in parsed.boxes:
                category = mapping.get(name)
                if category is None:
                    problems.add("unknown_class", parsed.xml, f"class {name!r} is not in the labels file; skipped")
                    continue
                rows.append((category, text))
        if not rows:
            problems.add("no_objects", parsed.xml, "no usable objects (kept as an image without boxes)")
        entries[stem] = ImageEntry(next_image_id, image, parsed.width, parsed.height, rows, next_annotation_id)
        next_image_id += 1
        next_annotation_id += len(rows)
    return entries


def _split_members(tree: _VocTree, entries: dict[str, ImageEntry], kept: dict[str, tuple[Parsed, str]],
                   problems: _Problems) -> dict[str, list[ImageEntry]]:
    """Each split's images in id order (membership decided before any document is streamed out)."""
    members_by_split: dict[str, list[ImageEntry]] = {}
    for split, ids in tree.splits.items():
        chosen: list[ImageEntry] = []
        for image_id in (list(entries) if ids is None else ids):
            entry = entries.get(image_id)
            if entry is not None:
                chosen.append(entry)
            elif ids is not None and image_id not in kept and f"{image_id}.xml" not in tree.xmls:
                problems.add("missing_annotation", f"ImageSets/Main/{split}.txt",
                             f"id {image_id!r} has no Annotations/{image_id}.xml")
        chosen.sort(key=lambda e: e.id)
        members_by_split[split] = chosen
    return members_by_split


def _fill_sizes(need: list[tuple[Parsed, str]], images: dict[str, str], problems: _Problems,
                rules: BoxRules) -> None:
    """Width and height from the image header for annotations whose <size> is missing or zero."""
    if not need:
        return
    from trainer.annotations.image_size import header_size  # Pillow: 8 ms of imports most conversions never need

    def probe(item: tuple[Parsed, str]) -> tuple[int, int] | None:
        try:
            with storage.open_read(images[item[1]], buffer_size=64 * 1024) as stream:
                return header_size(stream)
        except storage.StorageError:
            return None

    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        sizes = list(pool.map(probe, need))
    if None in sizes:
        _collect_failed_reads()
    for (parsed, image), size in zip(need, sizes, strict=True):
        if size is None:
            problems.add("no_size", parsed.xml, f"<size> is missing or zero and {image!r} has no readable header")
            continue
        parsed.width, parsed.height = size
        parsed.finish(rules)
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

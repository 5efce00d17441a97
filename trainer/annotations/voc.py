"""Parse one Pascal VOC annotation file, safely and fast, into plain values.

Safety: a document that carries a DTD (the only place entities can be declared) is parsed by defusedxml, which
refuses entity declarations and external references. A document without a DTD cannot declare entities, so the
C ElementTree parser gives the same result several times faster; every document is transcoded to UTF-8 first
(its encoding detected as the XML specification says: BOM, first bytes, declaration), so the DTD check sees the
real characters whatever the encoding, and the parser is never left to guess one.

Nothing here raises for bad data except :class:`VocError` (the whole file is unusable); object-level problems
are returned as ``(kind, detail)`` pairs and the object is dropped or repaired.
"""

from __future__ import annotations

import codecs
import math
import re
import sys
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import NamedTuple

import defusedxml
import defusedxml.ElementTree as SafeET

_DECLARED_ENCODING = re.compile(rb"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_EXPAT_NATIVE = {"utf-8", "utf8", "us-ascii", "ascii"}


class VocError(Exception):
    """The file cannot be used at all; ``kind`` is a short machine-readable problem name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class VocObject(NamedTuple):
    """One object as written in the XML (coordinates not yet offset or clipped)."""

    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: int
    truncated: int


@dataclass(slots=True)
class VocRecord:
    filename: str | None
    width: int | None  # None when <size> is missing, zero or not a number
    height: int | None
    objects: list[VocObject] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def normalise_name(name: str) -> str:
    """Class names are compared after stripping surrounding whitespace and Unicode NFC normalisation."""
    return unicodedata.normalize("NFC", name.strip())


_label_cache: dict[str, str] = {}


def _label(raw: str | None) -> str:
    """normalise_name with a cache: a data set repeats a handful of names hundreds of thousands of times."""
    if raw is None:
        return ""
    label = _label_cache.get(raw)
    if label is None:
        if len(_label_cache) > 100_000:
            _label_cache.clear()
        label = _label_cache[raw] = sys.intern(normalise_name(raw))
    return label


# XML 1.0, appendix F: without a byte-order mark, the first four bytes of "<?xml" (or of any "<" and a letter)
# tell UTF-32 and UTF-16 documents apart from ASCII-compatible ones.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
              (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_WIDE_ENCODINGS = {"utf-16", "utf-16le", "utf-16be", "utf-32", "utf-32le", "utf-32be", "ucs-2", "ucs-4",
                   "iso-10646-ucs-2", "iso-10646-ucs-4", "utf16", "utf32"}


def _sniff_wide(head: bytes) -> str | None:
    """The UTF-16/32 variant a BOM-less document starts in (its first character is ASCII, e.g. '<'), or None."""
    if len(head) < 4:
        return None
    a, b, c, d = head[:4]
    if a == b == c == 0 and d:
        return "utf-32-be"
    if a and b == c == d == 0:
        return "utf-32-le"
    if a == 0 and b and c == 0 and d:
        return "utf-16-be"
    if a and b == 0 and c and d == 0:
        return "utf-16-le"
    return None


def to_utf8(data: bytes) -> bytes:
    """The document as UTF-8 bytes with a matching prolog, whatever its BOM or encoding, detected as the XML
    specification says (BOM, else the first bytes of a UTF-16/32 document, else the declaration; no
    declaration means UTF-8). Bytes that are not valid in that encoding are ``bad_encoding``. Everything after
    this (the entity check first of all) sees the real characters."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[3:]
    else:
        wide = next((name for bom, name in _WIDE_BOMS if data.startswith(bom)), None) or _sniff_wide(data)
        if wide is not None:
            return _redeclare(_decode(data, wide))
    match = _DECLARED_ENCODING.match(data)
    encoding = match.group(1).decode("ascii").lower() if match else "utf-8"
    if encoding in _WIDE_ENCODINGS:
        raise VocError("bad_encoding", f"the prolog declares {encoding!r} but the document is not in "
                                       "UTF-16/32 (no byte-order mark, one byte per ASCII character)")
    if encoding in _EXPAT_NATIVE:
        _decode(data, "utf-8" if encoding.startswith("utf") else "ascii", declared=match is not None)
        return data
    return _redeclare(_decode(data, encoding))


def _decode(data: bytes, encoding: str, declared: bool = True) -> str:
    try:
        return data.decode(encoding)
    except LookupError as exc:
        raise VocError("bad_encoding", f"unknown encoding {encoding!r} declared in the XML prolog") from exc
    except UnicodeDecodeError as exc:
        how = "" if declared else " (no encoding is declared, so it must be UTF-8)"
        raise VocError("bad_encoding", f"bytes at offset {exc.start} are not valid {encoding}{how}") from exc


def _redeclare(text: str) -> bytes:
    if text.startswith("<?xml"):
        end = text.find("?>")
        text = '<?xml version="1.0" encoding="utf-8"' + text[end:] if end > 0 else text
    return text.encode("utf-8")


def parse_tree(data: bytes) -> ET.Element:
    """Parse bytes into an element tree, refusing entity declarations and external references."""
    if not data.strip():
        raise VocError("empty_file", "the file is empty")
    data = to_utf8(data)
    try:
        if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            return SafeET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)
        return ET.fromstring(data)
    except defusedxml.DefusedXmlException as exc:
        raise VocError("unsafe_xml", f"refused: {exc} (entity declarations and external references are not "
                                     "allowed in annotations)") from exc
    except ET.ParseError as exc:
        line, column = exc.position
        reason = str(exc).split(":", 1)[0]
        raise VocError("malformed_xml", f"not well-formed XML ({reason}, line {line}, column {column})") from exc


def _strip_namespaces(root: ET.Element) -> None:
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag[:1] == "{":
            element.tag = element.tag.rpartition("}")[2]


def _dimension(text: str | None) -> int | None:
    """A positive integral size ("640", " 640 ", "640.0"), or None."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or value <= 0 or value != int(value):
        return None
    return int(value)


_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}


def _flag(text: str | None, what: str, problems: list[tuple[str, str]]) -> int:
    value = (text or "").strip().lower()
    if value in _TRUE:
        return 1
    if value not in _FALSE:
        problems.append(("bad_flag", f"<{what}> is {text!r}; read as 0"))
    return 0


def parse_voc(data: bytes) -> VocRecord:
    """The useful content of one VOC XML document (raises VocError if there is none)."""
    root = parse_tree(data)
    if root.tag[:1] == "{":
        _strip_namespaces(root)
    if root.tag != "annotation":
        raise VocError("not_voc", f"the root element is <{root.tag}>, expected <annotation>")
    record = VocRecord(filename=None, width=None, height=None)
    problems = record.problems
    for child in root:
        tag = child.tag
        if tag == "object":
            obj = _parse_object(child, problems)
            if obj is not None:
                record.objects.append(obj)
        elif tag == "filename":
            record.filename = (child.text or "").strip() or None
        elif tag == "size":
            for part in child:
                if part.tag == "width":
                    record.width = _dimension(part.text)
                elif part.tag == "height":
                    record.height = _dimension(part.text)
    return record


def _parse_object(element: ET.Element, problems: list[tuple[str, str]]) -> VocObject | None:
    name = difficult = truncated = box = None
    parts = 0
    for child in element:  # direct children only: a <part> has its own <name> and <bndbox>
        tag = child.tag
        if tag == "name":
            name = child.text
        elif tag == "bndbox":
            box = child
        elif tag == "difficult":
            difficult = child.text
        elif tag == "truncated":
            truncated = child.text
        elif tag == "part":
            parts += 1
    if parts:
        problems.append(("part_ignored", f"{parts} <part> sub-objects of one object are not objects"))
    label = _label(name)
    if not label:
        problems.append(("missing_name", "an <object> without a <name> was dropped"))
        return None
    if box is None:
        problems.append(("missing_bndbox", f"a {label!r} object without <bndbox> was dropped"))
        return None
    xmin = ymin = xmax = ymax = None
    for child in box:
        tag = child.tag
        if tag == "xmin":
            xmin = child.text
        elif tag == "ymin":
            ymin = child.text
        elif tag == "xmax":
            xmax = child.text
        elif tag == "ymax":
            ymax = child.text
    try:
        x0, y0, x1, y1 = float(xmin), float(ymin), float(xmax), float(ymax)  # type: ignore[arg-type]
        valid = math.isfinite(x0 + y0 + x1 + y1)  # any nan or inf makes the sum non-finite
    except (TypeError, ValueError):
        valid = False
    if not valid:
        problems.append(("bad_coordinate", f"a {label!r} box with a missing or non-numeric coordinate "
                                           f"(xmin={xmin!r}, ymin={ymin!r}, xmax={xmax!r}, ymax={ymax!r}) was dropped"))
        return None
    d = (0 if difficult is None or difficult == "0" else 1 if difficult == "1"
         else _flag(difficult, "difficult", problems))
    t = (0 if truncated is None or truncated == "0" else 1 if truncated == "1"
         else _flag(truncated, "truncated", problems))
    return VocObject(label, x0, y0, x1, y1, d, t)

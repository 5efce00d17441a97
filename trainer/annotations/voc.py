"""Parse one Pascal VOC annotation file, safely and fast, into plain values.

Safety: a document that carries a DTD (the only place entities can be declared) is parsed by defusedxml, which
refuses entity declarations and external references. A document without a DTD cannot declare entities, so the
C ElementTree parser gives the same result several times faster; every document is transcoded to UTF-8 first
(its encoding detected as the XML specification says: BOM, first bytes, declaration), so the DTD check sees the
real characters whatever the encoding, and the parser is never left to guess one.

Speed: most files come from a handful of tools in one plain shape (see "fast path" below). :func:`parse_plain`
matches exactly that shape with a few regular expressions that check every start tag against its end tag, so a
document it accepts is well-formed XML without markup that could declare or expand anything (no DTD, comments,
references or processing instructions); it returns the record :func:`parse_voc_tree` would, and None for any
document that is malformed, unusual or has anything to report, which then goes through the parser as before.

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
from itertools import repeat
from operator import add, truediv
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
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # e.g. encoding="unicode_escape" and "\ud800": no character at all
        raise VocError("bad_encoding", f"the declared encoding decodes to a lone surrogate at offset {exc.start}, "
                                       "not a character") from exc


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
    return parse_plain(data) or parse_voc_tree(data)


def parse_voc_tree(data: bytes) -> VocRecord:
    """parse_voc through the XML parser: every document, every problem (the reference for :func:`parse_plain`)."""
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


# ----------------------------------------------------------------------------------------------- fast path
# Most VOC files are written by a handful of tools in one plain shape: a prolog, <annotation>, leaf elements and
# containers of leaves (<size>, <source>), then <object>s of leaves and one <bndbox>, and no markup beyond start
# and end tags: no comments, CDATA, DOCTYPE, processing instructions, references (&...;), attributes (but one on
# the root) or namespaces, and character data without "<", ">", "&" or control characters. The patterns below
# match exactly such documents, element by element with each end tag matching its start tag, so a document they
# match is well-formed XML whose tree parse_voc_tree would read to the same record. parse_plain accepts a
# document only when it also has nothing to report (every value present and valid); anything else, malformed or
# merely unusual, goes to the parser, which decides and reports exactly as before.
# Runs of spaces and of text are possessive (*+: never given back), which saves the matcher a tenth of its time:
# each is followed by "<" or a character it cannot contain, so giving characters back could never lead to a match.
_S = rb"[ \t\n]*+"  # after line-end normalisation there is no \r left
_NAME = rb"[A-Za-z_][A-Za-z0-9_.-]*"
_TEXT = rb"[^<>&\x00-\x08\x0b\x0c\x0e-\x1f]*+"
_PLAIN_START = re.compile(
    rb"(?:<\?xml[ \t\n]+version[ \t\n]*=[ \t\n]*(?:\"1\.0\"|'1\.0')"
    rb"(?:[ \t\n]+encoding[ \t\n]*=[ \t\n]*(?:\"[Uu][Tt][Ff]-8\"|'[Uu][Tt][Ff]-8'))?"
    rb"(?:[ \t\n]+standalone[ \t\n]*=[ \t\n]*(?:\"(?:yes|no)\"|'(?:yes|no)'))?[ \t\n]*\?>)?" + _S +
    rb"<annotation(?:[ \t\n]+(?![Xx][Mm][Ll])" + _NAME + rb"[ \t\n]*=[ \t\n]*"
    rb"(?:\"[^\"<&\x00-\x08\x0b\x0c\x0e-\x1f]*\"|'[^'<&\x00-\x08\x0b\x0c\x0e-\x1f]*'))?[ \t\n]*>")
# A child of <annotation> before the first <object>: a leaf (group 2: its text) or a container of leaves (group 3),
# or, as group 5, the first character of anything else (which sends the document to the parser).
_PLAIN_ITEM = re.compile(_S + rb"(?:<(?!object>)(" + _NAME + rb")>(?:(" + _TEXT + rb")|((?:" + _S + rb"<(" + _NAME +
                         rb")>" + _TEXT + rb"</\4>)*" + _S + rb"))</\1>|([^ \t\n]))")
_PLAIN_LEAF = re.compile(rb"<(" + _NAME + rb")>(" + _TEXT + rb")</\1>")
# One <object> in the common element order (groups: name, truncated, difficult, xmin, ymin, xmax, ymax), or, as
# group 8, the first character of anything else (which sends the document to the parser).
_PLAIN_OBJECT = re.compile(
    _S + rb"(?:<object>" + _S + rb"<name>(" + _TEXT + rb")</name>" + _S +
    rb"(?:<pose>" + _TEXT + rb"</pose>" + _S + rb")?(?:<truncated>(" + _TEXT + rb")</truncated>" + _S + rb")?"
    rb"(?:<difficult>(" + _TEXT + rb")</difficult>" + _S + rb")?(?:<occluded>" + _TEXT + rb"</occluded>" + _S + rb")?"
    rb"<bndbox>" + _S + rb"<xmin>(" + _TEXT + rb")</xmin>" + _S + rb"<ymin>(" + _TEXT + rb")</ymin>" + _S +
    rb"<xmax>(" + _TEXT + rb")</xmax>" + _S + rb"<ymax>(" + _TEXT + rb")</ymax>" + _S + rb"</bndbox>" + _S +
    rb"</object>|([^ \t\n]))")
_PLAIN_END = re.compile(_S + rb"</annotation>" + _S)
_FLAG = {b"": 0, b"0": 0, b"1": 1}  # an empty or absent flag reads as 0 in the tree too
_plain_labels: dict[bytes, str] = {}


class PlainObjects(NamedTuple):
    """The objects of a plain document, column by column.

    With ``scale`` 0 the coordinates are floats. When every coordinate of the document is written as a plain
    decimal with the same number of decimals, at most two ("12", "12.5", "12.25": what labelling tools write),
    they are the exact integers coordinate x ``scale`` (1, 10 or 100) instead, read from the text without
    ``float()``: the converter computes its box texts from those integers, and :meth:`floats` gives the values
    ``float()`` would have read (an integer divided by an integer is correctly rounded, as ``float()`` is)."""

    names: list[str]
    x0: list[float] | list[int]
    y0: list[float] | list[int]
    x1: list[float] | list[int]
    y1: list[float] | list[int]
    difficult: list[int]
    truncated: list[int]
    scale: int = 0

    def floats(self) -> tuple[list[float], list[float], list[float], list[float]]:
        """xmin, ymin, xmax, ymax as floats."""
        columns = self.x0, self.y0, self.x1, self.y1
        if not self.scale:
            return columns  # type: ignore[return-value]
        x0, y0, x1, y1 = (list(map(truediv, values, repeat(self.scale))) for values in columns)
        return x0, y0, x1, y1

    def objects(self) -> list[VocObject]:
        return list(map(VocObject, self.names, *self.floats(), self.difficult, self.truncated))


# A document's coordinates, joined by single spaces, when all are plain decimals with 0, 1 or 2 decimals. The digits
# are bounded, so every value x scale is an exact integer far below 2**53. Reading them this way holds their texts
# and integers together for a moment, about 100 bytes a coordinate: documents with more objects than any labelling
# tool writes take the float way, whose memory is a third of that (a 60 MB file of 600,000 objects peaked at 640 MB
# the text way, against 410 MB).
_PLAIN_DECIMALS_MAX_OBJECTS = 4096
_PLAIN_DECIMALS = (re.compile(rb"[0-9]{1,15}(?: [0-9]{1,15})*"),
                   re.compile(rb"[0-9]{1,9}\.[0-9](?: [0-9]{1,9}\.[0-9])*"),
                   re.compile(rb"[0-9]{1,9}\.[0-9]{2}(?: [0-9]{1,9}\.[0-9]{2})*"))


def parse_plain(data: bytes) -> VocRecord | None:
    """The record of a plain, problem-free VOC document without the XML parser, or None: use parse_voc_tree."""
    plain = parse_plain_columns(data)
    if plain is None:
        return None
    filename, width, height, columns = plain
    return VocRecord(filename, width, height, columns.objects(), [])


def parse_plain_columns(data: bytes) -> tuple[str, int, int, PlainObjects] | None:
    """(filename, width, height, objects) of a plain, problem-free VOC document, or None: use parse_voc_tree."""
    if data[:1] != b"<" and data[:3] != codecs.BOM_UTF8:  # only UTF-8 (or ASCII) documents can be plain
        return None
    if data[:3] == codecs.BOM_UTF8:
        data = data[3:]
    if b"\r" in data:  # XML end-of-line handling, as the parser does before anything else
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    start = _PLAIN_START.match(data)
    end = data.rfind(b"</annotation>")
    if start is None or end < 0 or _PLAIN_END.fullmatch(data, end) is None:
        return None
    if not data.isascii():
        if b"\xef\xbf\xbe" in data or b"\xef\xbf\xbf" in data:  # U+FFFE, U+FFFF: not XML characters
            return None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    first = data.find(b"<object>", start.end(), end)
    head = _plain_head(data, start.end(), end if first < 0 else first)
    objects = None if head is None or first < 0 else _plain_objects(data, first, end)
    if head is None or (objects is None and first >= 0):
        return None
    return head[0], head[1], head[2], objects or PlainObjects([], [], [], [], [], [], [])


def _plain_head(data: bytes, pos: int, end: int) -> tuple[str, int, int] | None:
    """(filename, width, height) from the children of <annotation> between pos and end, or None."""
    filename = width = height = None
    for tag, text, content, _, other in _PLAIN_ITEM.findall(data, pos, end):
        if other:
            return None
        if tag == b"filename":
            if content:  # a <filename> with child elements: let the parser decide
                return None
            filename = text.decode().strip() or None
        elif tag == b"size" and content:
            for part, value in _PLAIN_LEAF.findall(content):
                if part == b"width":
                    width = _dimension(value)  # float() reads ASCII bytes as it reads str
                elif part == b"height":
                    height = _dimension(value)
    if filename is None or width is None or height is None:
        return None
    return filename, width, height


def _plain_objects(data: bytes, pos: int, end: int) -> PlainObjects | None:
    """Every <object> between pos and end, each in the plain shape and valid, or None."""
    rows = _PLAIN_OBJECT.findall(data, pos, end)
    names, truncated, difficult, xmin, ymin, xmax, ymax, other = zip(*rows, strict=True)
    if any(other):
        return None
    labels = list(map(_plain_labels.get, names))
    if None in labels:
        for i, name in enumerate(names):
            label = labels[i] = _label(name.decode()) if name else ""
            if not label:
                return None
            if len(_plain_labels) > 100_000:
                _plain_labels.clear()
            _plain_labels[name] = label
    try:
        flags = list(map(_FLAG.__getitem__, difficult)), list(map(_FLAG.__getitem__, truncated))
    except KeyError:  # a flag other than 0/1
        return None
    scaled = _scaled_coordinates(xmin, ymin, xmax, ymax)
    if scaled is not None:
        return PlainObjects(labels, *scaled[1:], flags[0], flags[1], scaled[0])  # type: ignore[arg-type]
    try:
        x0, y0, x1, y1 = list(map(float, xmin)), list(map(float, ymin)), list(map(float, xmax)), list(map(float, ymax))
    except ValueError:  # a coordinate that is not a number
        return None
    if not all(map(math.isfinite, map(add, map(add, map(add, x0, y0), x1), y1))):  # as parse_voc_tree sums them
        return None
    return PlainObjects(labels, x0, y0, x1, y1, flags[0], flags[1])  # type: ignore[arg-type]


def _scaled_coordinates(*columns: tuple[bytes, ...]) -> tuple[int, list[int], list[int], list[int], list[int]] | None:
    """(scale, xmin, ymin, xmax, ymax as integers x scale) when every coordinate text is a plain decimal with the
    same number of decimals (at most two), else None. One pattern checks them all, joined: about half the cost of
    float() on each, and the converter needs these integers anyway."""
    if len(columns[0]) > _PLAIN_DECIMALS_MAX_OBJECTS:
        return None
    texts = columns[0] + columns[1] + columns[2] + columns[3]
    joined = b" ".join(texts)
    dot = joined.find(b".")
    if dot < 0:
        decimals = 0
    else:
        space = joined.find(b" ", dot)
        decimals = (len(joined) if space < 0 else space) - dot - 1
        if decimals > 2:
            return None
    if joined.count(b" ") != len(texts) - 1 or _PLAIN_DECIMALS[decimals].fullmatch(joined) is None:
        return None  # a space inside some text ("1 2"), or a text that is not a plain decimal
    values = list(map(int, texts if not decimals else joined.replace(b".", b"").split()))
    n = len(columns[0])
    return 10**decimals, values[:n], values[n : 2 * n], values[2 * n : 3 * n], values[3 * n :]

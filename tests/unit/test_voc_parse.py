"""parse_voc on the bad inputs users' VOC files really contain: each either parses or fails with a named kind."""

from __future__ import annotations

import codecs
import random

import pytest

from tests.support.voc import voc_xml
from trainer.annotations.voc import VocError, VocRecord, parse_plain, parse_plain_columns, parse_voc, parse_voc_tree

GOOD = voc_xml("a.jpg", [("RBC", 1, 2, 30, 40)])


def error_kind(data: bytes) -> str:
    with pytest.raises(VocError) as info:
        parse_voc(data)
    assert str(info.value)  # always a readable message
    return info.value.kind


def test_a_plain_file_parses_exactly() -> None:
    record = parse_voc(voc_xml("a.jpg", [("RBC", "10.5", 2, "30.25", 40, 1, 1)]).encode())
    assert (record.filename, record.width, record.height) == ("a.jpg", 640, 480)
    [obj] = record.objects
    assert (obj.name, obj.xmin, obj.ymin, obj.xmax, obj.ymax, obj.difficult, obj.truncated) == \
        ("RBC", 10.5, 2.0, 30.25, 40.0, 1, 1)


@pytest.mark.parametrize("data,kind", [
    (b"", "empty_file"),
    (b"   \n\t ", "empty_file"),
    (GOOD.encode()[: len(GOOD) // 2], "malformed_xml"),  # truncated mid-file
    (b"<annotation><object></annotation>", "malformed_xml"),
    (b"not xml at all", "malformed_xml"),
    (b"<html><body/></html>", "not_voc"),
])
def test_unusable_files_fail_with_their_kind(data: bytes, kind: str) -> None:
    assert error_kind(data) == kind


def test_malformed_message_gives_the_position() -> None:
    with pytest.raises(VocError, match=r"line 1, column \d+"):
        parse_voc(b"<annotation><object></annotation>")


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE annotation [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<annotation><filename>&lol3;</filename></annotation>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<annotation><filename>&secret;</filename></annotation>"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE annotation [<!ENTITY % remote SYSTEM "http://127.0.0.1:9/evil.dtd"> %remote;]>
<annotation/>"""


@pytest.mark.parametrize("data", [BILLION_LAUGHS, EXTERNAL_ENTITY, PARAMETER_ENTITY],
                         ids=["entity-bomb", "external-entity", "parameter-entity"])
def test_entity_attacks_are_refused(data: bytes) -> None:
    assert error_kind(data) == "unsafe_xml"


def test_entity_declarations_in_another_encoding_are_still_refused() -> None:
    assert error_kind(codecs.BOM_UTF16_LE + BILLION_LAUGHS.decode().encode("utf-16-le")) == "unsafe_xml"


def test_a_harmless_doctype_is_accepted() -> None:
    data = b'<?xml version="1.0"?>\n<!DOCTYPE annotation>\n' + GOOD.encode()
    assert parse_voc(data).objects[0].name == "RBC"


@pytest.mark.parametrize("encoding", ["iso-8859-1", "windows-1252", "shift_jis", "gb2312"])
def test_non_utf8_encodings_declared_in_the_prolog(encoding: str) -> None:
    name = {"shift_jis": "細胞", "gb2312": "细胞"}.get(encoding, "Globulé")
    text = f'<?xml version="1.0" encoding="{encoding}"?>\n' + voc_xml("a.jpg", [(name, 1, 1, 5, 5)])
    assert parse_voc(text.encode(encoding)).objects[0].name == name


def test_utf8_and_utf16_byte_order_marks() -> None:
    assert parse_voc(codecs.BOM_UTF8 + GOOD.encode()).objects[0].name == "RBC"
    assert parse_voc(GOOD.encode("utf-16")).objects[0].name == "RBC"  # BOM included by the codec


def test_unknown_or_lying_encodings_are_errors() -> None:
    assert error_kind(b'<?xml version="1.0" encoding="klingon-8"?><annotation/>') == "bad_encoding"
    assert error_kind('<?xml version="1.0" encoding="shift_jis"?><annotation>\udcff</annotation>'
                      .encode("utf-8", "surrogateescape")) == "bad_encoding"


def test_an_encoding_that_decodes_to_lone_surrogates_is_bad_encoding_not_a_crash() -> None:
    assert error_kind(b'<?xml version="1.0" encoding="unicode_escape"?><annotation>\\ud800</annotation>') == \
        "bad_encoding"


def test_namespaced_documents() -> None:
    default = GOOD.replace("<annotation>", '<annotation xmlns="http://example.org/voc">')
    assert parse_voc(default.encode()).objects[0].name == "RBC"
    prefixed = (GOOD.replace("<annotation>", '<v:annotation xmlns:v="urn:voc">')
                .replace("</annotation>", "</v:annotation>"))
    assert parse_voc(prefixed.encode()).filename == "a.jpg"


@pytest.mark.parametrize("size_xml", ["", "<size><width>0</width><height>0</height></size>",
                                      "<size><width>abc</width><height>480</height></size>"])
def test_missing_zero_or_bad_size_is_unknown(size_xml: str) -> None:
    record = parse_voc(f"<annotation><filename>a.jpg</filename>{size_xml}</annotation>".encode())
    assert record.width is None or record.height is None


def test_coordinates_padded_float_or_bad() -> None:
    record = parse_voc(voc_xml("a.jpg", [("A", " 12 ", "\n3.5\t", " 40", "50 "), ("B", "1", "two", "3", "4"),
                                         ("C", "nan", 1, 2, 3)]).encode())
    assert [(o.name, o.xmin, o.ymin, o.xmax, o.ymax) for o in record.objects] == [("A", 12, 3.5, 40, 50)]
    assert [kind for kind, _ in record.problems] == ["bad_coordinate", "bad_coordinate"]
    assert "ymin='two'" in record.problems[0][1]


def test_objects_without_box_or_name_and_parts() -> None:
    extra = ("<object><name>nobox</name></object><object><bndbox><xmin>1</xmin></bndbox></object>"
             "<object><name>person</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
             "<part><name>hand</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></part>"
             "<part><name>head</name><bndbox><xmin>4</xmin><ymin>4</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></part>"
             "</object>")
    record = parse_voc(voc_xml("a.jpg", [], extra=extra).encode())
    assert [o.name for o in record.objects] == ["person"]  # parts are not objects
    assert sorted(k for k, _ in record.problems) == ["missing_bndbox", "missing_name", "part_ignored"]


def test_class_names_are_stripped_and_nfc_normalised() -> None:
    decomposed = "Globule\u0301"  # 'e' + combining acute
    record = parse_voc(voc_xml("a.jpg", [(f"  {decomposed}\n", 1, 1, 5, 5)]).encode())
    assert record.objects[0].name == "Globul\u00e9"


def test_flags_accept_common_spellings_and_report_others() -> None:
    record = parse_voc(voc_xml("a.jpg", [("A", 1, 1, 5, 5, "true", "1"), ("B", 1, 1, 5, 5, "maybe", "")]).encode())
    assert [(o.difficult, o.truncated) for o in record.objects] == [(1, 1), (0, 0)]
    assert [k for k, _ in record.problems] == ["bad_flag"]


def test_five_thousand_objects_in_one_file() -> None:
    objects = [("RBC", i % 600, i % 400, i % 600 + 5, i % 400 + 5) for i in range(5000)]
    assert len(parse_voc(voc_xml("big.jpg", objects).encode()).objects) == 5000


@pytest.mark.parametrize("count", [4096, 4097])
def test_coordinates_are_read_from_their_text_only_in_files_of_ordinary_size(count: int) -> None:
    """Reading coordinates as integers from their text holds about 100 bytes a coordinate for a moment: a file
    with more objects than labelling tools write (a hostile one can hold 600,000 within the size limit) reads them
    with float(), in a third of the memory. Both ways give the parser's objects."""
    objects = [("RBC", f"{i % 600}.5", f"{i % 400}.5", f"{i % 600 + 5}.5", f"{i % 400 + 5}.5") for i in range(count)]
    data = voc_xml("big.jpg", objects).encode()
    plain = parse_plain_columns(data)
    assert plain is not None and plain[3].scale == (0 if count > 4096 else 10)
    assert plain[3].objects() == parse_voc_tree(data).objects


# ------------------------------------------------------------------ encodings as the XML spec detects them (issue 14)
ENTITY_DOC = ('<?xml version="1.0" encoding="utf-16"?><!DOCTYPE annotation [<!ENTITY e "EVIL">]>'
              '<annotation><filename>a.jpg</filename><object><name>&e;</name><bndbox><xmin>1</xmin><ymin>1</ymin>'
              '<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>')


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_wide_encodings_without_a_bom_cannot_bypass_the_entity_check(codec: str) -> None:
    """Without a BOM, expat itself recognises '<\\0?\\0' as UTF-16 and expanded the declared entity into a class
    name; the document must be refused like its BOM-carrying twin."""
    assert error_kind(ENTITY_DOC.replace("utf-16", codec[:6]).encode(codec)) == "unsafe_xml"
    assert error_kind(codecs.BOM_UTF16_LE + ENTITY_DOC.encode("utf-16-le")) == "unsafe_xml"


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_wide_encodings_without_a_bom_or_prolog_parse(codec: str) -> None:
    record = parse_voc(voc_xml("ré.jpg", [("RBC", 1, 2, 30, 40)]).encode(codec))
    assert record.filename == "ré.jpg" and record.objects[0].name == "RBC"


def test_undeclared_non_utf8_bytes_are_bad_encoding_not_malformed_xml() -> None:
    latin1 = voc_xml("café.jpg", [("RBC", 1, 2, 30, 40)]).encode("latin-1")
    assert error_kind(latin1) == "bad_encoding"
    assert error_kind(b'<?xml version="1.0"?>\n' + latin1) == "bad_encoding"
    assert error_kind(b'<?xml version="1.0" encoding="utf-8"?>\n' + latin1) == "bad_encoding"
    assert error_kind(b'<?xml version="1.0" encoding="UTF-16"?>\n' + latin1) == "bad_encoding"  # a false claim
    declared = parse_voc(b'<?xml version="1.0" encoding="ISO-8859-1"?>\n' + latin1)
    assert declared.filename == "café.jpg"


# ------------------------------------------------------------------ the fast path (issue 16): same record or none
def tree_outcome(data: bytes) -> VocRecord | str:
    try:
        return parse_voc_tree(data)
    except VocError as exc:
        return exc.kind


PLAIN = voc_xml("a.jpg", [("RBC", "10.5", 2, "30.25", 40, 1, 0), ("WBC", 1, 2, 3, 4)])
TAKEN = {  # documents the fast path reads itself: the record must be the parser's
    "plain": PLAIN,
    "prolog": '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + PLAIN,
    "crlf": PLAIN.replace("\n", "\r\n").replace("<name>RBC", "<name>\rRBC"),
    "root attribute": PLAIN.replace("<annotation>", '<annotation verified="yes">'),
    "padded values": voc_xml(" a.jpg ", [("  Globule\u0301\n", " 12 ", "\t3.5", "40 ", "5e1", "0", "1")]),
    "no flags or pose": PLAIN.replace("<pose>Unspecified</pose>", "").replace("<truncated>0</truncated>", ""),
    "empty flags": PLAIN.replace("<difficult>1</difficult>", "<difficult></difficult>"),
    "twice the filename": PLAIN.replace("<folder>", "<filename>b.jpg</filename><folder>"),
    "no objects": voc_xml("a.jpg", []),
    "utf-8 bom": "\ufeff" + PLAIN,
}
REFUSED = {  # documents it leaves to the parser: whatever they are, the parser decides as before
    "comment": PLAIN.replace("<folder>", "<!-- x --><folder>"),
    "cdata": PLAIN.replace("RBC", "<![CDATA[RBC]]>"),
    "entity reference": PLAIN.replace("RBC", "R&amp;B"),
    "character reference": PLAIN.replace("RBC", "R&#66;C"),
    "doctype": '<!DOCTYPE annotation>\n' + PLAIN,
    "processing instruction": PLAIN.replace("<folder>", "<?pi x?><folder>"),
    "object attribute": PLAIN.replace("<object>", '<object id="1">'),
    "default namespace": PLAIN.replace("<annotation>", '<annotation xmlns="urn:voc">'),
    "two root attributes": PLAIN.replace("<annotation>", '<annotation a="1" a="2">'),
    "part": PLAIN.replace("</bndbox>", "</bndbox><part><name>hand</name></part>", 1),
    "other order": PLAIN.replace("<name>WBC</name>", "").replace("</bndbox>\n</object>", "</bndbox><name>W</name>"),
    "empty name": PLAIN.replace("<name>WBC</name>", "<name> </name>"),
    "bad flag": PLAIN.replace("<difficult>1</difficult>", "<difficult>yes</difficult>"),
    "self-closing flag": PLAIN.replace("<difficult>1</difficult>", "<difficult/>"),
    "nan": PLAIN.replace("<xmin>1<", "<xmin>nan<"),
    "overflowing sum": PLAIN.replace("<xmin>1<", "<xmin>1e308<").replace("<ymin>2<", "<ymin>1e308<"),
    "empty coordinate": PLAIN.replace("<xmin>1<", "<xmin><"),
    "fullwidth digits": PLAIN.replace("<width>640", "<width>\uff16\uff14\uff10"),
    "no size": voc_xml("a.jpg", [("RBC", 1, 2, 3, 4)], size=None),
    "no filename": voc_xml(None, [("RBC", 1, 2, 3, 4)]),
    "element after objects": PLAIN.replace("</annotation>", "<segmented>0</segmented></annotation>"),
    "deep element": PLAIN.replace("<folder>", "<source><a><b>x</b></a></source><folder>"),
    "mismatched tag": PLAIN.replace("</name>", "</nam>", 1),
    "unclosed root": PLAIN.replace("</annotation>", "<annotation>x</annotation>"),
    "unclosed object": PLAIN.replace("</object>", "", 1),
    "second root": PLAIN + "<annotation/>",
    "text after the root": PLAIN + "x",
    "space before the prolog": ' <?xml version="1.0"?>' + PLAIN,
    "version 1.1": '<?xml version="1.1"?>' + PLAIN,
    "latin-1 declared": '<?xml version="1.0" encoding="latin-1"?>' + PLAIN.replace("RBC", "R\xe9C"),
    "control character": PLAIN.replace("RBC", "R\x01C"),
    "U+FFFE": PLAIN.replace("RBC", "R\ufffeC"),
    "greater-than": PLAIN.replace("RBC", "R>C"),
    "cdata end": PLAIN.replace("RBC", "R]]>C"),
    "form feed between tags": PLAIN.replace("\n<object>", "\f<object>", 1),
    "object in a container": PLAIN.replace("<folder>", "<src><object>x</object></src><folder>"),
}


@pytest.mark.parametrize("name", TAKEN)
def test_the_fast_path_reads_plain_documents_exactly_as_the_parser(name: str) -> None:
    data = TAKEN[name].encode()
    assert parse_plain(data) is not None
    assert parse_plain(data) == parse_voc_tree(data) == parse_voc(data)


@pytest.mark.parametrize("name", REFUSED)
def test_anything_unusual_goes_to_the_parser(name: str) -> None:
    data = REFUSED[name].encode("utf-8", "surrogatepass")
    assert parse_plain(data) is None
    assert tree_outcome(data) == (parse_voc(data) if not isinstance(tree_outcome(data), str) else tree_outcome(data))


def test_invalid_utf8_goes_to_the_parser() -> None:
    data = PLAIN.replace("RBC", "R\xe9C").encode("latin-1")
    assert parse_plain(data) is None and tree_outcome(data) == "bad_encoding"


def test_random_mutations_never_make_the_fast_path_disagree() -> None:
    """Seeded byte edits of plain documents (markup characters mostly): whenever the fast path accepts one, the
    parser reads it to the same record; it never accepts a document the parser refuses."""
    rng = random.Random(16)
    pieces = [b"<", b">", b"/", b"&", b";", b"!", b"?", b"=", b'"', b" ", b"\r", b"\n", b"\x00", b"a", b"0", b".",
              b"<object>", b"</object>", b"<name>", b"</name>", b"</annotation>", b"\xc3", b"\xef\xbf\xbe", b"-"]
    bases = [TAKEN[name].encode() for name in ("plain", "prolog", "root attribute", "no flags or pose")]
    accepted = 0
    for _ in range(1500):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) + 1)
            cut = rng.choice([0, 0, 1, rng.randint(1, 12)])
            data[at:at + cut] = rng.choice(pieces) if rng.random() < 0.8 else b""
        plain = parse_plain(bytes(data))
        if plain is not None:
            accepted += 1
            assert plain == tree_outcome(bytes(data)), bytes(data)
    assert accepted > 50  # the edits inside values keep many documents plain

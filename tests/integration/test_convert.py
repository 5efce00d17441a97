"""`trainer convert` end to end: BCCD from disk and from S3, conventions, and every bad-input case."""

from __future__ import annotations

import contextlib
import gc
import io
import itertools
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.conftest import BCCD, REPO, S3Env
from tests.support.voc import SAMPLE_JPEG, gc_state_chunk, make_voc, voc_xml
from trainer import storage
from trainer.annotations import convert as convert_module
from trainer.annotations.convert import BoxRules, ConvertOptions, ConvertResult, convert, convert_boxes, plain_boxes
from trainer.annotations.voc import PlainObjects, VocObject, parse_plain_columns, parse_voc_tree


def run_convert(root: Path | str, out: Path | str, **kwargs: object) -> ConvertResult:
    return convert(ConvertOptions(str(root), str(out), **kwargs))  # type: ignore[arg-type]


def kinds(result: ConvertResult) -> dict[str, int]:
    return {kind: len(items) for kind, items in result.problems.items()}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", "convert", *args], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ), timeout=300)


# ------------------------------------------------------------------------------------------ BCCD
def xml_boxes(xml_path: Path) -> list[tuple[str, float, float, float, float]]:
    """Boxes straight from the XML with the standard library, for an independent comparison."""
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[union-attr, arg-type]
        if x1 > x0 and y1 > y0:
            boxes.append((obj.findtext("name").strip(), x0, y0, x1 - x0, y1 - y0))  # type: ignore[union-attr]
    return boxes


def test_bccd_converts_all_splits_exactly_and_evaluates_to_map_1(tmp_path: Path) -> None:
    result = run_convert(BCCD, tmp_path, workers=2)
    assert result.exit_code == 0
    assert set(result.outputs) == {"train", "val", "test", "trainval"}
    assert (result.split_images["train"], result.split_images["val"], result.split_images["test"]) == (205, 87, 72)
    assert kinds(result) == {"degenerate_box": 2}  # BloodImage_00338 and _00343, as SOURCE.md says
    assert result.categories == ["Platelets", "RBC", "WBC"]

    all_ids: dict[str, int] = {}
    for split in ("train", "val", "test"):
        data = load(tmp_path / f"{split}.json")
        listed = (BCCD / "ImageSets/Main" / f"{split}.txt").read_text().split()
        assert sorted(Path(i["file_name"]).stem for i in data["images"]) == sorted(listed)
        names = {c["id"]: c["name"] for c in data["categories"]}
        for image in data["images"]:
            assert image["file_name"] not in all_ids  # splits are disjoint, ids unique
            all_ids[image["file_name"]] = image["id"]
            got = sorted((names[a["category_id"]], *a["bbox"]) for a in data["annotations"]
                         if a["image_id"] == image["id"])
            assert got == sorted(xml_boxes(BCCD / "Annotations" / (Path(image["file_name"]).stem + ".xml")))
    assert sorted(all_ids.values()) == list(range(1, 365))

    gt = COCO(str(tmp_path / "test.json"))
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in gt.dataset["annotations"]]
    evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert np.isclose(evaluator.stats[0], 1.0) and np.isclose(evaluator.stats[1], 1.0)


def test_bccd_from_s3_to_s3_is_byte_identical_to_local_and_to_any_worker_count(s3: S3Env, tmp_path: Path) -> None:
    storage.copy_tree(BCCD, s3.uri("raw/bccd"))
    remote = run_convert(s3.uri("raw/bccd"), s3.uri("coco"), workers=2, report=s3.uri("coco/report.json"))
    assert remote.exit_code == 0 and remote.outputs["val"] == s3.uri("coco/val.json")
    local_1 = run_convert(BCCD, tmp_path / "w1", workers=1)
    run_convert(BCCD, tmp_path / "w3", workers=3)
    for split in local_1.outputs:
        expected = (tmp_path / "w1" / f"{split}.json").read_bytes()
        assert (tmp_path / "w3" / f"{split}.json").read_bytes() == expected
        assert storage.read_bytes(s3.uri(f"coco/{split}.json")) == expected
    report = json.loads(storage.read_text(s3.uri("coco/report.json")))
    assert report["ok"] and report["problems"]["degenerate_box"]["count"] == 2


# --------------------------------------------------------------------------------- conventions
def test_voc_offset_and_float_coordinates(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("cell", "10.25", 20, "30.75", 41)])}, ["a.jpg"])
    run_convert(tmp_path / "voc", tmp_path / "plain")
    run_convert(tmp_path / "voc", tmp_path / "offset", voc_offset=True)
    assert load(tmp_path / "plain/all.json")["annotations"][0]["bbox"] == [10.25, 20, 20.5, 21]
    offset = load(tmp_path / "offset/all.json")["annotations"][0]
    assert offset["bbox"] == [9.25, 19, 21.5, 22] and offset["area"] == 21.5 * 22


@pytest.mark.parametrize("mode,expected", [("crowd", [(0, 0), (1, 1)]), ("keep", [(0, 0), (0, 1)]),
                                           ("drop", [(0, 0)])])
def test_difficult_modes(tmp_path: Path, mode: str, expected: list[tuple[int, int]]) -> None:
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("c", 1, 1, 9, 9, 0), ("c", 2, 2, 8, 8, 1, 1)])},
             ["a.jpg"])
    run_convert(tmp_path / "voc", tmp_path / "out", difficult=mode)
    annotations = load(tmp_path / "out/all.json")["annotations"]
    assert [(a["iscrowd"], a["difficult"]) for a in annotations] == expected
    assert all("truncated" in a for a in annotations)


def test_labels_file_fixes_ids_and_unknown_classes_are_skipped_or_fatal(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("zebra", 1, 1, 5, 5), ("ant", 1, 1, 5, 5),
                                                           ("Ant", 2, 2, 6, 6), ("yak", 1, 1, 5, 5)])}, ["a.jpg"])
    (tmp_path / "labels.txt").write_text("# classes\nzebra\n ant \n")
    result = run_convert(tmp_path / "voc", tmp_path / "out", labels=str(tmp_path / "labels.txt"))
    data = load(tmp_path / "out/all.json")
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "zebra"), (2, "ant")]
    assert [a["category_id"] for a in data["annotations"]] == [1, 2, 2]
    assert kinds(result) == {"unknown_class": 1, "class_case_mismatch": 1}
    assert "yak" in result.problems["unknown_class"][0][1] and result.exit_code == 0
    assert result.objects_per_class == {"zebra": 1, "ant": 2}  # "Ant" counted as "ant", "yak" skipped

    before = (tmp_path / "out/all.json").read_bytes()
    strict = run_convert(tmp_path / "voc", tmp_path / "out", labels=str(tmp_path / "labels.txt"), strict=True)
    assert strict.exit_code == 1 and strict.outputs == {}
    assert (tmp_path / "out/all.json").read_bytes() == before  # nothing already written is touched


def test_case_variants_without_labels_merge_into_the_common_spelling(tmp_path: Path) -> None:
    xmls = {f"{i}.xml": voc_xml(f"{i}.jpg", [("RBC", 1, 1, 5, 5)]) for i in range(3)}
    xmls["3.xml"] = voc_xml("3.jpg", [("rbc ", 1, 1, 5, 5)])
    make_voc(tmp_path / "voc", xmls, [f"{i}.jpg" for i in range(4)])
    result = run_convert(tmp_path / "voc", tmp_path / "out")
    assert result.categories == ["RBC"] and result.objects_per_class == {"RBC": 4}
    assert result.problems["class_case_mismatch"][0][0] == "3.xml"


# ------------------------------------------------------------------------------------- bad input
def test_bad_files_are_reported_and_never_lose_the_good_ones(tmp_path: Path) -> None:
    xmls: dict[str, str | bytes] = {
        "good.xml": voc_xml("good.jpg", [("c", 1, 1, 50, 50)]),
        "broken.xml": voc_xml("broken.jpg", [("c", 1, 1, 5, 5)])[:60],
        "empty.xml": b"",
        "bomb.xml": b'<!DOCTYPE a [<!ENTITY x "xx"><!ENTITY y "&x;&x;">]><annotation>&y;</annotation>',
        "nosize.xml": voc_xml("nosize.jpg", [("c", 1, 1, 700, 500)], size=None),
        "zerosize.xml": voc_xml("zerosize.jpg", [("c", 1, 1, 5, 5)], size=(0, 0)),
        "escape.xml": voc_xml("../../../etc/escape.jpg", [("c", 1, 1, 5, 5)]),
        "noext.xml": voc_xml("noext", [("c", 1, 1, 5, 5)]),
        "renamed.xml": voc_xml("old_name.jpg", [("c", 1, 1, 5, 5)]),
        "twin.xml": voc_xml("good.jpg", [("c", 2, 2, 6, 6)]),
        "boxes.xml": voc_xml("boxes.jpg", [("c", 5, 5, 5, 9), ("c", 9, 9, 1, 1), ("c", -10, -5, 700, 490),
                                           ("c", 650, 10, 700, 20), ("c", 1, 1, 2, 2)]),
        "noimage.xml": voc_xml("noimage.jpg", [("c", 1, 1, 5, 5)]),
    }
    images = ["good.jpg", "nosize.jpg", "zerosize.jpg", "escape.jpg", "noext.jpg", "renamed.jpg", "boxes.jpg"]
    make_voc(tmp_path / "voc", xmls, images,
             splits={"train": ["good", "nosize", "escape", "ghost"], "val": ["boxes", "noimage", "twin"]})
    (tmp_path / "etc").mkdir()
    result = run_convert(tmp_path / "voc", tmp_path / "out", workers=2)

    assert kinds(result) == {
        "malformed_xml": 1, "empty_file": 1, "unsafe_xml": 1, "size_from_image": 2, "clipped_box": 2,
        "filename_has_directory": 1, "filename_missing_extension": 1, "filename_mismatch": 2,
        "duplicate_image": 1, "degenerate_box": 2, "outside_image": 1, "missing_image": 1,
        "missing_annotation": 1,
    }
    assert result.exit_code == 1  # errors: three unusable files and one duplicate
    train = load(tmp_path / "out/train.json")
    by_name = {i["file_name"]: i for i in train["images"]}
    assert sorted(by_name) == ["escape.jpg", "good.jpg", "nosize.jpg"]
    assert (by_name["nosize.jpg"]["width"], by_name["nosize.jpg"]["height"]) == (640, 480)  # from the JPEG header
    nosize_boxes = [a["bbox"] for a in train["annotations"] if a["image_id"] == by_name["nosize.jpg"]["id"]]
    assert nosize_boxes == [[1, 1, 639, 479]]  # clipped to the header's size
    assert not (tmp_path / "etc" / "escape.jpg").exists()
    val = load(tmp_path / "out/val.json")
    assert [i["file_name"] for i in val["images"]] == ["boxes.jpg"]
    assert sorted(a["bbox"] for a in val["annotations"]) == [[0, 0, 640, 480], [1, 1, 1, 1]]
    assert result.problems["missing_annotation"][0] == ("ImageSets/Main/train.txt",
                                                        "id 'ghost' has no Annotations/ghost.xml")


def test_missing_images_are_warnings_that_strict_turns_into_a_failure(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("c", 1, 1, 5, 5)]),
                                "b.xml": voc_xml("b.jpg", [("c", 1, 1, 5, 5)])}, ["a.jpg"])
    relaxed = run_convert(tmp_path / "voc", tmp_path / "out")
    assert relaxed.exit_code == 0 and kinds(relaxed) == {"missing_image": 1} and relaxed.split_images["all"] == 1
    strict = run_convert(tmp_path / "voc", tmp_path / "strict", strict=True)
    assert strict.exit_code == 1 and not (tmp_path / "strict").exists()


def test_duplicate_claims_keep_the_first_xml_by_name(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("x.jpg", [("c", 1, 1, 5, 5)]),
                                "b.xml": voc_xml("x.jpg", [("c", 2, 2, 9, 9)])}, ["x.jpg"])
    result = run_convert(tmp_path / "voc", tmp_path / "out")
    assert result.problems["duplicate_image"] == [("b.xml", "names image 'x.jpg', already annotated by a.xml")]
    assert load(tmp_path / "out/all.json")["annotations"][0]["bbox"] == [1, 1, 4, 4]


def test_a_split_requested_but_absent_and_a_missing_folder_are_clear_errors(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [])}, ["a.jpg"], splits={"train": ["a"]})
    result = cli("--voc-root", str(tmp_path / "voc"), "--out", str(tmp_path / "out"), "--splits", "train,tset")
    assert result.returncode == 1 and "tset.txt: no such split file (present: train)" in result.stderr
    result = cli("--voc-root", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "no .xml annotation files found" in result.stderr
    assert "Traceback" not in result.stderr


def test_errors_found_after_the_workers_started_parsing_stop_the_run_and_write_nothing(tmp_path: Path) -> None:
    """With worker processes, parsing starts before the image folder is listed and the split files are read
    (issue 16): an error found there still stops the run with its one-line message, and nothing is written."""
    xmls = {f"{i:03d}.xml": voc_xml(f"{i:03d}.jpg", [("c", 1, 1, 5, 5)]) for i in range(300)}
    root = make_voc(tmp_path / "voc", xmls, [], splits={"train": ["000"]})
    with pytest.raises(convert_module.ConvertError, match="JPEGImages: no image files found"):
        run_convert(root, tmp_path / "out", workers=2)
    shutil.copyfile(SAMPLE_JPEG, root / "JPEGImages" / "000.jpg")
    with pytest.raises(convert_module.ConvertError, match=r"tset.txt: no such split file \(present: train\)"):
        run_convert(root, tmp_path / "out", workers=2, splits=["tset"])
    assert not (tmp_path / "out").exists()
    assert run_convert(root, tmp_path / "out", workers=2, splits=["train"]).split_images == {"train": 1}


def test_cli_summary_exit_codes_and_report(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("c", 1, 1, 5, 5)]),
                                "b.xml": b"<annotation><object>",
                                "c.xml": voc_xml("c.jpg", [("c", 1, 1, 5, 5)])},
             ["a.jpg", "b.jpg"])
    result = cli("--voc-root", str(tmp_path / "voc"), "--out", str(tmp_path / "out"), "--all",
                 "--report", str(tmp_path / "report.json"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error   malformed_xml" in result.stderr and "b.xml" in result.stderr
    assert "warning missing_image" in result.stderr and "FAILED: 1 errors, 1 warnings" in result.stderr
    assert len(result.stderr.splitlines()) < 25  # one screen
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"]["missing_image"]["items"] == [
        {"file": "c.xml", "detail": "no image 'c.jpg' in the image folder"}]
    assert load(tmp_path / "out/all.json")["images"][0]["file_name"] == "a.jpg"  # the good file survived

    assert cli("--voc-root", "x", "--out", "y", "--all", "--splits", "train").returncode == 2
    assert cli("--voc-root", "x", "--out", "y", "--difficult", "sometimes").returncode == 2


def test_thousands_of_objects_in_one_image(tmp_path: Path) -> None:
    objects = [("c", i % 600, i % 400, i % 600 + 7, i % 400 + 7) for i in range(5000)]
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", objects)}, ["a.jpg"])
    result = run_convert(tmp_path / "voc", tmp_path / "out")
    assert result.exit_code == 0 and result.objects_per_class == {"c": 5000}
    annotations = load(tmp_path / "out/all.json")["annotations"]
    assert [a["id"] for a in annotations] == list(range(1, 5001))


def test_skip_if_done_trusts_only_a_successful_report_whose_outputs_exist(tmp_path: Path) -> None:
    """The chart runs convert on every install/upgrade: a finished conversion is kept, anything else is redone."""
    root = make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("cat", 1, 1, 20, 20)]),
                                       "b.xml": voc_xml("b.jpg", [("dog", 2, 2, 30, 30)])},
                    ["a.jpg", "b.jpg"], splits={"train": ["a"], "val": ["b"]})
    out, report = tmp_path / "coco", tmp_path / "coco" / "report.json"
    args = ("--voc-root", str(root), "--out", str(out), "--report", str(report), "--skip-if-done")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert "skipped" not in first.stderr and (out / "train.json").exists()
    (out / "train.json").write_text("kept")  # a skip must not touch the outputs
    second = cli(*args)
    assert second.returncode == 0 and "skipped" in second.stderr
    assert (out / "train.json").read_text() == "kept"
    (out / "val.json").unlink()  # an output is gone: convert again
    third = cli(*args)
    assert "skipped" not in third.stderr and load(out / "train.json")["images"]
    report.write_text("{not json")
    fourth = cli(*args)
    assert fourth.returncode == 0 and "not valid JSON" in fourth.stderr and "skipped" not in fourth.stderr
    assert cli("--voc-root", str(root), "--out", str(out), "--skip-if-done").returncode == 2


# ------------------------------------------------------------------ annotations stored apart from images (issue 14)
def test_annotations_only_converts_without_jpegimages_and_the_error_suggests_it(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("c", 1, 1, 5, 5)]),
                                       "b.xml": voc_xml("sub/dir/b.png", [("c", 2, 2, 9, 9)]),
                                       "c.xml": voc_xml("c.jpg", [("c", 1, 1, 5, 5)], size=None),
                                       "d.xml": voc_xml(None, [("c", 1, 1, 5, 5)])}, [])
    (root / "JPEGImages").rmdir()
    result = cli("--voc-root", str(root), "--out", str(tmp_path / "out"), "--all")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no image files found" in result.stderr and "--annotations-only" in result.stderr

    result = cli("--voc-root", str(root), "--out", str(tmp_path / "out"), "--all", "--annotations-only",
                 "--report", str(tmp_path / "report.json"))
    assert result.returncode == 1, result.stderr  # c.xml has no size: an error, the others are converted
    doc = load(tmp_path / "out/all.json")
    assert [(i["file_name"], i["width"], i["height"]) for i in doc["images"]] == [("a.jpg", 640, 480),
                                                                                 ("b.png", 640, 480)]
    assert [a["bbox"] for a in doc["annotations"]] == [[1, 1, 4, 4], [2, 2, 7, 7]]
    problems = json.loads((tmp_path / "report.json").read_text())["problems"]
    assert problems["no_size"]["items"][0]["file"] == "c.xml"
    assert problems["missing_image"]["items"][0]["file"] == "d.xml"
    assert problems["filename_has_directory"]["items"][0]["file"] == "b.xml"
    assert "missing_image" not in {k for k, v in problems.items() if any(i["file"] == "a.xml" for i in v["items"])}


def test_bccd_annotations_only_matches_the_full_conversion(tmp_path: Path) -> None:
    full = run_convert(BCCD, tmp_path / "full", all=True)
    alone = run_convert(BCCD, tmp_path / "alone", all=True, annotations_only=True)
    assert full.exit_code == alone.exit_code == 0
    assert load(tmp_path / "full/all.json") == load(tmp_path / "alone/all.json")


# ------------------------------------------------------------------------- fast paths (issue 16)
def test_plain_boxes_write_exactly_what_convert_boxes_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The column-wise box conversion against the per-object one, on random boxes with integral, decimal, tiny,
    huge, zero and negative-zero coordinates: the same text, or None (then convert_boxes has problems to report).
    Files whose coordinates all have one or two decimals take the fixed-point path (over a hundred times here)."""
    rng = random.Random(16)
    fixed_point_calls: list[bool] = []
    fixed_point_texts = convert_module._fixed_point_texts

    def counted(*args: Any) -> list[str] | None:
        texts = fixed_point_texts(*args)
        fixed_point_calls.append(texts is not None)
        return texts

    monkeypatch.setattr(convert_module, "_fixed_point_texts", counted)

    def value(low: float, high: float) -> float:
        if decimals is not None:  # every coordinate written with at most this many decimals
            return float(f"{rng.uniform(low, high):.{rng.randint(0, decimals)}f}")
        kind = 0 if integral else rng.randrange(5)
        return (float(rng.randint(int(low), int(high))) if kind == 0 else rng.uniform(low, high) if kind == 1
                else float(f"{rng.uniform(low, high):.3e}") if kind == 2 else round(rng.uniform(low, high), 2))

    taken = 0
    for trial in range(2500):
        integral = trial % 5 == 0  # all coordinates integers: the %d path
        decimals = {1: 1, 2: 2, 3: 3}.get(trial % 5)  # "12.5", "12.25" (fixed-point path), "12.125" (general)
        width, height = rng.choice([(640, 480), (7, 5), (3_000_000_000, 100_000), (2**53 + 2, 2**40)])
        objects = []
        for _ in range(rng.randint(0, 5)):
            x0, y0 = rng.choice([0.0, -0.0, value(0, width), value(0, 1e-3)]), rng.choice([0.0, value(0, height)])
            if (integral or decimals) and rng.random() < 0.9:
                x0, y0 = value(1, 40), value(1, 40)
            x1 = rng.choice([x0 + value(0, width), x0 + 1e-5, float(width), x0 + value(0, 2)])
            y1 = rng.choice([y0 + value(0, height), y0 + value(0, 1e-3), float(height)])
            if decimals and rng.random() < 0.7:  # written as such, not a sum of two decimal floats
                x1, y1 = float(f"{x1:.{decimals}f}"), float(f"{y1:.{decimals}f}")
            objects.append(VocObject(rng.choice("ab"), x0, y0, x1, y1, rng.randint(0, 1), rng.randint(0, 1)))
        columns = PlainObjects(*map(list, zip(*objects, strict=True))) if objects else PlainObjects(*([],) * 7)
        for rules in (BoxRules(), BoxRules(True, "keep"), BoxRules(False, "drop")):
            fast = plain_boxes(columns, width, height, rules)
            problems: list[tuple[str, str]] = []
            exact = convert_boxes(objects, width, height, rules, problems)
            if fast is not None:
                taken += 1
                assert (fast, problems) == (exact, []), (objects, rules)
    assert taken > 800 and fixed_point_calls.count(True) > 100


def test_coordinates_read_as_integers_from_their_text_give_the_same_boxes_as_float() -> None:
    """Documents whose coordinates are all written with 0, 1 or 2 decimals ("12", "007", "8.3", "12.50") are read
    as integers from the text, without float(); the boxes (text and problems) must be those of the XML parser and
    convert_boxes, with every rule, on small and huge images, inside and outside them. Mixed or longer decimals,
    spaces and long digit strings take the float path, with the same result."""
    rng = random.Random(1016)
    scales: list[int] = []

    def text(value: float, decimals: int) -> str:
        written = f"{value:.{decimals}f}"
        return "0" + written if rng.random() < 0.05 else written  # a leading zero reads the same

    for trial in range(1500):
        decimals = trial % 3
        width, height = rng.choice([(640, 480), (31_622, 31_622), (40_000, 30_000), (2_000_000, 1_000_000), (9, 7)])
        objects = []
        for _ in range(rng.randint(1, 6)):
            x0, y0 = rng.uniform(-2, width * 0.9), rng.uniform(0, height * 0.9)
            x1, y1 = x0 + rng.uniform(0, width * 0.3), y0 + rng.uniform(0, height * rng.choice([0.1, 1]))
            if rng.random() < 0.05:
                x1 = x0  # degenerate once the texts are read
            coordinates = [text(abs(v), decimals) for v in (x0, y0, x1, y1)]
            if rng.random() < 0.03:  # the float path: mixed or longer decimals, a space, many digits
                coordinates[rng.randrange(4)] = rng.choice(["12.125", "5", "7.5", " 12", "1" * 16, "3.0e1"])
            objects.append((rng.choice(["a", "b"]), *coordinates, rng.randint(0, 1), rng.randint(0, 1)))
        data = voc_xml("x.jpg", objects, size=(width, height)).encode()
        plain = parse_plain_columns(data)
        assert plain is not None
        columns = plain[3]
        scales.append(columns.scale)
        record = parse_voc_tree(data)
        assert columns.objects() == record.objects
        for rules in (BoxRules(), BoxRules(True, "keep"), BoxRules(False, "drop")):
            problems: list[tuple[str, str]] = []
            exact = convert_boxes(record.objects, width, height, rules, problems)
            fast = plain_boxes(columns, width, height, rules)
            if fast is not None:
                assert (fast, problems) == (exact, []), (objects, rules)
    assert min(scales.count(1), scales.count(10), scales.count(100)) > 350 and scales.count(0) > 50, scales


def test_fast_paths_change_no_byte_of_the_output_or_the_report(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain and unusual documents, boxes kept, clipped and dropped: the same files and problems as when every
    document goes through the XML parser and every box through convert_boxes."""
    plain = voc_xml("a.jpg", [("c", "1.5", 2, "30.25", 40, 1), ("d", 0, 0, 640, 480)])
    xmls: dict[str, str | bytes] = {
        "a.xml": plain,
        "b.xml": plain.replace("a.jpg", "b.jpg").replace("\n", "\r\n"),
        "c.xml": plain.replace("a.jpg", "c.jpg").replace("<folder>", "<!-- c --><folder>"),
        "d.xml": voc_xml("d.jpg", [("c", -5, 1, 50, 50), ("c", 9, 9, 1, 1), ("D ", 1, 1, 5, 5, "maybe")]),
        "e.xml": voc_xml("e.jpg", [("c", "1e-5", 1, "2e-5", 9), ("c", 1, 1, 2, 2, 1)]),
        "f.xml": plain.replace("a.jpg", "f.jpg").replace("</name>", "</nam>", 1),
        "g.xml": plain.replace("a.jpg", "g.jpg").encode("utf-16"),
    }
    make_voc(tmp_path / "voc", xmls, [f"{c}.jpg" for c in "abcdefg"])
    outputs = {}
    for case in ("fast", "slow"):
        if case == "slow":
            monkeypatch.setattr(convert_module, "parse_plain_columns", lambda data: None)
        for difficult in ("crowd", "drop"):
            out = tmp_path / f"{case}-{difficult}"
            result = run_convert(tmp_path / "voc", out, workers=1, difficult=difficult, report=str(out / "r.json"))
            report = (out / "r.json").read_text().replace(str(out), "OUT")
            outputs[case, difficult] = ((out / "all.json").read_bytes(), report, result.problems)
    assert outputs["fast", "crowd"] == outputs["slow", "crowd"]
    assert outputs["fast", "drop"] == outputs["slow", "drop"]
    assert {"clipped_box", "degenerate_box", "bad_flag", "malformed_xml"} <= set(outputs["fast", "crowd"][2])


def test_file_names_split_exactly_as_os_path_splitext() -> None:
    # every name of up to five characters over an alphabet with dots, a slash, a space and a letter, plus names
    # that real folders hold: the converter's fast split must agree with the standard one on all of them
    alphabet = "a./ b"
    names = ["".join(chars) for n in range(6) for chars in itertools.product(alphabet, repeat=n)]
    names += ["2007_000027.xml", "IMG.JPG", ".hidden.jpg", "..xml", "a..b", "résumé.png", "x.tar.gz"]
    assert [convert_module._split_name(name) for name in names] == [os.path.splitext(name) for name in names]


def test_what_a_worker_sends_back_unpacks_to_what_it_parsed(tmp_path: Path) -> None:
    """The packed form a worker pickles for the parent (issue 16) loses nothing: plain files, files with no
    objects, with problems, without a size, and unusable ones come back equal to the in-process results."""
    xmls = {
        "plain.xml": voc_xml("plain.jpg", [("c", "1.5", 2, "30.25", 40, 1), ("d", 0, 0, 640, 480)]),
        "empty.xml": voc_xml("empty.jpg", []),
        "clipped.xml": voc_xml("clipped.jpg", [("c", -5, 1, 50, 50), ("c", 9, 9, 1, 1)]),
        "nosize.xml": voc_xml("nosize.jpg", [("c", 1, 1, 5, 5)], size=None),
        "broken.xml": "<annotation><filename>x.jpg",
    }
    make_voc(tmp_path / "voc", xmls, [])
    uris = [str(tmp_path / "voc" / "Annotations" / name) for name in xmls]
    rules = BoxRules()
    in_process = convert_module.parse_chunk(uris, rules)
    sent = pickle.loads(pickle.dumps(convert_module.parse_chunk_packed(uris, rules)))
    assert isinstance(sent[0], tuple) and isinstance(sent[1], tuple)  # the plain ones travel packed
    assert list(map(convert_module._unpack, sent)) == in_process
    assert [len(p.boxes or ()) for p in in_process] == [2, 0, 1, 0, 0] and in_process[2].problems


def test_the_garbage_collector_is_paused_for_a_whole_conversion_and_only_in_this_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert() pauses this process's cyclic collector from the first parsed record to the last byte written
    (issue 16), gives it back when it returns or fails (a caller's paused collector stays paused), and its workers
    run with theirs."""
    names = [f"{i:03d}" for i in range(70)]
    make_voc(tmp_path / "voc", {f"{n}.xml": voc_xml(f"{n}.jpg", [("c", 1, 1, 5, 5)]) for n in names},
             [f"{n}.jpg" for n in names])
    seen: list[tuple[str, bool]] = []
    keep, write = convert_module._keep_annotated, convert_module.write_coco

    def noting(parsed: Any) -> Any:
        for record in parsed:
            seen.append(("parsed", gc.isenabled()))
            yield record

    monkeypatch.setattr(convert_module, "_keep_annotated", lambda parsed, *rest: keep(noting(parsed), *rest))
    monkeypatch.setattr(convert_module, "write_coco",
                        lambda *args: (seen.append(("written", gc.isenabled())), write(*args))[-1])
    for workers in (1, 2):
        seen.clear()
        result = run_convert(tmp_path / "voc", tmp_path / f"out{workers}", workers=workers)
        assert result.images == 70 and gc.isenabled()
        assert seen == [("parsed", False)] * 70 + [("written", False)] * len(result.outputs)
    (tmp_path / "empty" / "Annotations").mkdir(parents=True)
    with pytest.raises(convert_module.ConvertError):
        run_convert(tmp_path / "empty", tmp_path / "out", workers=2)
    assert gc.isenabled()
    gc.disable()
    try:
        run_convert(tmp_path / "voc", tmp_path / "out3", workers=2)
        assert not gc.isenabled()
        monkeypatch.setattr(convert_module, "parse_chunk_packed", gc_state_chunk)
        with convert_module.worker_pool(2) as workers:
            uris = [str(tmp_path / "voc" / "Annotations" / f"{n}.xml") for n in names]
            states = {parsed.xml for parsed in convert_module.parse_all(uris, BoxRules(), workers)}
    finally:
        gc.enable()
    assert states == {"gc enabled: True"}
    # Conversions in two threads, ending in either order: the collector is on again once both have ended.
    for first_to_end in (0, 1):
        pauses = [convert_module._collector_paused(), convert_module._collector_paused()]
        for pause in pauses:
            pause.__enter__()
        for pause in (pauses[first_to_end], pauses[1 - first_to_end]):
            pause.__exit__(None, None, None)
        assert gc.isenabled()


def test_a_one_process_conversion_from_s3_reads_a_chunk_at_a_time_and_frees_what_failed_reads_leave(
        s3: S3Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --workers 1 from S3 the objects are fetched a chunk at a time (not every file's bytes at once), and
    what failed reads leave in reference cycles (about 120 objects, 25 KB, each) is collected after each chunk
    that had one, though the conversion pauses the collector; its state is given back at the end."""
    names = [f"{i:03d}" for i in range(120)]
    xmls = {f"{n}.xml": voc_xml(f"{n}.jpg", [("c", 1, 1, 5, 5)], size=None if n == "000" else (640, 480))
            for n in names}
    root = make_voc(tmp_path / "voc", xmls, ["000.jpg"])
    for n in names[1:]:
        (root / "JPEGImages" / f"{n}.jpg").write_bytes(b"")  # listed only: their sizes are in the XML
    storage.copy_tree(root, s3.uri("voc"))
    listed, parse_chunk = convert_module._list_xmls, convert_module.parse_chunk
    gone = {f"gone{i:03d}.xml": s3.uri(f"voc/Annotations/gone{i:03d}.xml") for i in range(100)}
    monkeypatch.setattr(convert_module, "_list_xmls", lambda folder: {**listed(folder), **gone})  # listed, then gone
    chunks: list[tuple[int, bool, int]] = []  # (files, collector on, cyclic garbage the chunk left)

    def noting(uris: list[str], rules: BoxRules) -> list[Any]:
        parsed = parse_chunk(uris, rules)
        chunks.append((len(uris), gc.isenabled(), gc.collect()))
        return parsed

    monkeypatch.setattr(convert_module, "_CHUNK_FILES", 50)
    monkeypatch.setattr(convert_module, "parse_chunk", noting)
    for uri in (s3.uri("voc/Annotations/000.xml"), *list(gone.values())[:20]):  # this process's clients, made
        with contextlib.suppress(storage.NotFound):
            storage.read_bytes(uri)
    result = run_convert(s3.uri("voc"), tmp_path / "out", workers=1)
    assert result.images == 120 and len(result.problems["unreadable"]) == 100 and "size_from_image" in result.problems
    assert [files for files, _, _ in chunks] == [50, 50, 50, 50, 20] and gc.isenabled()
    assert not any(on for _, on, _ in chunks)  # paused while the records pile up
    # The last three chunks hold the 100 failed reads (the first two may hold a client's one-off set-up, which a
    # process whose reads just moved to the fast client makes there); without the collection: about 10,000.
    assert sum(left for _, _, left in chunks[2:]) < 1_000, chunks


@pytest.mark.parametrize("workers", [1, 2])
def test_an_annotation_file_over_the_limit_is_refused_unread(tmp_path: Path, workers: int) -> None:
    """An annotation file over MAX_ANNOTATION_BYTES (64 MB) is a file_too_large error, known from its size alone:
    a 1 GB file is never read into memory (each of a worker's fetch threads would hold its file whole), and the
    other files convert."""
    names = [f"{i:02d}" for i in range(70)]  # enough for the workers to parse them (64 or more)
    root = make_voc(tmp_path / "voc", {f"{n}.xml": voc_xml(f"{n}.jpg", [("c", 1, 1, 5, 5)]) for n in names},
                    [f"{n}.jpg" for n in [*names, "big"]])
    with open(root / "Annotations" / "big.xml", "wb") as sparse:
        sparse.truncate(1 << 30)  # a sparse file: no disk used
    report = tmp_path / "report.json"
    # The peak of this process is its VmHWM: ru_maxrss would include the pytest process it was forked from.
    script = ("import resource\nfrom trainer.cli import main\n"
              f"code = main(['convert', '--voc-root', {str(root)!r}, '--out', {str(tmp_path / 'out')!r}, "
              f"'--workers', '{workers}', '--report', {str(report)!r}])\n"
              "own = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
              "workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
              "print('exit', code, 'peak MB', max(own, workers) // 1024)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    code, peak_mb = result.stdout.split()[1], int(result.stdout.split()[-1])
    assert code == "1" and peak_mb < 400, result.stdout + result.stderr
    problems = json.loads(report.read_text())["problems"]
    assert problems["file_too_large"]["items"] == [
        {"file": "big.xml", "detail": f"{1 << 30} bytes: larger than any annotation file (67108864 at most); not read"}]
    assert len(load(tmp_path / "out" / "all.json")["annotations"]) == 70


def test_a_split_or_labels_file_over_its_limit_is_one_line_error_unread(tmp_path: Path) -> None:
    """A split file over 256 MB or a labels file over 16 MB is refused from its size, in one line naming it."""
    root = make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("c", 1, 1, 5, 5)])}, ["a.jpg"],
                    splits={"train": ["a"]})
    split = root / "ImageSets" / "Main" / "train.txt"
    os.truncate(split, convert_module.MAX_SPLIT_BYTES + 1)  # sparse
    result = cli("--voc-root", str(root), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{split}: {convert_module.MAX_SPLIT_BYTES + 1} bytes, more than the" in result.stderr
    labels = tmp_path / "labels.txt"
    labels.write_text("c\n")
    os.truncate(labels, convert_module.MAX_LABELS_BYTES + 1)
    result = cli("--voc-root", str(root), "--out", str(tmp_path / "out"), "--all", "--labels", str(labels))
    assert result.returncode == 1 and f"{labels}: {convert_module.MAX_LABELS_BYTES + 1} bytes" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_local_conversion_never_loads_boto3(tmp_path: Path) -> None:
    """boto3 is 0.3 s of imports, a tenth of a 20,000-file conversion (issue 16): it loads with the first S3 client,
    so a command that only touches local files starts without it."""
    make_voc(tmp_path / "voc", {"a.xml": voc_xml("a.jpg", [("c", 1, 1, 5, 5)])}, ["a.jpg"])
    script = ("import sys\nfrom trainer.cli import main\n"
              f"code = main(['convert', '--voc-root', {str(tmp_path / 'voc')!r}, '--out', {str(tmp_path / 'out')!r}])\n"
              "print('exit', code, 'boto3 loaded', 'boto3' in sys.modules, 'urllib3' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.splitlines()[-1] == "exit 0 boto3 loaded False False", result.stdout + result.stderr
    assert load(tmp_path / "out" / "all.json")["annotations"][0]["bbox"] == [1, 1, 4, 4]

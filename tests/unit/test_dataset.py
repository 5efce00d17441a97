"""The detection dataset, its COCO index and the transform presets, on real image files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from tests.conftest import REPO
from tests.support.images import RECT_COLOR, bomb_png, image_with_rectangles, simple_dataset, write_coco
from trainer.annotations.image_size import image_bytes_limit
from trainer.config import DEFAULT_MAX_PIXELS
from trainer.data.coco_index import DataError, load_coco_index
from trainer.data.dataset import CocoDetection
from trainer.data.transforms import PRESETS, build_transforms


def dataset(root: Path, preset: str = "none", **kwargs: object) -> CocoDetection:
    coco, images = simple_dataset(root)
    return CocoDetection(load_coco_index(str(coco)), str(images), build_transforms(preset, to_float=True),
                         **kwargs)  # type: ignore[arg-type]


def test_samples_have_float_images_xyxy_boxes_and_contiguous_labels(tmp_path: Path) -> None:
    ds = dataset(tmp_path)
    image, target, meta = ds[(0, 1)]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 96) and float(image.max()) <= 1.0
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.value == "XYXY"
    assert target["boxes"].tolist() == [[5, 6, 31, 30], [50, 11, 90, 50]]
    assert target["labels"].tolist() == [1, 2] and target["image_id"] == 2
    assert meta.uri.endswith("img_001.png") and meta.skipped == []
    coco, images = simple_dataset(tmp_path / "u8")
    raw = CocoDetection(load_coco_index(str(coco)), str(images), build_transforms("hflip"))[1][0]
    assert raw.dtype == torch.uint8  # by default images cross process boundaries as uint8
    normalised = CocoDetection(load_coco_index(str(coco)), str(images),
                               build_transforms("none", mean=[0.5] * 3, std=[0.25] * 3))[1][0]
    assert torch.allclose(normalised, (image - 0.5) / 0.25, atol=1e-6)


def test_same_seed_same_tensors_and_epoch_changes_augmentation(tmp_path: Path) -> None:
    a, b = dataset(tmp_path / "a", "ssd", seed=3), dataset(tmp_path / "b", "ssd", seed=3)
    for key in [(0, 0), (0, 5), (2, 5)]:
        (ia, ta, _), (ib, tb, _) = a[key], b[key]
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
    assert not torch.equal(a[(0, 5)][0], a[(1, 5)][0]) or not torch.equal(a[(0, 5)][1]["boxes"], a[(1, 5)][1]["boxes"])
    # batched fetching (threads) gives the same samples as one at a time
    batch = a.__getitems__([(0, 0), (0, 5), (2, 5)])
    assert all(torch.equal(x[0], a[k][0]) for x, k in zip(batch, [(0, 0), (0, 5), (2, 5)], strict=True))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_keeps_boxes_on_the_painted_rectangles(tmp_path: Path, preset: str) -> None:
    ds = dataset(tmp_path, preset)
    red = torch.tensor(RECT_COLOR, dtype=torch.float32) / 255
    checked = 0
    for epoch in range(3):
        for index in range(len(ds)):
            image, target, _ = ds[(epoch, index)]
            for box in target["boxes"].round().int().tolist():
                x0, y0, x1, y1 = box
                if (x1 - x0) < 6 or (y1 - y0) < 6:
                    continue  # a sliver left by a crop: too thin to judge its colour after resampling
                inner = image[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2]
                if preset == "ssd":  # photometric distortion changes (and permutes) colours: the box must still
                    # frame one solid, strongly coloured patch, unlike the dull background and zoom-out fill
                    means = inner.mean(dim=(1, 2))
                    assert float(inner.std(dim=(1, 2)).max()) < 0.06, (preset, epoch, index, box)
                    assert float(means.max() - means.min()) > 0.15, (preset, epoch, index, box)
                else:
                    assert torch.allclose(inner.mean(dim=(1, 2)), red, atol=0.08), (preset, epoch, index, box)
                checked += 1
    assert checked >= len(ds)


def test_horizontal_flip_moves_the_box_with_the_pixels(tmp_path: Path) -> None:
    flipping, plain = dataset(tmp_path / "flip", "hflip"), dataset(tmp_path / "plain")
    outcomes = set()
    for epoch in range(4):
        for index in range(len(plain)):
            box = flipping[(epoch, index)][1]["boxes"][0].tolist()
            x0, y0, x1, y1 = plain[(0, index)][1]["boxes"][0].tolist()
            assert box in ([x0, y0, x1, y1], [96 - x1, y0, 96 - x0, y1])  # unchanged, or mirrored exactly
            outcomes.add(box == [x0, y0, x1, y1])
    assert outcomes == {True, False}  # both happen, about half the time each


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    data = image_with_rectangles(80, 40, [(0, 0, 20, 10)], fmt="JPEG", exif_orientation=6)  # rotate 90° CW
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.jpg").write_bytes(data)
    coco = write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "r.jpg", "width": 40, "height": 80}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 0, 20, 10]}], ["x"])
    image, _, _ = CocoDetection(load_coco_index(str(coco)), str(tmp_path / "img"))[0]
    assert image.shape == (3, 80, 40)  # stored 80x40, shown 40 wide x 80 high
    assert image[0, 5, 35] > 200 and image[0, 5, 5] < 60  # the red corner is now at the top right


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("P", "PNG")])
def test_grayscale_alpha_cmyk_and_palette_images_become_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x").write_bytes(image_with_rectangles(32, 24, [(2, 2, 10, 10)], fmt=fmt, mode=mode))
    coco = write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "x", "width": 32, "height": 24}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]}], ["x"])
    image, _, _ = CocoDetection(load_coco_index(str(coco)), str(tmp_path / "img"))[0]
    assert image.shape == (3, 24, 32)


def test_bad_images_are_skipped_counted_and_named_or_fatal_when_strict(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    coco, images = simple_dataset(tmp_path, count=6)
    (images / "img_001.png").unlink()  # missing
    (images / "img_002.png").write_bytes((images / "img_002.png").read_bytes()[:80])  # truncated
    (images / "img_003.png").write_bytes(b"this is not an image")  # undecodable
    ds = CocoDetection(load_coco_index(str(coco)), str(images))
    with caplog.at_level(logging.WARNING):
        samples = ds.__getitems__([0, 1, 2, 3, 4])
    assert len(samples) == 5  # batch size kept
    assert [s[2].uri.rsplit("/", 1)[1] for s in samples] == ["img_000.png", "img_004.png", "img_004.png",
                                                              "img_004.png", "img_004.png"]
    assert [len(s[2].skipped) for s in samples] == [0, 3, 2, 1, 0]
    for name in ("img_001.png", "img_002.png", "img_003.png"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1  # named once, not once per use
    strict = CocoDetection(load_coco_index(str(coco)), str(images), strict=True)
    with pytest.raises(DataError, match=r"img_001\.png"):
        strict[1]


def test_crowd_boxes_are_not_targets_and_empty_images_are_dropped_for_training(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(image_with_rectangles(20, 20, []))
    coco = write_coco(tmp_path / "c.json",
                      [{"id": 1, "file_name": "a.png", "width": 20, "height": 20},
                       {"id": 2, "file_name": "b.png", "width": 20, "height": 20}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                       {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5], "iscrowd": 1},
                       {"id": 3, "image_id": 2, "category_id": 1, "bbox": [2, 2, 5, 5], "iscrowd": 1}], ["x"])
    index = load_coco_index(str(coco))
    train = CocoDetection(index, str(tmp_path / "img"))
    assert len(train) == 1 and train[0][1]["boxes"].tolist() == [[1, 1, 6, 6]]
    assert len(CocoDetection(index, str(tmp_path / "img"), drop_empty=False)) == 2


def test_size_disagreement_warns_once_and_trusts_the_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(image_with_rectangles(40, 30, [(1, 1, 9, 9)]))
    coco = write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "a.png", "width": 400, "height": 300}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8]}], ["x"])
    ds = CocoDetection(load_coco_index(str(coco)), str(tmp_path / "img"), build_transforms("none"))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            _, target, _ = ds[0]
    assert target["boxes"].canvas_size == (30, 40)
    assert sum("using the image's size" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("doc,message", [
    ("{", "not valid JSON"),
    ('{"images": []}', "missing or non-list 'annotations'"),
    ('{"images": [{"id": 1, "file_name": "../x.png", "width": 5, "height": 5}], "annotations": [], '
     '"categories": [{"id": 1, "name": "a"}]}', "must be a relative path"),
    ('{"images": [{"id": 1, "file_name": "x.png", "width": 5, "height": 5}], '
     '"annotations": [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}], '
     '"categories": [{"id": 1, "name": "a"}]}', "refers to image id 2"),
    ('{"images": [{"id": 1, "file_name": "x.png", "width": 5, "height": 5}, '
     '{"id": 1, "file_name": "y.png", "width": 5, "height": 5}], "annotations": [], '
     '"categories": [{"id": 1, "name": "a"}]}', r"images\[1\]: duplicate image id 1"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
     r"categories\[1\]: duplicate category id 1"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]}',
     r"categories\[1\]: the name 'a' is also category id 1"),
    ('{"images": [{"id": 1, "file_name": "x.png", "width": 5, "height": 5}], '
     '"annotations": [{"image_id": 1, "category_id": true, "bbox": [0, 0, 1, 1]}], '
     '"categories": [{"id": 1, "name": "a"}]}', "unknown category_id True"),
])
def test_bad_coco_json_gets_one_clear_error(tmp_path: Path, doc: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(doc)
    with pytest.raises(DataError, match=message) as info:
        load_coco_index(str(path))
    assert str(info.value).startswith(str(path))


def test_labels_follow_sorted_category_ids(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a", "width": 9, "height": 9}],
                                "annotations": [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 2, 2]},
                                                {"image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2]}],
                                "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}))
    index = load_coco_index(str(path))
    assert index.category_names == ["three", "seven"] and index.num_classes == 3
    assert index.images[0].labels.tolist() == [2, 1]


# ------------------------------------------------------------------ limits before work (issue 14)
def test_an_image_over_max_pixels_is_skipped_from_its_header_unread(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    coco, images = simple_dataset(tmp_path, count=4)
    (images / "img_001.png").write_bytes(bomb_png(2000, 1500))  # 3 M pixels, over the limit set below
    ds = CocoDetection(load_coco_index(str(coco)), str(images), max_pixels=2_000_000)
    with caplog.at_level(logging.WARNING):
        samples = ds.__getitems__([0, 1, 2]) + ds.__getitems__([1])
    assert [s[2].uri.rsplit("/", 1)[1] for s in samples] == ["img_000.png", "img_002.png", "img_002.png",
                                                              "img_002.png"]
    assert samples[1][2].skipped == [str(images / "img_001.png")]
    warned = [r.getMessage() for r in caplog.records if "img_001.png" in r.getMessage()]
    assert len(warned) == 1 and "2000x1500 = 3000000 pixels, over the limit of 2000000" in warned[0]
    assert CocoDetection(load_coco_index(str(coco)), str(images)).max_pixels == 89_478_485  # Pillow's limit
    with pytest.raises(DataError, match="over the limit"):
        CocoDetection(load_coco_index(str(coco)), str(images), max_pixels=2_000_000, strict=True)[1]


def test_an_image_file_larger_than_any_allowed_image_is_skipped_unread(tmp_path: Path) -> None:
    """A file too large to hold an image within max_pixels (image_bytes_limit: 8 bytes a pixel plus 64 MB, about
    780 MB by default) is skipped from its size: the process never holds its bytes (here a sparse file of that
    size: the peak memory of a process that reads it through the dataset stays far below it)."""
    coco, images = simple_dataset(tmp_path, count=3)
    with open(images / "img_001.png", "r+b") as sparse:
        sparse.truncate(image_bytes_limit(DEFAULT_MAX_PIXELS) + 1)
    # VmHWM, this process's own peak (ru_maxrss would include the pytest process it was forked from), before and
    # after the reads: torch's libraries alone take 700 MB here.
    script = ("from trainer.data.coco_index import load_coco_index\n"
              "from trainer.data.dataset import CocoDetection\n"
              "def peak():\n"
              "    status = open('/proc/self/status').read().splitlines()\n"
              "    return next(int(line.split()[1]) for line in status if line.startswith('VmHWM'))\n"
              f"ds = CocoDetection(load_coco_index({str(coco)!r}), {str(images)!r})\n"
              "before = peak()\n"
              "samples = ds.__getitems__([0, 1, 2])\n"
              "print(*[s[2].uri.rsplit('/', 1)[1] for s in samples], len(samples[1][2].skipped),\n"
              "      (peak() - before) // 1024)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    *names, skipped, grown_mb = result.stdout.split()
    assert names == ["img_000.png", "img_002.png", "img_002.png"] and skipped == "1", result.stdout + result.stderr
    assert int(grown_mb) < 100 and "this read allows" in result.stderr


def test_a_worker_error_reaches_the_main_process_as_one_line(tmp_path: Path) -> None:
    from trainer.data.loader import build_loader

    coco, images = simple_dataset(tmp_path, count=3)
    for path in images.iterdir():
        path.unlink()
    ds = CocoDetection(load_coco_index(str(coco)), str(images), max_substitutes=2)
    loader = build_loader(ds, [[0, 1]], workers=1, persistent_workers=False)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(str(images / "img_000.png")) and "all unreadable (the last:" in message


def test_images_under_a_missing_bucket_are_named_as_such(tmp_path: Path, s3) -> None:
    from trainer import storage

    coco, _ = simple_dataset(tmp_path, count=2)
    with pytest.raises(storage.BucketNotFound, match="does not exist"):
        CocoDetection(load_coco_index(str(coco)), "s3://no-such-bucket-here/images")


def test_png_decoding_gives_a_writable_tensor_without_a_warning(tmp_path: Path) -> None:
    """PIL's pixels are a read-only array: wrapping them made torch warn "The given NumPy array is not writable"
    in every loader worker's log. A fresh interpreter, as torch says it only once per process."""
    png = tmp_path / "a.png"
    png.write_bytes(image_with_rectangles(7, 5, [(1, 1, 3, 3)]))
    code = ("import sys; from trainer.data.decode import decode_rgb; "
            "t = decode_rgb(open(sys.argv[1], 'rb').read()); t.add_(1); print(list(t.shape), t[:, 2, 2].tolist())")
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code, str(png)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("]", 1)[0] == "[3, 5, 7"
    assert result.stdout.strip().endswith(str([c + 1 for c in RECT_COLOR]))  # the painted pixel, plus one

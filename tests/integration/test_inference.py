"""trainer.inference and the `trainer predict` / `trainer eval` commands: weights files that describe themselves,
strict loading, image listing (file, folder, glob; local and S3), predictions written to S3, clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import S3Env
from tests.support.images import bomb_png
from trainer import cli, storage
from trainer.annotations.image_size import image_bytes_limit
from trainer.config import DEFAULT_MAX_PIXELS, ModelConfig
from trainer.data.coco_index import load_coco_index
from trainer.errors import InputError
from trainer.inference import list_images, load_detector, write_predictions
from trainer.models import build_model
from trainer.synth import make_shapes_dataset
from trainer.weights import save_weights

SMALL = ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", min_size=96, max_size=96,
                    options={"box_score_thresh": 0.0})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(str(root), n=6, size=96, seed=3)
    return root


@pytest.fixture(scope="module")
def weights(shapes: Path) -> Path:
    torch.manual_seed(0)
    path = shapes / "model.pt"
    save_weights(str(path), build_model(SMALL, 4).state_dict(), SMALL, load_coco_index(str(shapes / "train.json")))
    return path


def test_weights_file_describes_its_model_and_classes(weights: Path) -> None:
    detector = load_detector(str(weights))
    assert detector.model_config.name == SMALL.name and detector.model_config.min_size == 96
    assert detector.category_names == ["circle", "square", "triangle"] and detector.category_ids == [1, 2, 3]
    assert not detector.model.training
    reference = build_model(SMALL, 4)
    reference.load_state_dict(torch.load(weights, weights_only=True)["model"])
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 detector.model.state_dict().values(), strict=True))


def test_plain_state_dict_needs_a_config(tmp_path: Path, weights: Path, shapes: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(weights, weights_only=True)["model"], plain)
    with pytest.raises(InputError, match="plain state dict does not say which model"):
        load_detector(str(plain))
    detector = load_detector(str(plain), SMALL, load_coco_index(str(shapes / "train.json")))
    assert detector.category_names == ["circle", "square", "triangle"]


def test_weights_for_another_class_count_are_refused(tmp_path: Path, shapes: Path) -> None:
    other = tmp_path / "five.pt"
    torch.save(build_model(SMALL, 6).state_dict(), other)
    with pytest.raises(InputError, match=r"do not fit fasterrcnn_mobilenet_v3_large_320_fpn with 3 classes "
                                         r"\(shapes differ: roi_heads.box_predictor"):
        load_detector(str(other), SMALL, load_coco_index(str(shapes / "train.json")))


def test_list_images_file_folder_and_glob(shapes: Path) -> None:
    images = shapes / "images"
    everything = list_images(str(images))
    assert len(everything) == 6 and everything == sorted(everything)
    assert list_images(str(images / "shape_00001.jpg")) == [str(images / "shape_00001.jpg")]
    assert [Path(u).name for u in list_images(f"{images}/shape_0000[0-2].jpg")] == \
        ["shape_00000.jpg", "shape_00001.jpg", "shape_00002.jpg"]
    with pytest.raises(InputError, match=r"no \.jpg/\.jpeg/\.png images there"):
        list_images(f"{images}/*.tif")
    with pytest.raises(storage.NotFound):
        list_images(str(images / "missing.jpg"))


def test_predict_from_and_to_s3_with_a_broken_image_skipped(s3: S3Env, shapes: Path, weights: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("shape_00000.jpg", "shape_00001.jpg"):
        storage.copy(str(shapes / "images" / name), s3.uri(f"in/{name}"))
    storage.write_bytes(s3.uri("in/broken.jpg"), b"\xff\xd8 not really a jpeg")
    storage.write_bytes(s3.uri("in/notes.txt"), b"ignored: not an image")
    weights_uri = s3.uri("run/model.pt")
    storage.copy(str(weights), weights_uri)

    assert cli.main(["predict", "--weights", weights_uri, "--images", s3.uri("in/*.jpg"), "--out", s3.uri("out"),
                     "--score-thr", "0"]) == 0
    assert "broken.jpg: cannot decode image" in capsys.readouterr().err
    names = sorted(storage.basename(info.uri) for info in storage.list_objects(s3.uri("out")))
    assert names == ["00000_shape_00000.png", "00001_shape_00001.png", "detections.json"]
    for name in names[:2]:
        with Image.open(io.BytesIO(storage.read_bytes(s3.uri(f"out/{name}")))) as picture:
            assert picture.format == "PNG" and picture.size == (96, 96)
    detections = json.loads(storage.read_text(s3.uri("out/detections.json")))
    assert {d["file_name"] for d in detections} <= {s3.uri("in/shape_00000.jpg"), s3.uri("in/shape_00001.jpg")}
    for d in detections:
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0 and x + w <= 96.01 and y + h <= 96.01
        assert d["category_name"] == ["circle", "square", "triangle"][d["category_id"] - 1]


def test_score_threshold_filters_detections(shapes: Path, weights: Path, tmp_path: Path) -> None:
    detector = load_detector(str(weights))
    uris = list_images(str(shapes / "images"))[:2]
    everything = write_predictions(detector, uris, str(tmp_path / "all"), score_threshold=0.0, pictures=False)
    records = json.loads(Path(everything.json_uri).read_text())
    assert everything.images == 2 and everything.detections == len(records) > 0
    distinct = sorted({r["score"] for r in records})
    assert len(distinct) >= 2
    cut = (distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2  # between two stored scores
    some = write_predictions(detector, uris, str(tmp_path / "some"), score_threshold=cut, pictures=False)
    assert some.detections == sum(r["score"] >= cut for r in records) < len(records)


@pytest.mark.parametrize(("args", "message"), [
    (["--score-thr", "1.5"], "--score-thr must be in [0, 1]"),
    (["--images", "/nonexistent/dir/x.jpg"], "/nonexistent/dir/x.jpg"),
])
def test_predict_errors_are_one_line(args: list[str], message: str, weights: Path, shapes: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--weights": str(weights), "--images": str(shapes / "images"), "--out": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    assert cli.main(["predict", *[x for pair in base.items() for x in pair]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("trainer: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_eval_refuses_a_split_that_is_not_configured(tmp_path: Path, weights: Path, shapes: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{train: {{coco: {shapes / 'train.json'}, images: {shapes / 'images'}}}}}\n")
    assert cli.main(["eval", "--config", str(config), "--weights", str(weights)]) == 1
    assert "data.val.coco is not set" in capsys.readouterr().err


# ------------------------------------------------------------------ hostile and broken input (issue 14)
def test_predict_skips_a_decompression_bomb_and_a_huge_file_unread_and_keeps_the_others(
        shapes: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((shapes / "images").iterdir())[:3]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "shape_00001_bomb.png").write_bytes(bomb_png(30000, 30000))
    with open(folder / "shape_00002_huge.png", "wb") as sparse:  # larger than any image within --max-pixels
        sparse.truncate(image_bytes_limit(DEFAULT_MAX_PIXELS) + 1)
    assert cli.main(["predict", "--weights", str(weights), "--images", str(folder), "--out", str(tmp_path / "out"),
                     "--score-thr", "0", "--no-pictures"]) == 0
    err = capsys.readouterr().err
    assert "shape_00001_bomb.png: the header declares 900000000 pixels, over the limit of 89478485" in err
    assert f"shape_00002_huge.png: {image_bytes_limit(DEFAULT_MAX_PIXELS) + 1} bytes, more than the" in err
    records = json.loads((tmp_path / "out/detections.json").read_text())
    assert {r["file_name"] for r in records} == {str(folder / p.name) for p in good}


def test_predict_writes_results_as_it_goes(shapes: Path, weights: Path, tmp_path: Path) -> None:
    """Whatever stops a prediction run (here the model failing on the third batch), detections.json holds every
    image finished before it, as valid JSON."""
    detector = load_detector(str(weights))
    uris = list_images(str(shapes / "images"))[:6]
    model, calls = detector.model, []

    def failing(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        calls.append(len(images))
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return model(images)

    detector.model = failing  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="simulated"):
        write_predictions(detector, uris, str(tmp_path / "out"), score_threshold=0.0, batch_size=2)
    records = json.loads((tmp_path / "out/detections.json").read_text())
    assert sorted({r["file_name"] for r in records}) == uris[:4]
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


def test_non_finite_weights_are_never_written(tmp_path: Path, shapes: Path) -> None:
    from trainer.weights import NonFiniteWeightsError

    state = build_model(SMALL, 4).state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone().fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError, match=r"model_final.pt: not written: 1 of \d+ weight tensors hold NaN"):
        save_weights(str(tmp_path / "model_final.pt"), state, SMALL, load_coco_index(str(shapes / "train.json")))
    assert not (tmp_path / "model_final.pt").exists()

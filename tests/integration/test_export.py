"""`trainer export`: real TorchScript and ONNX exports of a small detector, loaded back the way a server loads them
and checked against the eager model; a refused model/format pair; a tampered export that fails the check and is
deleted; a run folder (and its EMA weights) as the source; the comparison itself on hand-made outputs.

The model is fasterrcnn_mobilenet_v3_large_320_fpn at 96 px with ``box_score_thresh: 0`` (a documented model
option), so even randomly initialised it keeps 100 detections per image and the check compares real boxes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import S3Env
from trainer import cli, storage
from trainer import export as export_module
from trainer.checkpoint import CheckpointWriter, Snapshot
from trainer.config import ModelConfig
from trainer.export import (
    METADATA_NAME,
    Cuts,
    ExportOptions,
    ParityReport,
    SizeParity,
    compare,
    export,
    exportable,
    refusal,
)
from trainer.logs import RankFormatter
from trainer.models import build_model
from trainer.synth import render_image
from trainer.weights import weights_payload, write_weights

SMALL = ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", min_size=96, max_size=96,
                    options={"box_score_thresh": 0.0})
NAMES = ["circle", "square", "triangle"]
# the tests' own torch.jit calls (trainer.export keeps its own quiet)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(load|save|script)` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _drop_the_cli_log_handler() -> Iterator[None]:
    """cli.main logs to the sys.stderr of its call (pytest's capture, closed after the test): remove it after."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler.formatter, RankFormatter):
            root.removeHandler(handler)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(SMALL, len(NAMES) + 1).state_dict()


@pytest.fixture(scope="module")
def one_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One shapes image for the checks whose subject is not the images (each export checks it at two sizes)."""
    path = tmp_path_factory.mktemp("check") / "shapes.jpg"
    path.write_bytes(render_image(np.random.default_rng(1), 96)[0])
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    write_weights(str(path), weights_payload(state, SMALL, [1, 2, 3], NAMES))
    return path


def test_torchscript_export_passes_the_check_and_runs_with_torchvision_ops(
        weights: Path, one_image: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.torchscript.pt"
    assert cli.main(["export", str(weights), "--format", "torchscript", "--out", str(out),
                     "--check-images", one_image]) == 0
    report = capsys.readouterr().out
    assert "96x96: 1 images, 100 eager / 100 exported detections, 100 matched" in report, report
    assert "96x128: 1 images" in report and "PASSED" in report and "MISMATCH" not in report
    extra = {METADATA_NAME: ""}
    module = torch.jit.load(str(out), _extra_files=extra)  # torchvision is imported: nms and roi_align exist
    metadata = json.loads(extra[METADATA_NAME])
    assert metadata["model"] == SMALL.name and metadata["category_names"] == NAMES and metadata["ema"] is False
    images = [torch.rand(3, 90, 120), torch.rand(3, 120, 64)]  # a batch of two sizes: TorchScript takes any
    with torch.no_grad():  # inference, as a user runs it (no autograd graph behind the boxes)
        detections = module(images)
    assert len(detections) == 2 and detections[1]["boxes"].shape == (100, 4)
    assert float(detections[1]["boxes"][:, 2].max()) <= 64  # boxes in the input image's pixels


def test_onnx_export_to_s3_passes_the_check_and_runs_in_onnx_runtime(weights: Path, s3: S3Env) -> None:
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    out = s3.uri("deploy/model.onnx")
    result = export(ExportOptions(str(weights), "onnx", out, opset=17))
    assert result.report.passed and not result.report.weak and result.report.compared == 398, result.report.lines()
    assert all(size.box_diff < 1e-3 and size.score_diff < 1e-5 for size in result.report.sizes)
    data = storage.read_bytes(out)
    assert len(data) == result.size_bytes
    metadata = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert json.loads(metadata[METADATA_NAME])["category_ids"] == [1, 2, 3]
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    boxes, labels, scores = session.run(["boxes", "labels", "scores"], {"image": torch.rand(3, 70, 150).numpy()})
    assert boxes.shape == (len(labels), 4) and labels.dtype.name == "int64" and scores.shape == labels.shape


def test_a_model_that_cannot_export_to_a_format_is_refused_in_one_line_naming_the_one_that_works(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ModelConfig(name="ssdlite320_mobilenet_v3_large")
    path = tmp_path / "ssdlite.pt"
    write_weights(str(path), weights_payload(build_model(config, 4).state_dict(), config, [1, 2, 3], NAMES))
    out = tmp_path / "ssdlite.onnx"
    assert cli.main(["export", str(path), "--format", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("trainer: error: ssdlite320_mobilenet_v3_large cannot be exported to onnx: ")
    assert err[-1].endswith("; use --format torchscript") and not out.exists()
    assert all(refusal(model, "torchscript") is None for model in export_module.SUPPORT)
    assert cli.main(["export", str(path), "--format", "torchscript", "--out", str(out), "--opset", "17"]) == 2


def _shift_boxes(uri: str) -> None:
    """What a broken conversion step would do: the written TorchScript file's box regression is changed."""
    module = torch.jit.load(uri)
    with torch.no_grad():
        module.model.roi_heads.box_predictor.bbox_pred.bias.add_(0.5)
    torch.jit.save(module, uri)


def test_an_export_that_differs_from_the_eager_model_fails_with_exit_1_and_is_deleted(
        weights: Path, one_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    real: Callable[[ExportOptions], Any] = export

    def with_tampering(options: ExportOptions) -> Any:  # the documented after_write hook, set under the CLI
        return real(dataclasses.replace(options, after_write=_shift_boxes))

    monkeypatch.setattr(export_module, "export", with_tampering)
    out = tmp_path / "model.pt"
    assert cli.main(["export", str(weights), "--format", "torchscript", "--out", str(out),
                     "--check-images", one_image]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "FAILED" in captured.out
    assert "does not match the eager model" in captured.err and f"{out} deleted" in captured.err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_run_folder_exports_its_newest_checkpoint_and_ema_weights(
        tmp_path: Path, one_image: str, state: dict[str, torch.Tensor]) -> None:
    ema = {k: v + 0.01 if k.startswith("roi_heads.box_predictor") else v for k, v in state.items()}
    run = tmp_path / "run"
    CheckpointWriter(str(run)).commit(Snapshot(
        step=4, epoch=0, objects={"model": {"model": state, "ema": {"module": ema}}},
        state={"classes": {"category_ids": [1, 2, 3], "category_names": NAMES},
               "config": {"model": dataclasses.asdict(SMALL)}}))
    out = tmp_path / "ema.pt"
    result = export(ExportOptions(str(run), "torchscript", str(out), ema=True, check_images=one_image))
    assert result.report.passed and result.report.compared > 0 and "step-000000004" in result.source
    module = torch.jit.load(str(out))
    assert torch.equal(module.model.roi_heads.box_predictor.cls_score.weight,
                       ema["roi_heads.box_predictor.cls_score.weight"])
    with pytest.raises(export_module.InputError, match="--ema needs a run or checkpoint folder"):
        export(ExportOptions(str(out), "torchscript", str(tmp_path / "x.pt"), ema=True))


# ------------------------------------------------------------------------------------------ the comparison
def _detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes), "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


EAGER = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 50]], [0.9, 0.5, 0.5], [1, 2, 2])


@pytest.mark.parametrize(("exported", "matched", "borderline", "unmatched"), [
    (EAGER, 3, 0, 0),
    # the two tied scores in the other order: paired by box, not by position
    (_detections([[0, 0, 10, 10], [30, 30, 40, 50], [5, 5, 20.0001, 20]], [0.9, 0.5, 0.50001], [1, 2, 2]), 3, 0, 0),
    (_detections([[0, 0, 10, 10], [5, 5, 20.5, 20], [30, 30, 40, 50]], [0.9, 0.5, 0.5], [1, 2, 2]), 2, 0, 2),
    (_detections([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 50]], [0.9, 0.5, 0.5], [1, 1, 2]), 2, 0, 2),
    (_detections([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 50]], [0.9, 0.5, 0.501], [1, 2, 2]), 2, 0, 2),
    (_detections([[0, 0, 10, float("nan")], [5, 5, 20, 20], [30, 30, 40, 50]], [0.9, 0.5, 0.5], [1, 2, 2]), 2, 0, 2),
    (_detections([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.5], [1, 2]), 2, 0, 1),  # one lost
])
def test_compare_pairs_detections_within_the_tolerances(exported: dict[str, torch.Tensor], matched: int,
                                                        borderline: int, unmatched: int) -> None:
    parity = SizeParity((10, 10))
    compare(EAGER, exported, parity, box_tolerance=0.05, score_tolerance=1e-4)
    assert (parity.matched, parity.borderline, parity.unmatched) == (matched, borderline, unmatched)
    assert parity.passed == (unmatched == 0)


def test_a_detection_at_the_score_threshold_may_fall_on_either_side() -> None:
    eager = _detections([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.05002], [1, 2])
    exported = _detections([[0, 0, 10, 10]], [0.9], [1])
    parity = SizeParity((10, 10))
    compare(eager, exported, parity, 0.05, 1e-4, Cuts(score_threshold=0.05))
    assert (parity.matched, parity.borderline, parity.unmatched) == (1, 1, 0)
    parity = SizeParity((10, 10))
    compare(eager, exported, parity, 0.05, 1e-4, Cuts(score_threshold=0.01))  # far from the cut: lost
    assert (parity.matched, parity.borderline, parity.unmatched) == (1, 0, 1)


def test_scores_that_tie_at_the_detection_limit_fail_and_the_report_says_why() -> None:
    """An untrained model's scores tie: which detections fill its limit is arbitrary, so nothing can be checked."""
    eager = _detections([[i, i, i + 10, i + 10] for i in range(4)], [0.3] * 4, [1] * 4)
    exported = _detections([[i, i, i + 10, i + 10] for i in range(20, 24)], [0.3] * 4, [1] * 4)
    parity = SizeParity((10, 10))
    compare(eager, exported, parity, 0.05, 1e-4, Cuts(limit=4))
    assert (parity.matched, parity.borderline, parity.unmatched, parity.tied) == (0, 0, 8, 8)
    lines = ParityReport("onnx", [parity]).lines()
    assert "MISMATCH" in lines[1] and lines[2].startswith("FAILED") and "many scores tie" in lines[3]


def test_two_overlapping_boxes_with_tied_scores_may_swap_under_nms() -> None:
    """NMS keeps one of two overlapping boxes of a class; when their scores tie, a rounding error picks which."""
    eager = _detections([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.5], [1, 1])
    exported = _detections([[0, 0, 10, 10], [51, 50, 61, 60]], [0.9, 0.50000005], [1, 1])
    parity = SizeParity((10, 10))
    compare(eager, exported, parity, 0.05, 1e-4, Cuts(nms_threshold=0.5))
    assert (parity.matched, parity.borderline, parity.unmatched) == (1, 2, 0)
    parity = SizeParity((10, 10))
    compare(eager, exported, parity, 0.05, 1e-4, Cuts(nms_threshold=0.9))  # they would both have been kept
    assert (parity.matched, parity.borderline, parity.unmatched) == (1, 0, 2)


def test_the_exported_transform_resizes_as_eager_pytorch_does() -> None:
    """torchvision's scripted/traced transform divides (1 / size) * target in float32: a 320 x 427 image becomes
    319 x 426 for min_size 320, max_size 427; the exported copy divides in float64, as eager Python does."""
    model = build_model(dataclasses.replace(SMALL, min_size=320, max_size=427), len(NAMES) + 1).eval()
    image = torch.rand(3, 320, 427)
    eager, _ = model.transform([image])
    fixed, _ = torch.jit.script(exportable(model).transform)([image])
    assert eager.image_sizes == fixed.image_sizes == [(320, 427)]
    assert torch.equal(eager.tensors, fixed.tensors)
    torchvisions, _ = torch.jit.script(model.transform)([image])
    assert torchvisions.image_sizes == [(319, 426)]  # what the fix is for (torchvision 0.29.1)

"""Run pictures: curve PNGs from metrics records (trainer.plots), detections drawn on images and PNG encoding
(trainer.drawing)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from trainer.drawing import PALETTE, draw_detections, encode_png, label_color
from trainer.plots import PLOT_SIZE_PX, render_plots, smooth
from trainer.run_log import RunLog

CLASSES = ["RBC", "WBC", "Platelets", "Sickle", "Blast"]


def _train(step: int, **extra: Any) -> dict[str, Any]:
    decay = math.exp(-step / 30)
    return {"time": 1.7e9 + step, "kind": "train", "epoch": 1 + step // 20, "step": step, "loss": 1.2 * decay + 0.1,
            "loss_classifier": 0.5 * decay + 0.02, "loss_box_reg": 0.3 * decay + 0.05, "loss_objectness": 0.2 * decay,
            "loss_rpn_box_reg": 0.2 * decay + 0.03, "lr": 0.01 * min(1.0, step / 10), "images_per_s": 12.3,
            "data_wait": 0.05, "host": "node-1", **extra}


def _eval(epoch: int, per_class: dict[str, float]) -> dict[str, Any]:
    ap = 0.1 * epoch
    return {"time": 1.7e9, "kind": "eval", "epoch": epoch, "step": 20 * epoch, "AP": ap, "AP50": ap + 0.3,
            "AP75": ap - 0.05, "APs": -1.0, "APm": ap, "APl": ap + 0.1, "AR1": 0.2, "AR10": 0.3, "AR100": -1.0,
            "ARs": -1.0, "ARm": 0.3, "ARl": 0.4, "per_class_ap": per_class}


def _records(classes: list[str] = CLASSES) -> list[dict[str, Any]]:
    per_class = {name: (i + 1) / (len(classes) + 1) for i, name in enumerate(classes)}
    return [_train(step) for step in range(1, 61)] + [_eval(epoch, per_class) for epoch in (1, 2, 3)]


def _open_png(data: bytes) -> Image.Image:
    Image.open(io.BytesIO(data)).verify()  # verify() leaves the image unusable: reopen for the checks
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def _grey(height: int = 100, width: int = 120, channels: int = 3) -> torch.Tensor:
    return torch.full((channels, height, width), 128, dtype=torch.uint8)


def _pixel(image: torch.Tensor, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image[:, y, x])


# -------------------------------------------------------------------------------------------- curves
def test_all_four_plots_are_pngs_of_the_documented_size() -> None:
    plots = render_plots(iter(_records()))  # any iterable, not only lists
    assert set(plots) == {"loss.png", "lr.png", "map.png", "per_class_ap.png"}
    for name, data in plots.items():
        assert _open_png(data).size == PLOT_SIZE_PX == (1200, 800), name


def test_per_class_chart_grows_with_the_number_of_classes() -> None:
    names = [f"class_{i:02d}" for i in range(30)]
    plots = render_plots([_eval(1, {name: 0.5 for name in names})])
    assert _open_png(plots["per_class_ap.png"]).size == (1200, 1200)
    assert _open_png(plots["map.png"]).size == PLOT_SIZE_PX


def test_only_train_records_give_only_train_plots() -> None:
    assert set(render_plots(_train(step) for step in range(1, 6))) == {"loss.png", "lr.png"}
    assert render_plots([]) == {}


def test_only_eval_records_give_only_eval_plots() -> None:
    plots = render_plots([_eval(1, {"RBC": 0.3, "WBC": -1.0})])
    assert set(plots) == {"map.png", "per_class_ap.png"}


def test_unknown_kinds_missing_keys_and_junk_values_do_not_crash() -> None:
    junk: list[Any] = [
        {}, {"kind": "system", "step": 3, "loss": 1.0}, {"kind": "train"}, {"kind": "train", "step": "x", "loss": 1},
        {"kind": "train", "step": 1, "loss": None, "lr": float("nan")}, {"kind": "eval"},
        {"kind": "eval", "epoch": 1, "AP": -1.0, "per_class_ap": "n/a"}, {"kind": "train", "step": True, "loss": 1.0},
    ]
    assert render_plots(junk) == {}  # nothing plottable: no file rather than an empty chart
    plots = render_plots([*junk, {"kind": "train", "step": 5, "loss": 0.5}, {"kind": "eval", "epoch": 1, "AP50": 0.4}])
    assert set(plots) == {"loss.png", "map.png"}


def test_retinanet_terms_without_loss_prefix_make_a_loss_plot() -> None:
    records = [{"kind": "train", "step": s, "classification": 1 / s, "bbox_regression": 0.5 / s} for s in range(1, 30)]
    plots = render_plots(records)
    assert set(plots) == {"loss.png"}
    assert _open_png(plots["loss.png"]).size == PLOT_SIZE_PX


def test_ignored_keys_do_not_count_as_data() -> None:
    # images_per_s, data_wait and strings are not loss terms: a record with only those draws nothing.
    assert render_plots([{"kind": "train", "step": 1, "images_per_s": 3.0, "data_wait": 0.1, "note": "x"}]) == {}


def test_minus_one_values_are_skipped_not_drawn() -> None:
    # A -1 AP75 must draw exactly what a missing AP75 draws (a line down to -1 would show inside y ∈ [0, 1]).
    later = {"kind": "eval", "epoch": 2, "AP": 0.4, "AP50": 0.6, "AP75": 0.2}
    with_minus_one = render_plots([{"kind": "eval", "epoch": 1, "AP": 0.3, "AP50": 0.5, "AP75": -1.0}, later])
    without = render_plots([{"kind": "eval", "epoch": 1, "AP": 0.3, "AP50": 0.5}, later])
    drawn_at_minus_one = render_plots([{"kind": "eval", "epoch": 1, "AP": 0.3, "AP50": 0.5, "AP75": 0.0}, later])
    assert with_minus_one["map.png"] == without["map.png"] != drawn_at_minus_one["map.png"]
    assert "map.png" not in render_plots([{"kind": "eval", "epoch": 1, "AP": -1.0, "AP50": -1.0, "AP75": -1.0}])


def test_smoothing_is_bias_corrected_and_follows_a_constant() -> None:
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    out = smooth([1.0] * 10 + [0.0] * 10)
    assert out[0] == 1.0 and 0.0 < out[-1] < out[10] < 1.0


def test_the_run_log_writes_every_plot_after_an_evaluation(tmp_path: Path) -> None:
    run_log = RunLog(str(tmp_path), active=True)
    run_log.train({"epoch": 1, "step": 1, "loss": 1.0, "lr": 0.01})
    run_log.eval({"epoch": 1, "step": 1, "AP": 0.25, "per_class_ap": {"RBC": 0.5}})
    written = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in written] == ["loss.png", "lr.png", "map.png", "per_class_ap.png"]
    for path in written:
        assert _open_png(path.read_bytes()).size[0] == 1200


# ---------------------------------------------------------------------------------------- detections
def test_boxes_change_their_edges_and_nothing_far_away() -> None:
    image = _grey()
    out = draw_detections(image, torch.tensor([[10.0, 20.0, 50.0, 60.0]]), ["RBC"], [0.87])
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert out.data_ptr() != image.data_ptr() and torch.equal(image, _grey())  # input untouched
    assert _pixel(out, 10, 20) == label_color("RBC")
    assert _pixel(out, 100, 90) == (128, 128, 128)
    assert _pixel(out, 30, 55) == (128, 128, 128)  # box interior below the caption is not filled


def test_one_colour_per_label_name() -> None:
    assert label_color("RBC") == label_color("RBC") and label_color("RBC") in PALETTE
    other = next(name for name in ("WBC", "Platelets", "Blast") if label_color(name) != label_color("RBC"))
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [60.0, 5.0, 90.0, 30.0], [5.0, 50.0, 30.0, 90.0]])
    out = draw_detections(_grey(), boxes, ["RBC", "RBC", other])
    assert _pixel(out, 5, 5) == _pixel(out, 60, 5) == label_color("RBC")
    assert _pixel(out, 5, 50) == label_color(other) != label_color("RBC")


def test_grayscale_input_comes_back_rgb() -> None:
    out = draw_detections(_grey(channels=1), torch.tensor([[10.0, 10.0, 40.0, 40.0]]), ["WBC"])
    assert out.shape == (3, 100, 120) and out.dtype == torch.uint8
    assert _pixel(out, 10, 10) == label_color("WBC") and _pixel(out, 100, 90) == (128, 128, 128)


def test_boxes_outside_the_image_are_clamped_or_skipped() -> None:
    boxes = torch.tensor([[-20.0, -20.0, 30.0, 30.0], [200.0, 200.0, 300.0, 300.0], [-50.0, -50.0, -10.0, -5.0],
                          [100.0, 80.0, 500.0, 500.0]])
    out = draw_detections(_grey(), boxes, ["a", "b", "c", "d"], [0.9, 0.8, 0.7, 0.6])
    assert out.shape == (3, 100, 120)
    assert _pixel(out, 0, 0) == label_color("a")  # clamped corner is drawn on the image border
    assert _pixel(out, 119, 99) == label_color("d")
    assert _pixel(out, 60, 50) == (128, 128, 128)


def test_no_boxes_returns_an_unchanged_copy() -> None:
    image = _grey()
    out = draw_detections(image, torch.zeros((0, 4)), [])
    assert torch.equal(out, image) and out.data_ptr() != image.data_ptr()


def test_mismatched_labels_are_an_error() -> None:
    with pytest.raises(ValueError, match="labels"):
        draw_detections(_grey(), torch.tensor([[1.0, 1.0, 5.0, 5.0]]), ["a", "b"])


def test_encode_png_round_trips_through_pil() -> None:
    image = draw_detections(_grey(64, 80), torch.tensor([[4.0, 4.0, 40.0, 30.0]]), ["RBC"], [0.5])
    png = _open_png(encode_png(image))
    assert png.size == (80, 64)
    assert png.convert("RGB").getpixel((4, 4)) == label_color("RBC")

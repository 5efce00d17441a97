"""Pictures of a run: training curves from ``metrics.jsonl`` records, and detections drawn on images.

Curves are rendered with ``matplotlib.figure.Figure`` and the Agg canvas directly, never ``pyplot``: no global
figure registry or backend switch, so this is headless and safe to call from a background thread while training
goes on. Every function returns PNG bytes (or tensors); only ``write_plots`` touches storage.
"""

from __future__ import annotations

import io
import math
import numbers
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.io import encode_png as _tv_encode_png
from torchvision.utils import draw_bounding_boxes

from trainer import storage

PLOT_SIZE_PX: tuple[int, int] = (1200, 800)  # width, height of every curve PNG
_DPI = 100
_PX_PER_CLASS = 40  # per_class_ap.png grows by this much per class once the classes no longer fit in 800 px

# RetinaNet / FCOS name their loss terms without the "loss_" prefix.
_BARE_LOSS_TERMS = frozenset({"classification", "bbox_regression", "bbox_ctrness"})
_MAP_KEYS = ("AP", "AP50", "AP75")
_SMOOTH_MIN_POINTS = 20  # fewer points than this are drawn raw only: an average of a handful just lags
_SMOOTH_ALPHA = 0.1  # weight of the newest point in the exponential moving average

# Bright, mutually distinct colours (tab10 without its grey, plus a few) so boxes stand out on photos.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (255, 215, 0), (0, 255, 127), (255, 0, 255),
)

Series = tuple[list[float], list[float]]  # (x, y), sorted by x


# ------------------------------------------------------------------------------------------ records → series
def _number(value: Any) -> float | None:
    """A finite real as float, else None: bools, strings, NaN and infinities are not data points."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _is_loss_key(key: str) -> bool:
    return key == "loss" or key.startswith("loss_") or key in _BARE_LOSS_TERMS


def _collect(records: Sequence[Mapping[str, Any]], kind: str, x_key: str,
             wanted: Iterable[str] | None = None,
             valid: Callable[[float], bool] | None = None) -> dict[str, Series]:
    """Per-key (x, y) series from one kind of record, in first-seen key order.

    A later record at the same x replaces an earlier one, so a resumed run that logged a step twice draws it once.
    ``wanted`` is a fixed key list, or None to take every loss key. ``valid`` filters values (pycocotools' -1).
    """
    points: dict[str, dict[float, float]] = {}
    for record in records:
        if not isinstance(record, Mapping) or record.get("kind") != kind:
            continue
        x = _number(record.get(x_key))
        if x is None:
            continue
        keys = wanted if wanted is not None else [k for k in record if isinstance(k, str) and _is_loss_key(k)]
        for key in keys:
            y = _number(record.get(key))
            if y is not None and (valid is None or valid(y)):
                points.setdefault(key, {})[x] = y
    return {key: (sorted(by_x), [by_x[x] for x in sorted(by_x)]) for key, by_x in points.items()}


def _last_per_class(records: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The latest eval record's per-class AP; None marks a class without ground truth (pycocotools' -1)."""
    for record in reversed(records):
        if not isinstance(record, Mapping) or record.get("kind") != "eval":
            continue
        per_class = record.get("per_class_ap")
        if isinstance(per_class, Mapping) and per_class:
            out: dict[str, float | None] = {}
            for name, value in per_class.items():
                number = _number(value)
                out[str(name)] = number if number is not None and number >= 0 else None
            return out
    return {}


def smooth(values: Sequence[float], alpha: float = _SMOOTH_ALPHA) -> list[float]:
    """Bias-corrected exponential moving average: without the correction the curve starts near zero."""
    out, average, weight = [], 0.0, 0.0
    for value in values:
        average = (1 - alpha) * average + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


# ---------------------------------------------------------------------------------------------- figures
def _new_figure(height_px: int = PLOT_SIZE_PX[1]) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(PLOT_SIZE_PX[0] / _DPI, height_px / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _png(figure: Figure) -> bytes:
    """Exact pixel size (no tight bbox) and no software/version metadata, so equal data gives equal bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _loss_png(series: dict[str, Series]) -> bytes:
    figure, axes = _new_figure()
    for index, (name, (xs, ys)) in enumerate(series.items()):
        color = f"C{index % 10}"
        width = 2.0 if name == "loss" else 1.2
        if len(xs) > _SMOOTH_MIN_POINTS:
            axes.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            axes.plot(xs, smooth(ys), color=color, linewidth=width, label=f"{name} (EMA)")
        else:
            axes.plot(xs, ys, color=color, linewidth=width, marker="o", markersize=3, label=name)
    if all(y > 0 for _, ys in series.values() for y in ys):
        axes.set_yscale("log")
    axes.set(title="Training loss", xlabel="step", ylabel="loss")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper right")
    return _png(figure)


def _lr_png(xs: list[float], ys: list[float]) -> bytes:
    figure, axes = _new_figure()
    axes.plot(xs, ys, color="C0", linewidth=1.5, marker="o" if len(xs) <= _SMOOTH_MIN_POINTS else None)
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.set(title="Learning rate", xlabel="step", ylabel="learning rate")
    axes.grid(True, alpha=0.3)
    return _png(figure)


def _map_png(series: dict[str, Series]) -> bytes:
    figure, axes = _new_figure()
    for key in _MAP_KEYS:
        if key in series:
            xs, ys = series[key]
            axes.plot(xs, ys, marker="o", linewidth=1.5, label=key)
    axes.set_ylim(0, 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(title="Validation mAP (COCO)", xlabel="epoch", ylabel="average precision")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    return _png(figure)


def per_class_height_px(classes: int) -> int:
    """Height of per_class_ap.png: one 40 px row per class, never below the standard 800 px."""
    return max(PLOT_SIZE_PX[1], _PX_PER_CLASS * classes)


def _per_class_png(per_class: dict[str, float | None]) -> bytes:
    # Best class on top; classes without ground truth last, labelled "n/a" instead of a bar at -1.
    ordered = sorted(per_class.items(), key=lambda item: (item[1] is None, -(item[1] or 0.0), item[0]))
    ordered.reverse()  # barh draws the first row at the bottom
    figure, axes = _new_figure(per_class_height_px(len(ordered)))
    rows = range(len(ordered))
    values = [value or 0.0 for _, value in ordered]
    axes.barh(rows, values, color="C0", height=0.7)
    for row, (_, value) in zip(rows, ordered, strict=True):
        if value is None:
            axes.text(0.01, row, "n/a", va="center", ha="left", color="grey")
        elif value > 0.9:  # no room right of the bar inside x ≤ 1
            axes.text(value - 0.01, row, f"{value:.3f}", va="center", ha="right", color="white")
        else:
            axes.text(value + 0.01, row, f"{value:.3f}", va="center", ha="left")
    axes.set_yticks(list(rows), [name for name, _ in ordered])
    axes.set_xlim(0, 1)
    axes.set_ylim(-0.6, len(ordered) - 0.4)
    axes.set(title="AP@[.5:.95] per class (latest evaluation)", xlabel="average precision", ylabel="class")
    axes.grid(True, axis="x", alpha=0.3)
    return _png(figure)


def render_plots(records: Iterable[Mapping[str, Any]]) -> dict[str, bytes]:
    """File name → PNG bytes for every picture the records have data for (none → {}).

    'loss.png' (total and each term vs step, log y when all > 0), 'lr.png' (vs step), 'map.png' (AP, AP50, AP75
    vs epoch, -1 skipped), 'per_class_ap.png' (bars of the latest eval's per-class AP). Curves are
    ``PLOT_SIZE_PX``; the per-class chart is ``per_class_height_px(classes)`` tall.
    """
    records = list(records)
    out: dict[str, bytes] = {}
    losses = _collect(records, "train", "step")
    if losses:
        if "loss" in losses:  # total first, then the terms in logged order
            losses = {"loss": losses.pop("loss"), **losses}
        out["loss.png"] = _loss_png(losses)
    lr = _collect(records, "train", "step", ["lr"]).get("lr")
    if lr:
        out["lr.png"] = _lr_png(*lr)
    ap = _collect(records, "eval", "epoch", _MAP_KEYS, valid=lambda value: value >= 0)
    if ap:
        out["map.png"] = _map_png(ap)
    per_class = _last_per_class(records)
    if per_class:
        out["per_class_ap.png"] = _per_class_png(per_class)
    return out


def write_plots(records: Iterable[Mapping[str, Any]], out_dir_uri: str) -> list[str]:
    """Render and write every plot under ``out_dir_uri`` (local or s3://); returns the written URIs."""
    written = []
    for name, data in render_plots(records).items():
        uri = storage.join(out_dir_uri, name)
        storage.write_bytes(uri, data)
        written.append(uri)
    return written


# --------------------------------------------------------------------------------------------- detections
def label_color(label: str) -> tuple[int, int, int]:
    """A colour fixed by the label text (crc32, not ``hash``: that is salted per process), same in every run."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light caption backgrounds, white on dark ones."""
    red, green, blue = color
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def _as_rgb_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected a CHW image with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        if not image.is_floating_point():
            raise ValueError(f"expected a uint8 or float image, got {image.dtype}")
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.detach().cpu()
    if image.shape[0] == 1:
        return image.expand(3, -1, -1).clone()
    return image[:3].clone()


def _clamped_boxes(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes clamped into the image, and a mask of those with area left (wholly outside → not drawn)."""
    boxes = boxes.detach().cpu().to(torch.float32).reshape(-1, 4)
    finite = torch.isfinite(boxes).all(dim=1)
    boxes = torch.nan_to_num(boxes)
    if ((boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3])).any():
        raise ValueError("boxes must be (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2")
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    visible = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, visible


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: Sequence[str],
                    scores: Sequence[float] | None = None, width: int = 2) -> torch.Tensor:
    """A new uint8 RGB CHW image with xyxy pixel boxes and 'label 0.87' captions, one colour per label name.

    Boxes are clamped to the image; boxes wholly outside it are not drawn. Grayscale input comes back as RGB.
    """
    rgb = _as_rgb_uint8(image)
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        if boxes.numel() == 0:
            return rgb
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if len(labels) != boxes.shape[0] or (scores is not None and len(scores) != boxes.shape[0]):
        raise ValueError(f"{boxes.shape[0]} boxes but {len(labels)} labels"
                         + ("" if scores is None else f" and {len(scores)} scores"))
    clamped, visible = _clamped_boxes(boxes, rgb.shape[1], rgb.shape[2])
    keep = [int(i) for i in torch.nonzero(visible).flatten()]
    if not keep:
        return rgb
    names = [str(labels[i]) for i in keep]
    captions = names if scores is None else [f"{labels[i]} {float(scores[i]):.2f}" for i in keep]
    colors = [label_color(name) for name in names]
    return draw_bounding_boxes(rgb, clamped[keep], captions, colors=colors, width=width, fill_labels=True,
                               label_colors=[_text_color(color) for color in colors])


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 CHW (1 or 3 channels) → PNG bytes."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates torchvision.io in favour of TorchCodec; the encoder itself still works.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        encoded = _tv_encode_png(image.detach().cpu().contiguous())
    return encoded.numpy().tobytes()

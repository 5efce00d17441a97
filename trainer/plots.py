"""Training curves of a run, drawn from ``metrics.jsonl`` records (detections are drawn by ``drawing.py``).

Curves are rendered with ``matplotlib.figure.Figure`` and the Agg canvas directly, never ``pyplot``: no global
figure registry or backend switch, so this is headless and safe to call from a background thread while training
goes on. Every function returns PNG bytes; the run log writes them (``run_log.py``). No torch here: the metrics
log that calls this runs beside training and should not pull in torchvision.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PLOT_SIZE_PX: tuple[int, int] = (1200, 800)  # width, height of every curve PNG
_DPI = 100
_PX_PER_CLASS = 40  # per_class_ap.png grows by this much per class once the classes no longer fit in 800 px

# RetinaNet / FCOS name their loss terms without the "loss_" prefix.
_BARE_LOSS_TERMS = frozenset({"classification", "bbox_regression", "bbox_ctrness"})
_MAP_KEYS = ("AP", "AP50", "AP75")
_SMOOTH_MIN_POINTS = 20  # fewer points than this are drawn raw only: an average of a handful just lags
_SMOOTH_ALPHA = 0.1  # weight of the newest point in the exponential moving average

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

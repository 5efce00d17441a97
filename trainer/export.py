"""Deployment exports of a trained detector (``trainer export``): TorchScript or ONNX, each checked against the
eager model before it counts.

The export is written (atomically, local or ``s3://``), read back from where it was written, loaded the way an
inference server loads it (TorchScript with ``torch.jit.load``, ONNX with ONNX Runtime on the CPU) and run on
the same images as the eager model at two image sizes. Boxes, labels and scores must agree within
``BOX_TOLERANCE_PX`` and ``SCORE_TOLERANCE``; otherwise the output is deleted and the export fails.

What the exported models take and return (see docs/deploying.md):

* TorchScript: ``forward(images: List[Tensor]) -> List[Dict[str, Tensor]]``, any number of float RGB images
  (3 x H x W, values in [0, 1]) of any sizes; one dict per image with ``boxes`` (x1, y1, x2, y2 in the input
  image's pixels), ``labels`` (int64) and ``scores``. Loading it needs ``import torchvision`` first (it registers
  the ``torchvision::nms`` and ``roi_align`` operators the graph calls).
* ONNX: one image per call, input ``image`` (float32, 3 x H x W, [0, 1], H and W dynamic); outputs ``boxes``,
  ``labels``, ``scores``. No batch axis: torchvision's detectors loop over their list of images in Python, so
  tracing unrolls the loop for the example's one image.

Both carry ``detection-trainer`` metadata (model, class names and COCO category ids: label k is
``category_names[k - 1]``). Normalisation and resizing are inside the model, as in ``trainer predict``.

The check is not a formality: scripted or traced, torchvision's R-CNN/RetinaNet/FCOS transform computes its resize
scale in float32 as ``(1 / size) * target`` where eager PyTorch divides in double precision, so at some image sizes
(e.g. 320 x 427 for ``min_size: 320, max_size: 427``) its exports resize to one pixel less and their detections
move. The check found it; the exported copy of a model gets ``ExactResize``, which divides in float64.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _fake_cast_onnx, _get_shape_onnx
from torchvision.ops import box_iou

from trainer import storage
from trainer.annotations.image_size import image_bytes_limit
from trainer.checkpoint import resolve
from trainer.config import DEFAULT_MAX_PIXELS
from trainer.errors import InputError, first_line
from trainer.inference import Detector, decode, list_images, load_detector
from trainer.models import REGISTRY
from trainer.synth import render_image
from trainer.weights import checkpoint_weights, write_weights

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
EXPORT_FORMAT = "detection-trainer/export-1"  # the metadata's "format"
METADATA_NAME = "detection-trainer.json"  # TorchScript extra file / ONNX metadata_props key
ONNX_INPUT = "image"
DEFAULT_OPSET = 17
MIN_OPSET = 11  # torchvision's detection models need opset 11 (dynamic Resize, TopK, NonMaxSuppression)
MAX_OPSET = 20  # the TorchScript-based exporter (dynamo=False) in torch 2.14 goes up to 20
MIN_SIDE, MAX_SIDE = 32, 4096  # --image-size bounds
CHECK_IMAGES_MAX = 4  # --check-images: at most this many (each at two sizes, eager and exported)
GENERATED_IMAGES = 2
# Parity tolerances. Scores: 1e-4 (measured differences are below 1e-6). Boxes: 0.05 px, not 1e-3: ONNX Runtime
# sums convolutions in another order than PyTorch, and float32 rounding in the backbone reaches the box deltas,
# which are scaled by exp() and the image size; a Faster R-CNN R50-FPN at 800 px moves boxes by up to ~1e-2 px.
BOX_TOLERANCE_PX = 0.05
SCORE_TOLERANCE = 1e-4

# What exports, per model and format: None when it exports and passes the parity check at two sizes (checked with
# torch 2.14.1, torchvision 0.29.1, onnx 1.23.2, onnxruntime 1.32.0), else why not (shown when it is refused).
_SSDLITE_ONNX = ("ONNX Runtime returns other detections than PyTorch (in the parity check, even at the traced size, "
                 "about a third of them differ, boxes by up to 48 px)")
SUPPORT: dict[str, dict[str, str | None]] = {
    "fasterrcnn_resnet50_fpn": {"torchscript": None, "onnx": None},
    "fasterrcnn_resnet50_fpn_v2": {"torchscript": None, "onnx": None},
    "fasterrcnn_mobilenet_v3_large_fpn": {"torchscript": None, "onnx": None},
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"torchscript": None, "onnx": None},
    "retinanet_resnet50_fpn": {"torchscript": None, "onnx": None},
    "retinanet_resnet50_fpn_v2": {"torchscript": None, "onnx": None},
    "fcos_resnet50_fpn": {"torchscript": None, "onnx": None},
    "ssd300_vgg16": {"torchscript": None, "onnx": None},
    "ssdlite320_mobilenet_v3_large": {"torchscript": None, "onnx": _SSDLITE_ONNX},
}
if set(SUPPORT) != set(REGISTRY):
    raise RuntimeError(f"trainer.export.SUPPORT {sorted(SUPPORT)} differs from the models {sorted(REGISTRY)}")


class ExportRefused(InputError):
    """This model cannot be exported to this format (one line naming a format that works)."""


def refusal(model_name: str, fmt: str) -> str | None:
    """Why ``model_name`` cannot be exported to ``fmt``, in one line naming the format that works; None if it can."""
    why = SUPPORT[model_name][fmt]
    if why is None:
        return None
    working = [other for other in FORMATS if SUPPORT[model_name][other] is None]
    instead = f"use --format {' or '.join(working)}" if working else "no format works for it"
    return f"{model_name} cannot be exported to {fmt}: {why}; {instead}"


# ------------------------------------------------------------------------------------------ options and results
@dataclass
class ExportOptions:
    source: str  # a weights file, a checkpoint (step-<N>) folder, a checkpoints folder or a run folder
    format: str  # torchscript | onnx
    out: str  # path or s3:// URI
    ema: bool = False  # the EMA weights of a checkpoint
    image_size: tuple[int, int] | None = None  # (H, W) of the example image and the first check size
    opset: int = DEFAULT_OPSET  # ONNX only
    check_images: str | None = None  # an image, a folder/prefix or a glob; default: generated images
    # A hook for tests and wrappers: called with ``out`` after it is written and before it is loaded back for the
    # parity check (a hook that alters the file makes the check judge the altered file).
    after_write: Callable[[str], None] | None = None


@dataclass
class SizeParity:
    """Eager against exported on every check image at one (H, W) size."""

    size: tuple[int, int]
    images: int = 0
    eager: int = 0  # detections, over all images
    exported: int = 0
    matched: int = 0  # pairs with the same label, boxes and scores within the tolerances
    borderline: int = 0  # on one side only, with a score within the tolerance of a cut (threshold, top-k)
    unmatched: int = 0  # on one side only, or without a counterpart within the tolerances
    tied: int = 0  # of the unmatched: at a cut, too many to be rounding flips (scores that tie, as untrained models')
    box_diff: float = 0.0  # largest |box coordinate difference| in px between nearest same-label detections
    score_diff: float = 0.0  # largest |score difference| between the same pairs

    @property
    def passed(self) -> bool:
        return self.unmatched == 0


@dataclass
class ParityReport:
    format: str
    sizes: list[SizeParity] = field(default_factory=list)
    box_tolerance: float = BOX_TOLERANCE_PX
    score_tolerance: float = SCORE_TOLERANCE

    @property
    def passed(self) -> bool:
        return all(size.passed for size in self.sizes)

    @property
    def compared(self) -> int:
        return sum(size.matched for size in self.sizes)

    @property
    def weak(self) -> bool:
        """Passed only because neither side detected anything: the boxes were never compared."""
        return self.passed and self.compared == 0

    def lines(self) -> list[str]:
        out = [f"parity check ({self.format} against eager PyTorch; tolerances: boxes {self.box_tolerance:g} px, "
               f"scores {self.score_tolerance:g}, labels equal):"]
        for s in self.sizes:
            out.append(f"  {s.size[0]}x{s.size[1]}: {s.images} images, {s.eager} eager / {s.exported} exported "
                       f"detections, {s.matched} matched, {s.borderline} borderline, {s.unmatched} unmatched; "
                       f"max diff boxes {s.box_diff:.2e} px, scores {s.score_diff:.2e}: "
                       f"{'ok' if s.passed else 'MISMATCH'}")
        if not self.passed:
            out.append("FAILED: the export does not compute what the eager model computes")
            if all(s.tied == s.unmatched for s in self.sizes):
                out.append("  every unmatched detection scores at a cut (the score threshold or the detections-per-"
                           "image limit) where many scores tie, as in an untrained model: which of them are kept is "
                           "arbitrary; check with --check-images where the model detects objects")
        elif self.weak:
            out.append("WEAK PASS: no detection was compared (none above the model's score threshold on either side); "
                       "pass --check-images with images the model detects objects in")
        else:
            out.append(f"PASSED: {self.compared} detections compared")
        return out


@dataclass
class ExportResult:
    out: str
    format: str
    model_name: str
    source: str
    size_bytes: int
    report: ParityReport
    deleted: bool = False  # the parity check failed and the output was removed


# ------------------------------------------------------------------------------------------ the export
def export(options: ExportOptions) -> ExportResult:
    """Export, write, load back and check; a failed check deletes ``options.out`` (see the module docstring)."""
    _check_options(options)
    detector, source = load_source(options.source, options.ema)
    why = refusal(detector.model_config.name, options.format)
    if why is not None:
        raise ExportRefused(why)
    sizes = check_sizes(detector, options.image_size)
    images = sample_images(options.check_images, sizes[0])
    model = detector.model.eval()
    log.info("exporting %s (%s) to %s as %s", detector.model_config.name, source, options.out, options.format)
    metadata = export_metadata(detector, source, options)
    try:
        exported = exportable(model)
        data = (torchscript_bytes(exported, metadata) if options.format == "torchscript"
                else onnx_bytes(exported, resize(images[0], sizes[0]), options.opset, metadata))
    except Exception as exc:  # the exporters raise anything from RuntimeError to their own error types
        raise InputError(f"cannot export {detector.model_config.name} to {options.format}: "
                         f"{type(exc).__name__}: {first_line(exc)}") from exc
    with storage.open_write(options.out) as stream:
        stream.write(data)
    if options.after_write is not None:
        options.after_write(options.out)
    result = ExportResult(options.out, options.format, detector.model_config.name, source, len(data),
                          ParityReport(options.format))
    try:
        runner = load_export(options.format, storage.read_bytes(options.out))
        result.report = check_parity(model, runner, images, sizes, options.format)
    except Exception as exc:  # a file that does not load or run (e.g. at the second size) fails like a mismatch
        storage.delete(options.out)
        raise InputError(f"{options.out}: the written {options.format} model does not load or run "
                         f"({type(exc).__name__}: {first_line(exc)}); deleted") from exc
    if not result.report.passed:
        storage.delete(options.out)
        result.deleted = True
    return result


def _check_options(options: ExportOptions) -> None:
    """Everything that can be refused before a model is read."""
    if options.format not in FORMATS:
        raise InputError(f"--format: {options.format!r} is not one of {', '.join(FORMATS)}")
    if options.image_size is not None and not all(MIN_SIDE <= side <= MAX_SIDE for side in options.image_size):
        raise InputError(f"--image-size: each side must be in [{MIN_SIDE}, {MAX_SIDE}], got {options.image_size}")
    if options.format == "onnx":
        if not MIN_OPSET <= options.opset <= MAX_OPSET:
            raise InputError(f"--opset: {options.opset} is outside [{MIN_OPSET}, {MAX_OPSET}] (torchvision's "
                             f"detectors need {MIN_OPSET}; torch's TorchScript-based exporter stops at {MAX_OPSET})")
        missing = [name for name in ("onnx", "onnxruntime") if not _importable(name)]
        if missing:
            raise InputError(f"--format onnx needs {' and '.join(missing)}: pip install 'detection-trainer[onnx]'")


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def load_source(source: str, ema: bool) -> tuple[Detector, str]:
    """The detector of a weights file, or of a checkpoint or a run (its newest good checkpoint; ``ema``: its EMA
    weights), and the name of what was read.

    A checkpoint's weights go the way of ``trainer ckpt export`` (``checkpoint_weights``, a weights file) and then
    ``load_detector``: the same payload, checked the same way.
    """
    try:
        folder = ("://" not in source or storage.is_s3(source)) and storage.is_dir(source)
    except storage.StorageError:
        folder = False
    if not folder:
        if ema:
            raise InputError(f"{source}: --ema needs a run or checkpoint folder (a weights file holds one set of "
                             "weights)")
        return load_detector(source), source
    checkpoint = resolve(source, check=checkpoint_weights, names=("model",))
    payload = checkpoint_weights(checkpoint, ema=ema)
    with tempfile.TemporaryDirectory(prefix="trainer-export-") as folder_path:
        path = storage.join(folder_path, "weights.pt")
        write_weights(path, payload)
        detector = load_detector(path)
    return detector, f"{checkpoint.uri} (EMA)" if ema else checkpoint.uri


def check_sizes(detector: Detector, image_size: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The two (H, W) sizes of the check: the given or the model's natural size, then another aspect ratio."""
    config = detector.model_config
    if image_size is not None:
        first = image_size
    elif REGISTRY[config.name].uses_size:
        first = (config.min_size, config.max_size)
    else:
        side = 300 if REGISTRY[config.name].family == "vgg" else 320
        first = (side, side)
    height, width = first
    second = (width, height) if height != width else (height, max(MIN_SIDE, width * 4 // 3))
    return [first, second]


def sample_images(pattern: str | None, first_size: tuple[int, int]) -> list[torch.Tensor]:
    """The check images, uint8 RGB: up to CHECK_IMAGES_MAX from ``pattern``, else generated shapes images."""
    if pattern is None:
        rng = np.random.default_rng(0)
        side = max(first_size)
        return [decode(render_image(rng, side)[0], f"generated image {i}") for i in range(GENERATED_IMAGES)]
    uris = list_images(pattern)
    if len(uris) > CHECK_IMAGES_MAX:
        log.info("--check-images: using the first %d of %d images", CHECK_IMAGES_MAX, len(uris))
    limit = image_bytes_limit(DEFAULT_MAX_PIXELS)  # decode()'s own pixel limit
    return [decode(storage.read_bytes(uri, max_bytes=limit), uri) for uri in uris[:CHECK_IMAGES_MAX]]


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 image as the float [0, 1] input of the model at ``size`` (H, W)."""
    scaled = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)
    return (scaled[0] / 255).clamp_(0, 1)


def export_metadata(detector: Detector, source: str, options: ExportOptions) -> dict[str, Any]:
    """What the exported file says about itself (JSON): the model, its classes, the input it takes."""
    return {"format": EXPORT_FORMAT, "export_format": options.format, "model": detector.model_config.name,
            "model_config": dataclasses.asdict(detector.model_config), "source": source, "ema": options.ema,
            "category_ids": detector.category_ids, "category_names": detector.category_names,
            "input": "float32 RGB, 3 x H x W, values in [0, 1]; label k is category_names[k - 1]",
            "torch": torch.__version__, "torchvision": torchvision.__version__}


# ------------------------------------------------------------------------------------------ the two formats
class DetectionsOnly(nn.Module):
    """A scripted torchvision detector returns ``(losses, detections)``: this keeps the detections, so the
    TorchScript module has the eager model's signature."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)[1]  # scripted: (losses, detections); this module is only ever scripted


class ExactResize(GeneralizedRCNNTransform):
    """torchvision's detection transform, except that, scripted or traced, the resize scale is divided in float64
    as eager PyTorch divides it in Python. torchvision computes ``(1 / size) * target`` in float32 there, so at
    some sizes the export resized to one pixel less than the eager model (320 x 427 with min 320, max 427 became
    319 x 426). Only the exported copy of a model gets it; inference only (no targets)."""

    def resize(self, image: torch.Tensor,
               target: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if torchvision._is_tracing():
            shape = _get_shape_onnx(image)
        else:
            shape = torch.tensor(image.shape[-2:])
        size = shape.to(torch.float64)
        smallest = torch.tensor(float(self.min_size[-1]), dtype=torch.float64)
        largest = torch.tensor(float(self.max_size), dtype=torch.float64)
        scale = torch.min(smallest / size.min(), largest / size.max())
        scale_factor = _fake_cast_onnx(scale) if torchvision._is_tracing() else scale.item()
        image = torch.nn.functional.interpolate(image[None], scale_factor=scale_factor, mode="bilinear",
                                                recompute_scale_factor=True, align_corners=False)[0]
        return image, target


def exportable(model: nn.Module) -> nn.Module:
    """The model to export: a copy with ``ExactResize`` when it resizes by min/max size (R-CNN, RetinaNet, FCOS;
    SSD resizes to a fixed size)."""
    transform = getattr(model, "transform", None)
    if type(transform) is not GeneralizedRCNNTransform or getattr(transform, "fixed_size", None) is not None:
        return model
    copied = copy.deepcopy(model)
    copied.transform.__class__ = ExactResize
    return copied


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' deprecation and tracer warnings go to the debug log, not the user's terminal."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        log.debug("export warning: %s", first_line(Exception(warning.message)))


def torchscript_bytes(model: nn.Module, metadata: dict[str, Any]) -> bytes:
    # a scripted R-CNN warns "RCNN always returns a (Losses, Detections) tuple" on its first call unless told it
    # has: DetectionsOnly handles that, so the deployed module need not say it
    warned = getattr(model, "_has_warned", None)
    if warned is not None:
        model._has_warned = True  # type: ignore[assignment]  # a plain bool attribute of GeneralizedRCNN
    try:
        with _quiet():
            scripted = torch.jit.script(DetectionsOnly(model).eval())
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer, _extra_files={METADATA_NAME: json.dumps(metadata)})
    finally:
        if warned is not None:
            model._has_warned = warned
    return buffer.getvalue()


def onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int, metadata: dict[str, Any]) -> bytes:
    """The model traced on ``example`` (one image) by the TorchScript-based exporter, with dynamic H and W."""
    import onnx

    with torch.no_grad():
        names = list(model([example])[0])  # boxes, labels, scores in the order the model returns them
    axes = {ONNX_INPUT: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in names}}
    with tempfile.TemporaryDirectory(prefix="trainer-export-") as folder, _quiet(), torch.no_grad():
        path = f"{folder}/model.onnx"
        torch.onnx.export(model, ([example],), path, dynamo=False, opset_version=opset, input_names=[ONNX_INPUT],
                          output_names=names, dynamic_axes=axes, do_constant_folding=True)
        proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps(metadata)
    return bytes(proto.SerializeToString())


Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def load_export(fmt: str, data: bytes) -> Runner:
    """Load an export the way a server does and return a function of one float image to its detections."""
    if fmt == "torchscript":
        with _quiet():  # torch 2.14 deprecates torch.jit.load (FutureWarning); it works
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # torchvision is imported: its ops exist

        def run_torchscript(image: torch.Tensor) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return dict(module([image])[0])

        return run_torchscript
    import onnxruntime  # type: ignore[import-untyped]  # the optional [onnx] extra

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = [output.name for output in session.get_outputs()]

    def run_onnx(image: torch.Tensor) -> dict[str, torch.Tensor]:
        values = session.run(outputs, {ONNX_INPUT: image.numpy()})
        return {name: torch.from_numpy(np.asarray(value)) for name, value in zip(outputs, values, strict=True)}

    return run_onnx


# ------------------------------------------------------------------------------------------ the parity check
@dataclass(frozen=True)
class Cuts:
    """Where the model decides between keeping and dropping a detection: there, two float32 results a rounding
    error apart may decide differently."""

    score_threshold: float | None = None  # detections scoring below it are dropped
    limit: int | None = None  # detections kept per image (the lowest-scoring ones beyond it are dropped)
    nms_threshold: float | None = None  # of two overlapping boxes (IoU above it) of a class, the lower score goes

    @classmethod
    def of(cls, model: nn.Module) -> Cuts:
        holder = getattr(model, "roi_heads", model)  # Faster R-CNN: its box head; the others: the model itself
        values = [getattr(holder, name, None) for name in ("score_thresh", "detections_per_img", "nms_thresh")]
        threshold, limit, nms = (float(v) if isinstance(v, int | float) else None for v in values)
        return cls(threshold, int(limit) if limit is not None else None, nms)


def check_parity(model: nn.Module, runner: Runner, images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]],
                 fmt: str, box_tolerance: float = BOX_TOLERANCE_PX,
                 score_tolerance: float = SCORE_TOLERANCE) -> ParityReport:
    """Every image at every size through the eager model and the export, compared detection by detection."""
    report = ParityReport(fmt, box_tolerance=box_tolerance, score_tolerance=score_tolerance)
    cuts = Cuts.of(model)
    for size in sizes:
        parity = SizeParity(size)
        for image in images:
            tensor = resize(image, size)
            with torch.no_grad():
                eager = model([tensor])[0]
            compare(eager, runner(tensor), parity, box_tolerance, score_tolerance, cuts)
            parity.images += 1
        report.sizes.append(parity)
    return report


def compare(eager: dict[str, torch.Tensor], exported: dict[str, torch.Tensor], parity: SizeParity,
            box_tolerance: float, score_tolerance: float, cuts: Cuts = Cuts()) -> None:
    """Pair each exported detection with the nearest unpaired eager one of the same label; add the counts and the
    largest differences to ``parity``.

    Pairing by nearest box instead of by position makes the check indifferent to the order of detections whose
    scores tie. A detection found on one side only is unmatched and fails the check, NaN included, unless it is
    borderline: a rounding difference deciding at a cut (see ``_flips``), and such detections are few (at most
    ``max(2, 2%)`` of the image's detections per side).
    """
    e_boxes, e_scores, e_labels = (eager[k].detach().float() for k in ("boxes", "scores", "labels"))
    x_boxes, x_scores, x_labels = (exported[k].detach().float() for k in ("boxes", "scores", "labels"))
    parity.eager += len(e_boxes)
    parity.exported += len(x_boxes)
    used = torch.zeros(len(e_boxes), dtype=torch.bool)
    lone = torch.zeros(len(x_boxes), dtype=torch.bool)
    for i in range(len(x_boxes)):
        candidates = (e_labels == x_labels[i]) & ~used
        if not bool(candidates.any()):
            lone[i] = True
            continue
        distance = (e_boxes - x_boxes[i]).abs().amax(dim=1).nan_to_num(math.inf).masked_fill(~candidates, math.inf)
        j = int(distance.argmin())
        box_diff = float((e_boxes[j] - x_boxes[i]).abs().max())
        score_diff = float((e_scores[j] - x_scores[i]).abs())
        parity.box_diff = _worst(parity.box_diff, box_diff)
        parity.score_diff = _worst(parity.score_diff, score_diff)
        if box_diff <= box_tolerance and score_diff <= score_tolerance:  # False for NaN
            used[j] = True
            parity.matched += 1
        else:
            lone[i] = True
    lone_x = {k: v[lone] for k, v in exported.items()}
    lone_e = {k: v[~used] for k, v in eager.items()}
    flips = _flips(lone_x, lone_e, eager, cuts, score_tolerance) + _flips(lone_e, lone_x, exported, cuts,
                                                                          score_tolerance)
    count = len(lone_x["scores"]) + len(lone_e["scores"])
    if flips == count and count <= 2 * max(2, max(len(e_boxes), len(x_boxes)) // 50):
        parity.borderline += count
    else:  # several, or some away from any cut: not explained by rounding
        parity.unmatched += count
        parity.tied += flips


def _flips(lone: dict[str, torch.Tensor], other_lone: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
           cuts: Cuts, tolerance: float) -> int:
    """How many of one side's lone detections a rounding difference explains: a score within ``tolerance`` of the
    score threshold, or of the lowest score the other side kept when that side is at its detections-per-image
    limit; or a lone detection of the other side with the same label and a score within ``tolerance`` that
    overlaps it beyond the NMS threshold (two near-equal boxes: NMS keeps one, and a rounding error picks which)."""
    edges = [cuts.score_threshold] if cuts.score_threshold is not None else []
    if cuts.limit is not None and len(other["scores"]) >= cuts.limit:
        edges.append(float(other["scores"].min()))
    overlap = (box_iou(lone["boxes"].float(), other_lone["boxes"].float())
               if len(lone["boxes"]) and len(other_lone["boxes"]) else None)
    count = 0
    for i, score in enumerate(lone["scores"].float().tolist()):
        at_cut = any(abs(score - edge) <= tolerance for edge in edges)
        if not at_cut and overlap is not None and cuts.nms_threshold is not None:
            twin = ((other_lone["labels"] == lone["labels"][i])
                    & ((other_lone["scores"].float() - score).abs() <= tolerance)
                    & (overlap[i] > cuts.nms_threshold))
            at_cut = bool(twin.any())
        count += at_cut
    return count


def _worst(current: float, new: float) -> float:
    return new if math.isnan(new) or new > current else current

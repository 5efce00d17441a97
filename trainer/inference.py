"""Using a trained detector: the weights file it is saved as, loading it back, evaluating it on a split and
predicting on arbitrary images.

A weights file (``model_final.pt``, ``model_best.pt``, ``trainer ckpt export``) holds the state dict *and* what
is needed to use it alone: the model section of the config and the class names and COCO category ids. So
``trainer predict --weights URI`` needs nothing else (URI may also be a run or checkpoint folder: the weights of
its newest good checkpoint); a plain state dict (e.g. from torchvision) needs a config
that names the model and a COCO JSON that names the classes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer import storage
from trainer.annotations.image_size import image_bytes_limit, pixel_problem
from trainer.config import DEFAULT_MAX_PIXELS, Config, ModelConfig, SplitConfig, parse_section
from trainer.data.coco_index import CocoIndex, load_coco_index
from trainer.data.dataset import CocoDetection
from trainer.data.decode import DecodeError, decode_rgb
from trainer.data.loader import build_loader
from trainer.data.sampler import ResumableDistributedBatchSampler
from trainer.data.transforms import build_transforms
from trainer.distributed import DistEnv
from trainer.drawing import draw_detections, encode_png
from trainer.engine import predict_batches, to_device
from trainer.errors import InputError
from trainer.evaluation import DistributedEvaluator, EvalResult, load_ground_truth
from trainer.models import build_model
from trainer.weights import WEIGHTS_FORMAT, read_weights_or_checkpoint, state_dict_of

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Detector:
    """A model ready for inference and the names of its labels (label k is ``category_names[k - 1]``)."""

    model: nn.Module
    model_config: ModelConfig
    category_ids: list[int]
    category_names: list[str]


def load_detector(weights: str, model_config: ModelConfig | None = None, index: CocoIndex | None = None,
                  device: torch.device | None = None) -> Detector:
    """Build the model a weights file describes (or ``model_config``) and load every tensor, strictly.

    Unlike fine-tuning (``model.weights``), nothing may be missing or of another shape: evaluating a model with
    a re-initialised head would report a meaningless mAP.
    """
    obj, source = read_weights_or_checkpoint(weights)
    described = isinstance(obj, Mapping) and obj.get("format") == WEIGHTS_FORMAT
    if described:
        try:
            stored = parse_section(ModelConfig, dict(obj["model_config"]), "model", source)
            ids, names = [int(i) for i in obj["category_ids"]], [str(n) for n in obj["category_names"]]
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise InputError(f"{source}: damaged weights file description ({exc})") from exc
        model_config = model_config or stored
    elif model_config is None or index is None:
        raise InputError(f"{source}: a plain state dict does not say which model or classes it is for; "
                         "pass --config (model section and the COCO JSON of the classes)")
    if index is not None:
        ids, names = list(index.category_ids), list(index.category_names)
    if len(ids) != len(names) or not ids:
        raise InputError(f"{source}: the weights file lists {len(ids)} category ids and {len(names)} names")
    state = state_dict_of(obj, source)
    model = build_model(dataclasses.replace(model_config, weights=None, freeze=[]), len(ids) + 1)
    own = model.state_dict()
    wrong = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if wrong or missing:
        detail = f"shapes differ: {', '.join(wrong[:3])}" if wrong else f"missing: {', '.join(missing[:3])}"
        raise InputError(f"{source}: these weights do not fit {model_config.name} with {len(ids)} classes ({detail})")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    model.to(device or torch.device("cpu")).eval()
    return Detector(model, model_config, ids, names)


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class ValidationSet:
    """What every evaluation of a run reads, prepared once: the split's index, its loader (this rank's share, in
    a fixed order) and, on rank 0, the ground truth COCOeval scores against. A run evaluates after many epochs;
    rebuilding these each time re-read and re-validated the COCO file and re-indexed the ground truth."""

    coco_uri: str
    index: CocoIndex
    loader: Any  # a DataLoader of (images, targets, metas); its workers start afresh for each evaluation
    ground_truth: Any | None  # rank 0 only


def build_validation(split: SplitConfig, config: Config, env: DistEnv) -> ValidationSet:
    """The split's ``ValidationSet``: a broken COCO file is refused here, at start-up, with one line."""
    index = load_coco_index(split.coco, keep_document=env.is_main)  # the repaired ground truth, for rank 0
    dataset = CocoDetection(index, split.images, build_transforms("none", train=False, mean=config.data.mean,
                                                                  std=config.data.std),
                            drop_empty=False, strict=config.data.strict, max_pixels=config.data.max_pixels)
    # This rank's batches, fixed: the same every evaluation (a resumable sampler would yield nothing once
    # iterated to the end), as many on every rank (the sampler pads), so a per-batch collective cannot hang.
    batches = list(ResumableDistributedBatchSampler(len(dataset), config.data.batch_size, env.world_size, env.rank,
                                                    shuffle=False))
    loader = build_loader(dataset, batches, workers=config.data.workers, persistent_workers=False)
    ground_truth = None
    if env.is_main:
        assert index.document is not None  # loaded above with keep_document=True
        ground_truth = load_ground_truth(index.document, config.eval.backend)
    return ValidationSet(split.coco, index, loader, ground_truth)


def evaluate(model: nn.Module, validation: ValidationSet, env: DistEnv, autocast_dtype: torch.dtype | None = None,
             should_stop: Callable[[], bool] | None = None,
             before_gather: Callable[[], None] | None = None) -> EvalResult | None:
    """COCO mAP of ``model`` on ``validation``: every rank predicts its share, rank 0 scores (None elsewhere).

    ``should_stop`` is called by every rank after each batch (the ranks hold equal batch counts, so it may run a
    collective): True abandons the evaluation with ``EvaluationStopped``. ``before_gather`` runs once the
    predictions are done, before rank 0 scores them (the other ranks wait there).
    """
    evaluator = DistributedEvaluator(validation.index.category_ids)
    for outputs, targets in predict_batches(model, validation.loader, env.device, autocast_dtype):
        evaluator.update(outputs, targets)
        if should_stop is not None and should_stop():
            raise EvaluationStopped(f"the evaluation on {validation.coco_uri} was stopped")
    if before_gather is not None:
        before_gather()
    return evaluator.finish(env, validation.ground_truth)


class EvaluationStopped(Exception):
    """Every rank agreed to stop in the middle of an evaluation (a stop signal): it runs again after a resume."""


# ------------------------------------------------------------------------------------------ prediction
def list_images(pattern: str) -> list[str]:
    """Image URIs for a file, a folder/prefix (every .jpg/.jpeg/.png below it) or a glob (``s3://b/x/*.jpg``)."""
    wildcard = next((i for i, c in enumerate(pattern) if c in "*?["), None)
    if wildcard is None:
        if not storage.is_dir(pattern):
            storage.stat(pattern)  # a clear NotFound when it is neither a file nor a folder
            return [pattern]
        base, match = pattern, None
    else:
        base, match = pattern[: pattern.rfind("/", 0, wildcard) + 1] or ".", pattern
    uris = sorted(info.uri for info in storage.list_objects(base, recursive=True)
                  if not info.is_dir and info.uri.lower().endswith(IMAGE_SUFFIXES)
                  and (match is None or fnmatch.fnmatchcase(info.uri, _normal(match, base, info.uri))))
    if not uris:
        raise InputError(f"{pattern}: no .jpg/.jpeg/.png images there")
    return uris


def _normal(match: str, base: str, uri: str) -> str:
    """The glob spelled as list_objects spells URIs (a local ``./x/*.jpg`` lists as ``x/...``)."""
    if base == "." and not uri.startswith("./"):
        return match.removeprefix("./")
    return match


def decode(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """The image as uint8 RGB; its header is checked first, so a decompression bomb is refused unread."""
    problem = pixel_problem(data, max_pixels)
    if problem is not None:
        raise InputError(f"{uri}: {problem}")
    try:
        return decode_rgb(data)
    except DecodeError as exc:
        raise InputError(f"{uri}: {exc}") from exc


@torch.no_grad()
def predict_images(detector: Detector, uris: Sequence[str], batch_size: int = 4,
                   device: torch.device | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                   skipped: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    """(uri, uint8 image, output on the CPU) for each image, in order; unreadable or over-limit images are
    skipped with a warning (and added to ``skipped``) so one bad file does not lose the rest."""
    device = device or torch.device("cpu")
    for start in range(0, len(uris), batch_size):
        batch: list[tuple[str, torch.Tensor]] = []
        for uri in uris[start:start + batch_size]:
            try:
                data = storage.read_bytes(uri, max_bytes=image_bytes_limit(max_pixels))
                batch.append((uri, decode(data, uri, max_pixels)))
            except (InputError, storage.StorageError) as exc:
                log.warning("skipped: %s", exc)
                if skipped is not None:
                    skipped.append(uri)
        if not batch:
            continue
        images, _ = to_device([image for _, image in batch], [{} for _ in batch], device)
        outputs = detector.model(images)
        for (uri, image), output in zip(batch, outputs, strict=True):
            yield uri, image, {k: v.cpu() for k, v in output.items()}


@dataclass
class PredictSummary:
    images: int
    detections: int
    json_uri: str
    picture_uris: list[str]
    skipped: list[str] = dataclasses.field(default_factory=list)


class DetectionsFile:
    """``detections.json``, rewritten (atomically) as images are done, so a run stopped by anything (a crash,
    the OOM killer, Ctrl-C) leaves valid JSON with every image finished so far. Rewrites are spaced to at most
    one per ``spacing`` of the time spent so far (at least ``min_seconds``), so a long run costs O(n log n)."""

    def __init__(self, uri: str, min_seconds: float = 1.0, spacing: float = 0.1) -> None:
        self.uri = uri
        self.records: list[dict[str, Any]] = []
        self.min_seconds, self.spacing = min_seconds, spacing
        self.started = self.last = time.monotonic()
        self.written = -1

    def add(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)
        now = time.monotonic()
        if now - self.last >= max(self.min_seconds, self.spacing * (now - self.started)) or self.written < 0:
            self.flush()

    def flush(self) -> None:
        if self.written == len(self.records) and self.written >= 0:
            return
        storage.write_text(self.uri, json.dumps(self.records, indent=1) + "\n")
        self.written, self.last = len(self.records), time.monotonic()


def detection_records(detector: Detector, image_id: int, uri: str, output: dict[str, torch.Tensor],
                      score_threshold: float) -> tuple[list[dict[str, Any]], torch.Tensor, list[str], torch.Tensor]:
    """COCO result records (with file and class names) for one image's kept detections; also the kept boxes,
    names and scores for the picture. Non-finite boxes or scores are dropped (the file stays strict JSON)."""
    keep = output["scores"] >= score_threshold
    boxes, scores, labels = output["boxes"][keep], output["scores"][keep], output["labels"][keep]
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    boxes, scores, labels = boxes[finite], scores[finite], labels[finite]
    names = [detector.category_names[int(k) - 1] for k in labels]
    records = []
    for box, score, label, name in zip(boxes.tolist(), scores.tolist(), labels.tolist(), names, strict=True):
        records.append({"image_id": image_id, "file_name": uri, "category_id": detector.category_ids[label - 1],
                        "category_name": name, "score": round(score, 5),
                        "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                 round(box[3] - box[1], 2)]})
    return records, boxes, names, scores


def write_predictions(detector: Detector, uris: Sequence[str], out: str, score_threshold: float = 0.5,
                      batch_size: int = 4, pictures: bool = True, device: torch.device | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> PredictSummary:
    """``<out>/detections.json`` (COCO result records plus file names and class names) and, per image,
    ``<out>/<name>.png`` with the boxes drawn, both written as the images are done."""
    detections = DetectionsFile(storage.join(out, "detections.json"))
    picture_uris: list[str] = []
    skipped: list[str] = []
    seen = 0
    try:
        for image_id, (uri, image, output) in enumerate(
                predict_images(detector, uris, batch_size, device, max_pixels, skipped)):
            seen += 1
            records, boxes, names, scores = detection_records(detector, image_id, uri, output, score_threshold)
            if pictures:
                stem = storage.basename(uri).rsplit(".", 1)[0]
                target = storage.join(out, f"{image_id:05d}_{stem}.png")
                storage.write_bytes(target, encode_png(draw_detections(image, boxes, names, scores.tolist())))
                picture_uris.append(target)
            detections.add(records)
    finally:
        detections.flush()  # whatever stopped the loop, what is done is kept
    if skipped:
        log.warning("%d of %d images skipped (unreadable or over --max-pixels): %s", len(skipped), len(uris),
                    ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return PredictSummary(seen, len(detections.records), detections.uri, picture_uris, skipped)

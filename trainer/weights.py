"""Weights files: reading them (pretrained weights from a path, ``s3://``, ``https://`` or the torch hub cache;
our own weights files; the weights of a run's newest good checkpoint) and writing them (``model_best.pt``,
``model_final.pt``, ``trainer ckpt export``).

Every read goes through ``torch.load(weights_only=True)``: a weights file can hold tensors and plain containers,
and nothing in it can run code. Nothing here downloads torchvision weights: a torchvision weights name is read
from the torch hub cache only.

A weights file of ours holds the state dict *and* what is needed to use it alone: the model section of the config
and the class names and COCO category ids, so ``trainer predict --weights URI`` needs nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import io
import logging
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models import get_weight

from trainer import storage
from trainer.checkpoint import CheckpointError, LoadedCheckpoint, resolve
from trainer.config import ModelConfig, parse_section
from trainer.data.coco_index import CocoIndex
from trainer.errors import InputError

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "detection-trainer/weights-1"
HTTPS_TIMEOUT_S = 120
_WEIGHTS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*_Weights\.[A-Za-z][A-Za-z0-9_]*")
_HUB_HASH = re.compile(r"-([a-f0-9]{6,64})\.")  # torch hub file names carry a sha256 prefix
_DDP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile wrappers


# ------------------------------------------------------------------------------------------ reading
@dataclass
class LoadReport:
    """What ``load_weights`` did with each tensor of the checkpoint and of the model."""

    uri: str
    loaded: list[str] = field(default_factory=list)
    # (name, shape in the checkpoint, shape in the model): skipped, left as the model initialised them
    reinitialised: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    def counts(self) -> dict[str, int]:
        return {"loaded": len(self.loaded), "reinitialised": len(self.reinitialised),
                "missing": len(self.missing), "unexpected": len(self.unexpected)}

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.uri}"]
        if self.reinitialised:
            shown = ", ".join(f"{name} {list(old)} -> {list(new)}" for name, old, new in self.reinitialised[:4])
            more = ", ..." if len(self.reinitialised) > 4 else ""
            parts.append(f"re-initialised {len(self.reinitialised)} with a different shape ({shown}{more})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing, left initialised ({_some(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected, ignored ({_some(self.unexpected)})")
        return "; ".join(parts)


def _some(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def load_weights(model: nn.Module, uri: str, model_name: str | None = None) -> LoadReport:
    """Load a checkpoint into ``model`` by name; tensors whose shape differs are skipped and reported.

    ``uri``: a local path, ``file://``, ``s3://`` or ``https://`` URI, or a torchvision weights name (e.g.
    ``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``) already in the torch hub cache. The file may hold a state dict,
    or a dict with one under ``"model"`` or ``"state_dict"``; ``module.`` prefixes (DDP) are dropped. Skipping
    mismatched shapes is what makes fine-tuning work: a COCO head (91 classes) is left freshly initialised for
    a model with another class count. Zero matching tensors means the wrong architecture, an error.
    """
    what = model_name or type(model).__name__
    state = read_state_dict(uri)
    own = model.state_dict()
    report = LoadReport(uri)
    usable: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = own.get(key)
        if target is None:
            if not key.endswith("num_batches_tracked"):  # absent by design from FrozenBatchNorm2d
                report.unexpected.append(key)
        elif tensor.shape != target.shape:
            report.reinitialised.append((key, tuple(tensor.shape), tuple(target.shape)))
        else:
            usable[key] = tensor
            report.loaded.append(key)
    report.missing = [key for key in own if key not in state and not key.endswith("num_batches_tracked")]
    if not usable:
        raise InputError(
            f"cannot load weights from {uri}: nothing matched: none of its {len(state)} tensors fits {what} "
            f"(it has {_some(list(state), 2)}; the model has {_some(list(own), 2)}); "
            "are these weights for another architecture?")
    model.load_state_dict(usable, strict=False)
    log.log(logging.WARNING if report.missing or report.unexpected else logging.INFO, "%s: %s", what,
            report.summary())
    return report


def read_checkpoint(uri: str) -> tuple[Any, str]:
    """The object stored at ``uri`` and the name to use in messages, read without running any pickled code."""
    data, source = _fetch(uri)
    return _safe_load(data, source), source


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint at ``uri`` (see ``load_weights``), read without running any pickled code."""
    return state_dict_of(*read_checkpoint(uri))


def state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: a state dict, or one under ``"model"``/``"state_dict"``; wrapper
    prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``) dropped."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise InputError(f"cannot load weights from {source}: it holds a {type(obj).__name__}, not a state dict")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            for prefix in _DDP_PREFIXES:
                key = key.removeprefix(prefix)
            state[key] = value
    if not state:
        raise InputError(f"cannot load weights from {source}: no tensors in it (keys: {_some([str(k) for k in obj])})")
    return state


def _fetch(uri: str) -> tuple[bytes, str]:
    """The file's bytes and the name to use in messages."""
    if _WEIGHTS_NAME.fullmatch(uri) and not os.path.exists(uri):
        return _cached_torchvision_weights(uri)
    if uri.lower().startswith("https://"):
        return _fetch_https(uri), uri
    if "://" in uri and not (storage.is_s3(uri) or uri.startswith("file://")):
        raise InputError(f"cannot load weights from {uri}: unsupported scheme; use a local path, s3://, https:// "
                         "or a torchvision weights name like FasterRCNN_ResNet50_FPN_Weights.COCO_V1")
    try:
        return storage.read_bytes(uri), uri
    except storage.StorageError as exc:
        raise InputError(f"cannot load weights from {exc}") from exc


def _fetch_https(uri: str) -> bytes:
    request = urllib.request.Request(uri, headers={"User-Agent": "detection-trainer"})
    try:
        with urllib.request.urlopen(request, timeout=HTTPS_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise InputError(f"cannot load weights from {uri}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise InputError(f"cannot load weights from {uri}: download failed ({reason})") from exc


def _cached_torchvision_weights(name: str) -> tuple[bytes, str]:
    """A torchvision weights file, only if the torch hub cache already has it: we never download."""
    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise InputError(f"cannot load weights {name}: not a torchvision weights name ({exc})") from exc
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.isfile(path):
        raise InputError(
            f"cannot load weights {name}: it is not in the torch hub cache ({path}) and cannot be downloaded "
            f"here (the trainer never downloads weights); fetch {weights.url} yourself and pass its path or "
            "s3:// URI as model.weights, or place it in that cache")
    try:
        data = storage.read_bytes(path)
    except storage.StorageError as exc:
        raise InputError(f"cannot load weights {name} from {exc}") from exc
    expected = _HUB_HASH.search(filename)
    if expected and not hashlib.sha256(data).hexdigest().startswith(expected.group(1)):
        raise InputError(f"cannot load weights {name}: the cached file {path} does not match its checksum "
                         f"({expected.group(1)}...); delete it and fetch it again")
    return data, path


def _safe_load(data: bytes, source: str) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only, never code).

    ``argparse.Namespace`` is allowed too: torchvision's reference scripts store their arguments in it, and it
    only holds attributes.
    """
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            # plain pickles (protocol > 2) make torch warn before it refuses or loads them; the outcome is what counts
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated pickle, refused global, ...: all mean "not loadable"
        raise InputError(f"cannot load weights from {source}: {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    """One line out of torch.load's multi-line errors."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
        lines = [line.strip() for line in text.splitlines()
                 if line.strip() and not line.strip().startswith(boilerplate)]
        detail = lines[0].removeprefix("WeightsUnpickler error:").strip() if lines else "refused"
        detail = re.sub(r" was not an allowed global.*", "", detail)
        return (f"refused by the safe loader, torch.load(weights_only=True) ({detail[:160]}): the file is corrupt, "
                "not a PyTorch checkpoint, or needs code to run to load; save only tensors, e.g. "
                "torch.save(model.state_dict(), path)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"not a readable PyTorch checkpoint ({type(exc).__name__}: {first[:200]})"


# ------------------------------------------------------------------------------------------ our weights files
def weights_payload(state: Mapping[str, torch.Tensor], model_config: ModelConfig, category_ids: Sequence[int],
                    category_names: Sequence[str]) -> dict[str, Any]:
    """What a weights file holds: only tensors, strings and numbers, so it loads with ``weights_only=True``."""
    described = dataclasses.asdict(model_config)
    described["weights"] = None  # the file is the weights; the pretrained source is history, not a dependency
    return {"format": WEIGHTS_FORMAT, "model": {k: v.detach().cpu() for k, v in state.items()},
            "model_config": described, "category_ids": [int(i) for i in category_ids],
            "category_names": [str(n) for n in category_names]}


def save_weights(uri: str, state: Mapping[str, torch.Tensor], model_config: ModelConfig, index: CocoIndex) -> None:
    """A weights file for the classes of ``index`` (the training set's COCO categories)."""
    write_weights(uri, weights_payload(state, model_config, index.category_ids, index.category_names))


class NonFiniteWeightsError(InputError):
    """Weights holding NaN or infinity: writing them as a usable model would hide a diverged run."""


def check_finite(uri: str, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a state dict with any NaN/inf value, naming how many tensors and the first one."""
    bad = [name for name, tensor in state.items() if isinstance(tensor, torch.Tensor)
           and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteWeightsError(f"{uri}: not written: {len(bad)} of {len(state)} weight tensors hold NaN or "
                                    f"infinity (first: {bad[0]}); the training diverged")


def write_weights(uri: str, payload: dict[str, Any]) -> None:
    check_finite(uri, payload["model"])
    with storage.open_write(uri) as stream:  # atomic: a reader never sees half a file
        torch.save(payload, stream)


def checkpoint_weights(checkpoint: LoadedCheckpoint, ema: bool = False) -> dict[str, Any]:
    """The weights-file payload of a training checkpoint: its model (or EMA) weights, model config and classes.

    A CheckpointError when the checkpoint lacks them, so a caller that looks for the newest good checkpoint
    (``resolve(..., check=...)``) falls back past a damaged one.
    """
    model_state = checkpoint.objects.get("model")
    classes, config = checkpoint.state.get("classes"), checkpoint.state.get("config")
    if not isinstance(model_state, dict) or not isinstance(model_state.get("model"), dict):
        raise CheckpointError(f"{checkpoint.uri}: model.pt holds no model state")
    if not isinstance(classes, dict) or not classes.get("category_ids") or not isinstance(config, dict) \
            or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{checkpoint.uri}: the checkpoint does not name its model and classes")
    weights = model_state["model"]
    if ema:
        if not isinstance(model_state.get("ema"), dict) or not isinstance(model_state["ema"].get("module"), dict):
            raise InputError(f"{checkpoint.uri}: this run kept no EMA weights (train.ema was off)")
        weights = model_state["ema"]["module"]
    try:
        model_config = parse_section(ModelConfig, dict(config["model"]), "model", checkpoint.uri)
        return weights_payload(weights, model_config, classes["category_ids"], classes["category_names"])
    except (InputError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{checkpoint.uri}: its model description is damaged ({exc})") from exc


def read_weights_or_checkpoint(uri: str) -> tuple[Any, str]:
    """A weights file, or the weights of the newest good checkpoint of a run, checkpoints or step-<N> folder."""
    try:
        folder = ("://" not in uri or storage.is_s3(uri)) and storage.is_dir(uri)
    except storage.StorageError:
        folder = False
    if not folder:
        return read_checkpoint(uri)
    checkpoint = resolve(uri, check=checkpoint_weights, names=("model",))
    return checkpoint_weights(checkpoint), checkpoint.uri

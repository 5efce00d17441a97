"""The run configuration: typed sections, YAML loading, ``--set a.b=c`` overrides, validation.

The same YAML file drives a laptop run and the chart's ConfigMap. Every key has a default except the data
locations. Mistakes are reported as one ``ConfigError`` line naming the file, the key and the problem, with the
closest valid key for typos; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from trainer import storage
from trainer.errors import InputError

SUPPORTED_MODELS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
)
AUGMENT_PRESETS = ("none", "hflip", "multiscale", "lsj", "ssd")
# COCOeval's bbox summary, in its order (trainer.evaluation names its numbers with these).
EVAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class ConfigError(InputError):
    """A configuration mistake; the message names the source, the key and the problem."""


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs"  # outputs go under <dir>/<name>/ (local path or s3://)


@dataclass
class SplitConfig:
    coco: str = ""  # COCO JSON URI (required for train)
    images: str = ""  # image root URI the JSON's file_names are relative to


@dataclass
class TilesConfig:
    enabled: bool = False
    size: int = 640
    overlap: int = 128
    min_visibility: float = 0.5


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    batch_size: int = 4  # per process
    workers: int = 4
    augment: str = "hflip"
    mean: list[float] | None = None  # normalise in the loader (default: the model's own transform does)
    std: list[float] | None = None
    strict: bool = False  # a bad image fails the run instead of being skipped
    cache_dir: str | None = None  # local disk cache of fetched images
    cache_gb: float = 20.0
    aspect_ratio_groups: int = 3  # 0 turns grouping off
    tiles: TilesConfig = field(default_factory=TilesConfig)


@dataclass
class ModelConfig:
    name: str = "fasterrcnn_mobilenet_v3_large_fpn"
    weights: str | None = None  # path/s3:///https:// URI or a torchvision weights name
    min_size: int = 480
    max_size: int = 640
    trainable_backbone_layers: int | None = None
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns (fnmatch)
    # Numeric constructor options of the torchvision detector (e.g. box_batch_size_per_image, score_thresh);
    # the valid names depend on the model and are checked when it is built.
    options: dict[str, float] = field(default_factory=dict)
    anchor_sizes: list[list[int]] | None = None  # one list of sizes per feature level (Faster R-CNN, RetinaNet)
    aspect_ratios: list[float] | None = None  # the same for every level


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    norm_weight_decay: float | None = 0.0  # None: same as weight_decay for norms and biases


@dataclass
class ScheduleConfig:
    epochs: int = 24
    warmup_iters: int = 500
    kind: str = "cosine"  # cosine | multistep
    milestones: list[int] = field(default_factory=lambda: [16, 22])  # epochs, for multistep
    gamma: float = 0.1


@dataclass
class TrainConfig:
    seed: int = 0
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on CPU
    clip_grad_norm: float | None = 10.0
    accumulate: int = 1
    ema: bool = False
    ema_decay: float = 0.9998
    deterministic: bool = False
    sync_bn: bool = False
    timeout_minutes: float = 30.0  # collective timeout


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate every N epochs and after the last one; 0: never
    metric: str = "AP"  # decides the best model (model_best.pt) and the best checkpoint


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: off
    every_minutes: float = 15.0  # 0: off
    every_epoch: bool = True  # also at the end of each epoch (after its evaluation); always at the end of the run
    keep_last: int = 3  # plus the best by eval.metric
    grace_seconds: float = 30.0  # the pod's terminationGracePeriodSeconds: warn when a stop checkpoint may not fit
    resume: str = "auto"  # auto (latest in this run, if any) | never | <URI of a checkpoint, checkpoints or run folder>


@dataclass
class LogConfig:
    every_steps: int = 20
    tensorboard: bool = False
    sample_trace: str | None = None  # local folder: each rank lists the image ids it trained on (debugging)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def digest(self) -> str:
        """A stable fingerprint of every setting (stored in checkpoints to notice config changes)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def run_uri(self) -> str:
        return storage.join(self.run.dir, self.run.name)


# ------------------------------------------------------------------------------------------ building
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` converted to the annotated type ``tp``, or a ConfigError naming ``key``."""
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], key, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"a mapping of {tp.__name__} keys")
        return _build(tp, value, key, source)
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise fail(f"a mapping of names to {_type_name(item)}")
        for name, entry in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{source}: {key}: keys must be names, got {name!r}")
            if not isinstance(entry, bool | int | float):
                raise ConfigError(f"{source}: {key}.{name}: expected a number or true/false, got {entry!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise fail(f"a list of {_type_name(item)}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail("an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    raise AssertionError(f"unsupported config type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(known)})"
            raise ConfigError(f"{source}: {where}: unknown key{hint}")
    kwargs = {}
    for name in known:
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{prefix}.{name}" if prefix else name, source)
    return cls(**kwargs)


def parse_section(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    """One section (e.g. ``ModelConfig``) from a mapping, with the same checks and messages as a whole file."""
    return _build(cls, values, prefix, source)


def _set_path(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{source}: {dotted!r} is not a key path like 'optim.lr'")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` → ("a.b", c) with c read as a YAML scalar/list (so 0.01, true, null, [1, 2] get their types)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: cannot read the value ({exc.problem})") from exc
    return key.strip(), value


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                require_data: bool = True) -> Config:
    """Defaults ← YAML file (local or s3://) ← ``--set`` overrides, then validation."""
    tree: dict[str, Any] = {}
    source = path or "<defaults>"
    if path:
        try:
            loaded = yaml.safe_load(storage.read_text(path))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run, data, model, ...)")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value, f"--set {text}")
    config = _build(Config, tree, "", source)
    validate(config, source, require_data)
    return config


def validate(config: Config, source: str, require_data: bool = True) -> None:
    """Values that parse but cannot work: one error naming the key."""
    def check(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{source}: {key}: {message}")

    if require_data:
        check(bool(config.data.train.coco), "data.train.coco", "is required (URI of the training COCO JSON)")
        check(bool(config.data.train.images), "data.train.images", "is required (URI of the training images)")
    check(bool(config.run.name) and "/" not in config.run.name, "run.name", "must be a non-empty name without '/'")
    check(config.data.batch_size >= 1, "data.batch_size", f"must be at least 1, got {config.data.batch_size}")
    check(config.data.workers >= 0, "data.workers", f"must be 0 or more, got {config.data.workers}")
    check(config.data.augment in AUGMENT_PRESETS, "data.augment",
          f"unknown preset {config.data.augment!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    check((config.data.mean is None) == (config.data.std is None), "data.mean",
          "data.mean and data.std go together")
    for key in ("mean", "std"):
        values = getattr(config.data, key)
        check(values is None or len(values) == 3, f"data.{key}", "needs 3 values (R, G, B)")
    check(config.data.std is None or all(v > 0 for v in config.data.std), "data.std", "values must be > 0")
    check(config.data.cache_gb > 0, "data.cache_gb", "must be > 0")
    check(config.data.aspect_ratio_groups >= 0, "data.aspect_ratio_groups", "must be 0 or more")
    check(config.model.name in SUPPORTED_MODELS, "model.name",
          f"unknown model {config.model.name!r}"
          + (f" (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(config.model.name,
                                                                                     SUPPORTED_MODELS, n=1))
             else f"; choose one of {', '.join(SUPPORTED_MODELS)}"))
    check(config.model.min_size > 0 and config.model.max_size >= config.model.min_size, "model.min_size",
          "needs 0 < min_size <= max_size")
    if config.model.anchor_sizes is not None:
        check(bool(config.model.anchor_sizes) and all(config.model.anchor_sizes)
              and all(v > 0 for level in config.model.anchor_sizes for v in level),
              "model.anchor_sizes", "needs one non-empty list of positive sizes per feature level")
    if config.model.aspect_ratios is not None:
        check(bool(config.model.aspect_ratios) and all(v > 0 for v in config.model.aspect_ratios),
              "model.aspect_ratios", "needs a non-empty list of positive ratios (height / width)")
    check(config.optim.name in ("sgd", "adamw"), "optim.name", f"must be sgd or adamw, got {config.optim.name!r}")
    check(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
    check(config.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(0 <= config.optim.momentum < 1, "optim.momentum", "must be in [0, 1)")
    check(config.schedule.epochs >= 1, "schedule.epochs", f"must be at least 1, got {config.schedule.epochs}")
    check(config.schedule.warmup_iters >= 0, "schedule.warmup_iters", "must be 0 or more")
    check(config.schedule.kind in ("cosine", "multistep"), "schedule.kind", "must be cosine or multistep")
    check(config.train.accumulate >= 1, "train.accumulate", "must be at least 1")
    check(config.train.clip_grad_norm is None or config.train.clip_grad_norm > 0, "train.clip_grad_norm",
          "must be > 0 (or null to disable)")
    check(0 < config.train.ema_decay < 1, "train.ema_decay", "must be in (0, 1)")
    check(config.train.timeout_minutes > 0, "train.timeout_minutes", "must be > 0")
    check(config.eval.metric in EVAL_METRICS, "eval.metric",
          f"unknown metric {config.eval.metric!r}; choose one of {', '.join(EVAL_METRICS)}")
    check(config.eval.every_epochs >= 0, "eval.every_epochs", "must be 0 (never) or more")
    check(config.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be 0 (off) or more")
    check(config.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be 0 (off) or more")
    check(config.checkpoint.grace_seconds > 0, "checkpoint.grace_seconds", "must be > 0")
    check(config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    check(bool(config.checkpoint.resume.strip()), "checkpoint.resume", "use auto, never or a checkpoint URI")
    check(config.log.sample_trace is None or not storage.is_s3(config.log.sample_trace), "log.sample_trace",
          "must be a local folder")
    check(config.log.every_steps >= 1, "log.every_steps", "must be at least 1")

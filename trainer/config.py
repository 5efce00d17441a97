"""The run configuration: typed sections, YAML loading, ``--set a.b=c`` overrides, validation.

The same YAML file drives a laptop run and the chart's ConfigMap. Every key has a default except the data
locations. Mistakes are reported as one ``ConfigError`` line naming the file, the key and the problem, with the
closest valid key for typos; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import re
import types
import typing
from collections.abc import Callable
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
# The libraries that compute COCO mAP (trainer.evaluation); faster-coco-eval comes with the `fast-eval` extra.
EVAL_BACKENDS = ("pycocotools", "faster-coco-eval")
# COCOeval's bbox summary, in its order (trainer.evaluation names its numbers with these).
EVAL_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# log.mlflow.tracking_uri: what MlflowClient takes as a tracking store (s3:// is an artifact store, not one).
MLFLOW_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy URIs, e.g. postgresql+psycopg2://
MLFLOW_URI_HINT = ("use http(s)://HOST:PORT of an MLflow server, a local folder or file: URI, or a database URI "
                   "(sqlite:, postgresql:, mysql:, mssql:)")
MAX_MLFLOW_NAME = 500  # MLflow's limit on experiment names (run names get the same bound)


# Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, about 9459 x 9459): a larger image is refused
# from its header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 89_478_485
# A config is a few KB: these bound what a hostile or broken file can cost before it is even validated.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # nodes after expanding every alias (a "billion laughs" file expands to 10^9)
QUOTE_CHARS = 200  # how much of a bad value an error message quotes
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ConfigError(InputError):
    """A configuration mistake; the message names the source, the key and the problem."""


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line must stay one short line whatever the input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


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
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (read from the header, never decoded)
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
    scale_lr: str = "none"  # none | linear | sqrt: rescale lr from reference_batch to the global batch
    reference_batch: int = 16  # the global batch (images per optimizer step) that lr is meant for


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
    hang_timeout_seconds: float = 300.0  # a rank without progress this long is stopped (under trainer-launch); 0: off
    max_nonfinite_steps: int = 20  # consecutive skipped non-finite steps before the run stops (exit 2)


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate every N epochs and after the last one; 0: never
    metric: str = "AP"  # decides the best model (model_best.pt) and the best checkpoint
    patience: int = 0  # stop after this many evaluations without eval.metric rising by more than min_delta; 0: off
    min_delta: float = 0.0  # how much eval.metric must rise to count as an improvement for patience
    backend: str = "pycocotools"  # pycocotools | faster-coco-eval (the `fast-eval` extra; the same numbers, faster)


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: off
    every_minutes: float = 15.0  # 0: off
    every_epoch: bool = True  # also at the end of each epoch (after its evaluation); always at the end of the run
    keep_last: int = 3  # plus the best by eval.metric
    grace_seconds: float = 30.0  # the pod's terminationGracePeriodSeconds: warn when a stop checkpoint may not fit
    lease_ttl_seconds: float = 120.0  # a run lease not renewed this long is stale: another job may take the run
    resume: str = "auto"  # auto (latest in this run, if any) | never | <URI of a checkpoint, checkpoints or run folder>


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # e.g. http://mlflow.example:5000; null: MLflow tracking off (the `mlflow` extra)
    experiment: str = "detection-trainer"
    run_name: str | None = None  # default: run.name


@dataclass
class LogConfig:
    every_steps: int = 20
    tensorboard: bool = False
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
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
        return ConfigError(f"{source}: {key}: expected {expected}, got {quote(value)}")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], key, source)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise fail(f"a mapping of {tp.__name__} keys")
        return _build(tp, value, key, source)
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise fail(f"a mapping of names to {_type_name(item)}")
        for name, entry in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{source}: {key}: keys must be names, got {quote(name)}")
            if not isinstance(entry, bool | int | float):
                raise ConfigError(f"{source}: {key}.{name}: expected a number or true/false, got {quote(entry)}")
            if isinstance(entry, float) and not math.isfinite(entry):
                raise ConfigError(f"{source}: {key}.{name}: must be a finite number, got {entry}")
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
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise fail("an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer too large for a float
                raise fail("a finite number") from None
            if not math.isfinite(number):
                raise fail("a finite number")
            return number
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
            where = f"{prefix}.{key}" if prefix else quote(key, 80).strip("'")
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
        raise ConfigError(f"{source}: {quote(dotted)} is not a key path like 'optim.lr'")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, checked between composing and constructing: a document whose aliases expand to
    more than ``MAX_YAML_NODES`` nodes, a recursive alias, or a mapping that repeats a key is refused before any
    Python object is built (PyYAML itself keeps the last duplicate silently and lets a 500-byte file of nested
    aliases expand to gigabytes in whatever walks it)."""


def _check_nodes(root: yaml.Node, source: str) -> None:
    """Count the nodes of ``root`` with every alias expanded (memoised, so linear in the file) and refuse
    duplicate keys, naming both lines."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def expanded(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{source}: line {node.start_mark.line + 1}: a recursive YAML alias")
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            _check_duplicates(node, source)
            for name, value in node.value:
                total += expanded(name) + expanded(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += expanded(item)
        active.discard(key)
        sizes[key] = total
        if total > MAX_YAML_NODES:
            raise ConfigError(f"{source}: the YAML expands to more than {MAX_YAML_NODES} values (aliases "
                              f"repeated inside aliases, from line {node.start_mark.line + 1}); a config is "
                              "a few dozen keys")
        return total

    expanded(root)


def _check_duplicates(node: yaml.MappingNode, source: str) -> None:
    seen: dict[tuple[str, str], int] = {}
    for name, _ in node.value:
        if not isinstance(name, yaml.ScalarNode) or name.tag == "tag:yaml.org,2002:merge":
            continue
        line = name.start_mark.line + 1
        first = seen.get((name.tag, name.value))
        if first is None:
            seen[(name.tag, name.value)] = line
        else:
            raise ConfigError(f"{source}: line {line}: duplicate key {quote(name.value, 80)} (first on line "
                              f"{first}); YAML would silently keep only the last one")


def safe_load(text: str, source: str) -> Any:
    """``yaml.safe_load`` with bounded size and alias expansion and no duplicate keys; one-line errors."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters is too large for a config "
                          f"(at most {MAX_CONFIG_BYTES})")
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader already refuses unprintable characters
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem[:QUOTE_CHARS]}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML nests too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` → ("a.b", c) with c read as a YAML scalar/list (so 0.01, true, null, [1, 2] get their types)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {quote(text)}: expected KEY=VALUE, e.g. optim.lr=0.01")
    value = safe_load(raw, f"--set {quote(text)}") if raw.strip() else ""
    return key.strip(), value


def read_config_text(path: str) -> str:
    """The config file's text; a missing file is a ConfigError (exit 2: retrying cannot make it appear)."""
    try:
        info = storage.stat(path)
        if info.is_dir:
            raise ConfigError(f"{path}: is a directory, not a config file")
        if info.size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {info.size} bytes is too large for a config (at most {MAX_CONFIG_BYTES})")
        return storage.read_bytes(path).decode("utf-8")
    except storage.NotFound as exc:
        raise ConfigError(f"{path}: no such config file ({exc.cause})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                require_data: bool = True) -> Config:
    """Defaults ← YAML file (local or s3://) ← ``--set`` overrides, then validation."""
    tree: dict[str, Any] = {}
    source = path or "<defaults>"
    if path:
        loaded = safe_load(read_config_text(path), path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (run, data, model, ...)")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value, f"--set {quote(text)}")
    config = _build(Config, tree, "", source)
    validate(config, source, require_data)
    return config


# check(condition, dotted key, message): raises the ConfigError naming the key when the condition is false.
Check = Callable[[bool, str, str], None]


def validate(config: Config, source: str, require_data: bool = True) -> None:
    """Values that parse but cannot work: one error naming the key."""
    def check(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{source}: {key}: {message}")

    if require_data:
        check(bool(config.data.train.coco), "data.train.coco", "is required (URI of the training COCO JSON)")
        check(bool(config.data.train.images), "data.train.images", "is required (URI of the training images)")
    check(bool(_SAFE_NAME.fullmatch(config.run.name)) and ".." not in config.run.name, "run.name",
          f"must be one folder name (letters, digits, '.', '_', '-', not starting with '.' or '-', no '..'), "
          f"got {quote(config.run.name, 80)}")
    _validate_data(config.data, check)
    _validate_model(config.model, check)
    _validate_optimisation(config, check)
    _validate_run_outputs(config, check, evaluates=require_data)
    _validate_mlflow(config.log.mlflow, check, tracks=require_data)


def _validate_data(data: DataConfig, check: Check) -> None:
    check(data.batch_size >= 1, "data.batch_size", f"must be at least 1, got {data.batch_size}")
    check(data.workers >= 0, "data.workers", f"must be 0 or more, got {data.workers}")
    check(data.augment in AUGMENT_PRESETS, "data.augment",
          f"unknown preset {data.augment!r}; choose one of {', '.join(AUGMENT_PRESETS)}")
    check((data.mean is None) == (data.std is None), "data.mean",
          "data.mean and data.std go together")
    for key in ("mean", "std"):
        values = getattr(data, key)
        check(values is None or len(values) == 3, f"data.{key}", "needs 3 values (R, G, B)")
    check(data.std is None or all(v > 0 for v in data.std), "data.std", "values must be > 0")
    check(0 < data.cache_gb <= 1e6, "data.cache_gb", f"must be > 0 and at most 1e6, got {data.cache_gb}")
    check(data.max_pixels >= 1, "data.max_pixels", f"must be at least 1, got {data.max_pixels}")
    tiles = data.tiles
    check(tiles.size >= 1, "data.tiles.size", f"must be at least 1, got {tiles.size}")
    check(0 <= tiles.overlap < tiles.size, "data.tiles.overlap",
          f"must be 0 or more and less than data.tiles.size ({tiles.size}), got {tiles.overlap}")
    check(0 < tiles.min_visibility <= 1, "data.tiles.min_visibility", f"must be in (0, 1], got {tiles.min_visibility}")
    check(data.aspect_ratio_groups >= 0, "data.aspect_ratio_groups", "must be 0 or more")


def _validate_model(model: ModelConfig, check: Check) -> None:
    check(model.name in SUPPORTED_MODELS, "model.name",
          f"unknown model {model.name!r}"
          + (f" (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(model.name,
                                                                                     SUPPORTED_MODELS, n=1))
             else f"; choose one of {', '.join(SUPPORTED_MODELS)}"))
    check(model.min_size > 0 and model.max_size >= model.min_size, "model.min_size",
          "needs 0 < min_size <= max_size")
    if model.anchor_sizes is not None:
        check(bool(model.anchor_sizes) and all(model.anchor_sizes)
              and all(v > 0 for level in model.anchor_sizes for v in level),
              "model.anchor_sizes", "needs one non-empty list of positive sizes per feature level")
    if model.aspect_ratios is not None:
        check(bool(model.aspect_ratios) and all(v > 0 for v in model.aspect_ratios),
              "model.aspect_ratios", "needs a non-empty list of positive ratios (height / width)")


def _validate_optimisation(config: Config, check: Check) -> None:
    check(config.optim.name in ("sgd", "adamw"), "optim.name", f"must be sgd or adamw, got {config.optim.name!r}")
    check(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
    check(config.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    check(0 <= config.optim.momentum < 1, "optim.momentum", "must be in [0, 1)")
    check(config.optim.norm_weight_decay is None or config.optim.norm_weight_decay >= 0, "optim.norm_weight_decay",
          "must be >= 0 (or null: the same as optim.weight_decay)")
    check(config.schedule.epochs >= 1, "schedule.epochs", f"must be at least 1, got {config.schedule.epochs}")
    check(config.schedule.warmup_iters >= 0, "schedule.warmup_iters", "must be 0 or more")
    check(config.schedule.kind in ("cosine", "multistep"), "schedule.kind", "must be cosine or multistep")
    check(config.schedule.gamma > 0, "schedule.gamma", f"must be > 0, got {config.schedule.gamma}")
    check(all(m >= 0 for m in config.schedule.milestones), "schedule.milestones", "must be epochs (0 or more)")
    check(config.train.accumulate >= 1, "train.accumulate", "must be at least 1")
    check(config.train.clip_grad_norm is None or config.train.clip_grad_norm > 0, "train.clip_grad_norm",
          "must be > 0 (or null to disable)")
    check(0 < config.train.ema_decay < 1, "train.ema_decay", "must be in (0, 1)")
    check(config.train.timeout_minutes > 0, "train.timeout_minutes", "must be > 0")
    check(config.train.hang_timeout_seconds >= 0, "train.hang_timeout_seconds", "must be 0 (off) or more")
    check(config.optim.scale_lr in ("none", "linear", "sqrt"), "optim.scale_lr",
          f"must be none, linear or sqrt, got {quote(config.optim.scale_lr, 80)}")
    check(config.optim.reference_batch >= 1, "optim.reference_batch", "must be at least 1")


def _validate_run_outputs(config: Config, check: Check, evaluates: bool = True) -> None:
    """eval, checkpoint and log: what the run writes, and when. ``evaluates``: False for a config read only for
    its model section (``trainer predict``), which needs no evaluation library installed."""
    check(config.checkpoint.lease_ttl_seconds >= 5, "checkpoint.lease_ttl_seconds",
          f"must be at least 5, got {config.checkpoint.lease_ttl_seconds}")
    check(config.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps",
          f"must be at least 1, got {config.train.max_nonfinite_steps}")
    check(config.eval.metric in EVAL_METRICS, "eval.metric",
          f"unknown metric {config.eval.metric!r}; choose one of {', '.join(EVAL_METRICS)}")
    check(config.eval.backend in EVAL_BACKENDS, "eval.backend",
          f"unknown backend {quote(config.eval.backend, 80)}; choose one of {', '.join(EVAL_BACKENDS)}")
    # Found missing now, not at the first evaluation hours into the run; find_spec imports nothing.
    check(not evaluates or config.eval.backend != "faster-coco-eval" or importlib.util.find_spec("faster_coco_eval")
          is not None, "eval.backend", "faster-coco-eval is not installed: pip install 'detection-trainer[fast-eval]'")
    check(config.eval.every_epochs >= 0, "eval.every_epochs", "must be 0 (never) or more")
    check(config.eval.patience >= 0, "eval.patience", f"must be 0 (off) or more, got {config.eval.patience}")
    check(0 <= config.eval.min_delta <= 1, "eval.min_delta", f"must be in [0, 1] (COCO metrics are 0..1), "
          f"got {config.eval.min_delta}")
    check(config.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be 0 (off) or more")
    check(config.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be 0 (off) or more")
    check(config.checkpoint.grace_seconds > 0, "checkpoint.grace_seconds", "must be > 0")
    check(config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1")
    check(bool(config.checkpoint.resume.strip()), "checkpoint.resume", "use auto, never or a checkpoint URI")
    check(config.log.sample_trace is None or not storage.is_s3(config.log.sample_trace), "log.sample_trace",
          "must be a local folder")
    check(config.log.every_steps >= 1, "log.every_steps", "must be at least 1")


def _validate_mlflow(mlflow: MlflowConfig, check: Check, tracks: bool = True) -> None:
    """log.mlflow: a tracking URI MLflow takes, names within MLflow's limits, and (``tracks``: a training run,
    not ``trainer predict`` reading a run's config) the client installed, found now rather than at the first
    metric. ``find_spec`` imports nothing."""
    check(bool(mlflow.experiment.strip()) and len(mlflow.experiment) <= MAX_MLFLOW_NAME, "log.mlflow.experiment",
          f"must be a name of 1 to {MAX_MLFLOW_NAME} characters, got {quote(mlflow.experiment, 80)}")
    check(mlflow.run_name is None or (bool(mlflow.run_name.strip()) and len(mlflow.run_name) <= MAX_MLFLOW_NAME),
          "log.mlflow.run_name", f"must be null (run.name) or a name of 1 to {MAX_MLFLOW_NAME} characters, "
          f"got {quote(mlflow.run_name, 80)}")
    if mlflow.tracking_uri is None:
        return
    # The config is logged, saved as config.yaml and sent as MLflow params: a password in it would be everywhere
    # (and is not quoted back here either).
    check(not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*:[^/?#@]*@", mlflow.tracking_uri),
          "log.mlflow.tracking_uri", "must not carry a password (it would be printed in the log, config.yaml and "
          "the MLflow params): give it to the pods as MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
          "MLFLOW_TRACKING_TOKEN from a Secret")
    problem = _tracking_uri_problem(mlflow.tracking_uri)
    check(problem is None, "log.mlflow.tracking_uri", f"{problem}, got {quote(mlflow.tracking_uri, 80)}")
    check(not tracks or importlib.util.find_spec("mlflow") is not None, "log.mlflow.tracking_uri",
          "MLflow tracking needs the mlflow client: pip install 'detection-trainer[mlflow]'")


def _tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow would not take ``uri`` as a tracking URI, or None."""
    if not uri.strip() or len(uri) > 2000 or any(c.isspace() or not c.isprintable() for c in uri):
        return "must be a tracking URI without spaces, at most 2000 characters (null turns tracking off)"
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    scheme = match[1].lower() if match else ""  # no scheme: a local folder (MLflow's file store)
    if scheme in ("http", "https"):
        host = re.match(r"https?://([^/?#@]*@)?[^/?#:@]+", uri, re.IGNORECASE)
        return None if host else "needs a host (http://HOST:PORT)"
    if scheme in ("", "file", "databricks") or scheme.partition("+")[0] in MLFLOW_DB_SCHEMES:
        return None
    return f"unsupported scheme {scheme!r}; {MLFLOW_URI_HINT}"

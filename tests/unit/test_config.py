"""The run configuration: defaults, YAML, --set overrides with types, and one clear error per mistake."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer.config import Config, ConfigError, load_config, parse_override

DATA = ["data.train.coco=s3://b/coco/train.json", "data.train.images=s3://b/JPEGImages"]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_overrides_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """
run: {name: bccd, dir: s3://bucket/runs}
data:
  train: {coco: s3://bucket/coco/train.json, images: s3://bucket/JPEGImages}
  batch_size: 8
model: {name: fasterrcnn_resnet50_fpn, weights: null}
optim: {lr: 0.01}
""")
    config = load_config(path, ["optim.lr=0.005", "train.amp=false", "schedule.milestones=[8, 11]",
                                "model.freeze=['backbone.body.layer1*']", "data.mean=[0.5, 0.5, 0.5]",
                                "data.std=[0.2, 0.2, 0.2]"])
    assert config.optim.lr == 0.005 and config.train.amp is False and config.schedule.milestones == [8, 11]
    assert config.data.batch_size == 8 and config.data.workers == 4  # default kept
    assert config.model.freeze == ["backbone.body.layer1*"] and config.data.mean == [0.5, 0.5, 0.5]
    assert config.run_uri == "s3://bucket/runs/bccd"
    assert isinstance(config.optim.momentum, float)


def test_round_trip_through_yaml_and_stable_digest(tmp_path: Path) -> None:
    config = load_config(None, DATA)
    again = load_config(write(tmp_path, config.to_yaml()))
    assert again == config and again.digest() == config.digest()
    assert load_config(None, [*DATA, "optim.lr=0.03"]).digest() != config.digest()


def test_integers_are_accepted_for_floats_and_numbers_as_names(tmp_path: Path) -> None:
    config = load_config(None, [*DATA, "optim.lr=1", "run.name=2026"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float) and config.run.name == "2026"


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=0.1"], "optim.lrr: unknown key (did you mean 'lr'?)"),
    (["optimiser.lr=0.1"], "optimiser: unknown key (did you mean 'optim'?)"),
    (["optim.lr=-0.1"], "optim.lr: must be > 0, got -0.1"),
    (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["data.batch_size=0"], "data.batch_size: must be at least 1, got 0"),
    (["data.batch_size=2.5"], "data.batch_size: expected an integer, got 2.5"),
    (["train.amp=maybe"], "train.amp: expected true or false, got 'maybe'"),
    (["model.name=fasterrcnn_resnet50"], "model.name: unknown model 'fasterrcnn_resnet50' (did you mean"),
    (["data.augment=mosaic"], "data.augment: unknown preset 'mosaic'"),
    (["schedule.milestones=3"], "schedule.milestones: expected a list of int, got 3"),
    (["data.mean=[0.5, 0.5, 0.5]"], "data.mean: data.mean and data.std go together"),
    (["optim=0.1"], "optim: expected a mapping of OptimConfig keys, got 0.1"),
    (["optim.lr.x=1"], "optim.lr: expected a number, got {'x': 1}"),
    (["optim.lr=0.1", "optim.lr.x=1"], "optim.lr.x: 'lr' is a value, not a section"),
    (["nonsense"], "expected KEY=VALUE"),
    (["model.options=3"], "model.options: expected a mapping of names to float, got 3"),
    (["model.options.box_nms_thresh=high"], "model.options.box_nms_thresh: expected a number or true/false"),
    (["model.anchor_sizes=[[32], []]"], "model.anchor_sizes: needs one non-empty list of positive sizes"),
    (["model.aspect_ratios=[0, 1]"], "model.aspect_ratios: needs a non-empty list of positive ratios"),
])
def test_each_mistake_is_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*DATA, *overrides])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_detector_options_and_anchors_keep_their_types() -> None:
    config = load_config(None, [*DATA, "model.options.box_batch_size_per_image=128",
                                "model.options.box_nms_thresh=0.4", "model.anchor_sizes=[[16, 32], [64, 128]]"])
    assert config.model.options == {"box_batch_size_per_image": 128, "box_nms_thresh": 0.4}
    assert isinstance(config.model.options["box_batch_size_per_image"], int)
    assert config.model.anchor_sizes == [[16, 32], [64, 128]]


def test_data_locations_are_required() -> None:
    with pytest.raises(ConfigError, match=r"data\.train\.coco: is required"):
        load_config(None, [])
    assert isinstance(load_config(None, [], require_data=False), Config)


def test_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.yaml: not valid YAML \(line \d+, column \d+\): expected ',' or ']'"):
        load_config(write(tmp_path, "run:\n  name: [unclosed\n"))
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"run.yaml: model.nmae: unknown key \(did you mean 'name'\?\)"):
        load_config(write(tmp_path, "model: {nmae: ssd300_vgg16}\n"), DATA)


def test_parse_override_reads_yaml_scalars() -> None:
    assert parse_override("a.b=0.01") == ("a.b", 0.01)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=s3://x/y") == ("a.b", "s3://x/y")
    assert parse_override("a.b=") == ("a.b", "")


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_are_valid(path: Path) -> None:
    if path.name == "demo_cpu.yaml":  # scripts/demo.py adds the data locations in its bucket
        config = load_config(str(path), require_data=False)
        assert not config.data.train.coco
    else:
        config = load_config(str(path))
        assert config.data.train.coco.endswith("train.json") and config.data.val.coco.endswith("val.json")


# ------------------------------------------------------------------ hostile and broken input (issue 14)
def test_nested_aliases_are_refused_quickly_with_a_short_line(tmp_path: Path) -> None:
    """A 'billion laughs' YAML: ten levels of ten aliases each would expand to 10^10 values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append("optim: {lr: *a9}")
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert len(Path(path).read_bytes()) < 1000
    with pytest.raises(ConfigError) as info:
        load_config(path, DATA)
    assert "expands to more than 100000 values" in str(info.value)
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)


def test_recursive_alias_and_oversized_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recursive YAML alias"):
        load_config(write(tmp_path, "optim: &o {lr: *o}\n"), DATA)
    with pytest.raises(ConfigError, match="too large for a config"):
        load_config(write(tmp_path, "# " + "x" * (1 << 20) + "\n"), DATA)


def test_a_bad_value_is_quoted_short(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "optim: {lr: [" + ", ".join(["123456789"] * 5000) + "]}\n"), DATA)
    assert "optim.lr: expected a number" in str(info.value) and len(str(info.value)) < 400


def test_duplicate_keys_name_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr: 0.1\nrun: {name: x}\noptim:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"run.yaml: line 4: duplicate key 'optim' \(first on line 1\)"):
        load_config(path, DATA)
    with pytest.raises(ConfigError, match=r"line 2: duplicate key 'lr' \(first on line 1\)"):
        load_config(write(tmp_path, "optim: {lr: 0.1,\n        lr: 0.2}\n"), DATA)
    base = "base: &b {lr: 0.1, momentum: 0.5}\noptim:\n  <<: *b\n  lr: 0.2\n"  # a merge key may be overridden
    with pytest.raises(ConfigError, match="base: unknown key"):  # ... and parses up to the unknown section
        load_config(write(tmp_path, base), DATA)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.yaml: no such config file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_missing_config_in_s3_is_a_config_error(s3) -> None:  # s3: the conftest fixture
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(s3.uri("nothing/run.yaml"))


@pytest.mark.parametrize("overrides,message", [
    (["optim.lr=.inf"], "optim.lr: expected a finite number, got inf"),
    (["optim.lr=.nan"], "optim.lr: expected a finite number, got nan"),
    (["data.mean=[.nan, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]"], "data.mean[0]: expected a finite number"),
    (["data.cache_gb=.inf"], "data.cache_gb: expected a finite number"),
    (["data.cache_gb=1.0e+400"], "data.cache_gb: expected a finite number"),
    (["train.clip_grad_norm=-.inf"], "train.clip_grad_norm: expected a finite number"),
    (["model.options.box_nms_thresh=.nan"], "model.options.box_nms_thresh: must be a finite number"),
    (["schedule.epochs=.inf"], "schedule.epochs: expected an integer, got inf"),
    (["optim.lr=" + "9" * 400], "optim.lr: expected a finite number"),
    (["schedule.gamma=-1"], "schedule.gamma: must be > 0, got -1.0"),
    (["schedule.gamma=0"], "schedule.gamma: must be > 0"),
    (["data.tiles.overlap=640"], "data.tiles.overlap: must be 0 or more and less than data.tiles.size (640)"),
    (["data.tiles.size=0"], "data.tiles.size: must be at least 1"),
    (["data.tiles.min_visibility=0"], "data.tiles.min_visibility: must be in (0, 1]"),
    (["data.max_pixels=0"], "data.max_pixels: must be at least 1"),
    (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps: must be at least 1"),
    (["optim.norm_weight_decay=-1"], "optim.norm_weight_decay: must be >= 0"),
    (["run.name=.."], "run.name: must be one folder name"),
    (["run.name=."], "run.name: must be one folder name"),
    (["run.name=a/../../b"], "run.name: must be one folder name"),
    (["run.name=a\\b"], "run.name: must be one folder name"),
    (["run.name=''"], "run.name: must be one folder name"),
    (["run.name=x..y"], "run.name: must be one folder name"),
    (["run.name=-rf"], "run.name: must be one folder name"),
])
def test_non_finite_values_and_ranges_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*DATA, *overrides])
    assert message in str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_new_keys_have_documented_defaults() -> None:
    config = load_config(None, DATA)
    assert config.data.max_pixels == 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS
    assert config.train.max_nonfinite_steps == 20
    assert load_config(None, [*DATA, "run.name=bccd-frcnn_2.v1"]).run.name == "bccd-frcnn_2.v1"


def test_eval_backend_is_checked_at_start_up() -> None:
    assert load_config(None, DATA).eval.backend == "pycocotools"
    assert load_config(None, [*DATA, "eval.backend=faster-coco-eval"]).eval.backend == "faster-coco-eval"
    with pytest.raises(ConfigError) as info:
        load_config(None, [*DATA, "eval.backend=fast"])
    assert "eval.backend: unknown backend 'fast'; choose one of pycocotools, faster-coco-eval" in str(info.value)


def test_the_fast_backend_without_its_extra_fails_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at the first evaluation, hours into the run: one line naming the key and the install command."""
    real_find_spec = importlib.util.find_spec
    looked_up = []

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(name)
        return None if name == "faster_coco_eval" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError) as info:
        load_config(None, [*DATA, "eval.backend=faster-coco-eval"])
    message = str(info.value)
    assert message.endswith("eval.backend: faster-coco-eval is not installed: "
                            "pip install 'detection-trainer[fast-eval]'") and "\n" not in message
    assert looked_up == ["faster_coco_eval"]
    assert load_config(None, DATA).eval.backend == "pycocotools"  # the default looks nothing up
    assert looked_up == ["faster_coco_eval"]
    # `trainer predict` reads a run's config for its model section only: it evaluates nothing
    assert load_config(None, ["eval.backend=faster-coco-eval"], require_data=False).eval.backend == "faster-coco-eval"


def test_the_start_up_check_does_not_import_the_library() -> None:
    code = ("import sys; from trainer.config import load_config; "
            f"load_config(None, {[*DATA, 'eval.backend=faster-coco-eval']!r}); "
            "sys.exit(1 if 'faster_coco_eval' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          timeout=60).returncode == 0

"""trainer.models and trainer.weights: every supported detector builds and trains a step on CPU; weights load safely
and report what they changed; freezing does what the config says. Nothing here touches the network."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from trainer import models, weights
from trainer.config import SUPPORTED_MODELS, ModelConfig
from trainer.errors import InputError

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"  # the quickest model with an FPN and a box predictor
HEAD = {f"roi_heads.box_predictor.{layer}.{kind}"
        for layer in ("cls_score", "bbox_pred") for kind in ("weight", "bias")}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache, and any download attempt fails the test."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    torch.manual_seed(0)
    return home


def config(name: str = SMALL, **kwargs: Any) -> ModelConfig:
    return ModelConfig(name=name, min_size=128, max_size=160, **kwargs)


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


# ------------------------------------------------------------------------------------------- building
def test_registry_is_the_config_list() -> None:
    assert set(models.REGISTRY) == set(SUPPORTED_MODELS)


@pytest.mark.parametrize("name", SUPPORTED_MODELS)
def test_each_model_builds_and_trains_one_step(name: str) -> None:
    model = models.build_model(config(name), num_classes=4)
    if models.REGISTRY[name].uses_size:
        assert model.transform.min_size == (128,) and model.transform.max_size == 160
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 5.0, 120.0, 60.0]]), "labels": torch.tensor([3])}]
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(list(model.parameters()))  # from scratch, everything trains
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.01)

    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(old, p.detach()) for old, p in zip(before, params, strict=True))

    model.eval()
    with torch.no_grad():
        (detections,) = model(images[:1])
    assert set(detections) >= {"boxes", "labels", "scores"}
    assert all(0 < int(label) < 4 for label in detections["labels"])


def test_ssd_models_say_that_min_and_max_size_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trainer"):
        model = models.build_model(config("ssdlite320_mobilenet_v3_large"), num_classes=3)
    assert model.transform.fixed_size == (320, 320)
    assert "320x320" in caplog.text and "ignored" in caplog.text


def test_num_classes_must_include_background() -> None:
    with pytest.raises(InputError, match="num_classes"):
        models.build_model(config(), num_classes=1)


def test_count_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # 8 + 3 values
    assert models.count_parameters(model) == (11, 11)
    model[0].weight.requires_grad_(False)
    assert models.count_parameters(model) == (5, 11)


# -------------------------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def coco_like() -> dict[str, torch.Tensor]:
    """The state dict of a 91-class model (the shape of torchvision's COCO weights)."""
    torch.manual_seed(1)
    return models.build_model(config(), num_classes=91).state_dict()


@pytest.mark.parametrize("layout", ["plain", "ddp-wrapped"])
def test_changed_head_is_reinitialised_and_everything_else_loads(
    layout: str, coco_like: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "coco.pth"
    if layout == "plain":
        torch.save(coco_like, path)
    else:
        torch.save({"model": {f"module.{k}": v for k, v in coco_like.items()}, "epoch": 7}, path)
    model = models.build_model(config(), num_classes=4)
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k in HEAD}

    with caplog.at_level(logging.INFO, logger="trainer"):
        report = weights.load_weights(model, str(path), model_name=SMALL)

    assert {name for name, _, _ in report.reinitialised} == HEAD
    assert dict((n, (old, new)) for n, old, new in report.reinitialised)[
        "roi_heads.box_predictor.cls_score.weight"] == ((91, 1024), (4, 1024))
    assert report.counts() == {"loaded": len(coco_like) - 4, "reinitialised": 4, "missing": 0, "unexpected": 0}
    state = model.state_dict()
    for key, saved in coco_like.items():
        if key in HEAD:
            assert state[key].shape[0] in (4, 16) and torch.equal(state[key], fresh_head[key])
        else:
            assert torch.equal(state[key], saved), key
    line = next(r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage())
    assert f"loaded {len(coco_like) - 4} tensors from {path}" in line
    assert "roi_heads.box_predictor.cls_score.weight [91, 1024] -> [4, 1024]" in line


def test_build_with_weights_freezes_like_torchvision_pretrained(
    coco_like: dict[str, torch.Tensor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "coco.pth"
    torch.save({"state_dict": coco_like}, path)
    with caplog.at_level(logging.INFO, logger="trainer"):
        model = models.build_model(config(weights=f"file://{path}"), num_classes=4)
    # batch-norm counters have no place in frozen batch norm: neither missing nor unexpected, no warning
    (line,) = [r for r in caplog.records if "re-initialised 4" in r.getMessage()]
    assert line.levelno == logging.INFO and "missing" not in line.getMessage()

    body = model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    state = model.state_dict()
    for key, saved in coco_like.items():
        if key not in HEAD and not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], saved), key
    # default with weights: the last 3 of 6 MobileNet stages train, i.e. blocks 0-6 are frozen
    frozen = frozen_names(model)
    assert frozen and all(n.startswith(tuple(f"backbone.body.{i}." for i in range(7))) for n in frozen)
    assert any(n.startswith("backbone.body.7.") for n, p in model.named_parameters() if p.requires_grad)


class Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused(container: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if container == "pickle":
        path.write_bytes(pickle.dumps({"model": Evil(marker)}, protocol=2))
    else:
        torch.save({"model": Evil(marker)}, path)
    with pytest.raises(InputError) as caught:
        weights.load_weights(models.build_model(config("ssdlite320_mobilenet_v3_large"), 3), str(path))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert "weights_only" in str(caught.value)
    assert not marker.exists()


def test_corrupt_truncated_missing_and_wrong_content_are_input_errors(coco_like: dict[str, torch.Tensor],
                                                                      tmp_path: Path) -> None:
    model = models.build_model(config(), num_classes=4)
    corrupt = tmp_path / "random.pth"
    corrupt.write_bytes(os.urandom(4096))
    whole = tmp_path / "whole.pth"
    torch.save(coco_like, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    a_list = tmp_path / "list.pth"
    torch.save([1, 2, 3], a_list)
    no_tensors = tmp_path / "no-tensors.pth"
    torch.save({"epoch": 3}, no_tensors)
    missing = tmp_path / "nope" / "missing.pth"
    for path in (corrupt, truncated, a_list, no_tensors, missing):
        with pytest.raises(InputError) as caught:
            weights.load_weights(model, str(path))
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(InputError, match="unsupported scheme"):
        weights.load_weights(model, "ftp://example.invalid/w.pth")


def test_weights_of_another_architecture_match_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ssd.pth"
    torch.save(models.build_model(config("ssdlite320_mobilenet_v3_large"), 4).state_dict(), path)
    with pytest.raises(InputError, match="nothing matched") as caught:
        models.build_model(config(weights=str(path)), num_classes=4)
    assert SMALL in str(caught.value) and str(path) in str(caught.value)


def test_uncached_torchvision_weights_name_is_not_downloaded(offline: Path) -> None:
    name = "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"
    with pytest.raises(InputError, match="cannot be downloaded") as caught:
        models.build_model(config(weights=name), num_classes=4)
    assert name in str(caught.value) and str(offline) in str(caught.value)
    with pytest.raises(InputError, match="not a torchvision weights name"):
        models.build_model(config(weights="NoSuchModel_Weights.COCO_V1"), num_classes=4)


def test_cached_torchvision_weights_name_loads_and_checks_its_hash(
    offline: Path, coco_like: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = offline / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    scratch = cache / "scratch.pth"
    torch.save(coco_like, scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    good, bad = f"frcnn-{digest[:8]}.pth", "frcnn-00000000.pth"
    scratch.rename(cache / good)
    (cache / bad).write_bytes((cache / good).read_bytes())
    urls = {"Good_Weights.COCO_V1": good, "Bad_Weights.COCO_V1": bad}
    monkeypatch.setattr(weights, "get_weight",
                        lambda n: SimpleNamespace(url=f"https://download.invalid/models/{urls[n]}"))
    model = models.build_model(config(), num_classes=4)
    report = weights.load_weights(model, "Good_Weights.COCO_V1")
    assert len(report.loaded) == len(coco_like) - 4
    with pytest.raises(InputError, match="checksum"):
        weights.load_weights(model, "Bad_Weights.COCO_V1")


# ------------------------------------------------------------------------------------------- freezing
def test_freeze_patterns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trainer"):
        model = models.build_model(config(freeze=["backbone.body.*", "rpn.head.conv.*"]), num_classes=4)
    frozen = frozen_names(model)
    names = [n for n, _ in model.named_parameters()]
    assert frozen == {n for n in names if n.startswith(("backbone.body.", "rpn.head.conv."))}
    trainable, total = models.count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n not in frozen) < total
    assert f"{len(names) - len(frozen)} of {len(names)} parameters" in caplog.text


def test_freeze_pattern_matching_nothing_is_an_error() -> None:
    with pytest.raises(InputError, match=r"model\.freeze: pattern 'backbone\.bdy\.\*' matches no parameter"):
        models.build_model(config(freeze=["backbone.*", "backbone.bdy.*"]), num_classes=4)


@pytest.mark.parametrize("name,bad", [("fcos_resnet50_fpn", 6), (SMALL, 7), ("ssd300_vgg16", 6),
                                      ("ssdlite320_mobilenet_v3_large", -1)])
def test_trainable_backbone_layers_out_of_range(name: str, bad: int) -> None:
    with pytest.raises(InputError, match=r"model\.trainable_backbone_layers"):
        models.build_model(config(name, trainable_backbone_layers=bad), num_classes=4)


def _torchvision_reference(name: str, layers: int, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """The model as torchvision freezes it for ``trainable_backbone_layers=layers``: torchvision honours the
    option only with pretrained weights, so its check is told to accept it from scratch too."""
    builder = models.REGISTRY[name].builder
    monkeypatch.setattr(sys.modules[builder.__module__], "_validate_trainable_layers",
                        lambda trained, value, max_value, default: max_value if value is None else value)
    return builder(weights=None, weights_backbone=None, num_classes=4, trainable_backbone_layers=layers)


@pytest.mark.parametrize("name", ["fcos_resnet50_fpn", SMALL, "ssd300_vgg16", "ssdlite320_mobilenet_v3_large"])
def test_trainable_backbone_layers_freeze_what_torchvision_freezes(name: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    top = models.FAMILY_STAGES[models.REGISTRY[name].family]
    ours = models.build_model(config(name), num_classes=4)
    previous: set[str] = set()
    for layers in range(top, -1, -1):
        for p in ours.parameters():
            p.requires_grad_(True)
        models.freeze_backbone_layers(ours, name, layers)
        expected = frozen_names(_torchvision_reference(name, layers, monkeypatch))
        assert frozen_names(ours) == expected, f"{name} trainable_backbone_layers={layers}"
        if layers == top:
            assert not expected
        else:
            assert previous < expected  # each stage fewer freezes strictly more
        previous = expected


def test_trainable_backbone_layers_from_config(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer"):
        model = models.build_model(config("fcos_resnet50_fpn", trainable_backbone_layers=2), num_classes=4)
    frozen = frozen_names(model)
    assert {n.split(".")[2] for n in frozen} == {"conv1", "bn1", "layer1", "layer2"}
    assert not any(n.startswith(("backbone.body.layer3", "backbone.fpn", "head.")) for n in frozen)
    trainable, total = models.count_parameters(model)
    assert total - trainable == sum(p.numel() for n, p in model.named_parameters() if n in frozen) > 0
    assert "random initial values" in caplog.text  # frozen stages without weights are worth a warning


def test_detector_options_reach_the_torchvision_model() -> None:
    model = models.build_model(ModelConfig(name=SMALL, options={"box_batch_size_per_image": 64,
                                                                "rpn_post_nms_top_n_train": 300,
                                                                "box_score_thresh": 0.25}), 3)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert model.rpn._post_nms_top_n["training"] == 300
    assert model.roi_heads.score_thresh == 0.25
    retina = models.build_model(ModelConfig(name="retinanet_resnet50_fpn", options={"topk_candidates": 500}), 3)
    assert retina.topk_candidates == 500


@pytest.mark.parametrize(("name", "options", "message"), [
    (SMALL, {"box_batch_size_per_imag": 64}, "did you mean 'box_batch_size_per_image'"),
    (SMALL, {"score_thresh": 0.1}, "not an option of fasterrcnn_mobilenet_v3_large_320_fpn"),  # RetinaNet's name
    ("ssd300_vgg16", {"box_nms_thresh": 0.5}, "not an option of ssd300_vgg16"),
    (SMALL, {"box_nms_thresh": -1}, "expected a number >= 0"),
])
def test_unknown_or_bad_detector_options_are_one_line_errors(name: str, options: dict[str, Any],
                                                            message: str) -> None:
    with pytest.raises(InputError, match=message):
        models.build_model(ModelConfig(name=name, options=options), 3)


def test_anchor_sizes_and_ratios_rebuild_the_rpn_head_and_train() -> None:
    model = models.build_model(ModelConfig(name=SMALL, min_size=128, max_size=128,
                                           anchor_sizes=[[16, 32]] * 3, aspect_ratios=[0.5, 1.0, 2.0]), 3)
    assert model.rpn.anchor_generator.num_anchors_per_location() == [6, 6, 6]
    assert model.rpn.head.cls_logits.out_channels == 6
    model.train()
    losses = model([torch.rand(3, 128, 128)], [{"boxes": torch.tensor([[10.0, 10, 50, 50]]),
                                                "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert model.rpn.head.cls_logits.weight.grad is not None


@pytest.mark.parametrize(("name", "config", "message"), [
    (SMALL, {"anchor_sizes": [[16, 32]]}, "has 3 feature levels, got sizes for 1"),
    ("fcos_resnet50_fpn", {"aspect_ratios": [1.0]}, "has no configurable anchors"),
    ("retinanet_resnet50_fpn_v2", {"anchor_sizes": [[16]] * 5}, "change sizes, not counts"),
])
def test_impossible_anchor_settings_are_input_errors(name: str, config: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        models.build_model(ModelConfig(name=name, **config), 3)

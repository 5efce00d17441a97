"""A run prepares its validation split once: later evaluations read neither the COCO file nor rebuild the ground
truth, and give the same numbers as a fresh one-off evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import BCCD
from tests.unit.test_evaluation import Oracle, perfect_outputs
from trainer import inference
from trainer.annotations.convert import ConvertOptions, convert
from trainer.config import load_config
from trainer.distributed import DistEnv


@pytest.fixture(scope="module")
def bccd_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco")
    convert(ConvertOptions(str(BCCD), str(out), splits=["test"], workers=1), on_progress=lambda _: None)
    return out / "test.json"


def test_every_evaluation_reuses_the_index_the_loader_and_the_ground_truth(
        bccd_test: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = json.loads(bccd_test.read_text())
    config = load_config(None, [f"data.train.coco={bccd_test}", f"data.train.images={BCCD / 'JPEGImages'}",
                                f"data.val.coco={bccd_test}", f"data.val.images={BCCD / 'JPEGImages'}",
                                "data.workers=0", "data.batch_size=4"])
    env = DistEnv()
    validation = inference.build_validation(config.data.val, config, env)
    first = inference.evaluate(Oracle(perfect_outputs(doc)), validation, env)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the validation split was prepared again")

    monkeypatch.setattr(inference, "load_coco_index", refused)
    monkeypatch.setattr(inference, "load_ground_truth", refused)
    outputs = perfect_outputs(doc)
    for output in outputs[::2]:  # a worse model the second time: half the images answered with nothing
        output["scores"] = output["scores"][:0]
        output["boxes"], output["labels"] = output["boxes"][:0], output["labels"][:0]
    second = inference.evaluate(Oracle(outputs), validation, env)
    third = inference.evaluate(Oracle(perfect_outputs(doc)), validation, env)
    assert first is not None and second is not None and third is not None
    assert first.stats["AP"] == third.stats["AP"] == 1.0
    assert 0.2 < second.stats["AP"] < 0.8 and second.detections < first.detections
    assert first.per_class == third.per_class


def test_eval_backend_chooses_the_library_and_the_numbers_stay_the_same(bccd_test: Path) -> None:
    doc = json.loads(bccd_test.read_text())
    results = {}
    for backend in ("pycocotools", "faster-coco-eval"):
        config = load_config(None, [f"data.train.coco={bccd_test}", f"data.train.images={BCCD / 'JPEGImages'}",
                                    f"data.val.coco={bccd_test}", f"data.val.images={BCCD / 'JPEGImages'}",
                                    "data.workers=0", "data.batch_size=4", f"eval.backend={backend}"])
        validation = inference.build_validation(config.data.val, config, DistEnv())
        assert validation.ground_truth is not None and validation.ground_truth.backend == backend
        outputs = perfect_outputs(doc)
        for n, output in enumerate(outputs):  # some images missed, some boxes shifted: an AP well below 1
            if n % 3 == 0:
                output["boxes"] = output["boxes"] + 6.0
        result = inference.evaluate(Oracle(outputs), validation, DistEnv())
        assert result is not None
        results[backend] = result
    fast, reference = results["faster-coco-eval"], results["pycocotools"]
    assert 0.3 < reference.stats["AP"] < 0.95
    assert fast.stats == pytest.approx(reference.stats, abs=1e-4)
    assert fast.per_class == pytest.approx(reference.per_class, abs=1e-4)

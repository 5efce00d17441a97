"""The generated shapes data set: valid COCO, boxes on the drawn shapes, deterministic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from trainer.data.coco_index import load_coco_index
from trainer.data.dataset import CocoDetection


def test_synth_writes_splits_whose_boxes_frame_the_shapes(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "trainer", "synth", "--out", str(tmp_path / "a"), "--n", "20",
                             "--size", "96", "--seed", "7"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    train, val = load_coco_index(str(tmp_path / "a/train.json")), load_coco_index(str(tmp_path / "a/val.json"))
    assert (len(train.images), len(val.images)) == (16, 4)
    assert train.category_names == ["circle", "square", "triangle"]
    dataset = CocoDetection(train, str(tmp_path / "a/images"), drop_empty=False)
    uniform = []
    for i in range(len(dataset)):
        image, target, _ = dataset[i]
        assert image.shape == (3, 96, 96)
        for x0, y0, x1, y1 in target["boxes"].tolist():
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 and x1 - x0 >= 96 * 0.12 - 1
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            patch = image[:, cy - 2 : cy + 3, cx - 2 : cx + 3].float()
            uniform.append(float(patch.std(dim=(1, 2)).max()) < 8)  # a solid shape, not the noisy background
    # A box centre can land on the edge of a shape drawn over it, but nearly all sit on a solid fill.
    assert len(uniform) >= 16 and sum(uniform) >= 0.9 * len(uniform)
    subprocess.run([sys.executable, "-m", "trainer", "synth", "--out", str(tmp_path / "b"), "--n", "20",
                    "--size", "96", "--seed", "7"], check=True, capture_output=True, cwd=REPO, timeout=120)
    for rel in ("train.json", "val.json", "images/shape_00003.jpg"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()

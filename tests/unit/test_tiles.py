"""Tiling large images: the grid covers the image, boxes follow their pixels, partial boxes obey the threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.images import RECT_COLOR, image_with_rectangles, write_coco
from trainer.data.coco_index import load_coco_index
from trainer.data.dataset import CocoDetection
from trainer.data.tiles import TileSpec, plan_tiles, visible_fraction


def test_grid_overlaps_and_ends_at_the_border() -> None:
    tiles = plan_tiles(1000, 700, TileSpec(size=400, overlap=100))
    assert sorted({t[0] for t in tiles}) == [0, 300, 600] and sorted({t[1] for t in tiles}) == [0, 300]
    assert all(t[2] - t[0] == 400 and t[3] - t[1] == 400 for t in tiles)
    assert max(t[2] for t in tiles) == 1000 and max(t[3] for t in tiles) == 700
    assert plan_tiles(300, 200, TileSpec(size=400, overlap=100)) == [(0, 0, 300, 200)]  # smaller than a tile


def test_visible_fraction() -> None:
    boxes = np.array([[0, 0, 10, 10], [95, 0, 105, 10], [200, 200, 210, 210]], dtype=np.float32)
    assert visible_fraction(boxes, (0, 0, 100, 100)).tolist() == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("bad", [dict(size=0), dict(size=100, overlap=100), dict(min_visibility=0.0)])
def test_bad_tile_settings_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        TileSpec(**bad)


def test_tiles_crop_pixels_and_boxes_together(tmp_path: Path) -> None:
    boxes = [(20, 20, 60, 60), (180, 30, 240, 70), (150, 150, 170, 170)]
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "big.png").write_bytes(image_with_rectangles(256, 192, boxes))
    coco = write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "big.png", "width": 256, "height": 192}],
                      [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0]}
                       for i, (x0, y0, x1, y1) in enumerate(boxes)], ["x"])
    ds = CocoDetection(load_coco_index(str(coco)), str(tmp_path / "img"),
                       tiles=TileSpec(size=128, overlap=32, min_visibility=0.6))
    red = torch.tensor(RECT_COLOR)
    kept = 0
    for i in range(len(ds)):
        image, target, _ = ds[i]
        assert image.shape[-2:] == (128, 128)
        for x0, y0, x1, y1 in target["boxes"].int().tolist():
            assert torch.equal(image[:, (y0 + y1) // 2, (x0 + x1) // 2], red)  # the box frames red pixels
            kept += 1
    # box 2 (x 180..240) is split by the tile at x=96..224: 44/60 visible there (kept), 60/60 in the last column
    assert kept >= 3
    all_tiles = CocoDetection(load_coco_index(str(coco)), str(tmp_path / "img"),
                              tiles=TileSpec(size=128, overlap=32), drop_empty=False)
    assert len(all_tiles) == 6 and len(ds) < 6  # tiles without a visible box are not training samples

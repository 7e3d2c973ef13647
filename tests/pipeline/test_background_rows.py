"""The vectorised per-row sky levels of mesh_levels equal the one-box-at-a-time estimator."""

from __future__ import annotations

import numpy as np

from lazysky.pipeline.background import _box_level, _row_levels, mesh_levels


def test_row_levels_equal_the_box_by_box_estimator() -> None:
    rng = np.random.default_rng(11)
    boxes = rng.normal(1000.0, 30.0, (8, 400)).astype(np.float32)
    boxes[1, :40] += 5000.0  # a star in the box: clipped away
    boxes[2, :300] = np.nan  # masked: 100 good pixels
    boxes[3, :390] = np.nan  # fewer than 16 good pixels: NaN
    boxes[4] = rng.exponential(200.0, 400).astype(np.float32)  # skewed: crowded → median
    boxes[5, ::2] = 1000.0  # ties
    boxes[6] = 7.0  # constant: std 0
    got = _row_levels(boxes, sigma=3.0, iters=5)
    want = np.array([_box_level(b, sigma=3.0, iters=5) for b in boxes])
    assert np.isnan(got[3])
    assert np.isnan(want[3])
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=2e-6)
    assert abs(got[1] - 1000.0) < 10  # the star did not lift the sky


def test_mesh_levels_whole_and_partial_boxes() -> None:
    rng = np.random.default_rng(3)
    img = rng.normal(50.0, 2.0, (2, 150, 200)).astype(np.float32)
    mask = np.zeros(img.shape, np.uint16)
    mask[0, 10:60, 20:90] = 1
    got = mesh_levels(img, mask, box_px=64)  # 2 x 3 whole boxes, partial last row/column
    assert got.shape == (2, 3, 4)
    work = np.where(mask != 0, np.float32(np.nan), img)
    for d in range(2):
        for j in range(3):
            for i in range(4):
                box = work[d, j * 64 : (j + 1) * 64, i * 64 : (i + 1) * 64].ravel()
                want = _box_level(box, sigma=3.0, iters=5)
                np.testing.assert_allclose(got[d, j, i], want, rtol=2e-6)

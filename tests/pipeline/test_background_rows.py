"""The vectorised per-row sky levels of mesh_levels equal the one-box-at-a-time estimator."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_compiled_row_levels_equal_the_numpy_reference() -> None:
    from lazysky.pipeline import _coadd_jit
    from lazysky.pipeline.background import _row_levels_numpy

    assert _coadd_jit.AVAILABLE
    rng = np.random.default_rng(12)
    boxes = rng.normal(300.0, 12.0, (64, 4096)).astype(np.float32)  # 64 x 64 boxes
    boxes[::3, :200] += rng.exponential(3000.0, 200).astype(np.float32)  # stars
    boxes[1::4, :3000] = np.nan  # masked
    boxes[2, :4085] = np.nan  # too few pixels
    boxes[5] = rng.exponential(100.0, 4096).astype(np.float32)  # crowded
    boxes[7, ::2] = 300.0  # ties
    got = _row_levels(boxes, sigma=3.0, iters=5)
    want = _row_levels_numpy(boxes, sigma=3.0, iters=5)
    assert np.isnan(got[2])
    assert np.isnan(want[2])
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert np.all(np.abs(got[::3][1:] - 300.0) < 5)  # the stars were clipped away


def test_compiled_spline_equals_fitpack(monkeypatch: pytest.MonkeyPatch) -> None:
    from lazysky.pipeline import _coadd_jit
    from lazysky.pipeline.background import interpolate_mesh

    rng = np.random.default_rng(13)
    for mesh_shape, shape in (((8, 5), (500, 300)), ((2, 4), (120, 250)), ((3, 3), (190, 170))):
        mesh = rng.normal(100.0, 3.0, mesh_shape)
        rows, cols = np.arange(7, shape[0] - 3), np.arange(0, shape[1], 2)  # a tile's pixels
        got = interpolate_mesh(mesh, rows, cols, box_px=64, shape=shape)
        monkeypatch.setattr(_coadd_jit, "AVAILABLE", False)
        want = interpolate_mesh(mesh, rows, cols, box_px=64, shape=shape)
        monkeypatch.setattr(_coadd_jit, "AVAILABLE", True)
        assert got.shape == want.shape == (len(rows), len(cols))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert float(np.ptp(got)) > 1.0  # the spline varies: not a constant compared

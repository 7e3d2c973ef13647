"""Background: mesh kernels, no seams (tiled = whole), laziness, and the true sky."""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import pytest
from conftest import Survey, assert_same, raise_if_dask_computes

from lazysky.errors import ParameterError
from lazysky.pipeline import (
    calibrate_exposure,
    estimate_background,
    interpolate_mesh,
    mesh_levels,
    smooth_mesh,
    subtract_background,
)
from lazysky.pipeline.testing import synthetic_exposure


def test_mesh_kernels_on_a_small_block() -> None:
    yy, xx = np.mgrid[:10, :14]
    img = 100.0 + 0.5 * yy + 0.2 * xx
    img[4, 4] = 1e5  # a star is clipped away
    mask = np.zeros((10, 14), dtype=np.uint16)
    mask[:5, :5] = 1  # a masked box: filled from its neighbours
    mesh = mesh_levels(img, mask, box_px=5)
    assert mesh.shape == (2, 3)
    assert np.isnan(mesh[0, 0])
    filled = smooth_mesh(mesh, filter_size=1)
    assert np.isfinite(filled).all()
    bkg = interpolate_mesh(filled, np.arange(10), np.arange(14), box_px=5, shape=(10, 14))
    assert bkg.shape == (10, 14)
    assert np.abs(bkg - (100.0 + 0.5 * yy + 0.2 * xx))[5:, 5:].max() < 1.0
    # a pixel's value does not depend on which tile asks for it
    part = interpolate_mesh(filled, np.arange(3, 7), np.arange(8, 14), box_px=5, shape=(10, 14))
    assert_same(part, bkg[3:7, 8:14])
    assert mesh_levels(np.empty((0, 0)), box_px=5).shape == (0, 0)


def test_background_has_no_seams_and_is_lazy(survey: Survey, masters: Any) -> None:
    cal = calibrate_exposure(survey.exposure(0), masters).persist()
    with raise_if_dask_computes():
        tiled = subtract_background(cal.chunk({"y": 48, "x": 80}), box_px=32)
        whole = subtract_background(cal.chunk({"y": -1, "x": -1}), box_px=32)
    assert tiled.image.data.numblocks[1] > 1
    assert_same(tiled.background.values, whole.background.values)
    assert_same(tiled.image.values, whole.image.values)
    # smooth across tile edges: no step larger than the gradient elsewhere
    b = tiled.background.values[0]
    steps = np.abs(np.diff(b, axis=0))
    assert steps[47].max() <= 2 * np.median(steps.max(axis=1)) + 1e-3
    assert tiled.attrs["steps"][-1]["step"] == "subtract_background"


def test_background_matches_the_true_sky(survey: Survey, masters: Any) -> None:
    cal = calibrate_exposure(survey.exposure(2), masters)
    bkg = estimate_background(cal).values
    p = survey.pointings[2]
    sky = p.sky_e_per_s_px * p.exptime_s  # flat-fielded: uniform
    rel = bkg / sky - 1
    print(f"background / true sky - 1: mean {rel.mean():.5f}, rms {rel.std():.5f}")
    assert abs(rel.mean()) < 0.002  # faint sources' light lifts it a little
    assert rel.std() < 0.002


def test_subtracted_dataset_computes_whole(survey: Survey, masters: Any) -> None:
    """``dask.compute(dataset)`` of a calibrated, sky-subtracted exposure equals its
    variables computed each as its own collection. With tiles of one box the mesh reads
    the mask straight from calibrate's layer, which dask 2026.8 fused away (a missing
    dependency of the finalize task) unless the background's tiles read it too."""
    one = {"detector": [0]}  # one detector of four is enough (0.2 s a compute)
    sub = subtract_background(calibrate_exposure(survey.exposure(1).isel(one), masters.isel(one)))
    assert sub.image.data.chunksize[1] == 64  # a tile is one box: no rechunk in between
    (whole,) = dask.compute(sub)
    parts = dask.compute(*(sub[name].data for name in sub.data_vars))
    assert sorted(whole.data_vars) == ["background", "image", "mask", "variance"]
    for name, part in zip(sub.data_vars, parts, strict=True):
        assert_same(whole[name].values, part)
    assert np.ptp(whole.background.values) > 0  # a real sky, not a constant


def test_background_rejects_bad_parameters() -> None:
    cal = calibrate_exposure(synthetic_exposure())
    with pytest.raises(ParameterError, match="box_px"):
        estimate_background(cal, box_px=2)
    with pytest.raises(ParameterError, match="filter_size"):
        subtract_background(cal, filter_size=2)


def test_one_chunk_or_tiles_give_the_same_background_and_subtraction() -> None:
    # a whole-detector chunk (what coadd_files reads) spreads its mesh over windows of
    # at most 2048 px cut inside the tasks; tiles of other sizes (whole boxes or not) give
    # the same mesh, background and subtracted image, bit for bit
    import dask.array as da
    import xarray as xr

    rng = np.random.default_rng(3)
    ny, nx = 2200, 96
    yy = np.arange(ny, dtype=np.float32)[:, None]
    img = (100 + 0.01 * yy + rng.normal(0, 3, (1, ny, nx))).astype(np.float32)
    mask = np.zeros(img.shape, np.uint16)
    mask[0, 500:520, 10:30] = 4

    def exposure(chunks: Any) -> xr.Dataset:
        return xr.Dataset({k: (("detector", "y", "x"), da.from_array(a, chunks=chunks))
                           for k, a in (("image", img), ("mask", mask),
                                        ("variance", np.ones_like(img)))})  # fmt: skip

    whole = subtract_background(exposure((1, ny, nx)), box_px=32)
    mesh = [k for k in whole.background.data.__dask_graph__() if "background-mesh" in str(k[0])]
    assert len(mesh) == 2  # 2200 rows: two windows of one chunk
    a = dask.compute(whole.image, whole.background)
    for chunks in ((1, 640, 64), (1, 500, 50)):  # whole boxes of 32, and not
        tiled = subtract_background(exposure(chunks), box_px=32)
        b = dask.compute(tiled.image, tiled.background)
        for x, y in zip(a, b, strict=True):
            assert_same(x.values, y.values)
    assert_same(a[0].values, img - a[1].values)  # image − background, as float32

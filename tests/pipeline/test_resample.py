"""Resampling onto the grid: the kernel, flux, laziness, tasks per overlap, tiling, errors."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest
import xarray as xr
from astropy.wcs import WCS
from conftest import INST, assert_same, raise_if_dask_computes

from lazysky.errors import ParameterError
from lazysky.pipeline import (
    MaskBit,
    NoOverlapWarning,
    SkyGrid,
    detector_footprints,
    resample_exposure,
    resample_pixels,
)
from lazysky.pipeline.resample import MAP_TOLERANCE_PX, PixelMap, mapping_step


def _mapping(ny: int, nx: int, *, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0,
             ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    yy, xx = np.mgrid[-1 : ny + 1, -1 : nx + 1].astype(float)
    return xx * scale + dx, yy * scale + dy


def test_kernel_identity_shift_and_mask_on_a_small_block() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(size=(10, 14)).astype(np.float32)
    var = np.full_like(img, 2.0)
    msk = np.zeros(img.shape, np.uint16)
    msk[4, 6] = MaskBit.CR
    same = resample_pixels(img, var, msk, *_mapping(10, 14))
    np.testing.assert_allclose(same.image, img, rtol=1e-6)
    np.testing.assert_array_equal(same.mask, msk)
    half = resample_pixels(img, var, msk, *_mapping(10, 14, dx=0.5))
    np.testing.assert_allclose(half.image[:, :-1], (img[:, :-1] + img[:, 1:]) / 2, rtol=1e-5)
    assert half.variance[3, 3] == pytest.approx(2.0)  # Σ w v, the standard approximation
    assert half.mask[4, 5] == MaskBit.CR
    assert half.mask[4, 6] == MaskBit.CR
    assert half.mask[4, 4] == 0
    assert half.mask[3, 5] == 0
    # the last column maps beyond the outer half of the edge pixels: NODATA
    out = resample_pixels(img, var, msk, *_mapping(10, 14, dx=1.0))
    assert (out.mask[:, -1] == MaskBit.NODATA).all()
    assert np.isinf(out.variance[:, -1]).all()
    assert (out.image[:, -1] == 0).all()


def test_kernel_conserves_flux_when_the_pixels_change_size() -> None:
    yy, xx = np.mgrid[:60, :60]
    img = (1000 * np.exp(-((xx - 30.3) ** 2 + (yy - 28.7) ** 2) / (2 * 4.0**2))).astype(np.float32)
    var = np.ones_like(img)
    msk = np.zeros(img.shape, np.uint16)
    # output pixels twice as large (J = 4 input pixels each), rotated by 30°, offset
    ny = nx = 30
    gy, gx = np.mgrid[-1 : ny + 1, -1 : nx + 1].astype(float)
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    u, v = (gx - 15) * 2, (gy - 15) * 2
    x_in, y_in = c * u - s * v + 30.2, s * u + c * v + 29.1
    out = resample_pixels(img, var, msk, x_in, y_in)
    assert out.image.sum() == pytest.approx(img.sum(), rel=2e-3)
    assert float(np.median(out.variance[out.mask == 0])) == pytest.approx(16.0, rel=1e-6)


@pytest.fixture(scope="module")
def grid(calibrated: list[xr.Dataset]) -> SkyGrid:
    fps = [f for cal in calibrated for f in detector_footprints(cal)]
    return SkyGrid.covering(fps, pixel_scale_arcsec=INST.pixel_scale_arcsec, tile_px=96)


def test_resample_is_lazy_and_names_its_tasks(calibrated: list[xr.Dataset], grid: SkyGrid) -> None:
    cal = calibrated[0]
    with raise_if_dask_computes():
        pieces = resample_exposure(cal, grid)
        ds = pieces[0].to_dataset()
    exposure = str(cal.exposure.values)
    p = pieces[0]
    assert ds.image.dims == ("y", "x")
    assert ds.image.shape == grid.tile_shape(p.tile)
    names = [str(k) for k in p.pixels.dask.layers]
    assert any(n.startswith(f"resample-{exposure}-{p.detector}-{p.tile}-") for n in names)


def test_tasks_only_for_overlapping_tiles(calibrated: list[xr.Dataset], grid: SkyGrid) -> None:
    cal = calibrated[0]
    pieces = resample_exposure(cal, grid)
    n_det = cal.sizes["detector"]
    nty, ntx = grid.n_tiles
    assert len(pieces) < n_det * nty * ntx / 2
    # each 256-px detector touches at most 4 x 4 tiles of 96 px (fewer than all 7 x 7)
    per_det = {d: sum(p.detector == d for p in pieces) for d in map(str, cal.detector.values)}
    assert all(1 <= n <= 16 for n in per_det.values())
    # a grid with 4x the area (same tiles where the detectors are) costs the same tasks
    big = SkyGrid(grid.ra_deg, grid.dec_deg, grid.pixel_scale_arcsec,
                  (grid.shape[0] * 2 + 96, grid.shape[1] * 2 + 96), tile_px=96)  # fmt: skip
    more = resample_exposure(cal, big)
    assert len(more) <= len(pieces) + 2 * n_det  # tile boundaries fall elsewhere
    tasks = sum(
        1 for p in pieces for k in p.pixels.dask if str(k[0]).startswith("resample-")
    )  # type: ignore[index]
    assert tasks == len(pieces)


def _paste(pieces: list, grid: SkyGrid, detector: str) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    out = {
        "image": np.zeros(grid.shape, np.float32),
        "variance": np.full(grid.shape, np.inf, np.float32),
        "mask": np.full(grid.shape, int(MaskBit.NODATA), np.uint16),
    }
    for p in pieces:
        if p.detector != detector:
            continue
        px = p.pixels.compute()
        for k in out:
            out[k][grid.tile_slices(p.tile)] = px[k]
    return out


def test_resample_tiled_equals_whole(calibrated: list[xr.Dataset], grid: SkyGrid) -> None:
    cal = calibrated[2]
    whole = SkyGrid(grid.ra_deg, grid.dec_deg, grid.pixel_scale_arcsec, grid.shape,
                    tile_px=max(grid.shape))  # fmt: skip
    det = str(cal.detector.values[1])
    a = _paste(resample_exposure(cal, grid), grid, det)
    b = _paste(resample_exposure(cal, whole), whole, det)
    for k in a:
        assert_same(a[k], b[k])
    assert (a["mask"] == 0).sum() > 0.8 * cal.sizes["y"] * cal.sizes["x"]
    # flux conserved: the detector's total (sky-subtracted) flux, to the noise
    inside = a["mask"] & MaskBit.NODATA == 0
    total_in = float(cal.image.isel(detector=1).sum())
    assert float(a["image"][inside].sum()) == pytest.approx(total_in, rel=0.01)


def test_resample_bad_input(calibrated: list[xr.Dataset], grid: SkyGrid) -> None:
    far = SkyGrid(grid.ra_deg + 10, grid.dec_deg, grid.pixel_scale_arcsec, (100, 100))
    with pytest.warns(NoOverlapWarning, match="does not overlap"):
        assert resample_exposure(calibrated[0], far) == []
    with pytest.raises(ParameterError, match="missing"):
        resample_exposure(calibrated[0].drop_vars("variance"), grid)
    with pytest.raises(ParameterError, match="'header'"):
        resample_exposure(calibrated[0].drop_vars("header"), grid)
    with pytest.raises(ParameterError, match="t<iy:03d>"):
        resample_exposure(calibrated[0], grid, tiles=["x1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(resample_exposure(calibrated[0], grid, tiles=["t001_001"])) >= 1


def _tan(crval: tuple[float, float], crpix: tuple[float, float], scale_deg: float,
         rot_deg: float = 0.0) -> WCS:  # fmt: skip
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    c, s = np.cos(np.radians(rot_deg)), np.sin(np.radians(rot_deg))
    w.wcs.cd = scale_deg * np.array([[-c, s], [s, c]])
    w.wcs.crval, w.wcs.crpix = list(crval), list(crpix)
    return w


def _max_map_error(out: WCS, inp: WCS, rows: tuple[int, int], cols: tuple[int, int],
                   step: int) -> float:  # fmt: skip
    m = PixelMap(out, inp, rows=rows, cols=cols, step=step)
    x, y = m.evaluate(0, rows[1] - rows[0])
    cc, rr = np.meshgrid(np.arange(*cols, dtype=float), np.arange(*rows, dtype=float))
    xe, ye = inp.world_to_pixel_values(*out.pixel_to_world_values(cc, rr))
    return float(np.max(np.hypot(x - xe, y - ye)))


def test_pixel_map_interpolation_stays_within_its_tolerance() -> None:
    # a 2048² output tile, an input rotated by 7°, 5 % larger pixels, tangent point 0.2° away
    out = _tan((150.0, 2.0), (1024.5, 1024.5), 0.26 / 3600)
    inp = _tan((150.2, 2.1), (1000.0, 900.0), 1.05 * 0.26 / 3600, rot_deg=7.0)
    step, err = mapping_step(out, inp, rows=(-1, 2049), cols=(-1, 2049))
    assert step == 32
    assert err < MAP_TOLERANCE_PX
    full = _max_map_error(out, inp, (-1, 2049), (-1, 2049), step)
    assert full < MAP_TOLERANCE_PX
    assert full < 1e-4  # TAN to TAN nearby: far below the tolerance
    # step 1 is the exact mapping
    assert _max_map_error(out, inp, (100, 140), (3, 50), 1) == 0.0


def test_pixel_map_refines_its_step_for_a_strongly_curved_mapping() -> None:
    # a wide-field output (1′ pixels, 400 px ≈ 7°) onto a tangent point 20° away: the
    # mapping's curvature makes 32-px cells too coarse
    out = _tan((150.0, 60.0), (200.5, 200.5), 60 / 3600)
    inp = _tan((170.0, 70.0), (200.5, 200.5), 60 / 3600, rot_deg=20.0)
    err32 = _max_map_error(out, inp, (0, 400), (0, 400), 32)
    assert err32 > MAP_TOLERANCE_PX  # the coarse grid alone would be wrong here
    step, err = mapping_step(out, inp, rows=(0, 400), cols=(0, 400))
    assert 1 <= step < 32
    assert err < MAP_TOLERANCE_PX
    assert _max_map_error(out, inp, (0, 400), (0, 400), step) < MAP_TOLERANCE_PX


def test_pixel_map_rejects_a_bad_step() -> None:
    w = _tan((10.0, 20.0), (50, 50), 1e-4)
    with pytest.raises(ParameterError, match="step >= 1"):
        PixelMap(w, w, rows=(0, 10), cols=(0, 10), step=0)
    with pytest.raises(ParameterError, match="tolerance_px > 0"):
        mapping_step(w, w, rows=(0, 10), cols=(0, 10), tolerance_px=0.0)


def test_kernel_reads_a_box_cut_from_a_larger_array_without_copying_the_same() -> None:
    rng = np.random.default_rng(4)
    big = rng.normal(size=(40, 50)).astype(np.float32)
    var = rng.uniform(1, 2, size=(40, 50)).astype(np.float32)
    msk = (rng.uniform(size=(40, 50)) > 0.95).astype(np.uint16) * np.uint16(MaskBit.CR)
    box = (slice(5, 25), slice(7, 37))  # strided views into the larger planes
    x_in, y_in = _mapping(18, 28, scale=0.9, dx=0.3, dy=0.6)
    a = resample_pixels(big[box], var[box], msk[box], x_in, y_in)
    b = resample_pixels(big[box].copy(), var[box].copy(), msk[box].copy(), x_in, y_in)
    assert_same(a.image, b.image)
    assert_same(a.variance, b.variance)
    assert_same(a.mask, b.mask)
    assert (a.mask != 0).any()
    # and against a float64, Fortran-ordered input (copied to contiguous float32)
    c = resample_pixels(np.asfortranarray(big[box], dtype=np.float64), var[box], msk[box],
                        x_in, y_in)  # fmt: skip
    np.testing.assert_allclose(c.image, a.image, rtol=1e-6)


def test_compiled_resampling_equals_the_numpy_reference(
    calibrated: list[xr.Dataset], grid: SkyGrid, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lazysky.pipeline import _coadd_jit

    assert _coadd_jit.AVAILABLE
    cal = calibrated[1]
    compiled = dask.compute(*[p.pixels for p in resample_exposure(cal, grid)])
    monkeypatch.setattr(_coadd_jit, "AVAILABLE", False)
    reference = dask.compute(*[p.pixels for p in resample_exposure(cal, grid)])
    assert len(compiled) == len(reference) > 4
    for a, b in zip(compiled, reference, strict=True):
        # the same arithmetic in the same order: equal to float32 rounding (bit for bit
        # on x86-64 with numba 0.68), NODATA and mask bits exactly
        for k in ("image", "variance"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)
        assert_same(a["mask"], b["mask"])
    assert any(int((p["mask"] == 0).sum()) > 0 for p in compiled)

"""Stacking: the kernel, laziness, tiling, errors, FITS export, and the coadd vs the truth."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sep
import xarray as xr
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS
from conftest import INST, Survey, assert_same, raise_if_dask_computes
from dask.base import is_dask_collection

from lazysky.errors import OutputError, ParameterError
from lazysky.pipeline import (
    MaskBit,
    SkyGrid,
    detector_footprints,
    resample_exposure,
    stack,
    stack_pixels,
    write_coadd_fits,
)
from lazysky.simulator.render import moffat_enclosed

TILE_PX = 128


def test_kernel_clips_an_outlier_weights_and_counts() -> None:
    img = np.zeros((4, 10, 14), np.float32)
    var = np.ones_like(img)
    var[3] = 4.0  # a noisier frame: a quarter of the weight
    img[1, 2, 3] = 1000.0  # a cosmic ray that calibration missed
    msk = np.zeros(img.shape, np.uint16)
    msk[0, 5, 5] = MaskBit.CR
    msk[:, 7, 7] = MaskBit.NODATA
    out = stack_pixels(img, var, msk, weighting="pixel")
    assert out["image"][2, 3] == 0.0
    assert out["rejected"][2, 3] == 1
    assert out["count"][2, 3] == 3
    assert out["count"][5, 5] == 3
    assert out["rejected"][5, 5] == 0
    assert out["variance"][0, 0] == pytest.approx(1 / 3.25)  # 1 / Σ(1/v)
    assert out["weight"][0, 0] == pytest.approx(3.25)
    assert out["mask"][7, 7] & MaskBit.NODATA
    assert out["count"][7, 7] == 0
    assert np.isinf(out["variance"][7, 7])
    noclip = stack_pixels(img, var, msk, sigma=1e9)
    assert noclip["image"][2, 3] > 100
    med = stack_pixels(img, var, msk, method="median")
    assert med["image"][2, 3] == 0.0
    assert med["count"][2, 3] == 4
    # two detectors of one exposure merge into one layer (count 1, not 2)
    two = stack_pixels(img[:2], var[:2], msk[:2], groups=[0, 0])
    assert two["count"].max() == 1
    # a star: frames differ by more than their noise, the amplitude term keeps them all
    star = np.array([1000.0, 1150.0, 900.0])[:, None, None] * np.ones((3, 2, 2))
    kept = stack_pixels(star, np.full_like(star, 1000.0), np.zeros(star.shape, np.uint16))
    assert kept["count"].min() == 3


def test_kernel_with_two_layers_rejects_the_higher_only_when_significant() -> None:
    rng = np.random.default_rng(5)
    sky_var = 400.0
    img = rng.normal(0.0, np.sqrt(sky_var), (2, 200, 200)).astype(np.float32)
    var = np.full_like(img, sky_var)
    msk = np.zeros(img.shape, np.uint16)
    img[1, 50, 60] += 3000.0  # a cosmic ray in the second of two frames
    var[1, 50, 60] += 3000.0  # its own Poisson noise is in the variance plane
    img[:, 120, 30] = [60.0, 0.0]  # below 3 sqrt(400 + 400) = 84.9: noise, kept
    img[:, 121, 30] = [90.0, 0.0]  # above it: the higher goes
    out = stack_pixels(img, var, msk)
    assert out["rejected"][50, 60] == 1
    assert out["count"][50, 60] == 1
    assert out["image"][50, 60] == pytest.approx(img[0, 50, 60])
    assert out["rejected"][120, 30] == 0
    assert out["rejected"][121, 30] == 1
    assert out["image"][121, 30] == 0.0
    # pure noise: the higher of two goes only in the one-sided 3σ tail of their difference
    noise = np.ones(img.shape[1:], bool)
    noise[50, 60] = noise[120:122, 30] = False
    frac = float(out["rejected"][noise].mean())
    assert frac < 0.005
    # a star whose two frames differ by seeing: the amplitude term keeps both
    star = np.array([1000.0, 1250.0])[:, None, None] * np.ones((2, 3, 3))
    kept = stack_pixels(star, np.full_like(star, 1000.0), np.zeros(star.shape, np.uint16))
    assert kept["count"].min() == 2
    # with only one valid layer nothing can be judged: it is kept
    one = stack_pixels(img[:1], var[:1], msk[:1])
    assert one["rejected"].max() == 0


def test_kernel_rejects_bad_choices() -> None:
    a = np.zeros((3, 2, 2))
    with pytest.raises(ParameterError, match=r"method must be one of \['clipped-mean', 'median'\]"):
        stack_pixels(a, a + 1, a.astype(np.uint16), method="mean")
    with pytest.raises(ParameterError, match="weighting"):
        stack_pixels(a, a + 1, a.astype(np.uint16), weighting="none")


@pytest.fixture(scope="module")
def grid(calibrated: list[xr.Dataset]) -> SkyGrid:
    fps = [f for cal in calibrated for f in detector_footprints(cal)]
    return SkyGrid.covering(fps, pixel_scale_arcsec=INST.pixel_scale_arcsec, tile_px=TILE_PX)


def _coadd(cals: list[xr.Dataset], grid: SkyGrid, **kw: Any) -> xr.Dataset:
    return stack([p for cal in cals for p in resample_exposure(cal, grid)], grid, **kw)


@pytest.fixture(scope="module")
def coadd(calibrated: list[xr.Dataset], grid: SkyGrid) -> xr.Dataset:
    return _coadd(calibrated, grid).compute()


def test_stack_is_lazy_and_names_tasks_per_tile(
    calibrated: list[xr.Dataset], grid: SkyGrid
) -> None:
    with raise_if_dask_computes():
        co = _coadd(calibrated, grid, method="median")
    assert co.image.dims == ("y", "x")
    assert co.image.shape == grid.shape
    assert co.image.data.chunks == grid.chunks
    names = {str(k) for k in co.image.data.dask.layers}
    assert any(
        n.startswith("stack-t000_000-") or n.startswith("stack-empty-t000_000") for n in names
    )
    assert any(n.startswith("resample-") for n in names)
    assert co.attrs["inputs"] == [str(c.exposure.values) for c in calibrated]
    assert co.attrs["steps"][-1]["method"] == "median"
    # one stack task per tile, whatever the number of exposures
    stack_keys = [k for k in co.image.data.dask if str(k[0]).startswith("stack-")]  # type: ignore[index]
    assert len(stack_keys) == grid.n_tiles[0] * grid.n_tiles[1]


def test_stack_tiled_equals_whole(calibrated: list[xr.Dataset], grid: SkyGrid) -> None:
    # also fused == not fused: the tiled coadd resamples inside its stack tasks (the
    # pieces' sources), the whole one stacks the resampled pieces (sources dropped)
    from dataclasses import replace

    whole = SkyGrid(grid.ra_deg, grid.dec_deg, grid.pixel_scale_arcsec, grid.shape,
                    tile_px=max(grid.shape))  # fmt: skip
    pieces = [replace(p, source=None) for c in calibrated for p in resample_exposure(c, whole)]
    a, b = _coadd(calibrated, grid).compute(), stack(pieces, whole).compute()
    assert grid.n_tiles[0] > 2
    assert whole.n_tiles == (1, 1)
    for name in ("image", "variance", "weight", "count", "rejected", "mask"):
        assert_same(a[name].values, b[name].values)


def test_fused_resample_and_stack_holds_no_resampled_tile(
    calibrated: list[xr.Dataset], grid: SkyGrid
) -> None:
    # with the pieces' sources, each tile is resampled and stacked strip by strip in its
    # stack task (no resampled tile is ever held); without them, stacked from the pieces
    from dataclasses import replace

    pieces = [p for cal in calibrated for p in resample_exposure(cal, grid)]
    fused = stack(pieces, grid, method="clipped-mean")
    graph = fused.image.data.__dask_graph__()
    names = {str(k[0]) for k in graph}  # type: ignore[index]
    assert not any(n.startswith("resample-") for n in names)
    tasks = [t for k, t in graph.items() if str(k[0]).startswith("stack-t")]  # type: ignore[index]
    assert len(tasks) == grid.n_tiles[0] * grid.n_tiles[1]
    # a task carries its pieces' options, not their lazy planes (it goes to workers)
    for task in tasks:
        fn = task[0]
        assert fn.keywords["sources"]
        assert not any(is_dask_collection(v) for o in fn.keywords["sources"] for v in o.values())
        assert pickle.loads(pickle.dumps(fn)).keywords["groups"] == fn.keywords["groups"]
    plain = stack([replace(p, source=None) for p in pieces], grid, method="clipped-mean")
    assert any(str(k[0]).startswith("resample-") for k in plain.image.data.__dask_graph__())  # type: ignore[index]
    # the two give the same coadd bit for bit: test_stack_tiled_equals_whole


def test_stack_rejects_bad_input(calibrated: list[xr.Dataset], grid: SkyGrid) -> None:
    with pytest.raises(ParameterError, match="nothing to stack"):
        stack([], grid)
    pieces = resample_exposure(calibrated[0], grid)
    other = [type(p)(p.exposure, p.detector, p.tile, p.pixels, "adu", p.frame_weight)
             for p in resample_exposure(calibrated[1], grid)]  # fmt: skip
    with pytest.raises(ParameterError, match="different image units"):
        stack(pieces + other, grid)
    with pytest.raises(ParameterError, match="method must be one of"):
        stack(pieces, grid, method="average")
    small = SkyGrid(grid.ra_deg, grid.dec_deg, grid.pixel_scale_arcsec, grid.shape, tile_px=64)
    with pytest.raises(ParameterError, match="another grid"):
        stack(pieces, small)


def _truth(survey: Survey, grid: SkyGrid) -> Table:
    """Every source once, with its grid pixel position."""
    tabs = [Table.read(survey.raw(k, ".truth.ecsv")) for k in range(len(survey.pointings))]
    t = vstack(tabs, metadata_conflicts="silent")
    _, first = np.unique(t["id"], return_index=True)
    t = t[np.sort(first)]
    t["frames"] = [[k for k, tk in enumerate(tabs) if i in set(tk["id"])] for i in t["id"]]
    t["n_frames"] = [len(f) for f in t["frames"]]
    x, y = grid.wcs.world_to_pixel_values(t["ra"], t["dec"])
    t["gx"], t["gy"] = x, y
    return t


def _isolated_bright(t: Table, co: xr.Dataset, r_ap: float, r_out: float) -> list[int]:
    """Stars with no neighbour or flagged pixel within ``r_out``, and every frame that
    holds the star kept over the whole aperture (so the aperture correction is theirs)."""
    ny, nx = co.image.shape
    out = []
    for k in np.flatnonzero(t["kind"] == "star"):
        x, y, f = t["gx"][k], t["gy"][k], t["flux_e"][k]
        if not (r_out + 2 < x < nx - r_out - 3 and r_out + 2 < y < ny - r_out - 3):
            continue
        d = np.hypot(t["gx"] - x, t["gy"] - y)
        if np.any((d > 0) & (d < r_out + 5) & (t["flux_e"] > 2e-3 * f)):
            continue
        box = (slice(int(y - r_out), int(y + r_out) + 2), slice(int(x - r_out), int(x + r_out) + 2))
        core = (slice(int(y - r_ap), int(y + r_ap) + 2), slice(int(x - r_ap), int(x + r_ap) + 2))
        if np.any(co["count"].values[core] != t["n_frames"][k]):
            continue
        if np.any(co.mask.values[box]):
            continue
        out.append(int(k))
    return out


@pytest.fixture(scope="module")
def bright(bright_calibrated: list[xr.Dataset]) -> tuple[SkyGrid, xr.Dataset]:
    fps = [f for cal in bright_calibrated for f in detector_footprints(cal)]
    g = SkyGrid.covering(fps, pixel_scale_arcsec=INST.pixel_scale_arcsec, tile_px=TILE_PX)
    return g, _coadd(bright_calibrated, g).compute()


@pytest.mark.parametrize("method", ["clipped-mean", "median"])
def test_coadd_photometry_and_astrometry_match_the_truth(
    bright_survey: Survey,
    bright: tuple[SkyGrid, xr.Dataset],
    bright_calibrated: list[xr.Dataset],
    method: str,
) -> None:
    survey, (grid, coadd) = bright_survey, bright
    if method != "clipped-mean":
        coadd = _coadd(bright_calibrated, grid, method=method).compute()
    t = _truth(survey, grid)
    fwhms = [p.seeing_arcsec / grid.pixel_scale_arcsec for p in survey.pointings]
    fwhm = float(np.mean(fwhms))
    r, r1, r2 = 3 * fwhm, 4.5 * fwhm, 6 * fwhm
    # aperture correction: the mean of the star's frames' Moffat encircled energies (equal
    # weights: the frames' sky variances differ by ~10 %), less the annulus' share of light
    ee = [moffat_enclosed(np.array([r, r1, r2]), f, INST.psf_beta) for f in fwhms]
    corrs = [e[0] - (e[2] - e[1]) * r**2 / (r2**2 - r1**2) for e in ee]
    img = np.ascontiguousarray(coadd.image.values, dtype=float)
    err = np.sqrt(np.ascontiguousarray(coadd.variance.values, dtype=float))
    ratios, pulls, dra, clipped = [], [], [], []
    yy, xx = np.mgrid[: grid.shape[0], : grid.shape[1]]
    for k in _isolated_bright(t, coadd, r, r2):
        x, y = float(t["gx"][k]), float(t["gy"][k])
        near = (slice(int(y - r), int(y + r) + 2), slice(int(x - r), int(x + r) + 2))
        inside = (yy[near] - y) ** 2 + (xx[near] - x) ** 2 <= r**2
        clipped.append(float(np.mean(coadd.rejected.values[near][inside] > 0)))
        flux, ferr, _ = sep.sum_circle(img, [x], [y], r, err=err, bkgann=(r1, r2))
        expected = float(t["flux_e"][k]) * float(np.mean([corrs[j] for j in t["frames"][k]]))
        if expected / ferr[0] < 20:
            continue
        ratios.append(flux[0] / expected)
        pulls.append((flux[0] - expected) / ferr[0])
        if expected / ferr[0] > 50:
            cx, cy, _ = sep.winpos(img, [x], [y], [fwhm / 2.3548])
            dra.append((cx[0] - x, cy[0] - y))
    assert len(ratios) >= 15, "too few isolated bright stars"
    ratio, off = float(np.median(ratios)), np.array(dra) * grid.pixel_scale_arcsec
    rms = float(np.sqrt(np.mean(np.sum(off**2, axis=1))))
    print(f"{method}: {len(ratios)} stars: median flux ratio {ratio:.4f}, pulls mean "
          f"{np.mean(pulls):.2f} std {np.std(pulls):.2f}; {len(off)} centroids: rms "
          f"{rms:.4f} arcsec, mean offset {off.mean(axis=0).round(4)} arcsec; "
          f"aperture pixels with a frame clipped {np.mean(clipped):.4f}")  # fmt: skip
    assert ratio == pytest.approx(1.0, abs=0.01)
    assert rms < 0.02
    assert np.mean(clipped) < 0.01  # the clip keeps the stars' frames


def _source_free(t: Table, shape: tuple[int, int], fwhm: float) -> np.ndarray:
    free = np.ones(shape, dtype=bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for row in t:
        rad = 3 * fwhm * (1 + max(0.0, math.log10(max(row["flux_e"], 1.0) / 1e3)))
        rad *= 2 if row["kind"] == "galaxy" else 1
        y0, x0, n = int(row["gy"]), int(row["gx"]), int(rad) + 1
        sl = (slice(max(y0 - n, 0), max(y0 + n + 1, 0)), slice(max(x0 - n, 0), max(x0 + n + 1, 0)))
        free[sl] &= (yy[sl] - row["gy"]) ** 2 + (xx[sl] - row["gx"]) ** 2 > rad**2
    return free


def _bilinear_chi2(f: float, b: int) -> float:
    """Variance of a b-pixel sum of a bilinear shift by ``f``, over what ``Σ w v`` says."""
    return (b - 1 + (1 - f) ** 2 + f**2) / b


def test_coadd_noise_matches_its_variance(
    survey: Survey, calibrated: list[xr.Dataset], grid: SkyGrid, coadd: xr.Dataset
) -> None:
    """χ² in source-free sky, against its expectation under bilinear resampling.

    The propagated variance (``J² Σ w v``) is right for sums over large areas but ignores
    the covariance of neighbouring pixels: a frame shifted by a sub-pixel ``f`` has, for a
    sum of ``b`` pixels per axis, a true variance ``(b − 1 + (1 − f)² + f²) / b`` times the
    propagated one (per axis; b = 1 is a single pixel). The dithers are translations, so
    ``f`` is one number per frame and axis; the coadd's expectation is the frames' mean
    weighted by their frame weights. χ² over that expectation must be 1 within 10 %, for
    single pixels and for 4 × 4 block sums.
    """
    t = _truth(survey, grid)
    fwhm = max(p.seeing_arcsec for p in survey.pointings) / grid.pixel_scale_arcsec
    good = _source_free(t, grid.shape, fwhm) & (coadd["count"].values == 3)
    good &= coadd.mask.values == 0
    cy, cx = (n // 2 for n in grid.shape)
    ra, dec = grid.wcs.pixel_to_world_values(cx, cy)
    fracs, weights = [], []
    for cal in calibrated:
        w = WCS(fits.Header.fromstring(str(cal.header.values[0]), sep="\n"), naxis=2)
        x, y = (float(v) for v in w.world_to_pixel_values(ra, dec))
        fracs.append((x % 1.0, y % 1.0))
        weights.append(float(resample_exposure(cal, grid)[0].frame_weight.compute()[0, 0]))
    for b in (1, 4):
        expect = np.average(
            [_bilinear_chi2(fx, b) * _bilinear_chi2(fy, b) for fx, fy in fracs], weights=weights
        )
        ny, nx = (n // b * b for n in grid.shape)

        def blocks(a: np.ndarray, b: int = b, ny: int = ny, nx: int = nx) -> np.ndarray:
            return a[:ny, :nx].reshape(ny // b, b, nx // b, b).sum(axis=(1, 3))

        full = blocks(good.astype(int)) == b * b
        img = blocks(np.where(good, coadd.image.values, 0.0).astype(float))[full]
        var = blocks(np.where(good, coadd.variance.values, 0.0).astype(float))[full]
        z = img / np.sqrt(var)
        chi2 = float(np.mean(z[np.abs(z) < 5] ** 2))
        print(f"{b} x {b}: {full.sum()} sums, chi2 {chi2:.3f}, expected {expect:.3f}, "
              f"ratio {chi2 / expect:.3f}")  # fmt: skip
        assert full.sum() > 1000
        assert chi2 / expect == pytest.approx(1.0, abs=0.1)


def test_a_cosmic_ray_in_one_frame_is_rejected(
    calibrated: list[xr.Dataset], grid: SkyGrid, coadd: xr.Dataset
) -> None:
    hit = calibrated[1].copy(deep=True)
    hit["image"] = hit.image.copy(data=hit.image.data.copy())
    y, x = 130, 120  # on detector 0, away from edges; unflagged
    img = hit.image.values.copy()
    img[0, y : y + 2, x : x + 3] += 3000.0
    hit["image"] = hit.image.copy(data=img)
    assert not (hit.mask.values[0, y : y + 2, x : x + 3] & MaskBit.CR).any()
    w = WCS(fits.Header.fromstring(str(hit.header.values[0]), sep="\n"), naxis=2)
    gx, gy = (
        round(float(v)) for v in grid.wcs.world_to_pixel_values(*w.pixel_to_world_values(x + 1, y))
    )
    box = (slice(gy - 3, gy + 4), slice(gx - 4, gx + 5))
    cals = [calibrated[0], hit, calibrated[2]]
    clipped = _coadd(cals, grid)[["image", "rejected"]].isel(y=box[0], x=box[1]).compute()
    plain = _coadd(cals, grid, sigma=1e9)["image"].isel(y=box[0], x=box[1]).compute()
    ref = coadd.image.values[box]
    assert plain.values.max() - ref.max() > 500  # without clipping, it shows
    assert clipped.rejected.values.max() >= 1
    np.testing.assert_allclose(
        clipped.image.values, ref, atol=5 * np.sqrt(coadd.variance.values[box].max())
    )


def test_write_coadd_fits(coadd: xr.Dataset, grid: SkyGrid, tmp_path: Path) -> None:
    path = write_coadd_fits(coadd, tmp_path / "coadd.fits")
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "VARIANCE", "WEIGHT", "MASK", "COUNT"]
        np.testing.assert_array_equal(hdul[0].data, coadd.image.values)
        np.testing.assert_array_equal(hdul["COUNT"].data, coadd["count"].values)
        assert hdul[0].header["BUNIT"] == "electron"
        w = WCS(hdul[0].header)
        ra, dec = w.pixel_to_world_values(10.0, 20.0)
        np.testing.assert_allclose(grid.wcs.pixel_to_world_values(10.0, 20.0), (ra, dec))
    with pytest.raises(OutputError, match="overwrite=True"):
        write_coadd_fits(coadd, path)


def test_streamed_coadd_fits_is_the_file_astropy_writes(
    coadd: xr.Dataset, grid: SkyGrid, tmp_path: Path
) -> None:
    # write_coadd_fits lays the file out from the headers and writes every tile into its
    # place; the bytes must be those of astropy writing the computed planes in one go
    extra = fits.Header()
    extra["PIXSCALE"] = (0.26, "arcsec per pixel")
    extra.add_history("lazysky coadd input: a.fits")
    path = write_coadd_fits(coadd, tmp_path / "streamed.fits", header=extra)
    done = coadd.compute()
    header = grid.wcs.to_header()
    primary = fits.PrimaryHDU(done.image.values, header=header)
    primary.header["BUNIT"] = (str(coadd.attrs["units"]), "per grid pixel, one frame")
    primary.header["NCOMBINE"] = (len(coadd.attrs["inputs"]), "exposures stacked")
    primary.header["COMBINET"] = (coadd.attrs["steps"][-1]["method"], "combine method")
    primary.header["PIXSCALE"] = (0.26, "arcsec per pixel")
    primary.header.add_history("lazysky coadd input: a.fits")
    hdus = [primary] + [fits.ImageHDU(done[n].values, header=header, name=n.upper())
                        for n in ("variance", "weight", "mask", "count")]  # fmt: skip
    fits.HDUList(hdus).writeto(tmp_path / "astropy.fits")
    assert path.read_bytes() == (tmp_path / "astropy.fits").read_bytes()
    assert int(done["count"].max()) > 1  # a real coadd, several exposures deep
    assert bool((done["mask"] > 0).any())  # the unsigned planes carry values to offset


def _assert_coadds_agree(a: Any, b: Any) -> None:
    """The compiled kernels vs the numpy reference: floats to float32 rounding, ints exact."""
    for name in ("image", "variance", "weight"):
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-6, atol=0)
    for name in ("count", "rejected", "mask"):
        assert_same(np.asarray(a[name]), np.asarray(b[name]))


def test_compiled_coadd_equals_the_numpy_reference(
    calibrated: list[xr.Dataset], grid: SkyGrid, coadd: xr.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lazysky.pipeline import _coadd_jit

    assert _coadd_jit.AVAILABLE  # numba is a dependency: the fixture's coadd is compiled
    assert int(coadd["rejected"].values.sum()) > 0  # clipping happened somewhere
    monkeypatch.setattr(_coadd_jit, "AVAILABLE", False)
    reference = _coadd(calibrated, grid).compute()
    _assert_coadds_agree(coadd, reference)


def test_compiled_stack_kernel_equals_the_numpy_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # the cases the fixture's coadd may not reach: > 3 layers (sorted median), merged
    # detectors, NaN / infinite / zero variances, masked layers, pixel weights
    from lazysky.pipeline import _coadd_jit

    rng = np.random.default_rng(5)
    n, shape = 6, (40, 50)
    img = rng.normal(0.0, 1.0, (n, *shape)).astype(np.float32)
    img[rng.random(img.shape) < 0.02] += 200.0  # cosmic rays
    var = rng.uniform(0.5, 2.0, img.shape).astype(np.float32)
    var[rng.random(img.shape) < 0.03] = np.inf
    var[rng.random(img.shape) < 0.01] = np.nan
    var[rng.random(img.shape) < 0.01] = 0.0
    msk = np.where(rng.random(img.shape) < 0.05, MaskBit.SAT, 0).astype(np.uint16)
    msk[rng.random(img.shape) < 0.02] |= np.uint16(MaskBit.NODATA)
    cases: list[dict[str, Any]] = [
        {"weighting": "pixel"},
        {"frame_weights": [1.0, 0.5, 2.0, 1.0, 0.7, 1.3]},
        {"groups": [0, 0, 1, 2, 2, 3], "frame_weights": [1.0, 1.0, 0.5, 2.0, 2.0, 0.8]},
        {"weighting": "pixel", "groups": [0, 1, 1, 2, 3, 3], "max_iters": 1, "sigma": 2.0},
    ]
    for k in (2, 3, 6):  # two layers (the pair rule), three (no sort), six (sorted)
        for case in cases:
            if "groups" in case and k < n:
                continue
            if "frame_weights" in case:
                case = {**case, "frame_weights": case["frame_weights"][:k]}
            args = (img[:k], var[:k], msk[:k])
            compiled = stack_pixels(*args, **case)
            monkeypatch.setattr(_coadd_jit, "AVAILABLE", False)
            reference = stack_pixels(*args, **case)
            monkeypatch.setattr(_coadd_jit, "AVAILABLE", True)
            _assert_coadds_agree(compiled, reference)
            assert compiled["rejected"].sum() > 0

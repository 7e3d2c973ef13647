"""PSF estimation: the fitted Moffat against injected stars, fallbacks, laziness, errors."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import INST, TILE, Survey, raise_if_dask_computes

from lazysky.errors import ParameterError
from lazysky.pipeline import MaskBit, SkyGrid, detector_footprints, resample_exposure, stack
from lazysky.pipeline.psf import (
    PsfFallbackWarning,
    _moffat,
    estimate_psf,
    moffat_stamp,
    psf_per_tile,
)


def _field(
    shape: tuple[int, int], fwhm: float, beta: float, n: int, seed: int, sky_sigma: float = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stars of 3,000–30,000 e⁻ at random sub-pixel positions (pixel-integrated Moffats),
    Poisson noise on them, Gaussian sky noise; returns image, variance, true positions."""
    rng = np.random.default_rng(seed)
    img = np.zeros(shape)
    pos = []
    for _ in range(n):
        y, x = rng.uniform(14, shape[0] - 14), rng.uniform(14, shape[1] - 14)
        iy, ix = round(y), round(x)
        img[iy - 12 : iy + 13, ix - 12 : ix + 13] += 10 ** rng.uniform(3.5, 4.5) * _moffat(
            25, fwhm, beta, x - ix, y - iy
        )
        pos.append((x, y))
    var = img + sky_sigma**2
    return img + rng.normal(0, 1, shape) * np.sqrt(var), var, np.array(pos)


@pytest.mark.parametrize(("fwhm", "beta"), [(2.6, 3.0), (4.0, 2.5), (3.0, 6.0)])
def test_estimate_psf_recovers_the_injected_moffat(fwhm: float, beta: float) -> None:
    img, var, _ = _field((240, 240), fwhm, beta, 14, seed=int(fwhm * 10 + beta))
    p = estimate_psf(img, var, np.zeros(img.shape, np.uint16))
    truth = moffat_stamp(fwhm, beta, 25)
    print(f"fwhm {p.fwhm_px:.3f} (true {fwhm}), beta {p.beta:.2f} (true {beta}), n {p.n_stars}")
    assert p.n_stars >= 3
    assert not p.fallback
    assert p.fwhm_px == pytest.approx(fwhm, rel=0.03)
    assert p.stamp.shape == (25, 25)
    assert p.stamp.sum() == pytest.approx(1.0)
    assert np.unravel_index(p.stamp.argmax(), p.stamp.shape) == (12, 12)
    # the stamp itself (β and FWHM trade off; the profile is what matters): less than 5 %
    # of the light misplaced (L1 distance)
    assert np.abs(p.stamp - truth).sum() < 0.05
    # the stars' fluxes are the injected ones within their errors (pulls)
    assert p.stars.shape == (p.n_stars, 4)


def test_star_fluxes_and_positions_match_the_truth() -> None:
    img, var, pos = _field((200, 200), 3.0, 3.0, 10, seed=5)
    p = estimate_psf(img, var, np.zeros(img.shape, np.uint16))
    d = np.hypot(pos[:, None, 0] - p.stars[None, :, 0], pos[:, None, 1] - p.stars[None, :, 1])
    assert np.all(d.min(axis=0) < 0.1)  # every star used is an injected one, to 0.1 px


def test_masked_and_saturated_stars_are_not_used() -> None:
    img, var, _ = _field((200, 200), 3.0, 3.0, 10, seed=5)
    mask = np.zeros(img.shape, np.uint16)
    clean = estimate_psf(img, var, mask)
    x, y = clean.stars[0, :2]
    mask[round(y), round(x)] = MaskBit.SAT
    p = estimate_psf(img, var, mask)
    assert p.n_stars == clean.n_stars - 1
    assert np.min(np.hypot(p.stars[:, 0] - x, p.stars[:, 1] - y)) > 5


def test_too_few_stars_fall_back_with_a_warning() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (80, 80))
    with pytest.warns(PsfFallbackWarning, match="no star"):
        p = estimate_psf(img, np.ones_like(img), np.zeros(img.shape, np.uint16),
                         fallback_fwhm_px=2.2)  # fmt: skip
    assert p.fallback
    assert p.n_stars == 0
    assert p.fwhm_px == 2.2
    assert p.stamp.sum() == pytest.approx(1.0)


def test_estimate_psf_rejects_bad_input() -> None:
    a = np.zeros((30, 30))
    m = a.astype(np.uint16)
    with pytest.raises(ParameterError, match="odd integer"):
        estimate_psf(a, a + 1, m, size_px=24)
    with pytest.raises(ParameterError, match="one shape"):
        estimate_psf(a, np.ones((30, 31)), m)
    with pytest.raises(ParameterError, match="min_stars"):
        estimate_psf(a, a + 1, m, min_stars=0)
    with pytest.raises(ParameterError, match="fwhm_px > 0"):
        moffat_stamp(-1.0, 3.0, 11)


def _grid_dataset(img: np.ndarray, var: np.ndarray, tile: int) -> xr.Dataset:
    grid = SkyGrid(150.0, 2.0, 0.5, img.shape, tile_px=tile)
    planes = {"image": img.astype(np.float32), "variance": var.astype(np.float32),
              "mask": np.zeros(img.shape, np.uint16)}  # fmt: skip
    return xr.Dataset(
        {k: (("y", "x"), da.from_array(v, chunks=grid.chunks)) for k, v in planes.items()},
        attrs={"grid": grid.to_dict(), "units": "electron"},
    )


def test_psf_per_tile_is_lazy_and_fills_starless_tiles() -> None:
    img, var, _ = _field((192, 192), 3.0, 3.0, 24, seed=8)
    # no star in the last column of tiles nor in its halo (one stamp, 25 px)
    img[:, 100:] = np.random.default_rng(1).normal(0, 3.0, (192, 92))
    var[:, 100:] = 9.0
    ds = _grid_dataset(img, var, 64)
    with raise_if_dask_computes():
        psfs = psf_per_tile(ds)
    names = {str(k) for k in psfs.psf.data.dask.layers}
    assert any(n.startswith("psf-t001_002-") for n in names)
    assert psfs.psf.shape == (3, 3, 25, 25)
    with pytest.warns(PsfFallbackWarning, match="tile t00"):
        done = psfs.compute()
    fwhm = done.psf_fwhm.values
    assert np.all(np.abs(fwhm - 3.0) < 0.15), fwhm
    assert done.psf_fallback.values[:, 2].all()
    assert (done.psf_n_stars.values[:, 2] == 0).all()
    np.testing.assert_allclose(done.psf.values.sum(axis=(2, 3)), 1.0)
    stars = done.stars.values.reshape(-1, 4)
    stars = stars[np.isfinite(stars[:, 0])]
    assert len(stars) >= 6
    assert stars[:, 0].max() < 100  # none in the starless part
    # each star is listed once, by the tile that holds its centre
    xy = np.round(stars[:, :2], 3)
    assert len(np.unique(xy, axis=0)) == len(xy)


def test_psf_per_tile_rejects_a_dataset_without_grid() -> None:
    z = np.zeros((4, 4))
    ds = xr.Dataset({k: (("y", "x"), z) for k in ("image", "variance", "mask")})
    with pytest.raises(ParameterError, match="no 'grid' attribute"):
        psf_per_tile(ds)
    with pytest.raises(ParameterError, match=r"missing \['variance', 'mask'\]"):
        psf_per_tile(ds[["image"]])
    ds.attrs["grid"] = SkyGrid(150.0, 2.0, 0.5, (5, 4)).to_dict()
    with pytest.raises(ParameterError, match="grid's shape"):
        psf_per_tile(ds)


def test_psf_of_a_simulated_coadd_matches_the_seeing(
    survey: Survey, calibrated: list[xr.Dataset]
) -> None:
    fps = [f for cal in calibrated for f in detector_footprints(cal)]
    grid = SkyGrid.covering(fps, pixel_scale_arcsec=INST.pixel_scale_arcsec, tile_px=4 * TILE)
    coadd = stack([p for c in calibrated for p in resample_exposure(c, grid)], grid)
    with warnings.catch_warnings():
        # edge tiles with fewer stars fall back (and say so); only tiles with their own
        # stars are compared with the seeing below
        warnings.simplefilter("ignore", PsfFallbackWarning)
        psfs = psf_per_tile(coadd, min_stars=3).compute()
    fwhm = psfs.psf_fwhm.values[psfs.psf_n_stars.values >= 3]
    seeing = np.mean([p.seeing_arcsec for p in survey.pointings]) / INST.pixel_scale_arcsec
    print(f"coadd PSF FWHM per tile {np.round(fwhm, 2)} px; frames' mean seeing {seeing:.2f} px")
    assert len(fwhm) >= 2
    # the coadd of Moffats of slightly different widths, bilinearly resampled (which
    # broadens a little): within 10 % of the frames' mean seeing
    assert np.median(fwhm) == pytest.approx(seeing, rel=0.1)


@pytest.mark.parametrize(
    "name", ["lazysky.pipeline.psf", "lazysky.pipeline._zogy", "lazysky.pipeline.difference"]
)
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(("size", "fwhm", "beta", "dx", "dy"),
                         [(11, 2.7, 3.1, 0.3, -0.4), (25, 4.0, 2.0, -1.2, 0.7),
                          (11, 1.2, 8.0, 0.0, 0.0)])
def test_moffat_derivatives_match_finite_differences(size: int, fwhm: float, beta: float,
                                                     dx: float, dy: float) -> None:
    """The fits' analytic Jacobian (dx, dy, FWHM, β) against central differences."""
    from lazysky.pipeline.psf import _moffat, _moffat_jac

    m, d = _moffat_jac(size, fwhm, beta, dx, dy)
    np.testing.assert_allclose(m, _moffat(size, fwhm, beta, dx, dy), rtol=1e-12)
    p = np.array([dx, dy, fwhm, beta])
    for i in range(4):
        h = 1e-6 * max(abs(p[i]), 1.0)
        up, down = p.copy(), p.copy()
        up[i] += h
        down[i] -= h
        num = (_moffat(size, up[2], up[3], up[0], up[1])
               - _moffat(size, down[2], down[3], down[0], down[1])) / (2 * h)
        assert np.max(np.abs(num - d[i])) < 1e-7 * np.max(np.abs(num)), i

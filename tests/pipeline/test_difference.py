"""ZOGY difference imaging on synthetic images: normalisation, noise, completeness vs the
Gaussian ideal, false positives on noise, tiling, laziness, errors.

Synthetic pairs are honest here: the truth (PSFs, fluxes, noise) is known exactly, and the
statistics need thousands of injected sources, which a simulated survey cannot give in a
fast test (tests/pipeline/test_difference_survey.py runs the simulator end to end).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import raise_if_dask_computes
from scipy import ndimage
from scipy.stats import norm

from lazysky.errors import ParameterError
from lazysky.pipeline import MaskBit, SkyGrid
from lazysky.pipeline.difference import (
    FluxRatioWarning,
    difference,
    fit_flux_ratio,
    noise_correlation,
    zogy_pixels,
)
from lazysky.pipeline.psf import _moffat, moffat_stamp

P_NEW = moffat_stamp(2.6, 3.0, 25)  # science: better seeing
P_REF = moffat_stamp(3.3, 2.5, 25)  # reference: worse seeing, a different β
SIG_NEW, SIG_REF, RATIO = 4.0, 2.0, 1.7  # noise σ per image, F_r / F_n


def _add(img: np.ndarray, stamp: np.ndarray, y: int, x: int, flux: float) -> None:
    """Add ``flux * stamp`` centred on ``(y, x)``; the part beyond the image is lost."""
    h = len(stamp) // 2
    y0, x0 = max(y - h, 0), max(x - h, 0)
    y1, x1 = min(y + h + 1, img.shape[0]), min(x + h + 1, img.shape[1])
    img[y0:y1, x0:x1] += flux * stamp[y0 - (y - h) : y1 - (y - h), x0 - (x - h) : x1 - (x - h)]


def peaks(score: np.ndarray, threshold: float) -> np.ndarray:
    """Local maxima of ``|score|`` at or above ``threshold`` (3x3 neighbourhood): ``(n, 2)``
    ``(y, x)``. The simple detector of these tests."""
    a = np.abs(score)
    m = (ndimage.maximum_filter(a, size=3) == a) & (a >= threshold)
    return np.argwhere(m)


def test_kernel_normalisation_noiseless() -> None:
    """A transient's flux in D equals its flux in the science image; a star in both (with
    the right flux ratio) vanishes; P_D sums to 1."""
    z = np.zeros((128, 128))
    new, ref = z.copy(), z.copy()
    _add(new, P_NEW, 40, 50, 1000.0)  # transient
    _add(new, P_NEW, 90, 80, 5000.0)  # star
    _add(ref, P_REF, 90, 80, 5000.0 * RATIO)
    r = zogy_pixels(new, ref, z + SIG_NEW**2, z + SIG_REF**2, P_NEW, P_REF, flux_ratio=RATIO)
    assert r.image[20:60, 30:70].sum() == pytest.approx(1000.0, rel=1e-4)
    assert np.abs(r.image[70:110, 60:100]).max() < 1e-8 * 5000.0
    assert r.psf.sum() == pytest.approx(1.0, abs=0.01)
    assert np.unravel_index(r.psf.argmax(), r.psf.shape) == (12, 12)
    assert r.score[40, 50] == r.score.max()
    # a source only in the reference is negative
    ref2 = z.copy()
    _add(ref2, P_REF, 40, 50, 1000.0)
    r2 = zogy_pixels(z, ref2, z + SIG_NEW**2, z + SIG_REF**2, P_NEW, P_REF, flux_ratio=RATIO)
    assert r2.score[40, 50] == r2.score.min() < 0
    assert r2.image[20:60, 30:70].sum() == pytest.approx(-1000.0 / RATIO, rel=1e-4)


def _noise_pair(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, SIG_NEW, shape), rng.normal(0, SIG_REF, shape)


def test_score_has_unit_variance_and_d_matches_its_predicted_variance() -> None:
    """On sky with stars (their Poisson noise in the variance planes), in source-free
    regions: std(S_corr) = 1.00 ± 0.05 and var(D) / predicted = 1 within 5 %."""
    shape = (512, 512)
    n, r = _noise_pair(shape, 1)
    vn, vr = np.full(shape, SIG_NEW**2), np.full(shape, SIG_REF**2)
    rng = np.random.default_rng(2)
    stars = rng.uniform(20, 492, (40, 2)).astype(int)
    for y, x in stars:
        f = 10 ** rng.uniform(3.5, 5)
        mn, mr = f * P_NEW, f * RATIO * P_REF
        sl = (slice(y - 12, y + 13), slice(x - 12, x + 13))
        n[sl] += mn + rng.normal(0, 1, mn.shape) * np.sqrt(mn)
        r[sl] += mr + rng.normal(0, 1, mr.shape) * np.sqrt(mr)
        vn[sl] += mn
        vr[sl] += mr
    res = zogy_pixels(n, r, vn, vr, P_NEW, P_REF, flux_ratio=RATIO)
    free = np.ones(shape, bool)
    for y, x in stars:
        free[max(y - 20, 0) : y + 21, max(x - 20, 0) : x + 21] = False
    s = res.score[free]
    chi = res.image[free] / np.sqrt(res.variance[free])
    print(f"source-free pixels {free.sum()}: std(S_corr) {s.std():.4f}, std(D/sqrt(V)) "
          f"{chi.std():.4f}; max |S_corr| {np.abs(res.score).max():.2f}")  # fmt: skip
    assert s.std() == pytest.approx(1.0, abs=0.05)
    assert chi.var() == pytest.approx(1.0, abs=0.05)
    # with the source noise in the denominator the stars leave no 5σ residual
    assert len(peaks(res.score, 5.0)) == 0


def test_noise_only_pairs_have_gaussian_tails() -> None:
    """Noise-only pairs: exceedances of |S_corr| at 3σ and 4σ within 20 % of the Gaussian
    two-sided tail per pixel, and 5σ peaks at most twice the Gaussian expectation (the
    per-pixel tail × pixels, an upper bound on the number of peaks of a smooth field)."""
    shape = (1024, 1024)
    counts = {3.0: 0, 4.0: 0}
    n5, npix = 0, 0
    for seed in (10, 11, 12, 13):
        n, r = _noise_pair(shape, seed)
        res = zogy_pixels(n, r, np.full(shape, SIG_NEW**2), np.full(shape, SIG_REF**2),
                          P_NEW, P_REF, flux_ratio=RATIO)  # fmt: skip
        s = res.score[20:-20, 20:-20]
        npix += s.size
        for t in counts:
            counts[t] += int(np.count_nonzero(np.abs(s) >= t))
        n5 += len(peaks(s, 5.0))
    for t, c in counts.items():
        expect = 2 * norm.sf(t) * npix
        print(f"|S_corr| >= {t}: {c} pixels, Gaussian {expect:.1f}")
        assert c / expect == pytest.approx(1.0, rel=0.2)
    expect5 = 2 * norm.sf(5.0) * npix
    print(f"5σ peaks: {n5} in {npix / 1e6:.1f} Mpix (Gaussian expectation <= {expect5:.2f})")
    assert n5 <= max(2 * expect5, 2)


def test_completeness_follows_the_gaussian_ideal() -> None:
    """PSF-shaped transients of known S/N (their S_corr expectation at the true position),
    centred on pixels, 30 px apart; detected when a 5σ local maximum of |S_corr| lies within
    1.5 px. Completeness per S/N bin within 5 percentage points of Φ(S/N − 5); with 900
    sources per bin the binomial error is ≤ 1.7 points."""
    shape, step, thresh = (1000, 1000), 32, 5.0
    ys, xs = np.meshgrid(np.arange(30, shape[0] - 20, step), np.arange(30, shape[1] - 20, step))
    pos = np.column_stack([ys.ravel(), xs.ravel()])
    vn, vr = np.full(shape, SIG_NEW**2), np.full(shape, SIG_REF**2)
    # S/N per unit flux: the noiseless S_corr at the centre of a unit-flux source
    unit = np.zeros(shape)
    _add(unit, P_NEW, 500, 500, 1.0)
    per_flux = zogy_pixels(unit, np.zeros(shape), vn, vr, P_NEW, P_REF,
                           flux_ratio=RATIO).score[500, 500]  # fmt: skip
    for k, snr in enumerate((4.0, 5.0, 6.0, 7.0, 8.0, 10.0)):
        n, r = _noise_pair(shape, 100 + k)
        for y, x in pos:
            _add(n, P_NEW, y, x, snr / per_flux)
        res = zogy_pixels(n, r, vn, vr, P_NEW, P_REF, flux_ratio=RATIO)
        found = peaks(res.score, thresh)
        d = np.hypot(*(pos[:, None, :] - found[None, :, :]).transpose(2, 0, 1))
        frac = float(np.mean(d.min(axis=1) <= 1.5))
        ideal = float(norm.cdf(snr - thresh))
        err = math.sqrt(max(ideal * (1 - ideal), 1e-4) / len(pos))
        print(f"S/N {snr:4.1f}: {frac:.3f} found, Gaussian ideal {ideal:.3f} ± {err:.3f} "
              f"({len(pos)} sources)")  # fmt: skip
        assert abs(frac - ideal) <= 0.05


def _grid_ds(img: np.ndarray, var: np.ndarray, mask: np.ndarray, tile: int) -> xr.Dataset:
    grid = SkyGrid(150.0, 2.0, 0.5, img.shape, tile_px=tile)
    planes = {"image": img.astype(np.float32), "variance": var.astype(np.float32),
              "mask": mask.astype(np.uint16)}  # fmt: skip
    return xr.Dataset(
        {k: (("y", "x"), da.from_array(v, chunks=grid.chunks)) for k, v in planes.items()},
        attrs={"grid": grid.to_dict(), "units": "electron", "inputs": ["a"]},
    )


def _scene(
    shape: tuple[int, int], tile: int, *, p_new: np.ndarray = P_NEW, p_ref: np.ndarray = P_REF
) -> tuple[xr.Dataset, xr.Dataset, list[tuple]]:
    n, r = _noise_pair(shape, 7)
    vn, vr = np.full(shape, SIG_NEW**2), np.full(shape, SIG_REF**2)
    rng = np.random.default_rng(8)
    for y, x in rng.uniform(15, np.array(shape) - 15, (30, 2)).astype(int):
        f = 10 ** rng.uniform(3.7, 4.5)
        _add(n, p_new, y, x, f)
        _add(r, p_ref, y, x, f * RATIO)
        _add(vn, p_new, y, x, f)
        _add(vr, p_ref, y, x, f * RATIO)
    transients = [(40, 70, 3000.0), (130, 200, 4000.0), (64, 64, 3500.0)]  # one on a corner
    for y, x, f in transients:
        _add(n, p_new, y, x, f)
    mn, mr = np.zeros(shape, np.uint16), np.zeros(shape, np.uint16)
    mr[150:170, 20:40] = MaskBit.NODATA
    vr[150:170, 20:40] = np.inf
    mn[10, 10] = MaskBit.SAT
    return _grid_ds(n, vn, mn, tile), _grid_ds(r, vr, mr, tile), transients


def test_tiled_equals_whole_and_finds_the_transients() -> None:
    shape = (200, 260)
    sci, ref, transients = _scene(shape, 64)
    whole_sci, whole_ref, _ = _scene(shape, 512)
    kw = {"psf_science": P_NEW, "psf_reference": P_REF, "flux_ratio": RATIO}
    a = difference(sci, ref, **kw).compute()
    b = difference(whole_sci, whole_ref, **kw).compute()
    assert a.image.data.shape == shape
    for name in ("image", "score"):
        scale = float(np.nanmax(np.abs(b[name].values[np.isfinite(b[name].values)])))
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=0, atol=1e-5 * scale)
    finite = np.isfinite(b.variance.values)
    np.testing.assert_array_equal(finite, np.isfinite(a.variance.values))
    np.testing.assert_allclose(a.variance.values[finite], b.variance.values[finite], rtol=1e-4)
    np.testing.assert_array_equal(a["mask"].values, b["mask"].values)
    # the mask: inputs' bits, NODATA where the reference has none, EDGE next to it
    assert a["mask"].values[10, 10] & MaskBit.SAT
    assert (a["mask"].values[150:170, 20:40] & MaskBit.NODATA).all()
    assert a["mask"].values[148, 30] & MaskBit.EDGE
    edge = int(MaskBit.NODATA | MaskBit.EDGE)
    found = peaks(np.where(a["mask"].values & edge, 0, a.score.values), 5.0)
    for y, x, f in transients:
        d = np.hypot(found[:, 0] - y, found[:, 1] - x)
        assert d.min() <= 1.0, (y, x)
        assert a.image.values[y - 10 : y + 11, x - 10 : x + 11].sum() == pytest.approx(f, rel=0.1)
    assert len(found) == len(transients)  # no false positive on the 30 stars


def test_difference_estimates_psfs_and_flux_ratio_and_is_lazy() -> None:
    sci, ref, _ = _scene((200, 260), 64)
    with raise_if_dask_computes():
        diff = difference(sci, ref, astrometric_sigma_px="auto")
    names = {str(k) for k in diff.image.data.dask.layers}
    assert any(n.startswith("difference-t001_002-") for n in names)
    assert any(n.startswith("psf-t001_002-") for n in names)
    assert any(n.startswith("fluxratio-") for n in names)
    assert list(diff.data_vars)[:4] == ["image", "variance", "score", "mask"]
    assert diff.image.dims == ("y", "x")
    assert diff.image.data.chunks == SkyGrid(**{**diff.attrs["grid"],
                                                "shape": (200, 260)}).chunks  # fmt: skip
    assert diff.attrs["steps"][0]["method"] == "zogy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64-px tiles: PSF fallbacks to the neighbours
        done = diff.compute()
    print(f"flux ratio {float(done.flux_ratio):.4f} from {int(done.n_flux_stars)} stars, "
          f"PSF FWHM {np.median(done.psf_fwhm_science.values):.3f} / "
          f"{np.median(done.psf_fwhm_reference.values):.3f} px, astrometric σ "
          f"{done.astrometric_sigma_px.values}")  # fmt: skip
    assert float(done.flux_ratio) == pytest.approx(RATIO, rel=0.02)
    assert np.median(done.psf_fwhm_science.values) == pytest.approx(2.6, rel=0.05)
    assert np.median(done.psf_fwhm_reference.values) == pytest.approx(3.3, rel=0.05)
    good = (done["mask"].values & (MaskBit.NODATA | MaskBit.EDGE)) == 0
    assert len(peaks(np.where(good, done.score.values, 0), 5.0)) == 3


def test_astrometric_noise_suppresses_misregistered_stars() -> None:
    """A bright star shifted by 0.3 px between the images: a strong dipole in S, which
    V_ast with σ = 0.3 px brings below 5σ."""
    z = np.zeros((96, 96))
    new, ref = z.copy(), z.copy()
    new[36:61, 36:61] += 2e5 * _moffat(25, 2.6, 3.0, 0.0, 0.0)
    ref[36:61, 36:61] += 2e5 * RATIO * _moffat(25, 3.3, 2.5, 0.3, 0.0)
    vn, vr = z + SIG_NEW**2 + new, z + SIG_REF**2 + ref
    plain = zogy_pixels(new, ref, vn, vr, P_NEW, P_REF, flux_ratio=RATIO)
    ast = zogy_pixels(new, ref, vn, vr, P_NEW, P_REF, flux_ratio=RATIO,
                      astrometric_sigma_px=(0.3, 0.3))  # fmt: skip
    print(f"max |S_corr|: {np.abs(plain.score).max():.1f} without, "
          f"{np.abs(ast.score).max():.1f} with V_ast")  # fmt: skip
    assert np.abs(plain.score).max() > 10
    assert np.abs(ast.score).max() < 5


def test_fit_flux_ratio_warns_without_stars() -> None:
    with pytest.warns(FluxRatioWarning, match="pass flux_ratio="):
        out = fit_flux_ratio(np.full((3, 4), np.nan), np.zeros((0, 4)))
    assert out[0] == 1.0


def test_difference_rejects_bad_input() -> None:
    sci, ref, _ = _scene((200, 260), 64)
    with pytest.raises(ParameterError, match=r"method must be one of \['zogy', 'alard-lupton'\]"):
        difference(sci, ref, method="hotpants")
    other = ref.assign_attrs(grid=SkyGrid(150.0, 2.0, 0.6, (200, 260), 64).to_dict())
    with pytest.raises(ParameterError, match="different grids"):
        difference(sci, other)
    with pytest.raises(ParameterError, match="missing"):
        difference(sci, ref[["image", "mask"]])
    with pytest.raises(ParameterError, match="astrometric_sigma_px"):
        difference(sci, ref, astrometric_sigma_px="measured")
    with pytest.raises(ParameterError, match="astrometric_sigma_px"):
        difference(sci, ref, astrometric_sigma_px=(-1.0, 0.0))
    with pytest.raises(ParameterError, match="flux_ratio"):
        difference(sci, ref, flux_ratio=0.0)
    with pytest.raises(ParameterError, match="odd sides"):
        difference(sci, ref, psf_science=np.ones((4, 4)))
    with pytest.raises(ParameterError, match="halo_px"):
        difference(sci, ref, halo_px=-1)
    z = np.zeros((8, 8))
    with pytest.raises(ParameterError, match="one shape"):
        zogy_pixels(z, np.zeros((8, 9)), z, z, P_NEW[:5, :5], P_NEW[:5, :5])


def test_difference_takes_psf_per_tile_datasets() -> None:
    from lazysky.pipeline.psf import psf_per_tile

    sci, ref, transients = _scene((200, 260), 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse tiles borrow their neighbours' PSF
        psf_n = psf_per_tile(sci).compute()
        diff = difference(sci, ref, psf_science=psf_n, psf_reference=P_REF,
                          flux_ratio=RATIO).compute()  # fmt: skip
    np.testing.assert_allclose(diff.psf_science.values, psf_n.psf.values)
    assert float(diff.flux_ratio) == RATIO
    good = (diff["mask"].values & (MaskBit.NODATA | MaskBit.EDGE)) == 0
    assert len(peaks(np.where(good, diff.score.values, 0), 5.0)) == len(transients)
    wrong = psf_per_tile(_scene((200, 260), 64)[0])
    with pytest.raises(ParameterError, match="psf_per_tile Dataset of this grid"):
        difference(sci, ref, psf_science=wrong)


def _bilinear_noise(shape: tuple[int, int], sigma: float, seed: int) -> np.ndarray:
    """White noise of variance ``sigma²`` resampled bilinearly by a random sub-pixel shift
    per 64-px block (like a coadd of dithered frames): sums over a few pixels keep
    ``sigma²`` per pixel (the variance plane's meaning), single pixels have about half."""
    rng = np.random.default_rng(seed)
    white = rng.normal(0, sigma, (shape[0] + 1, shape[1] + 1))
    out = np.empty(shape)
    for y0 in range(0, shape[0], 64):
        for x0 in range(0, shape[1], 64):
            u, v = rng.uniform(0, 1, 2)
            w = white[y0 : y0 + 65, x0 : x0 + 65]
            blk = ((1 - v) * ((1 - u) * w[:-1, :-1] + u * w[:-1, 1:])
                   + v * ((1 - u) * w[1:, :-1] + u * w[1:, 1:]))  # fmt: skip
            out[y0 : y0 + 64, x0 : x0 + 64] = blk[: shape[0] - y0, : shape[1] - x0]
    return out


def test_correlated_noise_is_measured_and_whitened() -> None:
    """Bilinearly resampled noise (per-pixel variance ~0.44 of the variance plane): with
    the noise correlation measured (the default), var(D) / predicted = 1 within 5 % and
    std(S_corr) = 1.00 ± 0.05; assuming white noise, D's prediction is off by ~2x. The
    measured stamp is the same for any tiling and matches the resampling's exact one."""
    shape = (512, 512)
    n = _bilinear_noise(shape, SIG_NEW, 11)
    r = _bilinear_noise(shape, SIG_REF, 12)
    rng = np.random.default_rng(13)
    stars = rng.uniform(20, 492, (30, 2)).astype(int)
    vn, vr = np.full(shape, SIG_NEW**2), np.full(shape, SIG_REF**2)
    for y, x in stars:  # noiseless stars: they only test the source masking
        f = 10 ** rng.uniform(3.5, 4.5)
        _add(n, P_NEW, y, x, f)
        _add(r, P_REF, y, x, f * RATIO)
    free = np.ones(shape, bool)
    for y, x in stars:
        free[max(y - 20, 0) : y + 21, max(x - 20, 0) : x + 21] = False
    m = np.zeros(shape, np.uint16)
    kw = {"psf_science": P_NEW, "psf_reference": P_REF, "flux_ratio": RATIO}
    a = difference(_grid_ds(n, vn, m, 128), _grid_ds(r, vr, m, 128), **kw)
    with raise_if_dask_computes():
        c_tiled = noise_correlation(_grid_ds(n, vn, m, 128))
    c_whole = noise_correlation(_grid_ds(n, vn, m, 512)).compute()
    np.testing.assert_allclose(c_tiled.compute(), c_whole, rtol=1e-12)
    # exact for a uniform shift u per axis: c(0) = E[(1-u)² + u²] = 2/3, c(±1) = E[u(1-u)]
    # = 1/6, per axis; the product of the two axes' stamps
    exact = np.outer([1 / 6, 2 / 3, 1 / 6], [1 / 6, 2 / 3, 1 / 6])
    np.testing.assert_allclose(c_whole, exact, atol=0.04)
    a = a.compute()
    w = difference(_grid_ds(n, vn, m, 128), _grid_ds(r, vr, m, 128), noise="white",
                   **kw).compute()  # fmt: skip
    for name, res in (("measured", a), ("white", w)):
        chi = res.image.values[free] / np.sqrt(res.variance.values[free])
        print(f"{name}: var(D)/predicted {chi.var():.4f}, std(S_corr) "
              f"{res.score.values[free].std():.4f}")  # fmt: skip
    chi = a.image.values[free] / np.sqrt(a.variance.values[free])
    assert chi.var() == pytest.approx(1.0, abs=0.05)
    assert a.score.values[free].std() == pytest.approx(1.0, abs=0.05)
    chi_w = w.image.values[free] / np.sqrt(w.variance.values[free])
    assert chi_w.var() < 0.7  # the white assumption over-predicts D's per-pixel variance
    np.testing.assert_allclose(a.noise_correlation_science.values, c_tiled.compute())
    assert a.attrs["steps"][0]["noise"] == "measured"


def test_noise_model_bad_input() -> None:
    sci, ref, _ = _scene((200, 260), 64)
    with pytest.raises(ParameterError, match=r"noise must be one of \['measured', 'white'\]"):
        difference(sci, ref, noise="pink")
    z = np.zeros((64, 64))
    with pytest.raises(ParameterError, match="corr_new must be a finite 2-d stamp"):
        zogy_pixels(z, z, z + 1, z + 1, P_NEW, P_NEW, corr_new=np.ones((2, 2)))
    with pytest.raises(ParameterError, match="centre of a correlation stamp"):
        zogy_pixels(z, z, z + 1, z + 1, P_NEW, P_NEW, corr_ref=np.zeros((3, 3)))


def test_difference_psf_is_the_shape_of_a_transient_in_d() -> None:
    """``psf`` (P_D, per tile) is what a transient looks like in ``image``: a noiseless
    transient's cutout equals flux × P_D."""
    shape = (200, 260)
    z = np.zeros(shape)
    n = z.copy()
    _add(n, P_NEW, 100, 130, 5000.0)
    m = np.zeros(shape, np.uint16)
    sci = _grid_ds(n, z + SIG_NEW**2, m, 64)
    ref = _grid_ds(z.copy(), z + SIG_REF**2, m, 64)
    diff = difference(sci, ref, psf_science=P_NEW, psf_reference=P_REF, flux_ratio=RATIO,
                      noise="white")  # fmt: skip
    assert diff.psf.dims == ("tile_y", "tile_x", "v", "u")
    assert diff.psf.shape == (4, 5, 25, 25)
    d = diff.compute()
    p_d = d.psf.values[1, 2]  # the tile of (100, 130) with 64-px tiles
    np.testing.assert_allclose(d.image.values[88:113, 118:143], 5000.0 * p_d,
                               atol=1e-3 * 5000.0 * p_d.max())  # fmt: skip
    np.testing.assert_allclose(d.psf.values, np.broadcast_to(p_d, d.psf.shape))


@pytest.mark.parametrize("sharper", ["science", "reference"])
def test_alard_lupton_matches_the_kernel_and_finds_the_transients(sharper: str) -> None:
    """Alard & Lupton (``method="alard-lupton"``): the kernel fit subtracts the 30 stars
    (no 5σ residual), every transient is found with its flux, whichever image is the
    sharper one (that one is convolved); D's PSF is the other image's; S_corr has unit
    variance on empty sky."""
    shape = (200, 260)
    # seeing differs (FWHM 2.6 and 3.3 px), the profile does not (β = 3): a Gaussian
    # kernel basis matches that to ~0.1 %, not a change of β (ZOGY's test has one); the
    # stars are drawn with their wings (61 px), which a 25-px stamp would cut
    sharp, broad = moffat_stamp(2.6, 3.0, 61), moffat_stamp(3.3, 3.0, 61)
    p_sharp, p_broad = moffat_stamp(2.6, 3.0, 25), moffat_stamp(3.3, 3.0, 25)
    if sharper == "science":
        sci, ref, transients = _scene(shape, 128, p_new=sharp, p_ref=broad)
        kw: dict[str, Any] = {"psf_science": p_sharp, "psf_reference": p_broad}
    else:
        sci, ref, transients = _scene(shape, 128, p_new=broad, p_ref=sharp)
        kw = {"psf_science": p_broad, "psf_reference": p_sharp}
    a = difference(sci, ref, method="alard-lupton", **kw).compute()
    good = (a["mask"].values & (MaskBit.NODATA | MaskBit.EDGE)) == 0
    found = peaks(np.where(good, a.score.values, 0), 5.0)
    assert len(found) == len(transients)
    for y, x, f in transients:
        assert np.hypot(found[:, 0] - y, found[:, 1] - x).min() <= 1.0
        assert a.image.values[y - 10 : y + 11, x - 10 : x + 11].sum() == pytest.approx(f, rel=0.1)
    # D has the PSF of the image that was not convolved: the broader one
    np.testing.assert_allclose(a.psf.values[0, 0], p_broad / p_broad.sum(), atol=1e-12)
    assert a.attrs["steps"][0]["method"] == "alard-lupton"
    sky = np.ones(shape, bool)
    for y, x in np.argwhere(np.abs(sci.image.values) > 3 * SIG_NEW):
        sky[max(y - 15, 0) : y + 16, max(x - 15, 0) : x + 16] = False
    sky &= good
    assert a.score.values[sky].std() == pytest.approx(1.0, abs=0.05)


def test_alard_lupton_on_correlated_noise() -> None:
    """With bilinearly resampled noise, A&L's D matches its predicted variance and S_corr
    has unit variance (the same measured noise correlation as ZOGY)."""
    shape = (384, 384)
    n = _bilinear_noise(shape, SIG_NEW, 21)
    r = _bilinear_noise(shape, SIG_REF, 22)
    rng = np.random.default_rng(23)
    stars = rng.uniform(20, 364, (25, 2)).astype(int)
    vn, vr = np.full(shape, SIG_NEW**2), np.full(shape, SIG_REF**2)
    for y, x in stars:
        f = 10 ** rng.uniform(3.5, 4.5)
        _add(n, P_NEW, y, x, f)
        _add(r, P_REF, y, x, f * RATIO)
    free = np.ones(shape, bool)
    for y, x in stars:
        free[max(y - 20, 0) : y + 21, max(x - 20, 0) : x + 21] = False
    m = np.zeros(shape, np.uint16)
    a = difference(_grid_ds(n, vn, m, 128), _grid_ds(r, vr, m, 128), method="alard-lupton",
                   psf_science=P_NEW, psf_reference=P_REF).compute()  # fmt: skip
    chi = a.image.values[free] / np.sqrt(a.variance.values[free])
    print(f"A&L: var(D)/predicted {chi.var():.4f}, std(S_corr) {a.score.values[free].std():.4f}")
    assert chi.var() == pytest.approx(1.0, abs=0.05)
    assert a.score.values[free].std() == pytest.approx(1.0, abs=0.05)

"""The drawing kernels, on small arrays, against analytic expectations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from lazysky.simulator.render import (
    add_point_sources,
    add_sersic_galaxies,
    bleed_saturation,
    make_cosmic_rays,
    moffat_enclosed,
    moffat_kernel,
)


@pytest.mark.parametrize(("fwhm", "beta"), [(3.0, 3.0), (1.7, 4.5), (1.2, 2.5), (5.0, 3.5)])
def test_point_source_flux_and_centroid(fwhm: float, beta: float) -> None:
    img = np.zeros((81, 81))
    x, y = 40.37, 39.81
    add_point_sources(img, np.array([x]), np.array([y]), np.array([5e4]), fwhm_px=fwhm, beta=beta)
    yy, xx = np.indices(img.shape)
    # The stamp holds the flux inside it (≥ 99.9 %), wherever the profile is sampled.
    assert img.sum() == pytest.approx(5e4, rel=1.2e-3)
    # (the stamp is centred on the nearest pixel, so its ≤ 0.1 % cut wing is not quite
    # symmetric: a few thousandths of a pixel at most)
    assert (img * xx).sum() / img.sum() == pytest.approx(x, abs=5e-3)
    assert (img * yy).sum() / img.sum() == pytest.approx(y, abs=5e-3)
    # Flux inside a radius follows the analytic Moffat encircled energy.
    r = np.hypot(xx - x, yy - y)
    inner = img[r < 3 * fwhm].sum()
    # a pixelised circle is not a circle: compare with its area-equivalent radius
    r_eq = np.sqrt((r < 3 * fwhm).sum() / np.pi)
    assert inner / 5e4 == pytest.approx(float(moffat_enclosed(r_eq, fwhm, beta)), abs=0.01)


def test_point_sources_clip_at_edges_without_error() -> None:
    img = np.zeros((10, 14))
    add_point_sources(
        img,
        np.array([-3.0, 13.2, 100.0]),
        np.array([5.0, 9.4, 5.0]),
        np.array([1e3, 1e3, 1e3]),
        fwhm_px=2.5,
        beta=3.0,
    )
    assert 0 < img.sum() < 1e3  # part of two sources lands, the far one not at all
    assert np.all(img >= 0)


def test_moffat_kernel_normalised_and_symmetric() -> None:
    k = moffat_kernel(2.6, 3.0)
    assert k.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(k, k[::-1, ::-1], rtol=1e-12)
    assert k.shape[0] % 2 == 1
    assert np.unravel_index(k.argmax(), k.shape) == (k.shape[0] // 2, k.shape[1] // 2)


@pytest.mark.parametrize("n", [1.0, 2.5, 4.0])
def test_sersic_half_light_radius(n: float) -> None:
    img = np.zeros((121, 121))
    re = 6.0
    add_sersic_galaxies(
        img,
        np.array([60.0]),
        np.array([60.0]),
        np.array([1e4]),
        r_eff_px=np.array([re]),
        sersic_n=np.array([n]),
        axis_ratio=np.array([1.0]),
        theta_rad=np.array([0.0]),
    )
    assert img.sum() == pytest.approx(1e4)
    yy, xx = np.indices(img.shape)
    r = np.hypot(xx - 60, yy - 60).ravel()
    order = np.argsort(r)
    cum = np.cumsum(img.ravel()[order])
    half = r[order][np.searchsorted(cum, 0.5 * cum[-1])]
    # The profile is truncated at 4 r_eff (n = 4 loses ~15 % beyond), so what is drawn has
    # the half-light radius of the truncated profile, L(<r) = P(2n, b (r/r_e)^(1/n)).
    b = special.gammaincinv(2 * n, 0.5)
    target = 0.5 * special.gammainc(2 * n, b * 4 ** (1 / n))
    r_half = re * (special.gammaincinv(2 * n, target) / b) ** n
    assert half == pytest.approx(r_half, rel=0.1)
    # and the cusp is integrated, not sampled: the central pixel holds its analytic share
    share = special.gammainc(2 * n, b * (1 / np.sqrt(np.pi) / re) ** (1 / n)) / (2 * target)
    assert img[60, 60] / 1e4 == pytest.approx(share, rel=0.08)


def test_sersic_truncation_does_not_depend_on_orientation() -> None:
    kw = {"r_eff_px": np.array([8.0]), "sersic_n": np.array([4.0]), "axis_ratio": np.array([0.3])}
    inside = []
    yy, xx = np.indices((121, 121))
    for theta in (0.0, np.pi / 4):
        img = np.zeros((121, 121))
        one = np.array([60.0])
        add_sersic_galaxies(img, one, one, np.array([1e4]), theta_rad=np.array([theta]), **kw)
        inside.append(img[np.hypot(xx - 60, yy - 60) < 16].sum())
    # the light inside a circle does not depend on the orientation (a diagonal galaxy
    # reaches the stamp's corners: cut by the square stamp, it was normalised differently)
    assert inside[0] == pytest.approx(inside[1], rel=0.005)


def test_sersic_ellipticity_and_orientation() -> None:
    img = np.zeros((81, 81))
    add_sersic_galaxies(
        img,
        np.array([40.0]),
        np.array([40.0]),
        np.array([1e4]),
        r_eff_px=np.array([6.0]),
        sersic_n=np.array([1.0]),
        axis_ratio=np.array([0.4]),
        theta_rad=np.array([np.pi / 2]),
    )
    yy, xx = np.indices(img.shape)
    sxx = (img * (xx - 40) ** 2).sum() / img.sum()
    syy = (img * (yy - 40) ** 2).sum() / img.sum()
    # major axis along y (theta = 90°), second moments in ratio q² = 0.16
    assert sxx / syy == pytest.approx(0.16, rel=0.15)


def _second_moments(img: np.ndarray) -> tuple[float, float]:
    yy, xx = np.indices(img.shape)
    f = img.sum()
    cx, cy = (img * xx).sum() / f, (img * yy).sum() / f
    return float((img * (xx - cx) ** 2).sum() / f), float((img * (yy - cy) ** 2).sum() / f)


def test_galaxy_through_psf_keeps_flux_and_adds_psf_variance() -> None:
    kw = {
        "r_eff_px": np.array([3.0]),
        "sersic_n": np.array([1.0]),
        "axis_ratio": np.array([0.5]),
        "theta_rad": np.array([0.3]),
    }
    bare, seen = np.zeros((96, 96)), np.zeros((96, 96))
    add_sersic_galaxies(bare, np.array([47.0]), np.array([48.0]), np.array([5e3]), **kw)
    add_sersic_galaxies(
        seen,
        np.array([47.0]),
        np.array([48.0]),
        np.array([5e3]),
        psf_fwhm_px=4.0,
        psf_beta=4.0,
        **kw,
    )
    assert seen.sum() == pytest.approx(5e3, rel=1e-6)
    # convolution adds the PSF's second moments to the galaxy's
    gx, gy = _second_moments(bare)
    kx, ky = _second_moments(moffat_kernel(4.0, 4.0))
    sx, sy = _second_moments(seen)
    assert sx == pytest.approx(gx + kx, rel=0.03)
    assert sy == pytest.approx(gy + ky, rel=0.03)


def test_cosmic_rays_stay_inside_and_scale_with_length() -> None:
    rng = np.random.default_rng(3)
    short = make_cosmic_rays(rng, (100, 120), 400, track_mean_px=0.0, electrons_median=2000.0)
    long = make_cosmic_rays(rng, (100, 120), 400, track_mean_px=6.0, electrons_median=2000.0)
    for cr in (short, long):
        assert cr.y.min() >= 0
        assert cr.y.max() < 100
        assert cr.x.min() >= 0
        assert cr.x.max() < 120
        assert np.all(cr.electrons > 0)
    assert short.x.size <= 400  # point hits: one pixel each (some coincide)
    assert long.x.size > 3 * short.x.size  # tracks cross several pixels


def test_bleeding_conserves_charge_and_marks_the_trail() -> None:
    img = np.full((60, 7), 100.0)
    img[28:31, 3] = 4e5
    before = img.sum()
    sat = bleed_saturation(img, 5e4)
    assert img.sum() == pytest.approx(before)
    assert img.max() <= 5e4
    assert sat[:, 3].sum() > 3  # the trail is longer than the star
    assert not sat[:, [0, 1, 2, 4, 5, 6]].any()
    # the excess splits up and down the column
    col = np.flatnonzero(sat[:, 3])
    assert col.min() < 28
    assert col.max() > 30


def test_bleeding_at_the_array_edge_loses_charge_not_shape() -> None:
    img = np.zeros((10, 3))
    img[0, 1] = 1e6
    bleed_saturation(img, 5e4)
    assert img[:, 1].max() == 5e4
    assert np.all(img[:, [0, 2]] == 0)

"""Registration by star matching: recovered transforms against the simulator's truth WCS,
coadds of frames without WCS, and the errors for frames that cannot be registered."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS, FITSFixedWarning
from scipy import ndimage

from lazysky.errors import FitsFormatError, ParameterError
from lazysky.pipeline.fitsio import coadd_files
from lazysky.pipeline.register import (
    RegistrationError,
    find_stars,
    match_stars,
    pseudo_wcs,
    register_frames,
    wcs_on_reference,
)

THETA_DEG = 7.0


def _wcs(cal: xr.Dataset, i: int = 0) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.Header.fromstring(str(cal.header.values[i]), sep="\n"), naxis=2).celestial


def _rotated(image: np.ndarray, shift: tuple[float, float]) -> tuple[np.ndarray, Any]:
    """``image`` rotated by THETA_DEG about its centre and shifted; and the map back."""
    t = np.radians(THETA_DEG)
    m = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])  # (row, col) order
    c = (np.array(image.shape) - 1) / 2.0
    off = c - m @ c + np.array(shift)
    out = ndimage.affine_transform(image, m, offset=off, order=3, mode="constant", cval=np.nan)

    def to_original(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, col = m @ np.stack([y, x]) + off[:, None]
        return col, r

    return out, to_original


def _truth_map(frame: WCS, ref: WCS, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
    ra, dec = frame.pixel_to_world_values(x, y)
    return ref.world_to_pixel_values(ra, dec)


def test_simulated_frames_register_to_the_truth(bright_calibrated: list[xr.Dataset]) -> None:
    """Three dithered frames and one rotated by 7°: transforms vs the truth WCS < 0.05 px."""
    cals = bright_calibrated
    ref_wcs = _wcs(cals[0])
    images = [np.asarray(c.image.values[0]) for c in cals]
    masks = [np.asarray(c.mask.values[0]) != 0 for c in cals]
    rot, to_original = _rotated(np.where(masks[1], 0.0, images[1]), (6.3, -4.2))
    images.append(rot)
    masks.append(~np.isfinite(rot))
    regs = register_frames(images, masks=masks)  # no WCS at all: pseudo-celestial
    ny, nx = images[0].shape
    gy, gx = (a.ravel().astype(float) for a in np.mgrid[16 : ny - 16 : 20, 16 : nx - 16 : 20])
    for k, reg in enumerate(regs[1:], start=1):
        if k < len(cals):
            tx, ty = _truth_map(_wcs(cals[k]), ref_wcs, gx, gy)
        else:
            tx, ty = _truth_map(_wcs(cals[1]), ref_wcs, *to_original(gx, gy))
        inside = (tx > 0) & (tx < nx - 1) & (ty > 0) & (ty < ny - 1)  # over the overlap
        px, py = reg.apply(gx, gy)
        err = np.hypot(px - tx, py - ty)[inside]
        rms = float(np.sqrt(np.mean(err**2)))
        print(f"frame {k}: {reg.n_matched} stars, star rms {reg.rms_px:.3f} px, "
              f"transform vs truth rms {rms:.4f} px, max {err.max():.4f} px")  # fmt: skip
        assert reg.n_matched >= 10
        assert rms < 0.05
        assert reg.centre_error_px < 0.05
    angle = np.degrees(np.arctan2(regs[-1].matrix[1, 0], regs[-1].matrix[0, 0]))
    assert abs(abs(angle) - THETA_DEG) < 0.05


def test_registered_wcs_matches_the_truth_on_the_sky(bright_calibrated: list[xr.Dataset]) -> None:
    cals = bright_calibrated[:2]
    ref_wcs = _wcs(cals[0])
    regs = register_frames([c.image.values[0] for c in cals], reference_wcs=ref_wcs,
                           masks=[c.mask.values[0] != 0 for c in cals])  # fmt: skip
    ny, nx = cals[0].sizes["y"], cals[0].sizes["x"]
    gy, gx = (a.ravel().astype(float) for a in np.mgrid[0:ny:25, 0:nx:25])
    truth = _wcs(cals[1]).pixel_to_world(gx, gy)
    got = regs[1].wcs.pixel_to_world(gx, gy)
    sep = truth.separation(got).arcsec
    print(f"registered WCS vs truth: rms {np.sqrt(np.mean(sep**2)):.4f} arcsec")
    assert np.sqrt(np.mean(sep**2)) < 0.05 * 0.5  # 0.05 px of 0.5″
    assert isinstance(got, SkyCoord)


def test_coadd_of_frames_without_wcs(
    bright_survey: Any, bright_calibrated: list[xr.Dataset], tmp_path: Path
) -> None:
    """The reference keeps its WCS, the others lose theirs: the coadd's stars land on the
    truth as well as with the true WCS of every frame."""
    paths = []
    for k, cal in enumerate(bright_calibrated):
        det = str(cal.detector.values[0])
        header = fits.Header.fromstring(str(cal.header.values[0]), sep="\n") if k == 0 else None
        hdus = [fits.PrimaryHDU(), fits.ImageHDU(cal.image.values[0], header, name=det),
                fits.ImageHDU(cal.variance.values[0], name=f"{det}_VAR"),
                fits.ImageHDU(cal.mask.values[0], name=f"{det}_MASK")]  # fmt: skip
        hdus[1].header["BUNIT"] = "electron"
        paths.append(tmp_path / f"f{k}.fits")
        fits.HDUList(hdus).writeto(paths[-1])
    with pytest.raises(FitsFormatError, match=r"f1.fits, HDU .*--register stars"):
        coadd_files(paths, tmp_path / "no.fits")
    out = coadd_files(paths, tmp_path / "coadd.fits", register="stars", tile_px=128,
                      subtract_background=False)  # fmt: skip
    with fits.open(out) as hdul:
        h = hdul[0].header
        assert h["REGISTER"] == "stars"
        assert "WCSNAME" not in h  # on the sky: the reference had a WCS
        img = np.ascontiguousarray(hdul[0].data, dtype=float)
        count = hdul["COUNT"].data
        wcs = WCS(h)
    raws = [bright_survey.raw(k, ".truth.ecsv") for k in range(len(bright_calibrated))]
    truth = vstack([Table.read(p) for p in raws], metadata_conflicts="silent")
    truth = truth[(truth["kind"] == "star")]
    _, first = np.unique(truth["id"], return_index=True)
    truth = truth[first]
    x, y = wcs.world_to_pixel_values(truth["ra"], truth["dec"])
    offsets = []
    import sep

    for xi, yi, f in zip(x, y, truth["flux_e"], strict=True):
        xi, yi = float(xi), float(yi)
        if not (12 < xi < img.shape[1] - 12 and 12 < yi < img.shape[0] - 12):
            continue
        if count[int(yi), int(xi)] < len(paths) or f < 2e4:
            continue
        d = np.hypot(x - xi, y - yi)
        if np.any((d > 0) & (d < 12)):
            continue
        cx, cy, flag = sep.winpos(img, [xi], [yi], [1.1])
        if flag[0] == 0:
            offsets.append((cx[0] - xi, cy[0] - yi))
    off = np.array(offsets)
    rms_arcsec = 0.5 * float(np.sqrt(np.mean(np.sum((off - 0) ** 2, axis=1))))
    print(f"{len(off)} stars: centroid vs truth rms {rms_arcsec:.4f} arcsec, "
          f"mean offset {0.5 * off.mean(axis=0)} arcsec")  # fmt: skip
    assert len(off) >= 10
    assert rms_arcsec < 0.05


def test_matcher_recovers_rotation_scale_shift() -> None:
    rng = np.random.default_rng(5)
    ref = rng.uniform(0, 800, (60, 2))
    t = np.radians(-23.0)
    m = 1.02 * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    frame = (ref - [40.0, -12.5]) @ np.linalg.inv(m).T  # ref = m @ frame + shift
    frame = frame[rng.permutation(60)[:45]] + rng.normal(0, 0.02, (45, 2))
    extra = rng.uniform(0, 800, (10, 2))  # stars the reference does not have
    fit, pairs = match_stars(np.vstack([frame, extra]), ref)
    np.testing.assert_allclose(fit[:, :2], m, atol=2e-4)
    np.testing.assert_allclose(fit[:, 2], [40.0, -12.5], atol=0.05)
    assert len(pairs) == 45


def test_wcs_composition_is_exact() -> None:
    ref = pseudo_wcs((100, 120), pixel_scale_arcsec=0.7)
    t = np.radians(30.0)
    fit = np.array([[np.cos(t), -np.sin(t), 5.5], [np.sin(t), np.cos(t), -3.25]])
    w = wcs_on_reference(ref, fit)
    x, y = np.array([0.0, 50.0, 119.0]), np.array([0.0, 30.0, 99.0])
    rx, ry = fit[:, :2] @ np.stack([x, y]) + fit[:, 2:]
    np.testing.assert_allclose(w.pixel_to_world_values(x, y), ref.pixel_to_world_values(rx, ry),
                               atol=1e-12)  # fmt: skip


def test_errors_name_the_frame() -> None:
    rng = np.random.default_rng(0)
    blank = rng.normal(0, 1, (80, 90))
    y, x = np.mgrid[:80, :90]
    stars = blank.copy()
    for sx, sy in rng.uniform(10, 70, (12, 2)):
        stars += 300 * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / 4.0)
    assert len(find_stars(blank, threshold_sigma=5)) < 3
    with pytest.raises(RegistrationError, match=r"empty\.fits.*only \d star"):
        register_frames([stars, blank], names=["ref.fits", "empty.fits"], threshold_sigma=5)
    with pytest.raises(RegistrationError, match=r"ref\.fits \(the reference\)"):
        register_frames([blank, stars], names=["ref.fits", "b.fits"], threshold_sigma=5)
    other = rng.normal(0, 1, (80, 90))
    for sx, sy in rng.uniform(10, 70, (12, 2)):
        other += 300 * np.exp(-((x - sx) ** 2 + (y - sy) ** 2) / 4.0)
    with pytest.raises(
        RegistrationError, match=r"other\.fits: no (consistent|significant) star match"
    ):
        register_frames([stars, other], names=["ref.fits", "other.fits"])
    with pytest.raises(ParameterError, match="reference must be an index"):
        register_frames([stars], reference=3)
    with pytest.raises(ParameterError, match=r"model must be one of \['similarity', 'affine'\]"):
        match_stars(np.zeros((10, 2)) + np.arange(10)[:, None], np.zeros((10, 2)), model="poly")
    with pytest.raises(ParameterError, match="register must be one of"):
        coadd_files(["a.fits"], "out.fits", register="wcs")


def test_docstring_examples_run() -> None:
    import doctest

    import lazysky.pipeline.register as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5
    assert result.failed == 0

"""Cosmic rays: found against the truth (edges included), tiled = whole, lazy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table
from conftest import INST, Survey, assert_same, raise_if_dask_computes
from scipy import ndimage

from lazysky.errors import ParameterError
from lazysky.pipeline import (
    MaskBit,
    calibrate_exposure,
    cosmic_ray_mask,
    flag_cosmic_rays,
    lacosmic_halo_px,
)

NY, NX = INST.detector_shape


@pytest.fixture(scope="module")
def calibrated(survey: Survey, masters: Any) -> list[xr.Dataset]:
    return [calibrate_exposure(survey.exposure(k), masters).compute() for k in range(2)]


def test_kernel_finds_hits_on_every_edge_of_a_small_block() -> None:
    rng = np.random.default_rng(3)
    img = rng.normal(1000.0, 32.0, (10, 14)).astype(np.float32)
    hits = [(0, 0), (0, 7), (9, 13), (5, 0), (4, 13), (9, 3)]
    for y, x in hits:
        img[y, x] += 2500.0
    cr, clean = cosmic_ray_mask(img, np.full_like(img, 1024.0))
    assert all(cr[y, x] for y, x in hits)
    assert cr.sum() == len(hits)
    assert np.all(np.abs(clean[cr] - 1000.0) < 150)
    assert cosmic_ray_mask(np.empty((0, 0)), np.empty((0, 0)))[0].shape == (0, 0)


def _truth_hits(survey: Survey, k: int, cal: xr.Dataset, n_sigma: float) -> list[tuple[Any, ...]]:
    """Truth hit pixels whose charge is n_sigma times the pixel's noise, testable.

    Not testable: pixels L.A.Cosmic is told to ignore, i.e. within 3 px of a saturated
    pixel or 1 px of a low-response one (see ``cosmics._IGNORE``).
    """
    cosmics = Table.read(survey.raw(k, ".cosmics.ecsv"))
    out = []
    for i, det in enumerate(map(str, cal.detector.values)):
        c = cosmics[cosmics["detector"] == det]
        y, x = np.asarray(c["y"]), np.asarray(c["x"])
        sigma = np.sqrt(cal.variance.values[i][y, x])
        m = cal.mask.values[i]
        ignored = ndimage.binary_dilation((m & MaskBit.SAT) > 0, iterations=3)
        ignored |= ndimage.binary_dilation((m & (MaskBit.LOWRESP | MaskBit.NODATA)) > 0)
        flat_ok = ~ignored[y, x]
        strong = np.asarray(c["electrons"]) > n_sigma * sigma
        for yy, xx in zip(y[strong & flat_ok], x[strong & flat_ok], strict=True):
            out.append((i, int(yy), int(xx)))
    return out


def test_cosmic_rays_found_including_near_edges_and_not_on_stars(
    survey: Survey, calibrated: list[xr.Dataset]
) -> None:
    found, near_edge, bare_edge, edge_found = [], [], [], []
    false_on_stars, on_star_pixels = 0, 0
    for k, cal in enumerate(calibrated):
        flagged = flag_cosmic_rays(cal).mask.values
        cr = (flagged & MaskBit.CR) > 0
        assert np.all((flagged & ~np.uint16(MaskBit.CR)) == cal.mask.values)  # only CR added
        for i, y, x in _truth_hits(survey, k, cal, n_sigma=5):
            found.append(cr[i, y, x])
            if min(y, x, NY - 1 - y, NX - 1 - x) < 3:
                near_edge.append((i, y, x, cr[i, y, x]))
        # L.A.Cosmic alone, without the mirrored margin, on the same detectors
        for i in sorted({i for i, *_ in near_edge}):
            bare, _ = cosmic_ray_mask(
                cal.image.values[i], cal.variance.values[i],
                (cal.mask.values[i] & (MaskBit.LOWRESP | MaskBit.NODATA)) > 0,
                (cal.mask.values[i] & MaskBit.SAT) > 0, pad_px=0,
            )  # fmt: skip
            bare_edge += [bare[y, x] for j, y, x, _ in near_edge if j == i]
        near_edge_found = [f for *_, f in near_edge]
        truth = Table.read(survey.raw(k, ".truth.ecsv"))
        cosmics = Table.read(survey.raw(k, ".cosmics.ecsv"))
        fwhm = survey.pointings[k].seeing_arcsec / INST.pixel_scale_arcsec
        yy, xx = np.mgrid[:NY, :NX]
        for i, det in enumerate(map(str, cal.detector.values)):
            stars = truth[(truth["detector"] == det) & (truth["kind"] == "star")]
            on = np.zeros((NY, NX), dtype=bool)
            for s in stars:
                on |= (yy - s["y"]) ** 2 + (xx - s["x"]) ** 2 < (2 * fwhm) ** 2
            c = cosmics[cosmics["detector"] == det]
            hit = np.zeros((NY, NX), dtype=bool)
            hit[c["y"], c["x"]] = True
            hit = ndimage.binary_dilation(hit, iterations=2)  # the grown neighbours
            false_on_stars += int((cr[i] & on & ~hit).sum())

            on_star_pixels += int(on.sum())
        near_edge = []
        edge_found += near_edge_found
    print(f"hits within 3 px of an edge: {len(edge_found)}, found {np.mean(edge_found):.3f}, "
          f"by L.A.Cosmic alone {np.mean(bare_edge):.3f}")  # fmt: skip
    assert len(edge_found) >= 10
    assert np.mean(edge_found) >= 0.9  # few: one hit on a star's wing is a miss of 5 %
    assert np.mean(bare_edge) < 0.5  # the mirrored margin is what finds them
    completeness = float(np.mean(found))
    false_rate = false_on_stars / on_star_pixels
    print(f"completeness {completeness:.4f} of {len(found)} hit pixels (> 5 sigma); "
          f"false on stars {false_rate:.2e} of {on_star_pixels} pixels")  # fmt: skip
    assert len(found) > 200
    assert completeness >= 0.95
    assert false_rate < 1e-3


@pytest.mark.slow  # ~30 s: 64-px tiles with a 48-px halo, twice on edge tiles
def test_tiled_equals_whole_detector_and_is_lazy(calibrated: list[xr.Dataset]) -> None:
    cal = calibrated[0]
    with raise_if_dask_computes():
        tiled = flag_cosmic_rays(cal.chunk({"y": 64, "x": 64}), clean=True)
        whole = flag_cosmic_rays(cal.chunk({"y": -1, "x": -1}), clean=True)
    assert any(str(k).startswith("cosmic-rays-") for k in tiled.mask.data.dask.layers)
    assert tiled.attrs["steps"][-1]["halo_px"] == lacosmic_halo_px(4)
    assert_same(tiled.mask.values, whole.mask.values)
    assert_same(tiled.image.values, whole.image.values)
    cr = (tiled.mask.values & MaskBit.CR) > 0
    assert cr.sum() > 50
    assert_same(tiled.image.values[~cr], cal.image.values[~cr])  # cleaning touches CRs only


def test_flag_cosmic_rays_rejects_bad_input(calibrated: list[xr.Dataset]) -> None:
    with pytest.raises(ParameterError, match="sigclip"):
        flag_cosmic_rays(calibrated[0], sigclip=0)
    with pytest.raises(ParameterError, match="niter"):
        flag_cosmic_rays(calibrated[0], niter=0)
    with pytest.raises(ParameterError, match="missing"):
        flag_cosmic_rays(calibrated[0].drop_vars("variance"))
    with pytest.raises(ParameterError, match="2-D"):
        cosmic_ray_mask(np.zeros((2, 3, 4)), np.ones((2, 3, 4)))

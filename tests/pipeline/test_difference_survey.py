"""Difference imaging end to end on a simulated survey, against its truth tables.

Reference: the coadd of the first 3 epochs (9 exposures, no transient shines yet);
science: the coadd of the last epoch's 3 dithers. Both are calibrated, cosmic-ray
flagged, sky-subtracted, resampled and stacked by lazysky.pipeline on one grid, then
differenced (PSFs per tile, flux ratio fitted from matched stars). Detection here is a
plain local-maximum finder on |S_corr| (the detect module's ``detect_difference`` is
tested on its own).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import xarray as xr
from astropy.table import Table, vstack
from conftest import INST, Survey, _calibrate_all
from scipy import ndimage

from lazysky.pipeline import MaskBit, SkyGrid, detector_footprints, resample_exposure, stack
from lazysky.pipeline.difference import difference
from lazysky.simulator import SurveySpec, plan_exposures, simulate_survey

pytestmark = pytest.mark.slow
THRESH = 5.0
BAD = int(MaskBit.NODATA | MaskBit.EDGE)


@dataclass
class Pair:
    grid: SkyGrid
    diff: xr.Dataset
    science: xr.Dataset
    truth: Table  # every truth row of the science exposures, with grid positions
    movers: Table  # every mover position in any exposure
    hosts: dict[int, int]  # transient id -> host galaxy id (-1: none)
    diff_al: xr.Dataset  # the same pair by Alard & Lupton's kernel fit

    def by(self, method: str) -> Pair:
        """This pair with ``diff`` made by ``method``."""
        if method == "zogy":
            return self
        return Pair(self.grid, self.diff_al, self.science, self.truth, self.movers,
                    self.hosts, self.diff_al)  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, masters: Any) -> Pair:
    spec = SurveySpec(
        instrument="tiny", n_epochs=4, n_dithers=3, n_reference_epochs=3,
        star_density_per_deg2=3.0e4, star_mag_range=(16.5, 23.0),
        galaxy_density_per_deg2=3e4, galaxy_mag_range=(18.0, 24.0),
        n_transients=60, transient_host_fraction=0.5, transient_peak_mag_range=(19.0, 22.0),
        n_variables=4, n_movers=1, seed=31, n_bias=0, n_dark=0, n_flat=0,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("diff-survey")
    simulate_survey(spec, root)
    survey = Survey(root, spec, plan_exposures(spec))
    cals = _calibrate_all(survey, masters)
    fps = [f for c in cals for f in detector_footprints(c)]
    grid = SkyGrid.covering(fps, pixel_scale_arcsec=INST.pixel_scale_arcsec, tile_px=128)
    last = max(p.epoch for p in survey.pointings)
    sci_k = [k for k, p in enumerate(survey.pointings) if p.epoch == last]
    ref_k = [k for k, p in enumerate(survey.pointings) if p.epoch != last]

    def coadd(ks: list[int]) -> xr.Dataset:
        return stack([p for k in ks for p in resample_exposure(cals[k], grid)], grid)

    science = coadd(sci_k).persist()
    reference = coadd(ref_k).persist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PSF fallbacks in sparse edge tiles
        diff = difference(science, reference, astrometric_sigma_px="auto").compute()
        diff_al = difference(science, reference, astrometric_sigma_px="auto",
                             method="alard-lupton").compute()  # fmt: skip
    science = science.compute()
    tabs = [Table.read(survey.raw(k, ".truth.ecsv")) for k in sci_k]
    for k, t in enumerate(tabs):
        t["frame"] = k
    truth = vstack(tabs, metadata_conflicts="silent")
    truth["gx"], truth["gy"] = grid.wcs.world_to_pixel_values(truth["ra"], truth["dec"])
    all_t = [Table.read(survey.raw(k, ".truth.ecsv")) for k in range(len(survey.pointings))]
    movers = vstack([t[t["kind"] == "mover"] for t in all_t], metadata_conflicts="silent")
    movers["gx"], movers["gy"] = grid.wcs.world_to_pixel_values(movers["ra"], movers["dec"])
    scene = Table.read(root / "truth" / "scene.ecsv")
    tr = scene[scene["kind"] == "transient"]
    hosts = {int(i): int(h) for i, h in zip(tr["id"], tr["host_id"], strict=True)}
    return Pair(grid, diff, science, truth, movers, hosts, diff_al)


def _peaks(diff: xr.Dataset) -> np.ndarray:
    s = np.where(diff["mask"].values & BAD, 0.0, np.abs(diff.score.values))
    return np.argwhere((ndimage.maximum_filter(s, size=3) == s) & (s >= THRESH))


def _transients(p: Pair) -> Table:
    """One row per transient: grid position, flux in the science coadd (the mean over the
    frames, a frame off every detector counting 0), its S/N there (PSF-weighted, from the
    coadd's variance and the tile's PSF)."""
    t = p.truth[p.truth["kind"] == "transient"]
    n_frames = len(set(p.truth["frame"]))
    ids = sorted(set(t["id"]))
    rows = []
    for i in ids:
        ti = t[t["id"] == i]
        flux = float(np.sum(ti["flux_e"])) / n_frames
        x, y = float(np.mean(ti["gx"])), float(np.mean(ti["gy"]))
        iy, ix = round(y), round(x)
        if not (15 <= iy < p.grid.shape[0] - 15 and 15 <= ix < p.grid.shape[1] - 15):
            continue
        tile = p.grid.tile_id(iy // p.grid.tile_px, ix // p.grid.tile_px)
        ty, tx = (int(v) for v in tile[1:].split("_"))
        psf = p.diff.psf_science.values[ty, tx]
        h = len(psf) // 2
        var = p.science.variance.values[iy - h : iy + h + 1, ix - h : ix + h + 1]
        snr = flux * math.sqrt(float(np.sum(psf**2 / var))) if np.all(np.isfinite(var)) else 0
        bad = int(np.bitwise_or.reduce(p.diff["mask"].values[iy - 2 : iy + 3, ix - 2 : ix + 3],
                                       axis=None))  # fmt: skip
        host = p.hosts.get(int(i), -1) >= 0
        rows.append((i, x, y, flux, snr, bad, host))
    return Table(rows=rows, names=("id", "x", "y", "flux", "snr", "mask", "host"))


METHODS = ["zogy", "alard-lupton"]


@pytest.mark.parametrize("method", METHODS)
def test_transients_with_snr_8_are_recovered(pair: Pair, method: str) -> None:
    pair = pair.by(method)
    t = _transients(pair)
    found = _peaks(pair.diff)
    usable = t[(t["mask"] & BAD) == 0]
    d = np.array([np.min(np.hypot(found[:, 1] - r["x"], found[:, 0] - r["y"])) for r in usable])
    bright = usable["snr"] >= 8
    rate = float(np.mean(d[bright] <= 2.0))
    print(f"{len(t)} transients on the grid, {len(usable)} unmasked, {bright.sum()} with "
          f"S/N >= 8 in the science coadd: {rate:.3f} recovered at {THRESH}σ "
          f"(on hosts: {np.mean(d[bright & usable['host']] <= 2.0):.3f} of "
          f"{(bright & usable['host']).sum()})")  # fmt: skip
    for r, dd in zip(usable[bright], d[bright], strict=True):
        if dd > 2.0:
            print(f"  missed: id {r['id']} at ({r['x']:.1f}, {r['y']:.1f}) S/N {r['snr']:.1f}")
    assert bright.sum() >= 15
    assert (bright & usable["host"]).sum() >= 5
    assert rate >= 0.95


@pytest.mark.parametrize("method", METHODS)
def test_few_false_detections(pair: Pair, method: str) -> None:
    """Connected (8-neighbour) 5σ footprints of |S_corr| on unflagged pixels that belong
    to no transient, variable or mover: ≤ 2 per Mpix of unflagged area.

    A footprint belongs to a source when one of its pixels lies within the source's reach:
    the radius out to which its own matched-filter response, ``S_peak · A(r)`` (A the PSF's
    autocorrelation, 1 at the centre; S_peak its observed peak), stays above 3σ, plus
    2 px. A bright transient (S/N of hundreds) still reaches 5σ two FWHM out, in islands a
    plain labelling splits off; a detector's deblending assigns them to it."""
    pair = pair.by(method)
    score = pair.diff.score.values
    s = np.where(pair.diff["mask"].values & BAD, 0.0, np.abs(score))
    labels, n = ndimage.label(s >= THRESH, structure=np.ones((3, 3)))
    psf = pair.diff.psf_science.values[0, 0]
    auto = ndimage.correlate(psf, psf, mode="constant")
    auto /= auto.max()
    c = len(psf) // 2
    r_pix = np.hypot(*np.mgrid[-c : c + 1, -c : c + 1])
    keep = pair.truth[np.isin(pair.truth["kind"], ["transient", "variable"])]
    xs = np.concatenate([np.asarray(keep["gx"]), np.asarray(pair.movers["gx"])])
    ys = np.concatenate([np.asarray(keep["gy"]), np.asarray(pair.movers["gy"])])
    reach = []
    for x, y in zip(xs, ys, strict=True):
        iy, ix = round(y), round(x)
        box = np.abs(score[max(iy - 2, 0) : iy + 3, max(ix - 2, 0) : ix + 3])
        peak = float(box.max()) if box.size else 0.0
        inside = r_pix[auto * peak >= 3.0]
        reach.append((float(inside.max()) if inside.size else 0.0) + 2.0)
    reach_a = np.array(reach)
    false = []
    for k, sl in enumerate(ndimage.find_objects(labels), 1):
        py, px = np.nonzero(labels[sl] == k)
        py, px = py + sl[0].start, px + sl[1].start
        d = np.hypot(xs[:, None] - px[None], ys[:, None] - py[None]).min(axis=1)
        if not np.any(d <= reach_a):
            false.append((int(py[0]), int(px[0]), float(score[py[0], px[0]])))
    area = float(np.mean((pair.diff["mask"].values & BAD) == 0)) * s.size / 1e6
    print(f"{n} footprints at {THRESH}σ, {len(false)} false in {area:.3f} Mpix unflagged "
          f"({100 * area * 1e6 / s.size:.1f} % of the grid; {len(false) / area:.2f} per "
          f"Mpix); false (y, x, S) {false}")  # fmt: skip
    assert len(false) / area <= 2.0


@pytest.mark.parametrize("method", METHODS)
def test_score_and_variance_on_empty_sky(pair: Pair, method: str) -> None:
    """In source-free sky (far from every truth source): std(S_corr) = 1.00 ± 0.05 and D's
    noise matches its predicted variance within 5 % (the coadds' noise is correlated by
    bilinear resampling: its measured correlation enters the prediction; assuming white
    noise, var(D) / predicted was 0.53)."""
    pair = pair.by(method)
    shape = pair.grid.shape
    free = (pair.diff["mask"].values & BAD) == 0
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    t = pair.truth
    for row in t:
        rad = 8 + 4 * max(0.0, math.log10(max(float(row["flux_e"]), 1.0) / 100))
        rad *= 2 if row["kind"] == "galaxy" else 1
        y0, x0, n = int(row["gy"]), int(row["gx"]), int(rad) + 1
        sl = (slice(max(y0 - n, 0), max(y0 + n + 1, 0)), slice(max(x0 - n, 0), max(x0 + n + 1, 0)))
        free[sl] &= (yy[sl] - row["gy"]) ** 2 + (xx[sl] - row["gx"]) ** 2 > rad**2
    s = pair.diff.score.values[free]
    chi = pair.diff.image.values[free] / np.sqrt(pair.diff.variance.values[free])
    print(f"{free.sum()} source-free pixels: std(S_corr) {s.std():.4f}, "
          f"var(D) / predicted {chi.var():.4f}; flux ratio "
          f"{float(pair.diff.flux_ratio):.4f} ({int(pair.diff.n_flux_stars)} stars)")  # fmt: skip
    assert free.sum() > 20000
    assert s.std() == pytest.approx(1.0, abs=0.05)
    assert chi.var() == pytest.approx(1.0, abs=0.05)
    # a coadd's per-pixel variance is about half its variance plane's (bilinear resampling)
    assert 0.35 < float(pair.diff.noise_correlation_science[1, 1]) < 0.7
    # the two coadds share zero point and exposure time
    assert float(pair.diff.flux_ratio) == pytest.approx(1.0, abs=0.03)

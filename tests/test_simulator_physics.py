"""The simulator is realistic: measured against its own truth with stated tolerances.

Each test would fail if the physics were wrong: photometry recovers injected fluxes
within the noise, the photon-transfer curve gives back gain and read noise, the WCS
puts truth positions on the rendered centroids, transients shine only in their epochs,
bright stars saturate and bleed, cosmic rays deposit the charge the truth says.

The images are calibrated here with the simulator's own detector model (true bias,
dark and flat): that isolates the rendering from the pipeline's calibration.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from lazysky.simulator import (
    SurveySpec,
    detector_model,
    load_instrument,
    read_out,
    simulate_survey,
    survey_scene,
)
from lazysky.simulator.render import moffat_enclosed

INST = load_instrument("tiny")
NY, NX = INST.detector_shape


def _electrons(hdu: Any, exptime: float) -> tuple[np.ndarray, np.ndarray, Any]:
    """Bias-, dark- and flat-corrected electrons of one detector, and their 1σ error."""
    model = detector_model(INST, int(hdu.header["CCDNUM"]) - 1)
    raw = hdu.data.astype(float)
    drift = np.median(raw[:, NX:] - model.bias_adu[:, NX:])
    e = (raw[:, :NX] - model.bias_adu[:, :NX] - drift) * model.gain
    var = np.maximum(e, 0.0) + model.read_noise_e**2
    e = (e - model.dark_e_per_s * exptime) / model.flat
    err = np.sqrt(var) / model.flat
    return np.ascontiguousarray(e), np.ascontiguousarray(err), model


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    spec = SurveySpec(
        instrument="tiny",
        n_epochs=2,
        n_dithers=3,
        n_reference_epochs=1,
        cadence_days=5.0,
        star_density_per_deg2=2.5e4,
        star_mag_range=(17.5, 21.5),
        galaxy_density_per_deg2=3e3,
        n_transients=60,
        transient_host_fraction=0.3,
        transient_peak_mag_range=(18.5, 20.0),
        n_variables=0,
        n_movers=1,
        seed=21,
        n_bias=0,
        n_dark=0,
        n_flat=0,
    )
    out = tmp_path_factory.mktemp("physics")
    return out, simulate_survey(spec, out)


def _isolated(truth: Table, cosmics: Table, det: str, k: int, radius: float, model: Any) -> bool:
    row = truth[k]
    x, y = row["x"], row["y"]
    if not (radius + 2 < x < NX - radius - 3 and radius + 2 < y < NY - radius - 3):
        return False
    if row["saturated"] or any(abs(c - x) < radius + 1 for c in model.bad_columns):
        return False
    others = truth[(truth["detector"] == det) & (truth["id"] != row["id"])]
    d = np.hypot(others["x"] - x, others["y"] - y)
    if np.any((d < radius + 5) & (others["flux_e"] > 2e-3 * row["flux_e"])):
        return False
    hits = cosmics[cosmics["detector"] == det]
    return not np.any(np.hypot(hits["x"] - x, hits["y"] - y) < radius + 2)


def _photometry(out: Path, exposure: Any, *, min_snr: float) -> list[dict[str, float]]:
    truth = Table.read(out / exposure.files["truth"])
    cosmics = Table.read(out / exposure.files["cosmics"])
    fwhm = exposure.seeing_arcsec / INST.pixel_scale_arcsec
    r, r1, r2 = 3 * fwhm, 4.5 * fwhm, 6 * fwhm
    rows = []
    with fits.open(out / exposure.files["fits"]) as hdul:
        for hdu in hdul[1:]:
            e, err, model = _electrons(hdu, hdul[0].header["EXPTIME"])
            for k in np.flatnonzero((truth["detector"] == hdu.name) & (truth["kind"] == "star")):
                if not _isolated(truth, cosmics, hdu.name, int(k), r2, model):
                    continue
                x, y, f = float(truth["x"][k]), float(truth["y"][k]), float(truth["flux_e"][k])
                flux, ferr, _ = sep.sum_circle(e, [x], [y], r, err=err, bkgann=(r1, r2))
                # expected: the light inside r, less the wing light the annulus subtracts
                ee = moffat_enclosed(np.array([r, r1, r2]), fwhm, INST.psf_beta)
                expected = f * (ee[0] - (ee[2] - ee[1]) * r**2 / (r2**2 - r1**2))
                if expected / ferr[0] < min_snr:
                    continue
                wx, wy, _ = sep.winpos(e - np.median(e), [x], [y], fwhm / 2.3548)
                w = WCS(hdu.header)
                px, py = w.world_to_pixel_values(truth["ra"][k], truth["dec"][k])
                rows.append(
                    {
                        "measured": float(flux[0]),
                        "expected": float(expected),
                        "err": float(ferr[0]),
                        "dx": float(wx[0] - px),
                        "dy": float(wy[0] - py),
                        "wcs_dx": float(px - x),
                        "wcs_dy": float(py - y),
                    }
                )
    return rows


def test_aperture_photometry_recovers_injected_flux_within_the_noise(
    survey: tuple[Path, Any],
) -> None:
    out, s = survey
    rows = [r for e in s.exposures for r in _photometry(out, e, min_snr=30)]
    assert len(rows) >= 30, "too few isolated bright stars to test"
    measured = np.array([r["measured"] for r in rows])
    expected = np.array([r["expected"] for r in rows])
    err = np.array([r["err"] for r in rows])
    pulls = (measured - expected) / err
    # unbiased: the mean pull is within 3 standard errors of zero
    assert abs(np.mean(pulls)) < 3 / math.sqrt(len(pulls)) + 0.05
    # and the scatter is the predicted noise (Poisson + read noise), not more, not less
    # (the standard error of a standard deviation of ~50 pulls is ~0.1)
    assert 0.75 < np.std(pulls) < 1.3
    assert np.median(measured / expected) == pytest.approx(1.0, abs=0.005)


def test_wcs_maps_truth_positions_onto_rendered_centroids(survey: tuple[Path, Any]) -> None:
    out, s = survey
    rows = [r for e in s.exposures for r in _photometry(out, e, min_snr=100)]
    assert len(rows) >= 10
    # the header WCS gives back the truth pixel positions exactly
    assert max(abs(r["wcs_dx"]) for r in rows) < 1e-6
    assert max(abs(r["wcs_dy"]) for r in rows) < 1e-6
    # and the light is centred there (windowed centroids of bright isolated stars)
    offsets = np.hypot([r["dx"] for r in rows], [r["dy"] for r in rows])
    assert np.max(offsets) < 0.05
    assert np.median(offsets) < 0.02


def test_photon_transfer_curve_gives_back_gain_and_read_noise() -> None:
    model = detector_model(INST, 2)
    rng = np.random.default_rng(5)
    means, variances = [], []
    box = (slice(30, 226), slice(30, 226))
    # levels stay below ~2/3 of the full well, where no pixel saturates
    for level in (0.0, 1000.0, 3000.0, 7000.0, 12000.0, 20000.0, 30000.0, 40000.0):
        pair = []
        for _ in range(2):
            light = None if level == 0 else np.full(INST.detector_shape, level)
            raw = read_out(INST, model, light, exptime_s=1.0, rng=rng, cosmic_rays=False).data
            raw = raw.astype(float)
            pair.append(raw[:, :NX] - np.median(raw[:, NX:]))
        diff = (pair[0] - pair[1])[box]
        keep = np.abs(diff - np.median(diff)) < 5 * 1.4826 * np.median(
            np.abs(diff - np.median(diff))
        )
        means.append(0.5 * (pair[0][box] + pair[1][box])[keep].mean())
        variances.append(diff[keep].var() / 2)
    # read noise from the bias pair; gain from the slope of variance over mean (ADU)
    read_var = variances[0]
    slope = np.polyfit(means[1:], np.array(variances[1:]) - read_var, 1)[0]
    gain = 1 / slope
    read_noise = math.sqrt(read_var) * gain
    assert gain == pytest.approx(model.gain, rel=0.02)
    assert read_noise == pytest.approx(model.read_noise_e, rel=0.1)


def test_transients_shine_only_in_their_epochs(survey: tuple[Path, Any]) -> None:
    out, s = survey
    scene = Table.read(out / "truth" / "scene.ecsv")
    tr = scene[scene["kind"] == "transient"]
    before, after = s.exposures[0], s.exposures[3]
    t0 = dict(zip(tr["id"], tr["t0"], strict=True))
    # truth: none in the reference epoch, exactly the exploded ones after
    truth0 = Table.read(out / before.files["truth"])
    truth1 = Table.read(out / after.files["truth"])
    assert not np.any(truth0["kind"] == "transient")
    shown = truth1[truth1["kind"] == "transient"]
    assert len(shown) >= 10
    assert all(t0[i] < after.mjd for i in shown["id"])
    assert len(set(shown["id"])) == len(shown)
    assert sum(1 for i in shown["id"] if scene["host_id"][i] >= 0) >= 2  # some on galaxies

    # pixels: hostless, isolated transients are in the image after, and absent before
    checked = 0
    for before, after in zip(s.exposures[:3], s.exposures[3:], strict=True):
        truth1 = Table.read(out / after.files["truth"])
        fwhm = max(before.seeing_arcsec, after.seeing_arcsec) / INST.pixel_scale_arcsec
        r, r1, r2 = 2.5 * fwhm, 4.5 * fwhm, 6 * fwhm
        h0, h1 = fits.open(out / before.files["fits"]), fits.open(out / after.files["fits"])
        c0, c1 = (Table.read(out / e.files["cosmics"]) for e in (before, after))
        for row in truth1[truth1["kind"] == "transient"]:
            near = truth1[(truth1["id"] != row["id"]) & (truth1["detector"] == row["detector"])]
            crowded = np.hypot(near["x"] - row["x"], near["y"] - row["y"]) < r2 + 3
            if scene["host_id"][row["id"]] >= 0 or np.any(
                crowded & (near["flux_e"] > 0.02 * row["flux_e"])
            ):
                continue
            fluxes = []
            for hdul, rays in ((h0, c0), (h1, c1)):
                for hdu in hdul[1:]:
                    x, y = WCS(hdu.header).world_to_pixel_values(row["ra"], row["dec"])
                    hits = rays[rays["detector"] == hdu.name]
                    if np.any(np.hypot(hits["x"] - x, hits["y"] - y) < r2 + 2):
                        continue  # a cosmic ray there: not a fair test
                    if r2 + 2 < x < NX - r2 - 3 and r2 + 2 < y < NY - r2 - 3:
                        e, err, _ = _electrons(hdu, hdul[0].header["EXPTIME"])
                        f, fe, _ = sep.sum_circle(e, [x], [y], r, err=err, bkgann=(r1, r2))
                        fluxes.append((float(f[0]), float(fe[0])))
            if len(fluxes) != 2:
                continue
            (f0, e0), (f1, e1) = fluxes
            inside = row["flux_e"] * float(moffat_enclosed(r, fwhm, INST.psf_beta))
            assert abs(f0) < 5 * e0 + 0.02 * inside, row["id"]  # nothing there before
            assert f1 == pytest.approx(inside, abs=5 * e1 + 0.05 * inside), row["id"]
            checked += 1
        h0.close()
        h1.close()
    assert checked >= 5


def test_movers_move_and_static_sources_do_not() -> None:
    spec = SurveySpec(instrument="tiny", n_movers=3, n_epochs=3)
    scene = survey_scene(spec)
    ra0, dec0 = scene.positions(61000.0)
    ra1, dec1 = scene.positions(61001.0)
    kind = np.asarray(scene.table["kind"])
    moved = np.hypot((ra1 - ra0) * np.cos(np.radians(dec0)), dec1 - dec0) * 3600
    rate = np.hypot(scene.table["rate_ra_arcsec_h"], scene.table["rate_dec_arcsec_h"])
    np.testing.assert_allclose(moved[kind == "mover"], 24 * rate[kind == "mover"], rtol=1e-3)
    assert np.all(moved[kind != "mover"] == 0)


def test_bright_stars_saturate_flat_topped_and_bleed_along_columns(tmp_path: Path) -> None:
    spec = SurveySpec(
        instrument="tiny",
        n_epochs=1,
        n_dithers=1,
        star_density_per_deg2=2000,
        star_mag_range=(13.0, 14.5),
        galaxy_density_per_deg2=0,
        n_transients=0,
        n_variables=0,
        n_movers=0,
        seed=3,
        n_bias=0,
        n_dark=0,
        n_flat=0,
    )
    s = simulate_survey(spec, tmp_path)
    truth = Table.read(tmp_path / s.exposures[0].files["truth"])
    assert np.all(truth["saturated"])
    checked = 0
    with fits.open(tmp_path / s.exposures[0].files["fits"]) as hdul:
        for row in truth:
            if not (10 < row["x"] < NX - 10 and 10 < row["y"] < NY - 10):
                continue
            hdu = hdul[row["detector"]]
            sat = hdu.data == hdu.header["SATURATE"]
            ix, iy = round(row["x"]), round(row["y"])
            assert sat[iy, ix]
            assert sat[:, ix].sum() > sat[iy, :NX].sum()  # the bleed trail runs up/down
            checked += 1
    assert checked >= 3


def test_cosmic_rays_deposit_the_charge_in_the_truth(survey: tuple[Path, Any]) -> None:
    out, s = survey
    exposure = s.exposures[0]
    cosmics = Table.read(out / exposure.files["cosmics"])
    truth = Table.read(out / exposure.files["truth"])
    ratios = []
    with fits.open(out / exposure.files["fits"]) as hdul:
        for hdu in hdul[1:]:
            e, _, _ = _electrons(hdu, 60.0)
            hits = cosmics[(cosmics["detector"] == hdu.name) & (cosmics["electrons"] > 1500)]
            src = truth[truth["detector"] == hdu.name]
            for hit in hits:
                if np.any(np.hypot(src["x"] - hit["x"], src["y"] - hit["y"]) < 8):
                    continue  # on a source: the excess is not the ray's alone
                y, x = int(hit["y"]), int(hit["x"])
                local = np.median(e[max(y - 6, 0) : y + 7, max(x - 6, 0) : x + 7])
                ratios.append((e[y, x] - local) / hit["electrons"])
    assert len(ratios) >= 20
    # the flat division scales a ray's charge by 1/flat (≈ 1 ± 10 %): median within 5 %
    assert np.median(ratios) == pytest.approx(1.0, abs=0.05)

"""``lazysky calibrate`` and ``lazysky coadd`` end to end, in process, against the truth.

A tiny survey (3 dithers of bright unsaturated stars, with bias, dark and flat frames) is
calibrated and coadded through ``main([...])``; the coadd's photometry and WCS are
measured against the simulator's truth, the calibrated MEF's layout is checked, and every
bad input must exit 1 with an error naming the file, no traceback and no output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sep
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS

from lazysky.cli import main
from lazysky.pipeline import MaskBit
from lazysky.simulator import SurveySpec, load_instrument, plan_exposures, simulate_survey
from lazysky.simulator.render import moffat_enclosed

INST = load_instrument("tiny")


@dataclass
class Run:
    root: Path
    pointings: list[Any]
    raws: list[Path]
    calib: dict[str, list[Path]]
    cals: list[Path]
    coadd: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    spec = SurveySpec(
        instrument="tiny", n_epochs=1, n_dithers=3, star_density_per_deg2=4.0e4,
        star_mag_range=(17.5, 20.5), galaxy_density_per_deg2=2e3, n_transients=0,
        n_variables=0, n_movers=0, seed=23, n_bias=3, n_dark=3, n_flat=5,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("cli-survey")
    simulate_survey(spec, root)
    pointings = plan_exposures(spec)
    raws = [root / "raw" / f"{p.exposure_id}.fits" for p in pointings]
    calib = {k: sorted(root.glob(f"calib/tiny-{k}-[0-9][0-9][0-9].fits"))
             for k in ("bias", "dark", "flat-r")}  # fmt: skip
    assert all(calib.values())
    out = root / "cal"
    out.mkdir()
    argv = ["calibrate", *map(str, raws), "--bias", *map(str, calib["bias"]),
            "--dark", *map(str, calib["dark"]), "--flat", *map(str, calib["flat-r"]),
            "--subtract-background", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cals = sorted(out.glob("*.cal.fits"))
    assert len(cals) == len(raws)
    coadd = root / "coadd.fits"
    assert main(["coadd", *map(str, cals), "--out", str(coadd), "--tile-px", "128"]) == 0
    return Run(root, pointings, raws, calib, cals, coadd)


def test_calibrated_file_has_the_hdus_and_keywords(run: Run) -> None:
    with fits.open(run.raws[0]) as raw, fits.open(run.cals[0], checksum=True) as cal:
        raw.verify("exception")
        cal.verify("exception")
        dets = [h.name for h in raw[1:]]
        assert [h.name for h in cal[1:]] == [f"{d}{s}" for d in dets for s in ("", "_VAR", "_MASK")]
        p = cal[0].header
        assert p["EXPID"] == raw[0].header["EXPID"]
        history = "\n".join(map(str, p["HISTORY"]))
        for step in ("calibrate", "cosmic", "background"):
            assert step in history
        for d in dets:
            img, var, msk = cal[d], cal[f"{d}_VAR"], cal[f"{d}_MASK"]
            assert img.header["BITPIX"] == -32  # float32
            assert img.header["GAIN"] == 1.0
            assert img.header["BUNIT"] == "electron"
            assert WCS(img.header).has_celestial
            assert var.header["BITPIX"] == -32
            assert np.all(var.data > 0)
            assert msk.data.dtype == np.uint16
            assert msk.header["BZERO"] == 32768
            assert msk.header[f"MASKBIT{int(MaskBit.CR).bit_length() - 1}"] == "CR"
            assert "CR" in str(msk.header["COMMENT"])
            # the image is in electrons of sky (before subtraction, ~ the sky level): its
            # noise matches the variance plane
            good = msk.data == 0
            resid = img.data[good] / np.sqrt(var.data[good])
            assert 0.8 < 1.4826 * np.median(np.abs(resid - np.median(resid))) < 1.2


def _truth(run: Run, wcs: WCS) -> Table:
    tabs = [Table.read(r.with_suffix(".truth.ecsv")) for r in run.raws]
    t = vstack(tabs, metadata_conflicts="silent")
    _, first = np.unique(t["id"], return_index=True)
    t = t[np.sort(first)]
    t["frames"] = [[k for k, tk in enumerate(tabs) if i in set(tk["id"])] for i in t["id"]]
    t["gx"], t["gy"] = wcs.world_to_pixel_values(t["ra"], t["dec"])
    return t


def test_coadd_matches_the_truth(run: Run) -> None:
    with fits.open(run.coadd) as hdul:
        hdul.verify("exception")
        assert [h.name for h in hdul] == ["PRIMARY", "VARIANCE", "WEIGHT", "MASK", "COUNT"]
        assert hdul[0].header["BUNIT"] == "electron"
        wcs = WCS(hdul[0].header)
        img = np.ascontiguousarray(hdul[0].data, dtype=float)
        err = np.sqrt(np.ascontiguousarray(hdul["VARIANCE"].data, dtype=float))
        count, mask = hdul["COUNT"].data, hdul["MASK"].data
    scale = 3600 * float(np.mean(np.abs(wcs.wcs.cdelt if wcs.wcs.has_cd() is False
                                        else np.diag(wcs.wcs.cd))))  # fmt: skip
    assert scale == pytest.approx(INST.pixel_scale_arcsec, rel=1e-3)
    t = _truth(run, wcs)
    fwhms = [p.seeing_arcsec / scale for p in run.pointings]
    fwhm = float(np.mean(fwhms))
    r, r1, r2 = 3 * fwhm, 4.5 * fwhm, 6 * fwhm
    ee = [moffat_enclosed(np.array([r, r1, r2]), f, INST.psf_beta) for f in fwhms]
    corrs = [e[0] - (e[2] - e[1]) * r**2 / (r2**2 - r1**2) for e in ee]
    ny, nx = img.shape
    ratios, offsets = [], []
    for k in np.flatnonzero(t["kind"] == "star"):
        x, y, f = float(t["gx"][k]), float(t["gy"][k]), float(t["flux_e"][k])
        if not (r2 + 2 < x < nx - r2 - 3 and r2 + 2 < y < ny - r2 - 3):
            continue
        d = np.hypot(t["gx"] - x, t["gy"] - y)
        if np.any((d > 0) & (d < r2 + 5) & (t["flux_e"] > 2e-3 * f)):
            continue
        box = (slice(int(y - r2), int(y + r2) + 2), slice(int(x - r2), int(x + r2) + 2))
        core = (slice(int(y - r), int(y + r) + 2), slice(int(x - r), int(x + r) + 2))
        if np.any(count[core] != len(t["frames"][k])) or np.any(mask[box]):
            continue
        flux, ferr, _ = sep.sum_circle(img, [x], [y], r, err=err, bkgann=(r1, r2))
        expected = f * float(np.mean([corrs[j] for j in t["frames"][k]]))
        if expected / ferr[0] < 20:
            continue
        ratios.append(flux[0] / expected)
        cx, cy, _ = sep.winpos(img, [x], [y], [fwhm / 2.3548])
        offsets.append((cx[0] - x, cy[0] - y))
    assert len(ratios) >= 10, "too few isolated bright stars"
    ratio = float(np.median(ratios))
    rms_px = float(np.sqrt(np.mean(np.sum(np.array(offsets) ** 2, axis=1))))
    print(f"{len(ratios)} stars: median flux ratio {ratio:.4f}; centroid rms {rms_px:.4f} px")
    assert ratio == pytest.approx(1.0, abs=0.02)
    assert rms_px < 0.1


def test_coadd_of_plain_images_estimates_the_variance(run: Run, tmp_path: Path) -> None:
    """Single-image FITS with a WCS and no variance: coadded, the header says so."""
    plains = []
    for i, cal in enumerate(run.cals):
        with fits.open(cal) as hdul:
            det = hdul[1]
            path = tmp_path / f"plain{i}.fits"
            fits.PrimaryHDU(det.data, det.header).writeto(path)
            plains.append(path)
    out = tmp_path / "plain-coadd.fits"
    assert main(["coadd", *map(str, plains), "--out", str(out), "--method", "median",
                 "--pixel-scale", "1.0"]) == 0  # fmt: skip
    with fits.open(out) as hdul:
        hdul.verify("exception")
        h = hdul[0].header
        assert h["VAREST"] is True
        assert "estimated from its sky noise" in str(h["COMMENT"])
        assert h["COMBINET"] == "median"
        assert 3600 * abs(WCS(h).proj_plane_pixel_scales()[0].to_value("deg")) == (
            pytest.approx(1.0)
        )
        assert np.nanmax(hdul["COUNT"].data) == len(plains)


def _fails(argv: list[str], named: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"lazysky {argv[0]}: error:" in err
    assert named.name in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary file left either
    return err


def test_calibrate_rejects_bad_input(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cal.fits"
    bias = [str(p) for p in run.calib["bias"]]
    raw = str(run.raws[0])
    missing = tmp_path / "nope.fits"
    _fails(["calibrate", str(missing), "--bias", *bias, "--out", str(out)], missing, out, capsys)
    text = tmp_path / "notes.fits"
    text.write_text("not a FITS file\n" * 100)
    _fails(["calibrate", raw, "--bias", *bias, str(text), "--out", str(out)], text, out, capsys)
    # a bias frame with one detector fewer
    fewer = tmp_path / "bias-3det.fits"
    with fits.open(run.calib["bias"][0]) as hdul:
        fits.HDUList([hdul[0], *hdul[1:-1]]).writeto(fewer)
    _fails(["calibrate", raw, "--bias", *bias, str(fewer), "--out", str(out)], fewer, out, capsys)
    # a flat frame cropped to another shape
    cropped = tmp_path / "flat-cropped.fits"
    with fits.open(run.calib["flat-r"][0]) as hdul:
        hdus = [hdul[0]] + [fits.ImageHDU(h.data[:-8], h.header, name=h.name) for h in hdul[1:]]
        fits.HDUList(hdus).writeto(cropped)
    err = _fails(["calibrate", raw, "--bias", *bias, "--flat", str(cropped), "--out", str(out)],
                 cropped, out, capsys)  # fmt: skip
    assert "shape" in err


def test_coadd_rejects_bad_input(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "coadd.fits"
    cal = str(run.cals[0])
    missing = tmp_path / "nope.fits"
    _fails(["coadd", cal, str(missing), "--out", str(out)], missing, out, capsys)
    text = tmp_path / "notes.fits"
    text.write_text("SIMPLE = nonsense\n" * 100)
    _fails(["coadd", cal, str(text), "--out", str(out)], text, out, capsys)
    nowcs = tmp_path / "nowcs.fits"
    with fits.open(run.cals[1]) as hdul:
        fits.PrimaryHDU(hdul[1].data).writeto(nowcs)
    err = _fails(["coadd", cal, str(nowcs), "--out", str(out)], nowcs, out, capsys)
    assert "registration" in err
    assert "--register stars" in err  # registration exists now: the error names the flag


def test_existing_output_is_kept_without_overwrite(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "coadd.fits"
    out.write_bytes(b"keep me")
    capsys.readouterr()
    assert main(["coadd", *map(str, run.cals), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err
    assert out.name in err
    assert out.read_bytes() == b"keep me"


def _sky_steps(coadd: Path) -> float:
    """Largest difference of the median sky between regions covered by 1, 2 or 3 frames."""
    with fits.open(coadd) as hdul:
        img, count, mask = hdul[0].data, hdul["COUNT"].data, hdul["MASK"].data
    levels = [float(np.median(img[(count == n) & (mask == 0)])) for n in (1, 2, 3)
              if np.sum((count == n) & (mask == 0)) > 2000]  # fmt: skip
    assert len(levels) >= 2
    return max(levels) - min(levels)


def test_coadd_subtracts_each_frames_sky_like_swarp(run: Run, tmp_path: Path) -> None:
    # frames calibrated without background subtraction keep their (different) skies
    raw_cal = tmp_path / "cal"
    raw_cal.mkdir()
    argv = ["calibrate", *map(str, run.raws), "--bias", *map(str, run.calib["bias"]),
            "--flat", *map(str, run.calib["flat-r"]), "--no-cosmics",
            "--out", str(raw_cal)]  # fmt: skip
    assert main(argv) == 0
    cals = sorted(map(str, raw_cal.glob("*.cal.fits")))
    kept, subtracted = tmp_path / "kept.fits", tmp_path / "subtracted.fits"
    assert main(["coadd", *cals, "--out", str(kept), "--tile-px", "128",
                 "--no-subtract-background"]) == 0  # fmt: skip
    assert main(["coadd", *cals, "--out", str(subtracted), "--tile-px", "128"]) == 0
    # sky noise is ~60 e- a pixel; frames' skies differ by ~10 % of ~3700 e-
    assert _sky_steps(kept) > 30.0  # steps where the set of frames changes
    assert _sky_steps(subtracted) < 8.0  # none once each frame's sky is subtracted

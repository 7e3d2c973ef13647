"""The survey as written: files, headers, determinism, instruments, bad input, S3, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from lazysky.cli import main
from lazysky.errors import OutputError, ParameterError
from lazysky.simulator import (
    SurveySpec,
    list_instruments,
    load_instrument,
    simulate_survey,
    survey_scene,
)

SMALL = {"instrument": "tiny", "n_epochs": 2, "n_dithers": 1, "n_bias": 1, "n_dark": 1, "n_flat": 1}
REQUIRED_PRIMARY = ("DATE-OBS", "MJD-OBS", "EXPTIME", "FILTER", "INSTRUME", "EXPID", "IMAGETYP")
REQUIRED_DETECTOR = ("DETECTOR", "GAIN", "RDNOISE", "SATURATE", "BUNIT", "EXPTIME", "FILTER")


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_survey(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("survey")
    return out, simulate_survey(SurveySpec(**SMALL, seed=11), out)


def test_layout_and_manifest(small_survey: tuple[Path, Any]) -> None:
    out, _survey = small_survey
    manifest = json.loads((out / "survey.json").read_text())
    assert manifest["spec"]["seed"] == 11
    # every file the manifest lists exists with the recorded SHA-256, and nothing else
    assert _tree(out) == {**manifest["sha256"], "survey.json": _tree(out)["survey.json"]}
    ids = [e["exposure_id"] for e in manifest["exposures"]]
    assert ids == ["deep1-r-e000-d00", "deep1-r-e001-d00"]
    for e in manifest["exposures"]:
        assert set(e["files"]) == {"fits", "truth", "cosmics"}
    assert manifest["calibrations"] == {
        "bias": ["calib/tiny-bias-000.fits"],
        "dark": ["calib/tiny-dark-000.fits"],
        "flat": ["calib/tiny-flat-r-000.fits"],
    }
    scene = Table.read(out / "truth" / "scene.ecsv")
    assert set(scene["kind"]) == {"star", "galaxy", "transient", "variable", "mover"}


def test_headers_verify_and_carry_what_a_pipeline_needs(small_survey: tuple[Path, Any]) -> None:
    out, _ = small_survey
    inst = load_instrument("tiny")
    files = sorted((out / "raw").glob("*.fits")) + sorted((out / "calib").glob("*.fits"))
    # truth is never FITS: a folder of raw/*.fits is exactly the exposures (ingest takes it)
    assert len(files) == 5
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a bad checksum only warns in astropy
            with fits.open(path, checksum=True) as hdul:
                hdul.verify("exception")
                assert len(hdul) == 1 + inst.n_detectors
                for key in REQUIRED_PRIMARY:
                    assert key in hdul[0].header, (path.name, key)
                for hdu in hdul[1:]:
                    for key in REQUIRED_DETECTOR:
                        assert key in hdu.header, (path.name, hdu.name, key)
                    assert hdu.data.dtype == np.uint16
                    assert hdu.header["BZERO"] == 32768
                    assert hdu.data.shape == inst.raw_shape
                    assert hdu.header["DATASEC"] == "[1:256,1:256]"
                    assert hdu.header["BIASSEC"] == "[257:272,1:256]"
                    assert hdu.header["CTYPE1"] == "RA---TAN"
                    assert hdu.header["CHECKSUM"]
    with fits.open(files[0]) as hdul:
        assert hdul[0].header["IMAGETYP"] == "object"
        assert [h.name for h in hdul[1:]] == ["CCD01", "CCD02", "CCD03", "CCD04"]


def test_same_seed_same_bytes_other_seed_differs(
    tmp_path: Path, small_survey: tuple[Path, Any]
) -> None:
    out, _ = small_survey
    simulate_survey(SurveySpec(**SMALL, seed=11), tmp_path / "again")
    assert _tree(tmp_path / "again") == _tree(out)
    simulate_survey(SurveySpec(**SMALL, seed=12), tmp_path / "other")
    other = _tree(tmp_path / "other")
    same = _tree(out)
    for name in (
        "raw/deep1-r-e000-d00.fits",
        "raw/deep1-r-e000-d00.truth.ecsv",
        "truth/scene.ecsv",
    ):
        assert other[name] != same[name]
    # the camera is the same: its fixed defects do not depend on the survey seed
    with (
        fits.open(out / "calib/tiny-bias-000.fits") as a,
        fits.open(tmp_path / "other/calib/tiny-bias-000.fits") as b,
    ):
        for k in range(1, len(a)):
            for key in ("GAIN", "RDNOISE", "SATURATE"):
                assert a[k].header[key] == b[k].header[key]
            # same bias level and pattern; only the noise and a small drift differ
            diff = a[k].data.astype(float) - b[k].data.astype(float)
            assert abs(diff.mean()) < 6.0


def test_detector_subset_and_scheduler_do_not_change_bytes(
    tmp_path: Path, small_survey: tuple[Path, Any]
) -> None:
    out, _ = small_survey
    spec = SurveySpec(**SMALL, seed=11, detectors=("CCD03",))
    simulate_survey(spec, tmp_path / "sync", scheduler="sync", calibrations=False)
    with (
        fits.open(tmp_path / "sync/raw/deep1-r-e000-d00.fits") as sub,
        fits.open(out / "raw/deep1-r-e000-d00.fits") as full,
    ):
        assert len(sub) == 2
        np.testing.assert_array_equal(sub["CCD03"].data, full["CCD03"].data)


def test_instruments_are_data_and_realistic() -> None:
    assert list_instruments() == ["ccdmosaic", "roman", "tiny"]
    roman, ccd = load_instrument("roman"), load_instrument("ccdmosaic")
    assert roman.n_detectors == 18
    assert roman.detector_shape == (4088, 4088)
    assert roman.pixel_scale_arcsec == pytest.approx(0.11)
    assert ccd.pixel_scale_arcsec == pytest.approx(0.26)
    assert ccd.overscan_px > 0
    assert roman.overscan_px == 0
    assert ccd.read_noise_e > roman.read_noise_e
    assert ccd.bad_columns > 0
    for name in list_instruments():
        inst = load_instrument(name)
        ny, nx = inst.detector_shape
        boxes = [(d.x0, d.x0 + nx, d.y0, d.y0 + ny) for d in inst.detectors]
        for i, a in enumerate(boxes):  # detectors never overlap: there are gaps
            for b in boxes[i + 1 :]:
                assert a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2], name


def test_instrument_from_yaml_file(tmp_path: Path) -> None:
    from importlib import resources

    text = (resources.files("lazysky.simulator") / "instruments" / "tiny.yaml").read_text()
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        text.replace("name: tiny", "name: mine").replace("grid: [2, 2]", "grid: [3, 1]")
    )
    inst = load_instrument(mine)
    assert (inst.name, inst.n_detectors) == ("mine", 3)
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("gain_e_per_adu: 1.6", "gain_e_per_adu: -1"))
    with pytest.raises(ParameterError, match="gain_e_per_adu"):
        load_instrument(broken)


def test_star_counts_follow_the_requested_slope() -> None:
    spec = SurveySpec(instrument="tiny", star_density_per_deg2=3e5, galaxy_density_per_deg2=0)
    t = survey_scene(spec).table
    mags = np.sort(np.asarray(t["mag"][t["kind"] == "star"]))
    grid = np.linspace(17, 25, 9)
    counts = np.searchsorted(mags, grid)
    slope = np.polyfit(grid, np.log10(counts), 1)[0]
    assert slope == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"instrument": "hubble"}, ["unknown instrument 'hubble'", "ccdmosaic", "roman", "tiny"]),
        ({"exptime_s": -5}, ["exptime_s", "greater than 0", "-5"]),
        ({"n_epochs": 0}, ["n_epochs", "greater than or equal to 1"]),
        ({"filter": "Y"}, ["no filter 'Y'", "['g', 'i', 'r']"]),
        ({"detectors": ["CCD09"]}, ["no detector 'CCD09'", "CCD01"]),
        ({"star_mag_range": [25, 14]}, ["star_mag_range", "bright < faint"]),
        ({"field_name": "a/b"}, ["field_name"]),
        ({"n_epoch": 3}, ["n_epoch", "Extra inputs"]),
    ],
)
def test_bad_parameters_clear_error_nothing_written(
    tmp_path: Path, fields: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ParameterError) as err:
        simulate_survey(SurveySpec(**fields), tmp_path / "out")
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_clear_error_nothing_written(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="cannot write the survey to"):
        simulate_survey(SurveySpec(**SMALL), blocker / "out")
    assert blocker.read_text() == "not a directory"


def test_failure_mid_way_leaves_nothing_partial(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # A directory squatting where the second exposure's FITS must go: that write fails
    # for real, after other exposures were already written.
    (out / "raw" / "deep1-r-e001-d00.fits").mkdir(parents=True)
    with pytest.raises(OSError, match=r"deep1-r-e001-d00\.fits"):
        simulate_survey(SurveySpec(**SMALL), out, scheduler="sync")
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == []
    assert not (out / "survey.json").exists()


def test_existing_survey_needs_overwrite(tmp_path: Path) -> None:
    spec = SurveySpec(**{**SMALL, "n_epochs": 1}, seed=3)
    simulate_survey(spec, tmp_path, calibrations=False)
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="overwrite"):
        simulate_survey(spec, tmp_path)
    assert _tree(tmp_path) == before
    simulate_survey(SurveySpec(**{**SMALL, "n_epochs": 1}, seed=4), tmp_path, overwrite=True)
    after = json.loads((tmp_path / "survey.json").read_text())
    assert after["spec"]["seed"] == 4
    assert set(_tree(tmp_path)) == {*after["sha256"], "survey.json"}  # no stale files


@pytest.mark.s3
def test_survey_to_s3_same_bytes_as_local(
    tmp_path: Path, s3_bucket: tuple[str, dict[str, Any]]
) -> None:
    import s3fs

    bucket, opts = s3_bucket
    spec = SurveySpec(**{**SMALL, "n_epochs": 1}, seed=5)
    simulate_survey(spec, f"s3://{bucket}/survey", storage_options=opts, calibrations=False)
    simulate_survey(spec, tmp_path, calibrations=False)
    fs = s3fs.S3FileSystem(**opts)
    local = _tree(tmp_path)
    remote = {
        p.split("/survey/", 1)[1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in fs.find(f"{bucket}/survey")
    }
    assert remote == local


def test_cli_simulate_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "simulate",
            "--out",
            str(tmp_path / "s"),
            "--epochs",
            "1",
            "--dithers",
            "1",
            "--detectors",
            "CCD02",
            "--no-calib",
            "--seed",
            "9",
        ]
    )
    assert code == 0
    assert "1 exposures" in capsys.readouterr().out
    assert (tmp_path / "s" / "raw" / "deep1-r-e000-d00.fits").is_file()
    assert main(["simulate", "--out", str(tmp_path / "bad"), "--exptime", "-1"]) == 1
    err = capsys.readouterr().err
    assert "exptime_s" in err
    assert "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_help_is_instant_no_heavy_imports() -> None:
    code = (
        "import sys, lazysky.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('numpy', 'astropy', 'dask', 'pydantic') if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "simulate" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == "HEAVY:"

"""The spine end to end: a simulated survey ingests into the Zarr store and reads back whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from lazysky.simulator import SurveySpec, simulate_survey
from lazysky.zarr_store import exposure_wcs, ingest, list_exposures, open_exposure, open_exposures


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    raw = tmp_path_factory.mktemp("sim")
    spec = SurveySpec(instrument="tiny", n_epochs=2, n_dithers=1, n_bias=3, n_dark=0, n_flat=3)
    simulate_survey(spec, raw)
    root = tmp_path_factory.mktemp("store")
    report = ingest([str(raw / "raw"), str(raw / "calib")], str(root), tile_shape=(128, 128))
    assert report.ok, report.summary()
    return raw, root


def test_every_simulated_file_is_an_exposure(store: tuple[Path, Path]) -> None:
    _raw, root = store
    ids = list_exposures(str(root))
    expected = ["deep1-r-e000-d00", "deep1-r-e001-d00"]
    expected += [f"tiny-bias-{i:03d}" for i in range(3)] + [
        f"tiny-flat-r-{i:03d}" for i in range(3)
    ]
    assert ids == sorted(expected)


def test_pixels_headers_and_wcs_survive(store: tuple[Path, Path]) -> None:
    raw, root = store
    ds = open_exposure(str(root), "deep1-r-e001-d00")
    assert ds.sci.dtype == np.uint16
    assert ds.sci.chunks is not None
    with fits.open(raw / "raw" / "deep1-r-e001-d00.fits") as hdul:
        for k, hdu in enumerate(hdul[1:]):
            np.testing.assert_array_equal(ds.sci.isel(detector=k).values, hdu.data)
            assert str(ds.detector.values[k]) == hdu.name
            assert float(ds.gain.values[k]) == hdu.header["GAIN"]
            assert float(ds.saturate.values[k]) == hdu.header["SATURATE"]
    # the truth lands where the stored WCS says, as it did with the FITS WCS
    truth = Table.read(raw / "raw" / "deep1-r-e001-d00.truth.ecsv")
    for det in ("CCD01", "CCD04"):
        rows = truth[truth["detector"] == det]
        x, y = exposure_wcs(ds, det).world_to_pixel_values(rows["ra"], rows["dec"])
        np.testing.assert_allclose(x, rows["x"], atol=1e-6)
        np.testing.assert_allclose(y, rows["y"], atol=1e-6)
    assert str(ds.filter.values) == "r"
    assert str(ds.imagetyp.values) == "object"


def test_field_opens_as_one_lazy_dataset(store: tuple[Path, Path]) -> None:
    _, root = store
    field = open_exposures(str(root), imagetyp="object")
    assert list(field.exposure.values) == ["deep1-r-e000-d00", "deep1-r-e001-d00"]
    assert field.sci.dims == ("exposure", "detector", "y", "x")
    mjd = field.mjd_obs.values
    assert mjd[1] - mjd[0] == pytest.approx(5.0, abs=0.2)
    w0 = exposure_wcs(field, "CCD02", exposure="deep1-r-e000-d00")
    w1 = exposure_wcs(field, "CCD02", exposure="deep1-r-e001-d00")
    assert isinstance(w0, WCS)
    assert isinstance(w1, WCS)
    assert not np.allclose(w0.wcs.crval, w1.wcs.crval)  # pointing errors differ per epoch


def test_pipeline_calibrates_straight_from_the_store(store: tuple[Path, Path]) -> None:
    from lazysky.pipeline import calibrate_exposure, make_masters
    from lazysky.pipeline.testing import exposure_from_fits

    raw, root = store
    r = str(root)
    bias = [open_exposure(r, f"tiny-bias-{i:03d}") for i in range(3)]
    flat = [open_exposure(r, f"tiny-flat-r-{i:03d}") for i in range(3)]
    science = open_exposure(r, "deep1-r-e001-d00")
    cal = calibrate_exposure(science, make_masters(bias=bias, flat=flat))  # lazy: a graph
    image = cal.image.compute()
    # the same pixels through the in-memory FITS path give the same result (to float32
    # rounding: the store's tiles are 128 px, the FITS path's 1024, so sums differ in order)
    from_fits = [exposure_from_fits(raw / "calib" / f"tiny-bias-{i:03d}.fits") for i in range(3)]
    flats_fits = [exposure_from_fits(raw / "calib" / f"tiny-flat-r-{i:03d}.fits") for i in range(3)]
    ref = calibrate_exposure(
        exposure_from_fits(raw / "raw" / "deep1-r-e001-d00.fits"),
        make_masters(bias=from_fits, flat=flats_fits),
    )
    np.testing.assert_allclose(image.values, ref.image.values, rtol=1e-6, atol=1e-3)
    # and flat fielding made the sky level agree across detectors of different gain and
    # vignetting (raw levels differ by more than 5 %, calibrated ones by less than 1 %)
    sky = np.array([np.median(image.values[k]) for k in range(4)])
    raw_sky = np.array([np.median(science.sci.values[k, :, :256]) for k in range(4)])
    assert np.ptp(sky) / np.median(sky) < 0.01
    assert np.ptp(raw_sky) / np.median(raw_sky) > 0.02

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
    spec = SurveySpec(instrument="tiny", n_epochs=2, n_dithers=1, n_bias=2, n_dark=0, n_flat=1)
    simulate_survey(spec, raw)
    root = tmp_path_factory.mktemp("store")
    report = ingest([str(raw / "raw"), str(raw / "calib")], str(root), tile_shape=(128, 128))
    assert report.ok, report.summary()
    return raw, root


def test_every_simulated_file_is_an_exposure(store: tuple[Path, Path]) -> None:
    _raw, root = store
    ids = list_exposures(str(root))
    assert ids == sorted(
        [
            "deep1-r-e000-d00",
            "deep1-r-e001-d00",
            "tiny-bias-000",
            "tiny-bias-001",
            "tiny-flat-r-000",
        ]
    )


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

"""Real FITS files (../shared/data/real, see its README): ingest and round-trip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from zs_helpers import REAL_DATA

from lazysky.zarr_store import exposure_metadata, exposure_wcs, ingest, open_exposure

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no real FITS data at {REAL_DATA}"),
]

FILES = sorted(p.name for p in REAL_DATA.glob("*.fits")) if REAL_DATA.is_dir() else []


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("real") / "store"
    report = ingest([REAL_DATA / f for f in FILES], store, tile_shape=(256, 256))
    assert report.ok, report.summary()
    return store


@pytest.mark.parametrize("name", FILES)
def test_real_file_pixels_round_trip(real_store, name):
    assert len(FILES) >= 10
    ds = open_exposure(real_store, name.removesuffix(".fits"))
    with fits.open(REAL_DATA / name) as hdul:
        data = hdul[0].data
        assert ds.sizes["detector"] == 1  # HorseHead's table extension is skipped
        got = ds.sci[0].values
        assert got.dtype == data.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, data)
        assert exposure_metadata(real_store, name.removesuffix(".fits"))["source"]["size"] == (
            (REAL_DATA / name).stat().st_size)


def test_unsigned_16_bit_without_wcs(real_store):
    ds = open_exposure(real_store, "M13_blue_0001")
    assert ds.sci.dtype == np.uint16
    from lazysky.zarr_store import exposure_header
    hdr = exposure_header(ds, str(ds.detector.values[0]))
    assert (hdr["BITPIX"], hdr["BZERO"]) == (16, 32768)  # stored signed, read unsigned
    assert exposure_wcs(ds, str(ds.detector.values[0])) is None
    assert exposure_metadata(real_store, "M13_blue_0001")["footprint_circle"] is None


@pytest.mark.parametrize("name", ["gc_2mass_j.fits", "HorseHead.fits",
                                  "spitzer_example_image.fits"])
def test_real_wcs_agrees_to_1e_6_pixel(real_store, name):
    ds = open_exposure(real_store, name.removesuffix(".fits"))
    got = exposure_wcs(ds, str(ds.detector.values[0]))
    assert got is not None
    with fits.open(REAL_DATA / name) as hdul, warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        ref = WCS(hdul[0].header, naxis=2)
        ny, nx = hdul[0].data.shape
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, nx - 1, 300), rng.uniform(0, ny - 1, 300)
    lon, lat = ref.all_pix2world(x, y, 0)
    x2, y2 = got.all_world2pix(lon, lat, 0)
    assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-6
    if name.startswith("spitzer"):
        assert got.wcs.ctype[0].startswith("GLON")  # Galactic CAR kept as is
        from astropy.coordinates import SkyCoord

        ra, dec, radius = exposure_metadata(real_store, "spitzer_example_image")[
            "footprint_circle"]
        center = ref.pixel_to_world((nx - 1) / 2, (ny - 1) / 2).icrs  # footprint is ICRS
        assert center.separation(SkyCoord(ra, dec, unit="deg")).deg < 0.05 * radius

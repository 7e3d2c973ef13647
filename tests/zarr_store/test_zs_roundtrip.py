"""Round trips: pixels per dtype, headers, WCS, chunked == in-memory, file formats."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from zs_helpers import raise_if_dask_computes

from lazysky.zarr_store import (
    exposure_header,
    exposure_metadata,
    exposure_wcs,
    find_exposures,
    ingest,
    list_exposures,
    open_exposure,
    open_exposures,
    parse_iraf_section,
    primary_header,
)


def _fits_images(path: Path) -> dict[str, np.ndarray]:
    with fits.open(path) as hdul:
        return {
            (h.name if i else "PRIMARY"): np.array(h.data)
            for i, h in enumerate(hdul) if h.data is not None
        }


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32", "uint32", "float32",
                                   "float64"])
def test_pixels_round_trip_exactly_per_dtype(make_fits, tmp_path, dtype):
    path = make_fits("e-" + dtype, dtype=dtype, shape=(70, 90), detectors=2, seed=3)
    report = ingest(path, tmp_path / "store", tile_shape=(32, 32))
    assert report.ok, report.summary()
    ds = open_exposure(tmp_path / "store", "e-" + dtype)
    assert ds.sci.dtype == np.dtype(dtype)  # raw dtype kept: uint16 via BZERO stays uint16
    assert ds.sci.dims == ("detector", "y", "x")
    truth = _fits_images(path)
    assert list(ds.detector.values) == list(truth)
    for name, data in truth.items():
        got = ds.sci.sel(detector=name).values
        assert got.dtype == data.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, data)  # NaNs compare equal here, in place
        if data.dtype.kind == "f":
            assert np.isnan(got).sum() == np.isnan(data).sum() > 0


def test_headers_rebuilt_with_comment_and_history(make_fits, tmp_path):
    path = make_fits("hdr1")
    assert ingest(path, tmp_path / "s").ok
    ds = open_exposure(tmp_path / "s", "hdr1")
    with fits.open(path) as hdul:
        for hdu in hdul[1:]:
            got = exposure_header(ds, hdu.name)
            assert [c.image for c in got.cards] == [c.image for c in hdu.header.cards]
            assert "detector" in str(got["HISTORY"])
            assert "must survive" in str(got["COMMENT"])
        prim = primary_header(ds)
        assert [c.image for c in prim.cards] == [c.image for c in hdul[0].header.cards]
        assert prim["HISTORY"][0] == "primary HISTORY card"


def test_wcs_agrees_with_fits_to_1e_6_pixel(make_fits, tmp_path):
    path = make_fits("wcs1", shape=(120, 160))
    assert ingest(path, tmp_path / "s").ok
    ds = open_exposure(tmp_path / "s", "wcs1")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-50, 200, 200), rng.uniform(-50, 170, 200)
    with fits.open(path) as hdul:
        for hdu in hdul[1:]:
            ref, got = WCS(hdu.header), exposure_wcs(ds, hdu.name)
            assert got is not None
            ra, dec = ref.all_pix2world(x, y, 0)
            x2, y2 = got.all_world2pix(ra, dec, 0)
            assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-6
            ra2, _dec2 = got.all_pix2world(x, y, 0)
            assert np.max(np.abs(ra2 - ra) * np.cos(np.radians(dec))) * 3600 < 1e-7


def test_metadata_queryable_without_pixels(make_fits, tmp_path):
    path = make_fits("meta1", filter="g", mjd=60001.5, field="deep2")
    assert ingest(path, tmp_path / "s").ok
    meta = exposure_metadata(tmp_path / "s", "meta1")
    assert (meta["instrument"], meta["filter"], meta["mjd_obs"], meta["object"]) == (
        "tiny", "g", 60001.5, "deep2")
    import hashlib
    assert meta["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["source"]["size"] == path.stat().st_size
    assert meta["source"]["name"] == path.name
    assert meta["source"]["checksums_verified"] == 4
    ra, dec, radius = meta["footprint_circle"]
    assert abs(ra - 150.01) < 0.02
    assert abs(dec - 2.2) < 0.02
    assert 0 < radius < 0.1
    assert len(meta["footprints"]) == 3
    assert len(meta["footprints"][0]) == 4


def test_datasec_biassec_carried_per_detector(make_fits, tmp_path):
    path = make_fits("sec1", shape=(50, 64), detectors=2)
    assert ingest(path, tmp_path / "s").ok
    ds = open_exposure(tmp_path / "s", "sec1")
    assert list(ds.datasec.values) == ["[1:56,1:50]"] * 2
    assert list(ds.biassec.values) == ["[57:64,1:50]"] * 2
    ys, xs = parse_iraf_section(str(ds.biassec.values[0]), shape=(50, 64))
    assert ds.sci[0, ys, xs].shape == (50, 8)
    np.testing.assert_allclose(ds.gain.values, [1.5, 1.6])


@pytest.mark.parametrize("tile", [(16, 16), (32, 48), (1024, 1024)])
def test_chunked_reads_equal_in_memory(make_fits, tmp_path, tile):
    path = make_fits("chk", shape=(75, 101), detectors=2, dtype="float32")
    assert ingest(path, tmp_path / "s", tile_shape=tile).ok
    ds = open_exposure(tmp_path / "s", "chk")
    assert ds.sci.data.chunksize == (1, min(tile[0], 75), min(tile[1], 101))
    full = ds.sci.values
    truth = np.stack(list(_fits_images(path).values()))
    np.testing.assert_array_equal(full, truth)
    part = ds.sci[:, 7:70, 13:99].chunk({"y": 10, "x": 17}).compute().values
    np.testing.assert_array_equal(part, truth[:, 7:70, 13:99])
    np.testing.assert_allclose(float(ds.sci.mean(skipna=True)), np.nanmean(truth), rtol=1e-6)


def test_open_is_lazy(make_fits, tmp_path):
    for k in range(2):
        assert ingest(make_fits(f"lazy{k}", seed=k, mjd=60000 + k), tmp_path / "s").ok
    with raise_if_dask_computes():
        assert list_exposures(tmp_path / "s") == ["lazy0", "lazy1"]
        assert find_exposures(tmp_path / "s", mjd_range=(60000.5, 60002)) == ["lazy1"]
        assert exposure_metadata(tmp_path / "s", "lazy0")["filter"] == "r"
        ds = open_exposure(tmp_path / "s", "lazy0")
        assert exposure_wcs(ds, "CCD02") is not None
        assert exposure_header(ds, "CCD01")["EXTNAME"] == "CCD01"
        assert primary_header(ds)["EXPID"] == "lazy0"
        many = open_exposures(tmp_path / "s", filter="r")
        assert many is not None
        assert many.sci.dims == ("exposure", "detector", "y", "x")
        assert exposure_wcs(many, "CCD01", exposure="lazy1") is not None
        sub = many.sci.sel(detector="CCD01")[:, 10:20, 10:20] * 2
    assert sub.compute().shape == (2, 10, 10)


def test_open_exposures_filters(make_fits, tmp_path):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    store = tmp_path / "s"
    specs = [("a", "r", 60000.0, "deep1", (150.0, 2.2)), ("b", "g", 60001.0, "deep1", (150.0, 2.2)),
             ("c", "r", 60002.0, "deep2", (10.0, -30.0))]
    for i, (eid, flt, mjd, field, crval) in enumerate(specs):
        assert ingest(make_fits(eid, filter=flt, mjd=mjd, field=field, crval=crval, seed=i),
                      store).ok
    assert list_exposures(store) == ["a", "b", "c"]
    assert list(open_exposures(store, filter="r").exposure.values) == ["a", "c"]
    assert list(open_exposures(store, field="deep1").exposure.values) == ["a", "b"]
    assert list(open_exposures(store, mjd_range=(60000.5, 60003)).exposure.values) == ["b", "c"]
    cone = (SkyCoord(10.01, -30.0, unit="deg"), 0.1 * u.deg)
    assert list(open_exposures(store, footprint=cone).exposure.values) == ["c"]
    both = open_exposures(store, ["c", "a"])
    assert list(both.exposure.values) == ["a", "c"]  # sorted by MJD
    np.testing.assert_array_equal(both.mjd_obs.values, [60000.0, 60002.0])
    from lazysky.zarr_store import NoExposuresWarning
    with pytest.warns(NoExposuresWarning):
        assert open_exposures(store, filter="z") is None


@pytest.mark.parametrize("kind", ["gz", "fz", "single"])
def test_compressed_and_single_image_files(make_fits, tmp_path, kind):
    if kind == "single":
        path = make_fits("one", single=True, detectors=1, dtype="int16")
    else:
        plain = make_fits("cmp", dtype="int16")
        if kind == "gz":
            path = plain.with_suffix(".fits.gz")
            with plain.open("rb") as f, gzip.open(path, "wb") as g:
                shutil.copyfileobj(f, g)
        else:
            path = plain.with_suffix(".fits.fz")
            with fits.open(plain) as hdul:
                comp = [fits.PrimaryHDU(header=hdul[0].header)] + [
                    fits.CompImageHDU(h.data, h.header, compression_type="RICE_1")
                    for h in hdul[1:]
                ]
                fits.HDUList(comp).writeto(path, checksum=True)
        plain.unlink()
    report = ingest(path, tmp_path / "s", tile_shape=(32, 32))
    assert report.ok, report.summary()
    eid = report.ingested[0].exposure_id
    ds = open_exposure(tmp_path / "s", eid)
    with fits.open(path) as hdul:
        images = [h for h in hdul if h.is_image and h.data is not None]
        assert ds.sizes["detector"] == len(images)
        for k, h in enumerate(images):
            np.testing.assert_array_equal(ds.sci[k].values, h.data)
    if kind == "single":
        assert list(ds.detector.values) == ["CCD01"]  # DETECTOR keyword of the primary HDU
        assert exposure_wcs(ds, "CCD01") is not None

"""The xarray engine ``lazysky-fits``: FITS opened directly, lazily, like an ingest."""

from __future__ import annotations

import numpy as np
import xarray as xr
from astropy.io import fits
from zs_helpers import raise_if_dask_computes

from lazysky.zarr_store import exposure_header, exposure_wcs, ingest, open_exposure


def test_engine_opens_fits_lazily_and_matches_ingest(make_fits, tmp_path):
    path = make_fits("eng1", shape=(90, 70), detectors=3, dtype="uint16")
    with raise_if_dask_computes():
        ds = xr.open_dataset(path, engine="lazysky-fits", chunks={}, tile_shape=(32, 32))
        assert ds.sci.data.chunks == ((1, 1, 1), (32, 32, 26), (32, 32, 6))
        assert exposure_wcs(ds, "CCD02") is not None
        lazy = ds.sci[:, 5:80, 3:66].sum(dim="detector")
    with fits.open(path) as hdul:
        truth = np.stack([h.data for h in hdul[1:]])
        np.testing.assert_array_equal(ds.sci.values, truth)
        assert ds.sci.dtype == np.uint16
        np.testing.assert_array_equal(lazy.values, truth[:, 5:80, 3:66].sum(axis=0))
        assert [c.image for c in exposure_header(ds, "CCD03").cards] == [
            c.image for c in hdul[3].header.cards]
    assert ingest(path, tmp_path / "s").ok
    stored = open_exposure(tmp_path / "s", "eng1")
    for name in ("detector", "header", "datasec", "biassec", "primary_header", "mjd_obs"):
        np.testing.assert_array_equal(ds[name].values, stored[name].values)


def test_engine_without_dask_indexes_lazily(make_fits):
    path = make_fits("eng2", shape=(40, 50), detectors=2, dtype="float32")
    ds = xr.open_dataset(path, engine="lazysky-fits")
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(ds.sci[1, 3:30:4, 7].values, hdul[2].data[3:30:4, 7])
        np.testing.assert_array_equal(ds.sci[:, 2, 2:4].values,
                                      np.stack([h.data[2, 2:4] for h in hdul[1:]]))

"""An xarray backend for FITS exposures: ``xr.open_dataset(path, engine="lazysky-fits")``.

Gives the same Dataset as :func:`~lazysky.zarr_store.open_exposure` (``sci (detector, y,
x)`` and the same metadata coordinates), read straight from the FITS file: pixels come
from ``ImageHDU.section`` on demand, so with ``chunks={}`` each dask block reads only its
own rows and columns. The file is not checksummed on open (pass
``verify_checksums=True`` to stream it once first, as ingest does).

Examples
--------
>>> import xarray as xr
>>> ds = xr.open_dataset("exp.fits", engine="lazysky-fits", chunks={})  # doctest: +SKIP
>>> ds.sci.sel(detector="CCD01")[:100, :100].mean().compute()  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from lazysky.zarr_store._fits import FITS_SUFFIXES, ExposureSource, FitsSource, inspect_fits
from lazysky.zarr_store._write import chunk_shape_for, group_attrs
from lazysky.zarr_store.open import dataset_from_attrs

__all__ = ["FitsExposureArray", "LazySkyFitsBackend"]


class FitsExposureArray(BackendArray):
    """``(detector, y, x)`` pixels of a FITS exposure, read per request; picklable."""

    def __init__(self, plan: ExposureSource) -> None:
        self.plan = plan
        self.shape = (len(plan.detectors), *plan.shape)
        self.dtype = np.dtype(plan.dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray[Any, Any]:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read
        )

    def _read(self, key: tuple[Any, ...]) -> np.ndarray[Any, Any]:
        det_key, y_key, x_key = key
        dets = range(self.shape[0])[det_key]
        indices = [dets] if isinstance(dets, int) else list(dets)
        out = []
        with self.plan.source.open_hdul() as hdul:
            for d in indices:
                block = np.asarray(hdul[self.plan.detectors[d].hdu_index].section[y_key, x_key])
                out.append(block.astype(block.dtype.newbyteorder("="), copy=False))
        if isinstance(dets, int):
            return out[0]
        if not out:
            return np.empty((0, *np.empty(self.shape[1:])[y_key, x_key].shape), self.dtype)
        return np.stack(out)


class LazySkyFitsBackend(BackendEntrypoint):
    """xarray engine ``lazysky-fits``: a FITS exposure as lazysky's exposure Dataset."""

    description = "Open FITS exposures (MEF or single image) as lazysky exposure Datasets"
    url = "https://github.com/lazysky/lazysky/blob/main/docs/zarr_store.md"
    open_dataset_parameters = (
        "filename_or_obj",
        "drop_variables",
        "verify_checksums",
        "storage_options",
        "tile_shape",
    )

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[str],
        *,
        drop_variables: Any = None,
        verify_checksums: bool = False,
        storage_options: dict[str, Any] | None = None,
        tile_shape: tuple[int, int] = (1024, 1024),
    ) -> xr.Dataset:
        src = FitsSource(os.fspath(filename_or_obj), dict(storage_options or {}))
        plan = inspect_fits(src, verify=verify_checksums)
        chunks = chunk_shape_for(plan, tile_shape)
        data = indexing.LazilyIndexedArray(FitsExposureArray(plan))
        ds = dataset_from_attrs(group_attrs(plan, chunks), data, store_url="")
        ds["sci"].encoding["preferred_chunks"] = dict(
            zip(("detector", "y", "x"), chunks, strict=True)
        )
        ds.attrs["source"] = src.url
        # xarray chunks every non-index coordinate of a backend's Dataset when chunks= is
        # given; indexing the headers keeps them in memory, so exposure_wcs stays lazy
        ds = ds.set_xindex("header")
        if drop_variables:
            ds = ds.drop_vars(drop_variables, errors="ignore")
        return ds

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        try:
            return os.fspath(filename_or_obj).lower().endswith(FITS_SUFFIXES)
        except TypeError:
            return False

"""Open ingested exposures as lazy ``xarray.Dataset`` objects (no pixel read until computed).

An exposure opens as ``sci (detector, y, x)`` backed by a dask array over the Zarr chunks,
with per-detector metadata as coordinates along ``detector`` (``header`` — the full FITS
header as card images —, ``hdu``, ``datasec``, ``biassec``, ``gain``, ``rdnoise``,
``saturate``) and per-exposure scalars as coordinates (``exposure``, ``mjd_obs``,
``filter``, ``object``, ``primary_header``, …). Many exposures concatenate along
``exposure`` and the same coordinates gain that dimension, so :func:`exposure_wcs`
works on either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS

from lazysky.errors import IncompleteExposureError, ParameterError, StoreError
from lazysky.zarr_store._headers import cards_to_header, wcs_from_header
from lazysky.zarr_store._layout import RAW, SCI, StoreLike, StoreRoot, parse_store

if TYPE_CHECKING:
    from lazysky.config import Settings

__all__ = [
    "exposure_header",
    "exposure_metadata",
    "exposure_wcs",
    "list_exposures",
    "open_exposure",
    "primary_header",
]

logger = logging.getLogger(__name__)

_SCALARS = ("instrument", "telescope", "filter", "object", "imagetyp", "date_obs")
_NUMBERS = ("mjd_obs", "exptime", "ra", "dec")


def list_exposures(
    store: StoreLike,
    *,
    include_incomplete: bool = False,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> list[str]:
    """The ids of the complete exposures in ``store``, sorted (reads no pixel).

    Examples
    --------
    >>> list_exposures("lazysky-data")  # doctest: +SKIP
    ['deep1-r-e000', 'deep1-r-e001']
    """
    root = parse_store(store, storage_options=storage_options, settings=settings)
    return [i for i, state in root.list_groups() if include_incomplete or state == "complete"]


def _root_checked(root: StoreRoot, exposure_id: str) -> dict[str, Any]:
    state = root.exposure_state(exposure_id)
    if state == "incomplete":
        msg = (
            f"exposure {exposure_id!r} in {root.url!r} is incomplete: an ingest was "
            "interrupted or is still running, so some chunks may be missing (they would "
            "read back as fill values). Re-run `lazysky ingest` on its file to finish it."
        )
        raise IncompleteExposureError(msg)
    if state == "absent":
        msg = f"no exposure {exposure_id!r} in the store {root.url!r}; see list_exposures()"
        raise StoreError(msg)
    return root.read_group_attrs(exposure_id)


def exposure_metadata(
    store: StoreLike,
    exposure_id: str,
    *,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """The lazysky attributes of a complete exposure (id, instrument, filter, MJD,
    footprint, source SHA-256, headers …): one small read, no pixels."""
    root = parse_store(store, storage_options=storage_options, settings=settings)
    return _root_checked(root, exposure_id)


def _num(v: Any) -> float:
    """A float from a number or a numeric string; NaN for anything else (or absent)."""
    if isinstance(v, bool) or v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _dataset(root: StoreRoot, attrs: dict[str, Any], *, token: str) -> xr.Dataset:
    import dask.array as da
    import zarr

    exp = attrs["exposure_id"]
    arr = zarr.open_array(root.zarr_store(RAW, exp, SCI, read_only=True), mode="r")
    sci = da.from_zarr(arr, name=f"open-{exp}-{token}")
    return dataset_from_attrs(attrs, sci, store_url=root.url)


def dataset_from_attrs(attrs: dict[str, Any], sci: Any, *, store_url: str) -> xr.Dataset:
    """The exposure Dataset around a ``(detector, y, x)`` array, from lazysky attributes."""
    exp = attrs["exposure_id"]
    headers = [cards_to_header(c) for c in attrs["detector_headers"]]
    dets = attrs["detectors"]

    def per_det(key: str) -> np.ndarray[Any, Any]:
        return np.array([_num(h.get(key)) for h in headers])

    coords: dict[str, Any] = {
        "detector": ("detector", np.array(dets, dtype=str)),
        "hdu": ("detector", np.array(attrs["hdu_index"], dtype=np.int16)),
        "header": ("detector", np.array(["".join(c) for c in attrs["detector_headers"]])),
        "datasec": ("detector", np.array([str(h.get("DATASEC", "")) for h in headers])),
        "biassec": ("detector", np.array([str(h.get("BIASSEC", "")) for h in headers])),
        "gain": ("detector", per_det("GAIN")),
        "rdnoise": ("detector", per_det("RDNOISE")),
        "saturate": ("detector", per_det("SATURATE")),
        "exposure": exp,
        "primary_header": "".join(attrs["primary_header"]),
        "source_sha256": attrs["source"]["sha256"],
        "source_name": attrs["source"]["name"],
    }
    coords.update({k: str(attrs.get(k) or "") for k in _SCALARS})
    coords.update({k: _num(attrs.get(k)) for k in _NUMBERS})
    ds = xr.Dataset({"sci": (("detector", "y", "x"), sci)}, coords=coords)
    ds["sci"].attrs["long_name"] = "raw pixel values (BZERO/BSCALE applied)"
    ds.attrs.update({"lazysky_format": attrs["format"], "store": store_url})
    return ds


def open_exposure(
    store: StoreLike,
    exposure_id: str,
    *,
    storage_options: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> xr.Dataset:
    """Open one ingested exposure lazily: ``sci (detector, y, x)`` plus metadata coords.

    Raises
    ------
    IncompleteExposureError
        The exposure's ingest never finished (the group is not marked complete).
    StoreError
        No such exposure.

    Examples
    --------
    >>> ds = open_exposure("lazysky-data", "deep1-r-e003-d01")  # doctest: +SKIP
    >>> ds.sci.sel(detector="CCD01")[:100, :100].mean().compute()  # doctest: +SKIP
    """
    from dask.base import tokenize

    root = parse_store(store, storage_options=storage_options, settings=settings)
    attrs = _root_checked(root, exposure_id)
    return _dataset(root, attrs, token=tokenize(root.url, attrs["source"]["sha256"]))


def _pick(ds: xr.Dataset | xr.DataArray, name: str, detector: str, exposure: str | None) -> str:
    if "detector" not in ds.coords or detector not in ds.coords["detector"].values:
        have = list(ds.coords["detector"].values) if "detector" in ds.coords else []
        msg = f"detector {detector!r} is not in this dataset; it has {have}"
        raise ParameterError(msg)
    var = ds.coords[name]
    if "exposure" in var.dims:
        if exposure is None:
            msg = "this dataset holds several exposures: pass exposure='<exposure id>'"
            raise ParameterError(msg)
        var = var.sel(exposure=exposure)
    if "detector" in var.dims:
        var = var.sel(detector=detector)
    return str(var.values)


def exposure_header(
    ds: xr.Dataset | xr.DataArray, detector: str, *, exposure: str | None = None
) -> fits.Header:
    """The FITS header of one detector, as read from the source file (COMMENT/HISTORY too)."""
    text = _pick(ds, "header", detector, exposure)
    return fits.Header.fromstring(text)


def primary_header(ds: xr.Dataset | xr.DataArray, *, exposure: str | None = None) -> fits.Header:
    """The primary FITS header of the exposure's source file."""
    var = ds.coords["primary_header"]
    if "exposure" in var.dims:
        if exposure is None:
            msg = "this dataset holds several exposures: pass exposure='<exposure id>'"
            raise ParameterError(msg)
        var = var.sel(exposure=exposure)
    return fits.Header.fromstring(str(var.values))


def exposure_wcs(
    ds: xr.Dataset | xr.DataArray, detector: str, *, exposure: str | None = None
) -> WCS | None:
    """The celestial WCS of one detector (a fresh object each call), or None without one.

    Examples
    --------
    >>> w = exposure_wcs(ds, "CCD01")  # doctest: +SKIP
    >>> w.pixel_to_world(0, 0)  # doctest: +SKIP
    """
    return wcs_from_header(exposure_header(ds, detector, exposure=exposure))


def _open_many(root: StoreRoot, ids: Sequence[str], attrs: list[dict[str, Any]]) -> xr.Dataset:
    from dask.base import tokenize

    first = attrs[0]
    for a in attrs[1:]:
        if a["detectors"] != first["detectors"] or a["shape"] != first["shape"]:
            msg = (
                f"exposures {first['exposure_id']!r} and {a['exposure_id']!r} differ in "
                f"detectors or shape ({first['detectors']} {first['shape']} vs "
                f"{a['detectors']} {a['shape']}): open them separately or filter by instrument"
            )
            raise ParameterError(msg)
    dsets = [
        _dataset(root, a, token=tokenize(root.url, a["source"]["sha256"])).expand_dims("exposure")
        for a in attrs
    ]
    return xr.concat(
        dsets,
        dim="exposure",
        data_vars="all",
        coords="all",
        compat="equals",
        join="exact",
        combine_attrs="drop_conflicts",
    )

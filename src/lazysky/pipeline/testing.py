"""Exposures as xarray Datasets without the Zarr store: from FITS files, or synthetic.

They have the layout ``lazysky.zarr_store.open_exposure`` returns (``sci (detector, y, x)``
dask-backed in tiles, per-detector ``gain``, ``rdnoise``, ``saturate``, ``datasec``,
``biassec``, ``header``, scalar ``exptime``, ``filter``, ``imagetyp``, ``mjd_obs``,
``exposure``), so the pipeline can be used and tested on simulator files directly.

Examples
--------
>>> ds = synthetic_exposure(n_detectors=2, shape=(10, 14), overscan_px=4)
>>> ds.sci.shape, str(ds.datasec.values[0])
((2, 10, 18), '[1:14,1:10]')
"""

from __future__ import annotations

import os
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits

__all__ = ["exposure_from_fits", "synthetic_exposure"]


def _dataset(data: Any, det: dict[str, list[Any]], scalars: dict[str, Any]) -> xr.Dataset:
    coords: dict[str, Any] = {"detector": det.pop("detector")}
    coords.update({k: ("detector", np.asarray(v)) for k, v in det.items()})
    coords.update(scalars)
    return xr.Dataset({"sci": (("detector", "y", "x"), data)}, coords=coords)


def exposure_from_fits(path: str | os.PathLike[str], *, tile_px: int = 1024) -> xr.Dataset:
    """A raw MEF file as an exposure Dataset, ``sci`` dask-chunked in ``tile_px`` tiles.

    The pixels are read into memory here (a test helper; the Zarr store reads lazily).
    """
    with fits.open(path) as hdul:
        primary = hdul[0].header
        hdus = [h for h in hdul[1:] if h.data is not None]
        arrays = [np.asarray(h.data) for h in hdus]  # ints, BZERO applied by astropy
        det: dict[str, list[Any]] = {
            "detector": [h.name for h in hdus],
            "gain": [float(h.header["GAIN"]) for h in hdus],
            "rdnoise": [float(h.header["RDNOISE"]) for h in hdus],
            "saturate": [float(h.header["SATURATE"]) for h in hdus],
            "datasec": [str(h.header["DATASEC"]) for h in hdus],
            "header": [h.header.tostring(sep="\n") for h in hdus],
        }
        if all("BIASSEC" in h.header for h in hdus):
            det["biassec"] = [str(h.header["BIASSEC"]) for h in hdus]
        scalars = {
            "exptime": float(primary["EXPTIME"]),
            "filter": str(primary.get("FILTER", "")),
            "imagetyp": str(primary.get("IMAGETYP", "")),
            "mjd_obs": float(primary.get("MJD-OBS", np.nan)),
            "exposure": str(primary.get("EXPID", os.path.basename(os.fspath(path)))),
        }
    stack = np.stack(arrays)
    data = da.from_array(stack, chunks=(1, tile_px, tile_px))
    return _dataset(data, det, scalars)


def synthetic_exposure(
    *,
    n_detectors: int = 2,
    shape: tuple[int, int] = (10, 14),
    overscan_px: int = 4,
    level_adu: float = 1000.0,
    signal_adu: float = 100.0,
    tile_px: int = 8,
    exptime_s: float = 60.0,
    imagetyp: str = "object",
) -> xr.Dataset:
    """A small uniform exposure (bias level + signal, overscan on the right), for examples."""
    ny, nx = shape
    raw = np.full((n_detectors, ny, nx + overscan_px), level_adu, dtype=np.uint16)
    raw[:, :, :nx] += np.uint16(signal_adu)
    det: dict[str, list[Any]] = {
        "detector": [f"CCD{i + 1:02d}" for i in range(n_detectors)],
        "gain": [2.0] * n_detectors,
        "rdnoise": [5.0] * n_detectors,
        "saturate": [65535.0] * n_detectors,
        "datasec": [f"[1:{nx},1:{ny}]"] * n_detectors,
        "header": [""] * n_detectors,
    }
    if overscan_px:
        det["biassec"] = [f"[{nx + 1}:{nx + overscan_px},1:{ny}]"] * n_detectors
    scalars = {
        "exptime": float(exptime_s),
        "filter": "r",
        "imagetyp": imagetyp,
        "mjd_obs": 61000.0,
        "exposure": "synthetic",
    }
    data = da.from_array(raw, chunks=(1, tile_px, tile_px))
    return _dataset(data, det, scalars)

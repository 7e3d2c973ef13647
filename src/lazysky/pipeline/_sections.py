"""Input parsing at the boundary: exposures as xarray objects, IRAF sections, per-detector values.

An exposure is what ``lazysky.zarr_store.open_exposure`` returns: an ``xarray.Dataset``
with ``sci (detector, y, x)`` (raw dtype, dask-backed) and, along ``detector``, the
coordinates ``gain``, ``rdnoise``, ``saturate``, ``datasec``, ``biassec``, plus scalar
coordinates ``exptime``, ``imagetyp``, ``exposure``. The ``sci`` DataArray with those
coordinates is accepted too. :func:`parse_exposure` is the one place this is checked.
"""

from __future__ import annotations

import re
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from lazysky.errors import ParameterError

__all__ = ["Section", "detector_values", "parse_exposure", "parse_section", "scalar_value"]

Section = tuple[slice, slice]
_SECTION_RE = re.compile(r"^\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]$")
REQUIRED_DETECTOR_COORDS = ("gain", "rdnoise", "saturate", "datasec")


def parse_section(text: str, *, shape: tuple[int, int], name: str = "section") -> Section:
    """An IRAF section ``[x1:x2,y1:y2]`` (1-based, inclusive) as numpy ``(rows, cols)`` slices.

    Examples
    --------
    >>> parse_section("[257:272,1:256]", shape=(256, 272))
    (slice(0, 256, None), slice(256, 272, None))
    """
    m = _SECTION_RE.match(str(text).strip())
    if m is None:
        msg = f"{name} {text!r} is not an IRAF section like '[1:2048,1:4096]'"
        raise ParameterError(msg)
    x1, x2, y1, y2 = (int(v) for v in m.groups())
    ny, nx = shape
    if not (1 <= x1 <= x2 <= nx and 1 <= y1 <= y2 <= ny):
        msg = f"{name} {text!r} lies outside the {nx} x {ny} raw array (x 1..{nx}, y 1..{ny})"
        raise ParameterError(msg)
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def parse_exposure(exposure: xr.Dataset | xr.DataArray, *, what: str = "exposure") -> xr.DataArray:
    """The raw ``sci (detector, y, x)`` DataArray of an exposure, checked.

    Raises
    ------
    ParameterError
        Not a Dataset with ``sci`` or a DataArray; wrong dimensions; a missing coordinate.
    """
    if isinstance(exposure, xr.Dataset):
        if "sci" not in exposure.data_vars:
            msg = f"{what} has no 'sci' variable (has {sorted(map(str, exposure.data_vars))})"
            raise ParameterError(msg)
        sci = exposure["sci"]
    elif isinstance(exposure, xr.DataArray):
        sci = exposure
    else:
        msg = f"{what} must be an xarray Dataset or DataArray, got {type(exposure).__name__}"
        raise ParameterError(msg)
    if sci.dims != ("detector", "y", "x"):
        msg = f"{what}: sci must have dims ('detector', 'y', 'x'), got {sci.dims}"
        raise ParameterError(msg)
    missing = [c for c in REQUIRED_DETECTOR_COORDS if c not in sci.coords]
    if missing:
        msg = (
            f"{what} lacks the per-detector coordinate(s) {missing}; open it with "
            "lazysky.zarr_store.open_exposure, which provides them from the headers"
        )
        raise ParameterError(msg)
    return sci


def exposure_name(sci: xr.DataArray) -> str:
    """The exposure id if the coordinates have one, else ``'?'`` (for messages and attrs)."""
    if "exposure" in sci.coords and sci.coords["exposure"].ndim == 0:
        return str(sci.coords["exposure"].values)
    return "?"


def sections(sci: xr.DataArray, key: str) -> list[Section]:
    """One section per detector from the string coordinate ``key`` (held in memory)."""
    shape = (int(sci.sizes["y"]), int(sci.sizes["x"]))
    texts = np.atleast_1d(sci.coords[key].values)  # strings: in-memory metadata, never dask
    if texts.size == 1 and sci.sizes["detector"] > 1:
        texts = np.repeat(texts, sci.sizes["detector"])
    return [parse_section(str(t), shape=shape, name=key.upper()) for t in texts]


def detector_values(sci: xr.DataArray, key: str) -> Any:
    """Coordinate ``key`` as a lazy ``(detector, 1, 1)`` float64 array (numpy or dask).

    Scalars broadcast to every detector. Dask-backed coordinates stay lazy.
    """
    coord = sci.coords[key]
    data = coord.data
    n = int(sci.sizes["detector"])
    if coord.ndim == 0:
        value = da.asarray(data).astype(np.float64).reshape(1, 1, 1)
        return da.broadcast_to(value, (n, 1, 1), chunks=((1,) * n, (1,), (1,)))
    if coord.dims != ("detector",):
        msg = f"coordinate {key!r} must be along 'detector' or scalar, got dims {coord.dims}"
        raise ParameterError(msg)
    return da.asarray(data, chunks=1).astype(np.float64).reshape(-1, 1, 1)


def scalar_value(sci: xr.DataArray, key: str, *, default: float | None = None) -> Any:
    """A scalar coordinate as a lazy ``(detector, 1, 1)`` array; ``default`` if absent."""
    if key not in sci.coords:
        if default is None:
            msg = f"the exposure lacks the coordinate {key!r}"
            raise ParameterError(msg)
        return da.full((sci.sizes["detector"], 1, 1), default, dtype=np.float64, chunks=1)
    return detector_values(sci, key)

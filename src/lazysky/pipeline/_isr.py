"""Instrument-signature removal shared by the masters and calibration: trim and overscan.

Kernels: :func:`overscan_level` (per-row median of the overscan strip, optionally a
running median along rows). Lazy helpers: :func:`trimmed` (the DATASEC of each detector
as one ``(detector, y, x)`` dask array) and :func:`overscan` (the per-row level as
``(detector, y, 1)``, chunked like the trimmed rows).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from numpy.typing import NDArray
from scipy import ndimage

from lazysky.errors import ParameterError
from lazysky.pipeline._sections import sections

__all__ = ["overscan", "overscan_level", "trimmed"]


def overscan_level(strip: NDArray[Any], *, window_rows: int = 1) -> NDArray[np.float32]:
    """Per-row median of an overscan strip ``(..., rows, cols)`` → ``(..., rows, 1)``.

    ``window_rows`` > 1 smooths the levels with a running median over that many rows
    (edges: nearest), which suppresses the read noise of a short strip; 1 leaves the
    per-row medians as they are.

    Examples
    --------
    >>> import numpy as np
    >>> strip = np.full((10, 14), 1000.0)
    >>> strip[4, 0] = 5000.0
    >>> overscan_level(strip)[4, 0]
    np.float32(1000.0)
    """
    if window_rows < 1 or window_rows % 2 == 0:
        msg = f"overscan_window_rows must be an odd number >= 1, got {window_rows}"
        raise ParameterError(msg)
    values = np.asarray(strip, dtype=np.float32)
    if values.size == 0:
        return np.zeros((*values.shape[:-1], 1), dtype=np.float32)
    level = np.median(values, axis=-1)
    if window_rows > 1:
        size = [1] * (level.ndim - 1) + [window_rows]
        level = ndimage.median_filter(level, size=size, mode="nearest")
    return np.asarray(level, dtype=np.float32)[..., None]


def trimmed(sci: xr.DataArray) -> da.Array:
    """The DATASEC of every detector, stacked: ``(detector, y, x)`` in the raw dtype (lazy)."""
    data = da.asarray(sci.data)
    secs = sections(sci, "datasec")
    shapes = {(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in secs}
    if len(shapes) != 1:
        msg = f"DATASEC differs in size between detectors ({sorted(shapes)}); cannot stack them"
        raise ParameterError(msg)
    if all(s == secs[0] for s in secs):
        return data[:, secs[0][0], secs[0][1]]
    return da.stack([data[d, ys, xs] for d, (ys, xs) in enumerate(secs)])


def overscan(sci: xr.DataArray, *, window_rows: int, like: da.Array) -> da.Array:
    """Per-row overscan level ``(detector, y, 1)`` float32 (lazy), chunked like ``like`` rows.

    Rows are those of DATASEC. Without a ``biassec`` coordinate (no overscan, e.g. an
    infrared array) the level is 0.
    """
    data = da.asarray(sci.data)
    n_det = int(sci.sizes["detector"])
    ny = int(like.shape[1])
    if "biassec" not in sci.coords:
        return da.zeros((n_det, ny, 1), dtype=np.float32, chunks=(1, like.chunks[1], 1))
    rows = [s[0] for s in sections(sci, "datasec")]
    strips = []
    for d, (bys, bxs) in enumerate(sections(sci, "biassec")):
        if (bys.stop - bys.start) < ny:
            msg = f"BIASSEC of detector {d} covers {bys.stop - bys.start} rows, DATASEC {ny}"
            raise ParameterError(msg)
        ys = rows[d]
        strips.append(data[d, ys, bxs])
    strip = da.stack(strips).rechunk({0: 1, 1: -1 if window_rows > 1 else like.chunks[1], 2: -1})
    token = tokenize(strip, window_rows)
    level = da.map_blocks(
        overscan_level,
        strip,
        window_rows=window_rows,
        chunks=(*strip.chunks[:2], (1,)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        name=f"overscan-{token}",
    )
    return level.rechunk({1: like.chunks[1]})

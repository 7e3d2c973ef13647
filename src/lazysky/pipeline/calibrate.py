"""Calibrate one exposure: overscan, bias, dark, flat, gain → electrons, variance and mask.

:func:`calibrate_pixels` is the numpy kernel (one tile, any shape); :func:`calibrate_exposure`
lifts it onto an exposure lazily, one task per tile (``calibrate-<token>``), and returns an
``xarray.Dataset`` with ``image`` (e⁻), ``variance`` (e⁻²) and ``mask`` (:class:`MaskBit`).

The formulas, per pixel, with ``raw`` in ADU, ``o`` the row's overscan level, ``B`` the
master bias (ADU, overscan-subtracted), ``D`` the master dark (e⁻/s), ``F`` the master
flat, ``g`` the gain, ``σ_r`` the read noise (e⁻), ``t`` the exposure time::

    S        = (raw − o − B) · g                  electrons collected (sky, sources, dark)
    image    = (S − D · t) / F                    electrons of a flat-field-1 detector
    variance = (σ_r² + max(S, 0)                  read noise + Poisson of everything collected
                + g² V_B + t² V_D                 noise of the master bias and dark
                + image² · V_F) / F²              noise of the master flat

with ``V_B``, ``V_D``, ``V_F`` the variances of the masters (``bias_variance``… in the
masters Dataset; 0 when absent). The overscan level's own noise is left out (a median of
``n`` overscan pixels per row: ≈ 1.6 σ_r² / n, shared along the row). Where ``F`` is not a
usable number (≤ ``min_flat`` or not finite) the pixel is NODATA: ``image`` 0 and
``variance`` infinite, so that any inverse-variance weight ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from numpy.typing import NDArray

from lazysky.errors import ParameterError
from lazysky.pipeline._isr import overscan, trimmed
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
from lazysky.pipeline._sections import (
    detector_values,
    exposure_name,
    parse_exposure,
    scalar_value,
    sections,
)

__all__ = ["CalibratedPixels", "calibrate_exposure", "calibrate_pixels"]

_PACKED = np.dtype([("image", np.float32), ("variance", np.float32), ("mask", MASK_DTYPE)])


@dataclass(frozen=True)
class CalibratedPixels:
    """What :func:`calibrate_pixels` returns: three planes of the same shape."""

    image: NDArray[np.float32]
    variance: NDArray[np.float32]
    mask: NDArray[np.uint16]


def calibrate_pixels(
    raw: NDArray[Any],
    overscan_adu: NDArray[Any] | float = 0.0,
    bias_adu: NDArray[Any] | float = 0.0,
    dark_e_per_s: NDArray[Any] | float = 0.0,
    flat: NDArray[Any] | float = 1.0,
    bpm: NDArray[Any] | int = 0,
    *,
    bias_variance: NDArray[Any] | float = 0.0,
    dark_variance: NDArray[Any] | float = 0.0,
    flat_variance: NDArray[Any] | float = 0.0,
    gain: NDArray[Any] | float,
    read_noise_e: NDArray[Any] | float,
    saturate_adu: NDArray[Any] | float,
    exptime_s: NDArray[Any] | float,
    min_flat: float = 0.01,
    edge: NDArray[np.bool_] | bool = False,
) -> CalibratedPixels:
    """Calibrate raw ADU to electrons with variance and mask (see the module docstring).

    Every array argument broadcasts against ``raw``; ``bpm`` holds :class:`MaskBit`
    flags (HOT, LOWRESP, BAD) that are copied into the mask; ``edge`` marks EDGE pixels.

    Examples
    --------
    >>> import numpy as np
    >>> raw = np.full((10, 14), 1100, dtype=np.uint16)
    >>> raw[2, 3] = 65535
    >>> out = calibrate_pixels(raw, 100.0, gain=2.0, read_noise_e=5.0,
    ...                        saturate_adu=65535, exptime_s=60.0)
    >>> float(out.image[0, 0]), float(out.variance[0, 0]), int(out.mask[2, 3])
    (2000.0, 2025.0, 2)
    """
    raw = np.asarray(raw)
    S = (raw.astype(np.float32) - overscan_adu - bias_adu) * np.asarray(gain)
    S = np.asarray(S, dtype=np.float32)
    flat_b = np.broadcast_to(np.asarray(flat, dtype=np.float32), raw.shape)
    nodata = ~(flat_b > min_flat) | ~np.isfinite(flat_b)
    safe_flat = np.where(nodata, np.float32(1), flat_b)
    image = (S - np.asarray(dark_e_per_s) * np.asarray(exptime_s)) / safe_flat
    rn = np.asarray(read_noise_e, dtype=np.float32)
    g, t = np.asarray(gain, dtype=np.float32), np.asarray(exptime_s, dtype=np.float32)
    variance = (
        rn * rn
        + np.maximum(S, 0)
        + g * g * np.asarray(bias_variance, dtype=np.float32)
        + t * t * np.asarray(dark_variance, dtype=np.float32)
        + image * image * np.asarray(flat_variance, dtype=np.float32)
    ) / (safe_flat * safe_flat)
    image = np.where(nodata, np.float32(0), image).astype(np.float32)
    variance = np.where(nodata, np.float32(np.inf), variance).astype(np.float32)

    mask = np.broadcast_to(np.asarray(bpm, dtype=MASK_DTYPE), raw.shape).copy()
    mask[raw >= np.asarray(saturate_adu)] |= MASK_DTYPE.type(MaskBit.SAT)
    mask[nodata] |= MASK_DTYPE.type(MaskBit.NODATA)
    mask[np.broadcast_to(edge, raw.shape)] |= MASK_DTYPE.type(MaskBit.EDGE)
    return CalibratedPixels(image, variance, mask)


def _calibrate_block(
    raw: NDArray[Any],
    level: NDArray[Any],
    bias: NDArray[Any],
    dark: NDArray[Any],
    flat: NDArray[Any],
    bpm: NDArray[Any],
    bias_var: NDArray[Any],
    dark_var: NDArray[Any],
    flat_var: NDArray[Any],
    gain: NDArray[Any],
    rdnoise: NDArray[Any],
    saturate: NDArray[Any],
    exptime: NDArray[Any],
    yy: NDArray[Any],
    xx: NDArray[Any],
    *,
    min_flat: float,
    edge_px: int,
    shape: tuple[int, int],
) -> NDArray[Any]:
    """The kernel packed into one structured array (dask blocks carry one array)."""
    out = np.empty(raw.shape, dtype=_PACKED)
    if raw.size == 0:
        return out
    ny, nx = shape
    edge = (
        (yy < edge_px) | (yy >= ny - edge_px) | (xx < edge_px) | (xx >= nx - edge_px)
        if edge_px > 0
        else False
    )
    px = calibrate_pixels(
        raw, level, bias, dark, flat, bpm,
        bias_variance=bias_var, dark_variance=dark_var, flat_variance=flat_var,
        gain=gain, read_noise_e=rdnoise, saturate_adu=saturate, exptime_s=exptime,
        min_flat=min_flat, edge=edge,
    )  # fmt: skip
    out["image"], out["variance"], out["mask"] = px.image, px.variance, px.mask
    return out


def _master(masters: xr.Dataset | None, key: str, like: da.Array, default: float) -> Any:
    """Master ``key`` chunked like ``like``, or a broadcast constant when absent."""
    if masters is None or key not in masters.data_vars:
        dtype = MASK_DTYPE if key == "bpm" else np.dtype(np.float32)
        return da.full((like.shape[0], 1, 1), default, dtype=dtype, chunks=1)
    arr = masters[key]
    if arr.dims != ("detector", "y", "x") or arr.shape != like.shape:
        msg = (
            f"master {key!r} has dims {arr.dims} and shape {arr.shape}; expected "
            f"('detector', 'y', 'x') and {tuple(like.shape)} (the exposure's DATASEC)"
        )
        raise ParameterError(msg)
    return da.asarray(arr.data).rechunk(like.chunks)


def calibrate_exposure(
    exposure: xr.Dataset | xr.DataArray,
    masters: xr.Dataset | None = None,
    *,
    overscan_window_rows: int = 1,
    min_flat: float = 0.01,
    edge_px: int = 0,
) -> xr.Dataset:
    """Calibrate a raw exposure lazily: ``image`` (e⁻), ``variance`` (e⁻²), ``mask``.

    Parameters
    ----------
    exposure
        A raw exposure (see :func:`lazysky.pipeline._sections.parse_exposure`).
    masters
        A Dataset with any of ``bias`` (ADU), ``dark`` (e⁻/s), ``flat``, ``bpm``, and
        their ``*_variance`` ``(detector, y, x)`` on the DATASEC
        (:func:`lazysky.pipeline.make_masters`).
        What is absent is skipped (and the attrs say so).
    overscan_window_rows
        Odd running-median window along rows for the overscan level (1: per row).
    min_flat
        Flat values at or below this are NODATA.
    edge_px
        Flag EDGE within this many pixels of the detector edge (0: never).

    Returns
    -------
    xarray.Dataset
        ``image``, ``variance``, ``mask`` ``(detector, y, x)``, chunked like the raw tiles,
        with the exposure's coordinates and ``attrs["steps"]`` recording this step.

    Examples
    --------
    >>> from lazysky.pipeline.testing import synthetic_exposure
    >>> cal = calibrate_exposure(synthetic_exposure())
    >>> sorted(cal.data_vars), cal.image.dims
    (['image', 'mask', 'variance'], ('detector', 'y', 'x'))
    """
    if edge_px < 0:
        msg = f"edge_px must be >= 0, got {edge_px}"
        raise ParameterError(msg)
    if not min_flat >= 0:
        msg = f"min_flat must be >= 0, got {min_flat}"
        raise ParameterError(msg)
    sci = parse_exposure(exposure)
    raw = trimmed(sci)
    level = overscan(sci, window_rows=overscan_window_rows, like=raw)
    yy = da.arange(raw.shape[1], chunks=raw.chunks[1]).reshape(1, -1, 1)
    xx = da.arange(raw.shape[2], chunks=raw.chunks[2]).reshape(1, 1, -1)
    args = [
        raw,
        level,
        _master(masters, "bias", raw, 0.0),
        _master(masters, "dark", raw, 0.0),
        _master(masters, "flat", raw, 1.0),
        _master(masters, "bpm", raw, 0),
        _master(masters, "bias_variance", raw, 0.0),
        _master(masters, "dark_variance", raw, 0.0),
        _master(masters, "flat_variance", raw, 0.0),
        detector_values(sci, "gain"),
        detector_values(sci, "rdnoise"),
        detector_values(sci, "saturate"),
        scalar_value(sci, "exptime", default=0.0),
        yy,
        xx,
    ]
    shape = (int(raw.shape[1]), int(raw.shape[2]))
    token = tokenize(*args, min_flat, edge_px)
    packed = da.map_blocks(
        _calibrate_block,
        *args,
        min_flat=min_flat,
        edge_px=edge_px,
        shape=shape,
        dtype=_PACKED,
        meta=np.empty((0, 0, 0), dtype=_PACKED),
        name=f"calibrate-{token}",
    )
    params = {
        "overscan": "per-row median of BIASSEC" if "biassec" in sci.coords else "none",
        "overscan_window_rows": overscan_window_rows,
        "min_flat": min_flat,
        "edge_px": edge_px,
        "masters": sorted(str(k) for k in (masters.data_vars if masters is not None else [])),
        "exposure": exposure_name(sci),
    }
    return _as_dataset(sci, packed, step={"step": "calibrate", **params})


def _trimmed_headers(sci: xr.DataArray) -> xr.DataArray | None:
    """The ``header`` coordinate with CRPIX moved to the DATASEC origin (None: unchanged).

    The calibrated pixels start at DATASEC's first pixel, so their WCS is the raw one
    shifted by its offset, as :func:`lazysky.pipeline.fitsio.calibrate_files` writes it.
    """
    import re

    from astropy.io import fits

    if "header" not in sci.coords or sci.coords["header"].dims != ("detector",):
        return None
    origins = [(s[0].start, s[1].start) for s in sections(sci, "datasec")]
    if all(o == (0, 0) for o in origins):
        return None
    crpix = re.compile(r"^CRPIX([12])[A-Z]?$")
    texts = []
    for text, (y0, x0) in zip(sci.coords["header"].values, origins, strict=True):
        text = str(text)
        sep = "\n" if "\n" in text else ""  # the store keeps unseparated card images
        h = fits.Header.fromstring(text, sep=sep)
        for card in list(h.cards):
            m = crpix.match(card.keyword)
            if m and isinstance(card.value, int | float):
                h[card.keyword] = card.value - (x0 if m.group(1) == "1" else y0)
        texts.append(h.tostring(sep=sep) if sep else h.tostring())
    out = sci.coords["header"].copy(data=np.array(texts))
    return out


def _as_dataset(sci: xr.DataArray, packed: da.Array, *, step: dict[str, Any]) -> xr.Dataset:
    coords = {k: v for k, v in sci.coords.items() if set(v.dims) <= {"detector"}}
    headers = _trimmed_headers(sci)
    if headers is not None:
        coords["header"] = headers
    dims = ("detector", "y", "x")
    ds = xr.Dataset(
        {
            "image": (dims, packed["image"], {"units": "electron", "long_name": "image"}),
            "variance": (dims, packed["variance"], {"units": "electron2"}),
            "mask": (dims, packed["mask"], {"flags": MaskBit.doc()}),
        },
        coords=coords,
    )
    ds.attrs["steps"] = [step]
    return ds

"""Master calibrations per detector: bias, dark (e⁻/s), flat, and the bad-pixel mask.

Each master is a sigma-clipped mean along the frame axis (:func:`clipped_mean`), lazy and
chunked so that a block holds every frame of one tile, the tile sized so that a
task's peak memory stays under ``max_block_bytes`` whatever the number of frames. Frames
are trimmed to DATASEC and overscan-subtracted (per-row median of BIASSEC) first, as in
:func:`lazysky.pipeline.calibrate_exposure`, so the masters apply to it directly:

* **bias** (ADU): the overscan-subtracted bias frames combined: fixed pattern and the
  part of the bias structure the overscan does not see.
* **dark** (e⁻/s): each frame ``(raw − overscan − bias) · gain / EXPTIME``, combined.
* **flat** (dimensionless): each frame ``(raw − overscan − bias) · gain − dark · EXPTIME``
  (electrons, so detectors with different gains compare), divided by its own mosaic
  level, combined, and normalised so that its **mean over the whole mosaic is 1**:
  per-detector QE differences are kept, and an image divided by it is in electrons of a
  detector whose response is 1. The mosaic level is the mean of pixels within
  ``[0.5, 1.5]`` × the plain mean, so dead columns do not lower it.
* each master comes with its variance (``bias_variance``…): every frame's per-pixel
  variance (read noise, plus Poisson for darks and flats) propagated through the clipped
  mean as ``Σ var_kept / n_kept²``; :func:`calibrate_exposure` adds it to ``variance``.
* **bpm** (:class:`MaskBit`): HOT where the dark exceeds ``hot_e_per_s``; LOWRESP where
  the flat is below ``low_response`` × its running median over ``window_px`` (dead
  pixels and columns); BAD with either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.graph_manipulation import bind
from numpy.typing import NDArray
from scipy import ndimage

from lazysky.errors import ParameterError
from lazysky.pipeline._combine import (
    WORK_BYTES_PER_VALUE,
    combine_chunks,
    combine_frames,
    split_reads,
)
from lazysky.pipeline._isr import overscan, trimmed
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
from lazysky.pipeline._sections import detector_values, exposure_name, parse_exposure, scalar_value

__all__ = [
    "DEFAULT_MAX_BLOCK_BYTES",
    "bad_pixel_mask",
    "bad_pixels",
    "make_masters",
    "master_bias",
    "master_dark",
    "master_flat",
]

DEFAULT_MAX_BLOCK_BYTES = 128 * 2**20
Frames = Sequence[xr.Dataset | xr.DataArray]


def _frames(frames: Frames, kind: str) -> list[xr.DataArray]:
    if isinstance(frames, xr.Dataset | xr.DataArray) or len(frames) == 0:
        msg = f"{kind} frames must be a non-empty sequence of exposures, got {type(frames)}"
        raise ParameterError(msg)
    out = [parse_exposure(f, what=f"{kind} frame {i}") for i, f in enumerate(frames)]
    first = out[0]
    for i, sci in enumerate(out):
        if sci.shape != first.shape or list(sci.detector.values) != list(first.detector.values):
            msg = (
                f"{kind} frame {i} ({exposure_name(sci)}) has shape {sci.shape} and "
                f"detectors {list(sci.detector.values)}; frame 0 has {first.shape}, "
                f"{list(first.detector.values)}"
            )
            raise ParameterError(msg)
        if "imagetyp" in sci.coords and sci.coords["imagetyp"].ndim == 0:
            typ = str(sci.coords["imagetyp"].values).strip().lower()
            if typ and typ != kind:
                msg = f"{kind} frame {i} ({exposure_name(sci)}) has IMAGETYP {typ!r}"
                raise ParameterError(msg)
    return out


def _read_in_tiles(
    scis: list[xr.DataArray], max_block_bytes: int, *, salt: str = ""
) -> list[xr.DataArray]:
    """The frames re-read in the combine's tiles, so no task holds more than its tile.

    The tile (:func:`combine_chunks` for this many frames, within the frames' own
    chunks) bounds a combine task; reading in those tiles (:func:`split_reads`) keeps
    the whole graph's peak independent of the number of frames.
    """
    data = da.asarray(scis[0].data)
    ty, tx = combine_chunks(len(scis), (int(data.chunks[1][0]), int(data.chunks[2][0])),
                            max_block_bytes=max_block_bytes,
                            bytes_per_value=WORK_BYTES_PER_VALUE + 16)  # fmt: skip
    return [s.copy(data=split_reads(da.asarray(s.data), (1, ty, tx), salt=salt)) for s in scis]


def _adu(sci: xr.DataArray, window_rows: int) -> da.Array:
    raw = trimmed(sci)
    return raw.astype(np.float32) - overscan(sci, window_rows=window_rows, like=raw)


def _master_array(
    sci0: xr.DataArray,
    data: da.Array,
    variance: da.Array,
    *,
    name: str,
    units: str,
    step: dict[str, Any],
) -> xr.Dataset:
    coords = {
        k: v
        for k, v in sci0.coords.items()
        if v.dims == ("detector",) and k in ("detector", "gain", "rdnoise", "saturate")
    }
    dims = ("detector", "y", "x")
    var_units = f"({units})2" if units else ""
    out = xr.Dataset(
        {
            name: (dims, data, {"units": units, "steps": [step]}),
            f"{name}_variance": (dims, variance, {"units": var_units}),
        },
        coords=coords,
    )
    return out


def _combine(
    frames: list[da.Array],
    variances: list[da.Array],
    *,
    kind: str,
    sigma: float,
    max_iters: int,
    max_block_bytes: int,
    scale: da.Array | None = None,
) -> tuple[da.Array, da.Array]:
    if not sigma > 0:
        msg = f"sigma must be > 0, got {sigma}"
        raise ParameterError(msg)
    if all(v.shape[1:] == (1, 1) for v in variances):  # per detector: broadcast per block
        stacked_var = da.stack([da.asarray(v) for v in variances])
    else:
        stacked_var = da.stack([da.broadcast_to(v, f.shape, chunks=f.chunks)
                                for f, v in zip(frames, variances, strict=True)])  # fmt: skip
    mean, var = combine_frames(
        da.stack(frames),
        stacked_var,
        sigma=sigma,
        max_iters=max_iters,
        max_block_bytes=max_block_bytes,
        name=f"master-{kind}",
        scale=scale,
    )
    assert var is not None  # combine_frames returns it when given variances
    return mean, var


def _step(kind: str, scis: list[xr.DataArray], **params: Any) -> dict[str, Any]:
    return {"step": f"master_{kind}", "inputs": [exposure_name(s) for s in scis], **params}


def master_bias(
    frames: Frames,
    *,
    sigma: float = 3.0,
    max_iters: int = 5,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    overscan_window_rows: int = 1,
) -> xr.Dataset:
    """Master bias (ADU, overscan-subtracted, on DATASEC) from bias exposures (lazy).

    Examples
    --------
    >>> from lazysky.pipeline.testing import synthetic_exposure
    >>> bias = master_bias([synthetic_exposure(signal_adu=3, imagetyp="bias")] * 3)
    >>> sorted(bias.data_vars), float(bias["bias"].mean())
    (['bias', 'bias_variance'], 3.0)
    """
    scis = _read_in_tiles(_frames(frames, "bias"), max_block_bytes)
    adus = [_adu(s, overscan_window_rows) for s in scis]
    variances = [(detector_values(s, "rdnoise") / detector_values(s, "gain")) ** 2 for s in scis]
    data, var = _combine(adus, variances, kind="bias", sigma=sigma, max_iters=max_iters,
                         max_block_bytes=max_block_bytes)  # fmt: skip
    step = _step("bias", scis, sigma=sigma, max_iters=max_iters,
                 overscan_window_rows=overscan_window_rows)  # fmt: skip
    return _master_array(scis[0], data, var, name="bias", units="adu", step=step)


def master_dark(
    frames: Frames,
    *,
    bias: xr.DataArray,
    sigma: float = 3.0,
    max_iters: int = 5,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    overscan_window_rows: int = 1,
) -> xr.Dataset:
    """Master dark current (e⁻/s per pixel) from dark exposures and the master bias (lazy)."""
    scis = _read_in_tiles(_frames(frames, "dark"), max_block_bytes)
    per_s, variances = [], []
    for s in scis:
        adu = _adu(s, overscan_window_rows)
        b = da.asarray(bias.data).rechunk(adu.chunks)
        t = scalar_value(s, "exptime")
        t = da.where(t > 0, t, np.nan)
        e = (adu - b) * detector_values(s, "gain")
        per_s.append(e / t)
        variances.append((da.maximum(e, 0) + detector_values(s, "rdnoise") ** 2) / t**2)
    data, var = _combine(per_s, variances, kind="dark", sigma=sigma, max_iters=max_iters,
                         max_block_bytes=max_block_bytes)  # fmt: skip
    step = _step("dark", scis, sigma=sigma, max_iters=max_iters,
                 overscan_window_rows=overscan_window_rows)  # fmt: skip
    return _master_array(scis[0], data, var, name="dark", units="electron/s", step=step)


def _mosaic_level(
    x: da.Array, *, shared: Sequence[da.Array] = (), clone: bool = True
) -> da.Array:
    """Mean over the mosaic of the pixels within [0.5, 1.5] × the plain mean (lazy scalar).

    With ``clone`` (a frame: cheap to recompute, costly to hold), each of the two passes
    computes ``x`` afresh (:func:`dask.graph_manipulation.bind`: the second pass starts
    only once the plain mean is known), so no block of ``x`` waits in memory for a
    mosaic-wide number; ``shared`` (e.g. the master bias) is not recomputed. Without
    (the combined master: its blocks are the output, held anyway, while recomputing them
    would re-read every frame), the second pass reuses the blocks of ``x``.
    """
    plain = da.nanmean(x)
    if not clone:
        again = x
    elif shared:
        again = bind(x, plain, omit=list(shared))
    else:
        again = bind(x, plain)
    good = (again > 0.5 * plain) & (again < 1.5 * plain)
    return da.where(good, again, 0).sum() / good.sum()


def master_flat(
    frames: Frames,
    *,
    bias: xr.DataArray,
    dark: xr.DataArray | None = None,
    sigma: float = 3.0,
    max_iters: int = 5,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    overscan_window_rows: int = 1,
) -> xr.Dataset:
    """Master flat (relative response, mean 1 over the mosaic) from flat exposures (lazy)."""
    parsed = _frames(frames, "flat")
    scis = _read_in_tiles(parsed, max_block_bytes)
    again = _read_in_tiles(parsed, max_block_bytes, salt="scaled")  # the second pass
    masters = [da.asarray(bias.data)] + ([] if dark is None else [da.asarray(dark.data)])

    def electrons(s: xr.DataArray) -> tuple[da.Array, da.Array]:
        adu = _adu(s, overscan_window_rows)
        collected = (adu - da.asarray(bias.data).rechunk(adu.chunks)) * detector_values(s, "gain")
        e = collected
        if dark is not None:
            e = e - da.asarray(dark.data).rechunk(adu.chunks) * scalar_value(s, "exptime")
        return e, collected

    # pass 1: each frame's mosaic level (reductions: a few numbers per frame), on the
    # frames' own chunks: a reduction holds nothing, and the combine's small tiles
    # would make its graph (32 frames: ~50 000 tasks, ~200 MiB) the largest memory cost
    levels = [_mosaic_level(electrons(s)[0], shared=masters) for s in parsed]
    level = da.stack(levels).reshape(len(levels), 1, 1, 1)
    level = da.broadcast_to(level, (len(levels), len(scis[0].detector), 1, 1))
    # pass 2: the frames read again (other keys: nothing of pass 1 is kept for it), in the
    # combine's tiles, and divided by their levels inside the combine kernel, so a tile
    # of every frame is read only when that tile is combined
    scaled, variances = [], []
    for s in again:
        e, collected = electrons(s)
        scaled.append(e)
        variances.append(da.maximum(collected, 0) + detector_values(s, "rdnoise") ** 2)
    combined, var = _combine(scaled, variances, kind="flat", sigma=sigma,
                             max_iters=max_iters, max_block_bytes=max_block_bytes,
                             scale=level)  # fmt: skip
    # the master's own level from its blocks, kept: cloning them (as for a frame) would
    # keep every frame's pass-2 tiles in memory for the second combine (~N frames)
    norm = _mosaic_level(combined, clone=False)
    data = (combined / norm).astype(np.float32)
    var = (var / norm**2).astype(np.float32)
    step = _step("flat", scis, sigma=sigma, max_iters=max_iters, dark=dark is not None,
                 normalisation="mean over the mosaic of pixels within [0.5, 1.5] x mean",
                 overscan_window_rows=overscan_window_rows)  # fmt: skip
    return _master_array(scis[0], data, var, name="flat", units="", step=step)


def bad_pixels(
    dark_e_per_s: NDArray[Any] | None = None,
    flat: NDArray[Any] | None = None,
    *,
    hot_e_per_s: float = 0.5,
    low_response: float = 0.7,
    window_px: int = 15,
) -> NDArray[np.uint16]:
    """Bad-pixel flags (:class:`MaskBit`) of one block from a master dark and/or flat.

    The running median covers ``window_px`` pixels along the last two axes (edges:
    reflected), so a dead column shorter than half the window is found against its
    neighbours whatever the vignetting.

    Examples
    --------
    >>> import numpy as np
    >>> flat = np.ones((10, 14)); flat[:, 6] = 0.05
    >>> dark = np.full((10, 14), 0.01); dark[2, 3] = 30.0
    >>> bpm = bad_pixels(dark, flat, window_px=5)
    >>> MaskBit.describe(bpm[2, 3]), MaskBit.describe(bpm[5, 6]), int(bpm[0, 0])
    (['BAD', 'HOT'], ['BAD', 'LOWRESP'], 0)
    """
    if window_px < 3 or window_px % 2 == 0:
        msg = f"window_px must be an odd number >= 3, got {window_px}"
        raise ParameterError(msg)
    ref = dark_e_per_s if dark_e_per_s is not None else flat
    if ref is None:
        msg = "bad_pixels needs a master dark, a master flat, or both"
        raise ParameterError(msg)
    out = np.zeros(np.shape(ref), dtype=MASK_DTYPE)
    if out.size == 0:
        return out
    if dark_e_per_s is not None:
        out[np.asarray(dark_e_per_s) > hot_e_per_s] |= MASK_DTYPE.type(MaskBit.HOT | MaskBit.BAD)
    if flat is not None:
        f = np.asarray(flat, dtype=np.float32)
        size = [1] * (f.ndim - 2) + [window_px, window_px]
        local = ndimage.median_filter(np.nan_to_num(f, nan=0.0), size=size, mode="reflect")
        with np.errstate(invalid="ignore", divide="ignore"):
            low = ~(f >= low_response * local)
        out[low] |= MASK_DTYPE.type(MaskBit.LOWRESP | MaskBit.BAD)
    return out


def bad_pixel_mask(
    *,
    dark: xr.DataArray | None = None,
    flat: xr.DataArray | None = None,
    hot_e_per_s: float = 0.5,
    low_response: float = 0.7,
    window_px: int = 15,
) -> xr.DataArray:
    """The bad-pixel mask ``(detector, y, x)`` uint16 from master dark and/or flat (lazy).

    Tiles see a halo of ``window_px // 2`` (the running median's reach), so the tiled
    result equals the whole-detector one.
    """
    ref = dark if dark is not None else flat
    if ref is None:
        msg = "bad_pixel_mask needs dark=, flat=, or both"
        raise ParameterError(msg)
    arrays = [da.asarray(a.data) for a in (dark, flat) if a is not None]
    arrays = [arrays[0], *(a.rechunk(arrays[0].chunks) for a in arrays[1:])]
    halo = window_px // 2
    token = tokenize(*arrays, hot_e_per_s, low_response, window_px)

    def block(*blocks: NDArray[Any]) -> NDArray[np.uint16]:
        d = blocks[0] if dark is not None else None
        f = blocks[-1] if flat is not None else None
        return bad_pixels(d, f, hot_e_per_s=hot_e_per_s, low_response=low_response,
                          window_px=window_px)  # fmt: skip

    data = da.map_overlap(
        block,
        *arrays,
        depth={0: 0, 1: halo, 2: halo},
        boundary="none",
        dtype=MASK_DTYPE,
        meta=np.empty((0, 0, 0), dtype=MASK_DTYPE),
        name=f"bad-pixel-mask-{token}",
    )
    step = {"step": "bad_pixel_mask", "hot_e_per_s": hot_e_per_s,
            "low_response": low_response, "window_px": window_px,
            "from": [k for k, a in (("dark", dark), ("flat", flat)) if a is not None]}  # fmt: skip
    out = xr.DataArray(data, dims=ref.dims, coords=ref.coords, name="bpm")
    out.attrs.update({"flags": MaskBit.doc(), "steps": [step]})
    return out


def make_masters(
    *,
    bias: Frames,
    dark: Frames | None = None,
    flat: Frames | None = None,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    **options: Any,
) -> xr.Dataset:
    """All masters and the bad-pixel mask as one Dataset for :func:`calibrate_exposure` (lazy).

    ``options`` are ``sigma``, ``max_iters``, ``overscan_window_rows`` (every master) and
    ``hot_e_per_s``, ``low_response``, ``window_px`` (the bad-pixel mask).
    """
    bpm_keys = {"hot_e_per_s", "low_response", "window_px"}
    comb_keys = {"sigma", "max_iters", "overscan_window_rows"}
    unknown = set(options) - bpm_keys - comb_keys
    if unknown:
        msg = f"unknown option(s) {sorted(unknown)}; allowed: {sorted(bpm_keys | comb_keys)}"
        raise ParameterError(msg)
    comb = {k: v for k, v in options.items() if k in comb_keys}
    bpm_opts = {k: v for k, v in options.items() if k in bpm_keys}
    out = master_bias(bias, max_block_bytes=max_block_bytes, **comb)
    if dark is not None:
        dark_ds = master_dark(dark, bias=out["bias"], max_block_bytes=max_block_bytes, **comb)
        out = out.merge(dark_ds, compat="override", join="exact")
    if flat is not None:
        flat_ds = master_flat(flat, bias=out["bias"], dark=out.get("dark"),
                              max_block_bytes=max_block_bytes, **comb)  # fmt: skip
        out = out.merge(flat_ds, compat="override", join="exact")
    if dark is not None or flat is not None:
        out["bpm"] = bad_pixel_mask(dark=out.get("dark"), flat=out.get("flat"), **bpm_opts)
    return out

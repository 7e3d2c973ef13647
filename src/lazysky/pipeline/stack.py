"""Stack resampled exposures into a coadd, lazily, one task per tile (``stack-<tile>-…``).

:func:`stack_pixels` is the numpy kernel on one tile's layers; :func:`stack` gathers, for
every tile, the :class:`~lazysky.pipeline.resample.ResampledTile` pieces that cover it and
makes one task per tile; tiles no exposure touches are NODATA constants.

Per pixel, over the layers (one per exposure; the detectors of one exposure are merged
first, the first valid one winning) that are *valid* (no ``bad_bits`` in their mask,
finite positive variance):

* ``clipped-mean`` (default): reject a layer when ``|x − m| > sigma · sqrt(v + (amp_frac · m)²)``,
  ``m`` the median of the kept layers, ``v`` the layer's variance, iterated up to
  ``max_iters`` times, where at least 3 layers are valid. Where exactly two are, the
  higher is rejected when ``x_hi − x_lo > sigma · sqrt(v_hi + v_lo + (amp_frac · x_lo)²)``:
  with two values nobody can tell which is wrong by symmetry, but cosmic rays and
  satellite trails only ever add flux (with 3 dithered exposures, a third to a half of a
  coadd is covered by just two). The ``amp_frac`` term (SWarp's CLIP_AMPFRAC, 0.3) keeps
  the cores of stars, which differ between frames by seeing and sub-pixel sampling more than by
  noise; cosmic rays and satellite trails are far above both. Then the weighted mean of
  the kept layers, ``Σ w x / Σ w``, with variance ``Σ w² v / (Σ w)²``.
* ``median``: the median of the valid layers, with variance ``π/2 · Σ v / n²``
  (asymptotic; ``Σ v / n²`` for n ≤ 2, where the median is the mean).

Weights (``weighting``): ``"frame"`` (default) is the inverse of the layer's median
variance over the tile — its sky variance — so that a star's own Poisson noise does not
weight the frames where it fluctuated low higher (an inverse-per-pixel-variance weight
biases bright sources low); ``"pixel"`` is ``1 / v`` per pixel.

The coadd is in the inputs' units per grid pixel, the mean of one frame (like SWarp):
electrons per grid pixel in one exposure. No photometric scaling between exposures is
applied: the frames must share a zeropoint and exposure time (the simulator's do).
Outputs: ``image``, ``variance``, ``weight`` (Σ w), ``count`` (exposures kept),
``rejected`` (exposures clipped) and ``mask`` (NODATA where nothing was kept, else the OR
of the kept layers' bits).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from dask.base import tokenize
from numpy.typing import NDArray

from lazysky.errors import OutputError, ParameterError
from lazysky.pipeline import _coadd_jit
from lazysky.pipeline._fitsplanes import write_rows
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
from lazysky.pipeline.grid import SkyGrid
from lazysky.pipeline.resample import ResampledTile, _Resampler

__all__ = ["COADD_DTYPE", "METHODS", "WEIGHTINGS", "stack", "stack_pixels", "write_coadd_fits"]

METHODS = ("clipped-mean", "median")
WEIGHTINGS = ("frame", "pixel")
_STRIP_ROWS = 128  # rows combined at once: ~80 bytes per pixel and layer of temporaries
DEFAULT_BAD_BITS = int(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NODATA)
COADD_DTYPE = np.dtype(
    [("image", np.float32), ("variance", np.float32), ("weight", np.float32),
     ("count", np.uint16), ("rejected", np.uint16), ("mask", MASK_DTYPE)]
)  # fmt: skip


def _median(x: NDArray[Any], n: NDArray[np.intp]) -> NDArray[Any]:
    """Median along axis 0 ignoring NaN, NaN where ``n`` (valid count) is 0; no warnings."""
    if x.shape[0] == 1:
        return np.where(n > 0, x[0], np.nan)
    if x.shape[0] <= 3:  # no sort: the median of ≤ 3 values from their sum, min and max
        with np.errstate(invalid="ignore"):
            total = np.nansum(x, axis=0)
            lo, hi = np.fmin.reduce(x, axis=0), np.fmax.reduce(x, axis=0)
            two = (lo + hi) / 2
            one = np.where(n == 1, total, np.nan)
            return np.where(n == 3, total - lo - hi, np.where(n == 2, two, one))
    s = np.sort(x, axis=0)  # NaN last
    lo = np.take_along_axis(s, np.maximum((n - 1) // 2, 0)[None], axis=0)[0]
    hi = np.take_along_axis(s, np.maximum(n // 2, 0)[None], axis=0)[0]
    return np.where(n > 0, (lo + hi) / 2, np.nan)


def _merge(
    image: NDArray[Any],
    variance: NDArray[Any],
    mask: NDArray[Any],
    groups: Sequence[int],
    bad: int,
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[Any], NDArray[np.bool_]]:
    """One layer per exposure (first valid detector wins); invalid pixels: 0, ∞, their bits."""
    ok_all = ((mask & bad) == 0) & np.isfinite(variance) & (variance > 0)
    if len(set(groups)) == len(groups):  # one layer per exposure already: nothing to merge
        x = np.where(ok_all, image, 0).astype(np.float32, copy=False)
        v = np.where(ok_all, variance, np.inf).astype(np.float32, copy=False)
        return x, v, np.asarray(mask, dtype=MASK_DTYPE), ok_all
    keys = list(dict.fromkeys(groups))
    shape = (len(keys), *image.shape[1:])
    x = np.zeros(shape, dtype=np.float32)
    v = np.full(shape, np.inf, dtype=np.float32)
    m = np.full(shape, int(MaskBit.NODATA), dtype=MASK_DTYPE)
    valid = np.zeros(shape, dtype=bool)
    for k, g in enumerate(groups):
        j = keys.index(g)
        ok = ok_all[k]
        take = ok & ~valid[j]
        x[j][take], v[j][take], m[j][take] = image[k][take], variance[k][take], mask[k][take]
        # an invalid pixel keeps the first layer's bits, so the coadd can tell why
        first = ~valid[j] & ~ok & (m[j] == int(MaskBit.NODATA))
        m[j][first] = mask[k][first]
        valid[j] |= ok
    return x, v, m, valid


def _clip(
    x: NDArray[np.float32],
    v: NDArray[np.float32],
    valid: NDArray[np.bool_],
    *,
    sigma: float,
    amp_frac: float,
    max_iters: int,
) -> NDArray[np.bool_]:
    """The layers kept by the clipped mean (module docstring): ≥ 3 valid, or exactly 2."""
    n_valid = valid.sum(axis=0)
    keep = valid.copy()
    clip = n_valid >= 3
    if clip.any():
        n = x.shape[0]
        flat_keep = keep.reshape(n, -1)
        # the first pass over every pixel; later ones only where the previous changed
        cols: NDArray[np.intp] | slice = slice(None)
        xs, vs, va = x.reshape(n, -1), v.reshape(n, -1), valid.reshape(n, -1)
        ks = flat_keep
        ck = clip.reshape(-1)
        for _ in range(max_iters):
            centre = _median(np.where(ks, xs, np.float32(np.nan)), ks.sum(axis=0))
            with np.errstate(invalid="ignore"):
                thresh = np.float32(sigma) * np.sqrt(vs + (np.float32(amp_frac) * centre) ** 2)
                new = va & (~ck | (np.abs(xs - centre) <= thresh))
            changed = (new != ks).any(axis=0)
            flat_keep[:, cols] = new
            if not changed.any():
                break
            where = np.flatnonzero(changed)
            cols = where if isinstance(cols, slice) else cols[where]
            xs, vs, va = xs[:, where], vs[:, where], va[:, where]
            ks, ck = new[:, where], ck[where]
    pair = n_valid == 2
    if pair.any():
        # two layers: a positive outlier (cosmic ray, trail) is far more likely than a
        # negative one, so the higher layer goes when it exceeds the lower by more than
        # sigma × the noise of their difference (plus the amplitude term of the lower)
        xp, vp = x[:, pair], v[:, pair]  # (layers, pixels with two valid layers)
        valid_p = valid[:, pair]
        hi = np.argmax(np.where(valid_p, xp, -np.inf), axis=0)
        lo = np.argmin(np.where(valid_p, xp, np.inf), axis=0)
        col = np.arange(xp.shape[1])
        x_lo = xp[lo, col]
        with np.errstate(invalid="ignore"):
            noise = np.sqrt(vp[hi, col] + vp[lo, col] + (np.float32(amp_frac) * x_lo) ** 2)
            drop = xp[hi, col] - x_lo > np.float32(sigma) * noise
        if drop.any():
            kp = keep[:, pair]
            kp[hi[drop], col[drop]] = False
            keep[:, pair] = kp
    return keep


def stack_pixels(
    image: NDArray[Any],
    variance: NDArray[Any],
    mask: NDArray[Any],
    *,
    groups: Sequence[int] | None = None,
    method: str = "clipped-mean",
    sigma: float = 3.0,
    amp_frac: float = 0.3,
    max_iters: int = 3,
    weighting: str = "frame",
    frame_weights: Sequence[float] | None = None,
    bad_bits: int = DEFAULT_BAD_BITS,
) -> NDArray[Any]:
    """Combine layers ``(n, ny, nx)`` into one coadd tile (module docstring).

    ``groups`` gives each layer's exposure (layers of one exposure are merged);
    ``frame_weights`` one weight per layer for ``weighting="frame"`` (default: the inverse
    of the layer's median variance over this tile). Returns a structured array of dtype
    :data:`COADD_DTYPE` ``(ny, nx)``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.ones((4, 10, 14), np.float32)
    >>> img[2, 3, 4] = 500.0                          # a cosmic ray in one frame
    >>> out = stack_pixels(img, np.ones_like(img), np.zeros(img.shape, np.uint16))
    >>> float(out["image"][3, 4]), int(out["count"][3, 4]), int(out["rejected"][3, 4])
    (1.0, 3, 1)
    >>> float(out["variance"][0, 0])
    0.25
    """
    _check_choice("method", method, METHODS)
    _check_choice("weighting", weighting, WEIGHTINGS)
    groups = list(range(len(image))) if groups is None else list(groups)
    out = np.zeros(image.shape[1:], dtype=COADD_DTYPE)
    if image.shape[0] == 0 or out.size == 0:
        out["variance"] = np.inf
        out["mask"] = int(MaskBit.NODATA)
        return out
    if _jit_applies(method, weighting, frame_weights):
        _stack_jit(image, variance, mask, out, groups=groups, sigma=sigma, amp_frac=amp_frac,
                   max_iters=max_iters, weighting=weighting, frame_weights=frame_weights,
                   bad_bits=bad_bits)  # fmt: skip
        return out
    x, v, m, valid = _merge(image, variance, mask, groups, bad_bits)
    n_valid = valid.sum(axis=0)
    if method == "median":
        keep = valid
        centre = _median(np.where(valid, x, np.float32(np.nan)), n_valid)
        n = n_valid
        var_sum = np.where(valid, v, 0.0).sum(axis=0, dtype=np.float64)
        factor = np.where(n > 2, np.pi / 2, 1.0)
        coadd = centre
        var = factor * var_sum / np.maximum(n, 1) ** 2
        wsum = np.where(valid, 1.0 / np.where(valid, v, 1.0), 0.0).sum(axis=0)
        shape = x.shape[1:]
    else:
        keep = _clip(x, v, valid, sigma=sigma, amp_frac=amp_frac, max_iters=max_iters)
        if weighting == "frame":
            w = np.zeros(x.shape[0])
            keys = list(dict.fromkeys(groups))
            for j in range(x.shape[0]):
                if frame_weights is not None:
                    w[j] = float(frame_weights[groups.index(keys[j])])
                    continue
                vj = v[j][valid[j]]
                w[j] = 1.0 / float(np.median(vj)) if vj.size else 0.0
        # layer by layer (a reduction along the short first axis is slow in numpy)
        shape = x.shape[1:]
        wsum, num, var = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        n = np.zeros(shape, dtype=np.intp)
        for j in range(x.shape[0]):
            k = keep[j]
            if weighting == "frame":
                wj = np.where(k, np.float32(w[j]), np.float32(0))
            else:
                wj = np.where(k, 1 / np.where(k, v[j], np.float32(1)), np.float32(0))
            wsum += wj
            num += wj * x[j]  # x is 0 where not valid
            var += wj * wj * np.where(k, v[j], np.float32(0))
            n += k
        safe = np.where(wsum > 0, wsum, 1.0)
        coadd = num / safe
        var /= safe**2
    none = n == 0
    out["image"] = np.where(none, 0.0, coadd)
    out["variance"] = np.where(none, np.inf, var)
    out["weight"] = np.where(none, 0.0, wsum)
    out["count"] = n
    out["rejected"] = n_valid - (n if method != "median" else keep.sum(axis=0))
    bits = np.zeros(shape, dtype=MASK_DTYPE)
    bad = np.full(shape, MaskBit.NODATA, dtype=MASK_DTYPE)
    for j in range(x.shape[0]):
        bits |= np.where(keep[j], m[j], MASK_DTYPE.type(0))
        bad |= m[j]
    # where nothing was kept: the bits that made the layers invalid, and NODATA
    out["mask"] = np.where(none, bad, bits)
    return out


def _jit_applies(method: str, weighting: str, frame_weights: Sequence[float] | None) -> bool:
    """Whether the compiled clipped mean serves (it takes the frame weights as given)."""
    return (
        method == "clipped-mean"
        and _coadd_jit.AVAILABLE
        and (weighting == "pixel" or frame_weights is not None)
    )


def _stack_jit(
    image: NDArray[Any],
    variance: NDArray[Any],
    mask: NDArray[Any],
    out: NDArray[Any],
    *,
    groups: Sequence[int],
    sigma: float,
    amp_frac: float,
    max_iters: int,
    weighting: str,
    frame_weights: Sequence[float] | None,
    bad_bits: int,
) -> None:
    """The clipped mean by the compiled kernel, written into ``out`` (records, in place).

    The same arithmetic as the numpy path of :func:`stack_pixels`, pixel by pixel in one
    pass (:mod:`lazysky.pipeline._coadd_jit`); equal to it bit for bit on real frames.
    """
    keys = list(dict.fromkeys(groups))
    w = np.zeros(len(keys))
    if frame_weights is not None:
        w[:] = [float(frame_weights[groups.index(k)]) for k in keys]
    _coadd_jit.clipped_mean_strip(
        *(np.asarray(a) for a in (image, variance, mask)),
        np.array([keys.index(g) for g in groups], dtype=np.intp), len(keys), int(bad_bits),
        w, weighting == "pixel", float(sigma), float(amp_frac), int(max_iters),
        MASK_DTYPE.type(MaskBit.NODATA), out["image"], out["variance"], out["weight"],
        out["count"], out["rejected"], out["mask"],
    )  # fmt: skip


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        msg = f"{name} must be one of {list(allowed)}, got {value!r}"
        raise ParameterError(msg)


def _layer_buffer(n: int, rows: int, nx: int, dtype: Any) -> NDArray[Any]:
    """``(n, rows, nx)`` layers for the compiled kernels, cut from rows one element longer:
    every strip (a last, shorter one too) and every layer is then the same kind of array
    for numba (non-contiguous), so each kernel is compiled once, not once per layout."""
    return np.empty((n, rows, nx + 1), dtype=dtype)[:, :, :nx]


def _stack_block(*args: NDArray[Any], groups: list[int], **options: Any) -> NDArray[Any]:
    n = len(args) // 2
    pieces, weights = args[:n], [float(np.asarray(w).ravel()[0]) for w in args[n:]]
    if pieces[0].size == 0:
        return np.empty(pieces[0].shape, dtype=COADD_DTYPE)
    out: NDArray[Any] = np.empty(pieces[0].shape, dtype=COADD_DTYPE)
    jit = _jit_applies(options["method"], options["weighting"], weights)
    if jit:  # layer buffers reused by every strip: no fresh pages per strip
        nx = pieces[0].shape[1]
        bufs = [_layer_buffer(n, min(_STRIP_ROWS, len(out)), nx, pieces[0].dtype[plane])
                for plane in ("image", "variance", "mask")]  # fmt: skip
    for r0 in range(0, len(out), _STRIP_ROWS):  # strips bound the task's memory
        if jit:
            rows = min(_STRIP_ROWS, len(out) - r0)
            layers = [b[:, :rows] for b in bufs]
            for k, p in enumerate(pieces):
                for b, plane in zip(layers, ("image", "variance", "mask"), strict=True):
                    b[k] = p[plane][r0 : r0 + rows]
            _stack_jit(layers[0], layers[1], layers[2], out[r0 : r0 + rows], groups=groups,
                       frame_weights=weights,
                       **{k: v for k, v in options.items() if k != "method"})  # fmt: skip
            continue
        # each plane stacked on its own: contiguous layers, not strided views of records
        img, var, msk = (np.stack([p[plane][r0 : r0 + _STRIP_ROWS] for p in pieces])
                         for plane in ("image", "variance", "mask"))  # fmt: skip
        out[r0 : r0 + _STRIP_ROWS] = stack_pixels(
            img, var, msk, groups=groups, frame_weights=weights, **options,
        )  # fmt: skip
    return out


def _resample_stack_block(
    *arrays: NDArray[Any], sources: list[dict[str, Any]], groups: list[int], **options: Any
) -> NDArray[Any]:
    """One tile resampled and stacked strip by strip (a ``stack-<tile>`` task).

    ``arrays``: each piece's three input planes, then each piece's frame weight;
    ``sources`` each piece's resampling options
    (:class:`~lazysky.pipeline.resample.ResampleSource`). Every
    strip of rows is resampled from each piece into the layer buffers and combined by the
    compiled clipped mean: the layers are exactly those :func:`_stack_block` copies out
    of the resampled tiles, which are never held whole.
    """
    n = len(sources)
    weights = [float(np.asarray(w).ravel()[0]) for w in arrays[3 * n :]]
    ny, nx = sources[0]["grid"].tile_shape(sources[0]["tile"])
    out: NDArray[Any] = np.empty((ny, nx), dtype=COADD_DTYPE)
    resamplers = [_Resampler(*arrays[3 * k : 3 * k + 3], **opts) for k, opts in enumerate(sources)]
    bufs = [_layer_buffer(n, min(_STRIP_ROWS, ny), nx, t)
            for t in (np.float32, np.float32, MASK_DTYPE)]  # fmt: skip
    for r0 in range(0, ny, _STRIP_ROWS):
        rows = min(_STRIP_ROWS, ny - r0)
        layers = [b[:, :rows] for b in bufs]
        for k, rs in enumerate(resamplers):
            rs.fill(r0, r0 + rows, layers[0][k], layers[1][k], layers[2][k])
        _stack_jit(layers[0], layers[1], layers[2], out[r0 : r0 + rows], groups=groups,
                   frame_weights=weights,
                   **{k: v for k, v in options.items() if k != "method"})  # fmt: skip
    return out


def _fused_tile(
    got: list[ResampledTile], groups: list[int], options: dict[str, Any], tile: str,
    shape: tuple[int, int],
) -> da.Array | None:
    """The ``stack-<tile>`` task resampling its pieces' inputs itself, when it can.

    It can when every piece has a :class:`~lazysky.pipeline.resample.ResampleSource`
    with single-chunk planes and the compiled clipped mean applies; else None (the tile
    is stacked from the resampled pieces).
    """
    from dask.highlevelgraph import HighLevelGraph

    sources = [p.source for p in got]
    if not (_jit_applies(options["method"], options["weighting"], [1.0])) or any(
        s is None or any(a.numblocks != (1, 1) for a in s.planes) for s in sources
    ):
        return None
    known = [s for s in sources if s is not None]
    planes = [a for s in known for a in s.planes]
    weights = [p.frame_weight for p in got]
    token = tokenize(*planes, *weights, [s.options for s in known], groups, options)
    name = f"stack-{tile}-{token}"
    # the task holds the options only (the planes are its inputs, not pickled with it)
    fn = partial(_resample_stack_block, sources=[s.options for s in known], groups=groups,
                 **options)  # fmt: skip
    dsk: dict[Any, Any] = {(name, 0, 0): (fn, *[(a.name, 0, 0) for a in planes + weights])}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=planes + weights)  # type: ignore[arg-type]
    return da.Array(graph, name, chunks=tuple((n,) for n in shape), dtype=COADD_DTYPE,
                    meta=np.empty((0, 0), dtype=COADD_DTYPE))  # fmt: skip


def _empty_tile(shape: tuple[int, int]) -> NDArray[Any]:
    out = np.zeros(shape, dtype=COADD_DTYPE)
    out["variance"] = np.inf
    out["mask"] = int(MaskBit.NODATA)
    return out


def stack(
    pieces: Sequence[ResampledTile],
    grid: SkyGrid,
    *,
    method: str = "clipped-mean",
    sigma: float = 3.0,
    amp_frac: float = 0.3,
    max_iters: int = 3,
    weighting: str = "frame",
    bad_bits: int = DEFAULT_BAD_BITS,
) -> xr.Dataset:
    """Coadd resampled exposures on ``grid``, lazily, one ``stack-<tile>`` task per tile.

    Parameters
    ----------
    pieces
        :class:`~lazysky.pipeline.resample.ResampledTile` from
        :func:`~lazysky.pipeline.resample_exposure` (of any number of exposures).
    grid
        The grid they were resampled onto.
    method
        ``"clipped-mean"`` or ``"median"``.
    sigma, amp_frac, max_iters
        Clipping threshold (module docstring).
    weighting
        ``"frame"`` or ``"pixel"``.
    bad_bits
        Mask bits that exclude a pixel (default BAD | SAT | CR | NODATA).

    Returns
    -------
    xarray.Dataset
        ``image``, ``variance``, ``weight``, ``count``, ``rejected``, ``mask`` ``(y, x)`` on
        the grid, one dask block per tile; attrs: units, grid, inputs, steps.

    Examples
    --------
    >>> coadd = stack(resample_exposure(cal_a, grid) + resample_exposure(cal_b, grid),
    ...               grid)  # doctest: +SKIP
    >>> write_coadd_fits(coadd, "coadd.fits")  # doctest: +SKIP
    """
    _check_choice("method", method, METHODS)
    _check_choice("weighting", weighting, WEIGHTINGS)
    if not sigma > 0 or not amp_frac >= 0 or max_iters < 1:
        msg = f"need sigma > 0, amp_frac >= 0, max_iters >= 1; got {sigma}, {amp_frac}, {max_iters}"
        raise ParameterError(msg)
    if len(pieces) == 0:
        msg = (
            "nothing to stack: no resampled tiles were given (did every exposure miss the "
            "grid? resample_exposure warns with NoOverlapWarning when one does)"
        )
        raise ParameterError(msg)
    units = sorted({p.units for p in pieces})
    if len(units) > 1:
        by = {u: sorted({p.exposure for p in pieces if p.units == u}) for u in units}
        msg = f"the inputs have different image units {by}: calibrate them to one unit first"
        raise ParameterError(msg)
    exposures = list(dict.fromkeys(p.exposure for p in pieces))
    by_tile: dict[str, list[ResampledTile]] = {}
    for p in pieces:
        if p.pixels.shape != grid.tile_shape(p.tile):
            msg = (
                f"piece {p.exposure}/{p.detector}/{p.tile} has shape {p.pixels.shape}, not "
                "its tile's on this grid: was it resampled onto another grid?"
            )
            raise ParameterError(msg)
        by_tile.setdefault(p.tile, []).append(p)
    options = {
        "method": method,
        "sigma": sigma,
        "amp_frac": amp_frac,
        "max_iters": max_iters,
        "weighting": weighting,
        "bad_bits": int(bad_bits),
    }
    nty, ntx = grid.n_tiles
    rows = []
    for iy in range(nty):
        row = []
        for ix in range(ntx):
            tile = grid.tile_id(iy, ix)
            shape = grid.tile_shape(tile)
            got = by_tile.get(tile)
            if not got:
                token = tokenize(grid, tile, "empty")
                row.append(
                    da.from_delayed(  # one constant task per empty tile
                        _delayed_empty(shape, f"stack-empty-{tile}-{token}"), shape, COADD_DTYPE
                    )
                )
                continue
            groups = [exposures.index(p.exposure) for p in got]
            fused = _fused_tile(got, groups, options, tile, shape)
            if fused is not None:  # resampled and stacked in one task, strip by strip
                row.append(fused)
                continue
            arrays = [p.pixels for p in got] + [p.frame_weight for p in got]
            token = tokenize(*arrays, groups, options)
            row.append(da.map_blocks(
                _stack_block, *arrays, groups=groups, **options,
                dtype=COADD_DTYPE, meta=np.empty((0, 0), dtype=COADD_DTYPE),
                name=f"stack-{tile}-{token}",
            ))  # fmt: skip
        rows.append(row)
    packed = da.block(rows)
    dims = ("y", "x")
    data = {k: (dims, packed[k]) for k in COADD_DTYPE.names or ()}
    ds = xr.Dataset(data)
    ds["image"].attrs["units"] = units[0]
    ds["variance"].attrs["units"] = f"({units[0]})2" if units[0] else ""
    ds["mask"].attrs["flags"] = MaskBit.doc()
    ds.attrs.update({
        "units": units[0],
        "grid": grid.to_dict(),
        "inputs": exposures,
        "steps": [{"step": "stack", **options, "n_exposures": len(exposures)}],
    })  # fmt: skip
    return ds


def _delayed_empty(shape: tuple[int, int], name: str) -> Any:
    from dask.delayed import Delayed

    return Delayed(name, {name: (_empty_tile, shape)})


_FITS_BLOCK = 2880
_PLANES = ("image", "variance", "weight", "mask", "count")


def _fits_headers(
    coadd: xr.Dataset, grid: SkyGrid, extra: fits.Header | None
) -> list[fits.Header]:
    """The five HDUs' headers, as astropy writes them for arrays of the coadd's shape."""
    header = grid.wcs.to_header()
    ny, nx = (int(n) for n in coadd["image"].shape)
    out = []
    for k, name in enumerate(_PLANES):
        dtype = np.dtype(coadd[name].dtype)
        tiny = np.zeros((1, 1), dtype=dtype)  # the header astropy makes for this dtype
        hdu = (fits.PrimaryHDU(tiny, header=header) if k == 0
               else fits.ImageHDU(tiny, header=header, name=name.upper()))  # fmt: skip
        h = hdu.header
        h["NAXIS1"], h["NAXIS2"] = nx, ny
        if k == 0:
            h.set("EXTEND", True, after="NAXIS2")  # as HDUList.writeto adds it
            h["BUNIT"] = (str(coadd.attrs.get("units", "")), "per grid pixel, one frame")
            h["NCOMBINE"] = (len(coadd.attrs.get("inputs", [])), "exposures stacked")
            step = coadd.attrs.get("steps", [{}])[-1]
            h["COMBINET"] = (str(step.get("method", "")), "combine method")
            if extra is not None:
                h.extend(extra, update=True)
        out.append(h)
    return out


def _write_band(path: str, offset: int, *blocks: NDArray[Any]) -> NDArray[np.int8]:
    """One row of blocks of a plane (left to right), written in FITS byte order at byte
    ``offset`` of the file (a write task: whole rows, a strip at a time)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        write_rows(fd, offset, list(blocks))
    finally:
        os.close(fd)
    return np.zeros((1, 1), dtype=np.int8)


def _band_writes(x: da.Array, path: str, offset: int) -> da.Array:
    """Lazy ``fits-write-…`` tasks, one per row of blocks of ``x`` (:func:`_write_band`)."""
    from dask.highlevelgraph import HighLevelGraph

    name = f"fits-write-{tokenize(x, path, offset)}"
    row_bytes = int(x.shape[1]) * x.dtype.itemsize
    y0s = np.cumsum((0, *x.chunks[0][:-1]))
    dsk: dict[Any, Any] = {
        (name, i, 0): (_write_band, path, offset + int(y0) * row_bytes,
                       *[(x.name, i, j) for j in range(len(x.chunks[1]))])
        for i, y0 in enumerate(y0s)
    }  # fmt: skip
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])  # type: ignore[list-item]
    return da.Array(graph, name, chunks=((1,) * len(y0s), (1,)), dtype=np.int8)


def write_coadd_fits(
    coadd: xr.Dataset,
    path: str | Path,
    *,
    overwrite: bool = False,
    header: fits.Header | None = None,
) -> Path:
    """Write a coadd as FITS: image (with the grid WCS), VARIANCE, WEIGHT, MASK, COUNT.

    This computes the coadd (it is an output), streamed: the file is laid out first from
    the headers (their sizes fix every plane's offset), then every row of tiles of each
    plane is converted to FITS's byte order, a strip of whole rows at a time, and written
    at its place by its own task (``fits-write-…``, ``os.pwrite``), so writing overlaps
    the computation, runs on every thread and never holds the whole coadd. The file is
    the one astropy would write (tested).
    Every HDU carries the grid's WCS; the primary image is in the inputs' units per grid
    pixel per frame (``BUNIT``); ``header`` adds cards (e.g. HISTORY) to the primary.

    Examples
    --------
    >>> write_coadd_fits(stack(pieces, grid), "coadd.fits")  # doctest: +SKIP
    PosixPath('coadd.fits')
    """
    if "grid" not in coadd.attrs:
        msg = "the coadd has no 'grid' attribute: write a Dataset made by lazysky.pipeline.stack"
        raise ParameterError(msg)
    path = Path(path)
    if path.exists() and not overwrite:
        msg = f"{path} exists: pass overwrite=True to replace it"
        raise OutputError(msg)
    g = dict(coadd.attrs["grid"])
    grid = SkyGrid(**{**g, "shape": tuple(g["shape"])})
    headers = _fits_headers(coadd, grid, header)
    ny, nx = (int(n) for n in coadd["image"].shape)
    offsets, end = [], 0
    for h, name in zip(headers, _PLANES, strict=True):
        end += len(h.tostring())
        offsets.append(end)
        end += -(-ny * nx * np.dtype(coadd[name].dtype).itemsize // _FITS_BLOCK) * _FITS_BLOCK
    try:
        with open(path, "wb") as f:
            for h, off in zip(headers, offsets, strict=True):
                text = h.tostring().encode("ascii")
                f.seek(off - len(text))
                f.write(text)
            f.truncate(end)  # the data and their padding: zeros until written
        dask.compute(*[_band_writes(da.asarray(coadd[name].data), str(path), off)
                       for name, off in zip(_PLANES, offsets, strict=True)])  # fmt: skip
    except OSError as exc:
        path.unlink(missing_ok=True)
        msg = f"cannot write the coadd to {path}: {exc}"
        raise OutputError(msg) from exc
    except BaseException:
        path.unlink(missing_ok=True)  # no half-written coadd left behind
        raise
    return path

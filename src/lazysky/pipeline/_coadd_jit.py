"""Compiled (numba) kernels of the coadd: one pass per pixel where numpy makes tens.

The numpy kernels in :mod:`lazysky.pipeline.resample` (``_resample_packed``,
``PixelMap.evaluate``) and :mod:`lazysky.pipeline.stack` (``_merge``, ``_clip`` and the
weighted sums of ``stack_pixels``) stay the reference: these do the same arithmetic, in
the same order and precision (float32 where they use float32, float64 where they use
float64), pixel by pixel, with the GIL released, so that the two agree to float
rounding (tested on a real calibrated frame, ``tests/pipeline/test_resample.py`` and
``test_stack.py``). Used when numba is importable (:data:`AVAILABLE`); the numpy path
otherwise.

Compiled on first use and cached on disk (``cache=True``): a new process loads them in
milliseconds after the first.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

try:  # numba is a declared dependency; the numpy reference path runs without it
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None  # type: ignore[assignment]
    AVAILABLE = False

__all__ = ["AVAILABLE", "bilinear_strip", "clipped_mean_strip", "map_strip"]


def _jit(fn: Any, **options: Any) -> Any:
    """``numba.njit`` with the kernels' options, cached on disk when numba can.

    numba caches next to this file (``__pycache__``) or, where that is read-only (an
    installed package), in the user's cache directory (``~/.cache/numba``,
    ``NUMBA_CACHE_DIR``). Where neither is writable (a read-only container with no home)
    ``cache=True`` raises at decoration time, i.e. when this module is imported: then
    the kernels are compiled without a cache, in each process, and a warning says how
    to give them one.
    """
    if numba is None:  # pragma: no cover
        return fn
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy", **options)(fn)
    except RuntimeError as exc:  # numba's "cannot cache function …: no locator available"
        if "no locator available" not in str(exc):
            raise
        _warn_uncached()
        return numba.njit(nogil=True, cache=False, error_model="numpy", **options)(fn)


@functools.cache
def _warn_uncached() -> None:
    """Say once per process that the kernels are not cached, and how to cache them."""
    logger.warning(
        "numba cannot cache lazysky's compiled kernels: neither %s nor the user cache "
        "directory (~/.cache/numba) is writable, so each process compiles them again "
        "(seconds). Set NUMBA_CACHE_DIR to a writable directory to cache them.",
        os.path.join(os.path.dirname(__file__), "__pycache__"),
    )


def _jit_inline(fn: Any) -> Any:
    """A helper compiled into its callers (numba IR inlining: the same arithmetic,
    without a call per pixel)."""
    return _jit(fn, inline="always")


@_jit
def map_strip(
    xn: Any,
    yn: Any,
    lo: Any,
    ri: Any,
    rt: Any,
    ci: Any,
    ct: Any,
    out_x: Any,
    out_y: Any,
) -> Any:
    """``PixelMap.evaluate``'s interpolation: node rows ``lo + ri[r]``, columns ``ci[c]``.

    The column blend of every node row these rows need first, then the row blend, as
    the numpy code (so equal to it bit for bit).
    """
    n_nodes = 0
    for r in range(out_x.shape[0]):
        n_nodes = max(n_nodes, ri[r] - lo + 2)
    nc = out_x.shape[1]
    gx = np.empty((n_nodes, nc))
    gy = np.empty((n_nodes, nc))
    for k in range(n_nodes):
        for c in range(nc):
            i, t = ci[c], ct[c]
            s = 1 - t
            gx[k, c] = xn[lo + k, i] * s + xn[lo + k, i + 1] * t
            gy[k, c] = yn[lo + k, i] * s + yn[lo + k, i + 1] * t
    for r in range(out_x.shape[0]):
        k = ri[r] - lo
        a, b = 1 - rt[r], rt[r]
        for c in range(nc):
            out_x[r, c] = gx[k, c] * a + gx[k + 1, c] * b
            out_y[r, c] = gy[k, c] * a + gy[k + 1, c] * b


@_jit
def bilinear_strip(
    img: Any,
    var: Any,
    msk: Any,
    x_in: Any,
    y_in: Any,
    oy: Any,
    ox: Any,
    dny: Any,
    dnx: Any,
    nodata: Any,
    out_img: Any,
    out_var: Any,
    out_mask: Any,
) -> Any:
    """``_resample_packed`` pixel by pixel; returns False when the box is too small."""
    bny, bnx = img.shape
    ny, nx = out_img.shape
    for r in range(ny):
        for c in range(nx):
            x = x_in[r + 1, c + 1]
            y = y_in[r + 1, c + 1]
            if not (x >= -0.5 and x <= dnx - 0.5 and y >= -0.5 and y <= dny - 0.5):
                out_img[r, c] = 0.0
                out_var[r, c] = np.inf
                out_mask[r, c] = nodata
                continue
            dxdx = x_in[r + 1, c + 2] - x_in[r + 1, c]
            dxdy = x_in[r + 2, c + 1] - x_in[r, c + 1]
            dydx = y_in[r + 1, c + 2] - y_in[r + 1, c]
            dydy = y_in[r + 2, c + 1] - y_in[r, c + 1]
            jac = np.float32(abs(dxdx * dydy - dxdy * dydx) / 4)
            xc = min(max(x, 0.0), dnx - 1.0)
            yc = min(max(y, 0.0), dny - 1.0)
            x0 = int(xc)
            y0 = int(yc)
            fx = np.float32(xc - x0)
            fy = np.float32(yc - y0)
            x0 -= ox
            y0 -= oy
            sx = 1 if fx > 0 else 0
            sy = 1 if fy > 0 else 0
            if x0 < 0 or y0 < 0 or x0 + sx >= bnx or y0 + sy >= bny:
                return False
            gx = np.float32(1) - fx
            gy = np.float32(1) - fy
            w00, w01, w10, w11 = gx * gy, fx * gy, gx * fy, fx * fy
            ai = np.float32(0)
            ai += w00 * img[y0, x0]
            ai += w01 * img[y0, x0 + sx]
            ai += w10 * img[y0 + sy, x0]
            ai += w11 * img[y0 + sy, x0 + sx]
            av = np.float32(0)
            av += w00 * var[y0, x0]
            av += w01 * var[y0, x0 + sx]
            av += w10 * var[y0 + sy, x0]
            av += w11 * var[y0 + sy, x0 + sx]
            out_img[r, c] = ai * jac
            out_var[r, c] = av * (jac * jac)
            m = msk[y0, x0] | msk[y0, x0 + sx]
            out_mask[r, c] = m | msk[y0 + sy, x0] | msk[y0 + sy, x0 + sx]
    return True


@_jit_inline
def _median_kept(
    x: Any,
    keep: Any,
    n: Any,
    buf: Any,
) -> Any:
    """``stack._median`` of the kept values of one pixel (float32; NaN when none)."""
    k = 0
    for j in range(n):
        if keep[j]:
            buf[k] = x[j]
            k += 1
    if k == 0:
        return np.float32(np.nan)
    if n == 1:
        return buf[0]
    if n <= 3:  # as the numpy code: sum − min − max, (min + max) / 2, the value
        if k == 1:
            return buf[0]
        lo = min(buf[0], buf[1])
        hi = max(buf[0], buf[1])
        if k == 2:
            return (lo + hi) / np.float32(2)
        total = buf[0] + buf[1] + buf[2]
        lo = min(lo, buf[2])
        hi = max(hi, buf[2])
        return total - lo - hi
    for i in range(1, k):  # insertion sort of a handful of values
        v = buf[i]
        m = i - 1
        while m >= 0 and buf[m] > v:
            buf[m + 1] = buf[m]
            m -= 1
        buf[m + 1] = v
    return (buf[(k - 1) // 2] + buf[k // 2]) / np.float32(2)


@_jit
def clipped_mean_strip(
    image: Any,
    variance: Any,
    mask: Any,
    groups: Any,
    n_keys: Any,
    bad: Any,
    w: Any,
    pixel_weight: Any,
    sigma: Any,
    amp_frac: Any,
    max_iters: Any,
    nodata: Any,
    out_image: Any,
    out_variance: Any,
    out_weight: Any,
    out_count: Any,
    out_rejected: Any,
    out_mask: Any,
) -> Any:
    """``stack_pixels(method="clipped-mean")`` of layers ``(n, ny, nx)`` pixel by pixel.

    ``groups`` maps each layer to its exposure (``0 .. n_keys - 1``, in order of first
    appearance); ``w`` the frame weight of each exposure (ignored with
    ``pixel_weight``).
    """
    n_in, ny, nx = image.shape
    sig = np.float32(sigma)
    amp = np.float32(amp_frac)
    x = np.zeros(n_keys, dtype=np.float32)
    v = np.zeros(n_keys, dtype=np.float32)
    m = np.zeros(n_keys, dtype=mask.dtype)
    valid = np.zeros(n_keys, dtype=np.bool_)
    keep = np.zeros(n_keys, dtype=np.bool_)
    new = np.zeros(n_keys, dtype=np.bool_)
    buf = np.zeros(n_keys, dtype=np.float32)
    identity = n_in == n_keys
    for k in range(n_in):
        if groups[k] != k:
            identity = False
    for r in range(ny):
        for c in range(nx):
            n_valid = 0
            if identity:  # one layer per exposure: nothing to merge
                for j in range(n_keys):
                    vk = variance[j, r, c]
                    mk = mask[j, r, c]
                    m[j] = mk
                    if (mk & bad) == 0 and np.isfinite(vk) and vk > 0:
                        x[j], v[j], valid[j], keep[j] = image[j, r, c], vk, True, True
                        n_valid += 1
                    else:
                        x[j], v[j], valid[j], keep[j] = 0, np.inf, False, False
            else:
                for j in range(n_keys):
                    x[j], v[j], m[j], valid[j] = 0, np.inf, nodata, False
                for k in range(n_in):  # merge: the first valid layer of an exposure wins
                    j = groups[k]
                    vk = variance[k, r, c]
                    ok = (mask[k, r, c] & bad) == 0 and np.isfinite(vk) and vk > 0
                    if ok and not valid[j]:
                        x[j], v[j], m[j], valid[j] = image[k, r, c], vk, mask[k, r, c], True
                    elif not ok and not valid[j] and m[j] == nodata:
                        m[j] = mask[k, r, c]
                for j in range(n_keys):
                    keep[j] = valid[j]
                    n_valid += valid[j]
            if n_valid >= 3:
                for _ in range(max_iters):
                    centre = _median_kept(x, keep, n_keys, buf)
                    changed = False
                    for j in range(n_keys):
                        thresh = sig * np.sqrt(v[j] + (amp * centre) ** 2)
                        new[j] = valid[j] and abs(x[j] - centre) <= thresh
                        changed |= new[j] != keep[j]
                    for j in range(n_keys):
                        keep[j] = new[j]
                    if not changed:
                        break
            elif n_valid == 2:  # the higher of two goes when far above the lower
                hi, lo = -1, -1
                for j in range(n_keys):
                    if valid[j]:
                        if hi < 0 or x[j] > x[hi]:
                            hi = j
                        if lo < 0 or x[j] < x[lo]:
                            lo = j
                noise = np.sqrt(v[hi] + v[lo] + (amp * x[lo]) ** 2)
                if x[hi] - x[lo] > sig * noise:
                    keep[hi] = False
            wsum: Any = 0.0
            num, vsum = 0.0, 0.0
            n = 0
            bits = m.dtype.type(0)
            badbits = nodata
            for j in range(n_keys):
                badbits |= m[j]
                if keep[j]:
                    wj = np.float32(1) / v[j] if pixel_weight else np.float32(w[j])
                    wsum += wj
                    num += wj * x[j]
                    vsum += wj * wj * v[j]
                    n += 1
                    bits |= m[j]
            out_count[r, c] = n
            out_rejected[r, c] = n_valid - n
            if n == 0:
                out_image[r, c] = 0.0
                out_variance[r, c] = np.inf
                out_weight[r, c] = 0.0
                out_mask[r, c] = badbits
            else:
                safe = wsum if wsum > 0 else 1.0
                out_image[r, c] = num / safe
                out_variance[r, c] = vsum / safe**2
                out_weight[r, c] = wsum
                out_mask[r, c] = bits


@_jit
def _run_stats(s: Any, lo: Any, hi: Any, ref: Any) -> Any:
    """Median, mean and std of the sorted run ``s[lo:hi]`` (float64, about ``ref``)."""
    k = max(hi - lo, 1)
    n = s.shape[0]
    a = np.float64(s[min(lo + (k - 1) // 2, n - 1)])
    z = np.float64(s[min(lo + k // 2, n - 1)])
    s1, s2 = 0.0, 0.0
    for i in range(lo, hi):
        d = np.float64(s[i]) - ref
        s1 += d
        s2 += d * d
    mean = s1 / k
    var = s2 / k - mean * mean
    return (a + z) / 2, mean + ref, np.sqrt(max(var, 0.0))


@_jit
def row_levels(s: Any, sigma: Any, iters: Any, out: Any) -> Any:
    """``background._row_levels`` on rows of values already sorted (NaN last).

    The same clipped run of the sorted values per box, its ends found by bisection; the
    run's mean and std summed directly (float64, about the box's median) instead of from
    cumulative sums: equal to the numpy path to float32 rounding.
    """
    b, n = s.shape
    for j in range(b):
        row = s[j]
        count = 0
        for i in range(n):
            if np.isfinite(row[i]):
                count += 1
        if count < 16:
            out[j] = np.nan
            continue
        ref = np.float64(row[(count - 1) // 2])
        lo, hi = 0, count
        for _ in range(iters):
            med, _mean, std = _run_stats(row, lo, hi, ref)
            lower, upper = med - sigma * std, med + sigma * std
            a, z = lo, hi  # first position not < lower
            while a < z:
                mid = (a + z) // 2
                if row[mid] < lower:
                    a = mid + 1
                else:
                    z = mid
            start = a
            a, z = lo, hi  # first position not <= upper
            while a < z:
                mid = (a + z) // 2
                if row[mid] <= upper:
                    a = mid + 1
                else:
                    z = mid
            kept = a - start
            if kept == hi - lo or kept < 16:
                break
            lo, hi = start, start + kept
        med, mean, std = _run_stats(row, lo, hi, ref)
        if std > 0 and abs(mean - med) > 0.3 * std:
            out[j] = med
        else:
            out[j] = 2.5 * med - 1.5 * mean


@_jit
def spline_grid(c: Any, r_first: Any, r_basis: Any, c_first: Any, c_basis: Any, out: Any) -> Any:
    """A tensor-product B-spline on ``rows × cols``: ``Σ_p Σ_q B_p(row) c[p, q] B_q(col)``.

    ``*_first`` is the first non-zero basis function of each row (column) and
    ``*_basis`` its ``k + 1`` values (``scipy.interpolate.BSpline.design_matrix``). The
    rows' blend of the coefficients is made once per row, so a pixel costs ``k + 1``
    products; a pixel's value depends only on its row and column (no seams between
    tiles). Equal to FITPACK's ``bispev`` to float64 rounding.
    """
    nr, nc = out.shape
    kr, kc = r_basis.shape[1], c_basis.shape[1]
    blend = np.empty(c.shape[1])
    for i in range(nr):
        for q in range(c.shape[1]):
            acc = 0.0
            for p in range(kr):
                acc += r_basis[i, p] * c[r_first[i] + p, q]
            blend[q] = acc
        for j in range(nc):
            acc = 0.0
            for q in range(kc):
                acc += blend[c_first[j] + q] * c_basis[j, q]
            out[i, j] = acc

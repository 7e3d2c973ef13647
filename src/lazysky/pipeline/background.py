"""Sky background: a coarse mesh estimated once per detector, interpolated per tile.

Kernels: :func:`mesh_levels` (a clipped-mode sky level per ``box_px`` box of a block),
:func:`smooth_mesh` (fill empty boxes, median-filter the mesh) and
:func:`interpolate_mesh` (bicubic spline through the box centres, evaluated at given
pixel rows and columns). Lazily, :func:`estimate_background` computes the mesh from tiles
aligned on whole boxes, gathers each detector's mesh (a few numbers) and smooths it
whole, then evaluates the same spline on every tile: a pixel's value depends only on its
coordinates and the detector's mesh, so there are no seams and the tiled background
equals the whole-detector one.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from numpy.typing import NDArray
from scipy import interpolate, ndimage

from lazysky.errors import ParameterError
from lazysky.pipeline import _coadd_jit

__all__ = [
    "estimate_background",
    "interpolate_mesh",
    "mesh_levels",
    "smooth_mesh",
    "subtract_background",
]


def _box_level(values: NDArray[np.float32], *, sigma: float, iters: int) -> float:
    """SExtractor's clipped mode of one box (NaN when too few pixels are good)."""
    v = values[np.isfinite(values)]
    if v.size < 16:
        return float("nan")
    for _ in range(iters):
        med, std = np.median(v), np.std(v)
        keep = np.abs(v - med) <= sigma * std
        if keep.all() or keep.sum() < 16:
            break
        v = v[keep]
    median, mean, spread = float(np.median(v)), float(np.mean(v)), float(np.std(v))
    if spread > 0 and abs(mean - median) / spread > 0.3:  # crowded: the median is safer
        return median
    return 2.5 * median - 1.5 * mean


def mesh_levels(
    image: NDArray[Any],
    mask: NDArray[Any] | None = None,
    *,
    box_px: int = 64,
    sigma: float = 3.0,
    iters: int = 5,
) -> NDArray[np.float32]:
    """Sky level of each ``box_px`` box of a 2-D block (masked pixels ignored).

    Boxes start at the block's first row and column; the last ones may be partial.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).normal(100.0, 1.0, (10, 14))
    >>> levels = mesh_levels(img, box_px=5)
    >>> levels.shape, bool(np.all(np.abs(levels - 100) < 5))
    ((2, 3), True)
    """
    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape[-2:]
    my, mx = -(-ny // box_px), -(-nx // box_px)
    out = np.full((*img.shape[:-2], my, mx), np.nan, dtype=np.float32)
    if img.size == 0:
        return out
    msk = None if mask is None else np.asarray(mask)
    fy, fx = ny // box_px, nx // box_px  # whole boxes: all of a row of them at once
    for idx in np.ndindex(*img.shape[:-2]):
        plane = img[idx]
        for j in range(my):
            # masked pixels as NaN, one row of boxes at a time (no copy of the plane)
            rows = plane[j * box_px : (j + 1) * box_px]
            if msk is not None:
                rows = np.where(msk[idx][j * box_px : (j + 1) * box_px] != 0,
                                np.float32(np.nan), rows)  # fmt: skip
            if j < fy and fx > 0:
                boxes = rows[:, : fx * box_px].reshape(box_px, fx, box_px).transpose(1, 0, 2)
                flat = boxes.reshape(fx, box_px * box_px)  # a copy, unless one box wide
                out[(*idx, j, slice(0, fx))] = _row_levels(
                    flat, sigma=sigma, iters=iters, scratch=not np.may_share_memory(flat, img)
                )
            for i in range(fx if j < fy else 0, mx):  # partial boxes: one by one
                box = rows[:, i * box_px : (i + 1) * box_px]
                out[(*idx, j, i)] = _box_level(box.ravel(), sigma=sigma, iters=iters)
    return out


def _row_levels(
    values: NDArray[np.float32], *, sigma: float, iters: int, scratch: bool = False
) -> NDArray[np.float64]:
    """:func:`_box_level` of every row of ``values`` ``(boxes, pixels)``.

    Sorted once by numpy (in place when ``values`` is ``scratch``: the caller's own
    temporary); the clipping by the compiled kernel
    (:func:`lazysky.pipeline._coadd_jit.row_levels`) when numba is there, else by
    :func:`_row_levels_numpy` (the reference; the two agree to float32 rounding).
    """
    if not _coadd_jit.AVAILABLE:
        return _row_levels_numpy(values, sigma=sigma, iters=iters)
    out = np.empty(values.shape[0])
    if scratch:
        values.sort(axis=1)
    _coadd_jit.row_levels(values if scratch else np.sort(values, axis=1), float(sigma),
                          int(iters), out)  # fmt: skip
    return out


def _row_levels_numpy(
    values: NDArray[np.float32], *, sigma: float, iters: int
) -> NDArray[np.float64]:
    """:func:`_box_level` of every row of ``values`` ``(boxes, pixels)``, vectorised.

    Sorted once: a clipping interval ``|v - median| <= sigma std`` of sorted values is a
    contiguous run, so each iteration only moves the run's ends, and the mean and std
    of a run come from cumulative sums (about a per-box reference, for precision).
    """
    b, n = values.shape
    s = np.sort(values, axis=1)  # NaN last
    count = np.isfinite(s).sum(axis=1)
    rows = np.arange(b)
    ref = np.where(count > 0, s[rows, np.maximum(count - 1, 0) // 2], 0).astype(np.float64)
    d = np.where(np.isfinite(s), s - ref[:, None], 0.0)
    c1 = np.zeros((b, n + 1))
    c2 = np.zeros((b, n + 1))
    np.cumsum(d, axis=1, out=c1[:, 1:])
    np.cumsum(d * d, axis=1, out=c2[:, 1:])
    lo, hi = np.zeros(b, dtype=np.intp), count.astype(np.intp)

    def stats(
        lo: NDArray[np.intp], hi: NDArray[np.intp]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        k = np.maximum(hi - lo, 1)
        a = s[rows, np.minimum(lo + (k - 1) // 2, n - 1)].astype(np.float64)
        z = s[rows, np.minimum(lo + k // 2, n - 1)].astype(np.float64)
        mean = (c1[rows, hi] - c1[rows, lo]) / k
        var = (c2[rows, hi] - c2[rows, lo]) / k - mean**2
        return (a + z) / 2, mean + ref, np.sqrt(np.maximum(var, 0.0))

    def first(bound: NDArray[np.float64], *, strict: bool) -> NDArray[np.intp]:
        """Per row, the first position in ``[lo, hi)`` whose value is not ``< bound`` (or
        ``<= bound`` with ``strict=False``): the run is sorted, so a bisection of every
        row at once (log2 n gathers) replaces full passes over the rows."""
        a, b = lo.copy(), hi.copy()
        while True:
            todo = a < b
            if not todo.any():
                return a
            mid = (a + b) // 2
            v = s[rows, np.minimum(mid, n - 1)]
            left = (v < bound) if strict else (v <= bound)
            a = np.where(todo & left, mid + 1, a)
            b = np.where(todo & ~left, mid, b)

    active = count >= 16
    for _ in range(iters):
        if not active.any():
            break
        med, _mean, std = stats(lo, hi)
        lower, upper = med - sigma * std, med + sigma * std
        start = first(lower, strict=True)  # values in [lo, start) are < lower
        below = start - lo
        kept = first(upper, strict=False) - start  # lower <= value <= upper
        active &= (kept < hi - lo) & (kept >= 16)  # else: nothing changes, or too few
        lo, hi = np.where(active, lo + below, lo), np.where(active, lo + below + kept, hi)
    med, mean, std = stats(lo, hi)
    crowded = (std > 0) & (np.abs(mean - med) > 0.3 * np.where(std > 0, std, 1.0))
    level = np.where(crowded, med, 2.5 * med - 1.5 * mean)
    return np.where(count >= 16, level, np.nan)


def smooth_mesh(mesh: NDArray[Any], *, filter_size: int = 3) -> NDArray[np.float32]:
    """Fill empty boxes with the median of the good ones, median-filter the last two axes."""
    m = np.array(mesh, dtype=np.float32)
    if m.size == 0:
        return m
    for idx in np.ndindex(*m.shape[:-2]):
        plane = m[idx]
        good = np.isfinite(plane)
        plane[~good] = np.median(plane[good]) if good.any() else np.float32(0)
    if filter_size > 1:
        size = [1] * (m.ndim - 2) + [filter_size, filter_size]
        m = ndimage.median_filter(m, size=size, mode="nearest")
    return m


def interpolate_mesh(
    mesh: NDArray[Any],
    rows: NDArray[Any],
    cols: NDArray[Any],
    *,
    box_px: int,
    shape: tuple[int, int],
) -> NDArray[np.float32]:
    """Bicubic spline through the box centres of a 2-D mesh, at ``rows × cols`` pixels.

    ``shape`` is the detector's; the spline spans it whole, so a pixel's value does not
    depend on which tile asks for it.
    """
    m = np.asarray(mesh, dtype=np.float64)
    ny, nx = shape
    yc = np.minimum(
        np.arange(m.shape[0]) * box_px + box_px / 2 - 0.5,
        (ny + np.arange(m.shape[0]) * box_px) / 2 - 0.5,
    )
    xc = np.minimum(
        np.arange(m.shape[1]) * box_px + box_px / 2 - 0.5,
        (nx + np.arange(m.shape[1]) * box_px) / 2 - 0.5,
    )
    if m.shape[0] == 1 and m.shape[1] == 1:
        return np.full((len(rows), len(cols)), m[0, 0], dtype=np.float32)
    if m.shape[0] == 1 or m.shape[1] == 1:  # one row or column of boxes: 1-D spline
        along_y = m.shape[1] == 1
        centres, values = (yc, m[:, 0]) if along_y else (xc, m[0])
        k = min(3, len(centres) - 1)
        spl = interpolate.make_interp_spline(centres, values, k=k)
        line = spl(np.asarray(rows if along_y else cols, dtype=float)).astype(np.float32)
        return np.broadcast_to(
            line[:, None] if along_y else line[None, :], (len(rows), len(cols))
        ).copy()
    spline = interpolate.RectBivariateSpline(
        yc, xc, m, kx=min(3, m.shape[0] - 1), ky=min(3, m.shape[1] - 1),
        bbox=[-0.5, ny - 0.5, -0.5, nx - 0.5],
    )  # fmt: skip
    rows, cols = np.asarray(rows, float), np.asarray(cols, float)
    if _coadd_jit.AVAILABLE and len(rows) and len(cols):
        # the same spline evaluated by a compiled kernel (FITPACK's bispev made a
        # quarter of the background's CPU): equal to it to float64 rounding
        t_r, t_c = spline.get_knots()
        k_r, k_c = min(3, m.shape[0] - 1), min(3, m.shape[1] - 1)
        coef = spline.get_coeffs().reshape(len(t_r) - k_r - 1, len(t_c) - k_c - 1)
        out = np.empty((len(rows), len(cols)), dtype=np.float32)
        _coadd_jit.spline_grid(coef, *_basis(rows, t_r, k_r), *_basis(cols, t_c, k_c), out)
        return out
    return np.asarray(spline(rows, cols), dtype=np.float32)


def _basis(
    at: NDArray[np.float64], knots: NDArray[np.float64], k: int
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Index of the first non-zero B-spline of degree ``k`` at each point, and the ``k + 1``
    non-zero values there."""
    dm = interpolate.BSpline.design_matrix(at, knots, k).tocsr()
    # k + 1 consecutive entries per point (zeros included): rows of the CSR arrays
    return dm.indices.reshape(len(at), k + 1)[:, 0].astype(np.intp), dm.data.reshape(len(at), k + 1)


def _check(box_px: int, filter_size: int) -> None:
    if box_px < 4:
        msg = f"box_px must be >= 4, got {box_px}"
        raise ParameterError(msg)
    if filter_size < 1 or filter_size % 2 == 0:
        msg = f"filter_size must be an odd number >= 1, got {filter_size}"
        raise ParameterError(msg)


_MESH_TILE_PX = 2048  # the mesh's tasks cover at most this square (in whole boxes)


def estimate_background(
    calibrated: xr.Dataset, *, box_px: int = 64, filter_size: int = 3
) -> xr.DataArray:
    """The sky background ``(detector, y, x)`` of a calibrated exposure (lazy).

    Masked pixels (any flag) are left out of the boxes. The result is chunked like
    ``image``; tasks are named ``background-mesh-…`` and ``background-…``.
    """
    bkg = _background(calibrated, box_px=box_px, filter_size=filter_size, subtract=False)
    coords = {k: v for k, v in calibrated["image"].coords.items() if set(v.dims) <= {"detector"}}
    out = xr.DataArray(bkg, dims=("detector", "y", "x"), coords=coords, name="background")
    out.attrs.update({"units": calibrated["image"].attrs.get("units", ""),
                      "box_px": box_px, "filter_size": filter_size})  # fmt: skip
    return out


def _background(
    calibrated: xr.Dataset, *, box_px: int, filter_size: int, subtract: bool
) -> da.Array:
    """The background, or with ``subtract`` the image minus it, as a dask array.

    Both share the mesh's tasks (``background-mesh-…``, ``background-smooth-…``); the
    subtracted image is made in the background's own buffer (its ``background-…`` tasks
    have a token of their own): one image-sized array per tile instead of two.
    """
    _check(box_px, filter_size)
    image = da.asarray(calibrated["image"].data)
    mask = da.asarray(calibrated["mask"].data).rechunk(image.chunks)
    ny, nx = int(image.shape[1]), int(image.shape[2])
    # tiles for the mesh: whole boxes, about the size of the image's tiles but no larger
    # than _MESH_TILE_PX (a whole-detector chunk still gives its mesh to several tasks;
    # the boxes, and so the mesh, are the same whatever the tiles)
    token = tokenize(image, mask, box_px, filter_size)
    mesh = _mesh(image, mask, box_px=box_px, name=f"background-mesh-{token}")
    mesh = da.map_blocks(
        smooth_mesh,
        mesh.rechunk({0: 1, 1: -1, 2: -1}),
        filter_size=filter_size,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        name=f"background-smooth-{token}",
    )
    rows = da.arange(ny, chunks=image.chunks[1])
    cols = da.arange(nx, chunks=image.chunks[2])
    dtype = np.result_type(image.dtype, np.float32) if subtract else np.dtype(np.float32)

    def block(
        tile: NDArray[Any],
        _bad: NDArray[Any],
        m: NDArray[Any],
        r: NDArray[Any],
        c: NDArray[Any],
    ) -> NDArray[Any]:
        out: NDArray[Any] = np.empty(tile.shape, dtype=dtype)  # the tile: block shape
        for d in range(out.shape[0]):
            out[d] = interpolate_mesh(m[d], r, c, box_px=box_px, shape=(ny, nx))
            if subtract:  # image − background, as float32 arithmetic, in the same buffer
                np.subtract(tile[d], out[d], out=out[d])
        return out

    # The mask tiles are read here too, though only the mesh uses them: it gives the
    # mask (like the image) a second reader, so dask cannot fuse it into the mesh's
    # layer. dask 2026.8 optimizes ``dask.compute(dataset)`` with only its finalize key:
    # a requested variable whose Blockwise layer has one Blockwise reader is fused into
    # it and the finalize task then misses it (``ValueError: Missing dependency
    # ('getitem-…', …) for dependents {'finalize-hlgfinalizecompute-…'}``), here
    # whenever the mesh tiles are the image's (tiles a multiple of ``box_px``).
    # Minimal reproduction (dask 2026.8.0, xarray 2026.9.0; ok with
    # ``optimize_graph=False`` or ``dask.compute(m, b)``)::
    #
    #     m = da.arange(16, chunks=4).reshape(4, 4).rechunk(2) + 1
    #     b = da.map_blocks(np.negative, m)
    #     dask.compute(xr.Dataset({"m": (("y", "x"), m), "b": (("y", "x"), b)}))
    # both are "background-…" tasks on the dashboard; the subtracted image's own token
    return da.blockwise(
        block, "dyx", image, "dyx", mask, "dyx", mesh, "dab", rows, "y", cols, "x",
        concatenate=True, dtype=dtype, meta=np.empty((0, 0, 0), dtype=dtype),
        name=f"background-{tokenize(token, 'subtract') if subtract else token}",
    )  # fmt: skip


def _mesh(image: da.Array, mask: da.Array, *, box_px: int, name: str) -> da.Array:
    """:func:`mesh_levels` of ``image`` lazily, one task per window of its chunks.

    A window is at most :data:`_MESH_TILE_PX` square in whole boxes, cut from its chunk
    inside the task (a view: dask's own slicing would copy a window of less than half a
    chunk), so a whole-detector chunk still spreads its mesh over several tasks. Boxes
    start at multiples of ``box_px`` from the detector's origin whatever the chunks and
    windows (chunks that are not whole boxes are made so first), so the mesh is the same.
    """
    from dask.highlevelgraph import HighLevelGraph

    if any(c % box_px for ch in image.chunks[1:] for c in ch[:-1]):  # tiles of whole boxes
        size = max(box_px, (max(image.chunks[1][0], image.chunks[2][0]) // box_px) * box_px)
        image, mask = image.rechunk((1, size, size)), mask.rechunk((1, size, size))
    step = max(box_px, (_MESH_TILE_PX // box_px) * box_px)
    splits = []  # per axis: per chunk, the (start, stop) of its windows
    for ch in image.chunks[1:]:
        splits.append([[(a, min(a + step, c)) for a in range(0, c, step)] for c in ch])
    dsk: dict[Any, Any] = {}
    for d in range(len(image.chunks[0])):
        wy = 0
        for iy, rows in enumerate(splits[0]):
            for r0, r1 in rows:
                wx = 0
                for ix, cols in enumerate(splits[1]):
                    for c0, c1 in cols:
                        win = (slice(None), slice(r0, r1), slice(c0, c1))
                        dsk[(name, d, wy, wx)] = (_mesh_window, (image.name, d, iy, ix),
                                                  (mask.name, d, iy, ix), win, box_px)  # fmt: skip
                        wx += 1
                wy += 1
    chunks = (image.chunks[0], *(tuple(-(-(b - a) // box_px) for per in sp for a, b in per)
                                  for sp in splits))  # fmt: skip
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[image, mask])  # type: ignore[list-item]
    return da.Array(graph, name, chunks=chunks, dtype=np.float32,
                    meta=np.empty((0, 0, 0), dtype=np.float32))  # fmt: skip


def _mesh_window(
    image: NDArray[Any], mask: NDArray[Any], window: tuple[slice, ...], box_px: int
) -> NDArray[np.float32]:
    return mesh_levels(image[window], mask[window], box_px=box_px)


def subtract_background(
    calibrated: xr.Dataset, *, box_px: int = 64, filter_size: int = 3
) -> xr.Dataset:
    """``image`` minus :func:`estimate_background`, which is kept as ``background`` (lazy).

    Examples
    --------
    >>> from lazysky.pipeline import calibrate_exposure
    >>> from lazysky.pipeline.testing import synthetic_exposure
    >>> out = subtract_background(calibrate_exposure(synthetic_exposure()), box_px=5)
    >>> float(abs(out.image).max())
    0.0
    """
    bkg = estimate_background(calibrated, box_px=box_px, filter_size=filter_size)
    out = calibrated.copy()
    # the image minus the same background, made in one buffer per tile (equal to
    # ``image - bkg``); computing both evaluates the (cheap) spline twice
    out["image"] = calibrated["image"].copy(
        data=_background(calibrated, box_px=box_px, filter_size=filter_size, subtract=True)
    )
    out["image"].attrs = dict(calibrated["image"].attrs)
    out["background"] = bkg
    out.attrs["steps"] = [
        *calibrated.attrs.get("steps", []),
        {"step": "subtract_background", "box_px": box_px, "filter_size": filter_size,
         "estimator": "clipped mode 2.5 median - 1.5 mean per box, median-filtered mesh, "
                      "bicubic spline"},
    ]  # fmt: skip
    return out

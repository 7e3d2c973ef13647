"""Resample calibrated detectors onto a :class:`SkyGrid`, one task per overlapped tile.

:func:`resample_pixels` is the numpy kernel: given, for every output pixel, the input
pixel coordinates of its centre (on a grid one pixel larger on each side, for the
Jacobian), it interpolates bilinearly and returns image, variance and mask.
:func:`resample_exposure` lifts it: for every detector it finds the tiles its footprint
touches, cuts from the detector only the box of input pixels the tile maps onto (plus a
halo), and makes one task ``resample-<exposure>-<detector>-<tile>-<token>`` per pair. A
detector that misses a tile costs nothing: the graph grows with the overlaps, not with
grid × exposures.

Units and conventions, per output pixel ``o`` with bilinear weights ``w_i`` on the input
pixels ``i`` and ``J`` the local area ratio (input pixels per output pixel, ``|det|`` of
the Jacobian of the output → input pixel mapping, by central differences)::

    image_o    = J · Σ w_i image_i          surface brightness × pixel-area ratio:
                                            electrons per *output* pixel (flux conserved)
    variance_o = J² · Σ w_i variance_i      the standard approximation (SWarp's): right for
                                            sums over areas larger than the kernel, it
                                            ignores the covariance between neighbouring
                                            output pixels and overestimates a single
                                            pixel's variance (Σ w_i² ≤ Σ w_i)
    mask_o     = OR of mask_i with w_i > 0  a pixel touched by a bad input pixel gets its bits

Output pixels whose centre falls outside the detector (beyond the outer half of its edge
pixels) are NODATA: image 0, variance ∞.

Why not ``reproject_interp``: its public functions return only values and a footprint;
the mask needs the bits of every input pixel with non-zero weight, and the area ratio
needs the mapping itself, so the kernel takes the mapping (astropy's WCS transforms, the
same ones reproject uses) and interpolates it itself — bilinear, as ``order="bilinear"``,
with reproject's convention of clamping the outer half of the edge pixels.

The mapping itself is, like SWarp's, evaluated with the WCS only on a coarse grid of
nodes (every 32 output pixels, :class:`PixelMap`) and interpolated in between; the node
spacing is chosen per detector (:func:`mapping_step`) so that the interpolation error
stays below :data:`MAP_TOLERANCE_PX` (0.01 px), and the nodes sit on the grid's pixel
lattice so that tiling does not change the result.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS
from dask.base import tokenize
from numpy.typing import NDArray

from lazysky.errors import LazySkyWarning, ParameterError
from lazysky.pipeline import _coadd_jit
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
from lazysky.pipeline.grid import SkyGrid, footprint_of, tiles_of

__all__ = [
    "MAP_TOLERANCE_PX",
    "RESAMPLED_DTYPE",
    "NoOverlapWarning",
    "PixelMap",
    "ResampleSource",
    "ResampledPixels",
    "ResampledTile",
    "mapping_step",
    "resample_exposure",
    "resample_pixels",
]

RESAMPLED_DTYPE = np.dtype([("image", np.float32), ("variance", np.float32), ("mask", MASK_DTYPE)])
HALO_PX = 2  # bilinear support (1 px) + 1: the cut box never clamps a non-edge coordinate
_NODATA = MASK_DTYPE.type(MaskBit.NODATA)
_STRIP_ROWS = 32  # output rows mapped at once: temporaries stay in cache (4x faster than 256)
MAP_TOLERANCE_PX = 0.01  # largest error of the interpolated pixel mapping (PixelMap)
_BOX_TOO_SMALL = "resample_pixels: the input box does not hold every pixel the mapping needs"


class NoOverlapWarning(LazySkyWarning):
    """A detector or exposure does not overlap the grid (or the tiles asked for)."""


@dataclass(frozen=True)
class ResampledPixels:
    """What :func:`resample_pixels` returns: three planes of the output's shape."""

    image: NDArray[np.float32]
    variance: NDArray[np.float32]
    mask: NDArray[np.uint16]


def resample_pixels(
    image: NDArray[Any],
    variance: NDArray[Any],
    mask: NDArray[Any],
    x_in: NDArray[np.float64],
    y_in: NDArray[np.float64],
    *,
    origin: tuple[int, int] = (0, 0),
    detector_shape: tuple[int, int] | None = None,
) -> ResampledPixels:
    """Bilinear resampling with flux, variance and mask propagated (module docstring).

    Parameters
    ----------
    image, variance, mask
        Input planes (a box cut from a detector).
    x_in, y_in
        ``(ny + 2, nx + 2)`` input pixel coordinates (0-based, of the *detector*) of the
        centres of the output pixels and of a one-pixel border around them.
    origin
        ``(y, x)`` of the box's first pixel in the detector.
    detector_shape
        ``(ny, nx)`` of the whole detector (default: the box is the detector).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.arange(140, dtype=np.float32).reshape(10, 14)
    >>> yy, xx = np.mgrid[-1:9, -1:13].astype(float)   # an output 8 x 12, shifted by 0.5
    >>> out = resample_pixels(img, np.ones_like(img), np.zeros(img.shape, np.uint16),
    ...                       xx + 0.5, yy)
    >>> float(out.image[0, 0]), float(out.variance[0, 0]), int(out.mask[-1, -1])
    (0.5, 1.0, 0)
    """
    return _resample_packed(
        _Packed.of(image, variance, mask), x_in, y_in, origin=origin,
        detector_shape=detector_shape if detector_shape is not None else image.shape,
    )  # fmt: skip


@dataclass(frozen=True)
class _Packed:
    """An input box as flat planes ready for gathering, without copying it when it can.

    A box cut from a larger array is a strided view; when its rows are contiguous, a
    flat view from its first to its last element serves (pixel ``(r, c)`` at
    ``r * row + c``, ``row`` the parent's row length): nothing is copied. Otherwise the
    plane is copied to a contiguous one.
    """

    image: NDArray[np.float32]
    variance: NDArray[np.float32]
    mask: NDArray[np.uint16]
    rows: tuple[int, int, int]  # row lengths of image, variance, mask in their flat views
    shape: tuple[int, int]

    @classmethod
    def of(cls, image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any]) -> _Packed:
        shape = (int(image.shape[0]), int(image.shape[1]))
        planes = [_flat(a, t) for a, t in ((image, np.float32), (variance, np.float32),
                                           (mask, MASK_DTYPE))]  # fmt: skip
        rows = (planes[0][1], planes[1][1], planes[2][1])
        return cls(planes[0][0], planes[1][0], planes[2][0], rows, shape)


def _flat(a: NDArray[Any], dtype: Any) -> tuple[NDArray[Any], int]:
    """A 1-d view (or copy) of a 2-d plane, and its row length in elements."""
    a = np.asarray(a)
    ny, nx = a.shape
    item = a.itemsize
    if (
        a.dtype == dtype
        and ny > 0
        and nx > 0
        and a.strides[1] == item
        and a.strides[0] % item == 0
        and a.strides[0] >= nx * item
    ):
        row = a.strides[0] // item
        span = (ny - 1) * row + nx
        return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(item,)), row
    return np.ascontiguousarray(a, dtype=dtype).ravel(), nx


def _resample_packed(
    box: _Packed,
    x_in: NDArray[np.float64],
    y_in: NDArray[np.float64],
    *,
    origin: tuple[int, int],
    detector_shape: tuple[int, int],
) -> ResampledPixels:
    ny, nx = x_in.shape[0] - 2, x_in.shape[1] - 2
    dny, dnx = detector_shape
    oy, ox = origin
    # area ratio: input pixels per output pixel, central differences on the border grid
    dxdx = x_in[1:-1, 2:] - x_in[1:-1, :-2]
    dxdy = x_in[2:, 1:-1] - x_in[:-2, 1:-1]
    dydx = y_in[1:-1, 2:] - y_in[1:-1, :-2]
    dydy = y_in[2:, 1:-1] - y_in[:-2, 1:-1]
    jac = (np.abs(dxdx * dydy - dxdy * dydx) / 4).astype(np.float32)
    del dxdx, dxdy, dydx, dydy
    x, y = x_in[1:-1, 1:-1], y_in[1:-1, 1:-1]
    with np.errstate(invalid="ignore"):
        inside = (x >= -0.5) & (x <= dnx - 0.5) & (y >= -0.5) & (y <= dny - 0.5)  # NaN: False
    everywhere = bool(inside.all())
    xc = np.clip(x if everywhere else np.where(inside, x, 0.0), 0, dnx - 1)
    yc = np.clip(y if everywhere else np.where(inside, y, 0.0), 0, dny - 1)
    x0, y0 = xc.astype(np.intp), yc.astype(np.intp)  # >= 0: truncation is floor
    fx, fy = (xc - x0).astype(np.float32), (yc - y0).astype(np.float32)
    del xc, yc
    bny, bnx = box.shape
    x0 -= ox
    y0 -= oy
    if not everywhere:  # pixels outside the detector read the box's first pixel, weight 0
        x0[~inside], y0[~inside], fx[~inside], fy[~inside] = 0, 0, 0, 0
    # a zero weight never reads beyond the detector's last column or row
    if inside.any() and (
        min(x0.min(), y0.min()) < 0
        or (x0 + (fx > 0)).max() >= bnx
        or (y0 + (fy > 0)).max() >= bny
    ):
        raise ParameterError(_BOX_TOO_SMALL)
    # a corner with zero weight reads the pixel itself (never beyond the box): its bits
    # are then those of a corner already counted, so the mask is a plain OR of 4 reads
    step_x, step_y = fx > 0, fy > 0
    corners: dict[int, list[NDArray[np.intp]]] = {}
    for row in set(box.rows):  # flat indices of the 4 corners, per row length
        i00 = y0 * row + x0
        i01 = i00 + step_x
        i10 = i00 + step_y * row
        corners[row] = [i00, i01, i10, i10 + step_x]
    del x0, y0
    gx, gy = 1 - fx, 1 - fy
    acc_img = np.zeros((ny, nx), dtype=np.float32)
    acc_var = np.zeros((ny, nx), dtype=np.float32)
    out_mask = np.zeros((ny, nx), dtype=MASK_DTYPE)
    for c, w in enumerate((gx * gy, fx * gy, gx * fy, fx * fy)):
        if not everywhere:
            w[~inside] = 0
        acc_img += w * box.image.take(corners[box.rows[0]][c])
        acc_var += w * box.variance.take(corners[box.rows[1]][c])
        out_mask |= box.mask.take(corners[box.rows[2]][c])
    out_img = acc_img * jac
    out_var = acc_var * (jac * jac)
    if not everywhere:
        out_img[~inside] = 0.0
        out_var[~inside] = np.inf
        out_mask[~inside] = _NODATA
    return ResampledPixels(
        out_img.astype(np.float32, copy=False), out_var.astype(np.float32, copy=False), out_mask
    )


def _resample_block(
    image: NDArray[Any],
    variance: NDArray[Any],
    mask: NDArray[Any],
    **options: Any,
) -> NDArray[Any]:
    """One (detector, tile) task: :class:`_Resampler` on the whole tile, into records.

    ``options``: those of :class:`_Resampler` (``header``, ``grid``, ``tile``, ``origin``,
    ``detector_shape``, ``map_step``, ``window``, ``box``).
    """
    ny, nx = options["grid"].tile_shape(options["tile"])
    out = np.empty((ny, nx), dtype=RESAMPLED_DTYPE)
    if image.size == 0:  # dask's meta inference
        return out
    _Resampler(image, variance, mask, **options).fill(0, ny, out["image"], out["variance"],
                                                      out["mask"])  # fmt: skip
    return out


class _Resampler:
    """One detector resampled onto one tile, prepared once: :meth:`fill` writes any rows.

    The mapping from fresh WCS objects (WCS is not thread-safe), the input planes (cut to
    ``box``, a view, when they are the whole detector) and the window of the tile the
    detector can reach (``(row0, row1, col0, col1)``, default all of it): outside it the
    tile is NODATA. A pixel's value does not depend on which rows are asked for together,
    so filling a tile in any strips gives the same bits.
    """

    def __init__(
        self,
        image: NDArray[Any],
        variance: NDArray[Any],
        mask: NDArray[Any],
        *,
        header: str,
        grid: SkyGrid,
        tile: str,
        origin: tuple[int, int],
        detector_shape: tuple[int, int],
        map_step: int = 1,
        window: tuple[int, int, int, int] | None = None,
        box: tuple[slice, slice] | None = None,
    ) -> None:
        planes = [np.asarray(a) for a in (image, variance, mask)]
        if box is not None:
            planes = [a[box] for a in planes]
        self.planes, self.origin, self.detector_shape = planes, origin, detector_shape
        ny, nx = grid.tile_shape(tile)
        self.window = (0, ny, 0, nx) if window is None else window
        wr0, wr1, wc0, wc1 = self.window
        self.mapping: PixelMap | None = None
        if wr1 > wr0 and wc1 > wc0:
            sy, sx = grid.tile_slices(tile)
            self.mapping = PixelMap(grid.wcs, _wcs_from_text(header),
                                    rows=(sy.start + wr0 - 1, sy.start + wr1 + 1),
                                    cols=(sx.start + wc0 - 1, sx.start + wc1 + 1),
                                    step=map_step)  # fmt: skip
        self._buffers: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
        self._packed: _Packed | None = None

    def fill(
        self, r0: int, r1: int, image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any]
    ) -> None:
        """Tile rows ``r0`` to ``r1`` (excluded) into ``image``, ``variance``, ``mask``
        (each ``(r1 - r0, tile columns)``)."""
        wr0, wr1, wc0, wc1 = self.window
        a, b = max(r0, wr0), min(r1, wr1)
        if self.mapping is None or b <= a:  # no row of the window: all NODATA
            image[...], variance[...], mask[...] = 0.0, np.inf, _NODATA
            return
        # NODATA outside the window only (each pixel is written once: the fill cost as
        # much as the resampling)
        for part in (slice(0, a - r0), slice(b - r0, r1 - r0)):
            image[part], variance[part], mask[part] = 0.0, np.inf, _NODATA
        for cols in (slice(0, wc0), slice(wc1, None)):
            rows = slice(a - r0, b - r0)
            image[rows, cols], variance[rows, cols], mask[rows, cols] = 0.0, np.inf, _NODATA
        for s0 in range(a, b, _STRIP_ROWS):  # strips: temporaries stay in cache
            s1 = min(s0 + _STRIP_ROWS, b)
            dest = [d[s0 - r0 : s1 - r0, wc0:wc1] for d in (image, variance, mask)]
            self._strip(s0 - wr0, s1 - wr0, dest)

    def _strip(self, a: int, b: int, dest: list[NDArray[Any]]) -> None:
        """Window rows ``a`` to ``b`` into ``dest`` (the window's columns)."""
        assert self.mapping is not None
        oy, ox = self.origin
        dny, dnx = self.detector_shape
        if _coadd_jit.AVAILABLE:  # the compiled kernel: one pass, straight into dest
            if self._buffers is None:  # reused: no fresh pages per strip
                shape = (_STRIP_ROWS + 2, self.window[3] - self.window[2] + 2)
                self._buffers = (np.empty(shape), np.empty(shape))
            x_in, y_in = self.mapping.evaluate(a, b + 2, out=self._buffers)
            if not _coadd_jit.bilinear_strip(*self.planes, x_in, y_in, oy, ox, dny, dnx,
                                             _NODATA, *dest):  # fmt: skip
                raise ParameterError(_BOX_TOO_SMALL)
            return
        if self._packed is None:
            self._packed = _Packed.of(*self.planes)
        x_in, y_in = self.mapping.evaluate(a, b + 2)
        px = _resample_packed(self._packed, x_in, y_in, origin=self.origin,
                              detector_shape=self.detector_shape)  # fmt: skip
        dest[0][...], dest[1][...], dest[2][...] = px.image, px.variance, px.mask


class PixelMap:
    """The output → input pixel mapping of a block, from the WCS on a coarse grid.

    Like SWarp, the two WCS transforms (output pixel → sky → input pixel) are evaluated
    only at nodes every ``step`` output pixels, and every pixel's input coordinates are
    interpolated bilinearly between them. The nodes sit on multiples of ``step`` in the
    *grid's* pixel coordinates, whatever the block, so a pixel's mapping does not depend
    on the tiling (a tiled resampling equals the whole-frame one, bit for bit).
    :func:`mapping_step` chooses a step whose interpolation error is below a tolerance;
    at step 1 the mapping is exact.

    Parameters
    ----------
    wcs_out, wcs_in
        Output (grid) and input (detector) celestial WCS.
    rows, cols
        ``(start, stop)`` output pixel rows and columns of the block (0-based, stop
        excluded).
    step
        Node spacing in output pixels.

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2); w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.cdelt = [-7e-5, 7e-5]; w.wcs.crval = [10.0, 20.0]; w.wcs.crpix = [50, 50]
    >>> v = w.deepcopy(); v.wcs.crpix = [40.5, 60.25]
    >>> x, y = PixelMap(w, v, rows=(0, 100), cols=(0, 120), step=32).evaluate(0, 100)
    >>> x.shape, round(float(x[0, 0]), 4), round(float(y[0, 0]), 4)
    ((100, 120), -9.5, 10.25)
    """

    def __init__(
        self,
        wcs_out: WCS,
        wcs_in: WCS,
        *,
        rows: tuple[int, int],
        cols: tuple[int, int],
        step: int,
    ) -> None:
        if step < 1:
            msg = f"PixelMap needs step >= 1, got {step}"
            raise ParameterError(msg)
        self._wcs_out, self._wcs_in = wcs_out, wcs_in
        self.rows, self.cols, self.step = rows, cols, int(step)
        if self.step > 1:
            self._ry, self._cx = _nodes(*rows, self.step), _nodes(*cols, self.step)
            self._x, self._y = _exact(wcs_out, wcs_in, self._ry, self._cx)
            self._col_index = _weights(self._cx, np.arange(*cols, dtype=float), self.step)

    def evaluate(
        self,
        r0: int,
        r1: int,
        *,
        out: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """``(x_in, y_in)`` of rows ``rows[0] + r0`` to ``rows[0] + r1`` (excluded), all columns.

        ``out``: two float64 arrays of at least ``r1 - r0`` rows and the block's columns to
        fill and return (views of their first rows; reused, they spare a strip's fresh
        pages); used only where the interpolation is compiled.
        """
        rows = np.arange(self.rows[0] + r0, self.rows[0] + r1, dtype=float)
        if self.step == 1:
            return _exact(self._wcs_out, self._wcs_in, rows, np.arange(*self.cols, dtype=float))
        ri, rt = _weights(self._ry, rows, self.step)
        ci, ct = self._col_index
        lo, hi = int(ri.min()), int(ri.max()) + 2  # the node rows these rows need
        if _coadd_jit.AVAILABLE:  # the same arithmetic, compiled (equal to the bit)
            if out is None:
                x, y = np.empty((len(rows), len(ci))), np.empty((len(rows), len(ci)))
            else:
                x, y = out[0][: len(rows)], out[1][: len(rows)]
            _coadd_jit.map_strip(self._x, self._y, lo, ri, rt, ci, ct, x, y)
            return x, y
        xy = []
        for f in (self._x[lo:hi], self._y[lo:hi]):
            g = f[:, ci] * (1 - ct) + f[:, ci + 1] * ct  # along the columns, node rows only
            v = np.empty((len(rows), g.shape[1]))
            for r in range(len(rows)):  # a row is a blend of two node rows
                k = int(ri[r]) - lo
                np.multiply(g[k], 1 - rt[r], out=v[r])
                v[r] += g[k + 1] * rt[r]
            xy.append(v)
        return xy[0], xy[1]


def mapping_step(
    wcs_out: WCS,
    wcs_in: WCS,
    *,
    rows: tuple[int, int],
    cols: tuple[int, int],
    start: int = 32,
    tolerance_px: float = MAP_TOLERANCE_PX,
) -> tuple[int, float]:
    """The largest node spacing ≤ ``start`` (halving) whose :class:`PixelMap` error < tolerance.

    The error is measured where a bilinear interpolant is worst, at the centre of every
    coarse cell over ``rows × cols`` (output pixels), against the exact mapping. A cell
    whose nodes or centre fall off either projection's sky cannot be interpolated and
    forces a smaller step. Returns ``(step, largest error in input pixels)``; step 1
    means exact (error 0).

    Examples
    --------
    >>> from astropy.wcs import WCS
    >>> w = WCS(naxis=2); w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> w.wcs.cdelt = [-7e-5, 7e-5]; w.wcs.crval = [10.0, 20.0]; w.wcs.crpix = [50, 50]
    >>> v = w.deepcopy(); v.wcs.crval = [10.2, 20.1]
    >>> step, err = mapping_step(w, v, rows=(0, 2048), cols=(0, 2048))
    >>> step, err < 1e-3
    (32, True)
    """
    if start < 1 or not tolerance_px > 0:
        msg = f"mapping_step needs start >= 1 and tolerance_px > 0, got {start}, {tolerance_px}"
        raise ParameterError(msg)
    step = int(start)
    while step > 1:
        ry, cx = _nodes(*rows, step), _nodes(*cols, step)
        x, y = _exact(wcs_out, wcs_in, ry, cx)
        xe, ye = _exact(wcs_out, wcs_in, ry[:-1] + step / 2, cx[:-1] + step / 2)
        xi = (x[:-1, :-1] + x[1:, :-1] + x[:-1, 1:] + x[1:, 1:]) / 4
        yi = (y[:-1, :-1] + y[1:, :-1] + y[:-1, 1:] + y[1:, 1:]) / 4
        finite = np.isfinite(xi) & np.isfinite(yi)
        if finite.all() and bool((np.isfinite(xe) & np.isfinite(ye)).all()):
            err = float(np.max(np.hypot(xi - xe, yi - ye)))
            if err < tolerance_px:
                return step, err
        step //= 2
    return 1, 0.0


def _exact(
    wcs_out: WCS, wcs_in: WCS, rows: NDArray[Any], cols: NDArray[Any]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Input pixel coordinates of the output pixels ``rows × cols``, from the two WCS."""
    cc, rr = np.meshgrid(cols, rows)
    ra, dec = wcs_out.pixel_to_world_values(cc, rr)
    x, y = wcs_in.world_to_pixel_values(ra, dec)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _nodes(start: int, stop: int, step: int) -> NDArray[np.float64]:
    """Multiples of ``step``, from the one at or below ``start`` to the one at or above the end."""
    first = (start // step) * step
    last = -(-(stop - 1) // step) * step
    return np.arange(first, max(last, first + step) + 1, step, dtype=float)


def _weights(
    nodes: NDArray[Any], at: NDArray[Any], step: int
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Left node index and fractional position of ``at`` between equally spaced nodes."""
    rel = at - nodes[0]
    i = np.minimum((rel // step).astype(np.intp), len(nodes) - 2)
    return i, (rel - i * step) / step


def _wcs_from_text(header: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FITSFixedWarning on the stored cards
        sep = "\n" if "\n" in header else ""  # the store's cards are unseparated
        return WCS(fits.Header.fromstring(header, sep=sep), naxis=2).celestial


@dataclass(frozen=True)
class ResampleSource:
    """What a :class:`ResampledTile`'s task resamples: its input planes (lazy: the
    detector's image, variance and mask, whole or cut to a box) and the options of the
    resampling (``_Resampler(*computed_planes, **options)`` prepares it)."""

    planes: tuple[da.Array, da.Array, da.Array]
    options: dict[str, Any]


@dataclass(frozen=True)
class ResampledTile:
    """One detector of one exposure resampled onto one tile of a grid (lazy).

    ``pixels`` is a dask array of the tile's shape and dtype :data:`RESAMPLED_DTYPE`
    (fields ``image``, ``variance``, ``mask``), one block; ``units`` those of ``image``
    per output pixel; ``frame_weight`` a lazy ``(1, 1)`` array, the inverse of the
    exposure's mean variance over its good input pixels (the same for every tile, so a
    stack does not depend on the tiling); ``source`` how ``pixels`` is made, which lets
    :func:`~lazysky.pipeline.stack` resample and combine a tile strip by strip in one task
    without holding the resampled tiles (None for pieces made otherwise).
    """

    exposure: str
    detector: str
    tile: str
    pixels: da.Array
    units: str
    frame_weight: da.Array
    source: ResampleSource | None = None

    def to_dataset(self) -> xr.Dataset:
        """The three planes as a lazy ``xarray.Dataset`` ``(y, x)``."""
        return xr.Dataset(
            {k: (("y", "x"), self.pixels[k]) for k in ("image", "variance", "mask")},
            attrs={
                "exposure": self.exposure,
                "detector": self.detector,
                "tile": self.tile,
                "units": self.units,
            },
        )


def _box(
    grid: SkyGrid, tile: str, wcs: WCS, det_shape: tuple[int, int]
) -> tuple[slice, slice] | None:
    """The input pixels (with halo) that ``tile`` maps onto, or None when it misses."""
    sy, sx = grid.tile_slices(tile)
    n = max(9, (max(sy.stop - sy.start, sx.stop - sx.start)) // 16 + 2)
    t = np.linspace(0.0, 1.0, n)
    x0, x1, y0, y1 = sx.start - 0.5, sx.stop - 0.5, sy.start - 0.5, sy.stop - 0.5
    gx = np.concatenate([x0 + t * (x1 - x0), np.full(n, x1), x1 - t * (x1 - x0), np.full(n, x0)])
    gy = np.concatenate([np.full(n, y0), y0 + t * (y1 - y0), np.full(n, y1), y1 - t * (y1 - y0)])
    ra, dec = grid.wcs.pixel_to_world_values(gx, gy)
    x, y = (np.asarray(c) for c in wcs.world_to_pixel_values(ra, dec))
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return None
    ny, nx = det_shape
    if x.max() < -0.5 or x.min() > nx - 0.5 or y.max() < -0.5 or y.min() > ny - 0.5:
        return None
    bx0 = max(int(np.floor(x.min())) - HALO_PX, 0)
    bx1 = min(int(np.ceil(x.max())) + HALO_PX + 1, nx)
    by0 = max(int(np.floor(y.min())) - HALO_PX, 0)
    by1 = min(int(np.ceil(y.max())) + HALO_PX + 1, ny)
    return slice(by0, by1), slice(bx0, bx1)


def _header_text(cal: xr.Dataset, detector: str, wcs: Mapping[str, WCS] | None) -> str:
    if wcs is not None:
        if detector not in wcs:
            msg = f"no WCS given for detector {detector!r} (wcs has {sorted(wcs)})"
            raise ParameterError(msg)
        return str(copy.deepcopy(wcs[detector]).celestial.to_header().tostring())
    if "header" not in cal.coords:
        msg = (
            "the calibrated exposure has no 'header' coordinate to read its WCS from: pass "
            "wcs={detector: WCS} (frames without any WCS must be registered first)"
        )
        raise ParameterError(msg)
    text = str(cal.coords["header"].sel(detector=detector).values)
    w = _wcs_from_text(text)
    if not w.has_celestial or w.naxis != 2:
        msg = f"detector {detector!r} has no celestial WCS in its header: register it first"
        raise ParameterError(msg)
    return text


def resample_exposure(
    calibrated: xr.Dataset,
    grid: SkyGrid,
    *,
    tiles: Sequence[str] | None = None,
    wcs: Mapping[str, WCS] | None = None,
    bad_bits: int = int(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NODATA),
) -> list[ResampledTile]:
    """Resample every detector of a calibrated exposure onto the tiles of ``grid`` it touches.

    Parameters
    ----------
    calibrated
        ``image``, ``variance``, ``mask`` ``(detector, y, x)`` (e.g.
        :func:`lazysky.pipeline.calibrate_exposure`), with per-detector ``header``
        coordinates holding the WCS of these pixels (calibrate_exposure moves CRPIX to the
        DATASEC origin, as calibrate_files does).
    grid
        The sky grid.
    tiles
        Only these tiles (default: all that overlap).
    wcs
        ``{detector: WCS}`` overriding the headers (e.g. after registration).
    bad_bits
        Mask bits left out of the exposure's mean variance (its frame weight).

    Returns
    -------
    list of ResampledTile
        One lazy piece per overlapped (detector, tile); none (and a
        :class:`NoOverlapWarning`) when the exposure misses the grid.

    Examples
    --------
    >>> pieces = resample_exposure(cal, grid)  # doctest: +SKIP
    >>> pieces[0].to_dataset().image.compute()  # doctest: +SKIP
    """
    missing = [k for k in ("image", "variance", "mask") if k not in calibrated.data_vars]
    if missing:
        msg = f"resample_exposure needs image, variance and mask; missing {missing}"
        raise ParameterError(msg)
    if calibrated.image.dims != ("detector", "y", "x"):
        msg = f"image must have dims ('detector', 'y', 'x'), got {calibrated.image.dims}"
        raise ParameterError(msg)
    wanted = set(tiles_of(grid, tiles))
    exposure = _exposure_id(calibrated)
    units = str(calibrated.image.attrs.get("units", ""))
    det_shape = (int(calibrated.sizes["y"]), int(calibrated.sizes["x"]))
    arrays = [da.asarray(calibrated[k].data) for k in ("image", "variance", "mask")]
    frame_weight = _frame_weight(arrays[1], arrays[2], bad_bits=bad_bits, exposure=exposure)
    # one chunk per detector (each plane): tasks take the detector and cut their box
    whole = all(c == (1,) * len(c) for c in (a.chunks[0] for a in arrays)) and all(
        len(c) == 1 for a in arrays for c in a.chunks[1:]
    )
    out = []
    for i, det in enumerate(map(str, calibrated.detector.values)):
        header = _header_text(calibrated, det, wcs)
        w = _wcs_from_text(header)
        reach = _detector_window(grid, w, det_shape)
        map_step = 1 if reach is None else _map_step(grid, w, reach)
        for tile in grid.tiles_overlapping((w, det_shape)):
            box = _box(grid, tile, w, det_shape) if tile in wanted else None
            if box is None:
                continue
            window = None if reach is None else _tile_window(grid, tile, reach)
            if whole:  # the task cuts the box: a view (dask's slicing would copy it)
                args, cut = [a[i] for a in arrays], box
            else:
                args, cut = [a[i, box[0], box[1]].rechunk(-1) for a in arrays], None
            options = {"header": header, "grid": grid, "tile": tile,
                       "origin": (box[0].start, box[1].start), "detector_shape": det_shape,
                       "map_step": map_step, "window": window, "box": cut}  # fmt: skip
            token = tokenize(*args, options)
            pixels = da.map_blocks(
                _resample_block, *args, **options,
                chunks=tuple((n,) for n in grid.tile_shape(tile)),
                dtype=RESAMPLED_DTYPE, meta=np.empty((0, 0), dtype=RESAMPLED_DTYPE),
                name=f"resample-{exposure}-{det}-{tile}-{token}",
            )  # fmt: skip
            source = ResampleSource((args[0], args[1], args[2]), options)
            out.append(ResampledTile(exposure, det, tile, pixels, units, frame_weight, source))
    if not out:
        msg = f"exposure {exposure!r} does not overlap the grid (or the tiles asked for)"
        warnings.warn(msg, NoOverlapWarning, stacklevel=2)
    return out


def _good_sums(var: NDArray[Any], msk: NDArray[Any], *, bad_bits: int) -> NDArray[np.float64]:
    """``[[[count, Σ variance]]]`` of a block's good pixels (float64; in row strips, so the
    temporaries stay small)."""
    n, total = 0, 0.0
    for r0 in range(0, var.shape[1], 256):
        v, m = var[:, r0 : r0 + 256], msk[:, r0 : r0 + 256]
        good = ((m & bad_bits) == 0) & np.isfinite(v)
        n += int(np.count_nonzero(good))
        total += float(np.where(good, v, np.float32(0)).sum(dtype=np.float64))
    return np.array([[[n, total]]], dtype=np.float64)


def _frame_weight(var: da.Array, msk: da.Array, *, bad_bits: int, exposure: str) -> da.Array:
    """The exposure's frame weight, lazily: good pixels / Σ their variance, ``(1, 1)``.

    One pass per block (``frame-weight-…``), summed in float64: the same for every tile
    and every chunking of the exposure.
    """
    msk = msk.rechunk(var.chunks)
    token = tokenize(var, msk, bad_bits)
    sums = da.map_blocks(
        _good_sums, var, msk, bad_bits=bad_bits, chunks=(1, 1, 2), dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64), name=f"frame-weight-{exposure}-{token}",
    )  # fmt: skip
    total = sums.sum(axis=(0, 1)).reshape(-1, 2).sum(axis=0)
    return (total[0] / total[1]).reshape(1, 1)


def _detector_window(
    grid: SkyGrid, wcs: WCS, det_shape: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """Grid pixels ``(row0, row1, col0, col1)`` a detector can reach (None: unknown).

    The bounding box of the detector's outer pixel edges (33 points a side) mapped onto
    the grid, widened by 2 pixels, clipped to the grid: every grid pixel outside it has
    its centre outside the detector.
    """
    ny, nx = det_shape
    t = np.linspace(0.0, 1.0, 33)
    x = np.concatenate([t * nx, np.full(33, nx), (1 - t) * nx, np.zeros(33)]) - 0.5
    y = np.concatenate([np.zeros(33), t * ny, np.full(33, ny), (1 - t) * ny]) - 0.5
    ra, dec = wcs.pixel_to_world_values(x, y)
    gx, gy = (np.asarray(c) for c in grid.wcs.world_to_pixel_values(ra, dec))
    if not (np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))):
        return None
    gny, gnx = grid.shape
    r0, r1 = max(int(np.floor(gy.min())) - 2, 0), min(int(np.ceil(gy.max())) + 3, gny)
    c0, c1 = max(int(np.floor(gx.min())) - 2, 0), min(int(np.ceil(gx.max())) + 3, gnx)
    return r0, max(r1, r0), c0, max(c1, c0)


def _tile_window(
    grid: SkyGrid, tile: str, reach: tuple[int, int, int, int]
) -> tuple[int, int, int, int]:
    """``reach`` (grid pixels) within ``tile``, in the tile's own pixel coordinates."""
    sy, sx = grid.tile_slices(tile)
    r0, r1 = max(reach[0], sy.start) - sy.start, min(reach[1], sy.stop) - sy.start
    c0, c1 = max(reach[2], sx.start) - sx.start, min(reach[3], sx.stop) - sx.start
    return r0, max(r1, r0), c0, max(c1, c0)


def _map_step(grid: SkyGrid, wcs: WCS, reach: tuple[int, int, int, int]) -> int:
    """The :class:`PixelMap` step for one detector: :func:`mapping_step` over its reach.

    Chosen once per detector (over the grid pixels it can reach plus the one-pixel
    border the Jacobian needs), so every tile uses the same nodes and the tiling does
    not change the result.
    """
    r0, r1, c0, c1 = reach
    if r1 - r0 < 1 or c1 - c0 < 1:
        return 1
    step, _ = mapping_step(grid.wcs, wcs, rows=(r0 - 1, r1 + 1), cols=(c0 - 1, c1 + 1))
    return step


def _exposure_id(cal: xr.Dataset) -> str:
    if "exposure" in cal.coords and cal.coords["exposure"].ndim == 0:
        return str(cal.coords["exposure"].values)
    for step in cal.attrs.get("steps", []):
        if "exposure" in step:
            return str(step["exposure"])
    return "exposure"


def detector_footprints(calibrated: xr.Dataset) -> list[Any]:
    """``(ra, dec)`` outlines of every detector (for :meth:`SkyGrid.covering`)."""
    det_shape = (int(calibrated.sizes["y"]), int(calibrated.sizes["x"]))
    return [
        footprint_of((_wcs_from_text(_header_text(calibrated, str(d), None)), det_shape))
        for d in calibrated.detector.values
    ]

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
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
from lazysky.pipeline.grid import SkyGrid, footprint_of, tiles_of

__all__ = [
    "RESAMPLED_DTYPE",
    "NoOverlapWarning",
    "ResampledPixels",
    "ResampledTile",
    "resample_exposure",
    "resample_pixels",
]

RESAMPLED_DTYPE = np.dtype([("image", np.float32), ("variance", np.float32), ("mask", MASK_DTYPE)])
HALO_PX = 2  # bilinear support (1 px) + 1: the cut box never clamps a non-edge coordinate
_NODATA = MASK_DTYPE.type(MaskBit.NODATA)
_STRIP_ROWS = 256  # output rows mapped at once: ~40 MB of temporaries for 2048-px tiles


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
    ny, nx = x_in.shape[0] - 2, x_in.shape[1] - 2
    dny, dnx = detector_shape if detector_shape is not None else image.shape
    oy, ox = origin
    # area ratio: input pixels per output pixel, central differences on the border grid
    dxdx = (x_in[1:-1, 2:] - x_in[1:-1, :-2]) / 2
    dxdy = (x_in[2:, 1:-1] - x_in[:-2, 1:-1]) / 2
    dydx = (y_in[1:-1, 2:] - y_in[1:-1, :-2]) / 2
    dydy = (y_in[2:, 1:-1] - y_in[:-2, 1:-1]) / 2
    jac = np.abs(dxdx * dydy - dxdy * dydx)
    x, y = x_in[1:-1, 1:-1], y_in[1:-1, 1:-1]
    inside = np.isfinite(x) & np.isfinite(y)
    inside &= (x >= -0.5) & (x <= dnx - 0.5) & (y >= -0.5) & (y <= dny - 0.5)
    xc = np.clip(np.where(inside, x, 0.0), 0, dnx - 1)
    yc = np.clip(np.where(inside, y, 0.0), 0, dny - 1)
    x0, y0 = np.floor(xc).astype(np.intp), np.floor(yc).astype(np.intp)
    fx, fy = xc - x0, yc - y0
    x1, y1 = np.minimum(x0 + 1, dnx - 1), np.minimum(y0 + 1, dny - 1)
    # indices into the box; pixels outside the detector read the box's first pixel, weight 0
    bny, bnx = image.shape
    x0, x1 = np.where(inside, x0 - ox, 0), np.where(inside, x1 - ox, 0)
    y0, y1 = np.where(inside, y0 - oy, 0), np.where(inside, y1 - oy, 0)
    if inside.any() and (min(x0.min(), y0.min()) < 0 or x1.max() >= bnx or y1.max() >= bny):
        msg = "resample_pixels: the input box does not hold every pixel the mapping needs"
        raise ParameterError(msg)
    flat_img, flat_var = image.ravel(), variance.ravel()
    flat_mask = mask.ravel()
    out_img = np.zeros((ny, nx), dtype=np.float64)
    out_var = np.zeros((ny, nx), dtype=np.float64)
    out_mask = np.zeros((ny, nx), dtype=MASK_DTYPE)
    for yi, xi, w in (
        (y0, x0, (1 - fx) * (1 - fy)),
        (y0, x1, fx * (1 - fy)),
        (y1, x0, (1 - fx) * fy),
        (y1, x1, fx * fy),
    ):
        w = np.where(inside, w, 0.0)
        idx = yi * bnx + xi
        out_img += w * flat_img.take(idx)
        out_var += w * flat_var.take(idx)
        out_mask |= np.where(w > 0, flat_mask.take(idx), 0).astype(MASK_DTYPE)
    out_img *= jac
    out_var *= jac * jac
    out_img[~inside] = 0.0
    out_var[~inside] = np.inf
    out_mask[~inside] |= _NODATA
    return ResampledPixels(
        out_img.astype(np.float32), out_var.astype(np.float32), out_mask.astype(MASK_DTYPE)
    )


def _resample_block(
    image: NDArray[Any],
    variance: NDArray[Any],
    mask: NDArray[Any],
    *,
    header: str,
    grid: SkyGrid,
    tile: str,
    origin: tuple[int, int],
    detector_shape: tuple[int, int],
) -> NDArray[Any]:
    """One (detector, tile) task: the mapping from fresh WCS objects, then the kernel."""
    ny, nx = grid.tile_shape(tile)
    out = np.empty((ny, nx), dtype=RESAMPLED_DTYPE)
    if image.size == 0:  # dask's meta inference
        return out
    sy, sx = grid.tile_slices(tile)
    wcs_in = _wcs_from_text(header)  # fresh objects per task (WCS is not thread-safe)
    wcs_out = grid.wcs
    gx = np.arange(sx.start - 1, sx.stop + 1, dtype=float)
    for r0 in range(0, ny, _STRIP_ROWS):  # strips bound the task's memory
        r1 = min(r0 + _STRIP_ROWS, ny)
        gy = np.arange(sy.start + r0 - 1, sy.start + r1 + 1, dtype=float)
        ra, dec = wcs_out.pixel_to_world_values(*np.meshgrid(gx, gy))
        x_in, y_in = wcs_in.world_to_pixel_values(ra, dec)
        px = resample_pixels(
            image, variance, mask, np.asarray(x_in), np.asarray(y_in),
            origin=origin, detector_shape=detector_shape,
        )  # fmt: skip
        strip = out[r0:r1]
        strip["image"], strip["variance"], strip["mask"] = px.image, px.variance, px.mask
    return out


def _wcs_from_text(header: str) -> WCS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FITSFixedWarning on the stored cards
        sep = "\n" if "\n" in header else ""  # the store's cards are unseparated
        return WCS(fits.Header.fromstring(header, sep=sep), naxis=2).celestial


@dataclass(frozen=True)
class ResampledTile:
    """One detector of one exposure resampled onto one tile of a grid (lazy).

    ``pixels`` is a dask array of the tile's shape and dtype :data:`RESAMPLED_DTYPE`
    (fields ``image``, ``variance``, ``mask``), one block; ``units`` those of ``image``
    per output pixel; ``frame_weight`` a lazy ``(1, 1)`` array, the inverse of the
    exposure's mean variance over its good input pixels (the same for every tile, so a
    stack does not depend on the tiling).
    """

    exposure: str
    detector: str
    tile: str
    pixels: da.Array
    units: str
    frame_weight: da.Array

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
    var, msk = arrays[1], arrays[2]
    good = ((msk & bad_bits) == 0) & da.isfinite(var)
    frame_weight = (good.sum() / da.where(good, var, 0).sum()).reshape(1, 1)
    out = []
    for i, det in enumerate(map(str, calibrated.detector.values)):
        header = _header_text(calibrated, det, wcs)
        w = _wcs_from_text(header)
        for tile in grid.tiles_overlapping((w, det_shape)):
            box = _box(grid, tile, w, det_shape) if tile in wanted else None
            if box is None:
                continue
            args = [a[i, box[0], box[1]].rechunk(-1) for a in arrays]
            origin = (box[0].start, box[1].start)
            token = tokenize(*args, header, grid, tile, origin)
            pixels = da.map_blocks(
                _resample_block, *args,
                header=header, grid=grid, tile=tile, origin=origin, detector_shape=det_shape,
                chunks=tuple((n,) for n in grid.tile_shape(tile)),
                dtype=RESAMPLED_DTYPE, meta=np.empty((0, 0), dtype=RESAMPLED_DTYPE),
                name=f"resample-{exposure}-{det}-{tile}-{token}",
            )  # fmt: skip
            out.append(ResampledTile(exposure, det, tile, pixels, units, frame_weight))
    if not out:
        msg = f"exposure {exposure!r} does not overlap the grid (or the tiles asked for)"
        warnings.warn(msg, NoOverlapWarning, stacklevel=2)
    return out


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

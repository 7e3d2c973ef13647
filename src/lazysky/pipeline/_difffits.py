"""FITS in and out of difference imaging: what ``lazysky diff`` calls.

:func:`difference_files` reads a science and a reference image (``lazysky coadd``
outputs — PRIMARY image with WCS, optional VARIANCE, MASK, COUNT HDUs — or any single
image with a celestial WCS, whose variance is then its sky noise²), puts both on the
reference's pixel grid (the science image is resampled onto it with
:func:`lazysky.pipeline.resample_exposure`), differences them with
:func:`lazysky.pipeline.difference.difference` and writes DIFF.fits: PRIMARY ``D``
(science units, with the reference's WCS), ``SCORR``, ``VARIANCE``, ``MASK``. It returns
the difference Dataset, so a caller can go on to detect sources on it.

The reference's pixel grid is used as is when its WCS is a :class:`SkyGrid`'s (TAN,
north up, square pixels, tangent point at the centre pixel: every ``lazysky coadd``
output); any other reference is resampled too, onto the SkyGrid that covers it at its
own pixel scale, and the output is on that grid (a HISTORY card says so).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from lazysky.errors import FitsFormatError, OutputError
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
from lazysky.pipeline.fitsio import check_output
from lazysky.pipeline.grid import SkyGrid

__all__ = ["difference_files", "write_difference_fits"]

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


def _read_image(path: PathLike, what: str) -> dict[str, Any]:
    """Image, variance, mask, count (or None), WCS, units of a single-image FITS file."""
    from lazysky.pipeline.fitsio import _open, _sky_variance

    p = Path(path)
    with _open(p, what) as hdul:
        named = {h.name: h for h in hdul if h.data is not None}
        image_hdu = next((h for h in hdul if h.data is not None and h.data.ndim == 2
                          and h.name not in ("VARIANCE", "WEIGHT", "MASK", "COUNT", "SCORR")),
                         None)  # fmt: skip
        if image_hdu is None:
            msg = f"{what} {p} has no 2-d image HDU"
            raise FitsFormatError(msg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(image_hdu.header, naxis=2)
        if not wcs.has_celestial:
            msg = f"{what} {p}, HDU {image_hdu.name or 'PRIMARY'}: no celestial WCS"
            raise FitsFormatError(msg)
        img = np.asarray(image_hdu.data, dtype=np.float32)
        out: dict[str, Any] = {"path": str(p), "wcs": wcs.celestial, "image": img,
                               "units": str(image_hdu.header.get("BUNIT", "")).strip()}  # fmt: skip
        if "VARIANCE" in named and named["VARIANCE"].data.shape == img.shape:
            out["variance"] = np.asarray(named["VARIANCE"].data, dtype=np.float32)
            out["estimated"] = False
        else:
            out["variance"] = np.full(img.shape, _sky_variance(img), dtype=np.float32)
            out["estimated"] = True
        if "MASK" in named and named["MASK"].data.shape == img.shape:
            out["mask"] = np.asarray(named["MASK"].data).astype(MASK_DTYPE)
        else:
            out["mask"] = np.zeros(img.shape, MASK_DTYPE)
        out["count"] = (np.asarray(named["COUNT"].data).astype(np.uint16)
                        if "COUNT" in named and named["COUNT"].data.shape == img.shape
                        else None)  # fmt: skip
    bad = ~np.isfinite(out["image"]) | ~np.isfinite(out["variance"]) | (out["variance"] <= 0)
    out["mask"][bad] |= MASK_DTYPE.type(MaskBit.NODATA)
    out["image"][bad], out["variance"][bad] = 0.0, np.inf
    return out


def _grid_of_wcs(wcs: WCS, shape: tuple[int, int], tile_px: int) -> SkyGrid | None:
    """The SkyGrid whose WCS is ``wcs`` on ``shape`` pixels, or None if there is none."""
    ny, nx = shape
    scale = 3600.0 * float(np.mean(proj_plane_pixel_scales(wcs)))
    try:
        grid = SkyGrid(float(wcs.wcs.crval[0]), float(wcs.wcs.crval[1]), scale, shape, tile_px)
    except ValueError:  # ParameterError is one: not a SkyGrid
        return None
    g = grid.wcs
    probe_x = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, (nx - 1) / 2])
    probe_y = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2])
    a = np.array(wcs.pixel_to_world_values(probe_x, probe_y))
    b = np.array(g.pixel_to_world_values(probe_x, probe_y))
    x, y = g.world_to_pixel_values(a[0], a[1])
    if not np.all(np.isfinite(b)) or np.max(np.hypot(x - probe_x, y - probe_y)) > 1e-3:
        return None
    return grid


def _as_calibrated(d: dict[str, Any], name: str, tile_px: int) -> xr.Dataset:
    chunks = (1, tile_px, tile_px)
    planes = {k: (("detector", "y", "x"), da.from_array(d[k][None], chunks=chunks))
              for k in ("image", "variance", "mask")}  # fmt: skip
    ds = xr.Dataset(planes, coords={
        "detector": ["IMAGE"],
        "header": ("detector", [d["wcs"].to_header(relax=True).tostring(sep="\n")]),
        "exposure": name,
    })  # fmt: skip
    ds.image.attrs["units"] = d["units"]
    return ds


def _on_grid(d: dict[str, Any], grid: SkyGrid, name: str) -> xr.Dataset:
    from lazysky.pipeline import resample_exposure, stack

    return stack(resample_exposure(_as_calibrated(d, name, grid.tile_px), grid), grid)


def _direct(d: dict[str, Any], grid: SkyGrid, name: str) -> xr.Dataset:
    planes = {k: (("y", "x"), da.from_array(d[k], chunks=grid.chunks))
              for k in ("image", "variance", "mask")}  # fmt: skip
    if d["count"] is not None:
        planes["count"] = (("y", "x"), da.from_array(d["count"], chunks=grid.chunks))
    return xr.Dataset(planes, attrs={"grid": grid.to_dict(), "units": d["units"],
                                     "inputs": [name]})  # fmt: skip


def write_difference_fits(diff: xr.Dataset, path: PathLike, *, overwrite: bool = False) -> Path:
    """Write a difference: PRIMARY ``image`` (D, grid WCS), SCORR, VARIANCE, MASK, and the
    PSFs per tile: PSF (``P_D``, the PSF of the difference), PSF_SCI and PSF_REF, each an
    ``(tile_y, tile_x, v, u)`` cube (NAXIS4 = tile rows) with the tile size in TILEPX.

    This computes the difference (it is an output).
    """
    from lazysky.pipeline.psf import grid_of

    target = Path(path)
    if target.exists() and not overwrite:
        msg = f"{target} exists: pass --overwrite (overwrite=True) to replace it"
        raise OutputError(msg)
    header = grid_of(diff).wcs.to_header()
    psfs = [k for k in ("psf", "psf_science", "psf_reference") if k in diff]
    done = diff[["image", "score", "variance", "mask", "flux_ratio", *psfs]].compute()
    primary = fits.PrimaryHDU(done.image.values, header=header)
    primary.header["BUNIT"] = (str(diff.attrs.get("units", "")), "science image units")
    primary.header["FLXRATIO"] = (float(done.flux_ratio), "F_ref / F_sci (ZOGY)")
    step = diff.attrs.get("steps", [{}])[-1]
    primary.header["DIFFMETH"] = (str(step.get("method", "")), "difference method")
    hdus: list[Any] = [primary]
    for name, key in (("SCORR", "score"), ("VARIANCE", "variance"), ("MASK", "mask")):
        hdus.append(fits.ImageHDU(done[key].values, header=header, name=name))
    tile_px = int(grid_of(diff).tile_px)
    for name, key in (("PSF", "psf"), ("PSF_SCI", "psf_science"), ("PSF_REF", "psf_reference")):
        if key in done:
            hdu = fits.ImageHDU(done[key].values.astype(np.float32), name=name)
            hdu.header["TILEPX"] = (tile_px, "grid tile side (px); axes 3-4 = tile x, y")
            hdus.append(hdu)
    try:
        fits.HDUList(hdus).writeto(target, overwrite=overwrite)
    except OSError as exc:
        msg = f"cannot write the difference to {target}: {exc}"
        raise OutputError(msg) from exc
    return target


def difference_files(
    science: PathLike,
    reference: PathLike,
    out: PathLike | None = None,
    *,
    overwrite: bool = False,
    tile_px: int = 2048,
    **options: Any,
) -> xr.Dataset:
    """Difference two FITS images on the reference's grid; write DIFF.fits if ``out``.

    Parameters
    ----------
    science, reference
        Background-subtracted images with a celestial WCS (``lazysky coadd`` outputs, or
        single images: variance = sky noise², no mask).
    out
        Output FITS path (PRIMARY D, SCORR, VARIANCE, MASK); refused if it exists unless
        ``overwrite``.
    tile_px
        Tile size of the grid (dask blocks).
    **options
        Passed to :func:`lazysky.pipeline.difference.difference`.

    Returns
    -------
    xarray.Dataset
        The difference (computed when ``out`` was written, else lazy).

    Examples
    --------
    >>> diff = difference_files("sci.fits", "ref.fits", "diff.fits")  # doctest: +SKIP
    """
    from lazysky.pipeline.difference import difference

    target = check_output(out, overwrite=overwrite) if out is not None else None
    ref = _read_image(reference, "reference")
    sci = _read_image(science, "science")
    if ref["units"] and sci["units"] and ref["units"] != sci["units"]:
        msg = (f"science {science} is in {sci['units']!r} but reference {reference} in "
               f"{ref['units']!r}: calibrate them to one unit")  # fmt: skip
        raise FitsFormatError(msg)
    shape = ref["image"].shape
    grid = _grid_of_wcs(ref["wcs"], shape, tile_px)
    history = []
    if grid is not None:
        ref_ds = _direct(ref, grid, Path(reference).name)
    else:
        from lazysky.pipeline import SkyGrid

        scale = 3600.0 * float(np.mean(proj_plane_pixel_scales(ref["wcs"])))
        grid = SkyGrid.covering([(ref["wcs"], shape)], pixel_scale_arcsec=scale,
                                tile_px=tile_px)  # fmt: skip
        ref_ds = _on_grid(ref, grid, Path(reference).name)
        history.append("reference resampled onto a north-up TAN grid (not a SkyGrid WCS)")
    sci_ds = _on_grid(sci, grid, Path(science).name)
    diff = difference(sci_ds, ref_ds, **options)
    if target is None:
        return diff
    diff = diff.compute()
    from lazysky.pipeline.fitsio import _atomic

    with _atomic(target) as tmp:
        write_difference_fits(diff, tmp, overwrite=True)
        with fits.open(tmp, mode="update") as hdul:
            h = hdul[0].header
            h.add_history(f"lazysky diff science: {Path(science).name}")
            h.add_history(f"lazysky diff reference: {Path(reference).name}")
            for line in history:
                h.add_history(line)
            for name, d in (("science", sci), ("reference", ref)):
                if d["estimated"]:
                    h.add_comment(f"variance of the {name} estimated from its sky noise")
    logger.info("difference %s - %s -> %s", science, reference, target)
    return diff

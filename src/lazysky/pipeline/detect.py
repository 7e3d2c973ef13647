"""Source detection and measurement on grid products, lazily, one task per tile.

The kernels are in :mod:`lazysky.pipeline._sep` (SEP on one in-memory image); this module
lifts them onto a grid Dataset (a coadd from :func:`~lazysky.pipeline.stack`, a
difference image): one ``detect-<tile>-<token>`` task per tile reads the tile plus a halo
and keeps the sources whose centroid's pixel lies in the tile. Every source is thus
reported once, by the tile that owns its centroid, and with a halo wider than every
footprint and aperture the tiled catalogue equals the whole-image one.

Halo rule: ``halo_px = max(ceil(r_aper) + 2, ceil(4 · FWHM), 16)`` pixels, with the PSF
FWHM in pixels from ``psf_fwhm_px=`` or the Dataset's ``attrs["psf_fwhm_px"]``; without
either, 32 px. 4 FWHM covers the 6 a ellipse over which the Kron radius is measured
(a ≈ σ = FWHM / 2.355 for a star, 6 a ≈ 2.55 FWHM) and a star's footprint to ~1e-4 of
its peak. Sources whose footprint or apertures still reach the window's edge (large
galaxies, saturated stars) are flagged ``HALO`` (512): pass a larger ``halo_px`` there.

Results are :class:`Sources`: per-tile dask ``Delayed`` astropy Tables (nothing computed),
``to_table()`` computes and concatenates them, ``tables()`` yields ``(tile, table)`` for
:func:`lazysky.catalog.write_sources`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr
from astropy.coordinates import SkyCoord
from astropy.table import Table, vstack
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from numpy.typing import NDArray

from lazysky._dask import window_delayed
from lazysky.errors import FitsFormatError, OutputError, ParameterError
from lazysky.pipeline._sep import (
    DEFAULT_KERNEL,
    FLAGS,
    SepSettings,
    configure_sep,
    detect_pixels,
    detect_score_pixels,
    forced_pixels,
    sep_settings_for,
)
from lazysky.pipeline.fitsio import check_output
from lazysky.pipeline.grid import SkyGrid, parse_tile, tiles_of
from lazysky.pipeline.stack import DEFAULT_BAD_BITS

__all__ = [
    "FLAGS",
    "SepSettings",
    "Sources",
    "check_catalog_path",
    "configure_sep",
    "detect",
    "detect_difference",
    "detect_file",
    "detect_pixels",
    "detect_score_pixels",
    "forced_photometry",
    "forced_pixels",
    "halo_for",
    "sep_settings_for",
    "write_catalog",
]

DEFAULT_HALO_PX = 32
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sources:
    """Per-tile catalogues, lazy: ``tiles`` maps a tile id to a Delayed astropy Table.

    ``kind`` is ``"coadd"``, ``"diff"`` (the ``lazysky.catalog`` source tables) or
    ``"forced"``; ``halo_px`` the halo each tile task read.
    """

    tiles: Mapping[str, Delayed]
    kind: str
    halo_px: int

    def to_table(self, **compute_kwargs: Any) -> Table:
        """Compute every tile and concatenate (forced photometry: in input order)."""
        names = list(self.tiles)
        done = dask.compute(*[self.tiles[t] for t in names], **compute_kwargs)
        parts = [t for t in done if len(t)] or list(done[:1])
        if not parts:
            return Table()
        out = vstack(parts, metadata_conflicts="silent") if len(parts) > 1 else parts[0]
        if self.kind == "forced":
            out = out[np.argsort(out["index"], kind="stable")]
        return out

    def tables(self, **compute_kwargs: Any) -> Iterator[tuple[str, Table]]:
        """``(tile_id, table)`` one tile at a time (e.g. for ``write_sources``)."""
        for tile, d in self.tiles.items():
            yield tile, d.compute(**compute_kwargs)


def _grid_of(ds: xr.Dataset, variables: Sequence[str]) -> SkyGrid:
    if not isinstance(ds, xr.Dataset):
        msg = f"expected an xarray.Dataset on a SkyGrid, got {type(ds).__name__}"
        raise ParameterError(msg)
    if "grid" not in ds.attrs:
        msg = ("the Dataset has no 'grid' attribute: pass a grid product (lazysky.pipeline."
               "stack, a difference image), or use detect_pixels on plain arrays")  # fmt: skip
        raise ParameterError(msg)
    g = dict(ds.attrs["grid"])
    grid = SkyGrid(**{**g, "shape": tuple(g["shape"])})
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        msg = f"the Dataset lacks variables {missing} (has {sorted(map(str, ds.data_vars))})"
        raise ParameterError(msg)
    for v in variables:
        if ds[v].dims != ("y", "x") or tuple(ds[v].shape) != grid.shape:
            msg = (f"variable {v!r} has dims {ds[v].dims} shape {ds[v].shape}; expected "
                   f"('y', 'x') {grid.shape} (the grid's)")  # fmt: skip
            raise ParameterError(msg)
    return grid


def halo_for(*, aperture_radius_px: float, psf_fwhm_px: float | None) -> int:
    """The halo in pixels (module docstring): from the PSF FWHM and the aperture.

    Examples
    --------
    >>> halo_for(aperture_radius_px=4.0, psf_fwhm_px=2.6), halo_for(aperture_radius_px=4.0,
    ...                                                             psf_fwhm_px=None)
    (16, 32)
    """
    if psf_fwhm_px is None:
        return max(DEFAULT_HALO_PX, math.ceil(aperture_radius_px) + 2)
    return max(math.ceil(aperture_radius_px) + 2, math.ceil(4.0 * psf_fwhm_px), 16)


def _radius_px(grid: SkyGrid, radius_arcsec: float | None, radius_px: float | None,
               default_arcsec: float) -> float:  # fmt: skip
    if radius_arcsec is not None and radius_px is not None:
        msg = "give the aperture radius in arcsec or in pixels, not both"
        raise ParameterError(msg)
    if radius_px is not None:
        r = float(radius_px)
    else:
        r = float(default_arcsec if radius_arcsec is None else radius_arcsec)
        r /= grid.pixel_scale_arcsec
    if not (math.isfinite(r) and r > 0):
        msg = f"the aperture radius must be > 0, got {r} px"
        raise ParameterError(msg)
    return r


def _halo(ds: xr.Dataset, halo_px: int | None, radius: float, fwhm: float | None) -> int:
    if halo_px is not None:
        if int(halo_px) < 0:
            msg = f"halo_px must be >= 0, got {halo_px}"
            raise ParameterError(msg)
        return int(halo_px)
    if fwhm is None and "psf_fwhm_px" in ds.attrs:
        fwhm = float(ds.attrs["psf_fwhm_px"])
    return halo_for(aperture_radius_px=radius, psf_fwhm_px=fwhm)


def _window(grid: SkyGrid, tile: str, halo: int) -> tuple[slice, slice, dict[str, Any]]:
    """The tile + halo slices (clipped to the grid) and the kernel's tiling keywords."""
    sy, sx = grid.tile_slices(tile)
    ny, nx = grid.shape
    wy, wx = grid.tile_window(tile, halo)
    core = (sy.start - wy.start, sy.stop - wy.start, sx.start - wx.start, sx.stop - wx.start)
    edges = (wy.start > 0, wy.stop < ny, wx.start > 0, wx.stop < nx)
    return wy, wx, {"offset": (wy.start, wx.start), "core": core, "open_edges": edges,
                    "tile_id": tile}  # fmt: skip


def _run_detect(image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any],
                grid: SkyGrid, options: dict[str, Any]) -> Table:  # fmt: skip
    return detect_pixels(image, variance, mask, wcs=grid.wcs, **options)


def _run_score(d: NDArray[Any], v: NDArray[Any], s: NDArray[Any], m: NDArray[Any],
               grid: SkyGrid, options: dict[str, Any], psf: Any = None) -> Table:  # fmt: skip
    if psf is not None:
        options = {**options, "psf": np.asarray(psf, dtype=np.float64)}
    return detect_score_pixels(d, v, s, m, wcs=grid.wcs, **options)


def _mask_or_zeros(ds: xr.Dataset, wy: slice, wx: slice) -> Any:
    if "mask" in ds.data_vars:
        return ds["mask"].data[wy, wx]
    return np.zeros((wy.stop - wy.start, wx.stop - wx.start), np.uint16)


def detect(
    ds: xr.Dataset,
    *,
    threshold: float = 5.0,
    min_area: int = 5,
    aperture_radius_arcsec: float | None = None,
    aperture_radius_px: float | None = None,
    filter_kernel: NDArray[Any] | None = DEFAULT_KERNEL,
    filter_type: str = "conv",
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.005,
    clean: bool = True,
    bad_bits: int = DEFAULT_BAD_BITS,
    halo_px: int | None = None,
    psf_fwhm_px: float | None = None,
    tiles: Sequence[str] | None = None,
) -> Sources:
    """Detect and measure sources on a grid product, lazily, one task per tile.

    Parameters
    ----------
    ds
        A grid Dataset (``image``, ``variance``, optional ``mask`` on ``(y, x)``,
        ``attrs["grid"]``), background-subtracted (coadds are).
    threshold, min_area, filter_kernel, filter_type, deblend_nthresh, deblend_cont, clean, bad_bits
        As in :func:`~lazysky.pipeline._sep.detect_pixels` (``threshold``: S/N of the
        filtered image; Source Extractor's DETECT_THRESH ``= threshold · 0.375`` for the
        default 3 × 3 kernel).
    aperture_radius_arcsec, aperture_radius_px
        Radius of ``flux_aper`` (one of them; default 2 arcsec).
    halo_px, psf_fwhm_px
        The halo (module docstring); by default from the PSF FWHM.
    tiles
        Tile ids to process (default all).

    Returns
    -------
    Sources
        Delayed per-tile tables with the columns of ``coadd_sources``.

    Examples
    --------
    >>> cat = detect(coadd, threshold=5.0).to_table()  # doctest: +SKIP
    """
    grid = _grid_of(ds, ["image", "variance"])
    radius = _radius_px(grid, aperture_radius_arcsec, aperture_radius_px, 2.0)
    halo = _halo(ds, halo_px, radius, psf_fwhm_px)
    options: dict[str, Any] = {"threshold": float(threshold), "min_area": int(min_area),
               "filter_kernel": filter_kernel, "filter_type": filter_type,
               "deblend_nthresh": int(deblend_nthresh),
               "deblend_cont": float(deblend_cont), "clean": bool(clean),
               "aperture_radius_px": radius, "bad_bits": int(bad_bits)}  # fmt: skip
    # validate eagerly on a tiny array (errors now, not inside a task)
    detect_pixels(np.zeros((1, 1)), np.ones((1, 1)), **options)
    out: dict[str, Delayed] = {}
    for tile in tiles_of(grid, tiles):
        wy, wx, kw = _window(grid, tile, halo)
        arrays = [window_delayed(a) for a in (ds["image"].data[wy, wx],
                  ds["variance"].data[wy, wx], _mask_or_zeros(ds, wy, wx))]  # fmt: skip
        opts = {**options, **kw}
        token = tokenize(*arrays, grid, opts)
        out[tile] = delayed(_run_detect, pure=True)(
            *arrays, grid, opts, dask_key_name=f"detect-{tile}-{token}"
        )
    return Sources(out, "coadd", halo)


def detect_difference(
    diff: xr.Dataset,
    *,
    threshold: float = 5.0,
    min_area: int = 3,
    aperture_radius_arcsec: float | None = None,
    aperture_radius_px: float | None = None,
    psf: NDArray[Any] | xr.DataArray | None = None,
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.005,
    bad_bits: int = DEFAULT_BAD_BITS,
    halo_px: int | None = None,
    psf_fwhm_px: float | None = None,
    tiles: Sequence[str] | None = None,
) -> Sources:
    """Detect positive and negative sources of a difference image, lazily, per tile.

    Detection runs on ``score`` (S_corr: the matched-filtered difference over its σ) at
    ``threshold`` σ for both signs; measurement on ``image`` (D) with its ``variance``:
    aperture flux and, when a PSF stamp is given (``psf=`` or ``attrs["psf"]``), the PSF
    flux (else NaN). ``snr`` is the signed peak score.

    Parameters
    ----------
    diff
        Grid Dataset with ``image`` (D), ``variance`` (of D), ``score``, optional ``mask``.
    psf
        PSF for ``flux_psf``: one stamp (odd sides; normalised here), or per-tile stamps as
        a DataArray ``(tile_y, tile_x, v, u)`` (e.g. the difference step's PSF of D).
    (others)
        As in :func:`detect`.

    Returns
    -------
    Sources
        Delayed per-tile tables with the columns of ``diff_sources`` (``sign`` ±1).

    Examples
    --------
    >>> cat = detect_difference(diff).to_table()  # doctest: +SKIP
    >>> cat[cat["sign"] < 0]  # fading sources  # doctest: +SKIP
    """
    grid = _grid_of(diff, ["image", "variance", "score"])
    radius = _radius_px(grid, aperture_radius_arcsec, aperture_radius_px, 2.0)
    if psf is None and "psf" in diff.attrs:
        psf = np.asarray(diff.attrs["psf"], dtype=float)
    per_tile = None
    if isinstance(psf, xr.DataArray):
        if psf.ndim != 4 or tuple(psf.shape[:2]) != grid.n_tiles:
            msg = (f"a per-tile psf must be (tile_y, tile_x, v, u) with {grid.n_tiles} tiles, "
                   f"got dims {psf.dims} shape {psf.shape}")  # fmt: skip
            raise ParameterError(msg)
        per_tile = psf
        psf = np.zeros(psf.shape[2:])
        psf[psf.shape[0] // 2, psf.shape[1] // 2] = 1.0  # stands in for validation
    if psf_fwhm_px is None and psf is None and "psf_fwhm_px" not in diff.attrs:
        halo = _halo(diff, halo_px, radius, None)
    else:
        stamp = 0 if psf is None else max(np.shape(psf)) // 2 + 1
        halo = max(_halo(diff, halo_px, radius, psf_fwhm_px), stamp if halo_px is None else 0)
    options: dict[str, Any] = {"threshold": float(threshold), "min_area": int(min_area),
               "deblend_nthresh": int(deblend_nthresh), "deblend_cont": float(deblend_cont),
               "aperture_radius_px": radius, "bad_bits": int(bad_bits), "psf": psf}  # fmt: skip
    z = np.zeros((1, 1))
    detect_score_pixels(z, z + 1, z, **options)  # validate now
    if per_tile is not None:
        options["psf"] = None
    out: dict[str, Delayed] = {}
    for tile in tiles_of(grid, tiles):
        wy, wx, kw = _window(grid, tile, halo)
        arrays = [window_delayed(a) for a in (diff["image"].data[wy, wx],
                  diff["variance"].data[wy, wx], diff["score"].data[wy, wx],
                  _mask_or_zeros(diff, wy, wx))]  # fmt: skip
        opts = {**options, **kw}
        stamp = None
        if per_tile is not None:
            iy, ix = parse_tile(tile)
            stamp = window_delayed(per_tile.data[iy, ix])
        token = tokenize(*arrays, grid, opts, stamp)
        out[tile] = delayed(_run_score, pure=True)(
            *arrays, grid, opts, stamp, dask_key_name=f"detect-{tile}-{token}"
        )
    return Sources(out, "diff", halo)


def _forced_tile(image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any],
                 index: NDArray[Any], x: NDArray[Any], y: NDArray[Any],
                 offset: tuple[int, int], radius: float, bad_bits: int,
                 tile: str) -> Table:  # fmt: skip
    f, e, fl = forced_pixels(image, variance, mask, x - offset[1], y - offset[0],
                             radius_px=radius, bad_bits=bad_bits)  # fmt: skip
    return _forced_table(index, x, y, f, e, fl, tile)


def _forced_table(index: NDArray[Any], x: NDArray[Any], y: NDArray[Any], f: NDArray[Any],
                  e: NDArray[Any], fl: NDArray[Any], tile: str) -> Table:  # fmt: skip
    return Table({"index": np.asarray(index, dtype=np.int64), "x": x, "y": y, "flux": f,
                  "fluxerr": e, "flags": np.asarray(fl, dtype=np.int32),
                  "tile_id": np.full(len(index), tile, dtype=object).astype(str)})  # fmt: skip


def forced_photometry(
    ds: xr.Dataset,
    ra: Any,
    dec: Any = None,
    *,
    radius_arcsec: float = 2.0,
    bad_bits: int = DEFAULT_BAD_BITS,
) -> Sources:
    """Circular-aperture photometry at given sky positions (light curves), lazily.

    Parameters
    ----------
    ds
        A grid Dataset (``image``, ``variance``, optional ``mask``, ``attrs["grid"]``).
    ra, dec
        Degrees (scalars or arrays), or a ``SkyCoord`` as ``ra`` with ``dec`` None.
    radius_arcsec
        Aperture radius.

    Returns
    -------
    Sources
        ``kind="forced"``: per tile ``index`` (position in the input), ``x``, ``y``,
        ``flux``, ``fluxerr``, ``flags`` (OFF_IMAGE 1024, MASKED 2048 with NaN flux),
        ``tile_id`` (``""`` off the grid); ``to_table()`` is in input order, plus ``ra``
        and ``dec`` columns there.

    Examples
    --------
    >>> lc = forced_photometry(coadd, [150.01], [2.02], radius_arcsec=1.5)  # doctest: +SKIP
    >>> lc.to_table()["flux"]  # doctest: +SKIP
    """
    grid = _grid_of(ds, ["image", "variance"])
    if isinstance(ra, SkyCoord):
        if dec is not None:
            msg = "pass a SkyCoord alone (dec=None) or ra and dec in degrees"
            raise ParameterError(msg)
        icrs = ra.icrs
        ra_deg, dec_deg = np.atleast_1d(icrs.ra.deg), np.atleast_1d(icrs.dec.deg)
    else:
        if dec is None:
            msg = "dec is required when ra is not a SkyCoord"
            raise ParameterError(msg)
        ra_deg = np.atleast_1d(np.asarray(ra, dtype=float))
        dec_deg = np.atleast_1d(np.asarray(dec, dtype=float))
    if ra_deg.shape != dec_deg.shape or ra_deg.ndim != 1:
        msg = f"ra and dec must be 1-d of one length, got shapes {ra_deg.shape}, {dec_deg.shape}"
        raise ParameterError(msg)
    bad = ~(np.isfinite(ra_deg) & np.isfinite(dec_deg)) | (np.abs(dec_deg) > 90)
    if np.any(bad):
        msg = f"positions {np.flatnonzero(bad)[:5].tolist()} are not valid (ra, dec) degrees"
        raise ParameterError(msg)
    radius = _radius_px(grid, radius_arcsec, None, 2.0)
    halo = math.ceil(radius) + 1
    x, y = grid.wcs.world_to_pixel_values(ra_deg, dec_deg)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ny, nx = grid.shape
    px, py = np.floor(x + 0.5), np.floor(y + 0.5)
    on = np.isfinite(px) & np.isfinite(py) & (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    t = grid.tile_px
    tile_of = np.where(on, np.nan_to_num(py) // t * 10**6 + np.nan_to_num(px) // t, -1)
    out: dict[str, Delayed] = {}
    for key in np.unique(tile_of[on]):
        tile = grid.tile_id(int(key // 10**6), int(key % 10**6))
        idx = np.flatnonzero(tile_of == key)
        wy, wx, kw = _window(grid, tile, halo)
        arrays = [window_delayed(a) for a in (ds["image"].data[wy, wx],
                  ds["variance"].data[wy, wx], _mask_or_zeros(ds, wy, wx))]  # fmt: skip
        args = (idx, x[idx], y[idx], kw["offset"], radius, int(bad_bits), tile)
        token = tokenize(*arrays, *args)
        out[tile] = delayed(_forced_tile, pure=True)(
            *arrays, *args, dask_key_name=f"forced-{tile}-{token}"
        )
    off = np.flatnonzero(~on)
    if len(off) or not out:
        n = len(off)
        tab = _forced_table(off, x[off], y[off], np.full(n, np.nan), np.full(n, np.nan),
                            np.full(n, FLAGS["OFF_IMAGE"]), "")  # fmt: skip
        out["off-grid"] = delayed(tab)
    sources = Sources(out, "forced", halo)
    return _ForcedSources(sources.tiles, "forced", halo, ra_deg, dec_deg)


@dataclass(frozen=True)
class _ForcedSources(Sources):
    ra_deg: NDArray[np.float64] | None = None
    dec_deg: NDArray[np.float64] | None = None

    def to_table(self, **compute_kwargs: Any) -> Table:
        out = super().to_table(**compute_kwargs)
        if self.ra_deg is not None and self.dec_deg is not None:
            out.add_column(self.ra_deg[np.asarray(out["index"])], name="ra", index=1)
            out.add_column(self.dec_deg[np.asarray(out["index"])], name="dec", index=2)
        return out


# --- files (what ``lazysky detect`` calls) -----------------------------------------------
FORMATS = {".fits": "fits", ".csv": "ascii.csv", ".parquet": "parquet", ".ecsv": "ascii.ecsv"}
BACKGROUNDS = ("auto", "subtract", "keep")


def _images_of(path: Path) -> list[dict[str, Any]]:
    """The images of a FITS file, each with its variance (or None), mask and WCS.

    A lazysky coadd (PRIMARY + VARIANCE + MASK HDUs) is read directly; anything else
    (calibrated MEFs with ``<DET>_VAR``/``<DET>_MASK``, plain images) through
    :func:`~lazysky.pipeline.fitsio.read_calibrated`.
    """
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    from lazysky.pipeline.fitsio import _open, read_calibrated

    with _open(path, "input") as hdul:
        names = [h.name for h in hdul]
        if "VARIANCE" in names and hdul[0].data is not None and hdul[0].data.ndim == 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs = WCS(hdul[0].header, naxis=2)
            if not wcs.has_celestial:
                msg = f"input {path}, HDU PRIMARY: no celestial WCS (ra/dec need one)"
                raise FitsFormatError(msg)
            return [{
                "name": "PRIMARY", "image": np.asarray(hdul[0].data, dtype=np.float32),
                "variance": np.asarray(hdul["VARIANCE"].data, dtype=np.float32),
                "mask": (np.asarray(hdul["MASK"].data).astype(np.uint16)
                         if "MASK" in names else None),
                "wcs": wcs.celestial,
                # a lazysky coadd (write_coadd_fits writes COMBINET) stacks sky-subtracted
                # frames (unless made with --no-subtract-background: pass "subtract")
                "subtracted": "COMBINET" in hdul[0].header,
                "header": fits.Header(hdul[0].header),
            }]  # fmt: skip
        history = "\n".join(str(v) for v in hdul[0].header.get("HISTORY", []))
    out = []
    for ds in (d.compute() for d in read_calibrated(path)):  # one read per detector
        estimated = bool(ds.attrs["variance_estimated"])
        for k, det in enumerate(ds.detector.values):
            header = fits.Header.fromstring(str(ds.header.values[k]), sep="\n")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs = WCS(header, naxis=2)
            out.append({
                "name": str(det), "image": np.asarray(ds.image.values[k], dtype=np.float32),
                "variance": None if estimated else np.asarray(ds.variance.values[k]),
                "mask": np.asarray(ds["mask"].values[k]), "wcs": wcs.celestial,
                "subtracted": "background" in history.lower(), "header": header,
            })  # fmt: skip
    return out


def _pixel_scale_arcsec(wcs: Any) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(3600.0 * np.mean(proj_plane_pixel_scales(wcs)))


def detect_file(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    threshold: float = 5.0,
    min_area: int = 5,
    aperture_radius_arcsec: float = 2.0,
    background: str = "auto",
    overwrite: bool = False,
) -> Table:
    """Detect the sources of a calibrated FITS image and write the catalogue.

    Parameters
    ----------
    path
        A lazysky coadd (``VARIANCE``/``MASK`` HDUs), a calibrated MEF (``<DET>_VAR``,
        ``<DET>_MASK``) or any image with a celestial WCS (variance from a SEP background
        rms when there is no variance plane).
    out
        ``.fits``, ``.csv``, ``.parquet`` or ``.ecsv``; refused if it exists unless
        ``overwrite``.
    threshold, min_area
        Matched-filter S/N threshold and minimum area (:func:`detect_pixels`).
    aperture_radius_arcsec
        Radius of ``flux_aper``.
    background
        ``"auto"`` subtracts a SEP background (64 px mesh) unless the file says its sky is
        already subtracted (a lazysky coadd, a calibration with the background step);
        ``"subtract"`` always, ``"keep"`` never.

    Returns
    -------
    astropy.table.Table
        What was written: the columns of ``coadd_sources`` with ``tile_id`` the HDU name.

    Examples
    --------
    >>> detect_file("coadd.fits", "coadd.cat.parquet", threshold=5.0)  # doctest: +SKIP
    """
    src, target = Path(path), Path(out)
    check_catalog_path(target, overwrite=overwrite)
    if background not in BACKGROUNDS:
        msg = f"background must be one of {list(BACKGROUNDS)}, got {background!r}"
        raise ParameterError(msg)
    if not (math.isfinite(aperture_radius_arcsec) and aperture_radius_arcsec > 0):
        msg = f"the aperture radius must be > 0 arcsec, got {aperture_radius_arcsec}"
        raise ParameterError(msg)
    parts = []
    for im in _images_of(src):
        configure_sep(**dict(zip(("pixstack", "sub_object_limit"),
                                 sep_settings_for(im["image"].shape), strict=True)))  # fmt: skip
        subtract = background == "subtract" or (background == "auto" and not im["subtracted"])
        cat = detect_pixels(
            im["image"], im["variance"], im["mask"], wcs=im["wcs"], threshold=threshold,
            min_area=min_area, subtract_background=subtract, tile_id=im["name"],
            aperture_radius_px=aperture_radius_arcsec / _pixel_scale_arcsec(im["wcs"]),
        )  # fmt: skip
        parts.append(cat)
        logger.info("%s[%s]: %d sources", src, im["name"], len(cat))
    table = vstack(parts, metadata_conflicts="silent") if len(parts) > 1 else parts[0]
    table.meta = {"SRCFILE": src.name, "THRESH": float(threshold),
                  "APERTURE": float(aperture_radius_arcsec)}  # FITS-safe keys
    write_catalog(table, target, overwrite=overwrite)
    return table


def check_catalog_path(target: Path, *, overwrite: bool) -> str:
    """The astropy format of a catalogue path; errors before any work is done."""
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None:
        msg = (f"cannot write {target}: unknown catalogue format {target.suffix!r}; use one "
               f"of {sorted(FORMATS)}")  # fmt: skip
        raise OutputError(msg)
    check_output(target, overwrite=overwrite)
    return fmt


def write_catalog(table: Table, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a catalogue as FITS, CSV, Parquet or ECSV (by extension), atomically."""
    target = Path(out)
    fmt = check_catalog_path(target, overwrite=overwrite)
    if fmt == "ascii.ecsv":
        table.meta["flags"] = dict(FLAGS)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        table.write(tmp, format=fmt, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ImportError) as exc:
        tmp.unlink(missing_ok=True)
        msg = f"cannot write the catalogue to {target}: {exc}"
        raise OutputError(msg) from exc
    return target

"""Difference imaging: science − reference on one :class:`SkyGrid`, by ZOGY, tile by tile.

:func:`~lazysky.pipeline._zogy.zogy_pixels` is the numpy kernel (the equations are in
its module docstring); :func:`difference` lifts it: one ``difference-<tile>-<token>`` task
per tile, each fed the tile plus a halo cut from both inputs, the tile's PSFs (from
:func:`lazysky.pipeline.psf.psf_per_tile`, one ``psf-<tile>`` task per tile and image)
and three global numbers computed once per pair: the flux ratio, the background
variances and (optionally) the astrometric noise.

* **Flux ratio** ``F_r / F_n`` (:func:`fit_flux_ratio`): the stars each PSF fit used are
  matched between the two images (within ``match_px``); the ratio is the median of their
  flux ratios, over the pairs with S/N ≥ 20 in both (one ``fluxratio-<token>`` task).
  It is global, not per tile: a coadd has one zero point, and a tile's handful of stars
  would only add noise. Give ``flux_ratio=`` to fix it.
* **Background variances** ``σ_n², σ_r²``: the mean of each variance plane over its
  valid pixels (a reduction over the whole grid, so every tile uses the same filter).
* **Noise correlation** (``noise="measured"``, the default): each image's 3×3 noise
  correlation stamp ``c`` (:func:`~lazysky.pipeline._zogy.correlation_sums`), measured
  on source-free pixels of the whole grid (one ``noisecorr-<tile>`` task per tile and a
  sum). A resampled coadd's neighbouring pixels share noise: its per-pixel variance is
  about half its variance plane. ZOGY then whitens the actual noise and D's predicted
  variance is right per pixel (the kernel docstring has the equations); ``"white"``
  assumes uncorrelated noise (the paper's filter).
* **Astrometric noise** ``(σ_x, σ_y)``: a parameter in pixels, or ``"auto"``: the robust
  scatter (1.4826 MAD) of the position offsets of the matched stars with S/N ≥ 50 in
  both images (0 with fewer than 5 such stars).

**Normalisation.** ``image`` is ``D / F_D``: a source of flux ``α`` (science image units)
present in the science image and not in the reference appears as ``α P_D``, ``P_D`` of
sum 1 — summing or PSF-fitting ``image`` measures fluxes in the science image's units;
``variance`` is its predicted per-pixel variance (from both variance planes, so with the
sources' Poisson noise). ``score`` is ZOGY's ``S_corr``: unit variance on empty sky, with
the source noise and astrometric noise in its denominator; a point source is a peak of
``|score|`` (positive: brighter in the science image).

**Mask.** The OR of the inputs' masks; NODATA where either has no data; EDGE within half a
stamp of NODATA, and (when the inputs carry a coadd's ``count``) within a quarter stamp of
a bright pixel where fewer frames contributed than around it — a saturated or clipped
core, where the coadd's PSF is that of a subset of its frames
(:func:`~lazysky.pipeline._zogy.partial_coverage`).

**Halo.** ZOGY's kernels reach about one stamp width (the PSFs' support, and the ratio of
their transforms), and the score's matched filter and the variance propagation reach
another; the halo defaults to ``2 × psf_size_px`` pixels, cut from the neighbouring tiles
(``boundary="none"``: nothing beyond the grid's edge, which the kernel pads with zeros),
so a tiled difference equals the whole-image one to float precision (tested).

Examples
--------
>>> diff = difference(science_coadd, reference_coadd)  # doctest: +SKIP
>>> diff.score  # lazy; S_corr, unit variance  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from numpy.typing import NDArray

from lazysky.errors import LazySkyWarning, ParameterError
from lazysky.pipeline._alard import alard_lupton_pixels, broader
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit
from lazysky.pipeline._zogy import (
    DIFF_DTYPE,
    ZogyResult,
    correlation_from_sums,
    correlation_sums,
    difference_psf,
    partial_coverage,
    zogy_pixels,
)
from lazysky.pipeline.psf import (
    DEFAULT_BAD_BITS,
    MAX_STARS,
    STAR_FIELDS,
    _check_grid_dataset,
    psf_per_tile,
)

__all__ = [
    "DIFF_DTYPE",
    "METHODS",
    "FluxRatioWarning",
    "ZogyResult",
    "difference",
    "difference_files",
    "fit_flux_ratio",
    "noise_correlation",
    "write_difference_fits",
    "zogy_pixels",
]

logger = logging.getLogger(__name__)

METHODS = ("zogy", "alard-lupton")
NOISE_MODELS = ("measured", "white")
_CORR_LAG = 1  # bilinear resampling correlates neighbours only (measured: lag 2 < 0.01)
_CORR_GROW = 4
_CORR_HALO = _CORR_LAG + _CORR_GROW + 3  # source mask reach (5x5 mean + growth) + lag
_SNR_RATIO = 20.0
_SNR_ASTRO = 50.0


class FluxRatioWarning(LazySkyWarning):
    """Too few stars matched to fit the flux ratio: 1 was used."""


def fit_flux_ratio(
    stars_new: NDArray[Any],
    stars_ref: NDArray[Any],
    *,
    match_px: float = 1.0,
    snr_min: float = _SNR_RATIO,
    min_pairs: int = 3,
) -> NDArray[np.float64]:
    """Flux ratio ``F_r / F_n`` and astrometric scatter from stars matched between images.

    Parameters
    ----------
    stars_new, stars_ref
        ``(..., 4)`` rows ``x, y, flux, flux_err`` (NaN rows ignored), e.g. the ``stars``
        of :func:`~lazysky.pipeline.psf.psf_per_tile`.
    match_px
        Largest distance of a match.
    snr_min
        Both stars of a pair need ``flux / flux_err`` ≥ this.
    min_pairs
        Fewer pairs: the ratio is 1, with a :class:`FluxRatioWarning`.

    Returns
    -------
    numpy.ndarray
        ``[ratio, n_pairs, sigma_x, sigma_y]`` (the robust scatter of the offsets of the
        pairs with S/N ≥ 50 in both, 0 with fewer than 5 of them).

    Examples
    --------
    >>> new = np.array([[10.0, 10.0, 1000.0, 10.0], [50.0, 40.0, 500.0, 10.0],
    ...                 [30.0, 70.0, 800.0, 10.0]])
    >>> ref = new * [1, 1, 2, 1] + [0.1, 0, 0, 0]
    >>> fit_flux_ratio(new, ref)[:2]
    array([2., 3.])
    """
    a = np.asarray(stars_new, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(stars_ref, dtype=np.float64).reshape(-1, 4)
    a = a[np.all(np.isfinite(a), axis=1) & (a[:, 3] > 0)]
    b = b[np.all(np.isfinite(b), axis=1) & (b[:, 3] > 0)]
    ratios, offs = [], []
    for row in b:
        if len(a) == 0:
            break
        d = np.hypot(a[:, 0] - row[0], a[:, 1] - row[1])
        k = int(np.argmin(d))
        if d[k] > match_px:
            continue
        snr = min(a[k, 2] / a[k, 3], row[2] / row[3])
        if snr >= snr_min and a[k, 2] > 0:
            ratios.append(row[2] / a[k, 2])
        if snr >= _SNR_ASTRO:
            offs.append((row[0] - a[k, 0], row[1] - a[k, 1]))
    if len(ratios) < min_pairs:
        msg = (f"only {len(ratios)} star(s) matched between the images with S/N >= "
               f"{snr_min} (need {min_pairs}): flux ratio set to 1; pass flux_ratio=")  # fmt: skip
        warnings.warn(msg, FluxRatioWarning, stacklevel=2)
        ratio = 1.0
    else:
        ratio = float(np.median(ratios))
    sx = sy = 0.0
    if len(offs) >= 5:
        o = np.array(offs)
        sx, sy = (1.4826 * float(np.median(np.abs(c - np.median(c)))) for c in o.T)
    return np.array([ratio, float(len(ratios)), sx, sy])


def _ratio_block(
    stars_new: NDArray[Any], stars_ref: NDArray[Any], *, fixed: float | None, match_px: float,
    needed: bool = True,
) -> NDArray[np.float64]:  # fmt: skip
    if stars_new.size == 0:
        return np.zeros((1, 4))
    if fixed is not None:
        return np.array([[fixed, np.nan, 0.0, 0.0]])
    if needed:
        return fit_flux_ratio(stars_new, stars_ref, match_px=match_px)[None]
    # Alard & Lupton fit the scaling in their kernel: the ratio is only reported
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FluxRatioWarning)
        out = fit_flux_ratio(stars_new, stars_ref, match_px=match_px)
    if out[1] < 3:
        out[0] = np.nan
    return out[None]


def _mean_variance(ds: xr.Dataset, bad_bits: int) -> da.Array:
    v = da.asarray(ds.variance.data).astype(np.float64)
    good = ((da.asarray(ds.mask.data) & bad_bits) == 0) & da.isfinite(v) & (v > 0)
    return (da.where(good, v, 0.0).sum() / da.maximum(good.sum(), 1)).reshape(1, 1)


def _corr_block(
    image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any], *,
    trim: tuple[int, int, int, int], bad_bits: int,
) -> NDArray[np.float64]:  # fmt: skip
    t, b, left, right = trim
    core = (slice(t, image.shape[0] - b), slice(left, image.shape[1] - right))
    bad = (np.asarray(mask) & bad_bits) != 0
    return correlation_sums(image, variance, bad, core=core, lag=_CORR_LAG, grow_px=_CORR_GROW)


def noise_correlation(ds: xr.Dataset, *, bad_bits: int = DEFAULT_BAD_BITS) -> da.Array:
    """The ``(3, 3)`` noise correlation stamp of a grid image, lazily (module docstring).

    ``c[1, 1]`` is the per-pixel variance over the variance plane, ``c.sum()`` the
    variance of a few-pixel sum over the plane's; white noise gives ``c = δ``. One
    ``noisecorr-<tile>`` task per tile (with a small halo, so the result does not depend
    on the tiling) and one reduction.

    Examples
    --------
    >>> c = noise_correlation(coadd).compute()  # doctest: +SKIP
    >>> c[1, 1]  # per-pixel variance / variance plane: ~0.5 for a bilinear coadd
    ... # doctest: +SKIP
    """
    grid = _check_grid_dataset(ds, "image")
    nty, ntx = grid.n_tiles
    planes = [da.asarray(ds[k].data) for k in ("image", "variance", "mask")]
    n = 2 * _CORR_LAG + 1
    parts = []
    for iy in range(nty):
        for ix in range(ntx):
            tile = grid.tile_id(iy, ix)
            sy, sx = grid.tile_slices(tile)
            wy, wx = grid.tile_window(tile, _CORR_HALO)
            trim = (sy.start - wy.start, wy.stop - sy.stop, sx.start - wx.start, wx.stop - sx.stop)
            cuts = [p[wy, wx].rechunk(-1) for p in planes]
            parts.append(da.map_blocks(
                _corr_block, *cuts, trim=trim, bad_bits=int(bad_bits), drop_axis=[0, 1],
                new_axis=[0, 1, 2], chunks=((2,), (n,), (n,)), dtype=np.float64,
                meta=np.empty((0, 0, 0)), name=f"noisecorr-{tile}-{tokenize(*cuts, trim)}",
            ))  # fmt: skip
    sums = da.stack(parts).sum(axis=0)
    return da.map_blocks(
        correlation_from_sums, sums, drop_axis=[0], chunks=((n,), (n,)), dtype=np.float64,
        meta=np.empty((0, 0)), name=f"noisecorr-{tokenize(sums)}",
    )  # fmt: skip


def _diff_block(
    n: NDArray[Any], r: NDArray[Any], vn: NDArray[Any], vr: NDArray[Any], mn: NDArray[Any],
    mr: NDArray[Any], cn: NDArray[Any], cr: NDArray[Any], pn: NDArray[Any], pr: NDArray[Any],
    ratio: NDArray[Any], s2: NDArray[Any], corr_n: NDArray[Any], corr_r: NDArray[Any], *,
    trim: tuple[int, int, int, int], astro: tuple[float, float] | None, white: bool,
    method: str,
) -> NDArray[Any]:  # fmt: skip
    t, b, left, right = trim
    shape = (n.shape[0] - t - b, n.shape[1] - left - right)
    out = np.zeros(shape, dtype=DIFF_DTYPE)
    if n.size == 0:
        return out
    p_n, p_r = pn.reshape(pn.shape[-2:]), pr.reshape(pr.shape[-2:])
    c_n, c_r = (None, None) if white else (corr_n, corr_r)
    sig = (float(ratio[0, 2]), float(ratio[0, 3])) if astro is None else astro
    if method == "alard-lupton":
        res = alard_lupton_pixels(n, r, vn, vr, p_n, p_r, mask_new=mn, mask_ref=mr,
                                  corr_new=c_n, corr_ref=c_r, astrometric_sigma_px=sig,
                                  flux_ratio=float(ratio[0, 0]))  # fmt: skip
    else:
        res = zogy_pixels(
            n, r, vn, vr, p_n, p_r, mask_new=mn, mask_ref=mr, flux_ratio=float(ratio[0, 0]),
            sigma2_new=float(s2[0, 0]), sigma2_ref=float(s2[0, 1]), astrometric_sigma_px=sig,
            corr_new=c_n, corr_ref=c_r,
        )  # fmt: skip
    core = (slice(t, t + shape[0]), slice(left, left + shape[1]))
    for k in ("image", "variance", "score", "mask"):
        out[k] = getattr(res, k)[core]
    size = max(pn.shape[-1], pr.shape[-1])
    partial = partial_coverage(cn, n, vn, size_px=size) | partial_coverage(cr, r, vr, size_px=size)
    out["mask"][partial[core]] |= MASK_DTYPE.type(MaskBit.EDGE)
    return out


def _psf_d_block(
    pn: NDArray[Any], pr: NDArray[Any], ratio: NDArray[Any], s2: NDArray[Any],
    corr_n: NDArray[Any], corr_r: NDArray[Any], *, white: bool, method: str,
) -> NDArray[np.float64]:  # fmt: skip
    if method == "alard-lupton":  # D has the PSF of the image that was not convolved
        a: Any = np.asarray(pn, dtype=np.float64).reshape(pn.shape[-2:])
        b: Any = np.asarray(pr, dtype=np.float64).reshape(pr.shape[-2:])
        q = a if broader(a, b) == "new" else b
        size = max(int(np.shape(a)[-1]), int(np.shape(b)[-1]))
        out = np.zeros((size, size))
        o = (size - int(np.shape(q)[-1])) // 2
        out[o : size - o, o : size - o] = q / q.sum()
        return out[None, None]
    p = difference_psf(
        pn.reshape(pn.shape[-2:]), pr.reshape(pr.shape[-2:]), flux_ratio=float(ratio[0, 0]),
        sigma2_new=float(s2[0, 0]), sigma2_ref=float(s2[0, 1]),
        corr_new=None if white else corr_n, corr_ref=None if white else corr_r,
    )  # fmt: skip
    return p[None, None]


def _stamps(
    psf: xr.Dataset | NDArray[Any] | None, ds: xr.Dataset, options: dict[str, Any], what: str,
) -> tuple[da.Array, da.Array, xr.Dataset | None]:  # fmt: skip
    """Per-tile stamps ``(nty, ntx, s, s)`` chunked per tile, and the stars table."""
    grid = _check_grid_dataset(ds, what)
    nty, ntx = grid.n_tiles
    if psf is None:
        p = psf_per_tile(ds, **options)
        return p.psf.data, p.stars.data, p
    if isinstance(psf, xr.Dataset):
        if "psf" not in psf or psf.psf.shape[:2] != (nty, ntx):
            msg = (f"psf_{what} must be a psf_per_tile Dataset of this grid's {nty} x {ntx} "
                   "tiles, or one 2-d stamp")  # fmt: skip
            raise ParameterError(msg)
        stamps = da.asarray(psf.psf.data).rechunk((1, 1, -1, -1))
        stars = da.asarray(psf.stars.data).rechunk((1, 1, -1, -1))
        return stamps, stars, psf
    stamp = np.asarray(psf, dtype=np.float64)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1] or stamp.shape[0] % 2 == 0:
        msg = f"psf_{what} must be a square stamp with odd sides, got shape {stamp.shape}"
        raise ParameterError(msg)
    stamp = stamp / stamp.sum()
    stamps = da.broadcast_to(da.from_array(stamp[None, None]), (nty, ntx, *stamp.shape))
    stars = da.full((nty, ntx, MAX_STARS, 4), np.nan, chunks=(1, 1, -1, -1))
    return stamps.rechunk((1, 1, -1, -1)), stars, None


def difference(
    science: xr.Dataset,
    reference: xr.Dataset,
    *,
    method: str = "zogy",
    psf_size_px: int = 25,
    halo_px: int | None = None,
    flux_ratio: float | None = None,
    astrometric_sigma_px: tuple[float, float] | str = (0.0, 0.0),
    psf_science: xr.Dataset | NDArray[Any] | None = None,
    psf_reference: xr.Dataset | NDArray[Any] | None = None,
    snr_min: float = 30.0,
    min_stars: int = 3,
    fallback_fwhm_px: float | None = None,
    match_px: float = 1.0,
    bad_bits: int = DEFAULT_BAD_BITS,
    noise: str = "measured",
) -> xr.Dataset:
    """The proper difference image ``science − reference`` (ZOGY), lazily, per tile.

    Parameters
    ----------
    science, reference
        Background-subtracted ``image``, ``variance``, ``mask`` on ``(y, x)`` of one
        :class:`~lazysky.pipeline.SkyGrid` (``attrs["grid"]``), e.g. two
        :func:`~lazysky.pipeline.stack` coadds.
    method
        ``"zogy"`` (the only one so far).
    psf_size_px
        Side of the PSF stamps (odd); should cover ~4 FWHM of radius.
    halo_px
        Pixels of the neighbouring tiles each tile sees (default ``2 * psf_size_px``).
    flux_ratio
        ``F_r / F_n``, a source's flux in the reference over that in the science image
        (default: fitted from matched stars, :func:`fit_flux_ratio`).
    astrometric_sigma_px
        ``(σ_x, σ_y)`` registration noise in pixels, or ``"auto"`` (from matched stars).
    psf_science, psf_reference
        Fixed PSFs: a :func:`~lazysky.pipeline.psf.psf_per_tile` Dataset of this grid or
        one 2-d stamp for every tile (default: estimated per tile).
    snr_min, min_stars, fallback_fwhm_px, bad_bits
        PSF estimation (:func:`~lazysky.pipeline.psf.estimate_psf`).
    match_px
        Largest distance of a star match between the images (pixels).
    noise
        ``"measured"``: each image's noise correlation is measured and ZOGY whitens it
        (:func:`noise_correlation`); ``"white"``: uncorrelated noise assumed.

    Returns
    -------
    xarray.Dataset
        ``image`` (D, science units), ``variance`` (predicted, of ``image``), ``score``
        (S_corr), ``mask`` (union of the inputs' masks; NODATA where either has no data,
        EDGE within half a stamp of that) on ``(y, x)``; ``psf`` (``P_D``, the PSF of
        ``image``), ``psf_science``, ``psf_reference`` ``(tile_y, tile_x, v, u)``;
        ``flux_ratio``, ``n_flux_stars``, ``astrometric_sigma_px (axis)``,
        ``noise_correlation_science`` and ``noise_correlation_reference`` ``(cv, cu)``;
        attrs grid, units, steps.

    Examples
    --------
    >>> diff = difference(science_coadd, reference_coadd, astrometric_sigma_px="auto")
    ... # doctest: +SKIP
    >>> diff[["image", "variance", "score", "mask"]].compute()  # doctest: +SKIP
    """
    if method not in METHODS:
        msg = f"method must be one of {list(METHODS)}, got {method!r}"
        raise ParameterError(msg)
    if noise not in NOISE_MODELS:
        msg = f"noise must be one of {list(NOISE_MODELS)}, got {noise!r}"
        raise ParameterError(msg)
    grid = _check_grid_dataset(science, "science")
    grid_r = _check_grid_dataset(reference, "reference")
    if grid_r != grid:
        msg = (f"science and reference are on different grids ({grid} vs {grid_r}): "
               "resample both onto one SkyGrid first")  # fmt: skip
        raise ParameterError(msg)
    if halo_px is None:
        halo_px = 2 * int(psf_size_px)
    if int(halo_px) < 0:
        msg = f"halo_px must be >= 0, got {halo_px}"
        raise ParameterError(msg)
    astro: tuple[float, float] | None
    if isinstance(astrometric_sigma_px, str):
        if astrometric_sigma_px != "auto":
            msg = f"astrometric_sigma_px must be (sx, sy) or 'auto', got {astrometric_sigma_px!r}"
            raise ParameterError(msg)
        astro = None
    else:
        vals = tuple(float(v) for v in astrometric_sigma_px)
        if len(vals) != 2 or not all(v >= 0 and math.isfinite(v) for v in vals):
            msg = f"astrometric_sigma_px must be two values >= 0, got {astrometric_sigma_px}"
            raise ParameterError(msg)
        astro = (vals[0], vals[1])
    if flux_ratio is not None and not (math.isfinite(flux_ratio) and flux_ratio > 0):
        msg = f"flux_ratio must be finite and > 0, got {flux_ratio}"
        raise ParameterError(msg)
    options = {"size_px": int(psf_size_px), "snr_min": snr_min, "min_stars": min_stars,
               "fallback_fwhm_px": fallback_fwhm_px, "bad_bits": bad_bits}  # fmt: skip
    stamps_n, stars_n, psf_n = _stamps(psf_science, science, options, "science")
    stamps_r, stars_r, psf_r = _stamps(psf_reference, reference, options, "reference")
    nty, ntx = grid.n_tiles
    ratio = da.map_blocks(
        _ratio_block, stars_n.rechunk((nty, ntx, MAX_STARS, 4)),
        stars_r.rechunk((nty, ntx, MAX_STARS, 4)), fixed=flux_ratio, match_px=match_px,
        needed=method == "zogy",
        chunks=((1,), (4,)), drop_axis=[2, 3], dtype=np.float64, meta=np.empty((0, 0)),
        name=f"fluxratio-{tokenize(stars_n, stars_r, flux_ratio, match_px, method)}",
    )  # fmt: skip
    s2 = da.concatenate(
        [_mean_variance(science, bad_bits), _mean_variance(reference, bad_bits)], axis=1
    )
    white = noise == "white"
    nc = 2 * _CORR_LAG + 1
    if white:
        delta = np.zeros((nc, nc))
        delta[_CORR_LAG, _CORR_LAG] = 1.0
        corr_n = corr_r = da.from_array(delta, chunks=-1)
    else:
        corr_n = noise_correlation(science, bad_bits=bad_bits)
        corr_r = noise_correlation(reference, bad_bits=bad_bits)
    planes = [da.asarray(ds[k].data) for k in ("image",) for ds in (science, reference)]
    planes += [da.asarray(ds[k].data) for k in ("variance",) for ds in (science, reference)]
    planes += [da.asarray(ds[k].data) for k in ("mask",) for ds in (science, reference)]
    no_count = da.zeros(grid.shape, dtype=np.uint16, chunks=grid.chunks)
    planes += [da.asarray(ds["count"].data) if "count" in ds else no_count
               for ds in (science, reference)]  # fmt: skip
    h = int(halo_px)
    rows = []
    for iy in range(nty):
        row = []
        for ix in range(ntx):
            tile = grid.tile_id(iy, ix)
            sy, sx = grid.tile_slices(tile)
            wy, wx = grid.tile_window(tile, h)
            (y0, y1), (x0, x1) = (wy.start, wy.stop), (wx.start, wx.stop)
            trim = (sy.start - y0, y1 - sy.stop, sx.start - x0, x1 - sx.stop)
            cuts = [p[y0:y1, x0:x1].rechunk(-1) for p in planes]
            pn, pr = stamps_n.blocks[iy, ix], stamps_r.blocks[iy, ix]
            token = tokenize(*cuts, pn, pr, ratio, s2, corr_n, corr_r, trim, astro, white, method)
            pairs: list[Any] = []
            for c in cuts:
                pairs += [c, "ij"]
            pairs += [pn, "abcd", pr, "efgh", ratio, "kl", s2, "mn", corr_n, "op", corr_r, "qr"]
            row.append(da.blockwise(
                _diff_block, "ij", *pairs, trim=trim, astro=astro, white=white, method=method,
                concatenate=True,
                adjust_chunks={"i": (sy.stop - sy.start,), "j": (sx.stop - sx.start,)},
                dtype=DIFF_DTYPE, meta=np.empty((0, 0), dtype=DIFF_DTYPE),
                name=f"difference-{tile}-{token}",
            ))  # fmt: skip
        rows.append(row)
    packed = da.block(rows)
    size = max(stamps_n.shape[-1], stamps_r.shape[-1])
    psf_token = tokenize(stamps_n, stamps_r, ratio, s2, corr_n, corr_r, white, method)
    psf_d = da.blockwise(
        _psf_d_block, "abcd", stamps_n, "abcd", stamps_r, "abef", ratio, "kl", s2, "mn",
        corr_n, "op", corr_r, "qr", white=white, method=method, concatenate=True,
        adjust_chunks={"c": (size,), "d": (size,)}, dtype=np.float64,
        meta=np.empty((0, 0, 0, 0)),
        name=f"psf-difference-{psf_token}",
    )  # fmt: skip
    dims = ("y", "x")
    out = xr.Dataset({k: (dims, packed[k]) for k in ("image", "variance", "score", "mask")})
    units = str(science.attrs.get("units", science.image.attrs.get("units", "")))
    out["image"].attrs.update({"units": units, "long_name": "ZOGY difference D / F_D"})
    out["variance"].attrs["units"] = f"({units})2" if units else ""
    out["score"].attrs["long_name"] = "ZOGY S_corr (unit variance)"
    out["mask"].attrs["flags"] = MaskBit.doc()
    tdims = ("tile_y", "tile_x", "v", "u")
    out["psf"] = (tdims, psf_d)
    out["psf"].attrs["long_name"] = "P_D, the PSF of image (sum 1)"
    out["psf_science"] = (tdims, stamps_n)
    out["psf_reference"] = (tdims, stamps_r)
    for name, p in (("science", psf_n), ("reference", psf_r)):
        if p is not None:
            for k in ("psf_fwhm", "psf_n_stars"):
                out[f"{k}_{name}"] = p[k]
    out["flux_ratio"] = ((), ratio[0, 0])
    out["n_flux_stars"] = ((), ratio[0, 1])
    out["astrometric_sigma_px"] = (
        ("axis",), ratio[0, 2:] if astro is None else da.from_array(np.array(astro))
    )
    out["noise_correlation_science"] = (("cv", "cu"), corr_n)
    out["noise_correlation_reference"] = (("cv", "cu"), corr_r)
    out = out.assign_coords(axis=["x", "y"])
    step = {
        "step": "difference", "method": method, "psf_size_px": int(psf_size_px),
        "halo_px": h, "flux_ratio": "fitted" if flux_ratio is None else float(flux_ratio),
        "astrometric_sigma_px": "auto" if astro is None else list(astro),
        "psf": "fixed" if psf_science is not None else "per tile",
        "snr_min": snr_min, "min_stars": min_stars, "match_px": match_px,
        "bad_bits": int(bad_bits), "noise": noise,
    }  # fmt: skip
    out.attrs.update({
        "units": units,
        "grid": grid.to_dict(),
        "science_inputs": list(science.attrs.get("inputs", [])),
        "reference_inputs": list(reference.attrs.get("inputs", [])),
        "steps": [step],
        "star_fields": list(STAR_FIELDS),
    })  # fmt: skip
    return out


from lazysky.pipeline._difffits import difference_files, write_difference_fits  # noqa: E402

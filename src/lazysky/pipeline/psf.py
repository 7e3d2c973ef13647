"""The PSF of an image, per tile: a Moffat profile fitted to bright, isolated stars.

:func:`estimate_psf` is the numpy kernel on one in-memory image (+ variance, mask): it
finds local maxima of the S/N map, keeps the bright, isolated, unmasked, unsaturated
ones, fits each with a pixel-integrated circular Moffat profile (amplitude, centre,
FWHM, β), rejects outliers in FWHM (galaxies, blends), then fits one shared FWHM and β to
the survivors (each star keeping its own flux and centre). The result, a :class:`PSF`,
holds an odd-sized stamp (sum 1, centred on its middle pixel), the FWHM in pixels, β,
the number of stars used and the stars' fitted positions and fluxes (which
:mod:`lazysky.pipeline.difference` matches between two images to fit their flux ratio).

Why a fitted model, not photutils' ``EPSFBuilder``: a tile of a few hundred pixels has a
handful of good stars, and an empirical PSF built from five stars carries their noise
into every pixel of the stamp; ZOGY divides by the PSFs' Fourier transforms, where that
noise is amplified at high frequencies. A two-parameter model fitted to all of them is
smooth, always positive and well centred, and needs as few as one star. Its price: the
PSF is assumed round (a coadd of round Moffats of different widths is close to a
Moffat); an elliptical or structured PSF is matched less well (see docs/difference.md).

Too few stars (``min_stars``): the tile takes the median FWHM and β of the tiles that
have enough (:func:`psf_per_tile`), or, when no tile has, a Moffat of ``fallback_fwhm_px``
and β = 3, with a :class:`PsfFallbackWarning` (an expected result, not an error).

:func:`psf_per_tile` is the lazy wrapper over a grid Dataset (as made by
:func:`lazysky.pipeline.stack`): one ``psf-<tile>-<token>`` task per tile, then one
``psf-fill`` task per tile for the fallback. Its result is a Zarr-storable Dataset:
``psf (tile_y, tile_x, v, u)``, ``psf_fwhm``, ``psf_beta``, ``psf_n_stars``,
``psf_fallback`` ``(tile_y, tile_x)`` and ``stars (tile_y, tile_x, star, field)`` with
fields ``x, y`` (grid pixels), ``flux``, ``flux_err``.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(1)
>>> img = rng.normal(0, 1, (96, 96))
>>> for y, x in [(20, 20), (20, 70), (70, 30), (60, 75)]:
...     img[y - 12 : y + 13, x - 12 : x + 13] += 2000 * moffat_stamp(3.0, 3.0, 25)
>>> psf = estimate_psf(img, np.ones_like(img), np.zeros(img.shape, np.uint16))
>>> psf.n_stars, round(psf.fwhm_px, 1), psf.stamp.shape, round(float(psf.stamp.sum()), 6)
(4, 3.0, (25, 25), 1.0)
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from numpy.typing import NDArray
from scipy import ndimage, optimize

from lazysky.errors import LazySkyWarning, ParameterError
from lazysky.pipeline._mask import MaskBit
from lazysky.pipeline.grid import SkyGrid

__all__ = [
    "PSF",
    "PSF_VARIABLES",
    "STAR_FIELDS",
    "PsfFallbackWarning",
    "estimate_psf",
    "grid_of",
    "moffat_stamp",
    "psf_per_tile",
]

logger = logging.getLogger(__name__)

STAR_FIELDS = ("x", "y", "flux", "flux_err")
MAX_STARS = 40  # stars stored per tile
MAX_FITS = 20  # brightest candidates fitted per tile (the cost of the PSF step)
_OVERSAMPLE = 5
DEFAULT_BAD_BITS = int(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NODATA)
_N_PARAMS = 4  # fwhm, beta, n_stars, fallback


class PsfFallbackWarning(LazySkyWarning):
    """Too few stars to fit a PSF: a fallback (neighbours' median or a default) was used."""


@dataclass(frozen=True)
class PSF:
    """A PSF model: stamp (odd, sum 1, centred), FWHM and β of the Moffat, stars used.

    ``stars`` is ``(n, 4)``: ``x, y`` (pixels of the image given), ``flux``, ``flux_err``
    of the stars fitted (their fluxes with the shared profile); ``fallback`` says the
    profile is not fitted to this image's stars.
    """

    stamp: NDArray[np.float64]
    fwhm_px: float
    beta: float
    n_stars: int
    fallback: bool
    stars: NDArray[np.float64]


def _alpha(fwhm: float, beta: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _moffat(
    size: int, fwhm: float, beta: float, dx: float = 0.0, dy: float = 0.0
) -> NDArray[np.float64]:
    """A unit-flux Moffat integrated over the pixels of a ``size`` square (5x5 sub-pixels),
    centred at ``(size // 2 + dy, size // 2 + dx)``; normalised analytically (not to the
    stamp's sum), so a fit's amplitude is the total flux."""
    c = size // 2
    o = (np.arange(size * _OVERSAMPLE) + 0.5) / _OVERSAMPLE - 0.5 - c
    a = _alpha(fwhm, beta)
    r2 = ((o - dy)[:, None] ** 2 + (o - dx)[None, :] ** 2) / a**2
    sub = (beta - 1.0) / (math.pi * a**2) * (1.0 + r2) ** (-beta)
    b = _binning(size)
    return np.asarray(b @ sub @ b.T, dtype=np.float64)


def _moffat_jac(
    size: int, fwhm: float, beta: float, dx: float = 0.0, dy: float = 0.0
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """:func:`_moffat` and its derivatives with respect to ``(dx, dy, fwhm, beta)``
    (shape ``(4, size, size)``), analytically, over the same sub-pixels.

    With ``u = 1 + r²/α²`` and ``m = (β − 1) / (π α²) · u^−β``: ``∂m/∂dx = 2β m (x − dx)
    / (α² u)`` (``dy`` alike), ``∂m/∂α = (2 m / α)(β r²/(α² u) − 1)``, ``∂α/∂FWHM =
    α / FWHM``, ``∂m/∂β = m (1/(β − 1) − ln u) + ∂m/∂α · ∂α/∂β`` and ``∂α/∂β = α ln 2 ·
    2^(1/β) / (2 β² (2^(1/β) − 1))``. A fit given these needs one model evaluation per
    step instead of six (forward differences over five parameters).
    """
    c = size // 2
    o = (np.arange(size * _OVERSAMPLE) + 0.5) / _OVERSAMPLE - 0.5 - c
    a = _alpha(fwhm, beta)
    ey, ex = (o - dy) / a, (o - dx) / a
    q = ey[:, None] ** 2 + ex[None, :] ** 2  # r² / α²
    u = 1.0 + q
    log_u = np.log(u)
    m = (beta - 1.0) / (math.pi * a**2) * np.exp(-beta * log_u)
    k = (2.0 * beta / a) * m / u
    dm_da = (2.0 / a) * m * (beta * q / u - 1.0)
    s2 = 2.0 ** (1.0 / beta)
    da_db = a * math.log(2.0) * s2 / (2.0 * beta**2 * (s2 - 1.0))
    subs = np.empty((5, *m.shape))
    subs[0] = m
    np.multiply(k, ex[None, :], out=subs[1])
    np.multiply(k, ey[:, None], out=subs[2])
    np.multiply(dm_da, a / fwhm, out=subs[3])
    subs[4] = m * (1.0 / (beta - 1.0) - log_u) + dm_da * da_db
    b = _binning(size)  # sub-pixels → pixels: two small matrix products
    pix = b @ subs @ b.T
    return pix[0], pix[1:]


_BINNING: dict[int, NDArray[np.float64]] = {}


def _binning(size: int) -> NDArray[np.float64]:
    """``(size, size · oversample)``: the mean of each pixel's sub-pixels along one axis."""
    if size not in _BINNING:
        _BINNING[size] = np.kron(np.eye(size), np.full((1, _OVERSAMPLE), 1.0 / _OVERSAMPLE))
    return _BINNING[size]


def moffat_stamp(fwhm_px: float, beta: float, size_px: int) -> NDArray[np.float64]:
    """A pixel-integrated circular Moffat stamp, ``size_px`` square (odd), sum 1, centred.

    Examples
    --------
    >>> s = moffat_stamp(2.5, 3.0, 15)
    >>> s.shape, round(float(s.sum()), 12), np.unravel_index(s.argmax(), s.shape)
    ((15, 15), 1.0, (np.int64(7), np.int64(7)))
    """
    _check_size(size_px)
    if not (fwhm_px > 0 and beta > 1):
        msg = f"need fwhm_px > 0 and beta > 1, got {fwhm_px}, {beta}"
        raise ParameterError(msg)
    s = _moffat(size_px, fwhm_px, beta)
    return s / s.sum()


def _check_size(size_px: int) -> None:
    if int(size_px) != size_px or size_px < 3 or size_px % 2 == 0:
        msg = f"the PSF stamp size must be an odd integer >= 3 (e.g. 25), got {size_px}"
        raise ParameterError(msg)


def _candidates(
    image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any], half: int,
    snr_min: float, bad_bits: int,
) -> list[tuple[int, int, float]]:  # fmt: skip
    """Local maxima ``(y, x, snr)`` with peak S/N ≥ ``snr_min``, no bad pixel and no other
    significant peak within ``half`` pixels, the whole cut-out inside the image."""
    ny, nx = image.shape
    valid = np.isfinite(variance) & (variance > 0) & np.isfinite(image)
    snr = np.where(valid, image / np.sqrt(np.where(valid, variance, 1.0)), 0.0)
    smooth = ndimage.uniform_filter(snr, 3) * 3.0  # S/N of a 3x3 sum, ~ a PSF-ish filter
    peaks = (ndimage.maximum_filter(smooth, size=5) == smooth) & (smooth > 5.0)
    ys, xs = np.nonzero(peaks)
    bad = ((mask & bad_bits) != 0) | ~valid
    out = []
    for y, x in zip(ys, xs, strict=True):
        if smooth[y, x] < snr_min or not (half <= y < ny - half and half <= x < nx - half):
            continue
        near = np.hypot(ys - y, xs - x) <= 1.5 * half
        # a neighbour above 5 % of this peak's S/N within 1.5 stamp radii spoils the cut-out
        if np.count_nonzero(near & (smooth[ys, xs] > 0.05 * smooth[y, x])) > 1:
            continue
        if bad[y - half : y + half + 1, x - half : x + half + 1].any():
            continue
        out.append((int(y), int(x), float(smooth[y, x])))
    out.sort(key=lambda t: -t[2])
    return out[:MAX_FITS]


def _fit_one(
    cut: NDArray[np.float64], w: NDArray[np.float64], fwhm0: float
) -> tuple[NDArray[np.float64], float] | None:
    size = len(cut)

    memo: dict[bytes, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}

    def model(p: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        key = p.tobytes()  # the solver asks for the residual and the Jacobian at one point
        if key not in memo:
            memo.clear()
            memo[key] = _moffat_jac(size, p[3], p[4], p[1], p[2])
        return memo[key]

    def resid(p: NDArray[np.float64]) -> NDArray[np.float64]:
        return ((p[0] * model(p)[0] - cut) * w).ravel()

    def jac(p: NDArray[np.float64]) -> NDArray[np.float64]:
        m, dm = model(p)
        return np.concatenate([(m * w).reshape(1, -1),
                               (p[0] * dm * w).reshape(4, -1)]).T

    p0 = np.array([cut.sum(), 0.0, 0.0, fwhm0, 3.0])
    lo = [0.0, -2.0, -2.0, 0.5, 1.2]
    hi = [np.inf, 2.0, 2.0, size / 2.0, 20.0]
    p0[0] = max(p0[0], 1e-6)
    try:
        r = optimize.least_squares(resid, p0, jac=jac, bounds=(lo, hi), x_scale="jac",
                                   max_nfev=200)
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not r.success:
        return None
    return r.x, float(np.sum(r.fun**2) / max(r.fun.size - 5, 1))


def _fit_shared(
    cuts: list[NDArray[np.float64]], ws: list[NDArray[np.float64]], p_star: NDArray[np.float64],
    fwhm0: float, beta0: float,
) -> tuple[float, float, NDArray[np.float64], NDArray[np.float64]]:  # fmt: skip
    """One FWHM and β for every star, their centres fixed at their own fits' and their
    fluxes solved linearly at each step. Returns fwhm, β, the stars' (flux, dx, dy) and
    flux errors ``1 / sqrt(Σ P² / V)``."""
    size, n = len(cuts[0]), len(cuts)

    memo: dict[bytes, list[tuple[NDArray[np.float64], NDArray[np.float64]]]] = {}

    def with_jac(p: NDArray[np.float64]) -> list[tuple[NDArray[np.float64],
                                                       NDArray[np.float64]]]:
        key = p.tobytes()
        if key not in memo:
            memo.clear()
            memo[key] = [_moffat_jac(size, p[0], p[1], p_star[k, 1], p_star[k, 2])
                         for k in range(n)]
        return memo[key]

    def models(p: NDArray[np.float64]) -> list[NDArray[np.float64]]:
        return [m for m, _ in with_jac(np.asarray(p, dtype=np.float64))]

    def fluxes(ms: list[NDArray[np.float64]]) -> NDArray[np.float64]:
        return np.array([np.sum(ms[k] * cuts[k] * ws[k] ** 2)
                         / max(float(np.sum((ms[k] * ws[k]) ** 2)), 1e-300)
                         for k in range(n)])  # fmt: skip

    def resid(p: NDArray[np.float64]) -> NDArray[np.float64]:
        ms = models(p)
        f = fluxes(ms)
        return np.concatenate([((f[k] * ms[k] - cuts[k]) * ws[k]).ravel() for k in range(n)])

    def jac(p: NDArray[np.float64]) -> NDArray[np.float64]:
        # r_k = (f_k m_k − c_k) w_k with the flux f_k = N/D solved linearly at each step:
        # ∂r_k = w_k (f_k ∂m_k + m_k ∂f_k), ∂f_k = (Σ ∂m c w² − 2 f Σ m ∂m w²) / D
        parts = []
        for (m, dm), c, w in zip(with_jac(np.asarray(p, dtype=np.float64)), cuts, ws,
                                 strict=True):
            w2 = w * w
            d = max(float(np.sum(m * m * w2)), 1e-300)
            f = float(np.sum(m * c * w2)) / d
            dm2 = dm[2:]  # fwhm, beta
            df = (np.sum(dm2 * c * w2, axis=(1, 2))
                  - 2.0 * f * np.sum(dm2 * m * w2, axis=(1, 2))) / d
            parts.append((w * (f * dm2 + m * df[:, None, None])).reshape(2, -1).T)
        return np.concatenate(parts)

    lo, hi = [0.5, 1.2], [size / 2.0, 20.0]
    p0 = np.clip([fwhm0, beta0], np.add(lo, 1e-6), np.subtract(hi, 1e-6))
    r = optimize.least_squares(resid, p0, jac=jac, bounds=(lo, hi), x_scale="jac",
                               max_nfev=60)
    ms = models(r.x)
    q = p_star.copy()
    q[:, 0] = fluxes(ms)
    errs = np.array([1.0 / math.sqrt(max(float(np.sum((ms[k] * ws[k]) ** 2)), 1e-300))
                     for k in range(n)])  # fmt: skip
    return float(r.x[0]), float(r.x[1]), q, errs


def estimate_psf(
    image: NDArray[Any],
    variance: NDArray[Any],
    mask: NDArray[Any],
    *,
    size_px: int = 25,
    snr_min: float = 30.0,
    min_stars: int = 3,
    fallback_fwhm_px: float | None = None,
    bad_bits: int = DEFAULT_BAD_BITS,
    warn: bool = True,
) -> PSF:
    """The PSF of one image from its bright, isolated, unmasked stars (module docstring).

    Parameters
    ----------
    image, variance, mask
        One background-subtracted image, its variance and mask bits (``(ny, nx)``).
    size_px
        Side of the stamp (odd); also the fitting cut-out and the isolation radius.
    snr_min
        Lowest S/N of a 3x3 sum at a star's peak for it to be used.
    min_stars
        Fewer fitted stars than this: the fallback (a Moffat of ``fallback_fwhm_px``, β 3,
        with a :class:`PsfFallbackWarning` when ``warn``).
    fallback_fwhm_px
        FWHM of the fallback; default ``size_px / 8``.
    bad_bits
        Mask bits that disqualify a star's cut-out (default BAD | SAT | CR | NODATA).

    Returns
    -------
    PSF

    Examples
    --------
    >>> flat = np.zeros((40, 40))
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", PsfFallbackWarning)
    ...     p = estimate_psf(flat, flat + 1, flat.astype(np.uint16), fallback_fwhm_px=2.0)
    >>> p.fallback, p.n_stars, p.fwhm_px
    (True, 0, 2.0)
    """
    _check_size(size_px)
    if min_stars < 1 or not snr_min > 0:
        msg = f"need min_stars >= 1 and snr_min > 0, got {min_stars}, {snr_min}"
        raise ParameterError(msg)
    if image.shape != variance.shape or image.shape != mask.shape or image.ndim != 2:
        msg = f"image, variance, mask must be 2-d of one shape, got {image.shape}, " \
              f"{variance.shape}, {mask.shape}"  # fmt: skip
        raise ParameterError(msg)
    half = size_px // 2
    fwhm_fb = float(fallback_fwhm_px) if fallback_fwhm_px is not None else size_px / 8.0
    img = np.asarray(image, dtype=np.float64)
    var = np.asarray(variance, dtype=np.float64)
    fits, cuts, ws, where = [], [], [], []
    for y, x, _ in _candidates(img, var, np.asarray(mask), half, snr_min, bad_bits):
        cut = img[y - half : y + half + 1, x - half : x + half + 1]
        w = 1.0 / np.sqrt(var[y - half : y + half + 1, x - half : x + half + 1])
        above = np.count_nonzero(cut > cut.max() / 2)
        got = _fit_one(cut, w, max(2.0 * math.sqrt(above / math.pi), 1.0))
        if got is None:
            continue
        fits.append(got[0])
        cuts.append(cut)
        ws.append(w)
        where.append((y, x))
    keep = list(range(len(fits)))
    if keep:  # reject galaxies and blends: stars are the narrowest sources
        f = np.array([p[3] for p in fits])
        low = float(np.median(np.sort(f)[: max((len(f) + 1) // 2, 1)]))
        keep = [k for k in keep if f[k] <= 1.15 * low]
    if len(keep) >= 3:  # and outliers either way from the median of the rest
        f = np.array([fits[k][3] for k in keep])
        med = float(np.median(f))
        mad = max(1.4826 * float(np.median(np.abs(f - med))), 0.03 * med)
        keep = [k for k, fk in zip(keep, f, strict=True) if abs(fk - med) <= 3 * mad]
    if not keep:
        if warn:
            msg = (f"no star fit for a PSF (min_stars={min_stars}): using a Moffat of FWHM "
                   f"{fwhm_fb:.2f} px, beta 3")  # fmt: skip
            warnings.warn(msg, PsfFallbackWarning, stacklevel=2)
        return PSF(moffat_stamp(fwhm_fb, 3.0, size_px), fwhm_fb, 3.0, 0, True,
                   np.zeros((0, 4)))  # fmt: skip
    p_star = np.array([[fits[k][0], fits[k][1], fits[k][2]] for k in keep])
    fwhm0 = float(np.median([fits[k][3] for k in keep]))
    beta0 = float(np.median([fits[k][4] for k in keep]))
    fwhm, beta, q, errs = _fit_shared([cuts[k] for k in keep], [ws[k] for k in keep], p_star,
                                      fwhm0, beta0)  # fmt: skip
    stars = np.array([[where[k][1] + q[i, 1], where[k][0] + q[i, 2], q[i, 0], errs[i]]
                      for i, k in enumerate(keep)])  # fmt: skip
    logger.debug("PSF: %d stars, FWHM %.3f px, beta %.2f", len(keep), fwhm, beta)
    few = len(keep) < min_stars
    if few and warn:
        msg = (f"only {len(keep)} star(s) fit for a PSF (min_stars={min_stars}): the PSF "
               "is uncertain (psf_per_tile uses its neighbours' instead)")  # fmt: skip
        warnings.warn(msg, PsfFallbackWarning, stacklevel=2)
    return PSF(moffat_stamp(fwhm, beta, size_px), fwhm, beta, len(keep), few, stars)


# --- the lazy wrapper ------------------------------------------------------------------


def grid_of(ds: xr.Dataset) -> SkyGrid:
    """The :class:`SkyGrid` of a grid Dataset (its ``attrs["grid"]``)."""
    if "grid" not in ds.attrs:
        msg = "the Dataset has no 'grid' attribute: pass a Dataset made by lazysky.pipeline.stack"
        raise ParameterError(msg)
    d = dict(ds.attrs["grid"])
    return SkyGrid(**{**d, "shape": tuple(d["shape"])})


def _check_grid_dataset(ds: xr.Dataset, what: str) -> SkyGrid:
    missing = [k for k in ("image", "variance", "mask") if k not in ds.data_vars]
    if missing:
        msg = f"the {what} needs image, variance and mask on (y, x); missing {missing}"
        raise ParameterError(msg)
    grid = grid_of(ds)
    if ds.image.dims != ("y", "x") or ds.image.shape != grid.shape:
        msg = (f"the {what}'s image must be (y, x) of its grid's shape {grid.shape}, got "
               f"{ds.image.dims} {ds.image.shape}")  # fmt: skip
        raise ParameterError(msg)
    return grid


def _psf_block(
    image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any], *,
    origin: tuple[int, int], core: tuple[int, int, int, int], options: dict[str, Any],
) -> NDArray[np.float64]:  # fmt: skip
    """One tile (+ halo) → ``(1, 1, 1, 4 + 4 * MAX_STARS)``: fwhm, β, n, fallback, then
    the stars whose centre falls in the tile's core ``(y0, y1, x0, x1)``, grid pixels."""
    n = _N_PARAMS + 4 * MAX_STARS
    out = np.full((1, 1, 1, n), np.nan)
    if image.size == 0:
        return out
    two = [a.reshape(a.shape[-2:]) for a in (image, variance, mask)]
    p = estimate_psf(*two, warn=False, **options)
    out[0, 0, 0, :_N_PARAMS] = [p.fwhm_px, p.beta, p.n_stars, float(p.fallback)]
    st = p.stars.copy()
    st[:, 0] += origin[1]
    st[:, 1] += origin[0]
    y0, y1, x0, x1 = core
    inside = (st[:, 1] >= y0 - 0.5) & (st[:, 1] < y1 - 0.5)
    st = st[inside & (st[:, 0] >= x0 - 0.5) & (st[:, 0] < x1 - 0.5)]
    out[0, 0, 0, _N_PARAMS : _N_PARAMS + st.size] = st.ravel()
    return out


def _fill_block(
    own: NDArray[np.float64], every: NDArray[np.float64], *, size_px: int,
    min_stars: int, fallback_fwhm_px: float, tile: str,
) -> NDArray[np.float64]:  # fmt: skip
    """Fill a tile's PSF from the field where its own stars cannot be trusted.

    The field's PSF is the median FWHM and β over every star of every tile (each tile's
    fit weighted by its number of stars). A tile without enough stars takes the median of
    at least three tiles that have enough, else the field's, else the fallback Moffat. A
    tile with few stars (< 3 × ``min_stars``) whose FWHM is more than 25 % from the
    field's — a galaxy or a blend taken for a star — takes the field's too.
    """
    out = own.copy()
    if own.size == 0:
        return out
    params = every[..., :_N_PARAMS].reshape(-1, _N_PARAMS)
    some = params[(params[:, 2] >= 1) & np.isfinite(params[:, 0])]
    field = None
    if len(some) and some[:, 2].sum() >= min_stars:
        w = np.repeat(np.arange(len(some)), some[:, 2].astype(int))
        field = np.median(some[w, :2], axis=0)
    n_own = int(own[0, 0, 0, 2])
    if not own[0, 0, 0, 3]:
        fwhm = float(own[0, 0, 0, 0])
        if field is None or n_own >= 3 * min_stars or abs(fwhm / field[0] - 1.0) <= 0.25:
            return out
        out[0, 0, 0, :2] = field
        out[0, 0, 0, 3] = 1.0
        msg = (f"tile {tile}: its {n_own} star(s) give a FWHM of {fwhm:.2f} px, more than "
               f"25 % from the field's {field[0]:.2f} px over {int(some[:, 2].sum())} "
               "stars; using the field's")  # fmt: skip
        warnings.warn(msg, PsfFallbackWarning, stacklevel=2)
        return out
    good = params[(params[:, 3] == 0) & (params[:, 2] >= min_stars)]
    if len(good) >= 3:
        out[0, 0, 0, :2] = np.median(good[:, :2], axis=0)
        how = f"the median of {len(good)} tile(s) with enough stars"
    elif field is not None:
        out[0, 0, 0, :2] = field
        how = f"the median over {int(some[:, 2].sum())} stars of {len(some)} tile(s)"
    else:
        out[0, 0, 0, :2] = [fallback_fwhm_px, 3.0]
        how = f"a Moffat of FWHM {fallback_fwhm_px:.2f} px, beta 3 (no tile has enough)"
    msg = f"tile {tile}: only {n_own} star(s) for its PSF; using {how}"
    warnings.warn(msg, PsfFallbackWarning, stacklevel=2)
    return out


def _render_block(params: NDArray[np.float64], *, size_px: int) -> NDArray[np.float64]:
    if params.size == 0:
        return np.zeros((0, 0, size_px, size_px))
    return moffat_stamp(float(params[0, 0, 0, 0]), float(params[0, 0, 0, 1]), size_px)[
        None, None
    ]


#: The per-tile variables of :func:`psf_per_tile`, stored with a run's coadds.
PSF_VARIABLES = ("psf", "psf_fwhm", "psf_beta", "psf_n_stars", "psf_fallback", "stars")


def psf_per_tile(
    ds: xr.Dataset,
    *,
    size_px: int = 25,
    snr_min: float = 30.0,
    min_stars: int = 3,
    fallback_fwhm_px: float | None = None,
    bad_bits: int = DEFAULT_BAD_BITS,
) -> xr.Dataset:
    """The PSF of every tile of a grid Dataset, lazily: one ``psf-<tile>-<token>`` task each.

    Parameters
    ----------
    ds
        ``image``, ``variance``, ``mask`` on ``(y, x)``, one dask block per tile, with
        ``attrs["grid"]`` (e.g. :func:`lazysky.pipeline.stack`'s coadd).
    size_px, snr_min, min_stars, fallback_fwhm_px, bad_bits
        As in :func:`estimate_psf`. A tile with fewer than ``min_stars`` stars, or with
        few stars far from the field's PSF, takes the field's (see ``_fill_block``), with
        a :class:`PsfFallbackWarning` when computed.

    Returns
    -------
    xarray.Dataset
        ``psf (tile_y, tile_x, v, u)`` (stamps, sum 1), ``psf_fwhm``, ``psf_beta``,
        ``psf_n_stars``, ``psf_fallback`` ``(tile_y, tile_x)``, ``stars (tile_y, tile_x,
        star, field)`` (``x, y`` in grid pixels, ``flux``, ``flux_err``; NaN rows unused).

    Examples
    --------
    >>> psfs = psf_per_tile(coadd)  # doctest: +SKIP
    >>> psfs.psf_fwhm.compute()  # doctest: +SKIP
    """
    grid = _check_grid_dataset(ds, "image")
    _check_size(size_px)
    fb = float(fallback_fwhm_px) if fallback_fwhm_px is not None else size_px / 8.0
    options = {"size_px": int(size_px), "snr_min": float(snr_min), "min_stars": int(min_stars),
               "fallback_fwhm_px": fb, "bad_bits": int(bad_bits)}  # fmt: skip
    arrays = [da.asarray(ds[k].data) for k in ("image", "variance", "mask")]
    nty, ntx = grid.n_tiles
    h = int(size_px)
    n = _N_PARAMS + 4 * MAX_STARS
    rows = []
    for iy in range(nty):
        row = []
        for ix in range(ntx):
            tile = grid.tile_id(iy, ix)
            sy, sx = grid.tile_slices(tile)
            wy, wx = grid.tile_window(tile, h)
            (y0, y1), (x0, x1) = (wy.start, wy.stop), (wx.start, wx.stop)
            blocks = [a[y0:y1, x0:x1].rechunk(-1) for a in arrays]
            token = tokenize(*blocks, options, tile)
            row.append(da.map_blocks(
                _psf_block, *[b[None, None] for b in blocks], origin=(y0, x0),
                core=(sy.start, sy.stop, sx.start, sx.stop), options=options,
                chunks=((1,), (1,), (1,), (n,)), dtype=np.float64,
                meta=np.empty((0, 0, 0, 0)), name=f"psf-{tile}-{token}",
            ))  # fmt: skip
        rows.append(row)
    raw = da.concatenate([da.concatenate(r, axis=1) for r in rows], axis=0)
    every = raw.rechunk((nty, ntx, 1, n))
    filled_rows = []
    for iy in range(nty):
        row = []
        for ix in range(ntx):
            tile = grid.tile_id(iy, ix)
            own = raw.blocks[iy, ix]
            token = tokenize(own, every, options)
            row.append(da.map_blocks(
                _fill_block, own, every, size_px=options["size_px"], min_stars=min_stars,
                fallback_fwhm_px=fb, tile=tile, dtype=np.float64, chunks=own.chunks,
                meta=np.empty((0, 0, 0, 0)), name=f"psf-fill-{tile}-{token}",
            ))  # fmt: skip
        filled_rows.append(row)
    params = da.concatenate([da.concatenate(r, axis=1) for r in filled_rows], axis=0)
    stamps = params.map_blocks(
        _render_block, size_px=int(size_px), chunks=((1,) * nty, (1,) * ntx, (size_px,),
                                                      (size_px,)),
        dtype=np.float64, meta=np.empty((0, 0, 0, 0)), name=f"psf-stamp-{tokenize(params)}",
    )  # fmt: skip
    p = params[:, :, 0, :]
    out = xr.Dataset(
        {
            "psf": (("tile_y", "tile_x", "v", "u"), stamps),
            "psf_fwhm": (("tile_y", "tile_x"), p[:, :, 0]),
            "psf_beta": (("tile_y", "tile_x"), p[:, :, 1]),
            "psf_n_stars": (("tile_y", "tile_x"), p[:, :, 2].astype(np.int32)),
            "psf_fallback": (("tile_y", "tile_x"), p[:, :, 3].astype(bool)),
            "stars": (("tile_y", "tile_x", "star", "field"),
                      p[:, :, _N_PARAMS:].reshape(nty, ntx, MAX_STARS, 4)),
        },
        coords={"field": list(STAR_FIELDS)},
    )  # fmt: skip
    out["psf_fwhm"].attrs["units"] = "pixel"
    out.attrs["steps"] = [{"step": "psf", "model": "moffat", **options}]
    return out

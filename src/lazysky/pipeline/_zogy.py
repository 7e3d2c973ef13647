"""The ZOGY kernel (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27) on one in-memory tile.

Notation of the paper, with the science image's flux zero point ``F_n = 1`` and the
reference's ``F_r = flux_ratio`` (a source's flux in the reference over its flux in the
science image), ``σ_n², σ_r²`` the images' background variances, ``P̂`` Fourier
transforms of the PSFs (sum 1)::

    den   = σ_n² F_r² |P̂_r|² + σ_r² |P̂_n|²
    D̂     = (F_r P̂_r N̂ − P̂_n R̂) / √den                         (eq. 13)
    F_D   = F_r / √(σ_n² F_r² + σ_r²)                             (eq. 15)
    P̂_D   = F_r P̂_r P̂_n / (F_D √den)                            (eq. 14, sum 1)
    Ŝ     = F_D D̂ conj(P̂_D) = k̂_n N̂ − k̂_r R̂                     (eq. 17)
    k̂_n   = F_r² |P̂_r|² conj(P̂_n) / den,   k̂_r = F_r |P̂_n|² conj(P̂_r) / den
    V(S_N) = V_n ⊗ k_n²,  V(S_R) = V_r ⊗ k_r²                   (eqs. 26–27, source noise)
    V_ast = σ_x² [(∂_x S_N)² + (∂_x S_R)²] + σ_y² [(∂_y S_N)² + (∂_y S_R)²]  (eqs. 30–31)
    S_corr = S / √(V(S_N) + V(S_R) + V_ast)                       (eq. 25)

The image returned is ``D / F_D``: a point source of flux ``α`` in the science image (and
absent from the reference) appears in it as ``α P_D`` — its flux, summed over the pixels,
is ``α`` in the science image's units. Its variance is
``(V_n ⊗ k_Dn² + V_r ⊗ k_Dr²) / F_D²`` with ``k_Dn, k_Dr`` the real-space kernels that make
``D`` from ``N`` and ``R`` (per-pixel variances, pixel covariances ignored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import fft, ndimage

from lazysky.errors import ParameterError
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit

__all__ = ["DIFF_DTYPE", "ZogyResult", "partial_coverage", "zogy_pixels"]

DIFF_DTYPE = np.dtype(
    [("image", np.float32), ("variance", np.float32), ("score", np.float32), ("mask", MASK_DTYPE)]
)
_NODATA = int(MaskBit.NODATA)
_EDGE = int(MaskBit.EDGE)


@dataclass(frozen=True)
class ZogyResult:
    """``image`` (D in science units), ``variance`` (of image), ``score`` (S_corr),
    ``mask``, the difference's PSF ``psf`` (sum 1) and its flux zero point ``flux_d``."""

    image: NDArray[np.float64]
    variance: NDArray[np.float64]
    score: NDArray[np.float64]
    mask: NDArray[Any]
    psf: NDArray[np.float64]
    flux_d: float


def _otf(stamp: NDArray[Any], shape: tuple[int, int]) -> NDArray[np.complex128]:
    """The Fourier transform of a centred stamp placed at the origin of ``shape``."""
    s = np.asarray(stamp, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] % 2 == 0 or s.shape[1] % 2 == 0:
        msg = f"a PSF stamp must be 2-d with odd sides, got shape {s.shape}"
        raise ParameterError(msg)
    if s.shape[0] > shape[0] or s.shape[1] > shape[1]:
        msg = f"the PSF stamp {s.shape} is larger than the padded tile {shape}"
        raise ParameterError(msg)
    total = s.sum()
    if not (np.isfinite(total) and total > 0):
        msg = f"a PSF stamp must have a finite, positive sum, got {total}"
        raise ParameterError(msg)
    big = np.zeros(shape)
    big[: s.shape[0], : s.shape[1]] = s / total
    big = np.roll(big, (-(s.shape[0] // 2), -(s.shape[1] // 2)), axis=(0, 1))
    out: NDArray[np.complex128] = fft.rfft2(big)
    return out


def _conv(a_hat: NDArray[Any], k_hat: Any, shape: tuple[int, int]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = fft.irfft2(a_hat * k_hat, s=shape)
    return out


def zogy_pixels(
    new: NDArray[Any],
    ref: NDArray[Any],
    var_new: NDArray[Any],
    var_ref: NDArray[Any],
    psf_new: NDArray[Any],
    psf_ref: NDArray[Any],
    *,
    mask_new: NDArray[Any] | None = None,
    mask_ref: NDArray[Any] | None = None,
    flux_ratio: float = 1.0,
    sigma2_new: float | None = None,
    sigma2_ref: float | None = None,
    astrometric_sigma_px: tuple[float, float] = (0.0, 0.0),
    pad_px: int | None = None,
) -> ZogyResult:
    """The proper difference ``new − ref`` of one tile by ZOGY (module docstring).

    Parameters
    ----------
    new, ref
        Background-subtracted science and reference images on the same pixels.
    var_new, var_ref
        Their per-pixel variances (with the sources' Poisson noise); non-finite or ≤ 0
        (and NODATA in the masks) mark missing pixels, which count as zero signal and
        zero noise and come out NODATA.
    psf_new, psf_ref
        PSF stamps (odd sides, centred; normalised here).
    mask_new, mask_ref
        Mask bits, OR-ed into the output mask.
    flux_ratio
        ``F_r / F_n``: a source's flux in the reference over its flux in ``new``.
    sigma2_new, sigma2_ref
        Background variances for the filter (default: the median valid variance).
    astrometric_sigma_px
        ``(σ_x, σ_y)`` registration noise in pixels (ZOGY's V_ast).
    pad_px
        Zeros added on every side before the FFTs (default: the larger stamp's size), so
        nothing wraps around.

    Returns
    -------
    ZogyResult

    Examples
    --------
    >>> import numpy as np
    >>> from lazysky.pipeline.psf import moffat_stamp
    >>> rng = np.random.default_rng(0)
    >>> p = moffat_stamp(3.0, 3.0, 21)
    >>> new, ref = rng.normal(0, 1, (2, 64, 64))
    >>> new[22:43, 22:43] += 2000 * p                # a transient of flux 2000
    >>> r = zogy_pixels(new, ref, np.ones_like(new), np.ones_like(ref), p, p)
    >>> round(float(r.image[22:43, 22:43].sum()) / 2000, 1), float(r.score.max()) > 8
    (1.0, True)
    """
    if not (new.shape == ref.shape == var_new.shape == var_ref.shape) or new.ndim != 2:
        msg = (f"new, ref and their variances must be 2-d of one shape, got {new.shape}, "
               f"{ref.shape}, {var_new.shape}, {var_ref.shape}")  # fmt: skip
        raise ParameterError(msg)
    if not (np.isfinite(flux_ratio) and flux_ratio > 0):
        msg = f"flux_ratio must be finite and > 0, got {flux_ratio}"
        raise ParameterError(msg)
    sx, sy = (float(v) for v in astrometric_sigma_px)
    if not (sx >= 0 and sy >= 0):
        msg = f"astrometric_sigma_px must be (σx, σy) >= 0, got {astrometric_sigma_px}"
        raise ParameterError(msg)
    ny, nx = new.shape
    m_new = np.zeros(new.shape, MASK_DTYPE) if mask_new is None else np.asarray(mask_new)
    m_ref = np.zeros(new.shape, MASK_DTYPE) if mask_ref is None else np.asarray(mask_ref)
    vn = np.asarray(var_new, dtype=np.float64)
    vr = np.asarray(var_ref, dtype=np.float64)
    ok_n = np.isfinite(vn) & (vn > 0) & np.isfinite(new) & ((m_new & _NODATA) == 0)
    ok_r = np.isfinite(vr) & (vr > 0) & np.isfinite(ref) & ((m_ref & _NODATA) == 0)
    n_img = np.where(ok_n, new, 0.0)
    r_img = np.where(ok_r, ref, 0.0)
    vn = np.where(ok_n, vn, 0.0)
    vr = np.where(ok_r, vr, 0.0)
    fr = float(flux_ratio)
    s2n = float(sigma2_new) if sigma2_new is not None else _median_or_one(vn[ok_n])
    s2r = float(sigma2_ref) if sigma2_ref is not None else _median_or_one(vr[ok_r])
    size = max(max(np.shape(psf_new)), max(np.shape(psf_ref)))
    pad = size if pad_px is None else int(pad_px)
    shape = (fft.next_fast_len(ny + 2 * pad, real=True), fft.next_fast_len(nx + 2 * pad, real=True))

    def padded(a: NDArray[Any]) -> NDArray[np.complex128]:
        big = np.zeros(shape)
        big[pad : pad + ny, pad : pad + nx] = a
        out: NDArray[np.complex128] = fft.rfft2(big)
        return out

    pn, pr = _otf(psf_new, shape), _otf(psf_ref, shape)
    apn2, apr2 = np.abs(pn) ** 2, np.abs(pr) ** 2
    den = s2n * fr**2 * apr2 + s2r * apn2
    den = np.maximum(den, 1e-300 + 1e-12 * float(den.max()))
    sqden = np.sqrt(den)
    flux_d = fr / np.sqrt(s2n * fr**2 + s2r)
    kdn, kdr = fr * pr / sqden, pn / sqden  # D = kdn ⊗ N − kdr ⊗ R
    ksn, ksr = fr**2 * apr2 * np.conj(pn) / den, fr * apn2 * np.conj(pr) / den
    nh, rh, vnh, vrh = padded(n_img), padded(r_img), padded(vn), padded(vr)

    def sq_kernel(k_hat: NDArray[Any]) -> NDArray[np.complex128]:
        k = fft.irfft2(k_hat, s=shape)
        out: NDArray[np.complex128] = fft.rfft2(k * k)
        return out

    core = (slice(pad, pad + ny), slice(pad, pad + nx))
    # sums are taken in Fourier space: one inverse transform per output plane
    d = _conv(nh * kdn - rh * kdr, 1.0, shape)
    var_d = _conv(vnh * sq_kernel(kdn) + vrh * sq_kernel(kdr), 1.0, shape)
    v_s = _conv(vnh * sq_kernel(ksn) + vrh * sq_kernel(ksr), 1.0, shape)
    if sx > 0 or sy > 0:
        s_n, s_r = _conv(nh, ksn, shape), _conv(rh, ksr, shape)
        score = s_n - s_r
        for s_img in (s_n, s_r):
            gy, gx = np.gradient(s_img)
            v_s = v_s + sx**2 * gx**2 + sy**2 * gy**2
    else:
        score = _conv(nh * ksn - rh * ksr, 1.0, shape)
    image = d[core] / flux_d
    variance = np.maximum(var_d[core], 0.0) / flux_d**2
    v_s = v_s[core]
    tiny = 1e-10 * float(np.max(v_s)) if v_s.size else 0.0
    both = ok_n & ok_r
    corr = np.where(both & (v_s > tiny), score[core] / np.sqrt(np.maximum(v_s, tiny)), 0.0)
    mask = (m_new | m_ref).astype(MASK_DTYPE)
    missing = ~both
    mask[missing] |= MASK_DTYPE.type(_NODATA)
    if missing.any():  # near missing data a source is only partly seen: flag it
        near = ndimage.binary_dilation(missing, iterations=max(size // 2, 1)) & ~missing
        mask[near] |= MASK_DTYPE.type(_EDGE)
    image = np.where(both, image, 0.0)
    variance = np.where(both, variance, np.inf)
    p_d = np.real(fft.irfft2(fr * pr * pn / (flux_d * sqden), s=shape))
    p_d = np.roll(p_d, (size // 2, size // 2), axis=(0, 1))[:size, :size]
    return ZogyResult(image, variance, corr, mask, p_d, float(flux_d))


def _median_or_one(v: NDArray[np.float64]) -> float:
    return float(np.median(v)) if v.size else 1.0


def partial_coverage(
    count: NDArray[Any], image: NDArray[Any], variance: NDArray[Any], *, size_px: int,
    snr_min: float = 20.0,
) -> NDArray[np.bool_]:  # fmt: skip
    """Pixels within ``size_px // 4`` of a bright pixel (S/N ≥ ``snr_min``) of a coadd where
    fewer exposures contributed than elsewhere within ``size_px`` (a saturated or clipped
    core): there the coadd's PSF is that of a subset of its frames, not the tile's.

    Examples
    --------
    >>> c = np.full((9, 9), 3); c[4, 4] = 1
    >>> img = np.zeros((9, 9)); img[4, 4] = 100.0
    >>> int(partial_coverage(c, img, np.ones((9, 9)), size_px=9).sum())  # 2 px around it
    13
    """
    c = np.asarray(count)
    if c.size == 0 or not np.any(c):
        return np.zeros(c.shape, dtype=bool)
    v = np.asarray(variance, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    snr = np.where(ok, np.asarray(image, dtype=np.float64) / np.sqrt(np.where(ok, v, 1.0)), 0)
    fewer = (c < ndimage.maximum_filter(c, size=size_px)) & (c > 0) & (snr >= snr_min)
    if not fewer.any():
        return fewer
    out: NDArray[np.bool_] = ndimage.binary_dilation(fewer, iterations=max(size_px // 4, 1))
    return out

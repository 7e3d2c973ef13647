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
``(V_n ⊗ g_Dn + V_r ⊗ g_Dr) / F_D²`` with ``g = k · (k ⊛ c)`` for the real-space kernels
``k_Dn, k_Dr`` that make ``D`` from ``N`` and ``R`` (``g = k²`` for white noise).

**Correlated noise.** A resampled image's noise is correlated between neighbouring
pixels (bilinear interpolation averages neighbours: the per-pixel variance of a coadd is
about half of what its variance plane says, while sums over a few pixels keep the plane's
variance). ZOGY assumes white noise; here each image's noise covariance is modelled as
``Cov(i, j) = V(i) c(i − j)`` with ``V`` its variance plane and ``c`` a small measured
correlation stamp (:func:`correlation_sums`; ``c = δ`` for white noise), i.e. the noise
power spectrum ``σ² Ĉ(f)``. The filter then whitens the actual noise: ``σ_n²`` and
``σ_r²`` in ``den`` (and in ``F_D``) become ``σ_n² Ĉ_n`` and ``σ_r² Ĉ_r``, and every
propagated variance uses ``g = k · (k ⊛ c)`` in place of ``k²`` (exact for a variance
that is constant over the kernel's reach). With ``c = δ`` all of this is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import fft, ndimage

from lazysky.errors import ParameterError
from lazysky.pipeline._mask import MASK_DTYPE, MaskBit

__all__ = [
    "DIFF_DTYPE",
    "ZogyResult",
    "correlation_from_sums",
    "correlation_sums",
    "difference_psf",
    "output_mask",
    "partial_coverage",
    "zogy_pixels",
]

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
    corr_new: NDArray[Any] | None = None,
    corr_ref: NDArray[Any] | None = None,
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
    corr_new, corr_ref
        Noise correlation stamps ``c`` (odd sides, centred; ``c[centre]`` is the per-pixel
        variance over the variance plane; default: white noise). See the module docstring
        and :func:`correlation_from_sums`.

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
    if not (np.isfinite(flux_ratio) and flux_ratio > 0):
        msg = f"flux_ratio must be finite and > 0, got {flux_ratio}"
        raise ParameterError(msg)
    sx, sy = (float(v) for v in astrometric_sigma_px)
    if not (sx >= 0 and sy >= 0):
        msg = f"astrometric_sigma_px must be (σx, σy) >= 0, got {astrometric_sigma_px}"
        raise ParameterError(msg)
    ny, nx = new.shape
    n_img, r_img, vn, vr, m_new, m_ref, ok_n, ok_r = _inputs(
        new, ref, var_new, var_ref, mask_new, mask_ref)  # fmt: skip
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
    cn, cr = _spectrum(corr_new, shape, "corr_new"), _spectrum(corr_ref, shape, "corr_ref")
    apn2, apr2 = np.abs(pn) ** 2, np.abs(pr) ** 2
    den = s2n * cn * fr**2 * apr2 + s2r * cr * apn2
    den = np.maximum(den, 1e-300 + 1e-12 * float(den.max()))
    sqden = np.sqrt(den)
    flux_d = fr / np.sqrt(s2n * float(cn[0, 0]) * fr**2 + s2r * float(cr[0, 0]))
    kdn, kdr = fr * pr / sqden, pn / sqden  # D = kdn ⊗ N − kdr ⊗ R
    ksn, ksr = fr**2 * apr2 * np.conj(pn) / den, fr * apn2 * np.conj(pr) / den
    nh, rh, vnh, vrh = padded(n_img), padded(r_img), padded(vn), padded(vr)

    def sq_kernel(k_hat: NDArray[Any], c_hat: NDArray[Any] | None) -> NDArray[np.complex128]:
        """``g = k · (k ⊛ c)``: what a variance map is convolved with (``k²`` if white)."""
        k = fft.irfft2(k_hat, s=shape)
        kc = k if c_hat is None else fft.irfft2(k_hat * c_hat, s=shape)
        out: NDArray[np.complex128] = fft.rfft2(k * kc)
        return out

    core = (slice(pad, pad + ny), slice(pad, pad + nx))
    # sums are taken in Fourier space: one inverse transform per output plane
    d = _conv(nh * kdn - rh * kdr, 1.0, shape)
    cn_k = None if corr_new is None else cn
    cr_k = None if corr_ref is None else cr
    var_d = _conv(vnh * sq_kernel(kdn, cn_k) + vrh * sq_kernel(kdr, cr_k), 1.0, shape)
    v_s = _conv(vnh * sq_kernel(ksn, cn_k) + vrh * sq_kernel(ksr, cr_k), 1.0, shape)
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
    mask = output_mask(m_new, m_ref, both, reach_px=max(size // 2, 1))
    image = np.where(both, image, 0.0)
    variance = np.where(both, variance, np.inf)
    p_d = difference_psf(psf_new, psf_ref, flux_ratio=fr, sigma2_new=s2n, sigma2_ref=s2r,
                         corr_new=corr_new, corr_ref=corr_ref)  # fmt: skip
    return ZogyResult(image, variance, corr, mask, p_d, float(flux_d))


def difference_psf(
    psf_new: NDArray[Any], psf_ref: NDArray[Any], *, flux_ratio: float, sigma2_new: float,
    sigma2_ref: float, corr_new: NDArray[Any] | None = None,
    corr_ref: NDArray[Any] | None = None,
) -> NDArray[np.float64]:  # fmt: skip
    """``P_D``, the PSF of the difference image (sum 1), as a stamp of the larger input
    stamp's size: ``F_r P̂_r P̂_n / (F_D √den)`` (module docstring), on a grid four stamps
    wide so that nothing wraps around.

    Examples
    --------
    >>> from lazysky.pipeline.psf import moffat_stamp
    >>> p = difference_psf(moffat_stamp(2.5, 3.0, 21), moffat_stamp(3.5, 3.0, 21),
    ...                    flux_ratio=1.0, sigma2_new=1.0, sigma2_ref=1.0)
    >>> p.shape, round(float(p.sum()), 2), bool(p[10, 10] == p.max())
    ((21, 21), 1.0, True)
    """
    size = max(max(np.shape(psf_new)), max(np.shape(psf_ref)))
    n = fft.next_fast_len(4 * size, real=True)
    shape = (n, n)
    pn, pr = _otf(psf_new, shape), _otf(psf_ref, shape)
    cn, cr = _spectrum(corr_new, shape, "corr_new"), _spectrum(corr_ref, shape, "corr_ref")
    fr, s2n, s2r = float(flux_ratio), float(sigma2_new), float(sigma2_ref)
    den = s2n * cn * fr**2 * np.abs(pr) ** 2 + s2r * cr * np.abs(pn) ** 2
    den = np.maximum(den, 1e-300 + 1e-12 * float(den.max()))
    flux_d = fr / np.sqrt(s2n * float(cn[0, 0]) * fr**2 + s2r * float(cr[0, 0]))
    p_d = np.real(fft.irfft2(fr * pr * pn / (flux_d * np.sqrt(den)), s=shape))
    out: NDArray[np.float64] = np.roll(p_d, (size // 2, size // 2), axis=(0, 1))[:size, :size]
    return out


def _spectrum(corr: NDArray[Any] | None, shape: tuple[int, int], what: str) -> NDArray[Any]:
    """``Ĉ(f)`` of a correlation stamp on the rfft grid of ``shape`` (1 when white).

    Made symmetric (``c(δ) = c(−δ)`` for a covariance) and floored at 2 % of its peak, so
    a noisy estimate never makes the filter divide by ~0.
    """
    if corr is None:
        return np.ones((1, 1))
    c = np.asarray(corr, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] % 2 == 0 or c.shape[1] % 2 == 0 or not np.all(np.isfinite(c)):
        msg = f"{what} must be a finite 2-d stamp with odd sides, got shape {c.shape}"
        raise ParameterError(msg)
    if c.shape[0] > shape[0] or c.shape[1] > shape[1]:
        msg = f"{what} {c.shape} is larger than the padded tile {shape}"
        raise ParameterError(msg)
    if not c[c.shape[0] // 2, c.shape[1] // 2] > 0:
        msg = f"{what}: the centre of a correlation stamp (a variance ratio) must be > 0"
        raise ParameterError(msg)
    c = 0.5 * (c + c[::-1, ::-1])
    big = np.zeros(shape)
    big[: c.shape[0], : c.shape[1]] = c
    big = np.roll(big, (-(c.shape[0] // 2), -(c.shape[1] // 2)), axis=(0, 1))
    spec = np.real(fft.rfft2(big))
    return np.maximum(spec, 0.02 * float(spec.max()))


def correlation_sums(
    image: NDArray[Any], variance: NDArray[Any], bad: NDArray[np.bool_], *,
    core: tuple[slice, slice], lag: int = 1, clip: float = 3.0, grow_px: int = 4,
) -> NDArray[np.float64]:  # fmt: skip
    """Sums for the noise correlation of one window: ``[Σ r_i r_j, count]`` per lag.

    ``r = image / √variance`` on good pixels away from sources (``|r| > clip``, or a 5×5
    mean of ``r`` above ``0.2 clip``, grown by ``grow_px``). A pair ``(i, i + δ)`` counts
    when ``i`` lies in ``core``, so sums over tiles (each cut with a halo of
    ``lag + grow_px + 2``) equal the whole image's. Reduce with
    :func:`correlation_from_sums`.

    Returns
    -------
    numpy.ndarray
        ``(2, 2 lag + 1, 2 lag + 1)``.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> img = rng.normal(0, 1, (200, 200))
    >>> s = correlation_sums(img, np.ones_like(img), np.zeros(img.shape, bool),
    ...                      core=(slice(0, 200), slice(0, 200)))
    >>> c = correlation_from_sums(s)
    >>> round(float(c[1, 1]), 1), bool(abs(c[0, 1]) < 0.02)
    (1.0, True)
    """
    v = np.asarray(variance, dtype=np.float64)
    good = ~np.asarray(bad) & np.isfinite(v) & (v > 0) & np.isfinite(image)
    r = np.where(good, np.asarray(image, dtype=np.float64) / np.sqrt(np.where(good, v, 1.0)), 0)
    src = (np.abs(r) > clip) | (ndimage.uniform_filter(r, 5, mode="constant") > 0.2 * clip)
    if grow_px > 0 and src.any():
        src = ndimage.binary_dilation(src, iterations=grow_px)
    good &= ~src
    r = np.where(good, r, 0.0)
    n = 2 * lag + 1
    out = np.zeros((2, n, n))
    ny, nx = r.shape
    y0, y1 = core[0].start or 0, ny if core[0].stop is None else core[0].stop
    x0, x1 = core[1].start or 0, nx if core[1].stop is None else core[1].stop
    for dy in range(-lag, lag + 1):
        for dx in range(-lag, lag + 1):
            # first pixels: the core, shifted partners inside the window
            a0, a1 = max(y0, -dy), min(y1, ny - dy)
            b0, b1 = max(x0, -dx), min(x1, nx - dx)
            if a1 <= a0 or b1 <= b0:
                continue
            ra, ga = r[a0:a1, b0:b1], good[a0:a1, b0:b1]
            rb = r[a0 + dy : a1 + dy, b0 + dx : b1 + dx]
            gb = good[a0 + dy : a1 + dy, b0 + dx : b1 + dx]
            both = ga & gb
            out[0, dy + lag, dx + lag] = float(np.sum(ra * rb * both))
            out[1, dy + lag, dx + lag] = float(np.sum(both))
    return out


def correlation_from_sums(sums: NDArray[Any], *, min_pairs: int = 1000) -> NDArray[np.float64]:
    """The correlation stamp ``c`` from summed :func:`correlation_sums` (white noise, a
    centred 1, when fewer than ``min_pairs`` pairs were counted at some lag, or when the
    image has no noise).

    ``c[centre]`` is the per-pixel variance over the variance plane, ``Σ c`` the variance
    of a sum over a few pixels over the plane's (1 when the plane is right for sums).
    """
    s = np.asarray(sums, dtype=np.float64)
    n = s.shape[-1]
    white = np.zeros((n, n))
    white[n // 2, n // 2] = 1.0
    if np.min(s[1]) < min_pairs or not s[0, n // 2, n // 2] > 0:
        return white  # too few sky pixels, or no noise at all (a noiseless image)
    c = s[0] / s[1]
    out: NDArray[np.float64] = 0.5 * (c + c[::-1, ::-1])
    return out


def _inputs(
    new: NDArray[Any], ref: NDArray[Any], var_new: NDArray[Any], var_ref: NDArray[Any],
    mask_new: NDArray[Any] | None, mask_ref: NDArray[Any] | None,
) -> tuple[NDArray[Any], ...]:  # fmt: skip
    """A pair's pixels for a difference kernel: ``(new, ref, var_new, var_ref, mask_new,
    mask_ref, ok_new, ok_ref)`` with missing pixels (non-finite, variance ≤ 0, NODATA)
    set to zero signal and zero noise."""
    if not (new.shape == ref.shape == var_new.shape == var_ref.shape) or new.ndim != 2:
        msg = (f"new, ref and their variances must be 2-d of one shape, got {new.shape}, "
               f"{ref.shape}, {var_new.shape}, {var_ref.shape}")  # fmt: skip
        raise ParameterError(msg)
    m_new = np.zeros(new.shape, MASK_DTYPE) if mask_new is None else np.asarray(mask_new)
    m_ref = np.zeros(new.shape, MASK_DTYPE) if mask_ref is None else np.asarray(mask_ref)
    vn = np.asarray(var_new, dtype=np.float64)
    vr = np.asarray(var_ref, dtype=np.float64)
    ok_n = np.isfinite(vn) & (vn > 0) & np.isfinite(new) & ((m_new & _NODATA) == 0)
    ok_r = np.isfinite(vr) & (vr > 0) & np.isfinite(ref) & ((m_ref & _NODATA) == 0)
    return (np.where(ok_n, new, 0.0), np.where(ok_r, ref, 0.0), np.where(ok_n, vn, 0.0),
            np.where(ok_r, vr, 0.0), m_new, m_ref, ok_n, ok_r)  # fmt: skip


def output_mask(
    m_new: NDArray[Any], m_ref: NDArray[Any], both: NDArray[np.bool_], *, reach_px: int
) -> NDArray[Any]:
    """The difference's mask: the inputs' bits, NODATA where either has no data, EDGE within
    ``reach_px`` of that (near missing data a source is only partly seen)."""
    mask = (m_new | m_ref).astype(MASK_DTYPE)
    missing = ~both
    mask[missing] |= MASK_DTYPE.type(_NODATA)
    if missing.any():
        near = ndimage.binary_dilation(missing, iterations=reach_px) & ~missing
        mask[near] |= MASK_DTYPE.type(_EDGE)
    return mask


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

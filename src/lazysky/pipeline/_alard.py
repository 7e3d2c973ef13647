"""Alard & Lupton (1998, ApJ 503, 325) kernel-fitting difference on one in-memory tile.

The sharper image is convolved with a kernel ``K`` fitted by linear least squares so
that it matches the other one: ``K = Σ_j a_j B_j`` over a basis of Gaussians times
polynomials (Alard & Lupton's, with widths set by the two PSFs), plus a constant
differential background. With the reference the sharper (the usual case for a deep
coadd)::

    R ⊗ K + b ≈ N,    D = N − R ⊗ K − b,    F_r / F_n = 1 / Σ K,    P_D = P_n

and with the science image the sharper ``N ⊗ K + b ≈ R``, ``D = (N ⊗ K − R + b) / Σ K``
(science units again) and ``P_D = P_r``. The fit uses every good pixel of the tile
(+ halo) away from its edge and from flagged pixels (the sources constrain the kernel,
the sky the background), weighted by the inverse variance, with the noise of the
convolved image taken off the normal equations (otherwise its noise, on the many sky
pixels, shrinks the kernel: errors in variables), and is repeated up to twice
without the pixels that deviate by more than 5σ and by more than half their model
(sources in one image only: transients, cosmic rays).

The score is the matched filter of ``D`` with ``P_D`` over its predicted noise, with the
images' measured noise correlation (``c``, as in :mod:`lazysky.pipeline._zogy`) and the
registration noise (ZOGY's ``V_ast``, from the two terms' gradients)::

    S = N ⊛ k_n − R ⊛ k_r,   V(S) = V_n ⊗ g(k_n) + V_r ⊗ g(k_r) + V_ast,
    g(k) = k · (k ⊛ c)

The kernel is constant within a tile (tiles are the spatial variation). Unlike ZOGY the
result is not the optimal statistic, and a tiled difference is not bit-equal to a
whole-image one (each tile fits its own kernel).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import fft, ndimage, signal

from lazysky.errors import ParameterError
from lazysky.pipeline._mask import MaskBit
from lazysky.pipeline._zogy import ZogyResult, _inputs, _spectrum, output_mask

__all__ = ["alard_lupton_pixels", "basis", "broader", "moment_sigma"]

DEGREES = (4, 3, 2)


def moment_sigma(stamp: NDArray[Any]) -> float:
    """The Gaussian-equivalent σ (pixels) of a PSF stamp from its second moments."""
    s = np.clip(np.asarray(stamp, dtype=np.float64), 0, None)
    total = float(s.sum())
    if not total > 0:
        return 1.0
    yy, xx = np.indices(s.shape)
    cy, cx = (s * yy).sum() / total, (s * xx).sum() / total
    var = ((s * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum() / total) / 2.0
    return math.sqrt(max(var, 0.01))


def broader(psf_new: NDArray[Any], psf_ref: NDArray[Any]) -> str:
    """``"new"`` when the science PSF is the broader (the reference gets convolved), else
    ``"ref"``. Ties count as ``"new"``."""
    return "new" if moment_sigma(psf_new) >= moment_sigma(psf_ref) else "ref"


def basis(sigma_match: float, half: int) -> NDArray[np.float64]:
    """The kernel basis ``(n, 2 half + 1, 2 half + 1)``: Gaussians of widths
    ``σ_k × (0.5, 1, 2)`` (``σ_k`` the matching width) times ``x^i y^j``, ``i + j ≤`` 4, 3, 2.

    Examples
    --------
    >>> basis(1.5, 7).shape
    (31, 15, 15)
    """
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    out = []
    for scale, deg in zip((0.5, 1.0, 2.0), DEGREES, strict=True):
        s = max(scale * sigma_match, 0.4)
        g = np.exp(-(xx**2 + yy**2) / (2 * s * s))
        for i in range(deg + 1):
            for j in range(deg + 1 - i):
                b = g * (xx / half) ** i * (yy / half) ** j
                out.append(b / np.sqrt((b * b).sum()))
    return np.array(out)


def _g_kernel(k: NDArray[Any], c_hat: NDArray[Any] | None, shape: tuple[int, int]) -> Any:
    """``rfft2`` of ``g = k · (k ⊛ c)`` for a centred kernel stamp, on ``shape``."""
    big = np.zeros(shape)
    big[: k.shape[0], : k.shape[1]] = k
    big = np.roll(big, (-(k.shape[0] // 2), -(k.shape[1] // 2)), axis=(0, 1))
    kc = big if c_hat is None else fft.irfft2(fft.rfft2(big) * c_hat, s=shape)
    return fft.rfft2(big * kc)


def alard_lupton_pixels(
    new: NDArray[Any],
    ref: NDArray[Any],
    var_new: NDArray[Any],
    var_ref: NDArray[Any],
    psf_new: NDArray[Any],
    psf_ref: NDArray[Any],
    *,
    mask_new: NDArray[Any] | None = None,
    mask_ref: NDArray[Any] | None = None,
    corr_new: NDArray[Any] | None = None,
    corr_ref: NDArray[Any] | None = None,
    astrometric_sigma_px: tuple[float, float] = (0.0, 0.0),
    flux_ratio: float | None = None,
) -> ZogyResult:
    """The difference ``new − ref`` of one tile by Alard & Lupton's kernel fit (module
    docstring); the same outputs as :func:`~lazysky.pipeline._zogy.zogy_pixels`, with
    ``flux_d`` = the fitted ``F_r / F_n`` (``1 / Σ K`` or ``Σ K``). ``flux_ratio``, an
    estimate of ``F_r / F_n`` (e.g. from matched stars), lets the first fit leave out the
    sources present in one image only.

    Examples
    --------
    >>> from lazysky.pipeline.psf import moffat_stamp
    >>> rng = np.random.default_rng(0)
    >>> pn, pr = moffat_stamp(3.5, 3.0, 25), moffat_stamp(2.5, 3.0, 25)
    >>> new, ref = rng.normal(0, 1, (2, 160, 160))
    >>> for y, x in ((40, 40), (40, 120), (120, 40), (120, 120)):  # stars in both
    ...     new[y - 12 : y + 13, x - 12 : x + 13] += 5e4 * pn
    ...     ref[y - 12 : y + 13, x - 12 : x + 13] += 5e4 * pr
    >>> new[68:93, 68:93] += 2000 * pn                # a transient of flux 2000
    >>> one = np.ones_like(new)
    >>> r = alard_lupton_pixels(new, ref, one, one, pn, pr)
    >>> round(float(r.image[68:93, 68:93].sum()) / 2000, 1), bool(r.score[80, 80] > 8)
    (1.0, True)
    """
    ny, nx = new.shape
    n_img, r_img, vn, vr, m_new, m_ref, ok_n, ok_r = _inputs(
        new, ref, var_new, var_ref, mask_new, mask_ref)  # fmt: skip
    both = ok_n & ok_r
    pn = np.asarray(psf_new, dtype=np.float64)
    pr = np.asarray(psf_ref, dtype=np.float64)
    pn, pr = pn / pn.sum(), pr / pr.sum()
    size = max(pn.shape[0], pr.shape[0])
    convolve_ref = broader(pn, pr) == "new"
    # the sharper image (src) is matched to the broader one (dst)
    src, dst, v_src, v_dst = (r_img, n_img, vr, vn) if convolve_ref else (n_img, r_img, vn, vr)
    s_src, s_dst = (moment_sigma(pr), moment_sigma(pn)) if convolve_ref else (
        moment_sigma(pn), moment_sigma(pr))  # fmt: skip
    sigma_match = math.sqrt(max(s_dst**2 - s_src**2, 0.25))
    half = int(min(max(math.ceil(3 * 2 * sigma_match), 3), size // 2))
    bas = basis(sigma_match, half)
    cols = np.array([signal.fftconvolve(src, b[::-1, ::-1], mode="same") for b in bas])
    # fit on the good pixels away from the window's edge, from flagged pixels and from
    # changed sources (the steady sources' light constrains the kernel, the sky the
    # background)
    usable = both & ndimage.binary_erosion(both, iterations=half, border_value=0)
    bad_bits = int(MaskBit.SAT | MaskBit.BAD | MaskBit.CR)
    flagged = ((m_new | m_ref) & bad_bits) != 0
    if flagged.any():
        usable &= ~ndimage.binary_dilation(flagged, iterations=half)
    n_par = len(bas) + 1
    w = 1.0 / np.maximum(v_dst + v_src, 1e-30)
    coef = np.zeros(n_par)
    def _finish(kernel: NDArray[np.float64], bg: float) -> ZogyResult:
        ksum = float(kernel.sum())
        if not (np.isfinite(ksum) and ksum > 0):
            msg = f"the Alard & Lupton kernel fit failed (kernel sum {ksum}): too few stars?"
            raise ParameterError(msg)
        conv = signal.fftconvolve(src, kernel[::-1, ::-1], mode="same")
        if convolve_ref:
            d = n_img - conv - bg
            scale, flux_ratio, p_d = 1.0, 1.0 / ksum, pn
            k_new, k_ref = _delta(kernel.shape), kernel  # D = δ ⊗ N − K ⊗ R
        else:
            d = (conv + bg - r_img) / ksum
            scale, flux_ratio, p_d = 1.0 / ksum, ksum, pr
            k_new, k_ref = kernel, _delta(kernel.shape)
        pad = size + half
        shape = (fft.next_fast_len(ny + 2 * pad, real=True),
                 fft.next_fast_len(nx + 2 * pad, real=True))
        cn, cr = _spectrum(corr_new, shape, "corr_new"), _spectrum(corr_ref, shape, "corr_ref")
        cn_k = None if corr_new is None else cn
        cr_k = None if corr_ref is None else cr
        core = (slice(pad, pad + ny), slice(pad, pad + nx))

        def padded(a: NDArray[Any]) -> Any:
            big = np.zeros(shape)
            big[core] = a
            return fft.rfft2(big)

        vnh, vrh = padded(vn), padded(vr)
        var_d = fft.irfft2(vnh * _g_kernel(k_new, cn_k, shape)
                           + vrh * _g_kernel(k_ref, cr_k, shape), s=shape)[core] * scale**2
        # matched filter with P_D: S = N ⊛ (k_new ⊛ P_D) − R ⊛ (k_ref ⊛ P_D), scaled
        pdf = p_d[::-1, ::-1]
        kn = signal.fftconvolve(k_new, pdf) * scale
        kr = signal.fftconvolve(k_ref, pdf) * scale
        score = signal.fftconvolve(d, pdf, mode="same")
        v_s = fft.irfft2(vnh * _g_kernel(kn, cn_k, shape) + vrh * _g_kernel(kr, cr_k, shape),
                         s=shape)[core]  # fmt: skip
        sx, sy = (float(v) for v in astrometric_sigma_px)
        if sx > 0 or sy > 0:  # registration noise, as ZOGY's V_ast (eqs. 30-31)
            for img, k in ((n_img, kn), (r_img, kr)):
                gy, gx = np.gradient(signal.fftconvolve(img, k, mode="same"))
                v_s = v_s + sx**2 * gx**2 + sy**2 * gy**2
        tiny = 1e-10 * float(np.max(v_s)) if v_s.size else 0.0
        corr = np.where(both & (v_s > tiny), score / np.sqrt(np.maximum(v_s, tiny)), 0.0)
        mask = output_mask(m_new, m_ref, both, reach_px=max(size // 2, half))
        image = np.where(both, d, 0.0)
        variance = np.where(both, np.maximum(var_d, 0.0), np.inf)
        return ZogyResult(image, variance, corr, mask, p_d, float(flux_ratio))

    # sources present in one image only (transients, variables, cosmic rays) would pull
    # the kernel (a transient in a convolved science image drags its sum down): leave
    # out every source whose flux ratio between the images is off the common one
    ratio_sd: float | None = None
    if flux_ratio is not None and np.isfinite(flux_ratio) and flux_ratio > 0:
        ratio_sd = 1.0 / flux_ratio if convolve_ref else float(flux_ratio)
    steady, changed = _sources(src, dst, v_src, v_dst, both, ratio_sd)
    fit = usable & ~ndimage.binary_dilation(changed, iterations=2)
    if (fit & steady).sum() < 20 * n_par:  # too few stars in this tile: a matching Gaussian
        kernel = _gauss(sigma_match, half) * (1.0 if ratio_sd is None else ratio_sd)
        return _finish(kernel, 0.0)
    # errors in variables: the columns carry the convolved image's noise, which would
    # shrink the kernel towards 0 (most pixels are sky); their expected noise products,
    # E[col_i col_j] = v Σ_u b_i(u) (b_j ⊛ c)(u), come off the normal matrix
    c_src = corr_ref if convolve_ref else corr_new
    flat = bas.reshape(len(bas), -1)
    if c_src is None:
        gram = flat @ flat.T
    else:
        cs = np.asarray(c_src, dtype=np.float64)
        bc = np.array([signal.fftconvolve(b, cs, mode="same") for b in bas])
        gram = flat @ bc.reshape(len(bas), -1).T
        gram = 0.5 * (gram + gram.T)
    noise_gram = np.zeros((n_par, n_par))
    for _ in range(3):
        a = np.concatenate([cols[:, fit], np.ones((1, int(fit.sum())))])
        wf = w[fit]
        noise_gram[:-1, :-1] = float(np.sum(wf * v_src[fit])) * gram
        # solved in the eigenbasis of the corrected system: directions that the noise
        # correction leaves without signal (≤ 1e-6 of the largest) are dropped
        lam, vec = np.linalg.eigh((a * wf) @ a.T - noise_gram)
        keep_dirs = lam > 1e-6 * lam[-1]
        rhs = vec.T @ ((a * wf) @ dst[fit])
        coef = vec[:, keep_dirs] @ (rhs[keep_dirs] / lam[keep_dirs])
        model = np.tensordot(coef[:-1], cols, axes=1) + coef[-1]
        keep = fit & ~_outliers(dst - coef[-1], model - coef[-1], w)
        if keep.sum() == fit.sum() or keep.sum() < 20 * n_par:
            break
        fit = keep & ~ndimage.binary_dilation(fit & ~keep, iterations=2)
    kernel = np.tensordot(coef[:-1], bas, axes=1)
    return _finish(kernel, float(coef[-1]))


def _outliers(data: NDArray[Any], model: NDArray[Any], w: NDArray[Any]) -> NDArray[np.bool_]:
    """Pixels off their model by 5σ *and* by half the model: a source in one image only
    (a transient, a cosmic ray) is one; a bright star matched to a few per cent, many σ
    off at its core, is not (those pixels are what constrain the kernel)."""
    resid = np.abs(data - model) / np.sqrt(1.0 / w + (0.1 * np.abs(model)) ** 2)
    out: NDArray[np.bool_] = resid >= 5.0
    return out


def _sources(
    src: NDArray[Any], dst: NDArray[Any], v_src: NDArray[Any], v_dst: NDArray[Any],
    both: NDArray[np.bool_], ratio: float | None, *, snr: float = 5.0, tol: float = 0.3,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:  # fmt: skip
    """``(steady, changed)``: the footprints (3×3-smoothed S/N ≥ ``snr`` in either image,
    grown by 2 px) whose flux ratio ``Σ dst / Σ src`` is within ``tol`` of ``ratio``
    (default: the flux-weighted median of all footprints), and the others (in one image
    only, or changed: transients, variables, cosmic rays)."""
    def detect(img: NDArray[Any], v: NDArray[Any]) -> NDArray[np.bool_]:
        sm = ndimage.uniform_filter(np.where(both, img, 0.0), 3)
        sv = ndimage.uniform_filter(np.where(both, v, 0.0), 3) / 9.0
        out: NDArray[np.bool_] = both & (sm > snr * np.sqrt(np.maximum(sv, 1e-30)))
        return out

    det = ndimage.binary_dilation(detect(src, v_src) | detect(dst, v_dst), iterations=2)
    labels, n = ndimage.label(det)
    none = np.zeros(src.shape, bool)
    if n == 0:
        return none, none
    idx = np.arange(1, n + 1)
    fs = np.asarray(ndimage.sum_labels(np.where(both, src, 0.0), labels, idx))
    fd = np.asarray(ndimage.sum_labels(np.where(both, dst, 0.0), labels, idx))
    rat = np.where(fs > 0, fd / np.where(fs > 0, fs, 1.0), np.inf)
    if ratio is None or not (np.isfinite(ratio) and ratio > 0):
        ok = np.isfinite(rat) & (fs > 0)
        if not ok.any():
            return none, det
        order = np.argsort(rat[ok])
        cum = np.cumsum(fs[ok][order])
        ratio = float(rat[ok][order][np.searchsorted(cum, cum[-1] / 2)])
    good = np.abs(rat / ratio - 1.0) <= tol
    return np.isin(labels, idx[good]), np.isin(labels, idx[~good])


def _gauss(sigma: float, half: int) -> NDArray[np.float64]:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    g = np.exp(-(xx**2 + yy**2) / (2 * sigma * sigma))
    out: NDArray[np.float64] = g / g.sum()
    return out


def _delta(shape: tuple[int, ...]) -> NDArray[np.float64]:
    k = np.zeros(shape)
    k[shape[0] // 2, shape[1] // 2] = 1.0
    return k

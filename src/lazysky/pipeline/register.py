"""Register frames without a (good) WCS to a reference frame by matching their stars.

Three small numpy steps and one composition:

* :func:`find_stars` — sep on the background-subtracted image, with a Gaussian matched
  filter (faint, broad stars of short exposures stand out only after smoothing), compact
  and round sources only, windowed centroids (``sep.winpos``), brightest first.
* :func:`match_stars` — a rotation-, shift- and scale-tolerant matcher: every triangle of
  the brightest stars of each frame is described by its two side ratios (invariant under
  similarity); triangles of the frame and of the reference with the same ratios
  (``scipy.spatial.cKDTree``) vote for the correspondence of their vertices; every pair
  of the most-voted correspondences proposes a similarity transform, the one that brings
  most stars onto a reference star wins (deterministic: every pair is tried, no random
  sampling); then an affine least-squares fit on the nearest neighbours, iterated with
  3σ clipping.
* :func:`register_frames` — each frame's stars matched to the reference's, returning a
  :class:`Registration` per frame: the affine transform (frame pixel → reference pixel),
  the matched count, the rms residual in pixels and a WCS of the frame expressed on the
  reference's pixel grid. When the reference has a celestial WCS, that WCS is the
  reference's (its linear part) composed with the transform; when it has none, it is a
  *pseudo-celestial* TAN WCS (``WCSNAME = 'lazysky pseudo-celestial'``), tangent point
  ``(pseudo_ra_deg, pseudo_dec_deg)`` at the reference's centre, north up, east left,
  ``pixel_scale_arcsec`` per reference pixel (default 1″). Positions are then
  only relative, but resample and stack work unchanged.

No new dependency: sep, scipy and numpy already do all the work (the astroalign package
implements the same idea but would pull in scikit-image for ~150 lines of code).

Examples
--------
>>> regs = register_frames([img_ref, img_a, img_b], names=["ref", "a", "b"])  # doctest: +SKIP
>>> regs[1].n_matched, round(regs[1].rms_px, 2)  # doctest: +SKIP
(48, 0.07)
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.wcs import WCS, FITSFixedWarning
from numpy.typing import NDArray

from lazysky.errors import LazySkyError, ParameterError

__all__ = [
    "Registration",
    "RegistrationError",
    "find_stars",
    "match_stars",
    "pseudo_wcs",
    "register_frames",
    "wcs_on_reference",
]

logger = logging.getLogger(__name__)

PSEUDO_WCSNAME = "lazysky pseudo-celestial"
_N_TRIANGLE_STARS = 25  # brightest stars forming triangles: C(25, 3) = 2300 triangles
_TRIANGLE_TOL = 0.02  # side-ratio distance for two triangles to be "the same"
MODELS = ("similarity", "affine")


class RegistrationError(LazySkyError, ValueError):
    """A frame could not be registered (too few stars, no consistent match)."""


@dataclass(frozen=True)
class Registration:
    """How one frame maps onto the reference frame.

    Attributes
    ----------
    name
        The frame's name (e.g. ``file.fits[HDU]``).
    matrix, offset
        The affine transform from the frame's 0-based pixel ``(x, y)`` to the reference's:
        ``ref = matrix @ frame + offset``.
    n_matched
        Stars used in the final fit.
    rms_px
        Root-mean-square residual of those stars, in reference pixels (their centroid
        noise, in both frames, plus any misfit).
    centre_error_px
        Standard error of the transform at the frame's centre, in reference pixels
        (``rms_px`` propagated through the least-squares fit): how well the frame as a
        whole is placed.
    wcs
        The frame's celestial WCS, on the reference's pixel grid (see module docstring).
    """

    name: str
    matrix: NDArray[np.float64]
    offset: NDArray[np.float64]
    n_matched: int
    rms_px: float
    centre_error_px: float
    wcs: WCS

    def apply(self, x: Any, y: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Reference pixel coordinates of frame pixels ``(x, y)`` (0-based)."""
        xy = np.stack([np.asarray(x, float).ravel(), np.asarray(y, float).ravel()])
        out = self.matrix @ xy + self.offset[:, None]
        shape = np.shape(x)
        return out[0].reshape(shape), out[1].reshape(shape)


# -- stars ---------------------------------------------------------------------------


def _gaussian_kernel(sigma_px: float) -> NDArray[np.float32]:
    r = max(1, int(np.ceil(3 * sigma_px)))
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    k = np.exp(-(x * x + y * y) / (2 * sigma_px * sigma_px))
    return np.ascontiguousarray(k / k.sum(), dtype=np.float32)


def _prepare(
    image: NDArray[Any], mask: NDArray[Any] | None
) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """Background-subtracted float32 image (bad pixels 0) and the sep mask."""
    import sep

    data = np.ascontiguousarray(image, dtype=np.float32)
    bad = ~np.isfinite(data) if mask is None else (~np.isfinite(data) | (mask != 0))
    fill = float(np.median(data[~bad])) if np.any(~bad) else 0.0
    data = np.where(bad, fill, data).astype(np.float32)
    bmask = np.ascontiguousarray(bad, dtype=np.uint8)
    box = int(max(16, min(64, min(data.shape) // 4)))
    bkg = sep.Background(data, mask=bmask, bw=box, bh=box)
    sub = np.ascontiguousarray(data - bkg.back(), dtype=np.float32)
    sub[bad] = 0.0
    return sub, bmask


def _extract(
    sub: NDArray[np.float32], bmask: NDArray[np.uint8], threshold_sigma: float, sigma_px: float
) -> Any:
    """Compact, round, unflagged sources, brightest first (a sep structured array)."""
    import sep
    from scipy import ndimage

    kernel = _gaussian_kernel(sigma_px)
    smooth = ndimage.convolve(sub, kernel, mode="nearest")[bmask == 0]
    rms = 1.4826 * float(np.median(np.abs(smooth - np.median(smooth)))) if smooth.size else 0.0
    if not rms > 0:
        return None
    # sep filters with the kernel and thresholds the filtered image: threshold in its noise
    objs = sep.extract(sub, threshold_sigma * rms, mask=bmask, minarea=5,
                       filter_kernel=kernel, deblend_cont=0.005)  # fmt: skip
    if len(objs) == 0:
        return None
    size = np.sqrt(objs["a"] * objs["b"])
    ok = ((objs["flag"] & sep.OBJ_TRUNC) == 0) & (objs["b"] > 0)
    ok &= objs["a"] < 2.0 * np.maximum(objs["b"], 1e-3)
    if np.any(ok):
        ok &= size < 3.0 * np.median(size[ok])
    objs = objs[ok]
    return objs[np.argsort(objs["flux"])[::-1]] if len(objs) else None


def find_stars(
    image: NDArray[Any],
    *,
    threshold_sigma: float = 3.0,
    kernel_sigma_px: float | None = None,
    max_stars: int = 200,
    mask: NDArray[Any] | None = None,
) -> NDArray[np.float64]:
    """Positions and fluxes of the compact sources of ``image``, brightest first.

    Returns ``(N, 3)``: 0-based ``x``, ``y`` (windowed centroids, like SExtractor's
    ``XWIN``) and flux. Sources are detected above ``threshold_sigma`` times the robust
    noise of the image filtered with a Gaussian of ``kernel_sigma_px`` (default: matched
    to the stars, measured from the half-light radius of the brightest sources of a first
    pass); extended blobs (more than three times the median size), elongated (axis ratio
    > 2) and flagged sources are left out. ``mask``: nonzero pixels are ignored.

    Examples
    --------
    >>> import numpy as np
    >>> y, x = np.mgrid[:64, :80]
    >>> img = 1000 * np.exp(-((x - 30.3) ** 2 + (y - 20.6) ** 2) / 8.0)
    >>> img += np.random.default_rng(0).normal(0, 5, img.shape)
    >>> np.round(find_stars(img)[0, :2], 1)
    array([30.3, 20.6])
    """
    import sep

    if np.ndim(image) != 2:
        msg = f"find_stars needs a 2-d image, got shape {np.shape(image)}"
        raise ParameterError(msg)
    if not threshold_sigma > 0 or (kernel_sigma_px is not None and not kernel_sigma_px > 0):
        msg = (
            "need threshold_sigma > 0 and kernel_sigma_px > 0 (or None), got "
            f"{threshold_sigma}, {kernel_sigma_px}"
        )
        raise ParameterError(msg)
    sub, bmask = _prepare(np.asarray(image), mask)
    objs = _extract(sub, bmask, threshold_sigma, kernel_sigma_px or 1.5)
    if objs is None:
        return np.empty((0, 3))

    def half_light(o: Any) -> NDArray[np.float64]:
        r50, _ = sep.flux_radius(sub, o["x"], o["y"], 6.0 * o["a"], 0.5, mask=bmask, subpix=5)
        return np.asarray(r50, dtype=float)

    r_star = float(np.median(half_light(objs[: max(5, len(objs) // 3)])))
    if kernel_sigma_px is None:  # the stars' own Gaussian sigma (r50 = 1.1774 sigma)
        objs = _extract(sub, bmask, threshold_sigma, float(np.clip(r_star / 1.1774, 1.0, 6.0)))
        if objs is None:
            return np.empty((0, 3))
        r_star = float(np.median(half_light(objs[: max(5, len(objs) // 3)])))
    objs = objs[:max_stars]
    sig = np.full(len(objs), max(2.0 * r_star / 2.3548, 0.5))
    x, y, flag = sep.winpos(sub, objs["x"], objs["y"], sig, mask=bmask)
    good = (flag == 0) & (np.hypot(x - objs["x"], y - objs["y"]) < max(2.0, r_star))
    x, y = np.where(good, x, objs["x"]), np.where(good, y, objs["y"])
    return np.column_stack([x, y, objs["flux"]]).astype(float)


# -- matching ------------------------------------------------------------------------


def _triangles(xy: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Side-ratio invariants ``(T, 2)`` and vertex indices ``(T, 3)`` (canonical order)."""
    n = len(xy)
    combos = np.array(list(itertools.combinations(range(n), 3)), dtype=np.intp)
    if len(combos) == 0:
        return np.empty((0, 2)), np.empty((0, 3), np.intp)
    p = xy[combos]  # (T, 3, 2)
    # side k is opposite vertex k
    sides = np.stack([np.linalg.norm(p[:, 1] - p[:, 2], axis=1),
                      np.linalg.norm(p[:, 0] - p[:, 2], axis=1),
                      np.linalg.norm(p[:, 0] - p[:, 1], axis=1)], axis=1)  # fmt: skip
    order = np.argsort(-sides, axis=1)  # longest first: vertices opposite L1, L2, L3
    s = np.take_along_axis(sides, order, axis=1)
    keep = (s[:, 2] > 0) & (s[:, 2] / np.maximum(s[:, 0], 1e-12) > 0.1)
    inv = np.column_stack([s[:, 1] / s[:, 0], s[:, 2] / s[:, 0]])[keep]
    verts = np.take_along_axis(combos, order, axis=1)[keep]
    return inv, verts


def _similarity(src: NDArray[np.float64], dst: NDArray[np.float64]) -> NDArray[np.float64]:
    """Least-squares similarity ``dst ≈ [[a, -b], [b, a]] src + t`` as a 2×3 matrix."""
    n = len(src)
    a = np.zeros((2 * n, 4))
    a[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)])
    a[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)])
    p, *_ = np.linalg.lstsq(a, dst.ravel(), rcond=None)
    return np.array([[p[0], -p[1], p[2]], [p[1], p[0], p[3]]])


def _affine(src: NDArray[np.float64], dst: NDArray[np.float64]) -> NDArray[np.float64]:
    """Least-squares affine ``dst ≈ M src + t`` as a 2×3 matrix."""
    a = np.column_stack([src, np.ones(len(src))])
    p, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return np.asarray(p.T)


def _apply(t: NDArray[np.float64], xy: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(xy @ t[:, :2].T + t[:, 2])


def match_stars(
    stars: NDArray[Any],
    reference: NDArray[Any],
    *,
    tolerance_px: float = 3.0,
    min_matches: int = 5,
    model: str = "similarity",
    name: str = "frame",
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """The affine transform taking ``stars`` onto ``reference``, and the matched pairs.

    ``stars`` and ``reference`` are ``(N, ≥2)`` pixel positions, brightest first (as
    :func:`find_stars` returns them). ``model`` is the final least-squares fit:
    ``"similarity"`` (rotation, shift, scale: 4 parameters, the default) or ``"affine"``
    (6; needs at least 6 stars). Returns the 2×3 matrix ``[M | t]`` (``ref = M @ xy +
    t``) and the ``(K, 2)`` index pairs ``(star, reference star)`` of the final fit.

    Raises
    ------
    RegistrationError
        Fewer than ``min_matches`` stars agree on a transform (the message names ``name``).

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.random.default_rng(1).uniform(0, 500, (40, 2))
    >>> th = np.radians(10.0)
    >>> rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    >>> stars = (ref - [3.0, -7.5]) @ rot  # the same stars, rotated and shifted
    >>> t, pairs = match_stars(stars, ref)
    >>> np.round(t, 3).tolist(), len(pairs)
    ([[0.985, -0.174, 3.0], [0.174, 0.985, -7.5]], 40)
    """
    from scipy.spatial import cKDTree

    if model not in MODELS:
        msg = f"model must be one of {list(MODELS)}, got {model!r}"
        raise ParameterError(msg)
    fit = _affine if model == "affine" else _similarity
    src = np.asarray(stars, float)[:, :2]
    ref = np.asarray(reference, float)[:, :2]
    for what, xy in (("frame", src), ("reference", ref)):
        if len(xy) < max(min_matches, 3):
            msg = (
                f"{name}: only {len(xy)} star(s) found in the {what} (need {max(min_matches, 3)}"
                "): too faint or too short an exposure; lower threshold_sigma or register "
                "another frame"
            )
            raise RegistrationError(msg)
    inv_s, v_s = _triangles(src[:_N_TRIANGLE_STARS])
    inv_r, v_r = _triangles(ref[:_N_TRIANGLE_STARS])
    votes = np.zeros((min(len(src), _N_TRIANGLE_STARS), min(len(ref), _N_TRIANGLE_STARS)))
    if len(inv_s) and len(inv_r):
        hits = cKDTree(inv_r).query_ball_point(inv_s, r=_TRIANGLE_TOL)
        for i, js in enumerate(hits):
            for j in js:
                np.add.at(votes, (v_s[i], v_r[j]), 1.0)
    cand = np.argwhere(votes > 0)
    cand = cand[np.argsort(-votes[cand[:, 0], cand[:, 1]], kind="stable")][:40]
    tree = cKDTree(ref)
    best: tuple[int, NDArray[np.float64] | None] = (0, None)
    n_hyp = 0
    for (i1, j1), (i2, j2) in itertools.combinations(cand, 2):
        if i1 == i2 or j1 == j2:
            continue
        d_s, d_r = np.linalg.norm(src[i1] - src[i2]), np.linalg.norm(ref[j1] - ref[j2])
        if d_s < 5 or not 0.5 < d_r / d_s < 2.0:
            continue
        t = _similarity(src[[i1, i2]], ref[[j1, j2]])
        n_hyp += 1
        dist, _ = tree.query(_apply(t, src), distance_upper_bound=tolerance_px)
        n = int(np.isfinite(dist).sum())
        if n > best[0]:
            best = (n, t)
    if best[1] is None or best[0] < min_matches:
        msg = (
            f"{name}: no consistent star match with the reference (best {best[0]} of "
            f"{len(src)} stars agree, need {min_matches}): do the frames overlap?"
        )
        raise RegistrationError(msg)
    t = best[1]
    chance = _chance(best[0], _apply(t, src), ref, tolerance_px) * max(n_hyp, 1)
    if chance > 1e-3:
        msg = (
            f"{name}: no significant star match with the reference: the best transform "
            f"brings {best[0]} of {len(src)} stars onto reference stars, which chance alone "
            f"does with probability {min(chance, 1.0):.2g}; do the frames overlap?"
        )
        raise RegistrationError(msg)
    tol = tolerance_px
    pairs = np.empty((0, 2), np.intp)
    for _ in range(5):  # nearest neighbours, affine fit, 3σ clip
        dist, j = tree.query(_apply(t, src), distance_upper_bound=tol)
        idx = np.flatnonzero(np.isfinite(dist))
        if len(idx) < min_matches:
            break
        # one reference star per frame star and vice versa
        _, first = np.unique(j[idx], return_index=True)
        idx = idx[first]
        t_new = fit(src[idx], ref[j[idx]]) if len(idx) >= 6 else _similarity(src[idx], ref[j[idx]])
        res = np.linalg.norm(_apply(t_new, src[idx]) - ref[j[idx]], axis=1)
        rms = float(np.sqrt(np.mean(res**2)))
        keep = res <= max(3.0 * rms, 0.05)
        t = fit(src[idx][keep], ref[j[idx][keep]]) if keep.sum() >= 6 else t_new
        pairs = np.column_stack([idx[keep], j[idx][keep]])
        tol = max(min(tolerance_px, 3.0 * rms), 0.5)
    if len(pairs) < min_matches:
        msg = (
            f"{name}: only {len(pairs)} stars match the reference after fitting "
            f"(need {min_matches})"
        )
        raise RegistrationError(msg)
    return t, pairs


def _centre_error(xy: NDArray[np.float64], rms: float, shape: tuple[int, ...], model: str) -> float:
    """Standard error of the fitted position at the frame centre (per axis, combined)."""
    n = len(xy)
    c = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])
    d = xy - c  # centred design: the intercept is the centre's position
    if model == "affine" and n >= 6:
        a = np.column_stack([d, np.ones(n)])
        cov = np.linalg.pinv(a.T @ a)
        var = cov[2, 2]
    else:  # similarity: 4 parameters over 2n equations
        a = np.zeros((2 * n, 4))
        a[0::2] = np.column_stack([d[:, 0], -d[:, 1], np.ones(n), np.zeros(n)])
        a[1::2] = np.column_stack([d[:, 1], d[:, 0], np.zeros(n), np.ones(n)])
        cov = np.linalg.pinv(a.T @ a)
        var = (cov[2, 2] + cov[3, 3]) / 2.0
    # rms is the 2-d residual: per-axis sigma is rms / sqrt(2)
    return float(np.sqrt(2.0 * var) * rms / np.sqrt(2.0))


def _chance(n: int, src_on_ref: NDArray[np.float64], ref: NDArray[np.float64], tol: float) -> float:
    """Probability of ``n`` or more chance coincidences within ``tol`` (Poisson)."""
    from scipy.stats import poisson

    lo, hi = ref.min(axis=0), ref.max(axis=0)
    area = float(np.prod(np.maximum(hi - lo, tol)))
    inside = np.all((src_on_ref >= lo) & (src_on_ref <= hi), axis=1).sum()
    mu = float(inside) * np.pi * tol**2 * len(ref) / area
    return float(poisson.sf(n - 1, mu))


# -- WCS -----------------------------------------------------------------------------


def pseudo_wcs(
    shape: tuple[int, int],
    *,
    pixel_scale_arcsec: float = 1.0,
    ra_deg: float = 180.0,
    dec_deg: float = 0.0,
) -> WCS:
    """A TAN WCS for a frame without one: tangent point at its centre, north up, east left.

    Examples
    --------
    >>> w = pseudo_wcs((1040, 1392))
    >>> w.wcs.crpix.tolist(), w.wcs.name
    ([696.5, 520.5], 'lazysky pseudo-celestial')
    """
    if not pixel_scale_arcsec > 0:
        msg = f"pixel_scale_arcsec must be > 0, got {pixel_scale_arcsec}"
        raise ParameterError(msg)
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    s = pixel_scale_arcsec / 3600.0
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.wcs.name = PSEUDO_WCSNAME
    w.pixel_shape = (nx, ny)
    w.wcs.set()
    return w


def wcs_on_reference(reference: WCS, transform: NDArray[np.float64]) -> WCS:
    """The linear part of ``reference`` composed with ``transform`` (frame → reference px).

    If ``ref = M @ p + t`` (0-based pixels) and the reference's intermediate coordinates
    are ``CD (ref − c)`` with ``c = CRPIX − 1``, the frame's are ``CD M (p − c')`` with
    ``c' = M⁻¹ (c − t)``. SIP or other distortions of the reference are not carried.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        ref = reference.celestial.deepcopy()
        ref.sip = None
    m, t = transform[:, :2], transform[:, 2]
    cd = ref.wcs.cd if ref.wcs.has_cd() else ref.wcs.get_pc() * ref.wcs.cdelt[:, None]
    c_ref = ref.wcs.crpix - 1.0
    out = WCS(naxis=2)
    out.wcs.ctype = [c.replace("-SIP", "") for c in ref.wcs.ctype]
    out.wcs.crval = ref.wcs.crval
    out.wcs.cunit = ref.wcs.cunit
    out.wcs.cd = np.asarray(cd) @ m
    out.wcs.crpix = np.linalg.solve(m, c_ref - t) + 1.0
    if ref.wcs.radesys:
        out.wcs.radesys = ref.wcs.radesys
    if ref.wcs.equinox == ref.wcs.equinox:  # not NaN
        out.wcs.equinox = ref.wcs.equinox
    out.wcs.name = ref.wcs.name or ""
    out.wcs.set()
    return out


def register_frames(
    images: Sequence[NDArray[Any]],
    *,
    reference: int = 0,
    reference_wcs: WCS | None = None,
    names: Sequence[str] | None = None,
    masks: Sequence[NDArray[Any] | None] | None = None,
    threshold_sigma: float = 3.0,
    kernel_sigma_px: float = 2.0,
    tolerance_px: float = 3.0,
    min_matches: int = 5,
    model: str = "similarity",
    pixel_scale_arcsec: float = 1.0,
) -> list[Registration]:
    """Register every image to ``images[reference]`` by matching stars (module docstring).

    Parameters
    ----------
    images
        2-d arrays (in memory: registration needs whole frames).
    reference
        Index of the reference image.
    reference_wcs
        The reference's celestial WCS, or None (a pseudo-celestial one of
        ``pixel_scale_arcsec`` is made).
    names
        For messages and results (default ``frame <i>``).
    masks
        Pixels to ignore (nonzero) per image, or None.
    threshold_sigma, kernel_sigma_px
        Star detection (:func:`find_stars`).
    tolerance_px, min_matches, model
        Matching (:func:`match_stars`).
    pixel_scale_arcsec
        Pixel scale of the pseudo-celestial WCS (only without ``reference_wcs``).

    Returns
    -------
    list of Registration
        One per image, in order; the reference's is the identity.

    Raises
    ------
    RegistrationError
        A frame (named) has too few stars or no consistent match.
    """
    if not images:
        raise ParameterError("register_frames needs at least one image")
    if not 0 <= reference < len(images):
        msg = f"reference must be an index into the {len(images)} images, got {reference}"
        raise ParameterError(msg)
    labels = list(names) if names is not None else [f"frame {i}" for i in range(len(images))]
    if len(labels) != len(images):
        msg = f"names has {len(labels)} entries for {len(images)} images"
        raise ParameterError(msg)
    masks_ = list(masks) if masks is not None else [None] * len(images)
    ref_img = np.asarray(images[reference])
    base = reference_wcs if reference_wcs is not None else pseudo_wcs(
        ref_img.shape, pixel_scale_arcsec=pixel_scale_arcsec)  # fmt: skip
    opts: dict[str, Any] = {"threshold_sigma": threshold_sigma, "kernel_sigma_px": kernel_sigma_px}
    ref_stars = find_stars(ref_img, mask=masks_[reference], **opts)
    if len(ref_stars) < max(min_matches, 3):
        msg = (
            f"{labels[reference]} (the reference): only {len(ref_stars)} star(s) found; "
            "choose another reference frame or lower threshold_sigma"
        )
        raise RegistrationError(msg)
    out = []
    for k, img in enumerate(images):
        if k == reference:
            eye = np.hstack([np.eye(2), np.zeros((2, 1))])
            out.append(Registration(labels[k], np.eye(2), np.zeros(2), len(ref_stars), 0.0,
                                    0.0, wcs_on_reference(base, eye)))  # fmt: skip
            continue
        stars = find_stars(np.asarray(img), mask=masks_[k], **opts)
        t, pairs = match_stars(stars, ref_stars, tolerance_px=tolerance_px,
                               min_matches=min_matches, model=model, name=labels[k])  # fmt: skip
        res = _apply(t, stars[pairs[:, 0], :2]) - ref_stars[pairs[:, 1], :2]
        rms = float(np.sqrt(np.mean(np.sum(res**2, axis=1))))
        err = _centre_error(stars[pairs[:, 0], :2], rms, np.asarray(img).shape, model)
        reg = Registration(labels[k], t[:, :2].copy(), t[:, 2].copy(), len(pairs), rms, err,
                           wcs_on_reference(base, t))  # fmt: skip
        logger.info("%s: %d stars matched, rms %.3f px", labels[k], len(pairs), rms)
        out.append(reg)
    return out

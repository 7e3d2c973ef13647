"""The numpy kernels of source detection: SEP extraction and measurement on one image.

Everything here is pure (numpy in, astropy Table out, no dask, no I/O) except SEP's two
process-wide limits, which :func:`configure_sep` / :class:`SepSettings` set once per
process or Dask worker (STYLE rule 15). :func:`detect_pixels` grows them only as a
fallback, when an extraction overflows them (a warning says so), so a crowded field
never fails with SEP's "internal pixel buffer full" or "deblending overflow".

Flags (column ``flags``, bitwise OR)
------------------------------------
====== ================ ==========================================================
bit    name             meaning
====== ================ ==========================================================
1      OBJ_MERGED       SEP: the object was deblended from a blend
2      OBJ_TRUNC        SEP: the footprint touches the image edge
4      OBJ_DOVERFLOW    SEP: deblending overflowed (sub-object limit)
8      OBJ_SINGU        SEP: singular moments (a, b, theta unreliable)
16     APER_TRUNC       an aperture (circular or Kron) runs off the image
32     APER_HASMASKED   an aperture holds masked pixels (they are left out)
64     APER_ALLMASKED   every pixel of an aperture is masked
128    APER_NONPOSITIVE the Kron-radius sum was not positive (circle fallback used)
256    KRON_CIRCLE      Kron radius below the minimum: flux_kron is a circle
512    HALO             (tiled runs) the footprint or an aperture reaches the edge of
                        the tile + halo window: raise ``halo_px`` for identical results
1024   OFF_IMAGE        (forced photometry) the position is off the image: NaN flux
2048   MASKED           (forced photometry) the position's pixel is masked: NaN flux
====== ================ ==========================================================
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np
import sep
from astropy.table import Table
from astropy.wcs import WCS
from distributed.diagnostics.plugin import WorkerPlugin
from numpy.typing import NDArray
from scipy import ndimage

from lazysky.errors import ParameterError
from lazysky.pipeline.stack import DEFAULT_BAD_BITS

__all__ = [
    "DEFAULT_KERNEL",
    "FLAGS",
    "SOURCE_COLUMNS",
    "SepSettings",
    "configure_sep",
    "detect_pixels",
    "detect_score_pixels",
    "forced_pixels",
    "sep_settings_for",
]

logger = logging.getLogger(__name__)

FLAGS = {
    "OBJ_MERGED": 1, "OBJ_TRUNC": 2, "OBJ_DOVERFLOW": 4, "OBJ_SINGU": 8,
    "APER_TRUNC": 16, "APER_HASMASKED": 32, "APER_ALLMASKED": 64, "APER_NONPOSITIVE": 128,
    "KRON_CIRCLE": 256, "HALO": 512, "OFF_IMAGE": 1024, "MASKED": 2048,
}  # fmt: skip
#: SEP's (and Source Extractor's default.conv) 3 x 3 pyramid kernel.
DEFAULT_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
KRON_FACTOR = 2.5  # Source Extractor's PHOT_AUTOPARAMS 2.5, 3.5
KRON_MIN = 3.5
KRON_MIN_CIRCLE_PX = 1.75  # SEP's documented minimum circular radius
SOURCE_COLUMNS = ("number", "tile_id", "x", "y", "ra", "dec", "flux_aper", "fluxerr_aper",
                  "flux_kron", "fluxerr_kron", "snr", "a", "b", "theta", "flags", "npix",
                  "peak")  # fmt: skip
_DIFF_COLUMNS = ("number", "tile_id", "x", "y", "ra", "dec", "flux_aper", "fluxerr_aper",
                 "flux_psf", "fluxerr_psf", "snr", "a", "b", "theta", "flags", "sign",
                 "npix", "peak")  # fmt: skip
FILTER_TYPES = ("conv", "matched")
DEFAULT_PIXSTACK = 300_000  # SEP's defaults
DEFAULT_SUB_OBJECT_LIMIT = 1024
_LOCK = threading.Lock()


# --- SEP's process-wide limits --------------------------------------------------------
def sep_settings_for(shape: tuple[int, int]) -> tuple[int, int]:
    """``(pixstack, sub_object_limit)`` sized for images of ``shape``.

    The pixel stack holds the pixels of the objects being built (SEP allocates it whole,
    ~30 bytes a pixel, at every extraction): an eighth of the image, at least SEP's
    300 000, covers islands of 1/8 of the image; beyond that :func:`detect_pixels` grows
    it up to the image's size (which always suffices). The sub-object limit (deblending)
    is one per 256 pixels, at least SEP's 1024.
    """
    n = int(shape[0]) * int(shape[1])
    return max(DEFAULT_PIXSTACK, n // 8), max(DEFAULT_SUB_OBJECT_LIMIT, n // 256)


def configure_sep(*, pixstack: int, sub_object_limit: int) -> None:
    """Set SEP's process-wide limits (for in-process schedulers; call once).

    Never lowers a limit already set higher (another image may need it).

    Examples
    --------
    >>> import sep
    >>> configure_sep(pixstack=500_000, sub_object_limit=2048)
    >>> sep.get_extract_pixstack() >= 500_000
    True
    """
    if pixstack < 1 or sub_object_limit < 1:
        msg = f"pixstack and sub_object_limit must be >= 1, got {pixstack}, {sub_object_limit}"
        raise ParameterError(msg)
    with _LOCK:
        if sep.get_extract_pixstack() < pixstack:
            sep.set_extract_pixstack(int(pixstack))
        if sep.get_sub_object_limit() < sub_object_limit:
            sep.set_sub_object_limit(int(sub_object_limit))


class SepSettings(WorkerPlugin):
    """A Dask worker plugin that sets SEP's limits once when a worker starts.

    Examples
    --------
    >>> from distributed import Client  # doctest: +SKIP
    >>> client.register_plugin(SepSettings.for_shape((2112, 2112)))  # doctest: +SKIP
    """

    name = "lazysky-sep-settings"

    def __init__(self, *, pixstack: int = DEFAULT_PIXSTACK,
                 sub_object_limit: int = DEFAULT_SUB_OBJECT_LIMIT) -> None:  # fmt: skip
        if pixstack < 1 or sub_object_limit < 1:
            msg = f"pixstack and sub_object_limit must be >= 1, got {pixstack}, {sub_object_limit}"
            raise ParameterError(msg)
        self.pixstack = int(pixstack)
        self.sub_object_limit = int(sub_object_limit)

    @classmethod
    def for_shape(cls, shape: tuple[int, int]) -> SepSettings:
        """Limits sized for windows of ``shape`` (a tile plus its halo)."""
        pixstack, limit = sep_settings_for(shape)
        return cls(pixstack=pixstack, sub_object_limit=limit)

    def setup(self, worker: Any) -> None:
        configure_sep(pixstack=self.pixstack, sub_object_limit=self.sub_object_limit)
        logger.debug("sep on %s: pixstack %d, sub-object limit %d", worker, self.pixstack,
                     self.sub_object_limit)


def _extract(data: NDArray[Any], thresh: float, **kw: Any) -> NDArray[Any]:
    """``sep.extract`` that grows the overflowing limit (bounded by the image) and retries."""
    n = data.size
    while True:
        try:
            return sep.extract(data, thresh, **kw)
        except Exception as exc:  # sep raises a bare Exception
            text = str(exc)
            with _LOCK:
                if "pixel buffer full" in text and sep.get_extract_pixstack() < n:
                    new = min(max(2 * sep.get_extract_pixstack(), 1), max(n, DEFAULT_PIXSTACK))
                    sep.set_extract_pixstack(new)
                    what = f"pixstack -> {new}"
                elif "deblending overflow" in text and sep.get_sub_object_limit() < max(n, 1024):
                    new = 4 * sep.get_sub_object_limit()
                    sep.set_sub_object_limit(new)
                    what = f"sub-object limit -> {new}"
                else:
                    raise
            logger.warning("sep overflowed its limits (%s): %s and retrying; register "
                           "SepSettings.for_shape to size them up front", text[:40], what)


# --- inputs ---------------------------------------------------------------------------
def _prepare(
    image: NDArray[Any], variance: NDArray[Any] | None, mask: NDArray[Any] | None,
    bad_bits: int, subtract_background: bool, background_box_px: int,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[np.bool_]]:
    """C-contiguous native image and finite variance (float32 stays float32: half the
    memory, SEP sums in double anyway; anything else float64), boolean bad-pixel mask."""
    raw = np.asarray(image)
    dt = np.float32 if raw.dtype.kind == "f" and raw.dtype.itemsize == 4 else np.float64
    img: NDArray[Any] = np.array(raw, dtype=dt, order="C")
    if img.ndim != 2:
        msg = f"image must be 2-d (y, x), got shape {img.shape}"
        raise ParameterError(msg)
    bad = ~np.isfinite(img)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != img.shape:
            msg = f"mask has shape {m.shape}, the image {img.shape}"
            raise ParameterError(msg)
        if m.dtype.kind not in "iu":
            m = m.astype(np.int64)
        bad |= (m & int(bad_bits)) != 0
    if variance is not None:
        var: NDArray[Any] = np.array(variance, dtype=dt, order="C")
        if var.shape != img.shape:
            msg = f"variance has shape {var.shape}, the image {img.shape}"
            raise ParameterError(msg)
        bad |= ~(np.isfinite(var) & (var > 0))
    img[bad] = 0.0
    if subtract_background or variance is None:
        bkg = sep.Background(img, mask=bad, bw=background_box_px, bh=background_box_px)
        if subtract_background:
            img -= bkg.back(dtype=dt)
            img[bad] = 0.0
        if variance is None:
            var = np.asarray(bkg.rms(dtype=dt)) ** 2
    # masked pixels carry no weight in SEP; their variance only has to be finite > 0
    var[bad] = 1.0
    return img, var, bad


def _kernel(filter_kernel: NDArray[Any] | None) -> NDArray[Any] | None:
    if filter_kernel is None:
        return None
    k = np.array(filter_kernel, dtype=np.float64, order="C")
    if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0 or not np.all(np.isfinite(k)):
        msg = f"filter_kernel must be a finite 2-d array of odd sides, got shape {k.shape}"
        raise ParameterError(msg)
    return k


def _check(threshold: float, min_area: int, aperture_radius_px: float) -> None:
    if not (math.isfinite(threshold) and threshold > 0):
        msg = f"threshold must be > 0 (sigma), got {threshold}"
        raise ParameterError(msg)
    if int(min_area) < 1:
        msg = f"min_area must be >= 1 pixel, got {min_area}"
        raise ParameterError(msg)
    if not (math.isfinite(aperture_radius_px) and aperture_radius_px > 0):
        msg = f"aperture_radius_px must be > 0, got {aperture_radius_px}"
        raise ParameterError(msg)


# --- measurement ----------------------------------------------------------------------
def _kron(
    img: NDArray[Any], var: NDArray[Any], bad: NDArray[Any], obj: NDArray[Any]
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Kron flux (Source Extractor's FLUX_AUTO): 2.5 Kron radii, at least 3.5, ellipse;
    a circle of 1.75 px where that ellipse is smaller. Also the Kron extent in pixels."""
    x, y = obj["x"], obj["y"]
    a = np.maximum(obj["a"], 1e-3)
    b = np.clip(obj["b"], 1e-3, a)
    theta = np.clip(obj["theta"], -np.pi / 2, np.pi / 2)
    kr, kflag = sep.kron_radius(img, x, y, a, b, theta, 6.0, mask=bad)
    kr = np.where(np.isfinite(kr) & (kr > 0), kr, 0.0)
    r = np.maximum(KRON_FACTOR * kr, KRON_MIN)
    flux, err, flag = sep.sum_ellipse(img, x, y, a, b, theta, r, var=var, mask=bad, subpix=1)
    circle = (r * np.sqrt(a * b) < KRON_MIN_CIRCLE_PX) | ((kflag & FLAGS["APER_NONPOSITIVE"]) != 0)
    if np.any(circle):
        cf, ce, cflag = sep.sum_circle(img, x[circle], y[circle], KRON_MIN_CIRCLE_PX, var=var,
                                       mask=bad, subpix=1)  # fmt: skip
        flux[circle], err[circle], flag[circle] = cf, ce, cflag | FLAGS["KRON_CIRCLE"]
    extent = np.maximum(6.0 * a, r * a)  # the Kron-radius ellipse and the flux ellipse
    return flux, err, (flag | kflag).astype(np.int64), extent


def _sky(x: NDArray[Any], y: NDArray[Any], wcs: WCS | None) -> tuple[NDArray[Any], NDArray[Any]]:
    if wcs is None:
        return np.full(len(x), np.nan), np.full(len(x), np.nan)
    if len(x) == 0:
        return np.zeros(0), np.zeros(0)
    ra, dec = wcs.celestial.pixel_to_world_values(x, y)
    return np.mod(np.asarray(ra, dtype=float), 360.0), np.asarray(dec, dtype=float)


def _owned(
    obj: NDArray[Any], core: tuple[int, int, int, int] | None
) -> NDArray[np.bool_]:
    """Sources whose centroid's pixel lies in ``core`` (y0, y1, x0, x1), local pixels."""
    if core is None:
        return np.ones(len(obj), dtype=bool)
    y0, y1, x0, x1 = core
    px, py = np.floor(obj["x"] + 0.5), np.floor(obj["y"] + 0.5)
    return (px >= x0) & (px < x1) & (py >= y0) & (py < y1)


def _halo_flags(
    obj: NDArray[Any], extent: NDArray[Any], radius: float, shape: tuple[int, int],
    open_edges: tuple[bool, bool, bool, bool],
) -> NDArray[np.int64]:
    """HALO where the footprint or an aperture reaches a window edge that is not the image's
    edge (``open_edges``: bottom, top, left, right — True where the window was cut)."""
    ny, nx = shape
    r = np.maximum(extent, radius) + 1.0
    lo_y, hi_y, lo_x, hi_x = open_edges
    hit = np.zeros(len(obj), dtype=bool)
    if lo_y:
        hit |= (obj["ymin"] <= 0) | (obj["y"] - r < 0)
    if hi_y:
        hit |= (obj["ymax"] >= ny - 1) | (obj["y"] + r > ny - 1)
    if lo_x:
        hit |= (obj["xmin"] <= 0) | (obj["x"] - r < 0)
    if hi_x:
        hit |= (obj["xmax"] >= nx - 1) | (obj["x"] + r > nx - 1)
    return np.where(hit, FLAGS["HALO"], 0).astype(np.int64)


def _table(columns: dict[str, Any], names: tuple[str, ...]) -> Table:
    t = Table({k: columns[k] for k in names})
    for k in ("x", "y"):
        t[k].unit = "pix"
    for k in ("ra", "dec"):
        t[k].unit = "deg"
    t["theta"].unit = "rad"
    return t


def _order(y: NDArray[Any], x: NDArray[Any]) -> NDArray[np.intp]:
    return np.lexsort((x, y))


def detect_pixels(
    image: NDArray[Any],
    variance: NDArray[Any] | None = None,
    mask: NDArray[Any] | None = None,
    *,
    wcs: WCS | None = None,
    threshold: float = 5.0,
    min_area: int = 5,
    filter_kernel: NDArray[Any] | None = DEFAULT_KERNEL,
    filter_type: str = "conv",
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.005,
    clean: bool = True,
    aperture_radius_px: float = 4.0,
    bad_bits: int = DEFAULT_BAD_BITS,
    subtract_background: bool = False,
    background_box_px: int = 64,
    offset: tuple[int, int] = (0, 0),
    core: tuple[int, int, int, int] | None = None,
    open_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
    tile_id: str = "",
) -> Table:
    """Detect and measure the sources of one image with SEP (filtered, deblended).

    Parameters
    ----------
    image, variance, mask
        ``(ny, nx)`` arrays: the background-subtracted image, its variance (None:
        estimated from a SEP background rms), mask bits (pixels with any of ``bad_bits``
        are masked, as are non-finite ones).
    wcs
        Celestial WCS of the *output* pixel coordinates (local pixels + ``offset``) for
        ``ra``/``dec``; None gives NaN.
    threshold
        Detection threshold: the signal-to-noise of the filtered image, i.e. the filtered
        image over its own noise for white noise, ``t``. With ``filter_type="conv"``
        (default, Source Extractor's method) SEP thresholds the filtered image at
        ``t · sqrt(Σk²) / Σk`` per-pixel σ — that is Source Extractor's DETECT_THRESH
        for the same ``t`` (1.875 for t = 5 and the default kernel).
    min_area
        Minimum pixels above threshold.
    filter_kernel
        Detection filter (default: the 3 × 3 pyramid of SEP and Source Extractor);
        None: no filtering.
    filter_type
        ``"conv"`` (default) or ``"matched"``: SEP's matched filter, which weights by the
        inverse variance (``threshold`` is then exactly its S/N, also where the depth
        varies). On crowded images SEP's matched mode deblends less and finds fewer
        sources (docs/detect.md: 78 % vs 93 % completeness in the benchmark image), so
        it is not the default.
    deblend_nthresh, deblend_cont, clean
        SEP's deblending and cleaning parameters.
    aperture_radius_px
        Radius of the circular aperture of ``flux_aper``.
    subtract_background, background_box_px
        Subtract a SEP background (mesh ``background_box_px``) first.
    offset
        ``(y0, x0)`` added to the local pixel coordinates in the output.
    core, open_edges, tile_id
        For tiled runs: keep only sources whose centroid's pixel is in ``core``
        (``y0, y1, x0, x1`` local); flag HALO where the footprint or an aperture reaches a
        window edge that cuts the image (``open_edges`` bottom, top, left, right).

    Returns
    -------
    astropy.table.Table
        Columns of ``coadd_sources`` (module docstring for ``flags``), sorted by
        ``(y, x)``, ``number`` 1-based, plus ``npix`` and ``peak``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> img = rng.normal(0, 1, (40, 60))
    >>> yy, xx = np.mgrid[:40, :60]
    >>> img += 200 * np.exp(-((xx - 30) ** 2 + (yy - 20) ** 2) / (2 * 1.5**2))
    >>> cat = detect_pixels(img, np.ones_like(img))
    >>> len(cat), round(float(cat["x"][0]), 1), round(float(cat["y"][0]), 1)
    (1, 30.0, 20.0)
    """
    _check(threshold, min_area, aperture_radius_px)
    img, var, bad = _prepare(image, variance, mask, bad_bits, subtract_background,
                             background_box_px)  # fmt: skip
    kernel = _kernel(filter_kernel)
    if filter_type not in FILTER_TYPES:
        msg = f"filter_type must be one of {list(FILTER_TYPES)}, got {filter_type!r}"
        raise ParameterError(msg)
    if img.size == 0 or bool(bad.all()):
        return _empty(SOURCE_COLUMNS)
    thresh = float(threshold)
    if filter_type == "conv" and kernel is not None:
        thresh *= math.sqrt(float((kernel**2).sum())) / float(kernel.sum())
    obj = _extract(img, thresh, var=var, mask=bad, minarea=int(min_area),
                   filter_kernel=kernel, filter_type=filter_type,
                   deblend_nthresh=int(deblend_nthresh), deblend_cont=float(deblend_cont),
                   clean=bool(clean))  # fmt: skip
    obj = obj[_owned(obj, core)]
    if len(obj) == 0:
        return _empty(SOURCE_COLUMNS)
    fa, fea, flag_a = sep.sum_circle(img, obj["x"], obj["y"], float(aperture_radius_px),
                                     var=var, mask=bad, subpix=0)  # fmt: skip
    fk, fek, flag_k, extent = _kron(img, var, bad, obj)
    flags = obj["flag"].astype(np.int64) | flag_a | flag_k
    flags |= _halo_flags(obj, extent, float(aperture_radius_px), img.shape, open_edges)
    x, y = obj["x"] + offset[1], obj["y"] + offset[0]
    ra, dec = _sky(x, y, wcs)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fea > 0, fa / fea, np.nan)
    cols = {"x": x, "y": y, "ra": ra, "dec": dec, "flux_aper": fa, "fluxerr_aper": fea,
            "flux_kron": fk, "fluxerr_kron": fek, "snr": snr, "a": obj["a"], "b": obj["b"],
            "theta": obj["theta"], "flags": flags.astype(np.int32),
            "npix": obj["npix"].astype(np.int32), "peak": obj["peak"]}  # fmt: skip
    order = _order(y, x)
    cols = {k: np.asarray(v)[order].astype(np.float64) if np.asarray(v).dtype.kind == "f"
            else np.asarray(v)[order] for k, v in cols.items()}  # fmt: skip
    cols["number"] = np.arange(1, len(order) + 1, dtype=np.int32)
    cols["tile_id"] = np.full(len(order), tile_id, dtype=object).astype(str)
    return _table(cols, SOURCE_COLUMNS)


def _empty(names: tuple[str, ...]) -> Table:
    cols: dict[str, Any] = {k: np.zeros(0, dtype=np.float64) for k in names}
    for k in ("number", "flags", "npix"):
        if k in cols:
            cols[k] = np.zeros(0, dtype=np.int32)
    if "sign" in cols:
        cols["sign"] = np.zeros(0, dtype=np.int16)
    cols["tile_id"] = np.zeros(0, dtype="<U1")
    return _table(cols, names)


def detect_score_pixels(
    difference: NDArray[Any],
    variance: NDArray[Any],
    score: NDArray[Any],
    mask: NDArray[Any] | None = None,
    *,
    wcs: WCS | None = None,
    threshold: float = 5.0,
    min_area: int = 3,
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.005,
    aperture_radius_px: float = 4.0,
    psf: NDArray[Any] | None = None,
    bad_bits: int = DEFAULT_BAD_BITS,
    offset: tuple[int, int] = (0, 0),
    core: tuple[int, int, int, int] | None = None,
    open_edges: tuple[bool, bool, bool, bool] = (False, False, False, False),
    tile_id: str = "",
) -> Table:
    """Detect on a score image (S_corr, unit variance) for both signs; measure on D.

    The score is already matched-filtered, so detection runs unfiltered at ``threshold``
    (in σ of the score), once on ``score`` (``sign`` +1) and once on ``-score`` (−1).
    ``flux_aper`` is a circular aperture on the difference ``D`` with its ``variance``;
    ``flux_psf`` the PSF-weighted flux ``Σ P D / V / Σ P² / V`` (``psf`` a centred,
    sum-normalised odd-sided stamp, shifted to the source's sub-pixel position; NaN without
    a PSF).
    ``snr`` is the score at the detection's peak (signed). Columns: ``diff_sources``'.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> d = rng.normal(0, 1, (40, 40)); yy, xx = np.mgrid[:40, :40]
    >>> d -= 100 * np.exp(-((xx - 20) ** 2 + (yy - 12) ** 2) / 4.5)
    >>> from scipy.ndimage import gaussian_filter
    >>> s = gaussian_filter(d, 1.5) / np.std(gaussian_filter(rng.normal(0, 1, (400, 400)), 1.5))
    >>> cat = detect_score_pixels(d, np.ones_like(d), s)
    >>> [int(s) for s in cat["sign"]], round(float(cat["y"][0]))
    ([-1], 12)
    """
    _check(threshold, min_area, aperture_radius_px)
    if psf is not None:
        _check_psf(psf)
    img, var, bad = _prepare(difference, variance, mask, bad_bits, False, 64)
    sc = np.array(score, dtype=np.float64, order="C")
    if sc.shape != img.shape:
        msg = f"score has shape {sc.shape}, the difference {img.shape}"
        raise ParameterError(msg)
    bad |= ~np.isfinite(sc)
    sc[bad] = 0.0
    if img.size == 0 or bool(bad.all()):
        return _empty(_DIFF_COLUMNS)
    parts = []
    for sign in (1, -1):
        o = _extract(sign * sc, float(threshold), mask=bad, minarea=int(min_area),
                     filter_kernel=None, deblend_nthresh=int(deblend_nthresh),
                     deblend_cont=float(deblend_cont))  # fmt: skip
        o = o[_owned(o, core)]
        parts.append((sign, o))
    obj = np.concatenate([o for _, o in parts])
    signs = np.concatenate([np.full(len(o), s, dtype=np.int16) for s, o in parts])
    if len(obj) == 0:
        return _empty(_DIFF_COLUMNS)
    fa, fea, flag_a = sep.sum_circle(img, obj["x"], obj["y"], float(aperture_radius_px),
                                     var=var, mask=bad, subpix=0)  # fmt: skip
    fp, fep = _psf_flux(img, var, bad, obj["x"], obj["y"], psf)
    extent = np.full(len(obj), 0.0 if psf is None else psf.shape[0] / 2)
    flags = obj["flag"].astype(np.int64) | flag_a
    flags |= _halo_flags(obj, extent, float(aperture_radius_px), img.shape, open_edges)
    x, y = obj["x"] + offset[1], obj["y"] + offset[0]
    ra, dec = _sky(x, y, wcs)
    cols = {"x": x, "y": y, "ra": ra, "dec": dec, "flux_aper": fa, "fluxerr_aper": fea,
            "flux_psf": fp, "fluxerr_psf": fep, "snr": signs * obj["peak"],
            "a": obj["a"], "b": obj["b"], "theta": obj["theta"],
            "flags": flags.astype(np.int32), "sign": signs,
            "npix": obj["npix"].astype(np.int32), "peak": obj["peak"]}  # fmt: skip
    order = _order(y, x)
    cols = {k: np.asarray(v)[order] for k, v in cols.items()}
    cols["number"] = np.arange(1, len(order) + 1, dtype=np.int32)
    cols["tile_id"] = np.full(len(order), tile_id, dtype=object).astype(str)
    return _table(cols, _DIFF_COLUMNS)


def _check_psf(psf: NDArray[Any]) -> NDArray[np.float64]:
    p = np.asarray(psf, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] % 2 == 0 or p.shape[1] % 2 == 0 or not p.sum() > 0:
        msg = f"psf must be a 2-d stamp of odd sides with a positive sum, got shape {p.shape}"
        raise ParameterError(msg)
    return p / p.sum()


def _psf_flux(
    img: NDArray[Any], var: NDArray[Any], bad: NDArray[Any], x: NDArray[Any], y: NDArray[Any],
    psf: NDArray[Any] | None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Optimal (PSF-weighted) flux and error at each position; NaN without a PSF."""
    n = len(x)
    flux, err = np.full(n, np.nan), np.full(n, np.nan)
    if psf is None:
        return flux, err
    p = _check_psf(psf)
    hy, hx = p.shape[0] // 2, p.shape[1] // 2
    ny, nx = img.shape
    for i in range(n):
        cx, cy = int(np.floor(x[i] + 0.5)), int(np.floor(y[i] + 0.5))
        y0, y1, x0, x1 = cy - hy, cy + hy + 1, cx - hx, cx + hx + 1
        sy, sx = slice(max(y0, 0), min(y1, ny)), slice(max(x0, 0), min(x1, nx))
        # the stamp moved to the source's sub-pixel position (cubic spline), renormalised
        shifted = ndimage.shift(p, (y[i] - cy, x[i] - cx), order=3, mode="constant")
        shifted /= shifted.sum()
        pp = shifted[sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0]
        good = ~bad[sy, sx]
        w = np.where(good, pp / var[sy, sx], 0.0)
        den = float((w * pp).sum())
        if den > 0:
            flux[i] = float((w * img[sy, sx]).sum()) / den
            err[i] = 1.0 / math.sqrt(den)
    return flux, err


def forced_pixels(
    image: NDArray[Any],
    variance: NDArray[Any],
    mask: NDArray[Any] | None,
    x: NDArray[Any],
    y: NDArray[Any],
    *,
    radius_px: float,
    bad_bits: int = DEFAULT_BAD_BITS,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int32]]:
    """Circular-aperture flux, error and flags at pixel positions ``x``, ``y``.

    NaN flux with OFF_IMAGE where the centre is off the image, MASKED where its pixel
    (or the whole aperture) is masked.

    Examples
    --------
    >>> import numpy as np
    >>> f, e, fl = forced_pixels(np.ones((10, 14)), np.ones((10, 14)), None,
    ...                          np.array([5.0, 30.0]), np.array([5.0, 5.0]), radius_px=2.0)
    >>> round(float(f[0]), 2), bool(np.isnan(f[1])), int(fl[1])
    (12.57, True, 1024)
    """
    if not (math.isfinite(radius_px) and radius_px > 0):
        msg = f"radius must be > 0, got {radius_px} px"
        raise ParameterError(msg)
    img, var, bad = _prepare(image, variance, mask, bad_bits, False, 64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    flux, err = np.full(n, np.nan), np.full(n, np.nan)
    flags = np.zeros(n, dtype=np.int32)
    ny, nx = img.shape
    px, py = np.floor(x + 0.5), np.floor(y + 0.5)
    on = np.isfinite(x) & np.isfinite(y) & (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    flags[~on] |= FLAGS["OFF_IMAGE"]
    idx = np.flatnonzero(on)
    centre_bad = np.zeros(n, dtype=bool)
    centre_bad[idx] = bad[py[idx].astype(int), px[idx].astype(int)]
    flags[centre_bad] |= FLAGS["MASKED"]
    use = on & ~centre_bad
    if np.any(use) and img.size:
        f, e, fl = sep.sum_circle(img, x[use], y[use], float(radius_px), var=var, mask=bad,
                                  subpix=0)  # fmt: skip
        allm = (fl & FLAGS["APER_ALLMASKED"]) != 0
        f, e = np.where(allm, np.nan, f), np.where(allm, np.nan, e)
        flux[use], err[use] = f, e
        flags[use] |= fl.astype(np.int32) | np.where(allm, FLAGS["MASKED"], 0).astype(np.int32)
    return flux, err, flags

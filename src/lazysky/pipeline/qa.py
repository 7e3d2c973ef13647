"""Science QA per tile: PSF, background, astrometry, S_corr, detections, depth.

Cheap numbers computed in every run (``lazysky run``'s ``qa`` stage, after detect), one
``qa-<product>-<tile>-<run_id>`` task per tile and product, recorded in the catalog
(``tile_qa``, :func:`lazysky.catalog.qa.read_qa`) and in the products' attributes
(``qa``). Thresholds (:class:`lazysky.config.QaThresholds`, ``qa_thresholds`` in the
settings) flag tiles.

Products: the reference coadd (``kind="coadd"``, e.g. ``deep1``) and each science epoch
(``kind="diff"``, e.g. ``deep1-v2``: its coadd and its difference image).

Metrics (docs/qa.md has the definitions):

* ``psf_fwhm_px``, ``psf_beta``, ``psf_n_stars`` — a Moffat fitted by QA to the tile's
  bright isolated stars (:func:`lazysky.pipeline.psf.estimate_psf` with a compact
  ``stamp_px`` stamp, so crowded small tiles still have stars); where none fits, the
  PSF stored with the product (``psf_source`` says which).
* ``background``, ``background_rms`` — median and ``1.4826 · MAD`` of the source-free
  pixels (unmasked, finite, not within ``grow_px`` of a pixel above 3 σ), e⁻.
* ``astrometric_offset_px``, ``astrometric_rms_px``, ``astrometric_n_stars`` — epochs
  only: the epoch coadd's fitted star centres matched (within ``match_px``) to the
  reference coadd's in the same tile; the offset is the length of the 3 σ-clipped mean
  displacement (what misregisters the difference), the rms the per-star scatter.
* ``score_std`` — epochs only: ``1.4826 · MAD`` of ZOGY's ``S_corr`` in source-free
  pixels (``|S_corr| < 5`` grown by ``grow_px``); 1 when the noise model is right.
* ``n_detections`` — rows in the catalog for the tile (coadd sources; difference
  sources of that epoch).
* ``limiting_mag`` — 5 σ point source: ``zp − 2.5 log10(5 · sqrt(V · N_eff))``, ``V`` the
  median variance of the unmasked pixels (the difference's for epochs), ``N_eff = 1 /
  Σ P²`` of the unit-sum PSF; ``zp`` the inputs' header zeropoint (MAGZPT, MAGZERO,
  PHOTZP, ZEROPT, MAGZP) for the frame's counts, else 0 (instrumental magnitudes of
  e⁻ per frame; ``zeropoint_mag`` is then NULL).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> img = rng.normal(10.0, 2.0, (256, 256))
>>> bg = background_stats(img, np.zeros(img.shape, np.uint16))
>>> round(bg.level, 1), round(bg.rms, 1)
(10.0, 2.0)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from lazysky.errors import ParameterError
from lazysky.pipeline._mask import MaskBit

if TYPE_CHECKING:
    from lazysky.config import QaThresholds

__all__ = [
    "METRICS",
    "QA_KINDS",
    "ZEROPOINT_KEYS",
    "Background",
    "QaPlan",
    "background_stats",
    "flag_tile",
    "limiting_magnitude",
    "match_stars",
    "merge_plans",
    "plan_qa",
    "qa_tasks",
    "record_qa",
    "run_qa",
    "score_std",
    "source_mask",
    "tile_qa",
    "zeropoint_from_headers",
]

logger = logging.getLogger(__name__)

#: The numbers of a tile's QA (columns of ``tile_qa``), in order.
METRICS = ("psf_fwhm_px", "psf_beta", "psf_n_stars", "background", "background_rms",
           "astrometric_offset_px", "astrometric_rms_px", "astrometric_n_stars",
           "score_std", "n_detections", "limiting_mag")
#: Kinds of product QA knows: the reference coadd and a science epoch (its difference).
QA_KINDS = ("coadd", "diff")
#: Header keywords read as a photometric zeropoint (magnitude of 1 count per frame).
ZEROPOINT_KEYS = ("MAGZPT", "MAGZERO", "PHOTZP", "ZEROPT", "MAGZP")
BAD_BITS = int(MaskBit.BAD | MaskBit.SAT | MaskBit.CR | MaskBit.NODATA)
MIN_PIXELS = 50  # fewer source-free pixels than this: the statistic is NaN


@dataclass(frozen=True)
class Background:
    """Source-free background of a tile: median level, robust rms, pixels used."""

    level: float
    rms: float
    n_pixels: int


def _robust(values: NDArray[Any]) -> tuple[float, float]:
    med = float(np.median(values))
    return med, 1.4826 * float(np.median(np.abs(values - med)))


def _source_free(
    data: NDArray[Any], good: NDArray[np.bool_], above: NDArray[np.bool_], grow_px: int
) -> NDArray[np.bool_]:
    """``good`` minus the pixels within ``grow_px`` of one in ``above``."""
    if grow_px > 0 and above.any():
        yy, xx = np.mgrid[-grow_px : grow_px + 1, -grow_px : grow_px + 1]
        above = ndimage.binary_dilation(above, structure=(yy**2 + xx**2) <= grow_px**2)
    return good & ~above


def source_mask(
    image: NDArray[Any], mask: NDArray[Any], *, nsigma: float = 3.0, grow_px: int = 4,
    bad_bits: int = BAD_BITS,
) -> NDArray[np.bool_]:  # fmt: skip
    """Pixels of sources: above ``median + nsigma · rms`` (robust, of the unmasked finite
    pixels), grown by a disk of ``grow_px``.

    Examples
    --------
    >>> img = np.zeros((9, 9)); img[4, 4] = 100.0
    >>> int(source_mask(img, np.zeros((9, 9), np.uint16), grow_px=1).sum())
    5
    """
    img = np.asarray(image, dtype=np.float64)
    good = np.isfinite(img) & ((np.asarray(mask).astype(np.int64) & bad_bits) == 0)
    if not good.any():
        return np.zeros(img.shape, dtype=bool)
    med, rms = _robust(img[good])
    above = good & (img > med + nsigma * max(rms, 1e-30))
    return ~_source_free(img, np.ones(img.shape, dtype=bool), above, grow_px)


def background_stats(
    image: NDArray[Any], mask: NDArray[Any], *, nsigma: float = 3.0, grow_px: int = 4,
    bad_bits: int = BAD_BITS, sources: NDArray[Any] | None = None,
) -> Background:  # fmt: skip
    """Median and ``1.4826 · MAD`` of an image's source-free pixels.

    Sources: :func:`source_mask` (``nsigma``, ``grow_px``), or ``sources`` when given
    (that mask, already computed); masked (``bad_bits``) and non-finite pixels never
    count. NaN when fewer than ``MIN_PIXELS`` remain.

    Examples
    --------
    >>> img = np.full((40, 40), 5.0); img[20, 20] = 1e4
    >>> b = background_stats(img, np.zeros(img.shape, np.uint16))
    >>> b.level, b.rms, b.n_pixels  # the star and a disk of 4 pixels around it dropped
    (5.0, 0.0, 1551)
    """
    img = np.asarray(image, dtype=np.float64)
    good = np.isfinite(img) & ((np.asarray(mask).astype(np.int64) & bad_bits) == 0)
    if np.count_nonzero(good) < MIN_PIXELS:
        return Background(math.nan, math.nan, 0)
    if sources is None:
        sources = source_mask(img, mask, nsigma=nsigma, grow_px=grow_px, bad_bits=bad_bits)
    free = good & ~np.asarray(sources, dtype=bool)
    n = int(np.count_nonzero(free))
    if n < MIN_PIXELS:
        return Background(math.nan, math.nan, n)
    level, rms = _robust(img[free])
    return Background(level, rms, n)


def score_std(
    score: NDArray[Any], mask: NDArray[Any], *, sources: NDArray[Any] | None = None,
    source_sigma: float = 5.0, grow_px: int = 4, bad_bits: int = BAD_BITS,
) -> float:  # fmt: skip
    """``1.4826 · MAD`` of S_corr in source-free pixels: away from ``sources`` (e.g.
    :func:`source_mask` of the science coadd: the astrometric-noise term of S_corr damps
    it near every star) and from ``|S| ≥ source_sigma`` grown by ``grow_px``, unmasked.
    1 when the difference's noise model is right.

    Examples
    --------
    >>> s = np.random.default_rng(2).normal(0, 1, (80, 80)); s[40, 40] = 50
    >>> round(score_std(s, np.zeros(s.shape, np.uint16)), 1)
    1.0
    """
    s = np.asarray(score, dtype=np.float64)
    good = np.isfinite(s) & ((np.asarray(mask).astype(np.int64) & bad_bits) == 0)
    if sources is not None:
        good &= ~np.asarray(sources, dtype=bool)
    free = _source_free(s, good, good & (np.abs(s) >= source_sigma), grow_px)
    if np.count_nonzero(free) < MIN_PIXELS:
        return math.nan
    return _robust(s[free])[1]


def limiting_magnitude(
    variance: NDArray[Any], mask: NDArray[Any], psf: NDArray[Any], *,
    zeropoint_mag: float | None = None, nsigma: float = 5.0, bad_bits: int = BAD_BITS,
) -> float:  # fmt: skip
    """The ``nsigma`` point-source limiting magnitude of an image.

    ``zp − 2.5 log10(nsigma · sqrt(V · N_eff))`` with ``V`` the median variance of the
    unmasked pixels and ``N_eff = 1 / Σ P²`` the noise-equivalent area of the PSF stamp
    (normalised to sum 1 here); ``zp`` 0 when ``zeropoint_mag`` is None (instrumental).

    Examples
    --------
    >>> psf = np.zeros((5, 5)); psf[2, 2] = 1.0
    >>> limiting_magnitude(np.full((9, 9), 4.0), np.zeros((9, 9), np.uint16), psf,
    ...                    zeropoint_mag=25.0)
    22.5
    """
    var = np.asarray(variance, dtype=np.float64)
    good = np.isfinite(var) & (var > 0) & ((np.asarray(mask).astype(np.int64) & bad_bits) == 0)
    p = np.asarray(psf, dtype=np.float64)
    total = float(np.sum(p))
    if not good.any() or not total > 0:
        return math.nan
    n_eff = 1.0 / float(np.sum((p / total) ** 2))
    flux = nsigma * math.sqrt(float(np.median(var[good])) * n_eff)
    return (zeropoint_mag or 0.0) - 2.5 * math.log10(flux)


def match_stars(
    stars: NDArray[Any], reference: NDArray[Any], *, match_px: float = 1.5,
    clip_sigma: float = 3.0,
) -> tuple[float, float, int]:  # fmt: skip
    """Astrometric residual of ``stars`` against ``reference`` (``(n, ≥2)`` x, y columns).

    Each star is paired with its nearest reference star within ``match_px``; the
    displacements are 3 σ-clipped (about their median); returns the length of their mean
    (the systematic offset, pixels), their rms about that mean (per-star scatter) and the
    number of pairs kept. NaN, NaN, 0 without a pair.

    Examples
    --------
    >>> ref = np.array([[10.0, 10.0], [30.0, 12.0], [20.0, 40.0]])
    >>> off, rms, n = match_stars(ref + [0.03, -0.04], ref)
    >>> round(off, 3), n
    (0.05, 3)
    """
    a = np.asarray(stars, dtype=np.float64).reshape(-1, np.shape(stars)[-1] or 2)[:, :2]
    b = np.asarray(reference, dtype=np.float64).reshape(-1, np.shape(reference)[-1] or 2)[:, :2]
    a, b = a[np.isfinite(a).all(axis=1)], b[np.isfinite(b).all(axis=1)]
    if not len(a) or not len(b):
        return math.nan, math.nan, 0
    dist = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    nearest = np.argmin(dist, axis=1)
    ok = dist[np.arange(len(a)), nearest] <= match_px
    d = a[ok] - b[nearest[ok]]
    if not len(d):
        return math.nan, math.nan, 0
    keep = np.ones(len(d), dtype=bool)
    for _ in range(3):
        centre = np.median(d[keep], axis=0)
        r = np.hypot(*(d - centre).T)
        scale = max(1.4826 * float(np.median(r[keep])), 1e-3)
        new = r <= clip_sigma * scale
        if new.sum() < 1 or (new == keep).all():
            break
        keep = new
    mean = d[keep].mean(axis=0)
    rms = float(np.sqrt(np.mean(np.sum((d[keep] - mean) ** 2, axis=1))))
    return float(np.hypot(*mean)), rms, int(keep.sum())


def zeropoint_from_headers(headers: Sequence[Mapping[str, Any]]) -> float | None:
    """The photometric zeropoint the input headers agree on (first of
    :data:`ZEROPOINT_KEYS` found in each; their median), or None when one lacks it.

    Examples
    --------
    >>> zeropoint_from_headers([{"MAGZPT": 27.0}, {"MAGZPT": 27.2}])
    27.1
    >>> zeropoint_from_headers([{"EXPTIME": 60.0}]) is None
    True
    """
    found = []
    for h in headers:
        zp = next((h[k] for k in ZEROPOINT_KEYS if k in h and h[k] not in (None, "")), None)
        try:
            value = float(zp) if zp is not None else math.nan
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            return None
        found.append(value)
    return round(float(np.median(found)), 6) if found else None


def _fit_psf(
    image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any], stamp_px: int
) -> tuple[float, float, int, NDArray[np.float64]]:
    from lazysky.pipeline.psf import PsfFallbackWarning, estimate_psf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PsfFallbackWarning)
        psf = estimate_psf(np.nan_to_num(np.asarray(image, np.float64)),
                           np.where(np.isfinite(variance), variance, np.inf),
                           np.asarray(mask), size_px=stamp_px, snr_min=20.0, min_stars=1,
                           warn=False)  # fmt: skip
    if psf.fallback:
        return math.nan, math.nan, 0, np.zeros((0, 4))
    return psf.fwhm_px, psf.beta, psf.n_stars, psf.stars


def tile_qa(
    image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any], *,
    stored_psf: NDArray[Any], stored_fwhm_px: float, stored_beta: float,
    n_detections: int, zeropoint_mag: float | None = None,
    reference_stars: NDArray[Any] | None = None,
    score: NDArray[Any] | None = None, diff_variance: NDArray[Any] | None = None,
    diff_mask: NDArray[Any] | None = None, diff_psf: NDArray[Any] | None = None,
    stamp_px: int = 11, match_px: float = 1.5,
) -> dict[str, Any]:  # fmt: skip
    """Every QA number of one tile of one product (the kernel of a ``qa-…`` task).

    ``image``, ``variance``, ``mask``: the tile of the coadd (the reference, or the
    epoch's science coadd). For an epoch, also the reference's fitted ``reference_stars``
    (``(n, ≥2)`` x, y in the tile), and the difference's ``score``, ``diff_variance``,
    ``diff_mask``, ``diff_psf``. Returns a dict of :data:`METRICS` plus ``psf_source``
    (``qa-fit`` or ``product``), ``zeropoint_mag`` and ``stars`` (``(n, 4)``: x, y, flux,
    flux error of the fitted stars, for an epoch's astrometry).
    """
    from lazysky.pipeline.psf import moffat_stamp

    fwhm, beta, n_stars, stars = _fit_psf(image, variance, mask, stamp_px)
    source = "qa-fit"
    if not n_stars:
        fwhm, beta, source = float(stored_fwhm_px), float(stored_beta), "product"
    grow = max(2, round(1.5 * fwhm)) if fwhm > 0 else 4
    sources = source_mask(image, mask, grow_px=grow)  # for the background and S_corr
    bg = background_stats(image, mask, grow_px=grow, sources=sources)
    out: dict[str, Any] = {
        "psf_fwhm_px": fwhm, "psf_beta": beta, "psf_n_stars": n_stars, "psf_source": source,
        "background": bg.level, "background_rms": bg.rms,
        "astrometric_offset_px": math.nan, "astrometric_rms_px": math.nan,
        "astrometric_n_stars": 0, "score_std": math.nan, "n_detections": int(n_detections),
        "zeropoint_mag": zeropoint_mag, "stars": stars,
    }
    if score is None:
        stamp = (moffat_stamp(fwhm, beta, 4 * math.ceil(fwhm) + 1) if source == "qa-fit"
                 else np.asarray(stored_psf))
        out["limiting_mag"] = limiting_magnitude(variance, mask, stamp,
                                                 zeropoint_mag=zeropoint_mag)
        return out
    if reference_stars is not None:
        off, rms, n = match_stars(stars, reference_stars, match_px=match_px)
        out.update(astrometric_offset_px=off, astrometric_rms_px=rms, astrometric_n_stars=n)
    dmask = np.asarray(diff_mask) if diff_mask is not None else np.asarray(mask)
    out["score_std"] = score_std(score, dmask, grow_px=grow, sources=sources)
    out["limiting_mag"] = limiting_magnitude(
        diff_variance if diff_variance is not None else variance, dmask,
        diff_psf if diff_psf is not None else np.asarray(stored_psf),
        zeropoint_mag=zeropoint_mag)
    return out


def flag_tile(values: Mapping[str, Any], thresholds: QaThresholds, *,
              pixel_scale_arcsec: float) -> list[str]:
    """Why a tile is flagged (empty: it is not), from its QA values and the thresholds.

    A metric that is NaN (not measurable on this tile) never flags; a PSF not fitted by
    QA on the tile's stars flags when ``psf_min_stars`` > 0.

    Examples
    --------
    >>> from lazysky.config import QaThresholds
    >>> flag_tile({"psf_fwhm_px": 8.0, "psf_n_stars": 5}, QaThresholds(),
    ...           pixel_scale_arcsec=0.5)
    ['psf_fwhm 4.00 arcsec > 3.00']
    """
    t = thresholds
    reasons = []

    def get(name: str) -> float:
        v = values.get(name)
        return float(v) if v is not None and np.isfinite(float(v)) else math.nan

    fwhm = get("psf_fwhm_px") * pixel_scale_arcsec
    if t.psf_fwhm_arcsec_max is not None and fwhm > t.psf_fwhm_arcsec_max:
        reasons.append(f"psf_fwhm {fwhm:.2f} arcsec > {t.psf_fwhm_arcsec_max:.2f}")
    n_stars = int(values.get("psf_n_stars") or 0)
    if n_stars < t.psf_min_stars:
        reasons.append(f"psf_n_stars {n_stars} < {t.psf_min_stars}")
    rms = get("background_rms")
    if t.background_rms_max is not None and rms > t.background_rms_max:
        reasons.append(f"background_rms {rms:.4g} > {t.background_rms_max:.4g}")
    off = get("astrometric_offset_px")
    if t.astrometric_offset_px_max is not None and off > t.astrometric_offset_px_max:
        reasons.append(f"astrometric_offset {off:.3f} px > {t.astrometric_offset_px_max:.3f}")
    s = get("score_std")
    if t.score_std_tolerance is not None and abs(s - 1.0) > t.score_std_tolerance:
        reasons.append(f"score_std {s:.3f} outside 1 ± {t.score_std_tolerance:.3f}")
    m = get("limiting_mag")
    if t.limiting_mag_min is not None and m < t.limiting_mag_min:
        reasons.append(f"limiting_mag {m:.2f} < {t.limiting_mag_min:.2f}")
    return reasons


def _tile_chunks(n: int, tile_px: int) -> tuple[int, ...]:
    return (tile_px,) * (n // tile_px) + ((n % tile_px,) if n % tile_px else ())


def _per_tile(arr: Any, grid: Any, *, pixels: bool) -> Any:
    """``f(iy, ix)``: tile ``(iy, ix)`` of ``arr`` (pixels on ``(y, x)``, or one value per
    tile on ``(tile_y, tile_x, …)``) as a Delayed sharing the keys of its graph.

    An array chunked one block per tile (a product, or the graph being written) is turned
    into Delayed objects once (``to_delayed(optimize_graph=False)``: its original keys);
    building one per tile and variable from slices walked the whole graph each time,
    1.5 s of the client's time on the demo's 27 tiles × products. Other chunkings take a
    window per tile (:func:`lazysky._dask.window_delayed`); numpy passes through.
    """
    import dask.array as da

    from lazysky._dask import window_delayed

    nty, ntx = grid.n_tiles
    tp = grid.tile_px
    if not isinstance(arr, da.Array):
        return (lambda iy, ix: arr[iy * tp:(iy + 1) * tp, ix * tp:(ix + 1) * tp]) if pixels \
            else (lambda iy, ix: arr[iy, ix])
    if pixels:
        aligned = arr.ndim == 2 and tuple(arr.chunks) == (
            _tile_chunks(int(grid.shape[0]), tp), _tile_chunks(int(grid.shape[1]), tp))
    else:
        aligned = (arr.ndim >= 2 and arr.chunks[:2] == ((1,) * nty, (1,) * ntx)
                   and all(len(c) == 1 for c in arr.chunks[2:]))
    if aligned:
        blocks = arr.to_delayed(optimize_graph=False)
        rest = (0,) * (arr.ndim - 2)
        return lambda iy, ix: blocks[(iy, ix, *rest)]
    if pixels:
        return lambda iy, ix: window_delayed(arr[iy * tp:(iy + 1) * tp, ix * tp:(ix + 1) * tp])
    return lambda iy, ix: window_delayed(arr[iy, ix])


def qa_tasks(
    reference: Any, epochs: Mapping[str, tuple[Any, Any]], *, run_id: str,
    n_detections: Mapping[tuple[str, str], int], zeropoints: Mapping[str, float | None],
    tiles: Sequence[str] | None = None, stamp_px: int = 11,
) -> dict[tuple[str, str], Any]:  # fmt: skip
    """The lazy QA of a run: ``{(product, tile): Delayed dict}`` (nothing computes).

    ``reference`` is the reference coadd (a product Dataset as
    :func:`lazysky.zarr_store.products.open_product` returns, with the PSF variables);
    ``epochs`` maps each epoch's product name to ``(science coadd, difference)``;
    ``n_detections`` maps ``(product, tile)`` to the catalog's row count; ``zeropoints``
    maps product names to their header zeropoint. One task per tile and product, named
    ``qa-<product>-<tile>-<run_id>``; an epoch's task depends on the reference's (its
    stars). Product names are the reference's ``name`` attribute and the keys of
    ``epochs``.

    Examples
    --------
    >>> tasks = qa_tasks(ref, {"deep1-v2": (sci, diff)}, run_id=run_id,
    ...                  n_detections={}, zeropoints={})  # doctest: +SKIP
    >>> dask.compute(tasks)  # doctest: +SKIP
    """
    from dask.base import tokenize
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    from lazysky.pipeline.grid import parse_tile
    from lazysky.zarr_store.products import product_grid

    grid = product_grid(reference)
    todo = list(tiles) if tiles is not None else grid.tile_ids()
    ref_name = str(reference.attrs.get("name", "reference"))
    if ref_name in epochs:
        msg = f"the epoch products {sorted(epochs)} include the reference's name {ref_name!r}"
        raise ParameterError(msg)
    # every block goes in by the key of its graph's own task (_per_tile): a dask array
    # passed to a Delayed would be optimised on its own, recomputing the lazy products
    # QA is given beside their writes
    getters: dict[tuple[int, str], Any] = {}
    deps: dict[str, Any] = {}  # one Delayed per graph the tasks read (by its name)

    def block(ds: Any, var: str, iy: int, ix: int) -> Any:
        key = (id(ds), var)
        if key not in getters:
            getters[key] = _per_tile(ds[var].data, grid, pixels=ds[var].ndim == 2
                                     and ds[var].dims[-2:] == ("y", "x"))
        got = getters[key](iy, ix)
        if isinstance(got, Delayed):
            k = got.key
            deps.setdefault(str(k[0] if isinstance(k, tuple) else k), got)
            return got.key
        return got

    # the tasks go in as one graph layer naming their blocks' keys: a Delayed call per
    # task would merge (cull) the graphs of its arguments each time, ~13 ms per task on
    # the graphs being written (0.36 s for 27 tasks)
    layer: dict[Any, Any] = {}
    out_keys: dict[tuple[str, str], str] = {}
    for tile in todo:
        iy, ix = parse_tile(tile)

        def arrays(ds: Any) -> list[Any]:
            return [block(ds, v, iy, ix) for v in  # noqa: B023
                    ("image", "variance", "mask", "psf", "psf_fwhm", "psf_beta")]

        ref_key = f"qa-{ref_name}-{tile}-{run_id}"
        layer[ref_key] = (_tile_task, arrays(reference), None, {
            "n_detections": int(n_detections.get((ref_name, tile), 0)),
            "zeropoint_mag": zeropoints.get(ref_name), "stamp_px": stamp_px})
        out_keys[(ref_name, tile)] = ref_key
        stars_key = f"qa-stars-{ref_name}-{tile}-{run_id}"
        layer[stars_key] = (_stars, ref_key)
        for name, (sci, diff) in epochs.items():
            diff_arrays = [block(diff, v, iy, ix) for v in ("score", "variance", "mask",
                                                            "psf")]
            key = f"qa-{name}-{tile}-{run_id}"
            layer[key] = (_tile_task, arrays(sci) + diff_arrays, stars_key, {
                "n_detections": int(n_detections.get((name, tile), 0)),
                "zeropoint_mag": zeropoints.get(name), "stamp_px": stamp_px})
            out_keys[(name, tile)] = key
    if not layer:
        return {}
    name = f"qa-{tokenize(sorted(layer), list(deps))}"
    graph = HighLevelGraph.from_collections(name, layer, dependencies=list(deps.values()))
    return {k: Delayed(key, graph, layer=name) for k, key in out_keys.items()}


def _tile_task(arrays: Sequence[Any], stars: Any,
               options: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`tile_qa` on ``[image, variance, mask, psf, psf_fwhm, psf_beta]`` (+ for an
    epoch ``[score, diff variance, diff mask, diff psf]`` and the reference's stars)."""
    image, variance, mask, psf, fwhm, beta = arrays[:6]

    def stamp(p: Any) -> NDArray[Any]:  # a tile's block keeps its (1, 1) tile axes
        a = np.asarray(p)
        return a.reshape(a.shape[-2:])

    def value(v: Any) -> float:
        return float(np.asarray(v).reshape(-1)[0])

    extra: dict[str, Any] = {}
    if len(arrays) > 6:
        score, dvar, dmask, dpsf = arrays[6:10]
        extra = {"reference_stars": stars, "score": score, "diff_variance": dvar,
                 "diff_mask": dmask, "diff_psf": stamp(dpsf)}
    return tile_qa(image, variance, mask, stored_psf=stamp(psf), stored_fwhm_px=value(fwhm),
                   stored_beta=value(beta), **options, **extra)


def _stars(result: Mapping[str, Any]) -> Any:
    return result["stars"]


def _detections(run_id: str, reference: str, epochs: Mapping[str, Sequence[str]],
                catalog: Any) -> dict[tuple[str, str], int]:
    """Catalog rows per (product, tile): coadd sources, and each epoch's difference sources
    (the runner writes an epoch's rows with its first exposure's id)."""
    import sqlalchemy as sa

    from lazysky.catalog import diff_sources, done_tiles

    counts = {(reference, t): n
              for t, n in done_tiles(run_id, "detect-coadd", catalog=catalog).items()}
    first = {ids[0]: name for name, ids in epochs.items() if ids}
    with catalog.engine().connect() as conn:
        got = conn.execute(
            sa.select(diff_sources.c.tile_id, diff_sources.c.exposure_id, sa.func.count())
            .where(diff_sources.c.run_id == run_id)
            .group_by(diff_sources.c.tile_id, diff_sources.c.exposure_id)).all()
    for tile, exposure, n in got:
        if exposure in first:
            counts[(first[exposure], str(tile))] = int(n)
    return counts


def _header(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    from lazysky.zarr_store._headers import cards_to_header

    try:
        return cards_to_header(meta.get("primary_header") or [])
    except (TypeError, ValueError):
        return {}


@dataclass(frozen=True)
class QaPlan:
    """The QA a run still needs (:func:`plan_qa`): lazy values to compute, then
    :func:`record_qa`.

    ``keys[i]`` is the ``(product, tile)`` of ``tasks[i]`` (a Delayed dict of
    :func:`tile_qa`, its ``n_detections`` not yet filled in: the catalog's counts are
    read when the values are recorded, so QA can compute alongside detection).
    """

    run_id: str
    reference: str
    epochs: Mapping[str, Sequence[str]]
    keys: list[tuple[str, str]]
    tasks: list[Any]
    pixel_scale_arcsec: float


def plan_qa(
    store: Any, run_id: str, *, reference: str, reference_ids: Sequence[str],
    epochs: Mapping[str, Sequence[str]], meta: Mapping[str, Mapping[str, Any]],
    catalog: Any, settings: Any = None, tiles: Sequence[str] | None = None,
    products: Mapping[str, tuple[Any, Any]] | None = None,
) -> QaPlan:  # fmt: skip
    """The lazy QA of the (product, tile) pairs of a run missing from ``tile_qa``.

    Arguments as :func:`run_qa`'s. Nothing computes; the reference coadd must be written,
    the catalog's detections need not be yet. ``products`` maps each epoch's product name
    to its ``(science coadd, difference)`` Datasets to measure instead of the written
    products: the lazy graphs being written, so that QA computes alongside the writes
    (sharing their in-memory tiles) and reads nothing back (the runner does this);
    without it, the written epochs are opened.

    Examples
    --------
    >>> plan = plan_qa(store, run_id, reference="deep1", reference_ids=ref_ids,
    ...                epochs={"deep1-v2": ids}, meta=meta, catalog=catalog)  # doctest: +SKIP
    >>> record_qa(store, plan, dask.compute(plan.tasks)[0], catalog=catalog,
    ...           thresholds=QaThresholds())  # doctest: +SKIP
    """
    from lazysky.catalog.qa import read_qa
    from lazysky.zarr_store.products import open_product, product_grid

    given = dict(products or {})
    missing = sorted(set(given) - set(epochs))
    if missing:
        msg = f"products: {missing} are not among the epochs {sorted(epochs)}"
        raise ParameterError(msg)
    ref = open_product(store, run_id, "coadd", reference, settings=settings)
    grid = product_grid(ref)
    have = read_qa(run_id, catalog=catalog)
    done = {(str(p), str(t)) for p, t in zip(have["product"], have["tile_id"], strict=True)}
    names = [reference, *epochs]
    todo = [t for t in (grid.tile_ids() if tiles is None else tiles)
            if any((n, t) not in done for n in names)]
    tasks: dict[tuple[str, str], Any] = {}
    if todo:
        opened = {n: given[n] if n in given else (
            open_product(store, run_id, "coadd", n, settings=settings),
            open_product(store, run_id, "diff", n, settings=settings)) for n in epochs}
        zps = {n: zeropoint_from_headers([_header(meta.get(e, {})) for e in ids])
               for n, ids in [(reference, reference_ids), *epochs.items()]}
        tasks = qa_tasks(ref, opened, run_id=run_id, tiles=todo, zeropoints=zps,
                         n_detections={})
    return QaPlan(run_id=run_id, reference=reference, epochs=dict(epochs),
                  keys=list(tasks), tasks=list(tasks.values()),
                  pixel_scale_arcsec=grid.pixel_scale_arcsec)


def merge_plans(plans: Sequence[QaPlan]) -> QaPlan:
    """One plan of several of one run (their keys and tasks in order), to record at once.

    Raises
    ------
    ParameterError
        No plan, or plans of different runs or references.
    """
    if not plans:
        raise ParameterError("merge_plans: expected at least one QaPlan, got none")
    first = plans[0]
    other = [(p.run_id, p.reference) for p in plans
             if (p.run_id, p.reference) != (first.run_id, first.reference)]
    if other:
        msg = (f"merge_plans: every plan must be of run {first.run_id} and reference "
               f"{first.reference!r}; got (run, reference) {other}")
        raise ParameterError(msg)
    keys = [k for p in plans for k in p.keys]
    if len(set(keys)) != len(keys):
        raise ParameterError("merge_plans: a (product, tile) pair is in two plans")
    return dataclasses.replace(first, keys=keys, tasks=[t for p in plans for t in p.tasks])


def record_qa(
    store: Any, plan: QaPlan, values: Sequence[Mapping[str, Any]], *, catalog: Any,
    thresholds: QaThresholds, settings: Any = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Record a plan's computed ``values``: the catalog's detection counts, the flags,
    ``tile_qa`` rows, and the products' ``qa``/``qa_flagged`` attributes (all of the run's
    QA, not only this plan's). Call it once the run's detections are written.

    Returns :func:`run_qa`'s per-tile dict.
    """
    from lazysky.catalog.qa import read_qa, rows_by_tile, write_qa
    from lazysky.zarr_store.products import annotate_products

    run_id, reference = plan.run_id, plan.reference
    if len(values) != len(plan.keys):
        msg = f"{len(values)} QA value(s) for a plan of {len(plan.keys)} (product, tile) pairs"
        raise ParameterError(msg)
    if plan.keys:
        counts = _detections(run_id, reference, plan.epochs, catalog)
        scale = plan.pixel_scale_arcsec
        rows = []
        for (name, tile), got in zip(plan.keys, values, strict=True):
            v = {**got, "n_detections": int(counts.get((name, tile), 0))}
            reasons = flag_tile(v, thresholds, pixel_scale_arcsec=scale)
            rows.append({**{k: v[k] for k in (*METRICS, "psf_source", "zeropoint_mag")},
                         "product": name, "tile_id": tile,
                         "kind": "coadd" if name == reference else "diff",
                         "psf_fwhm_arcsec": float(v["psf_fwhm_px"]) * scale,
                         "flagged": bool(reasons), "reasons": reasons})
        write_qa(run_id, rows, catalog=catalog)
        n_flag = sum(r["flagged"] for r in rows)
        logger.info("qa: %d tile(s) x product(s) measured, %d flagged", len(rows), n_flag)
    table = read_qa(run_id, catalog=catalog)
    by_tile = rows_by_tile(dict(zip(table.colnames, row, strict=True)) for row in table)
    flagged = sorted({f"{p}/{t}" for p, t, f in zip(table["product"], table["tile_id"],
                                                     table["flagged"], strict=True) if f})
    annotate_products(store, run_id, {"qa": by_tile, "qa_flagged": flagged,
                                      "qa_thresholds": thresholds.model_dump()},
                      settings=settings)
    return by_tile


def run_qa(
    store: Any, run_id: str, *, reference: str, reference_ids: Sequence[str],
    epochs: Mapping[str, Sequence[str]], meta: Mapping[str, Mapping[str, Any]],
    catalog: Any, thresholds: QaThresholds, compute: Any = None, settings: Any = None,
    tiles: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The ``qa`` stage of a run: compute the missing tiles' QA, record it, flag tiles.

    ``reference`` is the reference coadd's product name, ``epochs`` maps each epoch's
    product name to its exposures, ``meta`` the exposures' metadata (for zeropoints);
    ``compute(collection, label)`` computes on the run's cluster (default
    ``dask.compute``); ``tiles`` the tiles the run processed (default: all of the grid).
    Rows already in ``tile_qa`` are kept (idempotent on resume); every product's
    attributes get ``qa`` (the run's QA per tile) and ``qa_flagged``. The same as
    :func:`plan_qa`, computing its tasks, then :func:`record_qa` (the runner computes
    the plan alongside detection).

    Returns
    -------
    dict
        ``{tile_id: {product: {metric: value, ..., "flagged", "reasons"}}}``.
    """
    import dask

    plan = plan_qa(store, run_id, reference=reference, reference_ids=reference_ids,
                   epochs=epochs, meta=meta, catalog=catalog, settings=settings, tiles=tiles)
    values: Sequence[Mapping[str, Any]] = []
    if plan.tasks:
        values = (compute(plan.tasks, "qa") if compute is not None
                  else dask.compute(plan.tasks)[0])
    return record_qa(store, plan, values, catalog=catalog, thresholds=thresholds,
                     settings=settings)

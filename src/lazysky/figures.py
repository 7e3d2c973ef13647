"""QA figures of a run (PNG): the tile map, QA histograms, cutouts of new transients.

* :func:`tile_map` — the run's grid on the sky (RA/Dec of the tile corners), each tile
  coloured by one QA metric of one product, flagged tiles crossed in red;
* :func:`qa_histograms` — one panel per QA metric, a histogram per product;
* :func:`transient_cutouts` — reference, science and difference cutouts around the
  brightest positive difference-image sources of the catalog (``diff_sources``,
  ``sign = +1``, by S/N);
* :func:`qa_figures` — all three for a run, into a directory (what ``lazysky demo``
  writes).

Images are scaled with :mod:`astropy.visualization` (z-scale interval, asinh stretch);
matplotlib runs on its Agg backend (no display needed). The data come from the catalog
(:func:`lazysky.catalog.qa.read_qa`, ``diff_sources``) and the run's products in the store.

Examples
--------
>>> from lazysky.figures import qa_figures
>>> qa_figures(run_id, store="lazysky-data", out_dir="qa")  # doctest: +SKIP
[PosixPath('qa/qa_tile_map.png'), PosixPath('qa/qa_histograms.png'), ...]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lazysky.errors import OutputError, ParameterError

__all__ = ["MAP_METRICS", "qa_figures", "qa_histograms", "tile_map", "transient_cutouts"]

logger = logging.getLogger(__name__)

#: Metrics a tile map can show (columns of ``tile_qa``).
MAP_METRICS = ("psf_fwhm_arcsec", "psf_fwhm_px", "background", "background_rms",
               "astrometric_offset_px", "score_std", "n_detections", "limiting_mag")
_HIST_METRICS = ("psf_fwhm_arcsec", "background_rms", "astrometric_offset_px", "score_std",
                 "n_detections", "limiting_mag")
_DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _out(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the figure directory {str(p.parent)!r}: {exc.strerror}"
        raise OutputError(msg) from None
    return p


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=_DPI)
    except OSError as exc:
        msg = f"cannot write the figure {str(path)!r}: {exc.strerror}"
        raise OutputError(msg) from None
    finally:
        plt.close(fig)
    return path


def tile_map(qa: Any, grid: Any, path: str | os.PathLike[str], *,
             metric: str = "psf_fwhm_arcsec", product: str | None = None) -> Path:
    """The grid's tiles on the sky coloured by ``metric`` of ``product``; flagged crossed.

    Parameters
    ----------
    qa
        The run's QA table (:func:`lazysky.catalog.qa.read_qa`).
    grid
        The run's :class:`~lazysky.pipeline.grid.SkyGrid`.
    path
        Where to write the PNG (800 × 700 pixels).
    metric
        One of :data:`MAP_METRICS`.
    product
        Which product's rows (default: the reference coadd's, ``kind == "coadd"``).

    Examples
    --------
    >>> tile_map(read_qa(run_id), grid, "map.png", metric="score_std",
    ...          product="deep1-v2")  # doctest: +SKIP
    """
    if metric not in MAP_METRICS:
        msg = f"metric must be one of {', '.join(MAP_METRICS)}; got {metric!r}"
        raise ParameterError(msg)
    rows = _rows_of(qa, product)
    plt = _pyplot()
    from matplotlib.collections import PolyCollection

    name = str(rows["product"][0]) if len(rows) else (product or "")
    values = {str(t): float(v) for t, v in zip(rows["tile_id"], rows[metric], strict=True)}
    flagged = {str(t) for t, f in zip(rows["tile_id"], rows["flagged"], strict=True) if f}
    polys, vals, flags = [], [], []
    for tile in grid.tile_ids():
        sy, sx = grid.tile_slices(tile)
        x = np.array([sx.start, sx.stop, sx.stop, sx.start]) - 0.5
        y = np.array([sy.start, sy.start, sy.stop, sy.stop]) - 0.5
        ra, dec = grid.wcs.pixel_to_world_values(x, y)
        polys.append(np.column_stack([ra, dec]))
        vals.append(values.get(tile, np.nan))
        flags.append(tile in flagged)
    fig, ax = plt.subplots(figsize=(8, 7))
    coll = PolyCollection(polys, array=np.ma.masked_invalid(vals), cmap="viridis",
                          edgecolors="0.3", linewidths=0.5)
    ax.add_collection(coll)
    for poly, flag in zip(polys, flags, strict=True):
        if flag:
            ax.plot(poly[[0, 2], 0], poly[[0, 2], 1], color="red", lw=1.5)
            ax.plot(poly[[1, 3], 0], poly[[1, 3], 1], color="red", lw=1.5)
    allp = np.concatenate(polys)
    ax.set_xlim(allp[:, 0].max(), allp[:, 0].min())  # east left
    ax.set_ylim(allp[:, 1].min(), allp[:, 1].max())
    ax.set_xlabel("RA (deg)")
    ax.set_ylabel("Dec (deg)")
    ax.set_title(f"{name}: {metric} per tile ({len(flagged)} flagged, crossed)")
    fig.colorbar(coll, ax=ax, label=metric)
    return _save(fig, _out(path))


def _rows_of(qa: Any, product: str | None) -> Any:
    if product is None:
        keep = np.asarray(qa["kind"] == "coadd", dtype=bool) if len(qa) else np.zeros(0, bool)
    else:
        keep = np.asarray(qa["product"] == product, dtype=bool) if len(qa) else np.zeros(0, bool)
        if len(qa) and not keep.any():
            have = sorted({str(p) for p in qa["product"]})
            msg = f"no QA rows of product {product!r}; the run has {have}"
            raise ParameterError(msg)
    return qa[keep]


def qa_histograms(qa: Any, path: str | os.PathLike[str], *,
                  metrics: Sequence[str] = _HIST_METRICS) -> Path:
    """One panel per metric, a histogram per product (astropy's Scott bins), flagged
    tiles counted in each panel's title. Writes a 1200 × 800 PNG.

    Examples
    --------
    >>> qa_histograms(read_qa(run_id), "hist.png")  # doctest: +SKIP
    """
    from astropy.visualization import hist

    bad = [m for m in metrics if m not in qa.colnames]
    if bad:
        msg = f"unknown QA metric(s) {bad}; the table has {qa.colnames}"
        raise ParameterError(msg)
    plt = _pyplot()
    ncol = 3
    nrow = max(1, -(-len(metrics) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(12, 4 * nrow), squeeze=False)
    products = sorted({str(p) for p in qa["product"]}) if len(qa) else []
    for k, metric in enumerate(metrics):
        ax = axes[k // ncol, k % ncol]
        for p in products:
            sel = np.asarray(qa["product"] == p, dtype=bool)
            v = np.asarray(qa[metric][sel], dtype=float)
            v = v[np.isfinite(v)]
            if len(v) > 1 and np.ptp(v) > 0:
                hist(v, bins="scott", ax=ax, histtype="step", lw=1.5, label=p)
            elif len(v):
                ax.axvline(float(v[0]), lw=1.5, label=p)
        n_flag = int(np.sum(qa["flagged"])) if len(qa) else 0
        ax.set_title(f"{metric} ({n_flag} flagged row(s) in the run)", fontsize=9)
        ax.set_ylabel("tiles")
        if products:
            ax.legend(fontsize=7)
    for k in range(len(metrics), nrow * ncol):
        axes[k // ncol, k % ncol].axis("off")
    fig.tight_layout()
    return _save(fig, _out(path))


def transient_cutouts(run_id: str, path: str | os.PathLike[str], *, store: Any,
                      catalog: Any = None, n: int = 6, half_px: int = 12,
                      settings: Any = None) -> Path | None:
    """Reference / science / difference cutouts of the ``n`` brightest new transients.

    Rows of ``diff_sources`` of the run with ``sign = +1``, highest S/N first; each row of
    the figure is one source (its epoch's science coadd and difference), ``2 · half_px +
    1`` pixels square, scaled by z-scale + asinh. Returns None (and writes nothing) when
    the run has no positive difference source.

    Examples
    --------
    >>> transient_cutouts(run_id, "cutouts.png", store="lazysky-data")  # doctest: +SKIP
    """
    import sqlalchemy as sa
    from astropy.visualization import AsinhStretch, ImageNormalize, ZScaleInterval

    from lazysky.catalog import diff_sources, open_catalog
    from lazysky.zarr_store.products import list_products, open_product, product_grid

    if n < 1 or half_px < 2:
        msg = f"need n >= 1 and half_px >= 2, got n={n}, half_px={half_px}"
        raise ParameterError(msg)
    catalog = catalog if catalog is not None else open_catalog(settings)
    t = diff_sources
    with catalog.engine().connect() as conn:
        got = conn.execute(sa.select(t.c.ra, t.c.dec, t.c.snr, t.c.exposure_id)
                           .where(t.c.run_id == run_id, t.c.sign == 1)
                           .order_by(t.c.snr.desc().nulls_last()).limit(n)).all()
    if not got:
        return None
    diffs = {name: open_product(store, run_id, "diff", name, settings=settings)
             for kind, name in list_products(store, run_id, kind="diff", settings=settings)}
    by_exposure = {str(e): name for name, d in diffs.items()
                   for e in (d.attrs.get("science_inputs") or d.attrs.get("exposures") or [])}
    any_diff = next(iter(diffs.values()))
    reference = open_product(store, run_id, "coadd",
                             str(any_diff.attrs.get("reference_name")
                                 or _reference_name(store, run_id, diffs, settings)),
                             settings=settings)
    grid = product_grid(reference)
    plt = _pyplot()
    fig, axes = plt.subplots(len(got), 3, figsize=(6, 2 * len(got)), squeeze=False)
    for row, (ra, dec, snr, exposure) in enumerate(got):
        name = by_exposure.get(str(exposure), next(iter(diffs)))
        sci = open_product(store, run_id, "coadd", name, settings=settings)
        x, y = grid.wcs.world_to_pixel_values(float(ra), float(dec))
        cy, cx = round(float(y)), round(float(x))
        win = (slice(max(cy - half_px, 0), cy + half_px + 1),
               slice(max(cx - half_px, 0), cx + half_px + 1))
        for col, (label, ds) in enumerate((("reference", reference), ("science", sci),
                                           ("difference", diffs[name]))):
            cut = np.nan_to_num(np.asarray(ds["image"][win].values, dtype=float))
            ax = axes[row, col]
            ax.imshow(cut, origin="lower", cmap="gray", norm=ImageNormalize(
                cut, interval=ZScaleInterval(), stretch=AsinhStretch()))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=9)
        axes[row, 0].set_ylabel(f"{name}\nS/N {float(snr or 0):.0f}", fontsize=8)
    fig.tight_layout()
    return _save(fig, _out(path))


def _reference_name(store: Any, run_id: str, diffs: dict[str, Any], settings: Any) -> str:
    from lazysky.zarr_store.products import list_products

    coadds = [n for _, n in list_products(store, run_id, kind="coadd", settings=settings)]
    ref = [n for n in coadds if n not in diffs]
    if not ref:
        msg = f"run {run_id} has no reference coadd among its products {coadds}"
        raise ParameterError(msg)
    return ref[0]


def qa_figures(run_id: str, *, store: Any, out_dir: str | os.PathLike[str],
               catalog: Any = None, settings: Any = None,
               metric: str = "psf_fwhm_arcsec") -> list[Path]:
    """Write a run's QA figures into ``out_dir``; returns their paths.

    ``qa_tile_map.png`` (the reference coadd's tiles coloured by ``metric``),
    ``qa_tile_map_<epoch>.png`` (each epoch's tiles by ``score_std``),
    ``qa_histograms.png`` and, when the run found new transients,
    ``qa_transients.png``.

    Examples
    --------
    >>> qa_figures(run_id, store="lazysky-data", out_dir="qa")  # doctest: +SKIP
    """
    from lazysky.catalog import open_catalog
    from lazysky.catalog.qa import read_qa
    from lazysky.zarr_store.products import list_products, open_product, product_grid

    catalog = catalog if catalog is not None else open_catalog(settings)
    qa = read_qa(run_id, catalog=catalog)
    if not len(qa):
        msg = (f"run {run_id} has no QA rows in the catalog (was it run with "
               "qa_enabled=false?)")
        raise ParameterError(msg)
    out = Path(out_dir)
    kind, ref_name = next((str(k), str(p)) for k, p in zip(qa["kind"], qa["product"],
                                                            strict=True) if k == "coadd")
    grid = product_grid(open_product(store, run_id, kind, ref_name, settings=settings))
    paths = [tile_map(qa, grid, out / "qa_tile_map.png", metric=metric, product=ref_name)]
    for _, name in list_products(store, run_id, kind="diff", settings=settings):
        if np.any(qa["product"] == name):
            paths.append(tile_map(qa, grid, out / f"qa_tile_map_{name}.png",
                                  metric="score_std", product=name))
    paths.append(qa_histograms(qa, out / "qa_histograms.png"))
    cut = transient_cutouts(run_id, out / "qa_transients.png", store=store, catalog=catalog,
                            settings=settings)
    if cut is not None:
        paths.append(cut)
    logger.info("QA figures of %s: %s", run_id, ", ".join(p.name for p in paths))
    return paths

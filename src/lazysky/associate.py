"""Association across epochs: difference-image sources → objects, with light curves.

A run's difference-image sources (``diff_sources``, one row per detection per epoch)
become **objects**: two detections belong to one object when they lie within

    r_ij = min(k · sqrt(σ_i² + σ_j²), r_max),    σ = max(FWHM / (2.35 · |S/N|), σ_floor)

of each other (the centroid error of a point source, floored by the astrometric error of
the registration, capped), and objects are the connected groups of such pairs. The
candidate pairs come from the catalog on the pgSphere GiST index (``b.pos <@
scircle(a.pos, r_max)``: the indexed column alone on the left, one index probe per
detection, see :func:`association_plan`); the exact, per-pair radius is applied in numpy.
The sign of a detection does not matter: a variable star brighter than the reference in
one epoch and fainter in the next is one object. A mover, whose detections are further
apart between epochs than ``r_max``, stays a string of one-epoch objects.

Every object then gets **forced photometry** at its mean position on every epoch's
difference image: the PSF-weighted flux ``Σ P D / V / Σ P² / V`` with the difference's
own PSF of the tile and its error ``1 / sqrt(Σ P² / V)`` from the variance plane, lazily,
one Dask task per (epoch, tile) named ``forced-<epoch>-<tile>-…``.

:func:`associate` writes ``objects``, ``object_detections`` (the link from each
detection to its object) and ``forced_photometry`` of a run in **one transaction** that
first deletes what an earlier association of that run wrote: re-running it (a repeated
or resumed run) replaces, never duplicates. :func:`lightcurve` reads one object's.

Examples
--------
>>> import lazysky
>>> result = lazysky.associate("test-20260101-0a1b2c3d")  # doctest: +SKIP
>>> lazysky.lightcurve(result.object_ids[0])  # doctest: +SKIP
<Table length=3> mjd flux fluxerr detected exposure_id epoch ...
"""

from __future__ import annotations

import logging
import math
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from lazysky.errors import ParameterError

if TYPE_CHECKING:
    import sqlalchemy as sa
    import xarray as xr
    from astropy.table import Table
    from dask.delayed import Delayed

    from lazysky.catalog import Catalog
    from lazysky.config import Settings

__all__ = [
    "AssociationResult",
    "associate",
    "association_plan",
    "forced_psf_photometry",
    "group_detections",
    "lightcurve",
    "position_sigma_arcsec",
    "run_objects",
]

logger = logging.getLogger(__name__)

#: Defaults of the association radius (see the module docstring).
K_SIGMA = 3.0
FLOOR_ARCSEC = 0.2
MAX_RADIUS_ARCSEC = 2.0
_ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0
FLAG_OFF_IMAGE = 1024
FLAG_MASKED = 2048


@dataclass(frozen=True)
class AssociationResult:
    """What :func:`associate` wrote for a run."""

    run_id: str
    n_objects: int
    n_detections: int
    n_photometry: int
    epochs: tuple[str, ...]
    object_ids: tuple[int, ...]

    def __str__(self) -> str:
        return (f"run {self.run_id}: {self.n_detections} difference sources → "
                f"{self.n_objects} objects; forced photometry on {len(self.epochs)} "
                f"epoch(s): {self.n_photometry} measurements")


# --- pure kernels ---------------------------------------------------------------------
def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        msg = f"{name} must be a positive number, got {value!r}"
        raise ParameterError(msg)
    return float(value)


def position_sigma_arcsec(snr: Any, *, fwhm_arcsec: float,
                          floor_arcsec: float = FLOOR_ARCSEC) -> NDArray[np.float64]:
    """Positional error of detections: ``max(FWHM / (2.35 · |S/N|), floor)`` arcsec.

    Examples
    --------
    >>> position_sigma_arcsec([5.0, 100.0, float("nan")], fwhm_arcsec=1.2, floor_arcsec=0.05)
    array([0.10212766, 0.05      , 1.2       ])
    """
    fwhm = _positive("fwhm_arcsec", fwhm_arcsec)
    floor = _positive("floor_arcsec", floor_arcsec)
    s = np.abs(np.asarray(snr, dtype=np.float64))
    # an unknown S/N: as uncertain as the PSF is wide
    sigma = np.where(np.isfinite(s) & (s > 0), fwhm / (2.35 * np.where(s > 0, s, 1.0)), fwhm)
    return np.asarray(np.maximum(sigma, floor), dtype=np.float64)


def group_detections(n: int, i: Any, j: Any, distance_arcsec: Any, sigma_arcsec: Any, *,
                     k_sigma: float = K_SIGMA,
                     max_radius_arcsec: float = MAX_RADIUS_ARCSEC) -> NDArray[np.int64]:
    """Object label (0 … n_objects − 1) of each of ``n`` detections.

    ``(i, j, distance_arcsec)`` are candidate pairs; a pair links when its distance is
    within ``min(k_sigma · sqrt(σ_i² + σ_j²), max_radius_arcsec)``; objects are the
    connected components. Labels are numbered in order of each object's first detection.

    Examples
    --------
    >>> group_detections(4, [0, 1], [1, 3], [0.1, 5.0], [0.2, 0.2, 0.2, 0.2])
    array([0, 0, 1, 2])
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    k = _positive("k_sigma", k_sigma)
    r_max = _positive("max_radius_arcsec", max_radius_arcsec)
    i_a, j_a = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    d = np.asarray(distance_arcsec, dtype=np.float64)
    sig = np.asarray(sigma_arcsec, dtype=np.float64)
    if sig.shape != (n,) or not (i_a.shape == j_a.shape == d.shape):
        msg = (f"need one sigma per detection ({n}) and equal-length pairs; got "
               f"{sig.shape}, {i_a.shape}, {j_a.shape}, {d.shape}")
        raise ParameterError(msg)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    radius = np.minimum(k * np.hypot(sig[i_a], sig[j_a]), r_max)
    keep = d <= radius
    graph = coo_matrix((np.ones(int(keep.sum())), (i_a[keep], j_a[keep])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # renumber by first appearance
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    relabel = np.empty_like(order)
    relabel[order] = np.arange(len(order))
    return np.asarray(relabel[labels], dtype=np.int64)


def _mean_positions(ra: NDArray[Any], dec: NDArray[Any], weight: NDArray[Any],
                    labels: NDArray[np.int64], n_obj: int
                    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Weighted mean positions per label, on the unit sphere (RA wraps at 0/360)."""
    r, d = np.radians(ra), np.radians(dec)
    vec = np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)])
    s = np.stack([np.bincount(labels, weights=weight * v, minlength=n_obj) for v in vec])
    s = np.asarray(s, dtype=np.float64) / np.linalg.norm(s, axis=0)
    ra_m = np.degrees(np.arctan2(s[1], s[0])) % 360.0
    dec_m = np.degrees(np.arcsin(np.clip(s[2], -1.0, 1.0)))
    return ra_m, dec_m


def _objects(det: Mapping[str, NDArray[Any]], sigma: NDArray[np.float64],
             labels: NDArray[np.int64]) -> dict[str, NDArray[Any]]:
    """The object rows (column arrays) of labelled detections."""
    n_obj = int(labels.max()) + 1 if len(labels) else 0
    w = 1.0 / sigma**2
    ra, dec = _mean_positions(det["ra"], det["dec"], w, labels, n_obj)
    mjd = np.asarray(det["mjd"], dtype=np.float64)
    first = np.full(n_obj, np.inf)
    last = np.full(n_obj, -np.inf)
    np.minimum.at(first, labels, mjd)
    np.maximum.at(last, labels, mjd)
    snr = np.nan_to_num(np.abs(np.asarray(det["snr"], dtype=np.float64)))
    max_snr = np.zeros(n_obj)
    np.maximum.at(max_snr, labels, snr)
    pairs = np.unique(np.stack([labels, np.unique(det["exposure_id"],
                                                  return_inverse=True)[1].ravel()]), axis=1)
    return {
        "number": np.arange(1, n_obj + 1, dtype=np.int64),
        "ra": ra, "dec": dec,
        "pos_err": 1.0 / np.sqrt(np.bincount(labels, weights=w, minlength=n_obj)),
        "first_mjd": first, "last_mjd": last,
        "n_detections": np.bincount(labels, minlength=n_obj),
        "n_epochs": np.bincount(pairs[0], minlength=n_obj),
        "max_snr": max_snr,
    }


def _psf_fwhm_px(stamp: NDArray[Any]) -> float:
    """FWHM (px) of a PSF stamp from its second moments (Gaussian equivalent)."""
    p = np.clip(np.nan_to_num(np.asarray(stamp, dtype=np.float64)), 0.0, None)
    total = p.sum()
    if not total > 0:
        return float("nan")
    yy, xx = np.indices(p.shape, dtype=np.float64)
    cy, cx = (p * yy).sum() / total, (p * xx).sum() / total
    var = 0.5 * ((p * (yy - cy) ** 2).sum() + (p * (xx - cx) ** 2).sum()) / total
    return float(2.3548 * math.sqrt(max(var, 0.0)))


def _forced_kernel(image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any],
                   psf: NDArray[Any], x: NDArray[Any], y: NDArray[Any], bad_bits: int
                   ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int32]]:
    """PSF-weighted flux, error and flags at pixel positions of one window."""
    from lazysky.pipeline._sep import _prepare, _psf_flux

    img, var, bad = _prepare(image, variance, mask, bad_bits, False, 64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    flags = np.zeros(n, dtype=np.int32)
    ny, nx = img.shape
    px, py = np.floor(x + 0.5), np.floor(y + 0.5)
    on = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    flags[~on] |= FLAG_OFF_IMAGE
    centre_bad = np.zeros(n, dtype=bool)
    centre_bad[on] = bad[py[on].astype(int), px[on].astype(int)]
    flags[centre_bad] |= FLAG_MASKED
    flux, err = np.full(n, np.nan), np.full(n, np.nan)
    use = np.flatnonzero(on & ~centre_bad)
    stamp = np.asarray(psf, dtype=np.float64)
    if len(use) and np.isfinite(stamp).all() and stamp.sum() > 0:
        flux[use], err[use] = _psf_flux(img, var, bad, x[use], y[use], stamp)
    elif len(use):
        flags[use] |= FLAG_MASKED  # no usable PSF on this tile
    return flux, err, flags


def _forced_task(image: NDArray[Any], variance: NDArray[Any], mask: NDArray[Any],
                 psf: NDArray[Any], index: NDArray[np.int64], x: NDArray[Any],
                 y: NDArray[Any], offset: tuple[int, int], bad_bits: int,
                 epoch: str, tile: str) -> dict[str, Any]:
    f, e, fl = _forced_kernel(image, variance, mask, psf, x - offset[1], y - offset[0],
                              bad_bits)
    return {"index": index, "flux": f, "fluxerr": e, "flags": fl, "epoch": epoch,
            "tile_id": tile}


# --- lazy wrapper ---------------------------------------------------------------------
def forced_psf_photometry(diffs: Mapping[str, xr.Dataset], ra: Any, dec: Any, *,
                          bad_bits: int | None = None) -> dict[tuple[str, str], Delayed]:
    """PSF-weighted forced photometry at sky positions on each epoch's difference, lazily.

    Parameters
    ----------
    diffs
        Epoch name → difference product (``image``, ``variance``, ``mask``, per-tile
        ``psf`` ``(tile_y, tile_x, v, u)``, ``attrs["grid"]``), e.g. from
        :func:`lazysky.zarr_store.products.open_product`.
    ra, dec
        Positions, degrees.
    bad_bits
        Mask bits that exclude a pixel (default: the detection's).

    Returns
    -------
    dict
        ``(epoch, tile) →`` a Delayed dict of arrays ``index`` (into ``ra``), ``flux``,
        ``fluxerr``, ``flags`` (1024 off the image, 2048 masked centre); one task per
        (epoch, tile) named ``forced-<epoch>-<tile>-<token>``. Positions off every tile
        have no entry.

    Examples
    --------
    >>> tasks = forced_psf_photometry({"v2": diff}, [150.1], [2.2])  # doctest: +SKIP
    >>> dask.compute(tasks)  # doctest: +SKIP
    """
    from dask.base import tokenize
    from dask.delayed import delayed

    from lazysky._dask import window_delayed
    from lazysky.pipeline.detect import _grid_of, _mask_or_zeros, _window
    from lazysky.pipeline.grid import parse_tile
    from lazysky.pipeline.stack import DEFAULT_BAD_BITS

    bits = DEFAULT_BAD_BITS if bad_bits is None else int(bad_bits)
    ra_a = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec_a = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    if ra_a.shape != dec_a.shape or ra_a.ndim != 1:
        msg = f"ra and dec must be 1-d of one length, got shapes {ra_a.shape}, {dec_a.shape}"
        raise ParameterError(msg)
    out: dict[tuple[str, str], Delayed] = {}
    for epoch, ds in diffs.items():
        grid = _grid_of(ds, ["image", "variance"])
        if "psf" not in ds.data_vars or ds["psf"].ndim != 4:
            msg = (f"the difference of epoch {epoch!r} has no per-tile 'psf' "
                   "(tile_y, tile_x, v, u): forced PSF photometry needs it")
            raise ParameterError(msg)
        psf = ds["psf"]
        halo = max(psf.shape[2], psf.shape[3]) // 2 + 1
        x, y = grid.wcs.world_to_pixel_values(ra_a, dec_a)
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        px, py = np.floor(x + 0.5), np.floor(y + 0.5)
        ny, nx = grid.shape
        on = np.isfinite(px) & np.isfinite(py) & (px >= 0) & (px < nx) & (py >= 0) & (
            py < ny)
        t = grid.tile_px
        tiles = np.where(on, np.nan_to_num(py) // t * 10**6 + np.nan_to_num(px) // t, -1)
        for key in np.unique(tiles[on]):
            tile = grid.tile_id(int(key // 10**6), int(key % 10**6))
            idx = np.flatnonzero(tiles == key)
            wy, wx, kw = _window(grid, tile, halo)
            iy, ix = parse_tile(tile)
            arrays = [window_delayed(a) for a in (
                ds["image"].data[wy, wx], ds["variance"].data[wy, wx],
                _mask_or_zeros(ds, wy, wx), psf.data[iy, ix])]
            args = (idx, x[idx], y[idx], kw["offset"], bits, str(epoch), tile)
            token = tokenize(*arrays, *args)
            out[(str(epoch), tile)] = delayed(_forced_task, pure=True)(
                *arrays, *args, dask_key_name=f"forced-{epoch}-{tile}-{token}")
    return out


# --- the catalog ----------------------------------------------------------------------
def _catalog(catalog: Catalog | None, settings: Settings | None) -> Catalog:
    from lazysky.catalog import open_catalog

    return catalog if catalog is not None else open_catalog(settings)


# both sides read the run's own partition of diff_sources alone (its type and month)
_DETECTIONS_SQL = (
    "SELECT s.tile_id, s.number, s.ra, s.dec, s.snr, s.exposure_id, e.mjd "
    "FROM diff_sources s LEFT JOIN exposures e USING (exposure_id) "
    "WHERE s.run_id = :run AND s.run_type = :run_type AND s.run_month = :run_month "
    "ORDER BY e.mjd, s.exposure_id, s.tile_id, s.number")

# the indexed b.pos alone on the left of <@: one GiST probe per detection of a (the
# circle written around b.pos would scan the whole table per detection); `b.run_id || ''`
# keeps the run filter of b off the primary key (catalog/xmatch.py explains why)
_PAIRS_SQL = (
    "SELECT a.tile_id, a.number, b.tile_id, b.number, "
    "(a.pos <-> b.pos) * :to_arcsec AS distance "
    "FROM diff_sources a JOIN diff_sources b "
    "ON b.pos <@ scircle(a.pos, :radius) "
    "WHERE a.run_id = :run AND a.run_type = :run_type AND a.run_month = :run_month "
    "AND b.run_id || '' = :run AND b.run_type = :run_type AND b.run_month = :run_month "
    # each pair once; as text, so that no index offers to drive the join from this
    "AND a.tile_id || ':' || a.number < b.tile_id || ':' || b.number")


def _run_keys(run_id: str) -> dict[str, Any]:
    """The run id and its partition keys (type, first day of its month)."""
    from lazysky.runs import parse_run_id

    rid = parse_run_id(run_id)
    return {"run": run_id, "run_type": rid.type, "run_month": rid.date.replace(day=1)}


def _check_run(conn: sa.Connection, run_id: str) -> None:
    import sqlalchemy as sa

    from lazysky.runs import validate_run_id

    validate_run_id(run_id)
    if conn.execute(sa.text("SELECT 1 FROM runs WHERE run_id = :r"),
                    {"r": run_id}).first() is None:
        msg = f"no run {run_id!r} in the catalog (see lazysky runs list)"
        raise ParameterError(msg)


def _planner(conn: sa.Connection) -> None:
    """Plan the pair search as a GiST probe per detection at every size: without this a
    small run's partition looks cheaper to scan (or to read through its primary key,
    whose columns include the partition keys) than to probe, and a large one is then
    planned from stale statistics the same way (for this transaction only)."""
    for setting in ("enable_seqscan", "enable_bitmapscan"):
        conn.exec_driver_sql(f"SET LOCAL {setting} = off")


def _read_detections(conn: sa.Connection, run_id: str, max_radius_arcsec: float
                     ) -> tuple[dict[str, NDArray[Any]], NDArray[np.int64],
                                NDArray[np.int64], NDArray[np.float64]]:
    """The run's detections and their candidate pairs within ``max_radius_arcsec``."""
    import sqlalchemy as sa

    keys = _run_keys(run_id)
    rows = conn.execute(sa.text(_DETECTIONS_SQL), keys).all()
    cols = list(zip(*rows, strict=True)) if rows else [()] * 7
    det: dict[str, NDArray[Any]] = {
        "tile_id": np.asarray(cols[0], dtype=object),
        "number": np.asarray(cols[1], dtype=np.int64),
        "ra": np.asarray(cols[2], dtype=np.float64),
        "dec": np.asarray(cols[3], dtype=np.float64),
        "snr": np.asarray([np.nan if v is None else v for v in cols[4]], dtype=np.float64),
        "exposure_id": np.asarray(["" if v is None else v for v in cols[5]], dtype=object),
        "mjd": np.asarray([np.nan if v is None else v for v in cols[6]], dtype=np.float64),
    }
    missing = np.flatnonzero(~np.isfinite(det["mjd"]))
    if len(missing):
        eid = det["exposure_id"][missing[0]] or "(none)"
        msg = (f"{len(missing)} difference source(s) of run {run_id} have no exposure with "
               f"an MJD in the catalog (e.g. exposure {eid!r}); association needs each "
               "detection's epoch")
        raise ParameterError(msg)
    where = {(t, int(n)): k for k, (t, n) in enumerate(zip(det["tile_id"], det["number"],
                                                             strict=True))}
    # probing by index costs n·log N; forbid the planner's seq scan of tiny tables so
    # the plan is the same at every size (and what association_plan shows)
    _planner(conn)
    pairs = conn.execute(sa.text(_PAIRS_SQL), {
        **keys, "radius": math.radians(max_radius_arcsec / 3600.0),
        "to_arcsec": _ARCSEC_PER_RAD}).all()
    i = np.asarray([where[(p[0], int(p[1]))] for p in pairs], dtype=np.int64)
    j = np.asarray([where[(p[2], int(p[3]))] for p in pairs], dtype=np.int64)
    d = np.asarray([p[4] for p in pairs], dtype=np.float64)
    return det, i, j, d


def association_plan(run_id: str, *, catalog: Catalog | None = None,
                     max_radius_arcsec: float = MAX_RADIUS_ARCSEC) -> str:
    """PostgreSQL's plan (``EXPLAIN``) of the pair search of :func:`associate`.

    Examples
    --------
    >>> print(association_plan(run_id))  # doctest: +SKIP
    Nested Loop ... Index Scan using diff_sources__test__2026_11_pos_idx ...
    """
    import sqlalchemy as sa

    r = _positive("max_radius_arcsec", max_radius_arcsec)
    with _catalog(catalog, None).engine().begin() as conn:
        _check_run(conn, run_id)
        _planner(conn)
        rows = conn.execute(sa.text("EXPLAIN " + _PAIRS_SQL), {
            **_run_keys(run_id), "radius": math.radians(r / 3600.0),
            "to_arcsec": _ARCSEC_PER_RAD}).all()
    return "\n".join(str(row[0]) for row in rows)


def _run_store(conn: sa.Connection, run_id: str, settings: Settings | None) -> str:
    import sqlalchemy as sa

    from lazysky.config import load_settings

    config = conn.execute(sa.text("SELECT config FROM runs WHERE run_id = :r"),
                          {"r": run_id}).scalar() or {}
    store = config.get("store") if isinstance(config, Mapping) else None
    if store:
        return str(store)
    return str((settings if settings is not None else load_settings()).store_url)


def _open_diffs(store: str, run_id: str, settings: Settings | None
                ) -> dict[str, xr.Dataset]:
    """The run's difference products by epoch name (attrs['epoch'], else the name)."""
    from lazysky.zarr_store.products import list_products, open_product

    out = {}
    for _, name in list_products(store, run_id, kind="diff", settings=settings):
        ds = open_product(store, run_id, "diff", name, settings=settings)
        out[str(ds.attrs.get("epoch", name))] = ds
    return out


def _epoch_exposure(ds: xr.Dataset, epoch: str) -> str:
    exposures = ds.attrs.get("exposures") or []
    if not exposures:
        msg = (f"the difference of epoch {epoch!r} records no exposures "
               "(attrs['exposures']): cannot date its forced photometry")
        raise ParameterError(msg)
    return str(exposures[0])


def associate(
    run_id: str,
    *,
    catalog: Catalog | None = None,
    store: str | None = None,
    settings: Settings | None = None,
    client: Any = None,
    k_sigma: float = K_SIGMA,
    floor_arcsec: float = FLOOR_ARCSEC,
    max_radius_arcsec: float = MAX_RADIUS_ARCSEC,
    fwhm_arcsec: float | None = None,
) -> AssociationResult:
    """Associate a run's difference-image sources into objects, with forced photometry.

    Replaces the run's objects, links and forced photometry in one transaction
    (idempotent: run it again and the catalog holds the same rows once).

    Parameters
    ----------
    run_id
        A run in the catalog with difference images (``lazysky run`` with science epochs).
    catalog, settings
        The catalog (default :func:`lazysky.catalog.open_catalog` of ``settings``).
    store
        Where the run's products are (default: the run's configuration, else the
        settings' store).
    client
        A ``distributed.Client`` to compute the forced photometry on (default: the
        active Dask scheduler).
    k_sigma, floor_arcsec, max_radius_arcsec
        Association radius ``min(k · sqrt(σ_i² + σ_j²), max)`` with
        ``σ = max(FWHM / (2.35 S/N), floor)``.
    fwhm_arcsec
        PSF FWHM for σ (default: the median FWHM of the differences' PSFs).

    Returns
    -------
    AssociationResult

    Raises
    ------
    ParameterError
        An unknown run, a run without difference images, a bad option (named).
    CatalogError
        The run's difference sources changed while it ran (nothing written).

    Examples
    --------
    >>> from lazysky.associate import associate
    >>> print(associate("test-20260101-0a1b2c3d"))  # doctest: +SKIP
    run test-20260101-0a1b2c3d: 57 difference sources → 31 objects; ...
    """
    k = _positive("k_sigma", k_sigma)
    floor = _positive("floor_arcsec", floor_arcsec)
    r_max = _positive("max_radius_arcsec", max_radius_arcsec)
    if fwhm_arcsec is not None:
        _positive("fwhm_arcsec", fwhm_arcsec)
    catalog = _catalog(catalog, settings)
    engine = catalog.engine()
    with engine.begin() as conn:
        _check_run(conn, run_id)
        store = store if store is not None else _run_store(conn, run_id, settings)
        det, i, j, d = _read_detections(conn, run_id, r_max)
    diffs = _open_diffs(store, run_id, settings)
    if not diffs:
        msg = (f"run {run_id} has no difference images in the store {store!r}: association "
               "needs science epochs differenced against the reference (science: in the "
               "run configuration)")
        raise ParameterError(msg)
    scale = {e: float(ds.attrs["grid"]["pixel_scale_arcsec"]) for e, ds in diffs.items()}
    if fwhm_arcsec is None:
        # one small compute at the boundary: the PSF stamps of every tile and epoch
        names = list(diffs)
        stamps = _compute([diffs[e]["psf"].data for e in names], client)
        widths = [_psf_fwhm_px(s) * scale[e] for e, a in zip(names, stamps, strict=True)
                  for s in np.asarray(a).reshape(-1, *np.shape(a)[2:])]
        widths = [w for w in widths if math.isfinite(w) and w > 0]
        fwhm_arcsec = float(np.median(widths)) if widths else 1.0
    sigma = position_sigma_arcsec(det["snr"], fwhm_arcsec=fwhm_arcsec, floor_arcsec=floor)
    labels = group_detections(len(sigma), i, j, d, sigma, k_sigma=k, max_radius_arcsec=r_max)
    objs = _objects(det, sigma, labels)
    n_obj = len(objs["number"])
    logger.info("run %s: %d difference sources → %d objects (FWHM %.2f arcsec)", run_id,
                len(sigma), n_obj, fwhm_arcsec)

    tasks = forced_psf_photometry(diffs, objs["ra"], objs["dec"])
    results = _compute(list(tasks.values()), client)
    epoch_exp = {e: _epoch_exposure(ds, e) for e, ds in diffs.items()}
    import sqlalchemy as sa

    from lazysky.catalog import CatalogError

    try:
        with engine.begin() as conn:
            mjd = _exposure_mjds(conn, list(epoch_exp.values()))
            phot = _photometry_rows(results, epoch_exp, mjd, det, labels)
            ids = _write(conn, run_id, det, labels, objs, phot)
    except sa.exc.IntegrityError as exc:  # nothing was written: the transaction rolled back
        msg = (f"association of run {run_id} not written: its difference sources changed "
               f"while it ran (a detection rewritten?); run it again ({exc.orig})")
        raise CatalogError(msg) from None
    return AssociationResult(run_id=run_id, n_objects=n_obj, n_detections=len(labels),
                             n_photometry=len(phot["object"]), epochs=tuple(sorted(diffs)),
                             object_ids=tuple(ids))


def _compute(collection: Any, client: Any) -> Any:
    """Compute at the stage's edge: on ``client`` if given, else the active scheduler."""
    import dask

    if client is not None:
        return client.gather(client.compute(collection))
    (out,) = dask.compute(collection)
    return out


def _exposure_mjds(conn: sa.Connection, exposure_ids: Sequence[str]) -> dict[str, float]:
    import sqlalchemy as sa

    rows = conn.execute(sa.text("SELECT exposure_id, mjd FROM exposures "
                                "WHERE exposure_id = ANY(:ids)"),
                        {"ids": list(exposure_ids)}).all()
    got = {str(r[0]): float(r[1]) for r in rows}
    missing = sorted(set(exposure_ids) - set(got))
    if missing:
        msg = f"exposures {missing} of the run's differences are not in the catalog"
        raise ParameterError(msg)
    return got


def _photometry_rows(results: Sequence[Mapping[str, Any]], epoch_exp: Mapping[str, str],
                     mjd: Mapping[str, float], det: Mapping[str, NDArray[Any]],
                     labels: NDArray[np.int64]) -> dict[str, NDArray[Any]]:
    detected = set(zip(labels.tolist(), det["exposure_id"].tolist(), strict=True))
    parts: dict[str, list[Any]] = {k: [] for k in ("object", "exposure_id", "epoch", "mjd",
                                                   "tile_id", "flux", "fluxerr", "flags",
                                                   "detected")}
    for r in results:
        idx = np.asarray(r["index"], dtype=np.int64)
        eid = epoch_exp[r["epoch"]]
        parts["object"].append(idx)
        parts["exposure_id"].append(np.full(len(idx), eid, dtype=object))
        parts["epoch"].append(np.full(len(idx), r["epoch"], dtype=object))
        parts["mjd"].append(np.full(len(idx), mjd[eid]))
        parts["tile_id"].append(np.full(len(idx), r["tile_id"], dtype=object))
        parts["flux"].append(np.asarray(r["flux"], dtype=np.float64))
        parts["fluxerr"].append(np.asarray(r["fluxerr"], dtype=np.float64))
        parts["flags"].append(np.asarray(r["flags"], dtype=np.int64))
        parts["detected"].append(np.array([(int(o), eid) in detected for o in idx], bool))
    return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}


def _nan_to_none(a: NDArray[Any]) -> list[Any]:
    return [None if not math.isfinite(v) else float(v) for v in a]


def _write(conn: sa.Connection, run_id: str, det: Mapping[str, NDArray[Any]],
           labels: NDArray[np.int64], objs: Mapping[str, NDArray[Any]],
           phot: Mapping[str, NDArray[Any]]) -> list[int]:
    """Replace the run's objects, links and photometry (the caller's transaction)."""
    import sqlalchemy as sa

    from lazysky.catalog.schema import forced_photometry, object_detections, objects

    # one association of a run at a time (two at once would each delete, then insert)
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
        sa.func.hashtext("lazysky.associate:" + run_id))))
    conn.execute(sa.delete(objects).where(objects.c.run_id == run_id))
    n = len(objs["number"])
    if n == 0:
        return []
    conn.execute(sa.insert(objects), [
        {"run_id": run_id, "number": int(objs["number"][k]), "ra": float(objs["ra"][k]),
         "dec": float(objs["dec"][k]), "pos_err": float(objs["pos_err"][k]),
         "first_mjd": float(objs["first_mjd"][k]), "last_mjd": float(objs["last_mjd"][k]),
         "n_detections": int(objs["n_detections"][k]),
         "n_epochs": int(objs["n_epochs"][k]), "max_snr": float(objs["max_snr"][k])}
        for k in range(n)])
    got = dict(conn.execute(sa.select(objects.c.number, objects.c.object_id)
                            .where(objects.c.run_id == run_id)).all())
    ids = np.asarray([got[k] for k in range(1, n + 1)], dtype=np.int64)
    conn.execute(sa.insert(object_detections), [
        {"run_id": run_id, "tile_id": str(t), "number": int(num),
         "object_id": int(ids[lab])}
        for t, num, lab in zip(det["tile_id"], det["number"], labels, strict=True)])
    if len(phot["object"]):
        flux, err = _nan_to_none(phot["flux"]), _nan_to_none(phot["fluxerr"])
        conn.execute(sa.insert(forced_photometry), [
            {"object_id": int(ids[int(o)]), "exposure_id": str(e), "epoch": str(ep),
             "mjd": float(m), "tile_id": str(t), "flux": f, "fluxerr": fe,
             "flags": int(fl), "detected": bool(dt)}
            for o, e, ep, m, t, f, fe, fl, dt in zip(
                phot["object"], phot["exposure_id"], phot["epoch"], phot["mjd"],
                phot["tile_id"], flux, err, phot["flags"], phot["detected"], strict=True)])
    return ids.tolist()


def lightcurve(object_id: int, *, catalog: Catalog | None = None,
               settings: Settings | None = None) -> Table:
    """The light curve of one object: forced photometry on every epoch's difference.

    Parameters
    ----------
    object_id
        An ``objects.object_id`` (from :func:`associate`, a cone search on ``objects``).
    catalog, settings
        The catalog (default :func:`lazysky.catalog.open_catalog` of ``settings``).

    Returns
    -------
    astropy.table.Table
        One row per epoch, by MJD: ``mjd``, ``flux``, ``fluxerr`` (PSF-weighted, on the
        difference image: flux relative to the reference; NaN where masked),
        ``detected`` (a difference source of this object is in that epoch),
        ``exposure_id``, ``epoch``, ``tile_id``, ``flags``; ``meta`` holds the object's
        row (run, mean position, first/last MJD, number of detections).

    Raises
    ------
    ParameterError
        ``object_id`` is not an object of the catalog.

    Examples
    --------
    >>> import lazysky
    >>> lc = lazysky.lightcurve(42)  # doctest: +SKIP
    >>> lc["mjd", "flux", "detected"]  # doctest: +SKIP
    """
    import astropy.units as u
    import sqlalchemy as sa
    from astropy.table import Table

    from lazysky.catalog.schema import forced_photometry, objects

    if isinstance(object_id, bool) or not isinstance(object_id, int | np.integer):
        msg = f"object_id must be an integer, got {object_id!r}"
        raise ParameterError(msg)
    oid = int(object_id)
    with _catalog(catalog, settings).engine().connect() as conn:
        obj = conn.execute(sa.select(*[c for c in objects.c if c.name != "pos"])
                           .where(objects.c.object_id == oid)).mappings().first()
        if obj is None:
            n = conn.execute(sa.select(sa.func.count()).select_from(objects)).scalar()
            msg = (f"no object {oid} in the catalog ({n} objects; association runs after "
                   "detection in lazysky run, or call lazysky.associate(run_id))")
            raise ParameterError(msg)
        fp = forced_photometry.c
        rows = conn.execute(sa.select(fp.mjd, fp.flux, fp.fluxerr, fp.detected,
                                      fp.exposure_id, fp.epoch, fp.tile_id, fp.flags)
                            .where(fp.object_id == oid)
                            .order_by(fp.mjd, fp.exposure_id)).all()
    names = ["mjd", "flux", "fluxerr", "detected", "exposure_id", "epoch", "tile_id", "flags"]
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    table = Table(
        [np.asarray(cols[0], dtype=np.float64),
         np.asarray([np.nan if v is None else v for v in cols[1]], dtype=np.float64),
         np.asarray([np.nan if v is None else v for v in cols[2]], dtype=np.float64),
         np.asarray(cols[3], dtype=bool), np.asarray(cols[4], dtype=str),
         np.asarray(cols[5], dtype=str), np.asarray(cols[6], dtype=str),
         np.asarray(cols[7], dtype=np.int32)],
        names=names, units={"mjd": u.day}, copy=False)
    table.meta.update({k: (v.item() if hasattr(v, "item") else v) for k, v in obj.items()})
    return table



def run_objects(run_id: str, *, catalog: Catalog | None = None,
                settings: Settings | None = None) -> Table:
    """The objects of a run, most detected first (then by number).

    Returns
    -------
    astropy.table.Table
        The ``objects`` columns but ``pos`` (``ra``/``dec`` in degrees).

    Raises
    ------
    ParameterError
        An unknown run.

    Examples
    --------
    >>> objs = run_objects("test-20260101-0a1b2c3d")  # doctest: +SKIP
    >>> lazysky.lightcurve(int(objs["object_id"][0]))  # doctest: +SKIP
    """
    import astropy.units as u
    import sqlalchemy as sa
    from astropy.table import Table

    from lazysky.catalog.schema import objects

    cols = [c for c in objects.c if c.name != "pos"]
    with _catalog(catalog, settings).engine().connect() as conn:
        _check_run(conn, run_id)
        rows = conn.execute(sa.select(*cols).where(objects.c.run_id == run_id).order_by(
            objects.c.n_detections.desc(), objects.c.number)).all()
    names = [c.name for c in cols]
    if not rows:
        return Table(names=names, dtype=[object if n == "run_id" else float for n in names])
    table = Table(rows=[tuple(r) for r in rows], names=names)
    for name, unit in (("ra", u.deg), ("dec", u.deg), ("pos_err", u.arcsec),
                       ("first_mjd", u.day), ("last_mjd", u.day)):
        table[name].unit = unit
    return table


class _CallableModule(types.ModuleType):
    """``lazysky.associate`` names both this module and its main function: once the module
    is imported, Python binds the package attribute to the module, so the module itself
    calls :func:`associate` (``lazysky.associate(run_id)`` works either way)."""

    def __call__(self, run_id: str, **options: Any) -> AssociationResult:
        return associate(run_id, **options)


sys.modules[__name__].__class__ = _CallableModule

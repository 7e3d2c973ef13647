"""Interactive reprocessing from Jupyter: open a run lazily, cut out, reprocess, compare.

- :func:`open_run` — a run's products (reference coadd, epoch coadds, differences with
  variance, mask, score and per-tile PSF) as lazy xarray Datasets, its catalog record
  (type, status, parent, configuration, timings, errors), its tiles, its grid and WCS, and
  the dashboard of the connected Dask cluster; ``production=True, field=F`` gives the
  production view of a field, tile by tile.
- :func:`cutout` — a small piece of a product around a position; only the Zarr chunks it
  touches are read.
- :func:`reprocess` — a new run (type ``exp`` by default, never ``prod``) whose parent is
  the given run: same configuration plus ``overrides``, on the parent's sky grid (same
  tile ids), for the chosen tiles only. When only detection parameters change, the
  parent's images are reused and only detection and the catalog run (seconds per tile).
- :func:`compare_runs` — per-tile catalog differences of two runs (matched, only in a,
  only in b, flux ratio, astrometric offsets) and, with the simulator's truth,
  completeness and false positives of each; a table and a figure.

Examples
--------
>>> import lazysky
>>> run = lazysky.open_run("test-20261124-63e53822-cc1f-4492-91fe-db0f3c25cfb2")  # doctest: +SKIP
>>> cut = lazysky.cutout(run.reference, (150.1, 2.18), "20arcsec")  # doctest: +SKIP
>>> child = lazysky.reprocess(run, tiles=["t001_002"],
...                           overrides={"detect.threshold": 3.0})  # doctest: +SKIP
>>> lazysky.compare_runs(run, child).table  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lazysky.errors import ParameterError

if TYPE_CHECKING:
    import xarray as xr
    from astropy.table import Table
    from astropy.wcs import WCS

    from lazysky.catalog import Catalog
    from lazysky.config import Settings
    from lazysky.pipeline.grid import SkyGrid

__all__ = [
    "Comparison",  # noqa: F822 - from __getattr__
    "ProductionView",
    "RunView",
    "compare_runs",  # noqa: F822
    "cutout",
    "open_run",
    "reprocess",  # noqa: F822
]

logger = logging.getLogger(__name__)

#: Steps a reprocessing can start from, in pipeline order.
STEPS = ("calibrate", "stack", "difference", "detect")
#: Run types :func:`reprocess` creates (production is made by promotion, never here).
REPROCESS_TYPES = ("exp", "test", "val", "repr")
#: The key of a run's recorded configuration naming the run whose images it reused.
PRODUCTS_FROM = "products_from"


# -- the catalog record of a run ------------------------------------------------------


def _catalog(catalog: Catalog | None, settings: Settings | None) -> Catalog:
    from lazysky.catalog import open_catalog

    return catalog if catalog is not None else open_catalog(settings)


def _settings(settings: Settings | None) -> Settings:
    from lazysky.config import load_settings

    return settings if settings is not None else load_settings()


def _run_id_of(run: Any) -> str:
    """The run id of a :class:`RunView`, a ``RunSummary`` or a string (validated)."""
    from lazysky.runs import validate_run_id

    rid = getattr(run, "run_id", run)
    if not isinstance(rid, str):
        msg = f"expected a run id, a RunView or a RunSummary; got {type(run).__name__}"
        raise ParameterError(msg)
    return validate_run_id(rid)


def _run_row(run_id: str, catalog: Catalog) -> dict[str, Any]:
    import sqlalchemy as sa

    from lazysky.catalog import CatalogError, runs

    with catalog.engine().connect() as conn:
        row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().first()
        if row is None:
            recent = conn.execute(sa.select(runs.c.run_id).order_by(
                runs.c.started_at.desc()).limit(3)).scalars().all()
            msg = (f"unknown run {run_id!r}: no such run in the catalog {catalog.dsn!r} "
                   f"(recent runs: {list(recent) or 'none'}; see `lazysky runs list`)")
            raise CatalogError(msg)
    return dict(row)


def _tiles_done(run_id: str, stage: str, catalog: Catalog) -> dict[str, int]:
    from lazysky.catalog import done_tiles

    return done_tiles(run_id, stage, catalog=catalog)


def _dashboard() -> str:
    """The dashboard link of the connected Dask client, or ``""``."""
    try:
        from distributed import get_client

        return str(get_client().dashboard_link or "")
    except (ImportError, ValueError):
        return ""


# -- a run, opened lazily -----------------------------------------------------------------


class RunView:
    """A processing run opened for exploration: record, tiles, lazy products, grid.

    Made by :func:`open_run`; nothing reads pixels until a product is computed. Products
    are keyed ``"coadd/<name>"`` and ``"diff/<name>"``; :attr:`reference`,
    :attr:`epochs` and :attr:`differences` name them by role.
    """

    def __init__(self, row: Mapping[str, Any], *, store: str, tiles: Mapping[str, int],
                 dia_tiles: Mapping[str, int], settings: Settings, catalog: Catalog) -> None:
        self.run_id: str = str(row["run_id"])
        self.type: str = str(row["run_type"])
        self.status: str = str(row["status"])
        self.parent_run_id: str | None = row.get("parent_run_id")
        self.config: dict[str, Any] = dict(row.get("config") or {})
        self.timings: dict[str, float] = dict(row.get("timings") or {})
        self.errors: dict[str, str] = dict(row.get("errors") or {})
        self.description: str = str(row.get("description") or "")
        self.software_version: str = str(row.get("software_version") or "")
        self.started_at: dt.datetime | None = row.get("started_at")
        self.finished_at: dt.datetime | None = row.get("finished_at")
        self.store = store
        #: tile id -> coadd sources catalogued there (the tiles this run covers)
        self.tile_rows: dict[str, int] = dict(sorted(tiles.items()))
        #: tile id -> difference sources catalogued there
        self.dia_tile_rows: dict[str, int] = dict(sorted(dia_tiles.items()))
        self.settings = settings
        self.catalog = catalog
        self._products: dict[str, xr.Dataset] | None = None

    # -- record ----------------------------------------------------------------------
    @property
    def field_name(self) -> str:
        """The field's name (``field.name`` of the configuration)."""
        return str(self.config.get("field", {}).get("name", "field"))

    @property
    def tiles(self) -> list[str]:
        """The tiles this run catalogued (a reprocessing covers a subset of the grid)."""
        return list(self.tile_rows)

    @property
    def products_run_id(self) -> str:
        """The run whose images this run uses (itself, or the parent for detect-only)."""
        return str(self.config.get(PRODUCTS_FROM) or self.run_id)

    @property
    def dashboard(self) -> str:
        """The dashboard link of the connected Dask cluster (``""`` when none)."""
        return _dashboard()

    # -- products ---------------------------------------------------------------------
    @property
    def products(self) -> dict[str, xr.Dataset]:
        """Every product as a lazy Dataset, keyed ``"<kind>/<name>"`` (opened once)."""
        if self._products is None:
            from lazysky.zarr_store.products import list_products, open_product

            rid = self.products_run_id
            self._products = {
                f"{kind}/{name}": open_product(self.store, rid, kind, name,
                                               settings=self.settings)
                for kind, name in list_products(self.store, rid, settings=self.settings)}
        return self._products

    def product(self, kind: str, name: str | None = None) -> xr.Dataset:
        """One product, e.g. ``product("diff", "deep1-v2")`` (``name`` default: the field)."""
        key = f"{kind}/{name or self.field_name}"
        if key not in self.products:
            msg = f"run {self.run_id} has no product {key!r}; it has {sorted(self.products)}"
            raise ParameterError(msg)
        return self.products[key]

    @property
    def reference(self) -> xr.Dataset:
        """The reference coadd (image, variance, mask, exposure count, PSF per tile)."""
        return self.product("coadd", self.field_name)

    @property
    def epochs(self) -> dict[str, xr.Dataset]:
        """The science epochs' coadds by epoch (``"v2"`` …)."""
        pre = f"coadd/{self.field_name}-"
        return {k[len(pre):]: v for k, v in self.products.items() if k.startswith(pre)}

    @property
    def differences(self) -> dict[str, xr.Dataset]:
        """The difference images by epoch (image, variance, score, mask, PSF, flux ratio)."""
        pre = f"diff/{self.field_name}-"
        return {k[len(pre):]: v for k, v in self.products.items() if k.startswith(pre)}

    @property
    def grid(self) -> SkyGrid:
        """The run's sky grid (tiles, WCS)."""
        from lazysky.zarr_store.products import product_grid

        return product_grid(self.reference)

    @property
    def wcs(self) -> WCS:
        """The WCS of the grid's pixels (every product of the run shares it)."""
        return self.grid.wcs

    def sources(self, table: str = "coadd", *, tiles: Sequence[str] | None = None) -> Table:
        """This run's catalog rows (``"coadd"`` or ``"diff"``), optionally on some tiles."""
        return _sources(self.run_id, table, tiles, self.catalog)

    # -- notebook display -------------------------------------------------------------
    def _summary(self) -> list[tuple[str, str]]:
        tiles = self.tiles
        shown = ", ".join(tiles[:6]) + (f", … ({len(tiles)})" if len(tiles) > 6 else "")
        items = [("run", self.run_id), ("type", self.type), ("status", self.status)]
        if self.parent_run_id:
            items.append(("parent", self.parent_run_id))
        items += [("field", self.field_name), ("tiles", shown or "none"),
                  ("sources", f"{sum(self.tile_rows.values())} in the coadd, "
                              f"{sum(self.dia_tile_rows.values())} in the differences")]
        try:
            names = sorted(self.products)
        except Exception as exc:  # a repr never raises (store unreachable)
            names = [f"(cannot list: {exc})"]
        items.append(("products", ", ".join(names) or "none"))
        if self.products_run_id != self.run_id:
            items.append(("images of", self.products_run_id))
        if self.timings:
            items.append(("time", ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())))
        if self.errors:
            items.append(("errors", f"{len(self.errors)}: " + "; ".join(
                f"{k}: {v}" for k, v in list(self.errors.items())[:3])))
        link = self.dashboard
        items.append(("dashboard", link or "no Dask client connected"))
        return items

    def __repr__(self) -> str:
        return "RunView\n" + "\n".join(f"  {k:<10} {v}" for k, v in self._summary())

    def _repr_html_(self) -> str:
        rows = []
        for k, v in self._summary():
            val = html.escape(v)
            if k == "dashboard" and v.startswith("http"):
                val = f'<a href="{val}" target="_blank">{val}</a>'
            rows.append(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                        f"<td style='text-align:left'>{val}</td></tr>")
        return f"<table><caption>lazysky run</caption>{''.join(rows)}</table>"


class ProductionView:
    """The production view of a field: which run is production for each tile.

    Made by ``open_run(field=F, production=True)``. :meth:`image` assembles a product's
    variable tile by tile from each tile's production run, lazily.
    """

    def __init__(self, field_name: str, tiles: Mapping[str, str],
                 runs: Mapping[str, RunView]) -> None:
        self.field_name = field_name
        #: tile id -> production run id
        self.tiles: dict[str, str] = dict(sorted(tiles.items()))
        #: run id -> the opened run
        self.runs: dict[str, RunView] = dict(runs)

    @property
    def grid(self) -> SkyGrid:
        """The field's grid (every production run of a field shares it)."""
        return next(iter(self.runs.values())).grid

    def image(self, kind: str = "coadd", name: str | None = None,
              variable: str = "image") -> xr.DataArray:
        """``variable`` of product ``kind/name`` over the grid, each tile from its
        production run (NaN where no run is production), as one lazy DataArray."""
        import dask.array as da
        import xarray as xr

        grid = self.grid
        nty, ntx = grid.n_tiles
        rows = []
        for iy in range(nty):
            row = []
            for ix in range(ntx):
                tile = grid.tile_id(iy, ix)
                sy, sx = grid.tile_slices(tile)
                rid = self.tiles.get(tile)
                if rid is None:
                    row.append(da.full((sy.stop - sy.start, sx.stop - sx.start), np.nan,
                                       dtype="float32", chunks=-1))
                    continue
                data = self.runs[rid].product(kind, name).variables[variable].data
                row.append(data[sy, sx])
            rows.append(row)
        return xr.DataArray(da.block(rows), dims=("y", "x"),
                            attrs={"grid": grid.to_dict(), "production_tiles": self.tiles})

    def __repr__(self) -> str:
        by_run: dict[str, list[str]] = {}
        for tile, rid in self.tiles.items():
            by_run.setdefault(rid, []).append(tile)
        lines = [f"production of field {self.field_name!r}: {len(self.tiles)} tile(s) "
                 f"from {len(by_run)} run(s)"]
        lines += [f"  {rid}: {', '.join(ts)}" for rid, ts in by_run.items()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(repr(self)) + "</pre>"


def open_run(
    run_id: Any = None,
    *,
    field: str | None = None,
    production: bool = False,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
) -> RunView | ProductionView:
    """Open a run (or the production of a field) lazily.

    Parameters
    ----------
    run_id
        A run id (or a RunView / RunSummary). None with ``field``: the field's latest
        finished run.
    field
        The field's name (``field.name`` of the run configuration).
    production
        With ``field``: the production view of the field, tile by tile.
    settings, catalog
        lazysky settings and an opened catalog (default: those in force).

    Returns
    -------
    RunView or ProductionView
        Nothing is computed: products are lazy Datasets over the Zarr store.

    Raises
    ------
    ParameterError
        A malformed run id, or neither a run id nor a field.
    CatalogError
        An unknown run, or a field without runs.

    Examples
    --------
    >>> run = open_run("exp-20261124-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f")  # doctest: +SKIP
    >>> run.reference.image  # doctest: +SKIP
    <xarray.DataArray 'image' (y: 263, x: 545)> ... dask.array<...>
    """
    settings = _settings(settings)
    catalog = _catalog(catalog, settings)
    if production:
        if field is None:
            raise ParameterError("open_run(production=True) needs field= (the field's name)")
        return _production(field, settings, catalog)
    if run_id is None:
        if field is None:
            msg = "open_run needs a run id, or field= (its latest run, or production=True)"
            raise ParameterError(msg)
        run_id = _latest_run(field, catalog)
    rid = _run_id_of(run_id)
    row = _run_row(rid, catalog)
    store = str(row["config"].get("store") or settings.store_url)
    return RunView(row, store=store, tiles=_tiles_done(rid, "detect-coadd", catalog),
                   dia_tiles=_tiles_done(rid, "detect-diff", catalog), settings=settings,
                   catalog=catalog)


def _latest_run(field_name: str, catalog: Catalog) -> str:
    import sqlalchemy as sa

    from lazysky.catalog import CatalogError, runs

    with catalog.engine().connect() as conn:
        rid = conn.execute(
            sa.select(runs.c.run_id).where(
                runs.c.config["field"]["name"].astext == field_name,
                runs.c.status.in_(("done", "done_with_errors")))
            .order_by(runs.c.finished_at.desc()).limit(1)).scalar()
    if rid is None:
        msg = f"no finished run of field {field_name!r} in the catalog {catalog.dsn!r}"
        raise CatalogError(msg)
    return str(rid)


def _production(field_name: str, settings: Settings, catalog: Catalog) -> ProductionView:
    from lazysky.catalog.production import production_tiles

    tiles = production_tiles(field_name, catalog=catalog)
    if not tiles:
        msg = (f"field {field_name!r} has no production tiles yet: promote a run "
               "(lazysky.promote) first")
        raise ParameterError(msg)
    views = {}
    for rid in sorted(set(tiles.values())):
        view = open_run(rid, settings=settings, catalog=catalog)
        assert isinstance(view, RunView)
        views[rid] = view
    return ProductionView(field_name, tiles, views)


def _sources(run_id: str, table: str, tiles: Iterable[str] | None,
             catalog: Catalog) -> Table:
    import sqlalchemy as sa
    from astropy.table import Table

    from lazysky.catalog.schema import INTERNAL_COLUMNS, SOURCE_TABLES

    if table not in ("coadd", "diff"):
        msg = f"table must be 'coadd' or 'diff'; got {table!r}"
        raise ParameterError(msg)
    tbl = SOURCE_TABLES[table]
    cols = [c for c in tbl.c if c.name not in INTERNAL_COLUMNS and c.name != "pos"]
    stmt = sa.select(*cols).where(tbl.c.run_id == run_id)
    if tiles is not None:
        stmt = stmt.where(tbl.c.tile_id.in_(list(tiles)))
    with catalog.engine().connect() as conn:
        rows = conn.execute(stmt.order_by(tbl.c.tile_id, tbl.c.number)).all()
    names = [c.name for c in cols]
    if not rows:
        return Table(names=names, dtype=[object if n in ("run_id", "tile_id", "exposure_id")
                                         else float for n in names])
    return Table(rows=[tuple(r) for r in rows], names=names)


# -- cutouts ------------------------------------------------------------------------------


def _parse_sky(position: Any) -> tuple[float, float]:
    """``(ra, dec)`` degrees from a SkyCoord, an ``(ra, dec)`` pair or a string."""
    from astropy.coordinates import SkyCoord

    from lazysky.catalog import parse_position

    if isinstance(position, SkyCoord):
        icrs = position.icrs
        return parse_position(float(icrs.ra.deg), float(icrs.dec.deg))
    if isinstance(position, str):
        parts = position.replace(",", " ").split()
        if len(parts) == 2:
            return parse_position(parts[0], parts[1])
        if len(parts) == 6:  # "10 00 24 +02 10 48"
            return parse_position(" ".join(parts[:3]), " ".join(parts[3:]))
        msg = (f"position {position!r}: expected 'RA Dec' (degrees, units or sexagesimal), "
               "an (ra, dec) pair or a SkyCoord")
        raise ParameterError(msg)
    if isinstance(position, Sequence) and len(position) == 2:
        return parse_position(position[0], position[1])
    msg = (f"position must be a SkyCoord, an (ra, dec) pair or a string 'RA Dec'; "
           f"got {position!r}")
    raise ParameterError(msg)


def _size_px(size: Any, scale_arcsec: float) -> tuple[int, int]:
    """``(ny, nx)`` pixels of a cutout size: pixels (int, ``u.pix``) or angles, or a pair."""
    import astropy.units as u

    from lazysky.catalog import parse_angle

    items = list(size) if isinstance(size, tuple | list) else [size, size]
    if len(items) != 2:
        msg = f"size must be one value or (ny, nx); got {size!r}"
        raise ParameterError(msg)
    out = []
    for s in items:
        if isinstance(s, u.Quantity) and s.unit == u.pix:
            px = float(s.value)
        elif isinstance(s, int | np.integer) and not isinstance(s, bool):
            px = float(s)
        else:
            px = parse_angle(s, name="size") * 3600.0 / scale_arcsec
        if not math.isfinite(px) or px < 1:
            msg = f"size must be at least one pixel; got {size!r} ({px:.3g} px)"
            raise ParameterError(msg)
        out.append(max(round(px), 1))
    return out[0], out[1]


def cutout(product: Any, position: Any, size: Any) -> xr.Dataset:
    """A small piece of a product around a sky position, reading only the chunks it needs.

    Parameters
    ----------
    product
        A product Dataset (``run.reference``, ``run.differences["v2"]``) or one of its
        variables, with the grid in its attributes (``attrs["grid"]``).
    position
        A SkyCoord, an ``(ra, dec)`` pair (degrees, strings with units, sexagesimal), or a
        string ``"150.1 2.18"`` / ``"10:00:24 +02:10:48"``.
    size
        The side: pixels (an int or a ``u.pix`` Quantity) or an angle (``"20arcsec"``,
        ``20 * u.arcsec``); or ``(ny, nx)`` of those.

    Returns
    -------
    xarray.Dataset
        The ``(y, x)`` variables of the window (computed: a few chunks), with ``y``/``x``
        coordinates in the grid's pixels, ``psf`` of the tile holding the position when
        the product has one, and ``attrs["wcs"]`` the cutout's WCS (astropy).

    Raises
    ------
    ParameterError
        A bad position or size, a product without a grid, or a position off the grid.

    Examples
    --------
    >>> cut = cutout(run.reference, (150.1, 2.18), "15arcsec")  # doctest: +SKIP
    >>> cut.image.shape  # doctest: +SKIP
    (15, 15)
    """
    import xarray as xr

    from lazysky.zarr_store.products import product_grid

    ds = product.to_dataset(name=product.name or "image", promote_attrs=True) \
        if isinstance(product, xr.DataArray) else product
    if not isinstance(ds, xr.Dataset):
        msg = f"product must be an xarray Dataset or DataArray; got {type(product).__name__}"
        raise ParameterError(msg)
    grid = product_grid(ds)
    ra, dec = _parse_sky(position)
    ny, nx = _size_px(size, grid.pixel_scale_arcsec)
    x, y = grid.wcs.world_to_pixel_values(ra, dec)
    cx, cy = math.floor(float(x) + 0.5), math.floor(float(y) + 0.5)
    if not (0 <= cy < grid.shape[0] and 0 <= cx < grid.shape[1]):
        msg = (f"position ({ra:.6f}, {dec:.6f}) is off the product's grid (pixel "
               f"({cx}, {cy}) of {grid.shape[1]} x {grid.shape[0]})")
        raise ParameterError(msg)
    y0, x0 = max(cy - ny // 2, 0), max(cx - nx // 2, 0)
    y1, x1 = min(y0 + ny, grid.shape[0]), min(x0 + nx, grid.shape[1])
    names = [str(n) for n in ds.data_vars if ds[n].dims == ("y", "x")]
    piece = ds[names].isel(y=slice(y0, y1), x=slice(x0, x1))
    tile = grid.tile_id(cy // grid.tile_px, cx // grid.tile_px)
    if "psf" in ds.data_vars and tuple(ds["psf"].dims[:2]) == ("tile_y", "tile_x"):
        iy, ix = cy // grid.tile_px, cx // grid.tile_px
        piece["psf"] = ds["psf"].isel(tile_y=iy, tile_x=ix)
    piece = piece.assign_coords(y=np.arange(y0, y1), x=np.arange(x0, x1)).compute()
    wcs = grid.wcs
    wcs.wcs.crpix = [wcs.wcs.crpix[0] - x0, wcs.wcs.crpix[1] - y0]
    wcs.pixel_shape = (x1 - x0, y1 - y0)
    wcs.wcs.set()
    piece.attrs = {"wcs": wcs, "tile": tile, "position_deg": (ra, dec),
                   "origin_px": (y0, x0), "run_id": ds.attrs.get("run_id"),
                   "kind": ds.attrs.get("kind"), "name": ds.attrs.get("name")}
    return piece


_ELSEWHERE = {"reprocess": "lazysky._reprocess", "compare_runs": "lazysky._compare",
              "Comparison": "lazysky._compare"}


def __getattr__(name: str) -> Any:
    """:func:`reprocess`, :func:`compare_runs` and :class:`Comparison` build on this module
    and live in their own (``lazysky._reprocess``, ``lazysky._compare``)."""
    if name in _ELSEWHERE:
        from importlib import import_module

        return getattr(import_module(_ELSEWHERE[name]), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)

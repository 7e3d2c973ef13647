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
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    "Comparison",
    "ProductionView",
    "RunView",
    "compare_runs",
    "cutout",
    "open_run",
    "reprocess",
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


def _run_config(config: Mapping[str, Any]) -> Any:
    """The :class:`~lazysky.runconfig.RunConfig` of a recorded configuration."""
    from lazysky.runconfig import RunConfig

    return RunConfig.model_validate({k: v for k, v in config.items()
                                     if k in RunConfig.model_fields})


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

    from lazysky.catalog.schema import SOURCE_TABLES

    if table not in ("coadd", "diff"):
        msg = f"table must be 'coadd' or 'diff'; got {table!r}"
        raise ParameterError(msg)
    tbl = SOURCE_TABLES[table]
    cols = [c for c in tbl.c if c.name != "pos"]
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


# -- reprocessing -------------------------------------------------------------------------


def _flatten_overrides(overrides: Mapping[str, Any] | None) -> dict[tuple[str, str], Any]:
    """``{(step, parameter): value}`` from nested or dotted overrides, validated by name."""
    from lazysky.runconfig import StepParameters

    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        msg = f"overrides must be a mapping like {{'detect.threshold': 3.0}}; got {overrides!r}"
        raise ParameterError(msg)
    flat: dict[tuple[str, str], Any] = {}
    for key, value in overrides.items():
        step, _, param = str(key).removeprefix("steps.").partition(".")
        if param:
            flat[(step, param)] = value
            continue
        if not isinstance(value, Mapping):
            msg = (f"override {key!r}: give 'step.parameter' (e.g. 'detect.threshold') or "
                   f"{{step: {{parameter: value}}}}; got {value!r}")
            raise ParameterError(msg)
        flat.update({(step, str(p)): v for p, v in value.items()})
    steps = StepParameters.model_fields
    for step, param in flat:
        if step not in steps:
            msg = (f"override names an unknown step {step!r}; the steps are "
                   f"{', '.join(steps)}")
            raise ParameterError(msg)
        model = steps[step].annotation
        params = getattr(model, "model_fields", {})
        if param not in params:
            msg = (f"override names an unknown parameter {param!r} of step {step!r}; its "
                   f"parameters are {', '.join(params)}")
            raise ParameterError(msg)
    return flat


def _child_config(parent: RunView, flat: Mapping[tuple[str, str], Any], run_type: str,
                  description: str) -> Any:
    from pydantic import ValidationError

    from lazysky.runconfig import RunConfig

    data = {k: v for k, v in parent.config.items() if k in RunConfig.model_fields}
    data.update(type=run_type, run_id=None, store=parent.store, description=description)
    steps = {k: dict(v) for k, v in dict(data.get("steps") or {}).items()}
    for (step, param), value in flat.items():
        steps.setdefault(step, {})[param] = value
    data["steps"] = steps
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        msg = f"the overrides make an invalid configuration: {problems}"
        raise ParameterError(msg) from None


def _region_tiles(grid: SkyGrid, region: Any) -> list[str]:
    """The tiles a region (centre and radius) touches; a region off the field: an error."""
    from lazysky.catalog import parse_radius

    if isinstance(region, Mapping):
        centre = region.get("center", region.get("centre"))
        radius = region.get("radius")
    elif isinstance(region, Sequence) and not isinstance(region, str) and len(region) == 2:
        centre, radius = region
    else:
        msg = (f"region must be (centre, radius) or {{'center': ..., 'radius': ...}}; "
               f"got {region!r}")
        raise ParameterError(msg)
    if centre is None or radius is None:
        msg = f"region needs a centre and a radius; got {region!r}"
        raise ParameterError(msg)
    ra, dec = _parse_sky(centre)
    r = parse_radius(radius)
    # the circle's outline (and centre) projected on the grid: the tiles its box touches
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra, dec, unit="deg")
    ring = c.directional_offset_by(np.linspace(0.0, 360.0, 72, endpoint=False) * u.deg,
                                   r * u.deg)
    pts = np.column_stack([np.append(ring.ra.deg, ra), np.append(ring.dec.deg, dec)])
    x, y = grid.wcs.world_to_pixel_values(pts[:, 0], pts[:, 1])
    ny, nx = grid.shape
    # pixels of the box clipped to the grid; the circle must reach the grid's pixels
    near_x = np.clip(x, 0, nx - 1)
    near_y = np.clip(y, 0, ny - 1)
    inside = (x.min() <= nx - 0.5 and x.max() >= -0.5 and y.min() <= ny - 0.5
              and y.max() >= -0.5)
    if inside:
        # the nearest grid pixel to the centre must lie within the circle
        cx, cy = np.clip(x[-1], 0, nx - 1), np.clip(y[-1], 0, ny - 1)
        (ra_n, dec_n) = grid.wcs.pixel_to_world_values(cx, cy)
        inside = c.separation(SkyCoord(ra_n, dec_n, unit="deg")).deg <= r + \
            grid.pixel_scale_arcsec / 3600.0
    if not inside:
        msg = (f"region centre ({ra:.6f}, {dec:.6f}) radius {r * 3600:.1f} arcsec is outside "
               f"the field: the grid covers ({grid.ra_deg:.6f}, {grid.dec_deg:.6f}) ± "
               f"{grid.shape[1] * grid.pixel_scale_arcsec / 7200:.4f} x "
               f"{grid.shape[0] * grid.pixel_scale_arcsec / 7200:.4f} deg")
        raise ParameterError(msg)
    t = grid.tile_px
    return [grid.tile_id(iy, ix)
            for iy in range(int(near_y.min() + 0.5) // t, int(near_y.max() + 0.5) // t + 1)
            for ix in range(int(near_x.min() + 0.5) // t, int(near_x.max() + 0.5) // t + 1)]


def _first_step(flat: Mapping[tuple[str, str], Any], steps: Sequence[str] | None) -> str:
    """The earliest step to recompute: ``steps`` given, else the earliest overridden."""
    if steps is not None:
        if isinstance(steps, str):
            steps = [steps]
        bad = [s for s in steps if s not in STEPS]
        if bad or not steps:
            msg = f"steps must be some of {', '.join(STEPS)}; got {list(steps)!r}"
            raise ParameterError(msg)
        chosen = list(steps)
        changed = [s for s, _ in flat]
        early = [s for s in changed if STEPS.index(s) < min(STEPS.index(c) for c in chosen)]
        if early:
            msg = (f"overrides change {sorted(set(early))} but steps={chosen} starts later: "
                   "add those steps (a step's parameters only act when it runs)")
            raise ParameterError(msg)
        return min(chosen, key=STEPS.index)
    # the stack step also covers calibration's outputs: any earlier change reruns the chain
    changed = [s for s, _ in flat]
    return min(changed, key=STEPS.index) if changed else STEPS[0]


def reprocess(
    run: Any,
    *,
    tiles: Sequence[str] | None = None,
    region: Any = None,
    overrides: Mapping[str, Any] | None = None,
    type: str = "exp",
    steps: Sequence[str] | None = None,
    description: str | None = None,
    client: Any = None,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
) -> RunView:
    """Reprocess some tiles of a run with changed parameters, as a new child run.

    The new run has the parent's configuration plus ``overrides``, the parent's sky grid
    (the same tile ids), and records the parent. Only the chosen tiles are catalogued.
    When every changed parameter belongs to ``detect`` (or ``steps=["detect"]``), the
    parent's images are reused and only detection and the catalog run; otherwise the
    chosen tiles (and their neighbours, for the halos) are processed from the raw
    exposures. Production is never touched: ``type="prod"`` is refused (promote an
    experiment instead).

    Parameters
    ----------
    run
        The parent: a run id, a RunView or a RunSummary.
    tiles, region
        The tiles (ids of the parent's grid), or a region ``(centre, radius)`` /
        ``{"center": ..., "radius": ...}`` whose tiles are taken. Default: every tile
        the parent catalogued.
    overrides
        Changed step parameters: ``{"detect.threshold": 3.0}`` or
        ``{"detect": {"threshold": 3.0}}``; steps and parameters of
        :class:`~lazysky.runconfig.StepParameters`.
    type
        The new run's type: ``exp`` (default), ``test``, ``val`` or ``repr``.
    steps
        The steps to rerun (some of ``calibrate``, ``stack``, ``difference``,
        ``detect``; everything after the earliest runs too). Default: from the earliest
        step whose parameters change.
    description
        Recorded with the run (default: says what was reprocessed).
    client
        A ``distributed.Client`` (default: the connected one, else a new local cluster).
    settings, catalog
        As for :func:`open_run`.

    Returns
    -------
    RunView
        The new run, opened.

    Raises
    ------
    ParameterError
        An unknown step or parameter (the message lists the valid ones), a bad value, a
        region outside the field, an unknown tile, ``type="prod"``. Nothing is written.
    CatalogError
        An unknown parent run.

    Examples
    --------
    >>> child = reprocess(run, tiles=["t001_002"],
    ...                   overrides={"detect.threshold": 3})  # doctest: +SKIP
    >>> child.parent_run_id == run.run_id  # doctest: +SKIP
    True
    """
    from lazysky.pipeline.grid import tiles_of

    if type == "prod":
        msg = ("reprocess never makes production runs (type='prod'): make an experiment "
               "(type='exp'), compare it, then promote it (lazysky.promote)")
        raise ParameterError(msg)
    if type not in REPROCESS_TYPES:
        msg = f"type must be one of {', '.join(REPROCESS_TYPES)}; got {type!r}"
        raise ParameterError(msg)
    if tiles is not None and region is not None:
        raise ParameterError("give tiles= or region=, not both")
    flat = _flatten_overrides(overrides)
    first = _first_step(flat, steps)
    settings = _settings(settings)
    catalog = _catalog(catalog, settings)
    parent = open_run(run, settings=settings, catalog=catalog)
    assert isinstance(parent, RunView)
    if parent.status not in ("done", "done_with_errors"):
        msg = f"run {parent.run_id} is {parent.status}: only a finished run can be reprocessed"
        raise ParameterError(msg)
    grid = parent.grid
    if region is not None:
        chosen = _region_tiles(grid, region)
    elif tiles is not None:
        if isinstance(tiles, str):
            tiles = [tiles]
        try:
            chosen = tiles_of(grid, list(tiles))
        except ParameterError as exc:
            msg = f"{exc}; the run's tiles are {', '.join(grid.tile_ids())}"
            raise ParameterError(msg) from None
    else:
        chosen = parent.tiles or grid.tile_ids()
    if not chosen:
        raise ParameterError("no tile to reprocess (tiles=[] given)")
    chosen = sorted(set(chosen))
    what = ", ".join(f"{s}.{p}={v!r}" for (s, p), v in flat.items()) or "no change"
    text = description if description is not None else (
        f"reprocess of {parent.run_id} from {first} on {len(chosen)} tile(s): {what}")
    cfg = _child_config(parent, flat, type, text)
    if first == "detect":
        missing = [t for t in chosen if t not in parent.tiles]
        if missing:
            msg = (f"tiles {missing} have no images in run {parent.run_id} (it covers "
                   f"{parent.tiles}): reprocess them with steps=['stack', ...]")
            raise ParameterError(msg)
        rid = _detect_only(parent, cfg, chosen, client=client, catalog=catalog)
    else:
        from lazysky.runner import run as run_pipeline

        summary = run_pipeline(cfg, settings=settings, client=_client(client), catalog=catalog,
                               tiles=chosen, grid=grid, parent_run_id=parent.run_id)
        rid = summary.run_id
    child = open_run(rid, settings=settings, catalog=catalog)
    assert isinstance(child, RunView)
    return child


def _client(client: Any) -> Any:
    """The given client, else the connected one, else None (the runner makes one)."""
    if client is not None:
        return client
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _detect_only(parent: RunView, cfg: Any, tiles: Sequence[str], *, client: Any,
                 catalog: Catalog) -> str:
    """Detection and catalog of ``tiles`` on the parent's images, as a new child run."""
    import dask

    from lazysky.catalog import finish_run, register_run
    from lazysky.catalog.production import plan_run
    from lazysky.pipeline.detect import SepSettings, detect, detect_difference
    from lazysky.runner import _compute, _with_exposure, _write_catalog_tile
    from lazysky.runs import Run, new_run_id

    client = _client(client)
    own = client is None
    if own:
        from lazysky.cluster import connect

        client = connect(parent.settings, worker_plugins=[SepSettings()])
    else:
        client.register_plugin(SepSettings())
    rid = new_run_id(cfg.type)
    recorded = {**cfg.model_dump(mode="json", exclude={"run_id"}),
                PRODUCTS_FROM: parent.products_run_id}
    row = _run_row(parent.run_id, catalog)
    register_run(Run(rid, config=recorded, inputs=dict(row.get("inputs") or {}),
                     parent_run_id=parent.run_id, description=cfg.description),
                 catalog=catalog)
    timings: dict[str, float] = {}
    status = "failed"
    t0 = time.perf_counter()
    try:
        plan_run(rid, field=parent.field_name, tiles=tiles, catalog=catalog)
        det = cfg.steps.detect
        co = detect(parent.reference, threshold=det.threshold, tiles=list(tiles))
        diffs = parent.differences
        dia = {e: detect_difference(d, threshold=det.diff_threshold, tiles=list(tiles))
               for e, d in diffs.items()}
        write = dask.delayed(_write_catalog_tile, pure=True)
        tasks = []
        for tile, table in co.tiles.items():
            tasks.append(write([table], dsn=catalog.dsn, table="coadd", run_id=rid, tile=tile,
                               stage="detect-coadd",
                               dask_key_name=f"catalog-coadd-{tile}-{rid}"))
        for tile in tiles:
            parts = [dask.delayed(_with_exposure, pure=True)(
                dia[e].tiles[tile], str((diffs[e].attrs.get("exposures") or [e])[0]))
                for e in dia]
            tasks.append(write(parts, dsn=catalog.dsn, table="diff", run_id=rid, tile=tile,
                               stage="detect-diff", dask_key_name=f"catalog-diff-{tile}-{rid}"))
        _compute(client, tasks, label="detect + catalog", show=False)
        status = "done"
    finally:
        timings["detect"] = round(time.perf_counter() - t0, 3)
        finish_run(rid, status=status, timings=timings, catalog=catalog)
        if own:
            client.close()
    return rid


# -- comparing runs -----------------------------------------------------------------------


_FLUX = {"coadd": "flux_aper", "diff": "flux_aper"}
_STAGE = {"coadd": "detect-coadd", "diff": "detect-diff"}
_COLUMNS = ("tile_id", "n_a", "n_b", "matched", "only_a", "only_b", "flux_ratio_median",
            "offset_median_arcsec", "offset_rms_arcsec")


@dataclass(frozen=True)
class Comparison:
    """Per-tile differences between the catalogs of two runs (see :func:`compare_runs`).

    ``table`` has one row per tile both runs cover: sources in a and in b, matched,
    only in a, only in b, median flux ratio b/a, median and rms offset (arcsec) and, with
    truth, completeness and false positives of each run.
    """

    run_a: str
    run_b: str
    table_name: str
    radius_arcsec: float
    table: Table
    matches: Table = field(repr=False)

    @property
    def totals(self) -> dict[str, float]:
        """Sums over the tiles (counts), and overall completeness when truth was given."""
        t = self.table
        out: dict[str, float] = {c: int(np.sum(t[c])) for c in
                                 ("n_a", "n_b", "matched", "only_a", "only_b")}
        for run in ("a", "b"):
            if f"truth_found_{run}" in t.colnames:
                n = int(np.sum(t["n_truth"]))
                out[f"completeness_{run}"] = (float(np.sum(t[f"truth_found_{run}"])) / n
                                              if n else math.nan)
                out[f"false_positives_{run}"] = int(np.sum(t[f"false_positives_{run}"]))
        return out

    def figure(self) -> Any:
        """A matplotlib figure: counts per tile, and the offsets and flux ratios matched."""
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        t = self.table
        idx = np.arange(len(t))
        w = 0.27
        ax1.bar(idx - w, t["matched"], w, label="matched")
        ax1.bar(idx, t["only_a"], w, label="only in a")
        ax1.bar(idx + w, t["only_b"], w, label="only in b")
        ax1.set_xticks(idx, [str(s) for s in t["tile_id"]], rotation=60, fontsize=7)
        ax1.set_ylabel(f"{self.table_name} sources")
        ax1.legend(fontsize=8)
        ax1.set_title(f"a = {self.run_a[:13]}…, b = {self.run_b[:13]}…", fontsize=9)
        m = self.matches
        if len(m):
            ratio = np.asarray(m["flux_b"], float) / np.asarray(m["flux_a"], float)
            ax2.scatter(np.asarray(m["distance"], float), ratio, s=10)
        ax2.set_xlabel("offset b − a (arcsec)")
        ax2.set_ylabel("flux ratio b / a")
        ax2.axhline(1.0, color="grey", lw=0.5)
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        tot = self.totals
        head = (f"Comparison of {self.table_name} sources, a = {self.run_a}, b = {self.run_b}"
                f" (match radius {self.radius_arcsec:g} arcsec, {len(self.table)} tile(s))")
        line = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in tot.items())
        return "\n".join([head, "  " + line, *self.table.pformat(max_width=140)])

    def _repr_html_(self) -> str:
        return (f"<p>Comparison of {self.table_name} sources: a = <code>{self.run_a}</code>, "
                f"b = <code>{self.run_b}</code>, radius {self.radius_arcsec:g}″</p>"
                + self.table._repr_html_())


def _truth_table(truth: Any, run: RunView, table: str) -> Table | None:
    """The truth as a Table (given, a path, or the survey's ``truth/scene.ecsv``)."""
    from astropy.table import Table

    if truth is False:
        return None
    if truth is None:
        for p in run.config.get("ingest") or []:
            for root in (Path(p), Path(p).parent):
                cand = root / "truth" / "scene.ecsv"
                if cand.is_file():
                    truth = cand
                    break
            if truth is not None:
                break
        if truth is None:
            return None
    if isinstance(truth, str | Path):
        path = Path(truth)
        if not path.is_file():
            msg = f"truth file {str(path)!r} does not exist"
            raise ParameterError(msg)
        truth = Table.read(path, format="ascii.ecsv")
    if not isinstance(truth, Table) or not {"ra", "dec"} <= set(truth.colnames):
        msg = "truth must be an astropy Table with ra and dec (degrees), or its ECSV file"
        raise ParameterError(msg)
    if table == "diff" and "kind" in truth.colnames:
        kinds = np.asarray(truth["kind"]).astype(str)
        truth = truth[np.isin(kinds, ("transient", "variable", "mover"))]
    return truth


def compare_runs(
    a: Any,
    b: Any,
    *,
    truth: Any = None,
    table: str = "coadd",
    radius: Any = "1arcsec",
    mag_limit: float | None = None,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
) -> Comparison:
    """Compare the catalogs of two runs, tile by tile, on the tiles both cover.

    Sources of ``a`` are matched to those of ``b`` on the catalog (the spatial index,
    :func:`lazysky.catalog.crossmatch`) within ``radius``, each to its nearest.

    Parameters
    ----------
    a, b
        Run ids, RunViews or RunSummaries.
    truth
        The simulator's truth: an astropy Table with ``ra``/``dec`` (and ``kind``, ``mag``),
        or its ECSV file; default: ``truth/scene.ecsv`` of the survey that ``a``'s
        configuration ingests, when there is one (``False``: none).
    table
        ``"coadd"`` or ``"diff"`` (truth: transients, variables and movers).
    radius
        The match radius (``"1arcsec"``, a Quantity, or degrees).
    mag_limit
        Truth fainter than this magnitude does not count in completeness.
    settings, catalog
        As for :func:`open_run`.

    Returns
    -------
    Comparison
        ``.table`` (astropy Table per tile), ``.matches``, ``.totals``, ``.figure()``.

    Examples
    --------
    >>> cmp = compare_runs(parent, child)  # doctest: +SKIP
    >>> cmp.totals["only_b"]  # doctest: +SKIP
    7
    """
    from astropy.coordinates import SkyCoord
    from astropy.table import Table

    from lazysky.catalog import crossmatch, parse_radius

    if table not in _STAGE:
        msg = f"table must be one of {', '.join(_STAGE)}; got {table!r}"
        raise ParameterError(msg)
    r_deg = parse_radius(radius)
    settings = _settings(settings)
    catalog = _catalog(catalog, settings)
    va = open_run(a, settings=settings, catalog=catalog)
    vb = open_run(b, settings=settings, catalog=catalog)
    assert isinstance(va, RunView)
    assert isinstance(vb, RunView)
    ta = _tiles_done(va.run_id, _STAGE[table], catalog)
    tb = _tiles_done(vb.run_id, _STAGE[table], catalog)
    common = sorted(set(ta) & set(tb))
    if not common:
        msg = (f"runs {va.run_id} and {vb.run_id} have no {table} tile in common "
               f"(a: {sorted(ta)}, b: {sorted(tb)})")
        raise ParameterError(msg)
    sa_ = _sources(va.run_id, table, common, catalog)
    sb = _sources(vb.run_id, table, common, catalog)
    flux = _FLUX[table]
    keys_b = {(str(t), int(n)): i for i, (t, n) in enumerate(zip(sb["tile_id"], sb["number"],
                                                                 strict=True))}
    best: dict[int, tuple[int, float]] = {}
    if len(sa_) and len(sb):
        m = crossmatch(np.asarray(sa_["ra"], float), np.asarray(sa_["dec"], float), r_deg,
                       table=table, run=vb.run_id, catalog=catalog)
        for idx, tile, num, dist in zip(m["index"], m["tile_id"], m["number"],
                                        np.asarray(m["distance"], float), strict=True):
            j = keys_b.get((str(tile), int(num)))
            if j is not None and (int(idx) not in best or dist < best[int(idx)][1]):
                best[int(idx)] = (j, float(dist))
    ia = np.array(sorted(best), dtype=int)
    ib = np.array([best[i][0] for i in ia], dtype=int)
    dist = np.array([best[i][1] for i in ia], dtype=float)
    matches = Table({
        "tile_id": np.asarray(sa_["tile_id"], dtype=str)[ia] if len(ia) else np.array([], str),
        "index_a": ia, "index_b": ib, "distance": dist,
        "flux_a": np.asarray(sa_[flux], float)[ia] if len(ia) else np.array([]),
        "flux_b": np.asarray(sb[flux], float)[ib] if len(ib) else np.array([]),
    })
    truth_all = truth_t = _truth_table(truth, va, table)
    grid = va.grid if truth_t is not None else None
    if truth_t is not None and mag_limit is not None and "mag" in truth_t.colnames:
        truth_t = truth_t[np.asarray(truth_t["mag"], float) <= mag_limit]
    # completeness against the truth above the limit; false positives against all of it
    c_all = None if truth_all is None or not len(truth_all) else SkyCoord(
        np.asarray(truth_all["ra"], float), np.asarray(truth_all["dec"], float), unit="deg")
    truth_tile = None
    if truth_t is not None and grid is not None:
        x, y = grid.wcs.world_to_pixel_values(np.asarray(truth_t["ra"], float),
                                              np.asarray(truth_t["dec"], float))
        ix = np.floor(np.asarray(x) + 0.5).astype(int) // grid.tile_px
        iy = np.floor(np.asarray(y) + 0.5).astype(int) // grid.tile_px
        truth_tile = np.array([f"t{j:03d}_{i:03d}" for j, i in zip(iy, ix, strict=True)])
    rows = []
    tiles_a = np.asarray(sa_["tile_id"], dtype=str)
    tiles_b = np.asarray(sb["tile_id"], dtype=str)
    m_tiles = np.asarray(matches["tile_id"], dtype=str)
    for tile in common:
        sel = m_tiles == tile
        n_a, n_b = int(np.sum(tiles_a == tile)), int(np.sum(tiles_b == tile))
        n_m = int(np.sum(sel))
        ratio = np.asarray(matches["flux_b"], float)[sel] / np.asarray(matches["flux_a"],
                                                                       float)[sel]
        ratio = ratio[np.isfinite(ratio)]
        off = dist[sel]
        row: dict[str, Any] = {
            "tile_id": tile, "n_a": n_a, "n_b": n_b, "matched": n_m,
            "only_a": n_a - n_m, "only_b": n_b - len(set(ib[sel].tolist())),
            "flux_ratio_median": float(np.median(ratio)) if len(ratio) else math.nan,
            "offset_median_arcsec": float(np.median(off)) if len(off) else math.nan,
            "offset_rms_arcsec": float(np.sqrt(np.mean(off**2))) if len(off) else math.nan,
        }
        if truth_t is not None and truth_tile is not None:
            tt = truth_t[truth_tile == tile]
            row["n_truth"] = len(tt)
            for run, src, tiles_s in (("a", sa_, tiles_a), ("b", sb, tiles_b)):
                s = src[tiles_s == tile]
                found, false = 0, len(s)
                cs = SkyCoord(np.asarray(s["ra"], float), np.asarray(s["dec"], float),
                              unit="deg") if len(s) else None
                if len(tt) and cs is not None:
                    ct = SkyCoord(np.asarray(tt["ra"], float), np.asarray(tt["dec"], float),
                                  unit="deg")
                    _, sep_t, _ = ct.match_to_catalog_sky(cs)
                    found = int(np.sum(sep_t.arcsec <= r_deg * 3600))
                if c_all is not None and cs is not None:
                    _, sep_s, _ = cs.match_to_catalog_sky(c_all)
                    false = int(np.sum(sep_s.arcsec > r_deg * 3600))
                row[f"truth_found_{run}"] = found
                row[f"completeness_{run}"] = found / len(tt) if len(tt) else math.nan
                row[f"false_positives_{run}"] = false
        rows.append(row)
    out = Table(rows=rows, names=list(rows[0]))
    for c in ("offset_median_arcsec", "offset_rms_arcsec"):
        out[c].format = ".3f"
    out["flux_ratio_median"].format = ".4f"
    return Comparison(run_a=va.run_id, run_b=vb.run_id, table_name=table,
                      radius_arcsec=r_deg * 3600.0, table=out, matches=matches)

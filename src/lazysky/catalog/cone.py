"""Cone search and cross-match on the GiST index of ``pos``.

The filter is ``pos <@ scircle(centre, radius)`` with the circle as one bound parameter:
the indexed column stays on the left of ``<@``, which is what lets PostgreSQL use the
GiST index (a circle written on the indexed side, ``scircle(...) @> pos`` on a join's
inner table, or a function around ``pos``, silently falls back to a full scan; tests
read the plans). pgSphere's containment is exact (index lookup, then recheck), so the
result equals a brute-force angular-separation selection.

Examples
--------
>>> from lazysky.catalog import cone_search
>>> t = cone_search(150.0, 2.2, "10arcsec", table="coadd")  # doctest: +SKIP
>>> t.colnames[:4]  # doctest: +SKIP
['run_id', 'tile_id', 'number', 'x']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import astropy.units as u
import numpy as np
import psycopg
import sqlalchemy as sa
from astropy.table import Table
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement

from lazysky.catalog._parse import MAX_RADIUS_DEG, parse_position, parse_radius
from lazysky.catalog._types import SCircle, SPoint
from lazysky.catalog.cells import cone_bounds
from lazysky.catalog.database import Catalog, open_catalog
from lazysky.catalog.schema import INTERNAL_COLUMNS, SOURCE_TABLES
from lazysky.errors import ParameterError
from lazysky.runs import parse_run_id, validate_run_id

__all__ = ["DEFAULT_LIMIT", "cone_query", "cone_search", "explain", "to_table"]

DEFAULT_LIMIT = 100_000
_RAD_TO_ARCSEC = 180.0 / math.pi * 3600.0
_UNITS = {"ra": u.deg, "dec": u.deg, "x": u.pix, "y": u.pix, "a": u.pix, "b": u.pix,
          "theta": u.rad, "distance": u.arcsec}


class _Explain(Executable, ClauseElement):
    """``EXPLAIN <statement>``, with the statement's parameters bound as usual."""

    inherit_cache = False

    def __init__(self, statement: sa.Select[Any], analyze: bool) -> None:
        self.statement = statement
        self.analyze = analyze


@compiles(_Explain)
def _compile_explain(element: _Explain, compiler: Any, **kw: Any) -> str:
    prefix = "EXPLAIN (ANALYZE, BUFFERS) " if element.analyze else "EXPLAIN "
    return prefix + str(compiler.process(element.statement, **kw))


def explain(stmt: sa.Select[Any], *, catalog: Catalog | None = None,
            analyze: bool = False, planner: dict[str, str] | None = None) -> str:
    """PostgreSQL's plan for ``stmt`` (``EXPLAIN``; ``analyze=True`` runs it).

    ``planner`` sets planner options for this one plan, e.g. ``{"enable_seqscan": "off"}``
    to see whether an index *can* drive a query on tables still too small to need it.
    """
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().begin() as conn:
        for name, value in (planner or {}).items():
            if not name.replace("_", "").isalnum():
                msg = f"not a planner setting: {name!r}"
                raise ParameterError(msg)
            conn.execute(sa.select(sa.func.set_config(name, str(value), True)))
        return "\n".join(str(r[0]) for r in conn.execute(_Explain(stmt, analyze)))


def _table(table: str) -> sa.Table:
    if table not in SOURCE_TABLES:
        msg = f"table must be one of {', '.join(SOURCE_TABLES)}; got {table!r}"
        raise ParameterError(msg)
    return SOURCE_TABLES[table]


def _columns(tbl: sa.Table, columns: Sequence[str] | None) -> list[sa.ColumnElement[Any]]:
    names = [c.name for c in tbl.columns if c.name not in INTERNAL_COLUMNS]
    if columns is None:
        return [tbl.c[n] for n in names]
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    unknown = [c for c in columns if c not in names]
    if unknown or not columns:
        msg = f"unknown column(s) {unknown} of {tbl.name}; choose from {', '.join(names)}"
        raise ParameterError(msg)
    return [tbl.c[n] for n in columns]


def cone_query(ra: Any, dec: Any, radius: Any, *, table: str = "coadd",
               run: str | None = None, columns: Sequence[str] | None = None,
               where: Iterable[sa.ColumnElement[bool]] = (), limit: int | None = DEFAULT_LIMIT,
               max_radius_deg: float = MAX_RADIUS_DEG) -> sa.Select[Any]:
    """The SQLAlchemy ``SELECT`` of a cone search (see :func:`cone_search`)."""
    ra_deg, dec_deg = parse_position(ra, dec)
    radius_deg = parse_radius(radius, max_deg=max_radius_deg)
    tbl = _table(table)
    circle = SCircle.from_degrees(ra_deg, dec_deg, radius_deg)
    distance = (tbl.c.pos.distance(SPoint.from_degrees(ra_deg, dec_deg))
                * _RAD_TO_ARCSEC).label("distance")
    stmt = sa.select(*_columns(tbl, columns), distance).where(tbl.c.pos.contained_by(circle))
    # the cone's box on ra/dec: lets PostgreSQL prune to the sky cells it can touch
    # (schema v14; at plan time, or at run time for a prepared statement). One shape for
    # every cone, so a prepared statement serves them all.
    box = cone_bounds(ra_deg, dec_deg, radius_deg)
    stmt = stmt.where(tbl.c.dec.between(box["dec_lo"], box["dec_hi"]),
                      sa.or_(tbl.c.ra.between(box["ra_lo1"], box["ra_hi1"]),
                             tbl.c.ra.between(box["ra_lo2"], box["ra_hi2"])))
    if run is not None:
        # `run_id || ''`: never let the planner pick the primary-key index for the run
        # (statistics that do not know a fresh run yet make it look tiny); the GiST
        # index must drive, the run is a filter on its rows (tested).
        stmt = stmt.where(tbl.c.run_id.concat("") == validate_run_id(run))
        if "run_type" in tbl.c:  # the run's partition only (type and month of its id)
            rid = parse_run_id(run)
            stmt = stmt.where(tbl.c.run_type == rid.type,
                              tbl.c.run_month == rid.date.replace(day=1))
    for clause in [where] if isinstance(where, sa.ColumnElement) else where:
        if not isinstance(clause, sa.ColumnElement):
            msg = (f"where= takes SQLAlchemy expressions such as table.c.snr > 5 (never SQL "
                   f"text); got {clause!r}")
            raise ParameterError(msg)
        stmt = stmt.where(clause)
    stmt = stmt.order_by(distance)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            msg = f"limit must be a positive integer or None; got {limit!r}"
            raise ParameterError(msg)
        stmt = stmt.limit(limit)
    return stmt


def _build_table(rows: Sequence[Sequence[Any]], names: Sequence[str],
                 selected: Sequence[sa.ColumnElement[Any]]) -> Table:
    """An astropy Table from rows, one numpy array (and unit) per selected column."""
    columns: list[Sequence[Any]] = (list(zip(*rows, strict=True)) if rows
                                    else [()] * len(names))
    arrays: list[np.ndarray] = []
    for values, col, name in zip(columns, selected, names, strict=True):
        if isinstance(col.type, sa.Float) or name == "distance":
            arr = np.array(values, dtype=np.float64)  # None (SQL NULL) becomes NaN
        elif isinstance(col.type, sa.Integer):
            arr = np.array(values, dtype=np.int64)
        else:
            arr = np.array(values, dtype=str) if values else np.zeros(0, dtype="U1")
        arrays.append(arr)
    # plain arrays, names and units in one call: astropy then makes each Column once
    units = {name: _UNITS[name] for name in names if name in _UNITS}
    return Table(arrays, names=list(names), units=units, copy=False)


def to_table(result: sa.CursorResult[Any], stmt: sa.Select[Any]) -> Table:
    """An astropy Table (with units) from the rows of ``stmt``."""
    rows = result.fetchall()
    return _build_table(rows, list(result.keys()), list(stmt.selected_columns))


class _BinaryCursor(psycopg.Cursor[Any]):
    """A psycopg cursor asking for binary results (``connection.cursor(binary=True)``)."""

    def __init__(self, connection: psycopg.Connection[Any], *,
                 row_factory: Any = None) -> None:
        super().__init__(connection, row_factory=row_factory)
        self.format = psycopg.pq.Format.BINARY


def _fetch_binary(conn: sa.Connection, stmt: sa.Select[Any]
                  ) -> tuple[list[tuple[Any, ...]], list[str]]:
    """Run ``stmt`` through SQLAlchemy (its compiled-statement cache) with binary rows.

    psycopg parses binary floats several times faster than their text, the bulk of a
    cone's fetch, and the rows are read from the driver's cursor as plain tuples. The
    cursor class is swapped only while this (checked-out) connection runs ``stmt``. Every
    selected column needs a binary output function: ``pos`` (pgSphere has none) is never
    selected by :func:`cone_query`.
    """
    driver: psycopg.Connection[Any] = conn.connection.driver_connection  # type: ignore[assignment]
    default = driver.cursor_factory
    driver.cursor_factory = _BinaryCursor
    try:
        result = conn.execute(stmt)
        # the driver's cursor itself: plain tuples, no SQLAlchemy Row per row
        return list(result.cursor.fetchall()), list(result.keys())
    finally:
        driver.cursor_factory = default


def cone_search(ra: Any, dec: Any, radius: Any, *, table: str = "coadd",
                run: str | None = None, columns: Sequence[str] | None = None,
                where: Iterable[sa.ColumnElement[bool]] = (),
                limit: int | None = DEFAULT_LIMIT, catalog: Catalog | None = None) -> Table:
    """Sources within ``radius`` of (``ra``, ``dec``), nearest first.

    Parameters
    ----------
    ra, dec
        The centre: degrees, sexagesimal strings (RA in hours) or angles with units.
    radius
        Degrees, or a string/Quantity with a unit (``"10arcsec"``, ``0.5 * u.deg``).
    table
        ``coadd``, ``diff`` (all runs) or ``coadd_prod``, ``diff_prod`` (production).
    run
        Only this run's rows.
    columns
        Column names to return (default: all but ``pos``); ``distance`` (arcsec) is
        always added.
    where
        Further SQLAlchemy conditions, e.g. ``[coadd_sources.c.snr > 10]``.
    limit
        At most this many rows (the nearest); None for no limit.
    catalog
        The opened catalog (default: :func:`open_catalog` with the settings in force).

    Returns
    -------
    astropy.table.Table
        One row per source, with units on positions, pixels and ``distance``.

    Raises
    ------
    ParameterError
        RA outside [0, 360), Dec outside [-90, 90], radius not in (0, 90] deg
        (pgSphere's largest circle), NaN, non-numbers, unknown table or columns.

    Examples
    --------
    >>> cone_search("10:00:00", "+02:12:00", "1arcmin", table="coadd_prod")  # doctest: +SKIP
    <Table length=3> …
    """
    stmt = cone_query(ra, dec, radius, table=table, run=run, columns=columns, where=where,
                      limit=limit)
    catalog = catalog if catalog is not None else open_catalog()
    # autocommit: a single SELECT needs no BEGIN/ROLLBACK round trips
    with catalog.engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        rows, names = _fetch_binary(conn, stmt)
        return _build_table(rows, names, list(stmt.selected_columns))

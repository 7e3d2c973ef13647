"""Cross-match many positions against a source table, on the GiST index.

The positions are COPYed into a temporary table (with each one's box on ra/dec, see
:mod:`lazysky.catalog.cells`), then each is probed with
``s.pos <@ scircle(x.pos, radius)`` in a ``LATERAL`` subquery: the indexed column
``s.pos`` stays alone on the left, so each position becomes one GiST index probe (a
nested loop over the positions, an index scan inside), in the sky cells its box touches
(pruned per position at run time). Writing the circle around the indexed side instead
(``x.pos <@ scircle(s.pos, r)``) is logically the same and silently scans the whole
table for every position; :func:`crossmatch_plan` exposes the plan so tests check it.

Examples
--------
>>> from lazysky.catalog.xmatch import crossmatch
>>> m = crossmatch([150.0, 150.1], [2.2, 2.3], "1arcsec", table="coadd")  # doctest: +SKIP
>>> m.colnames  # doctest: +SKIP
['index', 'run_id', 'tile_id', 'number', 'ra', 'dec', 'distance']
"""

from __future__ import annotations

import math
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import astropy.units as u
import numpy as np
import psycopg
from astropy.table import Table
from psycopg import sql

from lazysky.catalog._parse import parse_radius
from lazysky.catalog.cells import cone_bounds_arrays
from lazysky.catalog.database import Catalog, open_catalog
from lazysky.catalog.schema import SOURCE_TABLES
from lazysky.errors import ParameterError
from lazysky.runs import parse_run_id, validate_run_id

__all__ = ["crossmatch", "crossmatch_plan"]

_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_RAD_TO_ARCSEC = 180.0 / math.pi * 3600.0


def _positions(ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
    ra_a = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec_a = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    if ra_a.shape != dec_a.shape or ra_a.ndim != 1:
        msg = f"ra and dec must be 1-d and of equal length; got {ra_a.shape} and {dec_a.shape}"
        raise ParameterError(msg)
    bad = ~(np.isfinite(ra_a) & np.isfinite(dec_a) & (ra_a >= 0) & (ra_a < 360)
            & (np.abs(dec_a) <= 90))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        msg = (f"positions need RA in [0, 360) and Dec in [-90, 90] degrees; position {i} "
               f"is ({ra_a[i]!r}, {dec_a[i]!r})")
        raise ParameterError(msg)
    return ra_a, dec_a


_BOX = ("dec_lo", "dec_hi", "ra_lo1", "ra_hi1", "ra_lo2", "ra_hi2")


def _payload(idx: np.ndarray, ra: np.ndarray, dec: np.ndarray, radius_deg: float) -> bytes:
    """Binary COPY rows of the positions: index, RA, Dec and each one's box (cells.py)."""
    box = cone_bounds_arrays(ra, dec, radius_deg)
    fields = [("n", ">i2"), ("l0", ">i4"), ("idx", ">i4")]
    for name in ("ra", "dec", *_BOX):
        fields += [(f"l_{name}", ">i4"), (name, ">f8")]
    rows = np.empty(len(idx), dtype=fields)
    rows["n"], rows["l0"], rows["idx"] = 2 + len(_BOX) + 1, 4, idx
    for name, values in (("ra", ra), ("dec", dec), *box.items()):
        rows[f"l_{name}"], rows[name] = 8, values
    return _HEADER + rows.tobytes() + struct.pack(">h", -1)


def _spatial_order(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Positions ordered in 0.1° Dec strips, then RA: neighbours probe neighbouring pages."""
    return np.lexsort((ra, np.floor(dec * 10.0)))


def _query(table: str, run: str | None) -> sql.Composed:
    if table not in SOURCE_TABLES:
        msg = f"table must be one of {', '.join(SOURCE_TABLES)}; got {table!r}"
        raise ParameterError(msg)
    # `run_id || ''` keeps the run filter off the primary-key index: with statistics that
    # do not know a fresh run yet, PostgreSQL would otherwise drive the join from that
    # index (all the run's rows per position) instead of the GiST probes (tested).
    run_filter: sql.Composable = (sql.SQL(" AND s.run_id || '' = %(run)s")
                                  if run is not None else sql.SQL(""))
    if run is not None and "run_type" in SOURCE_TABLES[table].c:
        # the run's own partition (its type and month) alone
        run_filter += sql.SQL(" AND s.run_type = %(run_type)s AND s.run_month = %(run_month)s")
    # no ORDER BY: the parts are probed concurrently and merged in numpy anyway, and a
    # sort of the matches on the server would spill to disk under the default work_mem
    # each position's box on ra/dec: PostgreSQL prunes the sky cells (schema v14) per
    # position at run time, so each probes one or two cells' GiST, not every cell's. A
    # LATERAL subquery kept apart (OFFSET 0): the planner costs a join over the cells as
    # if no cell were pruned, and would rather scan them all once than probe them all
    # per position; the subquery has no such plan, only its probes per position.
    return sql.SQL(
        "SELECT x.idx, s.run_id, s.tile_id, s.number, s.ra, s.dec, s.distance "
        "FROM _xmatch x CROSS JOIN LATERAL ("
        "SELECT s.run_id, s.tile_id, s.number, s.ra, s.dec, "
        "(s.pos <-> spoint(radians(x.ra), radians(x.dec))) * %(to_arcsec)s AS distance "
        "FROM {t} s "
        "WHERE s.pos <@ scircle(spoint(radians(x.ra), radians(x.dec)), %(radius)s) "
        "AND s.dec BETWEEN x.dec_lo AND x.dec_hi AND (s.ra BETWEEN x.ra_lo1 AND x.ra_hi1 "
        "OR s.ra BETWEEN x.ra_lo2 AND x.ra_hi2){run} OFFSET 0) s"
    ).format(t=sql.Identifier(SOURCE_TABLES[table].name),
             run=run_filter)


def _probe(catalog: Catalog, payload: bytes, query: sql.Composed,
           params: dict[str, Any], *, binary: bool = True) -> list[tuple[Any, ...]]:
    raw = catalog.engine().raw_connection()
    try:
        conn: psycopg.Connection[Any] = raw.driver_connection  # type: ignore[assignment]
        # binary results: psycopg parses them several times faster than text
        with conn.transaction(), conn.cursor(binary=binary) as cur:
            # binary COPY cannot fill an spoint column (pgSphere has no binary input),
            # so the positions arrive as floats and become spoints in the join
            floats = ", ".join(f"{c} float8" for c in ("ra", "dec", *_BOX))
            cur.execute(f"CREATE TEMP TABLE _xmatch (idx int4, {floats}) ON COMMIT DROP")
            with cur.copy("COPY _xmatch FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(payload)
            cur.execute("ANALYZE _xmatch")
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        raw.close()


def _run(ra: Any, dec: Any, radius: Any, *, table: str, run: str | None,
         catalog: Catalog | None, explain: bool, n_connections: int,
         analyze: bool = False) -> list[list[tuple[Any, ...]]]:
    """The rows of each part (one part for ``explain``: the plan's lines)."""
    radius_deg = parse_radius(radius)
    radius_rad = math.radians(radius_deg)
    if run is not None:
        validate_run_id(run)
    query = _query(table, run)
    if explain:
        query = sql.SQL("EXPLAIN (ANALYZE) " if analyze else "EXPLAIN ") + query
    ra_a, dec_a = _positions(ra, dec)
    if isinstance(n_connections, bool) or not isinstance(n_connections, int) or (
            n_connections < 1):
        msg = f"n_connections must be a positive integer; got {n_connections!r}"
        raise ParameterError(msg)
    catalog = catalog if catalog is not None else open_catalog()
    params: dict[str, Any] = {"radius": radius_rad, "run": run, "to_arcsec": _RAD_TO_ARCSEC}
    if run is not None:
        rid = parse_run_id(run)
        params.update(run_type=rid.type, run_month=rid.date.replace(day=1))
    order = _spatial_order(ra_a, dec_a)
    n_parts = 1 if explain else max(1, min(n_connections, len(order) // 5000))
    parts = [_payload(chunk, ra_a[chunk], dec_a[chunk], radius_deg)
             for chunk in np.array_split(order, n_parts)]
    if n_parts == 1:
        return [_probe(catalog, parts[0], query, params, binary=not explain)]
    # one connection per part, probed concurrently (psycopg waits without the GIL)
    with ThreadPoolExecutor(n_parts) as pool:
        return list(pool.map(lambda p: _probe(catalog, p, query, params), parts))


def _matches_table(parts: list[list[tuple[Any, ...]]]) -> Table:
    """The parts' rows as one Table ordered by position index, then distance."""
    rows = [r for part in parts for r in part]
    cols: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [()] * 7
    index = np.asarray(cols[0], dtype=np.int64)
    distance = np.asarray(cols[6], dtype=np.float64)
    order = np.lexsort((distance, index))
    return Table(
        [index[order], np.asarray(cols[1], dtype=str)[order],
         np.asarray(cols[2], dtype=str)[order],
         np.asarray(cols[3], dtype=np.int64)[order],
         np.asarray(cols[4], dtype=np.float64)[order],
         np.asarray(cols[5], dtype=np.float64)[order], distance[order]],
        names=["index", "run_id", "tile_id", "number", "ra", "dec", "distance"],
        units={"ra": u.deg, "dec": u.deg, "distance": u.arcsec}, copy=False)


def crossmatch(ra: Any, dec: Any, radius: Any, *, table: str = "coadd",
               run: str | None = None, catalog: Catalog | None = None,
               n_connections: int = 2) -> Table:
    """Every source within ``radius`` of each position.

    Parameters
    ----------
    ra, dec
        Arrays of positions in degrees.
    radius
        The match radius (degrees, or a string/Quantity with a unit, ``"1arcsec"``).
    table, run, catalog
        As for :func:`lazysky.catalog.cone_search`.
    n_connections
        Probe with this many database connections at once (positions split
        spatially; one part when there are fewer than 5 000 per connection).

    Returns
    -------
    astropy.table.Table
        ``index`` (the position's row), the source's key and position, ``distance``
        (arcsec); ordered by ``index`` then distance. Positions without a match are
        absent.
    """
    parts = _run(ra, dec, radius, table=table, run=run, catalog=catalog, explain=False,
                 n_connections=n_connections)
    return _matches_table(parts)


def crossmatch_plan(ra: Any, dec: Any, radius: Any, *, table: str = "coadd",
                    run: str | None = None, catalog: Catalog | None = None,
                    analyze: bool = False) -> str:
    """PostgreSQL's plan (``EXPLAIN``) of :func:`crossmatch` for these positions.

    ``analyze=True`` runs it (``EXPLAIN (ANALYZE)``): the plan then says how often each
    part ran, e.g. which sky cells were never probed.
    """
    (rows,) = _run(ra, dec, radius, table=table, run=run, catalog=catalog, explain=True,
                   n_connections=1, analyze=analyze)
    return "\n".join(str(r[0]) for r in rows)

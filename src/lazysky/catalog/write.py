"""Bulk writes: one binary COPY per (run, tile), replacing its rows atomically.

:func:`write_sources` builds PostgreSQL's binary COPY rows with numpy (no per-row Python)
and, in one transaction, takes an advisory lock on the (table, run, tile), records the
write in the ``source_tiles`` ledger, deletes that (run, tile)'s rows if the ledger says
it was written before (a retry or re-run; a first write has nothing to delete and skips
the lookup) and COPYs the rows straight into the source table (PostgreSQL then inserts
them a page at a time). That needs a binary input function for ``spoint`` (schema v13
declares one, see :mod:`lazysky.catalog._binary`); without it — a catalog upgraded by a
role that is no superuser, or restored from a dump — the rows go through a temporary
staging table and ``INSERT … SELECT``, with the same result at ~4–10 % more server CPU.
So:

- a retried Dask task or a re-run replaces, never duplicates or loses, rows (idempotent);
- many processes may write at once (one connection per process; writers of the same
  (run, tile) are serialised by the lock, others run in parallel);
- a writer killed at any point (even with SIGKILL in the middle of the COPY) changes
  nothing: the transaction never commits, the previous rows stay;
- rows are stored in spatial order within the tile (1′ Dec strips, then RA), so a cone
  search touches few heap pages;
- by default the transaction commits without waiting for its WAL to reach the disk
  (``synchronous_commit = off`` for this transaction only): still all-or-nothing, but a
  crash of the server or the machine within ~0.6 s of the commit may forget that
  (run, tile)'s write. Every later synchronous commit flushes the WAL written before it,
  so the :func:`~lazysky.catalog.mark_tile_done` that follows a write in the pipeline
  (or :func:`~lazysky.catalog.finish_run`) makes it durable; a tile lost that way is not
  marked done and is written again on resume. ``durable=True`` waits for the flush.

``pos`` (the ``spoint``) is computed by the database from ``ra``/``dec``.

Examples
--------
>>> import numpy as np
>>> from lazysky.catalog import write_sources
>>> rows = {"x": [1.0], "y": [2.0], "ra": [10.0], "dec": [-5.0], "snr": [12.0]}
>>> write_sources("coadd", run_id, "t0001", rows)  # doctest: +SKIP
WriteResult(table='coadd_sources', run_id='…', tile_id='t0001', deleted=0, inserted=1, …)
"""

from __future__ import annotations

import datetime
import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import sqlalchemy as sa
from psycopg import sql

from lazysky.catalog._binary import HAS_RECEIVE_SQL
from lazysky.catalog._errors import CatalogWriteError
from lazysky.catalog.cells import cells_of, ensure_cells
from lazysky.catalog.database import Catalog, open_catalog
from lazysky.catalog.schema import SOURCE_TABLES, partition_name
from lazysky.errors import ParameterError
from lazysky.runs import parse_run_id, validate_run_id

__all__ = ["WriteResult", "write_sources"]

logger = logging.getLogger(__name__)

_KEY_COLUMNS = ("run_id", "tile_id", "pos", "run_type", "run_month")
_REQUIRED = ("x", "y", "ra", "dec")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_CHUNK_BYTES = 4 << 20
_PG_EPOCH = datetime.date(2000, 1, 1)  # binary dates count days from here

#: COPY rows straight into the source table when ``spoint`` has a binary input function
#: (schema v13, see :mod:`lazysky.catalog._binary`); False: always through the staging
#: table (the fallback, kept selectable for A/Bs and its tests).
DIRECT_COPY = True


@dataclass(frozen=True)
class WriteResult:
    """What one :func:`write_sources` call did."""

    table: str
    run_id: str
    tile_id: str
    deleted: int
    inserted: int
    seconds: float


def _columns_of(table: sa.Table) -> dict[str, str]:
    """Staged column name -> 'f8' | 'i4' | 'i2' for the writable per-row columns."""
    out: dict[str, str] = {}
    for col in table.columns:
        if col.name in _KEY_COLUMNS:
            continue
        if col.name == "exposure_id":
            out["exposure_idx"] = "i4"
        elif isinstance(col.type, sa.SmallInteger):
            out[col.name] = "i2"
        elif isinstance(col.type, sa.Integer):
            out[col.name] = "i4"
        else:
            out[col.name] = "f8"
    return out


def _null_for_nan(table: sa.Table, kinds: dict[str, str], column: str) -> bool:
    """Whether NaN in ``column`` is stored as NULL: the optional float columns."""
    return kinds.get(column) == "f8" and bool(table.c[column].nullable)


def _as_arrays(sources: Any) -> dict[str, np.ndarray]:
    if isinstance(sources, np.ndarray) and sources.dtype.names:
        return {n: np.asarray(sources[n]) for n in sources.dtype.names}
    if hasattr(sources, "colnames"):  # astropy Table
        return {n: np.asarray(sources[n]) for n in sources.colnames}
    if isinstance(sources, Mapping):
        return {str(k): np.asarray(v) for k, v in sources.items()}
    msg = (
        f"sources must be an astropy Table, a numpy structured array or a mapping of "
        f"column name to array, got {type(sources).__name__}"
    )
    raise ParameterError(msg)


def _prepare(table: sa.Table, sources: Any) -> tuple[np.ndarray, list[str], list[str]]:
    """Validate the columns; return the COPY rows, their column names, exposure ids."""
    arrays = _as_arrays(sources)
    kinds = _columns_of(table)
    allowed = [c for c in kinds if c != "exposure_idx"]
    if "exposure_idx" in kinds:
        allowed.append("exposure_id")
    unknown = sorted(set(arrays) - set(allowed))
    if unknown:
        msg = f"unknown column(s) {unknown} for {table.name}; allowed: {sorted(allowed)}"
        raise ParameterError(msg)
    required = [*_REQUIRED, "sign"] if "sign" in kinds else list(_REQUIRED)
    if missing := [c for c in required if c not in arrays]:
        msg = f"{table.name} rows need the column(s) {missing}; got {sorted(arrays)}"
        raise ParameterError(msg)
    n = len(arrays["ra"])
    if bad := {k: len(v) for k, v in arrays.items() if v.ndim != 1 or len(v) != n}:
        msg = f"all columns must be 1-d with {n} rows (as 'ra'); these differ: {bad}"
        raise ParameterError(msg)
    exposure_ids: list[str] = []
    if "exposure_id" in arrays:
        uniq, inverse = np.unique(arrays.pop("exposure_id").astype(str), return_inverse=True)
        exposure_ids = [str(u) for u in uniq]
        arrays["exposure_idx"] = inverse + 1
    if "number" not in arrays:
        arrays["number"] = np.arange(1, n + 1)
    if "flags" not in arrays:
        arrays["flags"] = np.zeros(n, dtype=np.int32)
    for name in ("x", "y", "ra", "dec"):
        values = np.asarray(arrays[name], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            i = int(np.flatnonzero(~np.isfinite(values))[0])
            msg = f"column {name!r} must be finite; row {i} is {values[i]!r}"
            raise ParameterError(msg)
    dec = np.asarray(arrays["dec"], dtype=np.float64)
    if np.any(np.abs(dec) > 90):
        i = int(np.flatnonzero(np.abs(dec) > 90)[0])
        msg = f"dec must lie in [-90, 90] deg; row {i} has {dec[i]!r}"
        raise ParameterError(msg)
    arrays["ra"] = np.mod(np.asarray(arrays["ra"], dtype=np.float64), 360.0)
    arrays["ra"][arrays["ra"] >= 360.0] = 0.0  # mod of a tiny negative can round to 360
    for c in [c for c in arrays if _null_for_nan(table, kinds, c)]:
        values = np.asarray(arrays[c])
        if values.size and values.dtype.kind == "f" and np.all(np.isnan(values)):
            del arrays[c]  # NULL throughout: left out of the COPY (no NULL per row to send)
    # exposure_idx last: the direct COPY sends it as text after the other fields
    names = sorted((c for c in kinds if c in arrays), key=lambda c: c == "exposure_idx")
    fields: list[tuple[str, str]] = [("_n", ">i2")]
    for c in names:
        fields += [(f"_l_{c}", ">i4"), (c, ">" + kinds[c])]
    rows = np.empty(n, dtype=fields)
    rows["_n"] = len(names)
    for c in names:
        rows[f"_l_{c}"] = int(kinds[c][1])
        try:
            rows[c] = np.asarray(arrays[c]).astype(kinds[c], casting="same_kind"
                                                   if kinds[c] == "f8" else "unsafe")
        except (TypeError, ValueError):
            msg = f"column {c!r} must be numeric, got dtype {np.asarray(arrays[c]).dtype}"
            raise ParameterError(msg) from None
    numbers = rows["number"]
    if n > 1 and not np.all(numbers[1:] > numbers[:-1]):  # detection order: increasing
        ordered = np.sort(numbers)
        if (dup := ordered[1:][ordered[1:] == ordered[:-1]]).size:
            msg = (f"column 'number' must be unique within a (run, tile); "
                   f"{int(dup[0])} appears more than once")
            raise ParameterError(msg)
    # Store a tile's rows in spatial order (1′ Dec strips, then RA): a cone search then
    # reads a few heap pages instead of one per row, and GiST inserts stay local.
    # Rows keep their ``number``; only their physical order changes.
    # One float key (strip * 400 + RA; RA < 360) sorts several times faster than
    # lexsort on two, and take() copies records ~20x faster than fancy indexing.
    order = np.argsort(np.floor(dec * 60.0) * 400.0 + arrays["ra"])
    return rows.take(order), names, exposure_ids


def _stage_sql(table: sa.Table, names: list[str], kinds: dict[str, str]) -> sql.Composed:
    pg = {"f8": "float8", "i4": "int4", "i2": "int2"}
    cols = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(pg[kinds[c]])) for c in names)
    return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DROP").format(
        sql.Identifier(f"_stage_{table.name}"), cols)


def _insert_sql(table: sa.Table, names: list[str], kinds: dict[str, str]) -> sql.Composed:
    targets: list[sql.Composable] = [sql.Identifier(c) for c in (
        "run_id", "tile_id", "run_type", "run_month")]
    values: list[sql.Composable] = [sql.Placeholder(p) for p in (
        "run", "tile", "run_type", "run_month")]
    for c in names:
        if c == "exposure_idx":
            targets.append(sql.Identifier("exposure_id"))
            values.append(sql.SQL("({}::text[])[{}]").format(
                sql.Placeholder("exposures"), sql.Identifier(c)))
            continue
        targets.append(sql.Identifier(c))
        values.append(sql.SQL("NULLIF({}, 'NaN')").format(sql.Identifier(c))
                      if _null_for_nan(table, kinds, c)
                      else sql.Identifier(c))
    return sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
        sql.Identifier(table.name), sql.SQL(", ").join(targets), sql.SQL(", ").join(values),
        sql.Identifier(f"_stage_{table.name}"))


def write_sources(table: str, run_id: str, tile_id: str, sources: Any, *,
                  catalog: Catalog | None = None, durable: bool = False) -> WriteResult:
    """Replace the rows of one (run, tile) in a source table, atomically.

    Parameters
    ----------
    table
        ``"coadd"`` or ``"diff"`` (or the full names ``coadd_sources``/``diff_sources``).
    run_id
        A registered run (see :func:`lazysky.catalog.register_run`).
    tile_id
        The sky-grid tile.
    sources
        An astropy Table, numpy structured array or mapping of column to 1-d array:
        ``x``, ``y`` (0-based pixels), ``ra``, ``dec`` (deg) required, plus any of
        ``number`` (default 1…n), the flux columns, ``snr``, ``a``, ``b``, ``theta``,
        ``flags`` and, for ``diff``, ``sign`` (required: +1/-1) and ``exposure_id``.
        NaN in an optional float column is stored as NULL; RA is wrapped into [0, 360).
    catalog
        The opened catalog (default: :func:`open_catalog` with the settings in force).
    durable
        Wait until the commit is on disk (``synchronous_commit = on``). The default
        commits asynchronously (atomic all the same; made durable by the next synchronous
        commit, e.g. :func:`~lazysky.catalog.mark_tile_done`): waiting for the disk costs
        a loader more than the COPY itself on a busy machine.

    Returns
    -------
    WriteResult
        Rows deleted and inserted, and the time taken.

    Raises
    ------
    ParameterError
        Unknown or missing columns, non-finite positions, Dec outside [-90, 90], a
        ``number`` that repeats.
    CatalogWriteError
        The database refused the rows (unregistered run, failed constraint); nothing
        was changed.
    """
    if table not in ("coadd", "diff", "coadd_sources", "diff_sources"):
        msg = f"table must be 'coadd' or 'diff', got {table!r}"
        raise ParameterError(msg)
    tbl = SOURCE_TABLES[table]
    validate_run_id(run_id)
    if not isinstance(tile_id, str) or not tile_id:
        msg = f"tile_id must be a non-empty string, got {tile_id!r}"
        raise ParameterError(msg)
    if not isinstance(durable, bool):
        msg = f"durable must be True or False, got {durable!r}"
        raise ParameterError(msg)
    rows, names, exposure_ids = _prepare(tbl, sources)
    kinds = _columns_of(tbl)
    catalog = catalog if catalog is not None else open_catalog()
    t0 = time.perf_counter()
    raw = catalog.engine().raw_connection()
    try:
        conn: psycopg.Connection[Any] = raw.driver_connection  # type: ignore[assignment]
        filled: list[str] = []
        deleted, inserted = _replace(conn, tbl, run_id, tile_id, rows, names, kinds,
                                     exposure_ids, durable=durable, filled=filled)
        if tbl.name == "coadd_sources" and SUMMARIZE_RANGES > 0:
            for part in filled:
                _summarize_ranges(conn, part)
    finally:
        raw.close()
    seconds = time.perf_counter() - t0
    logger.debug("%s %s/%s: -%d +%d rows in %.3f s", tbl.name, run_id, tile_id, deleted,
                 inserted, seconds)
    return WriteResult(tbl.name, run_id, tile_id, deleted, inserted, seconds)


def _check_references_once(cur: psycopg.Cursor[Any], tbl: sa.Table, run_id: str,
                           exposure_ids: list[str]) -> bool:
    """Check the foreign keys once for the whole (run, tile), if this role may.

    Every row of one write shares its run (and a handful of exposures), so instead of
    PostgreSQL's per-row foreign-key triggers (a third of the insert time) the referenced
    rows are checked and locked ``FOR KEY SHARE`` once — exactly what those triggers
    do — and the triggers are skipped for this transaction only
    (``session_replication_role = replica``, which needs a superuser, as the embedded
    server's owner is). Returns False, checking nothing, when the role may not: the
    ordinary triggers then do the work. CHECK constraints apply either way.
    """
    row = cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not row or not row[0]:
        return False
    found = cur.execute("SELECT 1 FROM runs WHERE run_id = %s FOR KEY SHARE",
                        (run_id,)).fetchone()
    if found is None:
        msg = (f"cannot write {tbl.name} rows of run {run_id!r}: the run is not registered; "
               f"register the run first with lazysky.catalog.register_run. Nothing was "
               f"changed.")
        raise CatalogWriteError(msg)
    if exposure_ids:
        rows = cur.execute("SELECT exposure_id FROM exposures WHERE exposure_id = ANY(%s) "
                           "FOR KEY SHARE", (exposure_ids,)).fetchall()
        if missing := sorted(set(exposure_ids) - {r[0] for r in rows}):
            msg = (f"cannot write {tbl.name} rows of run {run_id!r}: exposure(s) {missing} "
                   f"are not registered; register the run (and exposures) first with "
                   f"lazysky.catalog.write_exposures. Nothing was changed.")
            raise CatalogWriteError(msg)
    return True


#: The ledger: forget the (table, run, tile)'s previous write, if any (its rowcount says
#: whether there was one), then record this one. Two statements instead of an upsert,
#: so a writer needs on the ledger the privileges it needs on the source table anyway
#: (SELECT, INSERT, DELETE), not UPDATE.
_FORGET_SQL = ("DELETE FROM source_tiles WHERE run_id = %(run)s AND source_table = %(table)s "
               "AND tile_id = %(tile)s")
_RECORD_SQL = ("INSERT INTO source_tiles (run_id, source_table, tile_id, rows) "
               "VALUES (%(run)s, %(table)s, %(tile)s, %(rows)s)")


def _record_tile(cur: psycopg.Cursor[Any], tbl: sa.Table, params: dict[str, Any],
                 n: int) -> bool:
    """Record the write in ``source_tiles``; return whether it had been written before.

    Called under the (table, run, tile) advisory lock, in the write's transaction: the
    ledger row commits (or vanishes) with the rows. Rows of a (run, tile) exist only if
    its ledger row does (migration 12 filled the ledger from the rows already there), so
    a first write skips the DELETE — which on ``coadd_sources`` would read every heap
    range the BRIN index has not summarised yet.
    """
    args = {**params, "table": tbl.name, "rows": n}
    before = cur.execute(_FORGET_SQL, args).rowcount > 0
    cur.execute(_RECORD_SQL, args)
    return before


#: Full heap ranges, counted back from the partition's end, whose BRIN summaries a write
#: of coadd rows brings up to date after its commit (0: none; see _summarize_ranges).
SUMMARIZE_RANGES = 16
#: Wait at most this long for the lock summarising needs (held by VACUUM); else leave
#: it to a later write.
_SUMMARIZE_LOCK_TIMEOUT = "20ms"
#: Advisory lock (with the partition's name) taken without waiting by the one writer
#: that summarises a partition at a time; the others skip (their ranges are its too).
_SUMMARIZE_LOCK = 0x6272696E  # 'brin'

#: Whether someone holds a lock on the partition that summarising would wait for
#: (share update exclusive or stronger: VACUUM, ANALYZE, DDL); inserts' locks do not count.
_BUSY_SQL = ("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'relation' AND "
             "relation = to_regclass(%s) AND granted AND mode NOT IN "
             "('AccessShareLock', 'RowShareLock', 'RowExclusiveLock'))")
_SUMMARIZE_SQL = """
SELECT coalesce(sum(brin_summarize_range(i.indexrelid::regclass, b.block)), 0)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_am am ON am.oid = ic.relam AND am.amname = 'brin'
CROSS JOIN LATERAL (
    SELECT coalesce((SELECT split_part(o, '=', 2)::int FROM unnest(ic.reloptions) o
                     WHERE o LIKE 'pages_per_range=%%'), 128) AS pages) p
CROSS JOIN LATERAL (
    SELECT pg_relation_size(i.indrelid) / current_setting('block_size')::int / p.pages
           AS full) n
CROSS JOIN LATERAL generate_series(greatest(n.full - %(ranges)s, 0) * p.pages,
                                   (n.full - 1) * p.pages, p.pages) AS b(block)
WHERE i.indrelid = to_regclass(%(partition)s)
"""


def _summarize_ranges(conn: psycopg.Connection[Any], partition: str) -> int:
    """Summarise the newest full heap ranges of ``partition`` in its BRIN index.

    A BRIN index knows nothing of ranges not summarised yet, and a search reads them
    all. PostgreSQL's ``autosummarize`` asks autovacuum to do it, but at bulk-load rates
    its queue (256 requests) overflows ("request for BRIN range summarization … was not
    recorded" for most ranges). So the writer, after its commit, summarises the last
    :data:`SUMMARIZE_RANGES` full ranges (those already summarised cost a look-up); the
    partial last range stays unsummarised, so inserts into it stay cheap. One writer at
    a time summarises a partition (an advisory lock taken without waiting: the others
    skip, since it summarises their ranges too); when another session holds a lock that
    summarising (share update exclusive) would wait for — autovacuum's ANALYZE or VACUUM,
    DDL — the writer skips too, and waits at most ``_SUMMARIZE_LOCK_TIMEOUT`` should one
    come in between; a range skipped is summarised by a
    later write or by VACUUM, as are all when the writer's role does not own the index
    (PostgreSQL lets only the owner summarise). Returns the ranges summarised.
    """
    try:
        with conn.transaction(), conn.cursor() as cur:
            mine = cur.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
                               (_SUMMARIZE_LOCK, partition)).fetchone()
            if not mine or not mine[0]:  # another writer is summarising this partition
                return 0
            busy = cur.execute(_BUSY_SQL, (partition,)).fetchone()
            if busy and busy[0]:  # e.g. autovacuum's ANALYZE: do not queue behind it
                return 0
            cur.execute(f"SET LOCAL lock_timeout = '{_SUMMARIZE_LOCK_TIMEOUT}'")
            got = cur.execute(_SUMMARIZE_SQL, {"partition": partition,
                                               "ranges": SUMMARIZE_RANGES}).fetchone()
    except psycopg.errors.LockNotAvailable:
        logger.debug("BRIN summary of %s left to a later write (lock busy)", partition)
        return 0
    except psycopg.errors.InsufficientPrivilege:  # only the index's owner may summarise
        logger.debug("BRIN summary of %s left to VACUUM: this role does not own it",
                     partition)
        return 0
    except psycopg.Error as exc:  # the rows are committed: an upkeep failure is no write's
        logger.warning("BRIN summary of %s skipped (%s); VACUUM will do it", partition,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return 0
    return int(got[0]) if got else 0


def _copy_binary(cur: psycopg.Cursor[Any], target: str, columns: list[str],
                 payload: memoryview) -> None:
    """COPY binary ``payload`` (rows without header and trailer) into ``target``."""
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        sql.Identifier(target), sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    with cur.copy(copy_sql) as copy:
        copy.write(_COPY_HEADER)
        for start in range(0, len(payload), _CHUNK_BYTES):
            copy.write(payload[start:start + _CHUNK_BYTES])
        copy.write(_COPY_TRAILER)


def _direct_rows(tbl: sa.Table, rows: np.ndarray, names: list[str], kinds: dict[str, str],
                 params: dict[str, Any], exposure_ids: list[str], *,
                 encoding: str = "utf-8") -> tuple[np.ndarray, list[str]]:
    """The binary COPY rows for the source table itself (bytes), and their columns.

    The staged rows (``rows``, as :func:`_prepare` made them) plus what
    :func:`_insert_sql` adds on the way across: the run and tile and the partition keys
    (constant fields in front), ``exposure_id`` as text (from ``exposure_idx``, which
    :func:`_prepare` puts last) and NULL for NaN in a nullable float column. The staged
    fields are copied across as one block of bytes per row. A NULL field, or an exposure
    id shorter than the longest, is shorter than its slot in the fixed-size record, so
    such rows are cut to length with one boolean mask over the records' bytes. Texts
    are sent in ``encoding``, the connection's.
    """
    n = len(rows)
    consts = [(c, str(params[k]).encode(encoding)) for c, k in (
        ("run_id", "run"), ("tile_id", "tile"), ("run_type", "run_type"))]
    texts = [e.encode(encoding) for e in exposure_ids]
    width = max(map(len, texts), default=1)
    spec: list[tuple[str, str]] = [("_n", ">i2")]
    for c, value in consts:
        spec += [(f"_l_{c}", ">i4"), (c, f"S{len(value)}")]
    spec += [("_l_run_month", ">i4"), ("run_month", ">i4")]
    front, staged = np.dtype(spec), rows.dtype.fields
    assert front.fields is not None  # structured dtypes
    assert staged is not None
    head = front.itemsize
    body = [c for c in names if c != "exposure_idx"]  # rows' fields after "_n", in order
    start = staged["_n"][1] + 2
    end = staged["_l_exposure_idx"][1] if "exposure_idx" in names else rows.dtype.itemsize
    fields = {f: front.fields[f][:2] for f in front.names or ()}
    for c in body:
        for f in (f"_l_{c}", c):
            fmt, off = staged[f][:2]
            fields[f] = (fmt, head + off - start)
    size = head + end - start
    if "exposure_idx" in names:
        fields["_l_exposure_id"] = (np.dtype(">i4"), size)
        fields["exposure_id"] = (np.dtype(f"S{width}"), size + 4)
        size += 4 + width
    out = np.empty(n, dtype=np.dtype({"names": list(fields),
                                      "formats": [t for t, _ in fields.values()],
                                      "offsets": [int(o) for _, o in fields.values()],
                                      "itemsize": size}))
    record = out.view(np.uint8).reshape(n, size)
    staged_bytes = rows.view(np.uint8).reshape(n, rows.dtype.itemsize)
    record[:, head:head + end - start] = staged_bytes[:, start:end]
    columns = [*(c for c, _ in consts), "run_month", *body,
               *(["exposure_id"] if "exposure_idx" in names else [])]
    out["_n"] = len(columns)
    for c, value in consts:
        out[f"_l_{c}"] = len(value)
        out[c] = value
    out["_l_run_month"] = 4
    out["run_month"] = (params["run_month"] - _PG_EPOCH).days
    keep: np.ndarray | None = None  # per row, the record's bytes to send

    def cut_bytes(column: str, span: int, sent: np.ndarray) -> None:
        nonlocal keep
        if keep is None:
            keep = np.ones((n, size), dtype=bool)
        at = fields[column][1]
        keep[:, at:at + span] &= np.arange(span)[None, :] < sent[:, None]

    for c in body:
        if _null_for_nan(tbl, kinds, c) and np.any(nan := np.isnan(rows[c])):
            out[f"_l_{c}"][nan] = -1  # NULL: length -1, no bytes
            cut_bytes(c, 8, np.where(nan, 0, 8))
    if "exposure_idx" in names:
        index = rows["exposure_idx"].astype(np.intp) - 1
        out["exposure_id"] = np.array(texts, dtype=f"S{width}")[index]
        lengths = np.array([len(t) for t in texts], dtype=np.int32)[index]
        out["_l_exposure_id"] = lengths
        if np.any(lengths < width):
            cut_bytes("exposure_id", width, lengths)
    return (record.reshape(-1) if keep is None else record[keep]), columns


def _replace(conn: psycopg.Connection[Any], tbl: sa.Table, run_id: str, tile_id: str,
             rows: np.ndarray, names: list[str], kinds: dict[str, str],
             exposure_ids: list[str], *, durable: bool = True,
             filled: list[str] | None = None) -> tuple[int, int]:
    """Replace the (run, tile)'s rows by ``rows`` in one transaction; (deleted, inserted).

    Before it, in a transaction of its own, the sky cells the rows go to are made if
    missing (schema v14, coadd_sources). ``filled`` gets the leaf partitions written to.
    """
    rid = parse_run_id(run_id)  # the partition keys: the run's type and month
    run_month = rid.date.replace(day=1)
    params = {"run": run_id, "tile": tile_id, "exposures": exposure_ids,
              "run_type": rid.type, "run_month": run_month}
    month = partition_name(tbl.name, rid.type, run_month)
    if tbl.name == "coadd_sources":
        leaves = ensure_cells(conn, month, cells_of(rows["ra"], rows["dec"]))
        if filled is not None:
            filled += [month] if leaves is None else leaves
    try:
        with conn.transaction(), conn.cursor() as cur:
            if not durable:
                cur.execute("SET LOCAL synchronous_commit = off")
            found = cur.execute(HAS_RECEIVE_SQL).fetchone() if DIRECT_COPY else None
            direct = bool(found and found[0])
            if not direct:  # spoint has no binary input: COPY into a staging table
                cur.execute(_stage_sql(tbl, names, kinds))
                _copy_binary(cur, f"_stage_{tbl.name}", names,
                             rows.view(np.uint8).reshape(-1).data)
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))",
                        (tbl.name, f"{run_id}/{tile_id}"))
            if _check_references_once(cur, tbl, run_id, exposure_ids):
                cur.execute("SET LOCAL session_replication_role = replica")
            deleted = 0
            if _record_tile(cur, tbl, params, len(rows)):
                cur.execute(sql.SQL("DELETE FROM {} WHERE run_type = %(run_type)s AND "
                                    "run_month = %(run_month)s AND run_id = %(run)s AND "
                                    "tile_id = %(tile)s")
                            .format(sql.Identifier(tbl.name)), params)
                deleted = cur.rowcount
            if direct:
                payload, columns = _direct_rows(tbl, rows, names, kinds, params, exposure_ids,
                                                encoding=conn.info.encoding)
                _copy_binary(cur, tbl.name, columns, payload.data)  # uint8: sliced by byte
            else:
                cur.execute(_insert_sql(tbl, names, kinds), params)
            inserted = cur.rowcount
    except psycopg.errors.ForeignKeyViolation as exc:
        msg = (
            f"cannot write {tbl.name} rows of run {run_id!r}, tile {tile_id!r}: "
            f"{exc.diag.message_detail or exc}; register the run (and exposures) first "
            f"with lazysky.catalog.register_run / write_exposures. Nothing was changed."
        )
        raise CatalogWriteError(msg) from None
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        msg = (f"the catalog refused the {tbl.name} rows of run {run_id!r}, tile "
               f"{tile_id!r}: {exc}. Nothing was changed.")
        raise CatalogWriteError(msg) from None
    return deleted, inserted

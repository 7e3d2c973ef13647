"""The catalog side of lazysky gc: which tables a run owns, what protects a run, the plan,
and the one transaction that marks a run expiring and deletes its rows (see lazysky.gc)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from lazysky.config import Settings
    from lazysky.zarr_store._layout import StoreRoot

__all__ = ["KeptRun", "drop_expired_month", "drop_expired_partitions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptRun:
    """A run past its retention that is kept, and why (production, promoted, in use …)."""

    run_id: str
    why: str


# -- which tables a run owns, and which hold it ----------------------------------------


def _run_tables() -> tuple[list[sa.Table], list[tuple[sa.Table, sa.Column[Any]]]]:
    """(tables whose rows belong to a run, in deletion order; (table, column) pairs whose
    rows refer to a run without belonging to it — they keep the run)."""
    from lazysky.catalog import schema

    keep = {schema.runs.name, schema.production_tiles.name, schema.promotions.name,
            schema.run_expiry.name}
    sources = {schema.coadd_sources.name, schema.diff_sources.name}
    owned: list[sa.Table] = []
    holds: list[tuple[sa.Table, sa.Column[Any]]] = []
    for table in reversed(schema.metadata.sorted_tables):  # dependents first
        if table.name in keep:
            continue
        for fk in table.foreign_keys:
            if fk.column.table is not schema.runs:
                continue
            if table.name in sources or (fk.ondelete or "").upper() == "CASCADE":
                if table not in owned:
                    owned.append(table)
            else:
                holds.append((table, fk.parent))
    return owned, holds


def drop_expired_partitions(conn: sa.Connection, table: sa.Table,
                            run_ids: Sequence[str]) -> list[str]:
    """Empty, whole, every partition of ``table`` that holds only rows of ``run_ids``.

    The hook for a catalog whose source tables are partitioned (by processing type and
    month): a partition all of whose rows belong to runs being collected is truncated —
    instantly, and its space is returned — instead of deleting its rows one by one; its
    bounds stay, so later rows still have a home. A partition that cannot be truncated
    (another table's foreign key points into it) is left to the row-wise ``DELETE`` that
    follows. On an unpartitioned table this does nothing. Runs inside the caller's
    transaction. Returns the partitions emptied.
    """
    if not run_ids:
        return []
    parts = conn.execute(sa.text(
        "SELECT relid::regclass::text FROM pg_partition_tree(CAST(:t AS regclass)) "
        "WHERE isleaf AND relid <> CAST(:t AS regclass)"), {"t": table.name}).scalars().all()
    emptied: list[str] = []
    ids = list(run_ids)
    for part in parts:
        q = sa.text(f"SELECT EXISTS (SELECT 1 FROM {part} WHERE run_id = ANY(:ids)), "
                    f"EXISTS (SELECT 1 FROM {part} WHERE run_id <> ALL(:ids))")
        mine, others = conn.execute(q, {"ids": ids}).one()
        if not mine or others:
            continue
        try:
            with conn.begin_nested():
                conn.execute(sa.text(f"TRUNCATE {part}"))
        except sa.exc.DBAPIError as exc:
            logger.info("gc: partition %s not truncated (%s); deleting its rows instead",
                        part, str(exc.orig).splitlines()[0])
            continue
        logger.info("gc: emptied partition %s (only expired runs' rows)", part)
        emptied.append(part)
    return emptied


# -- planning -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    run_id: str
    run_type: str
    status: str
    field: str | None
    parent: str | None
    when: dt.datetime
    inputs: Mapping[str, str]
    store: str | None


@dataclass
class _Plan:
    runs: dict[str, _Run]
    expired: set[str]  # state expired already
    resume: list[str]  # state expiring: finish them
    go: list[tuple[str, str]]  # (run id, reason), children before parents
    kept: list[KeptRun]
    protected: dict[str, str]  # run id -> why it can never go now (whatever its age)


def _protections(conn: sa.Connection, run_ids: Iterable[str] | None = None) -> dict[str, str]:
    """Why runs are protected from collection now (run id → reason)."""
    from lazysky.catalog.schema import (
        batch_executions,
        batch_submissions,
        production_tiles,
        promotions,
        runs,
    )

    def where(col: sa.Column[Any]) -> Any:
        return col.in_(list(run_ids)) if run_ids is not None else sa.true()

    why: dict[str, str] = {}

    def add(query: Any, reason: str) -> None:
        for (rid,) in conn.execute(query):
            if rid is not None:
                why.setdefault(str(rid), reason)

    add(sa.select(production_tiles.c.run_id).where(where(production_tiles.c.run_id))
        .distinct(), "production (production_tiles)")
    add(sa.select(promotions.c.run_id).where(where(promotions.c.run_id)).distinct(),
        "promoted or published (promotions)")
    add(sa.select(runs.c.run_id).where(runs.c.status == "running", where(runs.c.run_id)),
        "in use: running")
    add(sa.select(batch_executions.c.run_id).where(batch_executions.c.state == "running",
                                                  where(batch_executions.c.run_id)),
        "in use: a batch execution is running it")
    add(sa.select(batch_submissions.c.run_id).where(
        batch_submissions.c.state.in_(["queued", "running"]),
        batch_submissions.c.run_id.is_not(None), where(batch_submissions.c.run_id)),
        "in use: a batch submission will run or resume it")
    _, holds = _run_tables()
    for table, col in holds:
        add(sa.select(col).where(where(col)).distinct(), f"referenced by {table.name}")
    return why


def _load_runs(conn: sa.Connection) -> dict[str, _Run]:
    from lazysky.catalog.schema import runs

    out = {}
    for r in conn.execute(sa.select(
            runs.c.run_id, runs.c.run_type, runs.c.status, runs.c.field,
            runs.c.parent_run_id, runs.c.started_at, runs.c.finished_at, runs.c.inputs,
            runs.c.config["store"].astext)):
        out[r[0]] = _Run(run_id=r[0], run_type=r[1], status=r[2], field=r[3], parent=r[4],
                         when=r[6] or r[5], inputs=dict(r[7] or {}), store=r[8])
    return out


def _plan(conn: sa.Connection, settings: Settings, now: dt.datetime) -> _Plan:
    from lazysky.catalog.schema import run_expiry

    runs = _load_runs(conn)
    states = dict(conn.execute(sa.select(run_expiry.c.run_id, run_expiry.c.state)).all())
    protected = _protections(conn)
    expired = {r for r, s in states.items() if s == "expired"}
    resume = sorted(r for r, s in states.items() if s == "expiring")
    due: dict[str, str] = {}
    kept: dict[str, str] = {}
    for run in runs.values():
        if run.run_id in states:
            continue
        keep = settings.retention.keep_for("products", run.run_type)
        if keep is None or run.when + keep > now:
            continue
        reason = (f"{run.run_type} older than {settings.retention.products[run.run_type]} "
                  f"({'finished' if run.status != 'running' else 'started'} "
                  f"{run.when:%Y-%m-%d})")
        if run.run_id in protected:
            kept[run.run_id] = protected[run.run_id]
        else:
            due[run.run_id] = reason
    children: dict[str, list[str]] = {}
    for run in runs.values():
        if run.parent is not None:
            children.setdefault(run.parent, []).append(run.run_id)
    changed = True
    while changed:  # a parent goes only with all its children
        changed = False
        for rid in list(due):
            alive = [c for c in children.get(rid, ())
                     if c not in expired and c not in due and c not in resume]
            if alive:
                kept[rid] = f"in use: parent of {alive[0]}, which is kept"
                del due[rid]
                changed = True
    order = sorted(due, key=lambda r: (runs[r].when, r), reverse=True)  # children first
    return _Plan(runs=runs, expired=expired, resume=resume,
                 go=[(r, due[r]) for r in order],
                 kept=[KeptRun(r, w) for r, w in sorted(kept.items())], protected=protected)


def _count_rows(conn: sa.Connection, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    owned, _ = _run_tables()
    counts: dict[str, dict[str, int]] = {r: {} for r in run_ids}
    if not run_ids:
        return counts
    for table in owned:
        for rid, n in conn.execute(sa.select(table.c.run_id, sa.func.count())
                                   .where(table.c.run_id.in_(list(run_ids)))
                                   .group_by(table.c.run_id)):
            counts[rid][table.name] = int(n)
    return counts


def drop_expired_month(conn: sa.Connection, run_id: str, *,
                       today: dt.date | None = None) -> list[str]:
    """Drop the month partitions of ``run_id``'s type and month when it is the last run
    there not yet collected, and the month is over; returns the partitions dropped.

    Every row of such a partition belongs to this run or to runs already collected, so
    dropping it (:func:`lazysky.catalog.schema.drop_month_partitions`) removes exactly
    this run's rows, at once and without a DELETE's bloat. Months not over yet keep
    their partitions (runs registered today write there); a run registered later for an
    old month gets its partition back (``register_run``). A partition another table's
    foreign key points into is kept (the caller's ``DELETE`` does the work). Runs inside
    the caller's transaction.
    """
    from lazysky.catalog.schema import drop_month_partitions, run_expiry, runs
    from lazysky.runs import parse_run_id

    rid = parse_run_id(run_id)
    month = rid.date.replace(day=1)
    if month >= (today or dt.datetime.now(dt.UTC).date()).replace(day=1):
        return []
    other = conn.execute(sa.select(runs.c.run_id).where(
        runs.c.run_id.like(f"{rid.type}-{rid.date:%Y%m}%"), runs.c.run_id != run_id,
        runs.c.run_id.not_in(sa.select(run_expiry.c.run_id))).limit(1)).scalar()
    if other is not None:
        return []
    try:
        with conn.begin_nested():
            return drop_month_partitions(conn, rid.type, month)
    except sa.exc.DBAPIError as exc:
        logger.info("gc: month partitions of %s kept (%s); deleting its rows instead",
                    run_id, str(exc.orig).splitlines()[0])
        return []


def _delete_catalog_rows(conn: sa.Connection, run_id: str) -> None:
    owned, _ = _run_tables()
    dropped = drop_expired_month(conn, run_id)
    if dropped:
        logger.info("gc: %s was the last run of its month: dropped %s", run_id,
                    ", ".join(dropped))
    for table in owned:
        drop_expired_partitions(conn, table, [run_id])
        conn.execute(table.delete().where(table.c.run_id == run_id))


def _expire_catalog(engine: sa.Engine, run: _Run, reason: str, nbytes: int,
                    by: str) -> dict[str, int] | str:
    """Step 1: mark the run expiring and delete its catalog rows, in one transaction.

    Returns the rows deleted, or why the run is kept after all (re-checked under the
    production lock of its field, so a promotion racing the gc either wins or is refused).
    """
    from sqlalchemy.dialects.postgresql import insert

    from lazysky.catalog.production import _LOCK_NAMESPACE
    from lazysky.catalog.schema import run_expiry, runs

    with engine.begin() as conn:
        if run.field:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
                _LOCK_NAMESPACE, sa.func.hashtext(run.field))))
        conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run.run_id)
                     .with_for_update())
        why = _protections(conn, [run.run_id]).get(run.run_id)
        if why is not None:
            return why
        child = conn.execute(sa.select(runs.c.run_id).where(  # a child made since the plan
            runs.c.parent_run_id == run.run_id,
            runs.c.run_id.not_in(sa.select(run_expiry.c.run_id))).limit(1)).scalar()
        if child is not None:
            return f"in use: parent of {child}, which is kept"
        rows = _count_rows(conn, [run.run_id])[run.run_id]
        conn.execute(insert(run_expiry).values(
            run_id=run.run_id, state="expiring", reason=reason, bytes=nbytes, rows=rows,
            by=by).on_conflict_do_nothing())
        _delete_catalog_rows(conn, run.run_id)
    return rows


def _remove_exposure(engine: sa.Engine, root: StoreRoot, eid: str) -> str | None:
    """The catalog's exposure row first, then the Zarr group; a reason if kept."""
    from lazysky.catalog.schema import exposures, run_expiry, runs

    expired = sa.select(run_expiry.c.run_id).where(run_expiry.c.state == "expired")
    try:
        with engine.begin() as conn:
            user = conn.execute(sa.select(runs.c.run_id).where(  # a run made since the plan
                runs.c.inputs.has_key(eid), runs.c.run_id.not_in(expired)).limit(1)).scalar()
            if user is not None:
                return f"used by {user}, which is kept"
            conn.execute(exposures.delete().where(exposures.c.exposure_id == eid))
    except sa.exc.IntegrityError as exc:
        return f"still referenced in the catalog ({str(exc.orig).splitlines()[0]})"
    root.remove_group(eid)
    return None

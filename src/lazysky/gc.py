"""Retention: collect expired runs whole, then the calibrations and raw data they alone used.

``lazysky gc`` (and the ``lazysky-gc`` CronJob) applies the retention settings
(:class:`lazysky.retention.RetentionSettings`, docs/lifecycle.md) to the three layers of
the store:

* **products** (gold) — a run whose type's retention has passed since it finished (or
  started, if it never did) goes whole: its catalog rows, then its Zarr products
  ``products/<run_id>/``. Never a production run (``production_tiles``), never a run
  ever promoted or published (``promotions``), never a run in use: ``running``, claimed
  or queued to resume by a batch submission, the parent of a run that is kept, or named
  by another table's foreign key that is not the run's own rows;
* **calibrated** (silver) — a master under ``calib/<kind>/<detector>`` goes once every
  run that used it (its recorded inputs are among the run's inputs) is expired or past
  the calibrated retention of its type, and none of them is protected as above;
* **raw** (bronze) — with ``raw: until-unused``, an exposure goes once every run that
  used it (``runs.inputs``) has expired; one no run used is never touched.

Order, per run, so that no catalog row ever points at deleted products and a killed gc
is finished by the next one: (1) one transaction marks the run ``expiring`` in
``run_expiry`` and deletes its catalog rows (sources, run tiles, QA, objects …; whole
partitions where the catalog is partitioned, :func:`drop_expired_partitions`); (2) its
products are deleted, group metadata first; (3) it is marked ``expired``. The ``runs``
row stays as a tombstone (lineage: promotions and child runs point at it; the raw layer
needs its inputs). A rerun resumes every run left ``expiring``.

Examples
--------
>>> from lazysky.gc import collect
>>> report = collect(dry_run=True)  # doctest: +SKIP
>>> print(report)  # doctest: +SKIP
lazysky gc at 2026-11-24T06:00:00+00:00 — dry run, nothing changed
would expire 2 run(s): 1.2 GB of products, 48 210 catalog row(s)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import getpass
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from lazysky.errors import LazySkyError, ParameterError, StoreError

if TYPE_CHECKING:
    from lazysky.catalog.database import Catalog
    from lazysky.config import Settings
    from lazysky.zarr_store._layout import StoreLike, StoreRoot

__all__ = [
    "GcReport",
    "KeptRun",
    "RemovedGroup",
    "RunExpiry",
    "collect",
    "drop_expired_partitions",
    "parse_now",
]

logger = logging.getLogger(__name__)

_GC_LOCK = 0x6C7A6763  # 'lzgc': one gc at a time per catalog (a session advisory lock)
Step = Callable[[str, str], None]


@dataclass(frozen=True)
class RunExpiry:
    """A run that expires (or would, in a dry run): why, and what it frees."""

    run_id: str
    run_type: str
    status: str
    reason: str
    bytes: int
    rows: Mapping[str, int]
    state: str  # "expired", "expiring" (left for the next gc), "would expire"

    @property
    def n_rows(self) -> int:
        return int(sum(self.rows.values()))


@dataclass(frozen=True)
class KeptRun:
    """A run past its retention that is kept, and why (production, promoted, in use …)."""

    run_id: str
    why: str


@dataclass(frozen=True)
class RemovedGroup:
    """A raw exposure (``raw/<id>``) or a master (``calib/<kind>/<detector>``) removed."""

    layer: str  # "raw" or "calibrated"
    path: str
    bytes: int


@dataclass(frozen=True)
class GcReport:
    """What a gc removed (or, with ``dry_run``, would remove), and what it kept."""

    now: dt.datetime
    dry_run: bool
    runs: tuple[RunExpiry, ...] = ()
    kept: tuple[KeptRun, ...] = ()
    groups: tuple[RemovedGroup, ...] = ()
    errors: Mapping[str, str] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """Bytes freed in the store (products, masters and raw exposures)."""
        return sum(r.bytes for r in self.runs) + sum(g.bytes for g in self.groups)

    @property
    def rows(self) -> int:
        """Catalog rows deleted."""
        return sum(r.n_rows for r in self.runs)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON types (``lazysky gc --format json``)."""
        return {"now": self.now.isoformat(), "dry_run": self.dry_run, "bytes": self.bytes,
                "rows": self.rows,
                "runs": [{"run_id": r.run_id, "type": r.run_type, "status": r.status,
                          "reason": r.reason, "bytes": r.bytes, "rows": dict(r.rows),
                          "state": r.state} for r in self.runs],
                "kept": [{"run_id": k.run_id, "why": k.why} for k in self.kept],
                "groups": [{"layer": g.layer, "path": g.path, "bytes": g.bytes}
                           for g in self.groups],
                "errors": dict(self.errors)}

    def __str__(self) -> str:
        verb = "would " if self.dry_run else ""
        head = f"lazysky gc at {self.now.isoformat(timespec='seconds')}"
        lines = [head + (" — dry run, nothing changed" if self.dry_run else "")]
        lines.append(f"{verb}expire {len(self.runs)} run(s): "
                     f"{_size(sum(r.bytes for r in self.runs))} of products, "
                     f"{self.rows} catalog row(s)")
        for r in self.runs:
            rows = ", ".join(f"{t} {n}" for t, n in r.rows.items() if n) or "no rows"
            state = "" if r.state in ("expired", "would expire") else f" [{r.state}]"
            lines.append(f"  {r.run_id}  {r.status}  {r.reason}  {_size(r.bytes)}  "
                         f"{rows}{state}")
        for layer, what in (("calibrated", "master calibration(s)"),
                            ("raw", "raw exposure(s)")):
            mine = [g for g in self.groups if g.layer == layer]
            lines.append(f"{verb}remove {len(mine)} {what}: "
                         f"{_size(sum(g.bytes for g in mine))}")
            lines.extend(f"  {g.path}  {_size(g.bytes)}" for g in mine)
        if self.kept:
            lines.append(f"kept {len(self.kept)} run(s) past their retention:")
            lines.extend(f"  {k.run_id}  {k.why}" for k in self.kept)
        for what, text in self.errors.items():
            lines.append(f"error  {what}: {text}")
        lines.append(f"total: {_size(self.bytes)} freed, {self.rows} catalog row(s)"
                     + (" (would be)" if self.dry_run else ""))
        return "\n".join(lines)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


def parse_now(value: str | dt.datetime | None, *, what: str = "now") -> dt.datetime:
    """The gc's "now": an ISO 8601 time (UTC if it names no zone), or the clock.

    Raises
    ------
    ParameterError
        Not an ISO 8601 date or time.

    Examples
    --------
    >>> parse_now("2027-01-01").isoformat()
    '2027-01-01T00:00:00+00:00'
    """
    if value is None:
        return dt.datetime.now(dt.UTC)
    if isinstance(value, dt.datetime):
        when = value
    else:
        try:
            when = dt.datetime.fromisoformat(str(value).strip())
        except ValueError:
            msg = (f"{what} must be an ISO 8601 date or time such as 2027-01-01 or "
                   f"2027-01-01T03:00:00+00:00, got {value!r}")
            raise ParameterError(msg) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


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


# -- the store ------------------------------------------------------------------------


def _du(root: StoreRoot, *parts: str) -> int:
    fs = root.fs()
    path = root.path(*parts)
    fs.invalidate_cache(path)
    try:
        return int(fs.du(path, total=True, withdirs=False))
    except FileNotFoundError:
        return 0


def _exists(root: StoreRoot, *parts: str) -> bool:
    fs = root.fs()
    path = root.path(*parts)
    fs.invalidate_cache(path)
    return bool(fs.exists(path))


def _remove_products(root: StoreRoot, run_id: str) -> None:
    """Delete ``products/<run_id>``: every product's group metadata first (a reader then
    finds it absent, never half there), then everything else."""
    from lazysky.zarr_store._layout import GROUP_META
    from lazysky.zarr_store.products import PRODUCTS, list_products

    fs = root.fs()
    for kind, name in list_products(root, run_id):
        meta = root.path(PRODUCTS, run_id, kind, name, GROUP_META)
        fs.invalidate_cache(meta.rsplit("/", 1)[0])
        if fs.exists(meta):
            fs.rm_file(meta)
    top = root.path(PRODUCTS, run_id)
    fs.invalidate_cache(top)
    if fs.exists(top):
        fs.rm(top, recursive=True)
    fs.invalidate_cache(top)


def _rmdir_if_empty(root: StoreRoot, *parts: str) -> None:
    """Drop a directory left empty (a local store's ``calib/<kind>``; S3 has none)."""
    fs = root.fs()
    path = root.path(*parts)
    fs.invalidate_cache(path)
    with contextlib.suppress(OSError):
        if root.is_local and not fs.ls(path):
            fs.rmdir(path)


def _run_root(run: _Run, default: StoreRoot, settings: Settings) -> StoreRoot:
    """Where a run's products are: its recorded store when absolute, else the default."""
    from lazysky.zarr_store._layout import parse_store

    where = run.store
    if isinstance(where, str) and where.strip() and ("://" in where or os.path.isabs(where)):
        return parse_store(where, settings=settings)
    return default


# -- collecting -----------------------------------------------------------------------


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"lazysky gc {user}@{socket.gethostname()}"


def _delete_catalog_rows(conn: sa.Connection, run_id: str) -> None:
    owned, _ = _run_tables()
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


def _finish(engine: sa.Engine, root: StoreRoot, run_id: str, on_step: Step | None) -> None:
    """Steps 2 and 3: delete the products, then mark the run expired (both idempotent)."""
    from lazysky.catalog.schema import run_expiry

    _remove_products(root, run_id)
    if on_step is not None:
        on_step("products", run_id)
    with engine.begin() as conn:
        conn.execute(run_expiry.update().where(
            run_expiry.c.run_id == run_id, run_expiry.c.state == "expiring").values(
            state="expired", expired_at=sa.func.now()))
    if on_step is not None:
        on_step("expired", run_id)


def _masters(root: StoreRoot) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(kind, detector, [(exposure id, sha256)]) of every complete master in the store."""
    from lazysky.zarr_store._layout import GROUP_META
    from lazysky.zarr_store.products import CALIB, _list_dirs, _read_json

    out = []
    for kind in _list_dirs(root, CALIB):
        for det in _list_dirs(root, CALIB, kind):
            meta = _read_json(root, root.path(CALIB, kind, det, GROUP_META)) or {}
            attrs = meta.get("attributes", {}).get("lazysky", {})
            inputs = attrs.get("inputs") if isinstance(attrs, dict) else None
            if not isinstance(inputs, list) or not inputs:
                continue  # incomplete or not lazysky's: never touched
            pairs = [(str(i.get("exposure_id")), str(i.get("sha256"))) for i in inputs
                     if isinstance(i, dict)]
            out.append((kind, det, pairs))
    return out


def _calibrated(plan: _Plan, gone: set[str], root: StoreRoot, settings: Settings,
                now: dt.datetime) -> list[tuple[str, str]]:
    """Masters whose every user run is gone or past its calibrated retention."""
    from lazysky.zarr_store.products import CALIB

    out = []
    for kind, det, pairs in _masters(root):
        users = [r for r in plan.runs.values()
                 if all(r.inputs.get(e) == s for e, s in pairs)]
        if not users:
            continue  # made by no run the catalog knows: keep

        def done(r: _Run) -> bool:
            if r.run_id in gone:
                return True
            if r.run_id in plan.protected:
                return False
            keep = settings.retention.keep_for("calibrated", r.run_type)
            return keep is not None and r.when + keep <= now

        if all(done(r) for r in users):
            out.append((CALIB, f"{kind}/{det}"))
    return out


def _raw(plan: _Plan, gone: set[str]) -> list[str]:
    """Exposures every run that used them has left (``raw: until-unused``)."""
    users: dict[str, list[str]] = {}
    for r in plan.runs.values():
        for eid in r.inputs:
            users.setdefault(eid, []).append(r.run_id)
    return sorted(e for e, rs in users.items() if all(r in gone for r in rs))


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


def collect(
    *,
    now: str | dt.datetime | None = None,
    dry_run: bool = False,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
    store: StoreLike | None = None,
    storage_options: dict[str, Any] | None = None,
    on_step: Step | None = None,
) -> GcReport:
    """Remove every expired run whole, then the masters and raw exposures only they used.

    Parameters
    ----------
    now
        The time retention is measured against (ISO 8601 or a datetime; default the
        clock). A time in the future shows what will expire by then.
    dry_run
        Only report what would go and how much it frees; change nothing.
    settings
        lazysky settings: the retention, the store, the catalog (default: those in force).
    catalog
        An opened catalog (default: :func:`lazysky.catalog.open_catalog`).
    store
        The store of the products, masters and raw exposures (default
        ``settings.store_url``; a run whose configuration names an absolute store or a
        URL is looked for there).
    on_step
        Called with ``(step, run_id)`` after each step of a run (``catalog``,
        ``products``, ``expired``): progress, or a stop point in tests.

    Returns
    -------
    GcReport

    Raises
    ------
    ParameterError
        A bad ``now``.
    CatalogError
        Another gc holds the catalog's gc lock.

    Examples
    --------
    >>> print(collect(dry_run=True, now="2027-06-01"))  # doctest: +SKIP
    """
    from lazysky.catalog import CatalogError, open_catalog
    from lazysky.config import load_settings
    from lazysky.zarr_store._layout import RAW, parse_store

    when = parse_now(now)
    settings = settings if settings is not None else load_settings()
    root = parse_store(store if store is not None else settings.store_url,
                       storage_options=storage_options, settings=settings)
    catalog = catalog if catalog is not None else open_catalog(settings)
    engine = catalog.engine()
    errors: dict[str, str] = {}
    with engine.connect() as lock_conn:
        got = lock_conn.execute(sa.select(sa.func.pg_try_advisory_lock(_GC_LOCK))).scalar()
        lock_conn.commit()
        if not got:
            msg = "another lazysky gc is running on this catalog; try again when it ends"
            raise CatalogError(msg)
        try:
            with engine.connect() as conn:
                plan = _plan(conn, settings, when)
                counts = _count_rows(conn, [r for r, _ in plan.go])
            done: list[RunExpiry] = []
            kept = list(plan.kept)
            by = _who()
            for rid in plan.resume:  # a gc killed half-way: finish its runs first
                run = plan.runs[rid]
                where = _run_root(run, root, settings)
                item = RunExpiry(rid, run.run_type, run.status, "resumed: an earlier gc "
                                 "was interrupted", _du(where, "products", rid), {},
                                 "would expire" if dry_run else "expired")
                if not dry_run:
                    try:
                        _finish(engine, where, rid, on_step)
                        plan.expired.add(rid)
                        logger.info("gc: %s expired (resumed)", rid)
                    except (LazySkyError, OSError, sa.exc.SQLAlchemyError) as exc:
                        errors[rid] = f"{type(exc).__name__}: {exc}"
                        logger.error("gc: %s not finished: %s", rid, exc)
                        item = dataclasses.replace(item, state="expiring")
                done.append(item)
            for rid, reason in plan.go:
                run = plan.runs[rid]
                where = _run_root(run, root, settings)
                nbytes = _du(where, "products", rid)
                if dry_run:
                    done.append(RunExpiry(rid, run.run_type, run.status, reason, nbytes,
                                          counts[rid], "would expire"))
                    continue
                try:
                    result = _expire_catalog(engine, run, reason, nbytes, by)
                    if isinstance(result, str):
                        kept.append(KeptRun(rid, result))
                        logger.info("gc: %s kept after all: %s", rid, result)
                        continue
                    logger.info("gc: %s expiring: %s; %d catalog row(s) deleted", rid,
                                reason, sum(result.values()))
                    if on_step is not None:
                        on_step("catalog", rid)
                    _finish(engine, where, rid, on_step)
                    plan.expired.add(rid)
                    done.append(RunExpiry(rid, run.run_type, run.status, reason, nbytes,
                                          result, "expired"))
                    logger.info("gc: %s expired; %d bytes of products freed", rid, nbytes)
                except (LazySkyError, OSError, sa.exc.SQLAlchemyError) as exc:
                    errors[rid] = f"{type(exc).__name__}: {exc}"
                    logger.error("gc: %s not finished (the next gc resumes it): %s", rid,
                                 exc)
                    done.append(RunExpiry(rid, run.run_type, run.status, reason, nbytes,
                                          counts[rid], "expiring"))
            if not dry_run:  # what the silver and bronze layers see: the catalog now
                with engine.connect() as conn:
                    plan = _plan(conn, settings, when)
            gone = set(plan.expired) | ({r for r, _ in plan.go} | set(plan.resume)
                                        if dry_run else set())
            groups = _collect_groups(engine, plan, gone, root, settings, when,
                                     dry_run=dry_run, errors=errors, raw=RAW)
        finally:
            lock_conn.execute(sa.select(sa.func.pg_advisory_unlock(_GC_LOCK)))
            lock_conn.commit()
    report = GcReport(now=when, dry_run=dry_run, runs=tuple(done), kept=tuple(kept),
                      groups=tuple(groups), errors=errors)
    logger.info("gc: %s%d run(s), %d group(s), %d bytes, %d rows",
                "dry run: " if dry_run else "", len(done), len(groups), report.bytes,
                report.rows)
    return report


def _collect_groups(engine: sa.Engine, plan: _Plan, gone: set[str], root: StoreRoot,
                    settings: Settings, now: dt.datetime, *, dry_run: bool,
                    errors: dict[str, str], raw: str) -> list[RemovedGroup]:
    """The silver then the bronze layer: masters, then raw exposures."""
    from lazysky.zarr_store._layout import _ID_RE
    from lazysky.zarr_store.products import _remove

    groups: list[RemovedGroup] = []
    for top, rest in _calibrated(plan, gone, root, settings, now):
        parts = (top, *rest.split("/"))
        nbytes = _du(root, *parts)
        if not dry_run:
            try:
                _remove(root, *parts)
                _rmdir_if_empty(root, *parts[:-1])
            except (OSError, StoreError) as exc:
                errors["/".join(parts)] = f"{type(exc).__name__}: {exc}"
                continue
            logger.info("gc: removed master %s (%d bytes)", "/".join(parts), nbytes)
        groups.append(RemovedGroup("calibrated", "/".join(parts), nbytes))
    if settings.retention.raw != "until-unused":
        return groups
    for eid in _raw(plan, gone):
        if not _ID_RE.match(eid) or not _exists(root, raw, eid):
            continue
        nbytes = _du(root, raw, eid)
        if not dry_run:
            try:
                why = _remove_exposure(engine, root, eid)
            except (OSError, StoreError, sa.exc.SQLAlchemyError) as exc:
                errors[f"{raw}/{eid}"] = f"{type(exc).__name__}: {exc}"
                continue
            if why is not None:
                logger.warning("gc: raw exposure %s kept: %s", eid, why)
                continue
            logger.info("gc: removed raw exposure %s (%d bytes)", eid, nbytes)
        groups.append(RemovedGroup("raw", f"{raw}/{eid}", nbytes))
    return groups

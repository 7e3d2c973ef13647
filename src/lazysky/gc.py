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
``run_expiry`` and deletes its catalog rows (sources, run tiles, QA, objects …; the
month partitions of its type whole when it is the last run of a month that is over,
:func:`drop_expired_month`, and any leaf partition holding only its rows,
:func:`drop_expired_partitions`); (2) its
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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from lazysky._gc_catalog import (
    KeptRun,
    _count_rows,
    _expire_catalog,
    _Plan,
    _plan,
    _remove_exposure,
    _Run,
    drop_expired_month,
    drop_expired_partitions,
)
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
    "drop_expired_month",
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
    #: "expired"; "expiring" (rows gone, products left for the next gc); "failed" (nothing
    #: changed, the next gc tries again); "would expire" (a dry run)
    state: str

    @property
    def n_rows(self) -> int:
        return int(sum(self.rows.values()))


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
    from lazysky.batch import parse_at

    return parse_at(value, what=what)


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


def _take_gc_lock(conn: sa.Connection, wait: float) -> bool:
    """Take the session advisory lock of gc, polling for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        got = conn.execute(sa.select(sa.func.pg_try_advisory_lock(_GC_LOCK))).scalar()
        conn.commit()
        if got:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.1, left))


def collect(
    *,
    now: str | dt.datetime | None = None,
    dry_run: bool = False,
    settings: Settings | None = None,
    catalog: Catalog | None = None,
    store: StoreLike | None = None,
    storage_options: dict[str, Any] | None = None,
    on_step: Step | None = None,
    wait: float = 10.0,
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
    wait
        Seconds to wait for another gc's lock before giving up (default 10). A gc that
        was just killed holds the lock until its database session ends, which the server
        notices a moment later; the wait lets a re-run started at once go ahead.

    Returns
    -------
    GcReport

    Raises
    ------
    ParameterError
        A bad ``now`` or ``wait``.
    CatalogError
        Another gc still holds the catalog's gc lock after ``wait`` seconds.

    Examples
    --------
    >>> print(collect(dry_run=True, now="2027-06-01"))  # doctest: +SKIP
    """
    from lazysky.catalog import CatalogError, open_catalog
    from lazysky.config import load_settings
    from lazysky.zarr_store._layout import RAW, parse_store

    when = parse_now(now)
    if not wait >= 0:  # NaN too
        raise ParameterError(f"wait: expected seconds >= 0, got {wait!r}")
    settings = settings if settings is not None else load_settings()
    root = parse_store(store if store is not None else settings.store_url,
                       storage_options=storage_options, settings=settings)
    catalog = catalog if catalog is not None else open_catalog(settings)
    engine = catalog.engine()
    errors: dict[str, str] = {}
    with engine.connect() as lock_conn:
        if not _take_gc_lock(lock_conn, wait):
            msg = (f"another lazysky gc is running on this catalog (its lock still held "
                   f"after waiting {wait:g} s); try again when it ends")
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
                marked = False
                try:
                    result = _expire_catalog(engine, run, reason, nbytes, by)
                    if isinstance(result, str):
                        kept.append(KeptRun(rid, result))
                        logger.info("gc: %s kept after all: %s", rid, result)
                        continue
                    marked = True
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
                                          counts[rid] if marked else {},
                                          "expiring" if marked else "failed"))
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

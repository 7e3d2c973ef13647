"""Production: which run the catalog shows for every tile, promotion and rollback.

Every field's production is a map tile → run (the table ``production_tiles``); the views
``coadd_sources_prod`` and ``diff_sources_prod`` show, for every tile, the rows of that
one run. Three things change it, each in one transaction and each recorded in
``promotions`` with when, by whom and why:

- **publish**: a production run (type ``prod``) that finishes becomes production for its
  tiles (the runner does it);
- **promote**: an experiment (or a reprocessing, a validation run) becomes production for
  the tiles it covers — its rows are not copied, the views switch;
- **rollback**: a promotion or publication is undone, restoring per tile what was
  production before it.

Readers never see two versions of one tile: the map has one run per (field, tile) and a
change replaces it in one transaction (PostgreSQL's MVCC gives a concurrent reader the
map before or after, never a mix). Changes to one field are serialised by an advisory
lock.

Only a finished (``done`` or ``done_with_errors``), complete run can be promoted: every
tile it planned (:func:`plan_run`, recorded by the runner) must have finished both
detection stages. A ``test`` run never becomes production.

Examples
--------
>>> import lazysky
>>> p = lazysky.promote("exp-20261124-…", reason="new PSF model")  # doctest: +SKIP
>>> lazysky.rollback(field="deep1-r", reason="flux scale off")  # doctest: +SKIP
>>> lazysky.list_runs(type="exp")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from lazysky.catalog._errors import CatalogError
from lazysky.catalog.database import Catalog, open_catalog
from lazysky.catalog.schema import production_tiles as production_table
from lazysky.catalog.schema import promotions, run_expiry, run_tiles, runs
from lazysky.errors import ParameterError
from lazysky.runs import RUN_STATUSES, RUN_TYPES, validate_run_id

__all__ = [
    "DETECT_STAGES",
    "Promotion",
    "RunRecord",
    "list_promotions",
    "list_runs",
    "plan_run",
    "production_tiles",
    "promote",
    "publish",
    "rollback",
    "run_record",
]

logger = logging.getLogger(__name__)

#: The stages every planned tile must have finished before its run can be promoted.
DETECT_STAGES = ("detect-coadd", "detect-diff")
#: Run statuses that can become production.
PROMOTABLE_STATUSES = ("done", "done_with_errors")
_LOCK_NAMESPACE = 0x70726F64  # 'prod': advisory locks per field


@dataclass(frozen=True)
class Promotion:
    """One change of production: a promotion, a publication or a rollback.

    ``tiles`` maps every tile the change touched to what was production there before it
    (``{"run_id": …, "promotion_id": …}``, or ``None`` when the tile had no production).
    """

    promotion_id: int
    action: str
    run_id: str
    field: str
    tiles: Mapping[str, Mapping[str, Any] | None]
    at: dt.datetime
    by: str
    reason: str
    undoes: int | None = None

    def __str__(self) -> str:
        what = {"promote": "promoted", "publish": "published",
                "rollback": f"rolled back promotion #{self.undoes} of"}[self.action]
        return (f"#{self.promotion_id} {self.at:%Y-%m-%d %H:%M:%S %Z} {self.by}: {what} "
                f"{self.run_id} on {len(self.tiles)} tile(s) of {self.field} — {self.reason}")


@dataclass(frozen=True)
class RunRecord:
    """What the catalog knows of a run: its row, tiles finished and production held."""

    run_id: str
    run_type: str
    status: str
    field: str | None
    planned_tiles: tuple[str, ...] | None
    parent_run_id: str | None
    description: str
    software_version: str
    started_at: dt.datetime
    finished_at: dt.datetime | None
    config: Mapping[str, Any]
    timings: Mapping[str, float]
    errors: Mapping[str, str]
    tiles_done: Mapping[str, int] = dataclasses.field(default_factory=dict)
    rows: Mapping[str, int] = dataclasses.field(default_factory=dict)
    production_tiles: tuple[str, ...] = ()
    #: ``expiring``/``expired`` with when and why, once lazysky gc collects the run
    expiry: str | None = None

    @property
    def missing_tiles(self) -> dict[str, list[str]]:
        """Planned tiles not finished, per detection stage (empty: complete)."""
        planned = self.planned_tiles or ()
        return {s: [t for t in planned if t not in self._done(s)] for s in DETECT_STAGES
                if any(t not in self._done(s) for t in planned)}

    def _done(self, stage: str) -> set[str]:
        return {k.split(":", 1)[1] for k in self.tiles_done if k.startswith(f"{stage}:")}

    def __str__(self) -> str:
        lines = [
            f"run        {self.run_id}",
            f"type       {self.run_type}",
            f"status     {self.status}",
            f"field      {self.field or '-'}",
            f"parent     {self.parent_run_id or '-'}",
            f"started    {self.started_at:%Y-%m-%d %H:%M:%S %Z}",
            f"finished   {self.finished_at:%Y-%m-%d %H:%M:%S %Z}" if self.finished_at
            else "finished   -",
            f"software   {self.software_version}",
            f"tiles      {len(self.planned_tiles or ())} planned; "
            + ", ".join(f"{s} {len(self._done(s))}" for s in DETECT_STAGES),
            "rows       " + ", ".join(f"{k} {v}" for k, v in self.rows.items()),
            f"production {len(self.production_tiles)} tile(s)"
            + (f": {', '.join(self.production_tiles)}" if self.production_tiles else ""),
        ]
        if self.expiry:
            lines.append(f"gc         {self.expiry}")
        if self.description:
            lines.append(f"about      {self.description}")
        if self.timings:
            lines.append("timings    " + ", ".join(f"{k} {v:.1f} s"
                                                   for k, v in self.timings.items()))
        for what, text in self.errors.items():
            lines.append(f"error      {what}: {text}")
        for stage, tiles in self.missing_tiles.items():
            lines.append(f"missing    {stage}: {', '.join(tiles)}")
        return "\n".join(lines)


def _who(by: str | None) -> str:
    if by is not None:
        if not str(by).strip():
            msg = "by must name who makes the change (default: user@host)"
            raise ParameterError(msg)
        return str(by)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _reason(reason: str) -> str:
    if not isinstance(reason, str) or not reason.strip():
        msg = "a reason is required (it is recorded with the change, e.g. 'new PSF model')"
        raise ParameterError(msg)
    return reason.strip()


def _lock(conn: sa.Connection, field_name: str) -> None:
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
        _LOCK_NAMESPACE, sa.func.hashtext(field_name))))


def plan_run(run_id: str, *, field: str, tiles: Sequence[str],
             catalog: Catalog | None = None) -> None:
    """Record the field and the tiles a run plans to finish (what promotion checks).

    The runner calls it once the sky grid is known.
    """
    validate_run_id(run_id)
    if not field:
        msg = "plan_run needs the field's name"
        raise ParameterError(msg)
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().begin() as conn:
        done = conn.execute(runs.update().where(runs.c.run_id == run_id).values(
            field=field, tiles=sorted(set(tiles))))
    if done.rowcount == 0:
        msg = f"run {run_id} is not registered in the catalog"
        raise CatalogError(msg)


def production_tiles(field: str, *, catalog: Catalog | None = None) -> dict[str, str]:
    """The production run of every tile of ``field`` (tile id → run id)."""
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().connect() as conn:
        got = conn.execute(sa.select(production_table.c.tile_id, production_table.c.run_id)
                           .where(production_table.c.field == field)
                           .order_by(production_table.c.tile_id))
        return {str(t): str(r) for t, r in got}


def _record(conn: sa.Connection, run_id: str) -> RunRecord:
    validate_run_id(run_id)
    row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().first()
    if row is None:
        msg = f"unknown run {run_id!r}: it is not in the catalog (see `lazysky runs list`)"
        raise CatalogError(msg)
    done = conn.execute(sa.select(run_tiles.c.stage, run_tiles.c.tile_id, run_tiles.c.rows)
                        .where(run_tiles.c.run_id == run_id)).all()
    rows: dict[str, int] = {}
    for stage, _tile, n in done:
        rows[stage] = rows.get(stage, 0) + int(n)
    held = conn.execute(sa.select(production_table.c.tile_id)
                        .where(production_table.c.run_id == run_id)
                        .order_by(production_table.c.tile_id)).scalars().all()
    planned = row["tiles"]
    gone = conn.execute(sa.select(run_expiry).where(run_expiry.c.run_id == run_id)
                        ).mappings().first()
    expiry = None
    if gone is not None:
        when = gone["expired_at"] or gone["marked_at"]
        expiry = (f"{gone['state']} {when:%Y-%m-%d %H:%M:%S %Z} by {gone['by']}: "
                  f"{gone['reason']}")
    return RunRecord(
        run_id=row["run_id"], run_type=row["run_type"], status=row["status"],
        field=row["field"], planned_tiles=tuple(planned) if planned is not None else None,
        parent_run_id=row["parent_run_id"], description=row["description"],
        software_version=row["software_version"], started_at=row["started_at"],
        finished_at=row["finished_at"], config=row["config"], timings=row["timings"],
        errors=row["errors"], tiles_done={f"{s}:{t}": int(n) for s, t, n in done},
        rows=rows, production_tiles=tuple(held), expiry=expiry)


def run_record(run_id: str, *, catalog: Catalog | None = None) -> RunRecord:
    """Everything the catalog knows of one run (see :class:`RunRecord`).

    Raises
    ------
    ParameterError
        ``run_id`` is not a run id.
    CatalogError
        No such run in the catalog.
    """
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().connect() as conn:
        return _record(conn, run_id)


def list_runs(*, type: str | None = None, status: str | None = None,
              field: str | None = None, limit: int = 50,
              catalog: Catalog | None = None) -> Any:
    """Runs, newest first, as an astropy Table (id, type, status, gc — ``expiring`` or
    ``expired`` once lazysky gc collects the run, else empty —, field, tiles, parent,
    started, finished, production tiles held).

    Parameters
    ----------
    type, status, field
        Keep only runs of this type (``prod``, ``exp``, …), status or field.
    limit
        At most this many rows (≥ 1).
    """
    from astropy.table import Table

    if type is not None and type not in RUN_TYPES:
        msg = f"type must be one of {', '.join(RUN_TYPES)}; got {type!r}"
        raise ParameterError(msg)
    if status is not None and status not in RUN_STATUSES:
        msg = f"status must be one of {', '.join(RUN_STATUSES)}; got {status!r}"
        raise ParameterError(msg)
    if not isinstance(limit, int) or limit < 1:
        msg = f"limit must be a positive integer, got {limit!r}"
        raise ParameterError(msg)
    held = (sa.select(sa.func.count()).select_from(production_table)
            .where(production_table.c.run_id == runs.c.run_id).scalar_subquery())
    gc_state = (sa.select(run_expiry.c.state).where(run_expiry.c.run_id == runs.c.run_id)
                .scalar_subquery())
    query = sa.select(runs.c.run_id, runs.c.run_type, runs.c.status,
                      sa.func.coalesce(gc_state, ""), runs.c.field,
                      sa.func.coalesce(sa.func.jsonb_array_length(runs.c.tiles), 0),
                      runs.c.parent_run_id, runs.c.started_at, runs.c.finished_at,
                      held, runs.c.description)
    if type is not None:
        query = query.where(runs.c.run_type == type)
    if status is not None:
        query = query.where(runs.c.status == status)
    if field is not None:
        query = query.where(runs.c.field == field)
    query = query.order_by(runs.c.started_at.desc(), runs.c.run_id).limit(limit)
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().connect() as conn:
        got = conn.execute(query).all()
    names = ["run_id", "type", "status", "gc", "field", "tiles", "parent", "started",
             "finished", "production_tiles", "description"]
    columns: list[list[Any]] = [[] for _ in names]
    for row in got:
        for col, name, value in zip(columns, names, row, strict=True):
            if name in ("started", "finished"):
                value = value.isoformat(timespec="seconds") if value is not None else ""
            elif name in ("tiles", "production_tiles"):
                value = int(value)
            col.append("" if value is None else value)
    dtypes = [int if n in ("tiles", "production_tiles") else str for n in names]
    return Table(columns, names=names, dtype=dtypes)


def _as_promotion(row: Any) -> Promotion:
    return Promotion(promotion_id=int(row["promotion_id"]), action=row["action"],
                     run_id=row["run_id"], field=row["field"], tiles=row["tiles"],
                     at=row["at"], by=row["by"], reason=row["reason"], undoes=row["undoes"])


def list_promotions(*, field: str | None = None, run_id: str | None = None,
                    catalog: Catalog | None = None) -> list[Promotion]:
    """The history of production changes, oldest first (optionally of one field or run)."""
    query = sa.select(promotions).order_by(promotions.c.promotion_id)
    if field is not None:
        query = query.where(promotions.c.field == field)
    if run_id is not None:
        validate_run_id(run_id)
        query = query.where(promotions.c.run_id == run_id)
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().connect() as conn:
        return [_as_promotion(r) for r in conn.execute(query).mappings()]


def _promotable(rec: RunRecord, *, action: str) -> str:
    """The run's field, once every check passed (else a clear error)."""
    verb = "promoted" if action == "promote" else "published"
    if rec.run_type == "test":
        msg = f"run {rec.run_id} is a test run: test runs are never {verb} to production"
        raise CatalogError(msg)
    if action == "publish" and rec.run_type != "prod":
        msg = (f"run {rec.run_id} is of type {rec.run_type}: only production runs publish "
               "themselves; promote it instead")
        raise CatalogError(msg)
    if rec.status not in PROMOTABLE_STATUSES:
        msg = (f"run {rec.run_id} is {rec.status}: only a finished run "
               f"({' or '.join(PROMOTABLE_STATUSES)}) can be {verb}")
        raise CatalogError(msg)
    if rec.field is None or rec.planned_tiles is None:
        msg = (f"run {rec.run_id} has no field and tile plan recorded (runs made by "
               "`lazysky run` have them): cannot tell which tiles it would replace")
        raise CatalogError(msg)
    if not rec.planned_tiles:
        msg = f"run {rec.run_id} planned no tile: nothing to {action}"
        raise CatalogError(msg)
    missing = rec.missing_tiles
    if missing:
        detail = "; ".join(f"{s}: {', '.join(t[:5])}{' …' if len(t) > 5 else ''} "
                           f"({len(t)} of {len(rec.planned_tiles)})"
                           for s, t in missing.items())
        msg = f"run {rec.run_id} is incomplete, so it cannot be {verb}: missing {detail}"
        raise CatalogError(msg)
    return rec.field


def _change(run_id: str, *, action: str, reason: str, by: str | None,
            catalog: Catalog | None) -> Promotion:
    reason, who = _reason(reason), _who(by)
    catalog = catalog if catalog is not None else open_catalog()
    with catalog.engine().begin() as conn:
        field_name = _promotable(_record(conn, run_id), action=action)
        _lock(conn, field_name)
        # again under the lock: what a change that held it first (the gc collecting this
        # run, another promotion) left is what counts
        expiry = conn.execute(sa.select(run_expiry.c.state)
                              .where(run_expiry.c.run_id == run_id)).scalar()
        if expiry is not None:
            verb = "promoted" if action == "promote" else "published"
            msg = (f"run {run_id} is {expiry} (lazysky gc collected it past its "
                   f"retention): its rows are gone, it cannot be {verb}")
            raise CatalogError(msg)
        rec = _record(conn, run_id)
        _promotable(rec, action=action)
        current = {t: {"run_id": r, "promotion_id": int(p)} for t, r, p in conn.execute(
            sa.select(production_table.c.tile_id, production_table.c.run_id,
                      production_table.c.promotion_id)
            .where(production_table.c.field == field_name))}
        planned = list(rec.planned_tiles or ())
        tiles = [t for t in planned if (current.get(t) or {}).get("run_id") != run_id]
        if not tiles:
            msg = (f"run {run_id} is already production for all its {len(planned)} tile(s) "
                   f"of {field_name}")
            raise CatalogError(msg)
        row = conn.execute(promotions.insert().values(
            action=action, run_id=run_id, field=field_name,
            tiles={t: current.get(t) for t in tiles}, by=who, reason=reason,
        ).returning(*promotions.c)).mappings().one()
        _set_tiles(conn, field_name, {t: (run_id, int(row["promotion_id"])) for t in tiles})
    done = _as_promotion(row)
    logger.info("production: %s", done)
    return done


def _set_tiles(conn: sa.Connection, field_name: str,
               tiles: Mapping[str, tuple[str, int] | None]) -> None:
    """Point each tile at (run, promotion), or take it out of production (``None``)."""
    from sqlalchemy.dialects.postgresql import insert

    gone = [t for t, v in tiles.items() if v is None]
    if gone:
        conn.execute(production_table.delete().where(
            production_table.c.field == field_name, production_table.c.tile_id.in_(gone)))
    rows = [{"field": field_name, "tile_id": t, "run_id": v[0], "promotion_id": v[1]}
            for t, v in tiles.items() if v is not None]
    if rows:
        stmt = insert(production_table)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["field", "tile_id"],
            set_={"run_id": stmt.excluded.run_id,
                  "promotion_id": stmt.excluded.promotion_id}), rows)


def promote(run_id: str, *, reason: str, by: str | None = None,
            catalog: Catalog | None = None) -> Promotion:
    """Make a finished, complete run the production of the tiles it covers.

    One transaction: the production views switch from the old rows to this run's rows
    for every tile the run planned, and the change is recorded (when, ``by`` whom —
    default ``user@host`` — and why). Reversible with :func:`rollback`.

    Raises
    ------
    CatalogError
        Unknown run; a run that is running, failed, incomplete or a test run; a run
        already production everywhere it covers.
    ParameterError
        No reason given.

    Examples
    --------
    >>> promote("exp-20261124-…", reason="cosmic-ray sigma 4.5 recovers 3 % more")  # doctest: +SKIP
    """
    return _change(run_id, action="promote", reason=reason, by=by, catalog=catalog)


def publish(run_id: str, *, by: str | None = None, reason: str = "production run finished",
            catalog: Catalog | None = None) -> Promotion:
    """A finished production run becomes production for its tiles (the runner calls it)."""
    return _change(run_id, action="publish", reason=reason, by=by, catalog=catalog)


def rollback(promotion_id: int | None = None, *, field: str | None = None, reason: str,
             by: str | None = None, catalog: Catalog | None = None) -> Promotion:
    """Undo a promotion (or publication): its tiles show what they showed before it.

    Parameters
    ----------
    promotion_id
        The change to undo; default the newest one of ``field`` not yet undone.
    field
        The field whose newest promotion is undone (when ``promotion_id`` is not given).
    reason
        Why (recorded).
    by
        Who (default ``user@host``).

    Raises
    ------
    CatalogError
        No such promotion; already rolled back; a tile it changed has changed again
        since (roll that later promotion back first).
    ParameterError
        Neither ``promotion_id`` nor ``field``; no reason.

    Examples
    --------
    >>> rollback(field="deep1-r", reason="the flux scale is off by 2 %")  # doctest: +SKIP
    """
    reason, who = _reason(reason), _who(by)
    if promotion_id is None and not field:
        msg = "rollback needs a promotion id or a field (its newest promotion is undone)"
        raise ParameterError(msg)
    catalog = catalog if catalog is not None else open_catalog()
    undone = sa.select(promotions.c.undoes).where(promotions.c.undoes.is_not(None))
    with catalog.engine().begin() as conn:
        if promotion_id is None:
            assert field is not None
            _lock(conn, field)
            target = conn.execute(
                sa.select(promotions).where(
                    promotions.c.field == field, promotions.c.action != "rollback",
                    promotions.c.promotion_id.not_in(undone))
                .order_by(promotions.c.promotion_id.desc()).limit(1)).mappings().first()
            if target is None:
                msg = f"field {field!r} has no promotion left to roll back"
                raise CatalogError(msg)
        else:
            target = conn.execute(sa.select(promotions).where(
                promotions.c.promotion_id == int(promotion_id))).mappings().first()
            if target is None:
                msg = f"unknown promotion #{promotion_id} (see `lazysky runs history`)"
                raise CatalogError(msg)
            _lock(conn, target["field"])
        pid, field_name = int(target["promotion_id"]), target["field"]
        if target["action"] == "rollback":
            msg = f"#{pid} is itself a rollback; promote the run again instead"
            raise CatalogError(msg)
        if field is not None and field != field_name:
            msg = f"promotion #{pid} is of field {field_name!r}, not {field!r}"
            raise CatalogError(msg)
        later = conn.execute(sa.select(promotions.c.promotion_id).where(
            promotions.c.undoes == pid)).scalar()
        if later is not None:
            msg = f"promotion #{pid} was already rolled back (by #{later})"
            raise CatalogError(msg)
        now = {t: (r, int(p)) for t, r, p in conn.execute(
            sa.select(production_table.c.tile_id, production_table.c.run_id,
                      production_table.c.promotion_id)
            .where(production_table.c.field == field_name))}
        moved = sorted(t for t in target["tiles"] if now.get(t, (None, None))[1] != pid)
        if moved:
            by_whom = sorted({str(now[t][1]) for t in moved if t in now})
            msg = (f"cannot roll back #{pid}: tile(s) {', '.join(moved[:5])} changed since "
                   f"(by promotion #{', #'.join(by_whom) or '?'}); roll that back first")
            raise CatalogError(msg)
        before: dict[str, Any] = target["tiles"]
        row = conn.execute(promotions.insert().values(
            action="rollback", run_id=target["run_id"], field=field_name,
            tiles={t: {"run_id": target["run_id"], "promotion_id": pid} for t in before},
            undoes=pid, by=who, reason=reason,
        ).returning(*promotions.c)).mappings().one()
        _set_tiles(conn, field_name, {
            t: (None if prev is None else (str(prev["run_id"]), int(prev["promotion_id"])))
            for t, prev in before.items()})
    done = _as_promotion(row)
    logger.info("production: %s", done)
    return done

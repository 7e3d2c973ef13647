"""The catalog schema: runs, exposures, coadd and difference-image sources.

Every position is stored twice: as a pgSphere ``spoint`` (``pos``, GiST-indexed, what
cone searches use) and as ``ra``/``dec`` in degrees (what people read). ``pos`` is
computed by the database from ``ra``/``dec`` (a generated column), so the two never
disagree. Rows of sources belong to a (run, tile), which is what
:func:`lazysky.catalog.write_sources` replaces atomically: ``diff_sources`` is keyed by
``(run_id, tile_id, number)``; ``coadd_sources`` finds a (run, tile)'s rows by a BRIN
index on ``(run_id, tile_id)`` instead (v12; a deduplicated btree from v6 to v11, both
cheaper to load than the key), ``number`` being unique within the (run, tile) by the
writer. ``source_tiles`` (v12) records every (table, run, tile) the writer has written,
with its rows, so a write with nothing to replace skips its DELETE.

The ``*_prod`` views show production rows only: for every (field, tile) the rows of the
one run ``production_tiles`` names (v4). A production run publishes its tiles when it
finishes; an experiment becomes production by promotion, in one transaction, and a
rollback restores what was there (``promotions`` keeps the history; see
:mod:`lazysky.catalog.production`). ``runs_prod`` lists the runs of type ``prod``.

``batch_submissions`` and ``batch_executions`` (v3) hold the queue of scheduled batch
submissions and the history of their executions (:mod:`lazysky.batch`, docs/batch.md).

The schema is versioned: :data:`MIGRATIONS` lists the steps, the table
``lazysky_schema`` records those applied, and :func:`upgrade` applies the missing ones
under an advisory lock (safe when many processes open the catalog at once).

Examples
--------
>>> from lazysky.catalog.schema import coadd_sources
>>> "pos" in coadd_sources.c and "ra" in coadd_sources.c
True
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from lazysky.catalog._binary import ensure_spoint_receive
from lazysky.catalog._gist import ensure_spoint_opclass
from lazysky.catalog._types import SPointType, SPolyType
from lazysky.catalog.cells import CELL_FUNCTIONS_SQL, PARTITION_LOCK
from lazysky.runs import RUN_ID_PATTERN, RUN_STATUSES, RUN_TYPES

__all__ = [
    "INTERNAL_COLUMNS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SOURCE_TABLES",
    "apply_up_to",
    "batch_executions",
    "batch_submissions",
    "canary_runs",
    "coadd_sources",
    "diff_sources",
    "drop_month_partitions",
    "ensure_partitions",
    "ensure_upcoming_partitions",
    "exposures",
    "forced_photometry",
    "metadata",
    "month_partitions",
    "object_detections",
    "objects",
    "partition_name",
    "production_tiles",
    "promotions",
    "run_expiry",
    "run_tiles",
    "runs",
    "schema_version",
    "source_tiles",
    "tile_qa",
    "upgrade",
    "workflow_activations",
    "workflow_versions",
]

logger = logging.getLogger(__name__)

metadata = sa.MetaData()
_views = sa.MetaData()

_POS_EXPR = "spoint(radians(ra), radians(dec))"
_RUN_TYPES_SQL = ", ".join(f"'{t}'" for t in RUN_TYPES)
_STATUSES_SQL = ", ".join(f"'{s}'" for s in RUN_STATUSES)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("run_type", sa.Text, sa.Computed("split_part(run_id, '-', 1)", persisted=True),
              nullable=False),
    sa.Column("config", JSONB, nullable=False, server_default="{}"),
    sa.Column("software_version", sa.Text, nullable=False),
    sa.Column("inputs", JSONB, nullable=False, server_default="{}",
              comment="input name -> SHA-256"),
    sa.Column("parent_run_id", sa.Text, sa.ForeignKey("runs.run_id"), nullable=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("status", sa.Text, nullable=False, server_default="running"),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("timings", JSONB, nullable=False, server_default="{}",
              comment="step name -> seconds"),
    sa.Column("errors", JSONB, nullable=False, server_default="{}",
              comment="input or tile -> error text (what was skipped and why)"),
    sa.Column("field", sa.Text, nullable=True, comment="the field the run processes"),
    sa.Column("tiles", JSONB, nullable=True,
              comment="the tiles the run plans to finish (a list of tile ids)"),
    sa.CheckConstraint(f"run_id ~ '{RUN_ID_PATTERN}'", name="run_id_form"),
    sa.CheckConstraint(f"split_part(run_id, '-', 1) IN ({_RUN_TYPES_SQL})", name="run_type"),
    sa.CheckConstraint(f"status IN ({_STATUSES_SQL})", name="run_status"),
    sa.CheckConstraint("parent_run_id IS DISTINCT FROM run_id", name="not_own_parent"),
    comment="processing runs: provenance and lineage",
)

exposures = sa.Table(
    "exposures",
    metadata,
    sa.Column("exposure_id", sa.Text, primary_key=True, comment="e.g. deep1-r-e003-d01"),
    sa.Column("instrument", sa.Text, nullable=False),
    sa.Column("filter", sa.Text, nullable=False),
    sa.Column("mjd", sa.Float(53), nullable=False),
    sa.Column("exptime", sa.Float(53), nullable=False, comment="seconds"),
    sa.Column("footprint", SPolyType(), nullable=True),
    sa.CheckConstraint("exptime > 0", name="exptime_positive"),
    sa.CheckConstraint("mjd > 0 AND mjd < 100000", name="mjd_range"),
    sa.CheckConstraint("length(exposure_id) > 0", name="exposure_id_nonempty"),
    sa.Index("ix_exposures_footprint", "footprint", postgresql_using="gist"),
    comment="exposures; footprint as a pgSphere polygon",
)


def _source_table(name: str, *, difference: bool, md: sa.MetaData = metadata,
                  partitioned: bool = True) -> sa.Table:
    photometry = ("aper", "psf") if difference else ("aper", "kron")
    flux_cols = [
        sa.Column(f"{kind}{suffix}", sa.Float(53), nullable=True, comment=comment)
        for suffix, comment in zip(photometry, ("aperture", "Kron" if not difference
                                                else "PSF"), strict=True)
        for kind in ("flux_", "fluxerr_")
    ]
    extra: list[Any] = []
    if difference:
        extra = [
            sa.Column("sign", sa.SmallInteger, nullable=False,
                      comment="+1 brighter than the reference, -1 fainter"),
            sa.Column("exposure_id", sa.Text, sa.ForeignKey("exposures.exposure_id"),
                      nullable=True),
            sa.CheckConstraint("sign IN (-1, 1)", name=f"{name}_sign"),
        ]
    if partitioned:
        # v5: partitioned by processing type, then by the run's month (PARTITIONS below);
        # the partition keys are columns the writer fills from the run id (PostgreSQL
        # cannot partition on generated columns), CHECKed against it per partition
        extra += [
            sa.Column("run_type", sa.Text, nullable=False,
                      comment="partition key: the run's type (from run_id)"),
            sa.Column("run_month", sa.Date, nullable=False,
                      comment="partition key: first day of the run's month (from run_id)"),
            sa.PrimaryKeyConstraint("run_id", "tile_id", "number", "run_type", "run_month",
                                    name=f"{name}_pkey"),
        ]
    key = not partitioned
    kw: dict[str, Any] = {"postgresql_partition_by": "LIST (run_type)"} if partitioned else {}
    return sa.Table(
        name,
        md,
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id"), primary_key=key),
        sa.Column("tile_id", sa.Text, primary_key=key, comment="stable sky-grid tile id"),
        sa.Column("number", sa.Integer, primary_key=key, comment="1-based within the tile"),
        sa.Column("x", sa.Float(53), nullable=False, comment="0-based pixel"),
        sa.Column("y", sa.Float(53), nullable=False, comment="0-based pixel"),
        sa.Column("ra", sa.Float(53), nullable=False, comment="deg"),
        sa.Column("dec", sa.Float(53), nullable=False, comment="deg"),
        sa.Column("pos", SPointType(), sa.Computed(_POS_EXPR, persisted=True),
                  nullable=False),
        *flux_cols,
        sa.Column("snr", sa.Float(53), nullable=True),
        sa.Column("a", sa.Float(53), nullable=True, comment="semi-major axis, pixels"),
        sa.Column("b", sa.Float(53), nullable=True, comment="semi-minor axis, pixels"),
        sa.Column("theta", sa.Float(53), nullable=True, comment="position angle, radians"),
        sa.Column("flags", sa.Integer, nullable=False, server_default="0"),
        *extra,
        sa.CheckConstraint("ra >= 0 AND ra < 360", name=f"{name}_ra_range"),
        sa.CheckConstraint("dec >= -90 AND dec <= 90", name=f"{name}_dec_range"),
        sa.CheckConstraint("number > 0", name=f"{name}_number_positive"),
        sa.CheckConstraint("length(tile_id) > 0", name=f"{name}_tile_nonempty"),
        sa.Index(f"ix_{name}_pos", "pos", postgresql_using="gist"),
        comment=f"{'difference-image' if difference else 'coadd'} sources",
        **kw,
    )


_RUN_TYPE_SQL = "split_part(run_id, '-', 1)"
_RUN_MONTH_SQL = ("make_date(left(split_part(run_id, '-', 2), 4)::int, "
                  "substr(split_part(run_id, '-', 2), 5, 2)::int, 1)")
coadd_sources = _source_table("coadd_sources", difference=False)
diff_sources = _source_table("diff_sources", difference=True)
#: The source tables as v1 made them (unpartitioned): what migration 1 creates.
_v1_metadata = sa.MetaData()
sa.Table("runs", _v1_metadata, sa.Column("run_id", sa.Text, primary_key=True))
sa.Table("exposures", _v1_metadata, sa.Column("exposure_id", sa.Text, primary_key=True))
_V1_SOURCE_TABLES = (
    _source_table("coadd_sources", difference=False, md=_v1_metadata, partitioned=False),
    _source_table("diff_sources", difference=True, md=_v1_metadata, partitioned=False),
)
#: Columns of the source tables that are the database's business, not a reader's.
INTERNAL_COLUMNS = ("pos", "run_type", "run_month")

schema_version = sa.Table(
    "lazysky_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)


def _view_of(table: sa.Table) -> sa.Table:
    return sa.Table(f"{table.name}_prod", _views,
                    *(sa.Column(c.name, c.type) for c in table.columns))


run_tiles = sa.Table(
    "run_tiles",
    metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("stage", sa.Text, primary_key=True, comment="e.g. detect-coadd, detect-diff"),
    sa.Column("tile_id", sa.Text, primary_key=True),
    sa.Column("rows", sa.Integer, nullable=False, server_default="0"),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    comment="tiles a run has finished, per stage: what a resumed run skips",
)

#: Source tables by short and full name, and their production-only views.
SOURCE_TABLES: dict[str, sa.Table] = {
    "coadd": coadd_sources,
    "diff": diff_sources,
    "coadd_sources": coadd_sources,
    "diff_sources": diff_sources,
    "coadd_prod": _view_of(coadd_sources),
    "diff_prod": _view_of(diff_sources),
}


def _v1_create(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[runs, exposures])
    _v1_metadata.create_all(conn, tables=list(_V1_SOURCE_TABLES))
    # v1 as it was: no errors column, three statuses (v2 brings both)
    conn.execute(sa.text("ALTER TABLE runs DROP COLUMN errors"))
    conn.execute(sa.text("ALTER TABLE runs DROP COLUMN field"))  # v4
    conn.execute(sa.text("ALTER TABLE runs DROP COLUMN tiles"))  # v4
    conn.execute(sa.text("ALTER TABLE runs DROP CONSTRAINT run_status"))
    conn.execute(sa.text(
        "ALTER TABLE runs ADD CONSTRAINT run_status "
        "CHECK (status IN ('running', 'done', 'failed'))"))
    for table in (runs, coadd_sources, diff_sources):
        join = "" if table is runs else " JOIN runs r USING (run_id)"
        alias = "r" if table is runs else "t"
        frm = "runs r" if table is runs else f"{table.name} t{join}"
        conn.execute(sa.text(
            f"CREATE VIEW {table.name}_prod AS SELECT {alias}.* FROM {frm} "
            f"WHERE r.run_type = 'prod'"
        ))


def _v2_run_errors_and_tiles(conn: sa.Connection) -> None:
    conn.execute(sa.text(
        "ALTER TABLE runs ADD COLUMN errors JSONB NOT NULL DEFAULT '{}'::jsonb"))
    conn.execute(sa.text("COMMENT ON COLUMN runs.errors IS "
                         "'input or tile -> error text (what was skipped and why)'"))
    conn.execute(sa.text("ALTER TABLE runs DROP CONSTRAINT run_status"))
    conn.execute(sa.text(
        f"ALTER TABLE runs ADD CONSTRAINT run_status CHECK (status IN ({_STATUSES_SQL}))"))
    conn.execute(sa.text(
        "CREATE OR REPLACE VIEW runs_prod AS SELECT r.* FROM runs r WHERE r.run_type = 'prod'"))
    run_tiles.create(conn)


#: States of a batch submission (lazysky.batch); ``running`` holds a lease.
SUBMISSION_STATES = ("queued", "running", "completed", "completed-with-errors", "failed",
                     "cancelled")
#: States of one execution (attempt) of a submission; ``lost``: its lease expired.
EXECUTION_STATES = ("running", "completed", "completed-with-errors", "failed", "lost")
_SUB_STATES_SQL = ", ".join(f"'{s}'" for s in SUBMISSION_STATES)
_EXEC_STATES_SQL = ", ".join(f"'{s}'" for s in EXECUTION_STATES)

batch_submissions = sa.Table(
    "batch_submissions",
    metadata,
    sa.Column("submission_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("run_type", sa.Text, nullable=False),
    sa.Column("config", JSONB, nullable=False, comment="the run configuration, validated"),
    sa.Column("source", sa.Text, nullable=False, server_default="",
              comment="where the configuration came from (file)"),
    sa.Column("cron", sa.Text, nullable=True, comment="5-field cron (UTC); NULL: once"),
    sa.Column("state", sa.Text, nullable=False, server_default="queued"),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False,
              comment="when the next execution is due"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0",
              comment="attempts at the current due time"),
    sa.Column("max_attempts", sa.Integer, nullable=False, server_default="3"),
    sa.Column("run_id", sa.Text, nullable=True,
              comment="the run of the current (or last) execution; a retry resumes it"),
    sa.Column("lease_owner", sa.Text, nullable=True),
    sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.CheckConstraint(f"state IN ({_SUB_STATES_SQL})", name="submission_state"),
    sa.CheckConstraint(f"run_type IN ({_RUN_TYPES_SQL})", name="submission_run_type"),
    sa.CheckConstraint("max_attempts >= 1", name="submission_max_attempts"),
    sa.CheckConstraint("attempts >= 0", name="submission_attempts"),
    sa.CheckConstraint("state <> 'running' OR (lease_owner IS NOT NULL AND "
                       "lease_expires_at IS NOT NULL AND run_id IS NOT NULL)",
                       name="submission_running_has_lease"),
    sa.Index("ix_batch_submissions_due", "state", "due_at"),
    comment="scheduled batch submissions (lazysky batch)",
)

batch_executions = sa.Table(
    "batch_executions",
    metadata,
    sa.Column("execution_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("submission_id", sa.BigInteger,
              sa.ForeignKey("batch_submissions.submission_id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("due_at", sa.DateTime(timezone=True), nullable=False,
              comment="the due time (cron slot) this execution serves"),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("owner", sa.Text, nullable=False, comment="host:pid:token of the run-due"),
    sa.Column("state", sa.Text, nullable=False, server_default="running"),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.CheckConstraint(f"state IN ({_EXEC_STATES_SQL})", name="execution_state"),
    sa.UniqueConstraint("submission_id", "due_at", "attempt", name="execution_once"),
    comment="every execution (attempt) of a batch submission: its history",
)


def _v3_batch_submissions(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[batch_submissions, batch_executions])


#: What happened to production: a run promoted (``promote``), a production run
#: published on finishing (``publish``), or a promotion undone (``rollback``).
PROMOTION_ACTIONS = ("promote", "publish", "rollback")
_ACTIONS_SQL = ", ".join(f"'{a}'" for a in PROMOTION_ACTIONS)

promotions = sa.Table(
    "promotions",
    metadata,
    sa.Column("promotion_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id"), nullable=False,
              comment="the run promoted, published, or whose promotion is rolled back"),
    sa.Column("field", sa.Text, nullable=False),
    sa.Column("tiles", JSONB, nullable=False,
              comment="tile id -> what was production before: {run_id, promotion_id} "
                      "or null"),
    sa.Column("undoes", sa.BigInteger, sa.ForeignKey("promotions.promotion_id"),
              nullable=True, unique=True, comment="the promotion a rollback undoes"),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("by", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.CheckConstraint(f"action IN ({_ACTIONS_SQL})", name="promotion_action"),
    sa.CheckConstraint("(action = 'rollback') = (undoes IS NOT NULL)",
                       name="promotion_rollback_undoes"),
    sa.CheckConstraint("length(reason) > 0", name="promotion_reason"),
    comment="the history of production: promotions, publications and rollbacks",
)

production_tiles = sa.Table(
    "production_tiles",
    metadata,
    sa.Column("field", sa.Text, primary_key=True),
    sa.Column("tile_id", sa.Text, primary_key=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id"), nullable=False),
    sa.Column("promotion_id", sa.BigInteger, sa.ForeignKey("promotions.promotion_id"),
              nullable=False, comment="the promotion that made this run production here"),
    sa.Index("ix_production_tiles_run", "run_id", "tile_id"),
    comment="the production run of every tile of every field: what the *_prod views show",
)


def _v4_production_tiles(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN field TEXT"))
    conn.execute(sa.text("ALTER TABLE runs ADD COLUMN tiles JSONB"))
    conn.execute(sa.text("COMMENT ON COLUMN runs.field IS 'the field the run processes'"))
    conn.execute(sa.text("COMMENT ON COLUMN runs.tiles IS "
                         "'the tiles the run plans to finish (a list of tile ids)'"))
    metadata.create_all(conn, tables=[promotions, production_tiles])
    # production is what production_tiles says, one run per (field, tile): a promotion
    # switches the rows a view shows in one transaction, without copying them; runs of
    # type prod published before v4 become production for the tiles they finished
    conn.execute(sa.text(
        "UPDATE runs SET field = config->'field'->>'name' WHERE field IS NULL"))
    conn.execute(sa.text(
        "CREATE OR REPLACE VIEW runs_prod AS SELECT r.* FROM runs r WHERE r.run_type = 'prod'"))
    finished = conn.execute(sa.text(
        "SELECT run_id, field FROM runs WHERE run_type = 'prod' AND field IS NOT NULL "
        "AND status IN ('done', 'done_with_errors') ORDER BY finished_at, run_id")).all()
    for run_id, field in finished:  # the newest production run of a tile wins
        tiles = [t for (t,) in conn.execute(sa.text(
            "SELECT tile_id FROM run_tiles WHERE run_id = :r AND stage = 'detect-coadd' "
            "ORDER BY tile_id"), {"r": run_id})]
        if not tiles:
            continue
        before = {t: {"run_id": r, "promotion_id": p} for t, r, p in conn.execute(sa.text(
            "SELECT tile_id, run_id, promotion_id FROM production_tiles WHERE field = :f"),
            {"f": field})}
        pid = conn.execute(promotions.insert().values(
            action="publish", run_id=run_id, field=field,
            tiles={t: before.get(t) for t in tiles}, by="schema upgrade v4",
            reason="a production run finished before production tiles existed",
        ).returning(promotions.c.promotion_id)).scalar_one()
        for t in tiles:
            conn.execute(sa.text(
                "INSERT INTO production_tiles (field, tile_id, run_id, promotion_id) "
                "VALUES (:f, :t, :r, :p) ON CONFLICT (field, tile_id) DO UPDATE SET "
                "run_id = excluded.run_id, promotion_id = excluded.promotion_id"),
                {"f": field, "t": t, "r": run_id, "p": pid})
    for table in (coadd_sources, diff_sources):
        conn.execute(sa.text(
            f"CREATE OR REPLACE VIEW {table.name}_prod AS SELECT t.* FROM {table.name} t "
            "JOIN production_tiles p ON p.run_id = t.run_id AND p.tile_id = t.tile_id"))


# --- v5: source tables partitioned by processing type and month ---------------------------
#: Months ahead of the current one whose partitions every schema upgrade creates.
MONTHS_AHEAD = 3


def partition_name(table: str, run_type: str, month: dt.date | None = None) -> str:
    """``coadd_sources__prod`` (a type's partition) or ``coadd_sources__prod__2026_11``."""
    base = f"{table}__{run_type}"
    return base if month is None else f"{base}__{month:%Y_%m}"


def _month(day: dt.date) -> dt.date:
    return day.replace(day=1)


def _next_month(month: dt.date) -> dt.date:
    return (month.replace(day=28) + dt.timedelta(days=4)).replace(day=1)


def ensure_partitions(conn: sa.Connection, months: Sequence[tuple[str, dt.date]], *,
                      cells: bool | None = None) -> list[str]:
    """Create the month partitions ``(run type, any day of the month)`` still missing.

    From schema v14 (``cells`` None: whether the database is at v14 or later) a month
    partition of ``coadd_sources`` is itself split into sky cells, made when the first
    tile lands in them (:mod:`lazysky.catalog.cells`). Idempotent and safe from many
    processes (an advisory lock serialises creators). Returns the names of the
    partitions created.
    """
    wanted = {(t, _month(d)) for t, d in months}
    names = [partition_name(tbl.name, t, m) for tbl in (coadd_sources, diff_sources)
             for t, m in sorted(wanted)]
    have = set(conn.execute(sa.text(
        "SELECT relname FROM pg_class WHERE relname = ANY(:n)"), {"n": names}).scalars())
    if len(have) == len(names):
        return []
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PARTITION_LOCK)))
    have = set(conn.execute(sa.text(
        "SELECT relname FROM pg_class WHERE relname = ANY(:n)"), {"n": names}).scalars())
    if cells is None:
        cells = current_version(conn) >= CELLS_VERSION
    made = []
    for tbl in (coadd_sources, diff_sources):
        for run_type, month in sorted(wanted):
            name = partition_name(tbl.name, run_type, month)
            if name in have:
                continue
            # the partition's bounds fix run_type and run_month; this prefix CHECK ties
            # the rows' run ids to them (a row cannot claim another run's partition) at
            # half the cost of per-row CHECKs computing the keys from run_id
            split = " PARTITION BY RANGE (dec)" if cells and tbl is coadd_sources else ""
            conn.execute(sa.text(
                f"CREATE TABLE {name} PARTITION OF {partition_name(tbl.name, run_type)} "
                f"(CONSTRAINT {name}_run_id CHECK (run_id LIKE '{run_type}-{month:%Y%m}%')) "
                f"FOR VALUES FROM ('{month:%Y-%m-%d}') TO ('{_next_month(month):%Y-%m-%d}')"
                f"{split}"))
            made.append(name)
    if made:
        logger.info("catalog: created partitions %s", ", ".join(made))
    return made


def ensure_upcoming_partitions(conn: sa.Connection, *, today: dt.date | None = None,
                               months_ahead: int = MONTHS_AHEAD) -> list[str]:
    """This month's and the next ``months_ahead`` months' partitions, for every type."""
    month = _month(today or dt.datetime.now(dt.UTC).date())
    wanted = []
    for _ in range(months_ahead + 1):
        wanted += [(t, month) for t in RUN_TYPES]
        month = _next_month(month)
    return ensure_partitions(conn, wanted)


def month_partitions(conn: sa.Connection) -> list[tuple[str, dt.date]]:
    """Every (run type, month) that has month partitions, oldest first."""
    got = conn.execute(sa.text(
        "SELECT c.relname FROM pg_class c WHERE c.relkind IN ('r', 'p') AND c.relispartition "
        "AND c.relname ~ '^coadd_sources__[a-z]+__[0-9]{4}_[0-9]{2}$'"))
    out = set()
    for (name,) in got:
        _, run_type, stamp = str(name).split("__")
        out.add((run_type, dt.date(int(stamp[:4]), int(stamp[5:7]), 1)))
    return sorted(out, key=lambda tm: (tm[1], tm[0]))


def drop_month_partitions(conn: sa.Connection, run_type: str, month: dt.date) -> list[str]:
    """Drop the month partitions of ``run_type`` (both source tables): every row in them
    goes at once, without the cost and bloat of a DELETE. The caller decides that every
    run of that type and month has expired (see :mod:`lazysky.gc`). Returns the names."""
    if run_type not in RUN_TYPES:
        msg = f"run type must be one of {', '.join(RUN_TYPES)}; got {run_type!r}"
        raise ValueError(msg)
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PARTITION_LOCK)))
    dropped = []
    for tbl in (coadd_sources, diff_sources):
        name = partition_name(tbl.name, run_type, _month(month))
        if conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": name}).scalar() is not None:
            conn.execute(sa.text(f"DROP TABLE {name}"))
            dropped.append(name)
    if dropped:
        logger.info("catalog: dropped partitions %s", ", ".join(dropped))
    return dropped


def _production_view_sql(table: sa.Table) -> str:
    """Per type, the production rows; a type with no tile in production is cut at run
    time (a one-time filter), so a production search reads only the partitions of the
    types that hold production (usually ``prod`` alone)."""
    cols = ", ".join(f"t.{c.name}" for c in table.columns)
    parts = [
        f"SELECT {cols} FROM {table.name} t JOIN production_tiles p "
        f"ON p.run_id = t.run_id AND p.tile_id = t.tile_id WHERE t.run_type = '{run_type}' "
        f"AND EXISTS (SELECT 1 FROM production_tiles q WHERE q.run_type = '{run_type}')"
        for run_type in RUN_TYPES
    ]
    return f"CREATE VIEW {table.name}_prod AS " + " UNION ALL ".join(parts)


def _v5_partitioned_sources(conn: sa.Connection) -> None:
    conn.execute(sa.text(
        f"ALTER TABLE production_tiles ADD COLUMN run_type TEXT "
        f"GENERATED ALWAYS AS ({_RUN_TYPE_SQL}) STORED"))
    conn.execute(sa.text(
        "CREATE INDEX ix_production_tiles_type ON production_tiles (run_type)"))
    months = {(str(t), m) for t, m in conn.execute(sa.text(
        f"SELECT DISTINCT {_RUN_TYPE_SQL}, {_RUN_MONTH_SQL} FROM runs"))}
    for table in (coadd_sources, diff_sources):
        name = table.name
        conn.execute(sa.text(f"DROP VIEW {name}_prod"))
        conn.execute(sa.text(f"ALTER TABLE {name} RENAME TO {name}_v4"))
        conn.execute(sa.text(f"ALTER INDEX {name}_pkey RENAME TO {name}_v4_pkey"))
        conn.execute(sa.text(f"ALTER INDEX ix_{name}_pos RENAME TO ix_{name}_v4_pos"))
        table.create(conn)
        for run_type in RUN_TYPES:
            conn.execute(sa.text(
                f"CREATE TABLE {partition_name(name, run_type)} PARTITION OF {name} "
                f"FOR VALUES IN ('{run_type}') PARTITION BY RANGE (run_month)"))
    ensure_partitions(conn, sorted(months))
    ensure_upcoming_partitions(conn)
    for table in (coadd_sources, diff_sources):
        name = table.name
        cols = [c.name for c in table.columns
                if c.name not in ("pos", "run_type", "run_month")]
        listed = ", ".join(cols)
        conn.execute(sa.text(
            f"INSERT INTO {name} ({listed}, run_type, run_month) "
            f"SELECT {listed}, {_RUN_TYPE_SQL}, {_RUN_MONTH_SQL} FROM {name}_v4"))
        conn.execute(sa.text(f"DROP TABLE {name}_v4"))
        conn.execute(sa.text(_production_view_sql(table)))
        conn.execute(sa.text(f"ANALYZE {name}"))


# v6 made a deduplicated btree ``ix_coadd_sources_run_tile`` on (run_id, tile_id) (see
# _v6_coadd_run_tile_index); v12 replaced it by a BRIN index and the source_tiles ledger
# (see _v12_brin_run_tile). Neither is declared on the Table: the migrations make them.


def _v6_coadd_run_tile_index(conn: sa.Connection) -> None:
    """Replace coadd_sources' primary key by a non-unique index on (run_id, tile_id).

    The primary key (run_id, tile_id, number) cost 11–13 % of a loading backend's CPU
    (interleaved A/Bs in docs/catalog.md): one entry of ~70 bytes per row. The replace path
    (:func:`lazysky.catalog.write_sources`) needs only "the rows of this (run, tile)",
    which a btree on (run_id, tile_id) finds; its equal keys are deduplicated into
    posting lists (~16x smaller). ``number`` stays unique within a (run, tile) because
    that writer is the only one: it replaces the whole (run, tile) under an advisory
    lock and refuses duplicate numbers. ``diff_sources`` keeps its primary key (the
    association of difference sources may reference it). On the partitioned table (v5)
    the index and the dropped key cascade to every partition, and partitions made later
    inherit the index; the key stays able to include the partition keys should a
    unique constraint come back.

    The table's metadata above still declares the primary key (with the partition keys):
    migration 5 creates it so, and this step replaces it.
    """
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_coadd_sources_run_tile "
                         "ON coadd_sources (run_id, tile_id)"))
    conn.execute(sa.text(
        "ALTER TABLE coadd_sources DROP CONSTRAINT IF EXISTS coadd_sources_pkey"))


#: States of a run being collected (lazysky.gc): ``expiring`` once its catalog rows are
#: going (a rerun finishes it), ``expired`` once its rows and products are gone.
EXPIRY_STATES = ("expiring", "expired")
_EXPIRY_SQL = ", ".join(f"'{s}'" for s in EXPIRY_STATES)

run_expiry = sa.Table(
    "run_expiry",
    metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id"), primary_key=True),
    sa.Column("state", sa.Text, nullable=False, server_default="expiring"),
    sa.Column("reason", sa.Text, nullable=False, comment="which retention it outlived"),
    sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0",
              comment="bytes of its Zarr products when collection began"),
    sa.Column("rows", JSONB, nullable=False, server_default="{}",
              comment="table -> catalog rows deleted"),
    sa.Column("by", sa.Text, nullable=False),
    sa.Column("marked_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint(f"state IN ({_EXPIRY_SQL})", name="run_expiry_state"),
    sa.CheckConstraint("(state = 'expired') = (expired_at IS NOT NULL)",
                       name="run_expiry_expired_at"),
    comment="runs collected by lazysky gc; the runs row stays as a tombstone for lineage",
)


def _v7_run_expiry(conn: sa.Connection) -> None:
    run_expiry.create(conn)


#: How a workflow version became active for a processing type (lazysky.workflows).
WORKFLOW_ACTIONS = ("activate", "promote", "rollback")
_WF_ACTIONS_SQL = ", ".join(f"'{a}'" for a in WORKFLOW_ACTIONS)
#: What a workflow version's name may be (also its spelling in run configurations).
WORKFLOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

workflow_versions = sa.Table(
    "workflow_versions",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("steps", JSONB, nullable=False, comment="every step's parameters, validated"),
    sa.Column("software_version", sa.Text, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False,
              comment="of the canonical JSON of steps and software version"),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.Column("registered_by", sa.Text, nullable=False),
    sa.CheckConstraint(f"name ~ '{WORKFLOW_NAME_PATTERN}'", name="workflow_name_form"),
    sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="workflow_sha256_form"),
    sa.Index("ix_workflow_versions_sha256", "sha256"),
    comment="named, immutable pipeline configurations (a trigger refuses changes)",
)

workflow_activations = sa.Table(
    "workflow_activations",
    metadata,
    sa.Column("activation_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("run_type", sa.Text, nullable=False),
    sa.Column("version", sa.Text, sa.ForeignKey("workflow_versions.name"), nullable=False,
              comment="the version active for run_type from this row on"),
    sa.Column("previous", sa.Text, sa.ForeignKey("workflow_versions.name"), nullable=True,
              comment="the version active before"),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("undoes", sa.BigInteger, sa.ForeignKey("workflow_activations.activation_id"),
              nullable=True, unique=True, comment="the activation a rollback undoes"),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("by", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.CheckConstraint(f"run_type IN ({_RUN_TYPES_SQL})", name="activation_run_type"),
    sa.CheckConstraint(f"action IN ({_WF_ACTIONS_SQL})", name="activation_action"),
    sa.CheckConstraint("(action = 'rollback') = (undoes IS NOT NULL)",
                       name="activation_rollback_undoes"),
    sa.CheckConstraint("version IS DISTINCT FROM previous", name="activation_changes"),
    sa.CheckConstraint("length(reason) > 0", name="activation_reason"),
    sa.Index("ix_workflow_activations_type", "run_type", "activation_id"),
    comment="history of the active workflow version per processing type: the newest "
            "row of a type names its active version",
)

canary_runs = sa.Table(
    "canary_runs",
    metadata,
    sa.Column("execution_id", sa.BigInteger,
              sa.ForeignKey("batch_executions.execution_id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("run_id", sa.Text, nullable=False, comment="the run of the active version"),
    sa.Column("version", sa.Text, sa.ForeignKey("workflow_versions.name"), nullable=True,
              comment="the version that run runs (NULL: explicit steps)"),
    sa.Column("canary_run_id", sa.Text, nullable=False, comment="the candidate's run"),
    sa.Column("canary_version", sa.Text, sa.ForeignKey("workflow_versions.name"),
              nullable=False),
    sa.Column("share", sa.Float(53), nullable=False, comment="percent of science exposures"),
    sa.CheckConstraint("share >= 0 AND share <= 100", name="canary_share_range"),
    comment="the two runs of a batch execution split by a canary",
)


def _v8_workflow_versions(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[workflow_versions, workflow_activations, canary_runs])
    # versions and their activation history are immutable: refused in the database too,
    # so no client (psql included) can change what a past run ran
    conn.execute(sa.text("""
        CREATE OR REPLACE FUNCTION lazysky_refuse_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused (register a new workflow '
                'version, or activate or roll back, instead)', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'integrity_constraint_violation';
        END $$"""))
    for table in ("workflow_versions", "workflow_activations"):
        conn.execute(sa.text(
            f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION lazysky_refuse_change()"))
    # the active version per type: the newest activation of that type (one by construction)
    conn.execute(sa.text(
        "CREATE OR REPLACE VIEW workflow_active AS SELECT DISTINCT ON (run_type) run_type, "
        "version, activation_id, at, by, reason FROM workflow_activations "
        "ORDER BY run_type, activation_id DESC"))


tile_qa = sa.Table(
    "tile_qa",
    metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("product", sa.Text, primary_key=True,
              comment="product name: the reference coadd (deep1) or an epoch (deep1-v2)"),
    sa.Column("tile_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False, comment="coadd (reference) or diff (epoch)"),
    sa.Column("psf_fwhm_px", sa.Float(53), nullable=True),
    sa.Column("psf_fwhm_arcsec", sa.Float(53), nullable=True),
    sa.Column("psf_beta", sa.Float(53), nullable=True),
    sa.Column("psf_n_stars", sa.Integer, nullable=False, server_default="0"),
    sa.Column("psf_source", sa.Text, nullable=False, server_default="qa-fit"),
    sa.Column("background", sa.Float(53), nullable=True, comment="image units"),
    sa.Column("background_rms", sa.Float(53), nullable=True, comment="image units"),
    sa.Column("astrometric_offset_px", sa.Float(53), nullable=True),
    sa.Column("astrometric_rms_px", sa.Float(53), nullable=True),
    sa.Column("astrometric_n_stars", sa.Integer, nullable=False, server_default="0"),
    sa.Column("score_std", sa.Float(53), nullable=True, comment="S_corr, source-free"),
    sa.Column("n_detections", sa.Integer, nullable=False, server_default="0"),
    sa.Column("limiting_mag", sa.Float(53), nullable=True, comment="5 sigma point source"),
    sa.Column("zeropoint_mag", sa.Float(53), nullable=True,
              comment="NULL: instrumental magnitudes (counts per frame)"),
    sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("reasons", JSONB, nullable=False, server_default="[]",
              comment="why the tile is flagged (thresholds exceeded)"),
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.CheckConstraint("kind IN ('coadd', 'diff')", name="tile_qa_kind"),
    comment="per-tile science QA of a run (lazysky.pipeline.qa, docs/qa.md)",
)


def _v9_tile_qa(conn: sa.Connection) -> None:
    tile_qa.create(conn)
# --- association across epochs (lazysky.associate) ------------------------------------
objects = sa.Table(
    "objects",
    metadata,
    sa.Column("object_id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id", ondelete="CASCADE"),
              nullable=False),
    sa.Column("number", sa.Integer, nullable=False,
              comment="1-based within the run, ordered by first detection"),
    sa.Column("ra", sa.Float(53), nullable=False, comment="deg, weighted mean"),
    sa.Column("dec", sa.Float(53), nullable=False, comment="deg, weighted mean"),
    sa.Column("pos", SPointType(), sa.Computed(_POS_EXPR, persisted=True), nullable=False),
    sa.Column("pos_err", sa.Float(53), nullable=False,
              comment="arcsec, error of the mean position"),
    sa.Column("first_mjd", sa.Float(53), nullable=False, comment="first detection"),
    sa.Column("last_mjd", sa.Float(53), nullable=False, comment="last detection"),
    sa.Column("n_detections", sa.Integer, nullable=False),
    sa.Column("n_epochs", sa.Integer, nullable=False, comment="epochs with a detection"),
    sa.Column("max_snr", sa.Float(53), nullable=True, comment="largest |snr| detected"),
    sa.CheckConstraint("ra >= 0 AND ra < 360", name="objects_ra_range"),
    sa.CheckConstraint("dec >= -90 AND dec <= 90", name="objects_dec_range"),
    sa.CheckConstraint("n_detections > 0 AND n_epochs > 0", name="objects_detected"),
    sa.CheckConstraint("first_mjd <= last_mjd", name="objects_mjd_order"),
    sa.UniqueConstraint("run_id", "number", name="objects_run_number"),
    sa.Index("ix_objects_pos", "pos", postgresql_using="gist"),
    comment="difference-image sources associated across epochs (one run)",
)

object_detections = sa.Table(
    "object_detections",
    metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("tile_id", sa.Text, primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("object_id", sa.BigInteger,
              sa.ForeignKey("objects.object_id", ondelete="CASCADE"), nullable=False),
    # no foreign key into diff_sources: it is partitioned (v5) and its month partitions
    # are dropped whole (lazysky gc); a run's links go with its objects, which
    # lazysky.associate replaces after every detection of the run
    sa.Index("ix_object_detections_object", "object_id"),
    comment="which object each difference-image source (run_id, tile_id, number) belongs to",
)

forced_photometry = sa.Table(
    "forced_photometry",
    metadata,
    sa.Column("object_id", sa.BigInteger,
              sa.ForeignKey("objects.object_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("exposure_id", sa.Text, sa.ForeignKey("exposures.exposure_id"),
              primary_key=True, comment="the epoch's first exposure"),
    sa.Column("epoch", sa.Text, nullable=False, comment="e.g. v2"),
    sa.Column("mjd", sa.Float(53), nullable=False),
    sa.Column("tile_id", sa.Text, nullable=False),
    sa.Column("flux", sa.Float(53), nullable=True,
              comment="PSF-weighted flux on the difference image (NaN: masked)"),
    sa.Column("fluxerr", sa.Float(53), nullable=True, comment="from the variance plane"),
    sa.Column("flags", sa.Integer, nullable=False, server_default="0"),
    sa.Column("detected", sa.Boolean, nullable=False,
              comment="a difference-image source of this object is in this epoch"),
    comment="forced photometry of every object on every epoch's difference image",
)


def _v10_objects(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[objects, object_detections, forced_photometry])


@dataclass(frozen=True)
class Migration:
    """One step of the schema's history."""

    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _v11_spoint_opclass(conn: sa.Connection) -> None:
    """Rebuild the source tables' GiST indexes on ``pos`` with lazysky's operator class.

    :data:`lazysky.catalog._gist.OPCLASS` is pgSphere's default GiST class for ``spoint``
    without its no-op decompress function, which PostgreSQL called once for every index
    entry an insert weighs (~5 % of a loading backend's CPU; interleaved A/B in
    docs/catalog.md). Same keys, same operators: cone searches and cross-matches plan and
    answer as before. Dropped and made again in this transaction (so the partitions'
    index names stay); partitions made later inherit the class. Without a superuser, or
    with a pgSphere whose class already lacks decompress, nothing changes.
    """
    opclass = ensure_spoint_opclass(conn)
    if opclass is None:
        return
    for table in (coadd_sources, diff_sources):
        name = f"ix_{table.name}_pos"
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
        conn.execute(sa.text(f"CREATE INDEX {name} ON {table.name} USING gist (pos {opclass})"))


#: Heap pages summarised by one entry of the BRIN index on coadd_sources (run_id, tile_id)
#: (v12): 128 pages = 1 MB, about half a tile of 10 000 rows (~2 MB of heap).
RUN_TILE_BRIN_PAGES = 128

source_tiles = sa.Table(
    "source_tiles",
    metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.run_id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("source_table", sa.Text, primary_key=True,
              comment="coadd_sources or diff_sources"),
    sa.Column("tile_id", sa.Text, primary_key=True),
    sa.Column("rows", sa.Integer, nullable=False, comment="rows the last write inserted"),
    sa.Column("written_at", sa.DateTime(timezone=True), nullable=False,
              server_default=sa.func.now()),
    sa.CheckConstraint("source_table IN ('coadd_sources', 'diff_sources')",
                       name="source_tiles_table"),
    comment="every (run, tile) write_sources has written, per source table, committed with "
            "its rows: a write whose (run, tile) is not here has nothing to replace",
)


#: Distinct tile ids one BRIN range is sized for (its Bloom filter's capacity): a range
#: of 128 pages (~4 900 rows) holds parts of 1–4 tiles when writers run in parallel.
RUN_TILE_BLOOM_DISTINCT = 16


def run_tile_brin_sql(conn: sa.Connection, *, name: str = "ix_coadd_sources_run_tile_brin",
                      pages: int = RUN_TILE_BRIN_PAGES) -> str:
    """``CREATE INDEX`` of v12's BRIN on coadd_sources (run_id, tile_id).

    ``run_id`` is summarised by min/max (runs come in time order); ``tile_id`` by a Bloom
    filter (``text_bloom_ops``, PostgreSQL ≥ 14), because parallel writers interleave the
    pages of tiles far apart in name order, which min/max would smear over the whole
    range between them (interleaved A/B in docs/catalog.md: a loaded tile read in 14 ms
    against 37 ms with min/max at 2 M rows, the same cost to write). On a server without
    Bloom BRIN, min/max for both.
    """
    bloom = conn.execute(sa.text(
        "SELECT 1 FROM pg_opclass WHERE opcname = 'text_bloom_ops'")).first() is not None
    tile = (f"tile_id text_bloom_ops(n_distinct_per_range = {RUN_TILE_BLOOM_DISTINCT})"
            if bloom else "tile_id")
    return (f"CREATE INDEX IF NOT EXISTS {name} ON coadd_sources USING brin (run_id, {tile}) "
            f"WITH (pages_per_range = {pages})")


def _v12_brin_run_tile(conn: sa.Connection) -> None:
    """coadd_sources: a BRIN index on (run_id, tile_id) instead of the v6 btree, and the
    ``source_tiles`` ledger.

    The btree cost 12.5–18 % of a loading backend's CPU (one entry per row). A tile's rows
    are appended contiguously by one COPY, and runs come in time order, so a BRIN index
    (one summary per :data:`RUN_TILE_BRIN_PAGES` heap pages: min/max of ``run_id``, a
    Bloom filter of ``tile_id``; see :func:`run_tile_brin_sql`) finds a run's or a
    tile's rows with a few heap ranges too; ranges not summarised yet are always scanned,
    so the writer summarises the ranges it filled after each commit (``autosummarize``
    is off: at bulk-load rates autovacuum's queue of requests overflows). So that the
    writer's DELETE, which would read that unsummarised tail (and, on a (run, tile) never
    written, find nothing), runs only when there is something to replace, every write
    records its (table, run, tile) in ``source_tiles`` in the same transaction as its
    rows (:func:`lazysky.catalog.write_sources`): a (run, tile) not in the ledger has no
    rows, and its DELETE is skipped. The ledger is filled here from the rows already in
    both source tables. ``diff_sources`` keeps its primary key.
    """
    source_tiles.create(conn)
    for table in (coadd_sources, diff_sources):
        conn.execute(sa.text(
            f"INSERT INTO source_tiles (run_id, source_table, tile_id, rows) "
            f"SELECT run_id, '{table.name}', tile_id, count(*) FROM {table.name} "
            f"GROUP BY run_id, tile_id"))
    conn.execute(sa.text(run_tile_brin_sql(conn)))
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_coadd_sources_run_tile"))


def _v13_spoint_binary_input(conn: sa.Connection) -> None:
    """Declare a binary input function for ``spoint`` (one that refuses every value).

    Binary ``COPY`` needs one for every column of its target, the generated ``pos``
    included; with it, :func:`lazysky.catalog.write_sources` COPYs rows straight into
    the source tables instead of through a staging table (see
    :mod:`lazysky.catalog._binary`). Without a superuser nothing changes.
    """
    ensure_spoint_receive(conn)


#: The schema version from which new month partitions of coadd_sources are split into cells.
CELLS_VERSION = 14


def _v14_sky_cells(conn: sa.Connection) -> None:
    """Split the month partitions of ``coadd_sources`` into sky cells, from now on.

    New months are made split (:func:`ensure_partitions`); the months made ahead that
    are still empty are made again, split; a month that holds rows stays as it is (no
    row moves). See :mod:`lazysky.catalog.cells`.
    """
    for statement in CELL_FUNCTIONS_SQL:  # lazysky_ensure_cell, for every writer role
        conn.execute(sa.text(statement))
    remade = []
    for run_type, month in month_partitions(conn):
        name = partition_name(coadd_sources.name, run_type, month)
        kind = conn.execute(sa.text("SELECT relkind::text FROM pg_class "
                                    "WHERE oid = to_regclass(:n)"), {"n": name}).scalar()
        if kind != "r" or conn.execute(sa.text(f"SELECT EXISTS (SELECT 1 FROM {name})")
                                       ).scalar():
            continue
        conn.execute(sa.text(f"DROP TABLE {name}"))
        remade.append((run_type, month))
    ensure_partitions(conn, remade, cells=True)
    if remade:
        logger.info("catalog: %d empty month partition(s) of coadd_sources made again, "
                    "split into sky cells", len(remade))


#: The schema's history; append new steps, never edit applied ones.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, exposures, coadd and difference sources, production views",
              _v1_create),
    Migration(2, "runs: errors and status done_with_errors; run_tiles for resumable runs",
              _v2_run_errors_and_tiles),
    Migration(3, "batch submissions and their executions (lazysky batch)",
              _v3_batch_submissions),
    Migration(4, "production tiles and promotions: production views switch per tile",
              _v4_production_tiles),
    Migration(5, "source tables partitioned by processing type and month",
              _v5_partitioned_sources),
    Migration(6, "coadd_sources: (run_id, tile_id) index instead of the primary key",
              _v6_coadd_run_tile_index),
    Migration(7, "run_expiry: runs collected by lazysky gc (retention)", _v7_run_expiry),
    Migration(8, "workflow versions, their activations per type, canary runs",
              _v8_workflow_versions),
    Migration(9, "tile_qa: per-tile science QA of a run", _v9_tile_qa),
    Migration(10, "objects: difference sources associated across epochs, forced photometry",
              _v10_objects),
    Migration(11, "source positions: GiST operator class without pgSphere's no-op decompress",
              _v11_spoint_opclass),
    Migration(12, "coadd_sources: BRIN on (run_id, tile_id) instead of the btree; "
                  "source_tiles ledger of written (run, tile)s", _v12_brin_run_tile),
    Migration(13, "spoint: a (refusing) binary input function, for binary COPY straight "
                  "into the source tables", _v13_spoint_binary_input),
    Migration(14, "coadd_sources: new month partitions split into sky cells (Dec bands, "
                  "then RA slabs), made as tiles land", _v14_sky_cells),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
LOCK_KEY = 0x6C617A79  # 'lazy': the advisory lock serialising upgrades


def current_version(conn: sa.Connection) -> int:
    """The schema version of the connected database (0 when empty)."""
    if conn.execute(sa.text("SELECT to_regclass('lazysky_schema')")).scalar() is None:
        return 0
    got = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(got or 0)


def apply_up_to(conn: sa.Connection, version: int) -> None:
    """Make an empty database what ``version`` made (the upgrade tests start there)."""
    schema_version.create(conn, checkfirst=True)
    for step in MIGRATIONS:
        if current_version(conn) < step.version <= version:
            step.apply(conn)
            conn.execute(schema_version.insert().values(
                version=step.version, description=step.description))


def upgrade(engine: sa.Engine) -> int:
    """Apply the missing migrations; returns the schema version now in force.

    Idempotent, and safe from many processes at once (an advisory lock serialises
    them). Needs pgSphere in the database (see :func:`lazysky.catalog.open_catalog`).
    """
    with engine.begin() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LOCK_KEY)))
        schema_version.create(conn, checkfirst=True)
        have = current_version(conn)
        for step in MIGRATIONS:
            if step.version > have:
                logger.info("catalog schema: applying v%d (%s)", step.version,
                            step.description)
                step.apply(conn)
                conn.execute(schema_version.insert().values(
                    version=step.version, description=step.description))
        ensure_upcoming_partitions(conn)  # next months' partitions, ahead of time
    return SCHEMA_VERSION

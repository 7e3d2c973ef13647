"""Scheduled batch submissions: run configurations queued in the catalog (``lazysky batch``).

A **submission** is a validated run configuration waiting in the catalog database
(table ``batch_submissions``, schema v3) until it is due: once (now, or ``at`` a time) or
recurring (``cron``, five fields, UTC). ``run_due`` — what the Kubernetes CronJob runs —
claims the submissions that are due, one at a time, and runs each with
:func:`lazysky.runner.run`.

States: ``queued → running → completed | completed-with-errors | failed``, or
``cancelled``. A recurring submission goes back to ``queued`` (due at its next cron time)
after each execution; every execution (attempt) is kept in ``batch_executions`` with its
due time, attempt, run id, owner, timings, state and error: the submission's history.

**Exactly once.** A claim is one transaction that picks a due row ``FOR UPDATE SKIP
LOCKED``, so two ``run-due`` processes never take the same submission. The claimer holds
a **lease** (``lease_expires_at``) renewed by a heartbeat thread while the run goes on.
A ``run-due`` killed mid-run stops renewing; once the lease has expired the submission is
taken again, with the *same run id*, so the runner resumes it (tiles done are skipped)
and it ends with exactly the rows of a clean run. A failed attempt is retried (same run
id) by the next ``run-due`` until ``max_attempts``; then the submission is ``failed``.
Every update of a running submission is conditional on still holding its lease, so a
process that lost its lease never overwrites its successor's state.

Examples
--------
>>> from lazysky import batch
>>> sub = batch.submit("nightly.yaml", cron="0 3 * * *", run_type="prod")  # doctest: +SKIP
>>> [e.state for e in batch.run_due()]  # doctest: +SKIP
['completed']
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from lazysky.catalog.schema import (
    SUBMISSION_STATES,
    batch_executions,
    batch_submissions,
)
from lazysky.config import Settings, load_settings
from lazysky.errors import ConfigError, ParameterError
from lazysky.runconfig import RunConfig, load_run_config

__all__ = [
    "SUBMISSION_STATES",
    "Execution",
    "Submission",
    "cancel",
    "claim",
    "execute",
    "get_submission",
    "list_submissions",
    "next_cron_time",
    "parse_at",
    "run_due",
    "submit",
    "validate_cron",
]

logger = logging.getLogger(__name__)

SUBMIT_TYPES = ("prod", "exp", "test", "val", "repr")
TERMINAL = ("completed", "completed-with-errors", "failed", "cancelled")
DEFAULT_LEASE_SECONDS = 300.0
_RESULT = {"done": "completed", "done_with_errors": "completed-with-errors"}


@dataclass(frozen=True)
class Execution:
    """One execution (attempt) of a submission, as recorded in ``batch_executions``."""

    execution_id: int
    submission_id: int
    due_at: dt.datetime
    attempt: int
    run_id: str
    owner: str
    state: str
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    finished_at: dt.datetime | None
    error: str | None


@dataclass(frozen=True)
class Submission:
    """A batch submission and (from :func:`get_submission`) its executions, oldest first."""

    submission_id: int
    run_type: str
    config: Mapping[str, Any]
    source: str
    cron: str | None
    state: str
    due_at: dt.datetime
    attempts: int
    max_attempts: int
    run_id: str | None
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    submitted_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    error: str | None
    executions: tuple[Execution, ...] = field(default=())

    def __str__(self) -> str:
        when = f"cron '{self.cron}' (UTC)" if self.cron else "once"
        lines = [
            f"submission {self.submission_id}: {self.state}",
            f"  type        {self.run_type}, {when}, from {self.source or '(mapping)'}",
            f"  due         {self.due_at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC",
            f"  attempts    {self.attempts} of {self.max_attempts}",
            f"  run         {self.run_id or '-'}",
        ]
        if self.state == "running":
            lines.append(f"  lease       {self.lease_owner} until "
                         f"{self.lease_expires_at:%Y-%m-%d %H:%M:%S %z}")
        if self.error:
            lines.append(f"  error       {self.error}")
        for e in self.executions:
            took = (f"{(e.finished_at - e.started_at).total_seconds():.0f} s"
                    if e.finished_at else "…")
            lines.append(f"  execution {e.execution_id}: due "
                         f"{e.due_at.astimezone(dt.UTC):%Y-%m-%d %H:%M} "
                         f"attempt {e.attempt} {e.state} ({took}) run {e.run_id}"
                         + (f": {e.error}" if e.error else ""))
        return "\n".join(lines)


# --- validation (pure) ---------------------------------------------------------------
def validate_cron(expr: str) -> str:
    """Check a five-field cron expression (minute hour day-of-month month day-of-week).

    Returns the expression normalised (single spaces). Times are UTC.

    Raises
    ------
    ParameterError
        The expression is not five fields or a field is out of range (the message names
        the field).

    Examples
    --------
    >>> validate_cron("0  3 * * *")
    '0 3 * * *'
    """
    from cronsim import CronSim, CronSimError

    parts = str(expr).split()
    if len(parts) != 5:
        msg = (f"cron: {expr!r} has {len(parts)} field(s); expected 5 (minute hour "
               "day-of-month month day-of-week, UTC), e.g. '0 3 * * *' for 03:00 every day")
        raise ParameterError(msg)
    try:
        CronSim(" ".join(parts), dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    except CronSimError as exc:
        msg = (f"cron: {expr!r} is not a valid cron expression ({exc}); expected 5 fields "
               "minute (0-59) hour (0-23) day-of-month (1-31) month (1-12) "
               "day-of-week (0-7), e.g. '0 3 * * *'")
        raise ParameterError(msg) from None
    return " ".join(parts)


def next_cron_time(expr: str, after: dt.datetime) -> dt.datetime:
    """The first time strictly after ``after`` (UTC) that ``expr`` fires.

    Examples
    --------
    >>> next_cron_time("0 3 * * *", dt.datetime(2026, 11, 24, 3, 0, tzinfo=dt.UTC))
    datetime.datetime(2026, 11, 25, 3, 0, tzinfo=datetime.timezone.utc)
    """
    from cronsim import CronSim

    start = after.astimezone(dt.UTC).replace(microsecond=0)
    return next(CronSim(validate_cron(expr), start))


def parse_at(value: str | dt.datetime, *, what: str = "at") -> dt.datetime:
    """A time (UTC) from ISO 8601 text or a datetime; a time without a zone is UTC.

    The one parser of times in lazysky (a batch's due time, gc's ``--now``); ``what``
    names the parameter in the error.

    Raises
    ------
    ParameterError
        Not an ISO 8601 date or time.

    Examples
    --------
    >>> parse_at("2026-11-25T03:00")
    datetime.datetime(2026, 11, 25, 3, 0, tzinfo=datetime.timezone.utc)
    """
    if isinstance(value, dt.datetime):
        when = value
    else:
        try:
            when = dt.datetime.fromisoformat(str(value).strip())
        except ValueError:
            msg = (f"{what} must be an ISO 8601 date or time such as 2026-11-25, "
                   f"2026-11-25T03:00 (UTC) or 2026-11-25T03:00+01:00, got {value!r}")
            raise ParameterError(msg) from None
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _check_config(config: RunConfig | str | os.PathLike[str] | Mapping[str, Any],
                  run_type: str | None, *, recurring: bool) -> tuple[RunConfig, str]:
    source = "" if isinstance(config, RunConfig | Mapping) else str(config)
    cfg = config if isinstance(config, RunConfig) else load_run_config(
        dict(config) if isinstance(config, Mapping) else config)
    where = source or "the run configuration"
    if run_type is not None:
        if run_type not in SUBMIT_TYPES:
            msg = f"type must be one of {', '.join(SUBMIT_TYPES)}; got {run_type!r}"
            raise ParameterError(msg)
        cfg = cfg.model_copy(update={"type": run_type})
    if cfg.run_id is not None:
        from lazysky.runs import parse_run_id

        if recurring:
            msg = (f"{where}: run_id: a recurring submission starts a new run at every "
                   "execution; remove run_id (or submit once to resume that run)")
            raise ConfigError(msg)
        if parse_run_id(cfg.run_id).type != cfg.type:
            msg = (f"{where}: run_id {cfg.run_id} is of type "
                   f"{parse_run_id(cfg.run_id).type}, the submission's type is {cfg.type}")
            raise ConfigError(msg)
    # the whole configuration must still validate as submitted (JSON round trip)
    load_run_config(cfg.model_dump(mode="json"))
    return cfg, source


# --- the queue -----------------------------------------------------------------------
def _catalog(catalog: Any, settings: Settings | None) -> Any:
    if catalog is not None:
        return catalog
    from lazysky.catalog import open_catalog

    return open_catalog(settings if settings is not None else load_settings())


def submit(
    config: RunConfig | str | os.PathLike[str] | Mapping[str, Any],
    *,
    at: str | dt.datetime | None = None,
    cron: str | None = None,
    run_type: str | None = None,
    max_attempts: int = 3,
    catalog: Any = None,
    settings: Settings | None = None,
) -> Submission:
    """Queue a run configuration; validated now, so nothing bad is queued.

    Parameters
    ----------
    config
        A run configuration: a YAML file, a mapping or a :class:`RunConfig`.
    at
        Due once at this time (ISO 8601; no zone = UTC). Default: now.
    cron
        Due at every time this five-field cron expression (UTC) fires; the first
        execution is at the next firing after now.
    run_type
        The run type (``prod``, ``exp``, …); default: the configuration's ``type``.
    max_attempts
        Attempts per due time before the submission (or that cron slot) is ``failed``.
    catalog, settings
        The catalog to queue in (default: :func:`lazysky.catalog.open_catalog`).

    Returns
    -------
    Submission

    Raises
    ------
    ConfigError
        The configuration is unreadable or invalid (the message names file and field).
    ParameterError
        ``at`` and ``cron`` together, a bad cron expression or time, ``max_attempts`` < 1.

    Examples
    --------
    >>> submit("run.yaml", at="2026-11-25T03:00")  # doctest: +SKIP
    """
    if at is not None and cron is not None:
        msg = "give either at (once, at a time) or cron (recurring), not both"
        raise ParameterError(msg)
    if not isinstance(max_attempts, int) or max_attempts < 1:
        msg = f"max_attempts must be an integer >= 1; got {max_attempts!r}"
        raise ParameterError(msg)
    expr = validate_cron(cron) if cron is not None else None
    due = parse_at(at) if at is not None else None
    cfg, source = _check_config(config, run_type, recurring=expr is not None)
    cat = _catalog(catalog, settings)
    from lazysky.workflows import check_config  # workflow versions, canary (issue 13)

    check_config(cfg, catalog=cat)
    now = sa.func.now()
    with cat.engine().begin() as conn:
        if expr is not None:
            db_now = conn.execute(sa.select(now)).scalar_one()
            due = next_cron_time(expr, db_now)
        new_id = conn.execute(batch_submissions.insert().values(
            run_type=cfg.type, config=cfg.model_dump(mode="json"), source=source, cron=expr,
            state="queued", due_at=due if due is not None else now,
            max_attempts=max_attempts, run_id=cfg.run_id,
        ).returning(batch_submissions.c.submission_id)).scalar_one()
    logger.info("queued submission %d (%s)", new_id, expr or "once")
    return get_submission(new_id, catalog=cat)


def _submission(row: Any, executions: Sequence[Any] = ()) -> Submission:
    values = {k: getattr(row, k) for k in Submission.__dataclass_fields__ if k != "executions"}
    return Submission(**values, executions=tuple(
        Execution(**{k: getattr(e, k) for k in Execution.__dataclass_fields__})
        for e in executions))


def get_submission(submission_id: int, *, catalog: Any = None,
                   settings: Settings | None = None) -> Submission:
    """One submission with its executions (oldest first).

    Raises
    ------
    ParameterError
        No submission has that id.

    Examples
    --------
    >>> print(get_submission(7))  # doctest: +SKIP
    submission 7: completed
    """
    cat = _catalog(catalog, settings)
    with cat.engine().connect() as conn:
        row = conn.execute(sa.select(batch_submissions).where(
            batch_submissions.c.submission_id == int(submission_id))).one_or_none()
        if row is None:
            msg = (f"no batch submission {submission_id}; `lazysky batch list --all` shows "
                   "every submission")
            raise ParameterError(msg)
        runs = conn.execute(sa.select(batch_executions).where(
            batch_executions.c.submission_id == row.submission_id).order_by(
            batch_executions.c.execution_id)).all()
    return _submission(row, runs)


def list_submissions(*, states: Sequence[str] | None = None, catalog: Any = None,
                     settings: Settings | None = None) -> list[Submission]:
    """Submissions, oldest first; only those in ``states`` when given.

    Raises
    ------
    ParameterError
        An unknown state (the message lists the allowed ones).

    Examples
    --------
    >>> [s.submission_id for s in list_submissions(states=["failed"])]  # doctest: +SKIP
    [3]
    """
    query = sa.select(batch_submissions).order_by(batch_submissions.c.submission_id)
    if states is not None:
        bad = sorted(set(states) - set(SUBMISSION_STATES))
        if bad:
            msg = f"state must be among {', '.join(SUBMISSION_STATES)}; got {bad}"
            raise ParameterError(msg)
        query = query.where(batch_submissions.c.state.in_(list(states)))
    cat = _catalog(catalog, settings)
    with cat.engine().connect() as conn:
        return [_submission(r) for r in conn.execute(query).all()]


def cancel(submission_id: int, *, catalog: Any = None,
           settings: Settings | None = None) -> Submission:
    """Cancel a submission: it is never started (or retried, or rescheduled) again.

    A run already going on is not interrupted: it ends on its own, recorded in its
    execution and its ``runs`` row; the submission stays ``cancelled``.

    Raises
    ------
    ParameterError
        No such submission, or it has already ended (completed, failed, cancelled).

    Examples
    --------
    >>> cancel(7).state  # doctest: +SKIP
    'cancelled'
    """
    cat = _catalog(catalog, settings)
    with cat.engine().begin() as conn:
        state = conn.execute(sa.select(batch_submissions.c.state).where(
            batch_submissions.c.submission_id == int(submission_id))
            .with_for_update()).scalar_one_or_none()
        if state is None:
            get_submission(submission_id, catalog=cat)  # raises the not-found error
        if state in TERMINAL:
            msg = (f"submission {submission_id} is already {state}; only a queued or "
                   "running submission can be cancelled")
            raise ParameterError(msg)
        conn.execute(batch_submissions.update().where(
            batch_submissions.c.submission_id == int(submission_id)).values(
            state="cancelled", finished_at=sa.func.now(), lease_owner=None,
            lease_expires_at=None))
    return get_submission(submission_id, catalog=cat)


# --- claiming, the lease, executing ------------------------------------------------------
def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _lease(seconds: float) -> Any:
    return sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, float(seconds))


def claim(*, owner: str, lease_seconds: float = DEFAULT_LEASE_SECONDS,
          catalog: Any = None, settings: Settings | None = None) -> Execution | None:
    """Claim the submission that is due first, exactly once; None when nothing is due.

    Due: ``queued`` with ``due_at`` passed, or ``running`` with an expired lease (its
    claimer died; that execution is recorded ``lost``). One transaction: the row is
    picked ``FOR UPDATE SKIP LOCKED``, gets ``running``, the lease and a run id (a new
    one, or the one of the attempt before: a retry resumes that run), and an execution
    row. A submission whose attempts are used up is ``failed`` instead.

    Examples
    --------
    >>> claimed = claim(owner="me", lease_seconds=60)  # doctest: +SKIP
    >>> claimed.attempt, claimed.run_id  # doctest: +SKIP
    (1, 'prod-20261124-…')
    """
    from lazysky.runs import new_run_id

    cat = _catalog(catalog, settings)
    s = batch_submissions
    while True:
        with cat.engine().begin() as conn:
            row = conn.execute(
                sa.select(s).where(sa.or_(
                    sa.and_(s.c.state == "queued", s.c.due_at <= sa.func.now()),
                    sa.and_(s.c.state == "running", s.c.lease_expires_at < sa.func.now())))
                .order_by(s.c.due_at, s.c.submission_id)
                .with_for_update(skip_locked=True).limit(1)).one_or_none()
            if row is None:
                return None
            if row.state == "running":  # its claimer died: the lease ran out
                conn.execute(batch_executions.update().where(
                    batch_executions.c.submission_id == row.submission_id,
                    batch_executions.c.owner == row.lease_owner,
                    batch_executions.c.state == "running").values(
                    state="lost", finished_at=sa.func.now(),
                    error=f"lease expired ({row.lease_owner} stopped renewing it)"))
                logger.warning("submission %d: lease of %s expired; taking it again",
                               row.submission_id, row.lease_owner)
            if row.attempts >= row.max_attempts:
                _end_slot(conn, row, state="failed",
                          error=f"gave up after {row.attempts} attempt(s): "
                                f"{row.error or 'its last run-due died (lease expired)'}")
                continue
            run_id = row.run_id or new_run_id(row.run_type)
            attempt = row.attempts + 1
            conn.execute(s.update().where(s.c.submission_id == row.submission_id).values(
                state="running", attempts=attempt, run_id=run_id, lease_owner=owner,
                lease_expires_at=_lease(lease_seconds), started_at=sa.func.now(),
                finished_at=None))
            got = conn.execute(batch_executions.insert().values(
                submission_id=row.submission_id, due_at=row.due_at, attempt=attempt,
                run_id=run_id, owner=owner, state="running",
            ).returning(*batch_executions.c)).one()
            return Execution(**{k: getattr(got, k) for k in Execution.__dataclass_fields__})


def _end_slot(conn: sa.Connection, row: Any, *, state: str, error: str | None) -> None:
    """End the current due time: terminal for a one-off, next cron time for a recurring."""
    s = batch_submissions
    values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "error": error,
                              "finished_at": sa.func.now()}
    if row.cron:
        db_now = conn.execute(sa.select(sa.func.now())).scalar_one()
        # missed slots are not run one after the other: the next is the first after now
        values.update(state="queued", due_at=next_cron_time(row.cron, db_now), attempts=0,
                      run_id=None)
    else:
        values.update(state=state)
    conn.execute(s.update().where(s.c.submission_id == row.submission_id).values(**values))


def _finish(cat: Any, execution: Execution, *, state: str, error: str | None) -> bool:
    """Record an execution's end; update its submission if this owner still holds it."""
    s = batch_submissions
    with cat.engine().begin() as conn:
        conn.execute(batch_executions.update().where(
            batch_executions.c.execution_id == execution.execution_id).values(
            state=state, finished_at=sa.func.now(), heartbeat_at=sa.func.now(), error=error))
        row = conn.execute(sa.select(s).where(
            s.c.submission_id == execution.submission_id, s.c.state == "running",
            s.c.lease_owner == execution.owner).with_for_update()).one_or_none()
        if row is None:
            logger.warning("submission %d: lease lost (cancelled or taken by another "
                           "run-due); its state is left as it is", execution.submission_id)
            return False
        if state == "failed" and row.attempts < row.max_attempts:
            # retried by the next run-due, resuming the same run id
            conn.execute(s.update().where(s.c.submission_id == row.submission_id).values(
                state="queued", lease_owner=None, lease_expires_at=None, error=error))
        else:
            _end_slot(conn, row, state=state, error=error)
    return True


def _renew(cat: Any, execution: Execution, lease_seconds: float) -> bool:
    s = batch_submissions
    with cat.engine().begin() as conn:
        done = conn.execute(s.update().where(
            s.c.submission_id == execution.submission_id, s.c.state == "running",
            s.c.lease_owner == execution.owner).values(
            lease_expires_at=_lease(lease_seconds)))
        conn.execute(batch_executions.update().where(
            batch_executions.c.execution_id == execution.execution_id).values(
            heartbeat_at=sa.func.now()))
    return bool(done.rowcount)


class _Heartbeat(threading.Thread):
    """Renews a lease every third of its length until stopped (or the lease is lost)."""

    def __init__(self, cat: Any, execution: Execution, lease_seconds: float) -> None:
        super().__init__(name=f"lazysky-batch-heartbeat-{execution.submission_id}",
                         daemon=True)
        self.cat, self.execution, self.lease_seconds = cat, execution, lease_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_seconds / 3.0):
            try:
                if not _renew(self.cat, self.execution, self.lease_seconds):
                    logger.error("submission %d: lease lost while running",
                                 self.execution.submission_id)
                    return
            except (sa.exc.SQLAlchemyError, OSError) as exc:  # try again next beat
                logger.warning("submission %d: heartbeat failed: %s",
                               self.execution.submission_id, exc)


def execute(execution: Execution, *, lease_seconds: float = DEFAULT_LEASE_SECONDS,
            catalog: Any = None, settings: Settings | None = None,
            client: Any = None) -> Execution:
    """Run a claimed execution under its lease (heartbeat), and record how it ended.

    ``client`` is the Dask client to run on (default: the runner connects its own).
    :func:`run_due` is claim + execute, in a loop.

    Examples
    --------
    >>> execute(claim(owner="me"), client=client).state  # doctest: +SKIP
    'completed'
    """
    cat = _catalog(catalog, settings)
    return _execute(execution, cat=cat, settings=settings or load_settings(),
                    lease_seconds=lease_seconds, get_client=lambda: client)


def _execute(execution: Execution, *, cat: Any, settings: Settings, lease_seconds: float,
             get_client: Callable[[], Any], show_progress: bool = False) -> Execution:
    from lazysky.runner import run

    # the lease is renewed from the start: connecting a cluster takes a while, too
    beat = _Heartbeat(cat, execution, lease_seconds)
    beat.start()
    state, error = "failed", None
    try:
        sub = get_submission(execution.submission_id, catalog=cat)
        cfg = RunConfig.model_validate({**sub.config, "run_id": execution.run_id})
        # the workflow version active now; a canary adds the candidate's run beside it
        from lazysky.workflows import plan_runs

        states, errors = [], []
        for one in plan_runs(cfg, catalog=cat, execution_id=execution.execution_id):
            summary = run(one, settings=settings, client=get_client(), catalog=cat,
                          show_progress=show_progress)
            states.append(_RESULT.get(summary.status, "failed"))
            where = "" if one.run_id == execution.run_id else f"canary {one.run_id}: "
            errors += [f"{where}{k}: {v}" for k, v in summary.errors.items()]
        state = next((s for s in ("failed", "completed-with-errors") if s in states),
                     "completed")
        error = "; ".join(errors) or None
    except Exception as exc:  # the batch boundary: any failure of a run is recorded
        error = f"{type(exc).__name__}: {exc}"
        logger.error("submission %d attempt %d failed: %s", execution.submission_id,
                     execution.attempt, error)
    finally:
        beat.stopped.set()
        beat.join()
    _finish(cat, execution, state=state, error=error)
    with cat.engine().connect() as conn:
        got = conn.execute(sa.select(batch_executions).where(
            batch_executions.c.execution_id == execution.execution_id)).one()
    return Execution(**{k: getattr(got, k) for k in Execution.__dataclass_fields__})


def run_due(*, lease_seconds: float = DEFAULT_LEASE_SECONDS, max_submissions: int | None = None,
            catalog: Any = None, settings: Settings | None = None, client: Any = None,
            owner: str | None = None, show_progress: bool = False) -> list[Execution]:
    """Run every submission that is due, one after the other (what the CronJob runs).

    Parameters
    ----------
    lease_seconds
        Length of the lease; the heartbeat renews it every third. A submission whose
        claimer died is taken again once its lease has expired.
    max_submissions
        Stop after this many executions (default: until nothing is due).
    catalog, settings
        Where the queue is (default: :func:`lazysky.catalog.open_catalog`).
    client
        The Dask client to run on (default: :func:`lazysky.cluster.connect` once, for all).
    owner
        This process's name in leases (default ``host:pid:token``).
    show_progress
        Print progress bars per stage of each run (``lazysky batch run-due`` does).

    Returns
    -------
    list of Execution
        What this call ran, in order.

    Examples
    --------
    >>> run_due(max_submissions=1)  # doctest: +SKIP
    """
    if not lease_seconds > 0:
        msg = f"lease_seconds must be > 0 (seconds); got {lease_seconds!r}"
        raise ParameterError(msg)
    if max_submissions is not None and max_submissions < 1:
        msg = f"max_submissions must be >= 1 or None (no limit); got {max_submissions!r}"
        raise ParameterError(msg)
    cat = _catalog(catalog, settings)
    settings = settings if settings is not None else load_settings()
    owner = owner or _owner()
    done: list[Execution] = []
    own: list[Any] = []

    def get_client() -> Any:
        """The given client, or one cluster connected on first need and kept for all."""
        if client is not None:
            return client
        if not own:
            from lazysky.cluster import connect
            from lazysky.pipeline.detect import SepSettings

            own.append(connect(settings, worker_plugins=[SepSettings()]))
        return own[0]

    try:
        while max_submissions is None or len(done) < max_submissions:
            claimed = claim(owner=owner, lease_seconds=lease_seconds, catalog=cat)
            if claimed is None:
                break
            logger.info("submission %d: attempt %d, run %s", claimed.submission_id,
                        claimed.attempt, claimed.run_id)
            done.append(_execute(claimed, cat=cat, settings=settings,
                                 lease_seconds=lease_seconds, get_client=get_client,
                                 show_progress=show_progress))
    finally:
        for c in own:
            c.close()
    return done

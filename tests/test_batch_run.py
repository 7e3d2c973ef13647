"""The batch lifecycle for real: run-due processes, a SIGKILL mid-run, retries, cron history.

The tiny survey of tests/test_run_end_to_end.py, run by ``lazysky batch run-due`` on a
local cluster against the embedded catalog; a submission whose run-due is killed mid-run
is taken again once its lease has expired and must end with exactly the rows of a clean
run (``tiny_clean_rows``).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_batch import _drop, _scratch
from test_run_end_to_end import _config, _rows

from lazysky import batch
from lazysky.catalog import Catalog, open_catalog, runs
from lazysky.catalog.schema import batch_submissions
from lazysky.config import load_settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LEASE_S = 6.0  # renewed every 2 s: a loaded CI machine may stall a thread for seconds
EXE = str(Path(sys.executable).parent / "lazysky")


def _env(dsn: str) -> dict[str, str]:
    return {**os.environ, "LAZYSKY_CATALOG_DSN": dsn, "LAZYSKY_CLUSTER__MAX_WORKERS": "2",
            "LAZYSKY_CLUSTER__MIN_WORKERS": "1",
            "LAZYSKY_CLUSTER__DASHBOARD_ADDRESS": ":0"}


@pytest.fixture
def queue(catalog: Catalog) -> Iterator[Catalog]:
    import uuid

    name = f"batchrun_{uuid.uuid4().hex[:10]}"
    admin, dsn = _scratch(catalog, name)
    try:
        yield open_catalog(dsn=dsn)
    finally:
        _drop(admin, name, dsn)


def test_a_killed_run_due_is_taken_again_and_ends_with_the_clean_rows(
        tiny_survey: Path, tiny_clean_rows: dict[str, Any], tiny_client: Any,
        catalog: Catalog, tmp_path: Path) -> None:
    store = tmp_path / "store"
    # among the inputs, a truncated file: skipped and recorded, so the run ends with errors
    raw = tmp_path / "raw"
    shutil.copytree(tiny_survey / "raw", raw)
    good = (raw / "deep1-r-e002-d00.fits").read_bytes()
    bad = raw / "deep1-r-e009-d00.fits"
    bad.write_bytes(good[: len(good) // 2])
    cfg = _config(tiny_survey, store).model_copy(
        update={"ingest": [str(raw), str(tiny_survey / "calib")]})
    sub = batch.submit(cfg, catalog=catalog)
    proc = subprocess.Popen([EXE, "batch", "run-due", "--lease-seconds", str(LEASE_S)],
                            env=_env(catalog.dsn), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    try:
        run_id = None
        leases = []  # (lease end, when seen) while it runs: the heartbeat renews it
        while time.monotonic() < deadline and proc.poll() is None:
            now = batch.get_submission(sub.submission_id, catalog=catalog)
            run_id = now.run_id
            if now.state == "running":
                leases.append((now.lease_expires_at, dt.datetime.now(dt.UTC)))
            done = store / "products" / str(run_id) / "coadd" / "deep1" / ".done"
            if now.state == "running" and done.is_dir() and len(list(done.iterdir())) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # run-due, its heartbeat and its workers
        proc.wait()
    # the run lasted many leases: renewed all along, never lapsed while it ran
    assert len({end for end, _ in leases}) >= 3
    assert all(end > seen for end, seen in leases), [
        round((end - seen).total_seconds(), 1) for end, seen in leases]
    killed = batch.get_submission(sub.submission_id, catalog=catalog)
    assert killed.state == "running"
    assert killed.attempts == 1
    assert killed.run_id == run_id
    # nobody takes it while the lease holds ...
    assert batch.claim(owner="too-early", lease_seconds=LEASE_S, catalog=catalog) is None
    assert killed.lease_expires_at is not None
    wait = (killed.lease_expires_at - dt.datetime.now(dt.UTC)).total_seconds()
    time.sleep(max(0.0, wait) + 0.5)
    # ... and once it has expired, the next run-due resumes the same run
    done_runs = batch.run_due(lease_seconds=LEASE_S, catalog=catalog, client=tiny_client,
                              settings=load_settings(catalog_dsn=catalog.dsn))
    assert [(e.submission_id, e.attempt, e.run_id, e.state) for e in done_runs] == [
        (sub.submission_id, 2, run_id, "completed-with-errors")]
    final = batch.get_submission(sub.submission_id, catalog=catalog)
    assert final.state == "completed-with-errors"
    assert str(bad) in (final.error or "")
    assert final.lease_owner is None
    assert [e.state for e in final.executions] == ["lost", "completed-with-errors"]
    assert "lease expired" in (final.executions[0].error or "")
    assert final.executions[1].finished_at is not None
    with catalog.engine().connect() as conn:
        status = conn.execute(sa.select(runs.c.status).where(runs.c.run_id == run_id)).scalar()
    assert status == "done_with_errors"
    assert _rows(catalog, str(run_id)) == tiny_clean_rows


def test_a_failing_run_is_retried_on_the_same_run_id_then_failed(
        queue: Catalog, tiny_client: Any, tmp_path: Path, tiny_survey: Path) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()
    cfg = _config(tiny_survey, empty).model_copy(update={"ingest": []})  # nothing to run on
    sub = batch.submit(cfg, max_attempts=2, catalog=queue)
    got = batch.run_due(lease_seconds=LEASE_S, catalog=queue, client=tiny_client,
                        settings=load_settings(catalog_dsn=queue.dsn))
    assert [(e.attempt, e.state) for e in got] == [(1, "failed"), (2, "failed")]
    assert len({e.run_id for e in got}) == 1, "a retry resumes the same run id"
    assert all("no exposure" in (e.error or "") for e in got)
    final = batch.get_submission(sub.submission_id, catalog=queue)
    assert final.state == "failed"
    assert "no exposure" in (final.error or "")
    assert batch.run_due(catalog=queue, client=tiny_client) == []  # nothing due any more


def test_a_recurring_submission_keeps_every_execution(
        queue: Catalog, tiny_client: Any, tmp_path: Path, tiny_survey: Path) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()
    cfg = _config(tiny_survey, empty).model_copy(update={"ingest": []})
    sub = batch.submit(cfg, cron="0 3 * * *", max_attempts=1, catalog=queue)
    slots = []
    for k in range(2):
        # time passes: a slot is due (moved back, as the clock would have it)
        slot = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=10 - k)
        slots.append(slot)
        with queue.engine().begin() as conn:
            conn.execute(batch_submissions.update().where(
                batch_submissions.c.submission_id == sub.submission_id).values(due_at=slot))
        [ran] = batch.run_due(catalog=queue, client=tiny_client,
                              settings=load_settings(catalog_dsn=queue.dsn))
        assert ran.state == "failed"
        after = batch.get_submission(sub.submission_id, catalog=queue)
        # a recurring submission goes back to the queue, due at its next firing
        assert after.state == "queued"
        assert after.attempts == 0
        assert after.run_id is None
        assert after.due_at == batch.next_cron_time("0 3 * * *", dt.datetime.now(dt.UTC))
    history = batch.get_submission(sub.submission_id, catalog=queue).executions
    assert [e.due_at for e in history] == slots
    assert [e.attempt for e in history] == [1, 1]
    assert len({e.run_id for e in history}) == 2, "each execution is a run of its own"
    assert "execution" in str(batch.get_submission(sub.submission_id, catalog=queue))


def test_two_run_due_processes_never_run_the_same_submission(
        queue: Catalog, tmp_path: Path, tiny_survey: Path) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()
    cfg = _config(tiny_survey, empty).model_copy(update={"ingest": []})
    subs = [batch.submit(cfg, max_attempts=1, catalog=queue).submission_id for _ in range(6)]
    procs = [subprocess.Popen([EXE, "batch", "run-due", "--lease-seconds", "30", "--max", "3"],
                              env=_env(queue.dsn), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3]  # every run failed (nothing to run on)
    executions = [e for s in subs for e in batch.get_submission(s, catalog=queue).executions]
    assert sorted(e.submission_id for e in executions) == subs  # each exactly once
    # each process ran its share (--max 3), and none ran another's
    owners = [e.owner for e in executions]
    assert sorted(owners.count(o) for o in set(owners)) == [3, 3]
    said = [line for out in outs for line in out.splitlines() if line.startswith("submission")]
    assert len(said) == len(subs)
    assert all(batch.get_submission(s, catalog=queue).state == "failed" for s in subs)

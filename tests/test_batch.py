"""Batch submissions on the real catalog server: schema v3, validation, claiming, leases.

Each test that looks at the queue gets a database of its own on the embedded server
(``queue``), so the submissions of one test never become due in another.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import yaml

from lazysky import batch
from lazysky.catalog import Catalog, open_catalog
from lazysky.catalog.database import libpq_dsn
from lazysky.catalog.schema import batch_executions, batch_submissions
from lazysky.errors import ConfigError, ParameterError

pytestmark = pytest.mark.postgres

CONFIG = {"type": "test", "reference": ["deep1-r-e000-*"], "field": {"tile_px": 128}}


def _scratch(catalog: Catalog, name: str) -> tuple[str, str]:
    admin = libpq_dsn(catalog.dsn).replace("/lazysky?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin, catalog.dsn.replace("/lazysky?", f"/{name}?")


def _drop(admin: str, name: str, dsn: str) -> None:
    from lazysky.catalog.database import _ENGINES

    for key in [k for k in _ENGINES if k[1].startswith(dsn)]:
        _ENGINES.pop(key).dispose()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def queue(catalog: Catalog) -> Iterator[Catalog]:
    """A fresh catalog database (pgSphere, schema v3) on the embedded server."""
    name = f"batch_{uuid.uuid4().hex[:10]}"
    admin, dsn = _scratch(catalog, name)
    try:
        yield open_catalog(dsn=dsn)
    finally:
        _drop(admin, name, dsn)


def _count(cat: Catalog, table: sa.Table = batch_submissions) -> int:
    with cat.engine().connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_a_v2_catalog_upgrades_to_v3_in_place(catalog: Catalog) -> None:
    from lazysky.catalog._extension import ensure_pg_sphere
    from lazysky.catalog.database import get_engine
    from lazysky.catalog.schema import (
        MIGRATIONS,
        SCHEMA_VERSION,
        current_version,
        runs,
        schema_version,
        upgrade,
    )
    from lazysky.runs import new_run_id

    name = f"v2_{uuid.uuid4().hex[:8]}"
    admin, dsn = _scratch(catalog, name)
    try:
        with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
            ensure_pg_sphere(conn)
        engine = get_engine(dsn)
        run_id = new_run_id("prod")
        with engine.begin() as conn:  # a catalog as v2 left it, with a run in it
            schema_version.create(conn)
            for step in MIGRATIONS[:2]:
                step.apply(conn)
                conn.execute(schema_version.insert().values(version=step.version,
                                                            description=step.description))
            conn.execute(runs.insert().values(run_id=run_id, software_version="0",
                                              status="done"))
            assert conn.execute(sa.text("SELECT to_regclass('batch_submissions')")).scalar() \
                is None
        assert upgrade(engine) == SCHEMA_VERSION >= 3
        with engine.connect() as conn:
            assert current_version(conn) == SCHEMA_VERSION
            assert conn.execute(sa.select(runs.c.run_id)).scalars().all() == [run_id]
        sub = batch.submit(CONFIG, catalog=Catalog(dsn))
        assert sub.state == "queued"
        assert sub.submission_id >= 1
        assert upgrade(engine) == SCHEMA_VERSION  # idempotent
        assert batch.list_submissions(catalog=Catalog(dsn)) == [sub]
    finally:
        _drop(admin, name, dsn)


def test_submit_records_the_validated_configuration(queue: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    before = dt.datetime.now(dt.UTC)
    sub = batch.submit(path, run_type="exp", catalog=queue)
    assert sub.state == "queued"
    assert sub.run_type == "exp"
    assert sub.config["type"] == "exp"  # --type wins over the file
    assert sub.config["reference"] == CONFIG["reference"]
    # defaults filled in, but steps never given stay unsaid: the run takes the workflow
    # version active for its type when it runs (lazysky.workflows, issue 13)
    assert sub.config["field"]["name"] == "field"
    assert "steps" not in CONFIG
    assert "steps" not in sub.config
    assert sub.source == str(path)
    assert sub.cron is None
    assert sub.attempts == 0
    assert sub.run_id is None
    assert abs((sub.due_at - before).total_seconds()) < 60
    later = batch.submit(CONFIG, at="2099-01-02T03:04", catalog=queue)
    assert later.due_at == dt.datetime(2099, 1, 2, 3, 4, tzinfo=dt.UTC)
    assert [s.submission_id for s in batch.list_submissions(catalog=queue)] == [
        sub.submission_id, later.submission_id]
    # only what is due is claimed: the 2099 one is not
    got = batch.claim(owner="me", catalog=queue)
    assert got is not None
    assert got.submission_id == sub.submission_id
    assert batch.claim(owner="me", catalog=queue) is None
    assert [s.submission_id for s in batch.list_submissions(states=["running"],
                                                            catalog=queue)] == [
        sub.submission_id]


def test_a_cron_submission_is_due_at_its_next_firing(queue: Catalog) -> None:
    sub = batch.submit(CONFIG, cron="30  4 * * *", catalog=queue)
    assert sub.cron == "30 4 * * *"
    now = dt.datetime.now(dt.UTC)
    assert now < sub.due_at <= now + dt.timedelta(days=1)
    assert (sub.due_at.hour, sub.due_at.minute, sub.due_at.second) == (4, 30, 0)


def test_next_cron_time_follows_the_expression() -> None:
    t = dt.datetime(2026, 11, 24, 3, 0, 0, tzinfo=dt.UTC)
    assert batch.next_cron_time("0 3 * * *", t) == t + dt.timedelta(days=1)
    assert batch.next_cron_time("*/15 * * * *", t) == t + dt.timedelta(minutes=15)
    # Monday to Friday at 22:00; 2026-11-27 is a Friday
    fri = dt.datetime(2026, 11, 27, 22, 0, tzinfo=dt.UTC)
    assert batch.next_cron_time("0 22 * * 1-5", fri) == fri + dt.timedelta(days=3)
    # a time in another zone is converted to UTC first
    paris = dt.datetime(2026, 11, 24, 4, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert batch.next_cron_time("0 3 * * *", paris) == t + dt.timedelta(days=1)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"cron": "61 * * * *"}, ParameterError, r"cron: '61 \* \* \* \*'.*Bad minute"),
    ({"cron": "0 3 * *"}, ParameterError, "has 4 field.*expected 5"),
    ({"cron": "0 0 3 * * *"}, ParameterError, "has 6 field.*expected 5"),
    ({"cron": "0 3 * * mon-xyz"}, ParameterError, "Bad day-of-week"),
    ({"at": "tomorrow"}, ParameterError, "at must be an ISO 8601 date or time.*got 'tomorrow'"),
    ({"at": "2026-11-25T03:00", "cron": "0 3 * * *"}, ParameterError, "not both"),
    ({"max_attempts": 0}, ParameterError, "max_attempts must be an integer >= 1"),
    ({"run_type": "nightly"}, ParameterError, "type must be one of prod, exp"),
    ({"cron": "0 3 * * *", "config": {**CONFIG, "run_id": "test-20261124-"
                                       "0a7d5b1e-7f3c-4a7e-9d2b-2f6c1e9a8b7c"}},
     ConfigError, "run_id: a recurring submission starts a new run"),
    ({"config": {**CONFIG, "run_id": "exp-20261124-0a7d5b1e-7f3c-4a7e-9d2b-2f6c1e9a8b7c"}},
     ConfigError, "is of type exp, the submission's type is test"),
    ({"config": {**CONFIG, "steps": {"stack": {"method": "mean"}}}}, ConfigError,
     "steps.stack.method"),
    ({"config": {"type": "test"}}, ConfigError, "reference: Field required"),
    ({"config": {**CONFIG, "refrence": ["x"]}}, ConfigError, "refrence: Extra inputs"),
])
def test_bad_input_is_refused_and_nothing_is_queued(
        queue: Catalog, kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = dict(kwargs)
    config = kwargs.pop("config", CONFIG)
    with pytest.raises(error, match=match):
        batch.submit(config, catalog=queue, **kwargs)
    assert _count(queue) == 0


def test_a_bad_configuration_file_is_named(queue: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "field": {"tile_px": 4}}))
    with pytest.raises(ConfigError, match=r"nightly\.yaml: field\.tile_px: Input should be "
                                          "greater than or equal to 16"):
        batch.submit(path, catalog=queue)
    with pytest.raises(ConfigError, match="cannot read the run configuration"):
        batch.submit(tmp_path / "missing.yaml", catalog=queue)
    assert _count(queue) == 0


def test_the_cli_refuses_a_bad_cron_and_queues_nothing(queue: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "LAZYSKY_CATALOG_DSN": queue.dsn}
    exe = str(Path(sys.executable).parent / "lazysky")
    bad = subprocess.run([exe, "batch", "submit", str(path), "--cron", "0 25 * * *"],
                         env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "cron: '0 25 * * *' is not a valid cron expression (Bad hour)" in bad.stderr
    assert _count(queue) == 0
    good = subprocess.run([exe, "batch", "submit", str(path), "--cron", "0 3 * * *",
                           "--type", "exp"], env=env, capture_output=True, text=True,
                          check=True)
    assert "submission 1: queued" in good.stdout
    listed = subprocess.run([exe, "batch", "list"], env=env, capture_output=True, text=True,
                            check=True)
    assert "0 3 * * *" in listed.stdout
    assert "queued" in listed.stdout
    shown = subprocess.run([exe, "batch", "show", "1"], env=env, capture_output=True,
                           text=True, check=True)
    assert "submission 1: queued" in shown.stdout
    assert "type        exp, cron '0 3 * * *' (UTC)" in shown.stdout
    idle = subprocess.run([exe, "batch", "run-due"], env=env, capture_output=True, text=True,
                          check=True)  # the cron submission is not due before 03:00
    assert idle.stdout.strip() == "nothing due"
    cancelled = subprocess.run([exe, "batch", "cancel", "1"], env=env, capture_output=True,
                               text=True, check=True)
    assert "submission 1: cancelled" in cancelled.stdout
    again = subprocess.run([exe, "batch", "cancel", "1"], env=env, capture_output=True,
                           text=True, check=False)
    assert again.returncode == 1
    assert "already cancelled" in again.stderr


def test_cancel(queue: Catalog) -> None:
    sub = batch.submit(CONFIG, catalog=queue)
    assert batch.cancel(sub.submission_id, catalog=queue).state == "cancelled"
    assert batch.claim(owner="me", catalog=queue) is None  # never started
    with pytest.raises(ParameterError, match="already cancelled"):
        batch.cancel(sub.submission_id, catalog=queue)
    with pytest.raises(ParameterError, match="no batch submission 999"):
        batch.cancel(999, catalog=queue)
    with pytest.raises(ParameterError, match="no batch submission 999"):
        batch.get_submission(999, catalog=queue)
    with pytest.raises(ParameterError, match="state must be among queued, running"):
        batch.list_submissions(states=["done"], catalog=queue)
    # a running submission cancelled: its owner's end no longer changes it
    other = batch.submit(CONFIG, catalog=queue)
    got = batch.claim(owner="me", catalog=queue)
    assert got is not None
    assert got.submission_id == other.submission_id
    batch.cancel(other.submission_id, catalog=queue)
    assert not batch._finish(queue, got, state="completed", error=None)
    after = batch.get_submission(other.submission_id, catalog=queue)
    assert after.state == "cancelled"
    assert [e.state for e in after.executions] == ["completed"]


_CLAIMER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lazysky import batch
    from lazysky.catalog import Catalog
    dsn, owner, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    cat = Catalog(dsn)
    cat.engine().connect().close()
    while not go.exists():
        time.sleep(0.005)
    while (e := batch.claim(owner=owner, lease_seconds=600, catalog=cat)) is not None:
        print(e.submission_id, flush=True)
""")


def test_concurrent_claimers_take_each_submission_exactly_once(
        queue: Catalog, tmp_path: Path) -> None:
    """Four OS processes claim from one queue at the same moment: no overlap, no gap."""
    n = 60
    with queue.engine().begin() as conn:
        conn.execute(batch_submissions.insert(), [
            {"run_type": "test", "config": CONFIG,
             "due_at": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)}
            for _ in range(n)])
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, queue.dsn, f"p{k}", str(go)],
                              stdout=subprocess.PIPE, text=True) for k in range(4)]
    time.sleep(3.0)  # every process imported and connected
    go.touch()
    claimed = {}
    for k, p in enumerate(procs):
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        claimed[f"p{k}"] = [int(x) for x in out.split()]
    every = [i for ids in claimed.values() for i in ids]
    assert sorted(every) == sorted(set(every)), "a submission was claimed twice"
    assert len(every) == n
    assert sum(1 for ids in claimed.values() if ids) >= 2, "the claimers did not compete"
    with queue.engine().connect() as conn:
        rows = conn.execute(sa.select(batch_executions.c.submission_id,
                                      batch_executions.c.owner,
                                      batch_executions.c.attempt)).all()
        states = conn.execute(sa.select(batch_submissions.c.state).distinct()).scalars().all()
    assert sorted((r.submission_id, r.owner) for r in rows) == sorted(
        (i, owner) for owner, ids in claimed.items() for i in ids)
    assert {r.attempt for r in rows} == {1}
    assert states == ["running"]


def test_an_expired_lease_is_taken_again_with_the_same_run_id(queue: Catalog) -> None:
    sub = batch.submit(CONFIG, max_attempts=2, catalog=queue)
    first = batch.claim(owner="a", lease_seconds=1.0, catalog=queue)
    assert first is not None
    assert first.attempt == 1
    assert batch.claim(owner="b", lease_seconds=1.0, catalog=queue) is None  # lease held
    assert batch._renew(queue, first, 1.0)  # a heartbeat extends it
    time.sleep(1.3)
    second = batch.claim(owner="b", lease_seconds=1.0, catalog=queue)
    assert second is not None
    assert (second.submission_id, second.attempt, second.run_id) == (
        sub.submission_id, 2, first.run_id)
    # the first owner, back from the dead, can neither renew nor finish it
    assert not batch._renew(queue, first, 1.0)
    assert not batch._finish(queue, first, state="completed", error=None)
    time.sleep(1.3)
    assert batch.claim(owner="c", lease_seconds=1.0, catalog=queue) is None  # used up
    final = batch.get_submission(sub.submission_id, catalog=queue)
    assert final.state == "failed"
    assert "gave up after 2 attempt(s)" in (final.error or "")
    assert [(e.owner, e.state) for e in final.executions] == [("a", "completed"),
                                                               ("b", "lost")]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lease_seconds": 0}, "lease_seconds must be > 0"),
    ({"lease_seconds": float("nan")}, "lease_seconds must be > 0"),
    ({"max_submissions": 0}, "max_submissions must be >= 1"),
])
def test_run_due_refuses_bad_limits_before_claiming(
        queue: Catalog, kwargs: dict[str, Any], match: str) -> None:
    sub = batch.submit(CONFIG, catalog=queue)
    with pytest.raises(ParameterError, match=match):
        batch.run_due(catalog=queue, **kwargs)
    assert batch.get_submission(sub.submission_id, catalog=queue).state == "queued"

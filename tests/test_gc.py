"""Retention (lazysky gc) on a simulated calendar, on the real catalog server and on real
stores (a local directory and the moto S3 server): what expires, what never does, a gc
killed half-way and run again, dry runs, bad input.

Every scenario gets a database of its own on the embedded server, so gc (which looks at
every run of its catalog) never touches the runs of other tests. The calendar is
simulated: runs are registered with ids of past dates and backdated start and end, and
gc is run with ``now`` = :data:`NOW`.
"""

from __future__ import annotations

import datetime as dt
import gc as pygc
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
import xarray as xr

from lazysky.catalog import Catalog, open_catalog
from lazysky.catalog.database import _ENGINES, libpq_dsn
from lazysky.config import Settings, load_settings
from lazysky.errors import ConfigError, ParameterError
from lazysky.gc import GcReport, collect, drop_expired_partitions, parse_now

pytestmark = pytest.mark.postgres

NOW = dt.datetime(2027, 3, 1, tzinfo=dt.UTC)
TILE = "t000_000"
SHA = {e: f"{i:064x}" for i, e in enumerate(["e1", "e2", "e3", "e4"], start=1)}


# -- scenario -------------------------------------------------------------------------


@dataclass
class World:
    """One simulated survey: a catalog database, a store, and its runs by label."""

    catalog: Catalog
    store: Any  # a local path or a StoreRoot (S3)
    settings: Settings
    runs: dict[str, str]  # label -> run id


def _scratch(catalog: Catalog) -> tuple[str, str, str]:
    name = f"gc_{uuid.uuid4().hex[:10]}"
    admin = libpq_dsn(catalog.dsn).replace("/lazysky?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin, name, catalog.dsn.replace("/lazysky?", f"/{name}?")


def _drop(admin: str, name: str, dsn: str) -> None:
    for key in [k for k in _ENGINES if k[1].startswith(dsn)]:
        _ENGINES.pop(key).dispose()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def databases(catalog: Catalog) -> Iterator[list[Catalog]]:
    """Fresh catalog databases on the embedded server (ask for as many as needed)."""
    made: list[tuple[str, str, str]] = []

    class _Many(list[Catalog]):
        def new(self) -> Catalog:
            admin, name, dsn = _scratch(catalog)
            made.append((admin, name, dsn))
            cat = open_catalog(dsn=dsn)
            self.append(cat)
            return cat

    yield _Many()
    for admin, name, dsn in made:
        _drop(admin, name, dsn)


def _product(seed: int) -> xr.Dataset:
    from lazysky.pipeline import SkyGrid

    grid = SkyGrid(ra_deg=150.0, dec_deg=2.0, pixel_scale_arcsec=0.5, shape=(32, 32),
                   tile_px=32)
    img = np.random.default_rng(seed).normal(100.0, 5.0, (32, 32)).astype("float32")
    return xr.Dataset({"image": (("y", "x"), img)}, attrs={"grid": grid.to_dict()})


def _raw_group(root: Any, eid: str) -> None:
    """A raw exposure group as ingest leaves it: the array, then the group metadata."""
    import zarr

    arr = zarr.create_array(root.zarr_store("raw", eid, "sci"), shape=(1, 16, 16),
                            chunks=(1, 16, 16), dtype="uint16", zarr_format=3)
    arr[:] = np.arange(256, dtype="uint16").reshape(1, 16, 16)
    zarr.create_group(root.zarr_store("raw", eid), zarr_format=3, attributes={
        "lazysky": {"exposure_id": eid, "source": {"sha256": SHA[eid]}}})


def _masters(root: Any, kind: str, inputs: list[str]) -> None:
    from lazysky.zarr_store.products import write_masters

    ds = xr.Dataset({kind: (("detector", "y", "x"), np.ones((1, 8, 8), "float32"))},
                    coords={"detector": ["CCD01"]})
    write_masters(root, ds, inputs={kind: {e: SHA[e] for e in inputs}})


def _run(cat: Catalog, root: Any, kind: str, *, days_ago: float, inputs: list[str],
         status: str = "done", parent: str | None = None, seed: int = 0) -> str:
    """A finished run ``days_ago`` before NOW: products, sources, tiles, a field plan."""
    from lazysky.catalog import finish_run, mark_tile_done, register_run, write_sources
    from lazysky.catalog.production import plan_run
    from lazysky.catalog.schema import runs
    from lazysky.runs import Run, new_run_id
    from lazysky.zarr_store.products import write_product

    when = NOW - dt.timedelta(days=days_ago)
    rid = new_run_id(kind, date=when.date())
    register_run(Run(rid, config={}, inputs={e: SHA[e] for e in inputs},
                     parent_run_id=parent), catalog=cat)
    write_product(root, rid, "coadd", "deep1-r", _product(seed))
    rng = np.random.default_rng(seed)
    n = 5
    pos = {"x": rng.uniform(0, 32, n), "y": rng.uniform(0, 32, n),
           "ra": rng.uniform(149.99, 150.01, n), "dec": rng.uniform(1.99, 2.01, n)}
    write_sources("coadd", rid, TILE, pos, catalog=cat)
    write_sources("diff", rid, TILE, {**pos, "sign": np.ones(n, "int16"),
                                      "exposure_id": np.array([inputs[0]] * n)}, catalog=cat)
    for stage in ("detect-coadd", "detect-diff"):
        mark_tile_done(rid, stage, TILE, rows=n, catalog=cat)
    plan_run(rid, field="deep1-r", tiles=[TILE], catalog=cat)
    if status != "running":
        finish_run(rid, status=status, catalog=cat)
    with cat.engine().begin() as conn:
        conn.execute(runs.update().where(runs.c.run_id == rid).values(
            started_at=when - dt.timedelta(hours=2),
            finished_at=None if status == "running" else when))
    return rid


def _world(cat: Catalog, store: Any) -> World:
    """The survey every scenario starts from (see the assertions in _check_collected)."""
    from lazysky.catalog import Exposure, write_exposures
    from lazysky.catalog.production import promote, publish, rollback
    from lazysky.catalog.schema import batch_submissions
    from lazysky.zarr_store._layout import parse_store

    root = parse_store(store)
    for eid in SHA:
        _raw_group(root, eid)
    write_exposures([Exposure(e, "sim", "r", 60000.0, 30.0) for e in SHA], catalog=cat)
    runs = {
        # a production run 400 days old, published: forever
        "prod_old": _run(cat, root, "prod", days_ago=400, inputs=["e2", "e3"], seed=1),
        # a test run 10 days old (7d): expires; the only user of e1 besides exp_old
        "test_old": _run(cat, root, "test", days_ago=10, inputs=["e1", "e2"], seed=2),
        # a test run 2 days old: stays
        "test_new": _run(cat, root, "test", days_ago=2, inputs=["e3"], seed=3),
        # an experiment 200 days old (90d): expires; the only exp run of its month
        "exp_old": _run(cat, root, "exp", days_ago=200, inputs=["e1"], seed=4),
        # an experiment as old, but promoted: never
        "exp_promoted": _run(cat, root, "exp", days_ago=100, inputs=["e2"], seed=5),
        # a test run started 30 days ago and still running: in use
        "test_running": _run(cat, root, "test", days_ago=30, inputs=["e4"],
                             status="running", seed=6),
        # a test run 20 days old that a queued batch submission will resume: in use
        "test_queued": _run(cat, root, "test", days_ago=20, inputs=["e4"], seed=7),
        # an experiment 120 days old whose child (a test run 3 days old) is kept
        "exp_parent": _run(cat, root, "exp", days_ago=120, inputs=["e4"], seed=8),
    }
    runs["test_child"] = _run(cat, root, "test", days_ago=3, inputs=["e4"],
                              parent=runs["exp_parent"], seed=9)
    # an experiment 100 days old, promoted once and rolled back: never
    runs["exp_rolled_back"] = _run(cat, root, "exp", days_ago=100, inputs=["e4"], seed=10)
    publish(runs["prod_old"], catalog=cat)
    promote(runs["exp_rolled_back"], reason="new sky model", catalog=cat)
    rollback(field="deep1-r", reason="flux scale off", catalog=cat)
    promote(runs["exp_promoted"], reason="better PSF", catalog=cat)
    with cat.engine().begin() as conn:
        conn.execute(batch_submissions.insert().values(
            run_type="test", config={}, due_at=NOW, run_id=runs["test_queued"],
            attempts=1))
    _masters(root, "bias", ["e1"])  # used by test_old and exp_old only: goes
    _masters(root, "flat", ["e2"])  # also used by prod_old: stays
    settings = load_settings(catalog_dsn=cat.dsn, store_url=str(getattr(
        store, "url", store)))
    return World(cat, root, settings, runs)


GONE = {"test_old", "exp_old"}


def _snapshot(w: World) -> dict[str, Any]:
    """Everything gc may change, by run label: rows, tiles, products, raw, masters."""
    from lazysky.catalog.schema import (
        coadd_sources,
        diff_sources,
        exposures,
        production_tiles,
        run_expiry,
        run_tiles,
        runs,
        source_tiles,
    )

    label = {v: k for k, v in w.runs.items()}
    fs = w.store.fs()
    out: dict[str, Any] = {}
    with w.catalog.engine().connect() as conn:
        for table in (coadd_sources, diff_sources, run_tiles, source_tiles):
            out[table.name] = dict(sorted(
                (label[r], n) for r, n in conn.execute(
                    sa.select(table.c.run_id, sa.func.count()).group_by(table.c.run_id))))
        out["runs"] = sorted(label[r] for r in conn.execute(
            sa.select(runs.c.run_id)).scalars())
        out["expiry"] = dict(sorted((label[r], s) for r, s in conn.execute(
            sa.select(run_expiry.c.run_id, run_expiry.c.state))))
        out["production"] = sorted(label[r] for r in conn.execute(
            sa.select(production_tiles.c.run_id)).scalars())
        out["exposures"] = sorted(conn.execute(sa.select(exposures.c.exposure_id))
                                  .scalars())
    fs.invalidate_cache()
    out["products"] = sorted(label[p.rstrip("/").rsplit("/", 1)[-1]]
                             for p in fs.ls(w.store.path("products")))
    out["raw"] = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(w.store.path("raw")))
    out["calib"] = sorted(p.rstrip("/").rsplit("/", 1)[-1]
                          for p in fs.ls(w.store.path("calib")))
    return out


def _check_collected(before: dict[str, Any], after: dict[str, Any]) -> None:
    """What one gc at NOW must have done to the world of :func:`_world`, and nothing else."""
    labels = set(before["runs"])
    assert after["runs"] == before["runs"]  # tombstones: lineage stays
    assert after["expiry"] == dict.fromkeys(sorted(GONE), "expired")
    for table in ("coadd_sources", "diff_sources", "run_tiles", "source_tiles"):
        assert set(after[table]) == labels - GONE, table
        assert all(after[table][k] == before[table][k] for k in after[table]), table
    assert set(after["products"]) == labels - GONE
    assert after["production"] == before["production"] == ["exp_promoted"]
    # e1 was used by the two expired runs only; e2-e4 by kept runs
    assert after["raw"] == after["exposures"] == ["e2", "e3", "e4"]
    assert after["calib"] == ["flat"]  # bias: every user expired; flat: prod uses it


def _du(root: Any, *parts: str) -> int:
    fs = root.fs()
    fs.invalidate_cache()
    return sum(int(fs.info(p)["size"]) for p in fs.find(root.path(*parts)))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The scenario on a local directory and on a bucket of the moto server."""
    from lazysky.zarr_store._layout import parse_store
    from lazysky.zarr_store._s3 import close_s3_filesystems

    if request.param == "local":
        yield str(tmp_path / "store")
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket, opts = request.getfixturevalue("s3_bucket")
    yield parse_store(f"s3://{bucket}/survey", storage_options=opts)
    close_s3_filesystems()  # no socket left for a later test's garbage collection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        pygc.collect()
    del endpoint


# -- tests ----------------------------------------------------------------------------


def test_gc_removes_exactly_the_expired_runs(databases: Any, store: Any) -> None:
    w = _world(databases.new(), store)
    before = _snapshot(w)
    sizes = {k: _du(w.store, "products", w.runs[k]) for k in GONE}
    raw_e1, bias = _du(w.store, "raw", "e1"), _du(w.store, "calib", "bias")

    dry = collect(now=NOW, dry_run=True, settings=w.settings, catalog=w.catalog,
                  store=w.store)
    assert _snapshot(w) == before  # a dry run changes nothing
    assert {r.run_id for r in dry.runs} == {w.runs[k] for k in GONE}
    for r in dry.runs:  # sizes from the store's listing, rows from the catalog
        label = next(k for k, v in w.runs.items() if v == r.run_id)
        assert r.bytes == sizes[label] > 0
        assert r.rows == {"coadd_sources": 5, "diff_sources": 5, "run_tiles": 2,
                          "source_tiles": 2}  # the write ledger (schema v12)
    assert {(g.layer, g.path, g.bytes) for g in dry.groups} == {
        ("calibrated", "calib/bias/CCD01", bias), ("raw", "raw/e1", raw_e1)}
    assert dry.bytes == sum(sizes.values()) + raw_e1 + bias
    kept = {next(k for k, v in w.runs.items() if v == c.run_id): c.why for c in dry.kept}
    assert set(kept) == {"exp_promoted", "exp_rolled_back", "test_running", "test_queued",
                         "exp_parent"}
    assert "production" in kept["exp_promoted"]
    assert "promoted" in kept["exp_rolled_back"]
    assert "running" in kept["test_running"]
    assert "batch submission" in kept["test_queued"]
    assert w.runs["test_child"] in kept["exp_parent"]
    assert "would expire 2 run(s)" in str(dry)

    done = collect(now=NOW, settings=w.settings, catalog=w.catalog, store=w.store)
    assert not done.errors
    assert [r.state for r in done.runs] == ["expired", "expired"]
    assert done.as_dict()["bytes"] == dry.bytes
    assert done.rows == dry.rows == 28  # 2 runs x (5 + 5 + 2 + 2 ledger rows)
    after = _snapshot(w)
    _check_collected(before, after)

    # exp_old was the last run of a month that is over: its month partitions went whole;
    # test_old shares its month with a kept run: row-wise delete, partitions stay
    exp_month = f"coadd_sources__exp__{NOW - dt.timedelta(days=200):%Y_%m}"
    test_month = f"diff_sources__test__{NOW - dt.timedelta(days=10):%Y_%m}"
    with w.catalog.engine().connect() as conn:
        exists = {n: conn.execute(sa.text("SELECT to_regclass(:n)"), {"n": n}).scalar()
                  for n in (exp_month, test_month)}
    assert exists == {exp_month: None, test_month: test_month}

    # what `lazysky runs list/show` print: the tombstones say they were collected
    from lazysky.catalog.production import list_runs, run_record

    table = list_runs(limit=100, catalog=w.catalog)
    gc_col = dict(zip(table["run_id"], table["gc"], strict=True))
    assert {k for k, v in w.runs.items() if gc_col[v]} == GONE
    assert all(gc_col[w.runs[k]] == "expired" for k in GONE)
    shown = str(run_record(w.runs["exp_old"], catalog=w.catalog))
    assert "\ngc         expired " in shown
    assert "gc " not in str(run_record(w.runs["exp_promoted"], catalog=w.catalog))

    again = collect(now=NOW, settings=w.settings, catalog=w.catalog, store=w.store)
    assert (again.runs, again.groups, again.bytes) == ((), (), 0)  # idempotent
    assert _snapshot(w) == after


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from lazysky.catalog import open_catalog
    from lazysky.config import load_settings
    from lazysky.gc import collect

    dsn, store, now, stop = sys.argv[1:5]
    def on_step(step, run_id):
        if step == stop:  # the first run reached the stop point: die, no cleanup
            os.kill(os.getpid(), signal.SIGKILL)
    collect(now=now, settings=load_settings(catalog_dsn=dsn, store_url=store),
            catalog=open_catalog(dsn=dsn), store=store, on_step=on_step)
""")


def _kill_at(w: World, store: str, stop: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, w.catalog.dsn, store, NOW.isoformat(), stop],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -9, proc.stderr  # SIGKILL: no cleanup of any kind


def test_gc_killed_half_way_then_rerun_ends_like_an_uninterrupted_one(
        databases: Any, tmp_path: Path) -> None:
    from lazysky.catalog.schema import run_expiry

    store = str(tmp_path / "store")
    w = _world(databases.new(), store)
    before = _snapshot(w)

    def expiry() -> list[tuple[str, str]]:
        with w.catalog.engine().connect() as conn:
            got = conn.execute(sa.select(run_expiry.c.run_id, run_expiry.c.state)).all()
        return [(next(k for k, v in w.runs.items() if v == r), s) for r, s in got]

    # 1. killed right after the first run's catalog rows went (one transaction with
    #    its "expiring" mark): products without rows, never rows without products
    _kill_at(w, store, "catalog")
    half = _snapshot(w)
    [(label, state)] = expiry()
    assert label in GONE
    assert state == "expiring"
    for table in ("coadd_sources", "diff_sources", "run_tiles", "source_tiles"):
        assert label not in half[table]
        assert set(half[table]) == set(before[table]) - {label}
    assert label in half["products"]
    assert (half["raw"], half["calib"]) == (before["raw"], before["calib"])

    # 2. the next gc resumes that run first, and is killed once its products are gone
    _kill_at(w, store, "products")
    assert expiry() == [(label, "expiring")]
    assert label not in _snapshot(w)["products"]

    # 3. a third one finishes everything: the same end as an uninterrupted gc
    report = collect(now=NOW, settings=w.settings, catalog=w.catalog, store=w.store)
    assert not report.errors
    assert {r.run_id for r in report.runs} == {w.runs[k] for k in GONE}
    assert [r.reason for r in report.runs if r.run_id == w.runs[label]] == [
        "resumed: an earlier gc was interrupted"]
    _check_collected(before, _snapshot(w))


def test_drop_expired_partitions_empties_only_partitions_of_expired_runs(
        databases: Any) -> None:
    cat = databases.new()
    with cat.engine().begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE parted (run_id text, kind text, n int) PARTITION BY LIST (kind)"))
        conn.execute(sa.text("CREATE TABLE parted_a PARTITION OF parted FOR VALUES IN ('a')"))
        conn.execute(sa.text("CREATE TABLE parted_b PARTITION OF parted FOR VALUES IN ('b')"))
        conn.execute(sa.text("CREATE TABLE parted_c PARTITION OF parted FOR VALUES IN ('c')"))
        conn.execute(sa.text(
            "INSERT INTO parted VALUES ('x', 'a', 1), ('x', 'a', 2), ('x', 'b', 3), "
            "('y', 'b', 4), ('y', 'c', 5)"))
        table = sa.Table("parted", sa.MetaData(), sa.Column("run_id", sa.Text))
        assert drop_expired_partitions(conn, table, ["x"]) == ["parted_a"]
        left = conn.execute(sa.text("SELECT tableoid::regclass::text, run_id, n FROM parted "
                                    "ORDER BY n")).all()
        assert left == [("parted_b", "x", 3), ("parted_b", "y", 4), ("parted_c", "y", 5)]
        conn.execute(sa.text("INSERT INTO parted VALUES ('z', 'a', 6)"))  # bounds stay
        plain = sa.Table("runs", sa.MetaData(), sa.Column("run_id", sa.Text))
        assert drop_expired_partitions(conn, plain, ["x"]) == []  # not partitioned


@pytest.mark.parametrize(("retention", "message"), [
    ({"products": {"test": "12h"}}, r"retention\.products\.test: '12h' is shorter than a day"),
    ({"calibrated": {"exp": "0d"}}, r"retention\.calibrated\.exp: '0d' is shorter"),
    ({"products": {"nightly": "7d"}}, r"unknown processing type\(s\) \['nightly'\]; "
                                      r"allowed: prod, exp, test, val, repr"),
    ({"silver": {"test": "7d"}}, r"unknown layer\(s\) \['silver'\]; allowed: products, "
                                 r"calibrated, raw"),
    ({"products": {"exp": "ninety days"}}, r"'ninety days' is not a retention"),
    ({"raw": "sometimes"}, r"retention\.raw"),
])
def test_bad_retention_settings(retention: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(retention=retention)


def test_retention_from_the_environment_keeps_other_defaults(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSKY_RETENTION__PRODUCTS__TEST", "3d")
    s = load_settings()
    assert s.retention.keep_for("products", "test") == dt.timedelta(days=3)
    assert s.retention.keep_for("products", "exp") == dt.timedelta(days=90)
    assert s.retention.keep_for("products", "prod") is None
    assert s.retention.raw == "until-unused"


def test_bad_input_changes_nothing_and_a_run_started_during_gc_is_respected(
        databases: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lazysky.cli import main

    w = _world(databases.new(), str(tmp_path / "store"))
    before = _snapshot(w)
    with pytest.raises(ParameterError, match="now must be an ISO 8601 date"):
        collect(now="next tuesday", settings=w.settings, catalog=w.catalog, store=w.store)
    settings_file = tmp_path / "lazysky.yaml"
    settings_file.write_text(f"catalog_dsn: '{w.catalog.dsn}'\n"
                             f"store_url: '{tmp_path / 'store'}'\n")
    assert main(["gc", "--now", "2027-13-45", "--settings", str(settings_file)]) == 1
    assert "--now must be an ISO 8601 date" in capsys.readouterr().err
    settings_file.write_text(settings_file.read_text()
                             + "retention:\n  products:\n    test: 6h\n")
    assert main(["gc", "--now", NOW.isoformat(), "--settings", str(settings_file)]) == 1
    assert "retention.products.test: '6h' is shorter than a day" in capsys.readouterr().err
    assert _snapshot(w) == before
    # the CLI's dry run, as JSON: what would go, nothing gone
    settings_file.write_text(f"catalog_dsn: '{w.catalog.dsn}'\n"
                             f"store_url: '{tmp_path / 'store'}'\n")
    assert main(["gc", "--dry-run", "--now", NOW.isoformat(), "--format", "json",
                 "--settings", str(settings_file)]) == 0
    import json

    shown = json.loads(capsys.readouterr().out)
    assert shown["dry_run"] is True
    assert {r["run_id"] for r in shown["runs"]} == {w.runs[k] for k in GONE}
    assert _snapshot(w) == before

    with pytest.raises(ParameterError, match="wait: expected seconds >= 0, got -1"):
        collect(now=NOW, settings=w.settings, catalog=w.catalog, store=w.store, wait=-1)
    assert _snapshot(w) == before

    # one gc at a time: a second one is refused while the first holds the catalog past
    # the wait
    from lazysky.catalog import CatalogError

    with w.catalog.engine().connect() as other:
        other.execute(sa.select(sa.func.pg_advisory_lock(0x6C7A6763)))
        with pytest.raises(CatalogError, match=r"another lazysky gc is running on this "
                           r"catalog \(its lock still held after waiting 0.3 s\)"):
            collect(now=NOW, settings=w.settings, catalog=w.catalog, store=w.store,
                    wait=0.3)
        other.execute(sa.select(sa.func.pg_advisory_unlock(0x6C7A6763)))
    assert _snapshot(w) == before

    # a run started while gc works (after its plan): a reprocessing of exp_old, reading
    # e1; gc re-checks under its locks, so exp_old, e1 and the bias master made from e1
    # stay, while test_old (planned before it and unrelated) goes
    from lazysky.catalog import register_run
    from lazysky.runs import Run, new_run_id

    late = w.runs["late"] = new_run_id("exp", date=NOW.date())

    def start_a_child(step: str, run_id: str) -> None:
        if step == "catalog" and run_id == w.runs["test_old"]:
            register_run(Run(late, config={}, inputs={"e1": SHA["e1"]},
                             parent_run_id=w.runs["exp_old"]), catalog=w.catalog)

    # ... and it goes ahead when the other gc ends within the wait (as a killed gc's
    # session does a moment after the kill)
    import threading

    with w.catalog.engine().connect() as other:
        other.execute(sa.select(sa.func.pg_advisory_lock(0x6C7A6763)))
        release = threading.Timer(0.5, lambda: other.execute(
            sa.select(sa.func.pg_advisory_unlock(0x6C7A6763))))
        release.start()
        report = collect(now=NOW, settings=w.settings, catalog=w.catalog, store=w.store,
                         on_step=start_a_child, wait=60)
        release.join()
    assert [r.run_id for r in report.runs] == [w.runs["test_old"]]
    assert (w.runs["exp_old"], f"in use: parent of {late}, which is kept") in {
        (k.run_id, k.why) for k in report.kept}
    after = _snapshot(w)
    assert after["expiry"] == {"test_old": "expired"}
    assert "exp_old" in after["products"]
    assert after["raw"] == ["e1", "e2", "e3", "e4"]
    assert after["calib"] == ["bias", "flat"]


def test_parse_now() -> None:
    assert parse_now("2027-01-01") == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    # the same instant, in UTC (one parser with batch's due times: batch.parse_at)
    got = parse_now("2027-01-01T03:00:00+02:00")
    assert got == dt.datetime(2027, 1, 1, 1, tzinfo=dt.UTC)
    assert got.utcoffset() == dt.timedelta(0)
    assert parse_now(None).tzinfo is not None
    assert isinstance(GcReport(now=NOW, dry_run=True).bytes, int)


def test_gc_cronjob() -> None:
    from lazysky.kube import build_gc_cronjob, build_manifests

    job = build_gc_cronjob(namespace="lazysky", image="lazysky:0.1.0", schedule="0 5 * * *",
                           dry_run=True)
    spec = job["spec"]
    assert (spec["schedule"], spec["concurrencyPolicy"]) == ("0 5 * * *", "Forbid")
    pod = spec["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["containers"][0]["args"] == ["lazysky", "gc", "--dry-run"]
    assert pod["spec"]["automountServiceAccountToken"] is False  # no API access needed
    labels = pod["metadata"]["labels"]
    assert labels["lazysky.io/catalog-client"] == labels["lazysky.io/store-client"] == "true"
    assert "lazysky.io/dask-client" not in labels
    objects = build_manifests(overlay="prod")
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "CronJob"] == [
        "lazysky-batch", "lazysky-gc"]
    store = next(o for o in objects if o["metadata"]["name"] == "store-clients")
    assert store["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 443}]
    for bad, message in ((dict(schedule="nightly"), "not a cron expression"),
                         (dict(backoff_limit=-1), "backoff_limit"),
                         (dict(dry_run="yes"), "dry_run")):
        with pytest.raises(ParameterError, match=message):
            build_gc_cronjob(namespace="lazysky", image="lazysky:0.1.0", **bad)

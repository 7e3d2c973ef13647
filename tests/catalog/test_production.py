"""Production per tile: publish, promote, roll back; one version per tile for any reader."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from lazysky.catalog import Catalog, CatalogError, finish_run, mark_tile_done, write_sources
from lazysky.catalog.database import get_engine
from lazysky.catalog.production import (
    _LOCK_NAMESPACE,
    list_promotions,
    list_runs,
    plan_run,
    production_tiles,
    promote,
    publish,
    rollback,
    run_record,
)
from lazysky.errors import ParameterError
from lazysky.runs import new_run_id

pytestmark = pytest.mark.postgres

Sources = Callable[..., dict[str, np.ndarray]]
TILES = ["t000_000", "t000_001", "t001_000"]


def _prod_rows(catalog: Catalog, runs: list[str]) -> dict[str, set[str]]:
    """tile -> the runs (of ``runs``: tile ids are per field) the production view shows."""
    with catalog.engine().connect() as conn:
        got = conn.execute(sa.text(
            "SELECT tile_id, run_id FROM coadd_sources_prod WHERE run_id = ANY(:r)"),
            {"r": runs}).all()
    out: dict[str, set[str]] = {}
    for tile, run in got:
        out.setdefault(tile, set()).add(run)
    return out


@pytest.fixture
def field_runs(catalog: Catalog, make_run: Callable[..., str], sources: Sources,
               finish_lazysky_run: Callable[..., None]) -> dict[str, Any]:
    """A field (unique per test) with a finished production run and an experiment."""
    field = f"field-{new_run_id('test')[-12:]}"
    prod, exp = make_run("prod"), make_run("exp")
    for i, tile in enumerate(TILES):
        data = sources(30, seed=i, ra_range=(10.0 + i, 10.5 + i), dec_range=(5.0, 5.5))
        write_sources("coadd", prod, tile, data, catalog=catalog)
        write_sources("coadd", exp, tile, data, catalog=catalog)
    finish_lazysky_run(catalog, prod, field, TILES)
    finish_lazysky_run(catalog, exp, field, TILES[:2])  # an experiment on two tiles
    return {"field": field, "prod": prod, "exp": exp}


def test_publish_promote_rollback_switch_the_views(catalog: Catalog,
                                                   field_runs: dict[str, Any]) -> None:
    field, prod, exp = field_runs["field"], field_runs["prod"], field_runs["exp"]
    assert production_tiles(field, catalog=catalog) == {}
    pub = publish(prod, by="night-ops", catalog=catalog)
    assert pub.action == "publish"
    assert set(pub.tiles) == set(TILES)
    assert all(v is None for v in pub.tiles.values())  # nothing was production before
    assert _prod_rows(catalog, [prod, exp]) == {t: {prod} for t in TILES}

    p = promote(exp, reason="cosmic-ray sigma 4.5", by="alice", catalog=catalog)
    assert (p.action, p.by, p.reason) == ("promote", "alice", "cosmic-ray sigma 4.5")
    assert {t: v["run_id"] for t, v in p.tiles.items() if v} == {t: prod for t in TILES[:2]}
    # the experiment's two tiles switch, the third stays with production; nothing copied
    assert _prod_rows(catalog, [prod, exp]) == {TILES[0]: {exp}, TILES[1]: {exp}, TILES[2]: {prod}}
    assert production_tiles(field, catalog=catalog) == {
        TILES[0]: exp, TILES[1]: exp, TILES[2]: prod}
    assert run_record(exp, catalog=catalog).production_tiles == tuple(TILES[:2])

    r = rollback(field=field, reason="flux scale off", by="bob", catalog=catalog)
    assert (r.action, r.undoes, r.run_id) == ("rollback", p.promotion_id, exp)
    assert _prod_rows(catalog, [prod, exp]) == {t: {prod} for t in TILES}
    # the history says when, by whom and why, in order
    history = list_promotions(field=field, catalog=catalog)
    assert [(h.action, h.by) for h in history] == [
        ("publish", "night-ops"), ("promote", "alice"), ("rollback", "bob")]
    with pytest.raises(CatalogError, match="already rolled back"):
        rollback(p.promotion_id, reason="again", catalog=catalog)
    # rolling back the publication too leaves the field without production
    rollback(field=field, reason="withdraw the night", catalog=catalog)
    assert production_tiles(field, catalog=catalog) == {}
    with pytest.raises(CatalogError, match="no promotion left"):
        rollback(field=field, reason="nothing left", catalog=catalog)


def test_rollback_refuses_when_a_later_promotion_changed_the_tiles(
        catalog: Catalog, field_runs: dict[str, Any]) -> None:
    field, prod, exp = field_runs["field"], field_runs["prod"], field_runs["exp"]
    first = publish(prod, catalog=catalog)
    promote(exp, reason="better", catalog=catalog)
    with pytest.raises(CatalogError, match=r"changed since .*roll that back first"):
        rollback(first.promotion_id, reason="too early", catalog=catalog)
    assert production_tiles(field, catalog=catalog)[TILES[0]] == exp  # unchanged


def test_what_cannot_be_promoted_is_refused_and_changes_nothing(
        catalog: Catalog, make_run: Callable[..., str], field_runs: dict[str, Any]) -> None:
    field, prod = field_runs["field"], field_runs["prod"]
    publish(prod, catalog=catalog)
    before = production_tiles(field, catalog=catalog)

    running = make_run("exp")
    plan_run(running, field=field, tiles=TILES, catalog=catalog)
    with pytest.raises(CatalogError, match="is running: only a finished run"):
        promote(running, reason="r", catalog=catalog)
    finish_run(running, status="failed", catalog=catalog)
    with pytest.raises(CatalogError, match="is failed"):
        promote(running, reason="r", catalog=catalog)

    partial = make_run("exp")
    plan_run(partial, field=field, tiles=TILES, catalog=catalog)
    for tile in TILES[:2]:
        mark_tile_done(partial, "detect-coadd", tile, catalog=catalog)
        mark_tile_done(partial, "detect-diff", tile, catalog=catalog)
    mark_tile_done(partial, "detect-coadd", TILES[2], catalog=catalog)
    finish_run(partial, status="done", catalog=catalog)
    with pytest.raises(CatalogError, match=rf"incomplete.*detect-diff: {TILES[2]} \(1 of 3\)"):
        promote(partial, reason="r", catalog=catalog)
    assert run_record(partial, catalog=catalog).missing_tiles == {"detect-diff": [TILES[2]]}

    unplanned = make_run("exp")
    finish_run(unplanned, status="done", catalog=catalog)
    with pytest.raises(CatalogError, match="no field and tile plan"):
        promote(unplanned, reason="r", catalog=catalog)
    test_run = make_run("test")
    with pytest.raises(CatalogError, match="test runs are never promoted"):
        promote(test_run, reason="r", catalog=catalog)
    with pytest.raises(CatalogError, match="unknown run"):
        promote(new_run_id("exp"), reason="r", catalog=catalog)
    with pytest.raises(ParameterError, match="not a run id"):
        promote("exp-42", reason="r", catalog=catalog)
    with pytest.raises(ParameterError, match="a reason is required"):
        promote(field_runs["exp"], reason="  ", catalog=catalog)
    with pytest.raises(CatalogError, match="already production"):
        publish(prod, catalog=catalog)
    with pytest.raises(CatalogError, match="only production runs publish"):
        publish(field_runs["exp"], catalog=catalog)
    with pytest.raises(CatalogError, match="unknown promotion"):
        rollback(10**9, reason="r", catalog=catalog)
    with pytest.raises(ParameterError, match="a promotion id or a field"):
        rollback(reason="r", catalog=catalog)
    assert production_tiles(field, catalog=catalog) == before


def test_a_concurrent_reader_never_sees_two_versions_of_a_tile(
        catalog: Catalog, field_runs: dict[str, Any]) -> None:
    """Promote and roll back over and over while a reader counts rows per tile and run."""
    field, prod, exp = field_runs["field"], field_runs["prod"], field_runs["exp"]
    publish(prod, catalog=catalog)
    seen: list[dict[str, set[str]]] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def read() -> None:
        engine = get_engine(catalog.dsn)
        try:
            while not stop.is_set():
                with engine.connect() as conn:
                    got = conn.execute(sa.text(
                        "SELECT tile_id, run_id, count(*) FROM coadd_sources_prod "
                        "WHERE tile_id = ANY(:t) AND run_id = ANY(:r) GROUP BY tile_id, run_id"),
                        {"t": TILES, "r": [prod, exp]}).all()
                per: dict[str, set[str]] = {}
                for tile, run, n in got:
                    assert n == 30, (tile, run, n)  # a whole tile, never half of one
                    per.setdefault(tile, set()).add(run)
                seen.append(per)
        except BaseException as exc:
            failures.append(exc)
        finally:
            engine.dispose()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        # at least 15 switches, and on until the reader has read often enough to see both
        # versions, however slow the machine: a count of reads, never a time, ends the loop
        cycles, deadline = 0, time.monotonic() + 120
        while cycles < 15 or (len(seen) < 20 and time.monotonic() < deadline):
            promote(exp, reason="try", catalog=catalog)
            if len(seen) < 20:
                time.sleep(0.01)  # let the reader see the promoted state too
            rollback(field=field, reason="undo", catalog=catalog)
            cycles += 1
    finally:
        time.sleep(0.05)
        stop.set()
        reader.join(timeout=30)
    assert not failures, failures
    assert len(seen) >= 20, len(seen)
    assert all(len(runs) == 1 for per in seen for runs in per.values())
    assert all(set(per) == set(TILES) for per in seen)  # no tile ever vanished
    # a promotion switches its tiles together: never one tile promoted and one not
    assert all(per[TILES[0]] == per[TILES[1]] for per in seen)
    versions = {per[TILES[0]].pop() for per in seen}
    assert versions <= {prod, exp}


def test_list_runs_and_record(catalog: Catalog, field_runs: dict[str, Any]) -> None:
    field, prod, exp = field_runs["field"], field_runs["prod"], field_runs["exp"]
    publish(prod, catalog=catalog)
    table = list_runs(field=field, catalog=catalog)
    assert set(table["run_id"]) == {prod, exp}
    assert dict(zip(table["run_id"], table["production_tiles"], strict=True)) == {
        prod: 3, exp: 0}
    assert list(list_runs(field=field, type="exp", catalog=catalog)["run_id"]) == [exp]
    rec = run_record(prod, catalog=catalog)
    assert (rec.field, rec.planned_tiles, rec.missing_tiles) == (field, tuple(TILES), {})
    assert f"production 3 tile(s): {', '.join(TILES)}" in str(rec)
    with pytest.raises(ParameterError, match="type must be one of"):
        list_runs(type="nightly", catalog=catalog)
    with pytest.raises(ParameterError, match="limit must be a positive integer"):
        list_runs(limit=0, catalog=catalog)


def test_production_runs_finished_before_v4_become_production(scratch: str) -> None:
    """Upgrading a v3 catalog: the newest finished production run of each tile is its
    production (as the old type-based views showed every production run)."""
    from lazysky.catalog.schema import SCHEMA_VERSION, apply_up_to, upgrade

    engine = get_engine(scratch)
    old, new, failed = new_run_id("prod"), new_run_id("prod"), new_run_id("prod")
    try:
        with engine.begin() as conn:
            apply_up_to(conn, 3)
            for i, (run, status, tiles) in enumerate([(old, "done", TILES),
                                                      (new, "done_with_errors", TILES[:1]),
                                                      (failed, "failed", TILES)]):
                conn.execute(sa.text(
                    "INSERT INTO runs (run_id, software_version, status, config, finished_at) "
                    "VALUES (:r, '0', :s, '{\"field\": {\"name\": \"deep\"}}', "
                    "now() + make_interval(secs => :i))"), {"r": run, "s": status, "i": i})
                for tile in tiles:
                    conn.execute(sa.text(
                        "INSERT INTO run_tiles (run_id, stage, tile_id) "
                        "VALUES (:r, 'detect-coadd', :t)"), {"r": run, "t": tile})
                    conn.execute(sa.text(
                        "INSERT INTO coadd_sources (run_id, tile_id, number, x, y, ra, dec) "
                        "VALUES (:r, :t, 1, 0, 0, 10, 20)"), {"r": run, "t": tile})
        assert upgrade(engine) == SCHEMA_VERSION
        with engine.connect() as conn:
            prod = dict(conn.execute(sa.text(
                "SELECT tile_id, run_id FROM production_tiles WHERE field = 'deep'")).all())
            shown = sorted(conn.execute(sa.text(
                "SELECT tile_id, run_id FROM coadd_sources_prod")).all())
        assert prod == {TILES[0]: new, TILES[1]: old, TILES[2]: old}
        assert shown == sorted(prod.items())
    finally:
        engine.dispose()


def test_runs_command(catalog: Catalog, field_runs: dict[str, Any],
                      monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    """`lazysky runs list|show|promote|rollback|history` against the real catalog."""
    import os

    from lazysky.cli import main

    for name in list(os.environ):
        if name.startswith("LAZYSKY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LAZYSKY_CATALOG_DSN", catalog.dsn)
    field, prod, exp = field_runs["field"], field_runs["prod"], field_runs["exp"]
    publish(prod, catalog=catalog)
    assert main(["runs", "list", "--field", field, "--format", "csv"]) == 0
    listed = capsys.readouterr().out
    assert prod in listed
    assert exp in listed
    assert main(["runs", "promote", exp, "--reason", "better PSF", "--by", "carol"]) == 0
    out = capsys.readouterr().out
    assert f"carol: promoted {exp} on 2 tile(s) of {field} — better PSF" in out
    assert production_tiles(field, catalog=catalog)[TILES[0]] == exp
    assert main(["runs", "show", exp]) == 0
    shown = capsys.readouterr().out
    assert f"production 2 tile(s): {TILES[0]}, {TILES[1]}" in shown
    assert "history" in shown
    assert "carol: promoted" in shown
    from lazysky.catalog.qa import write_qa

    write_qa(exp, [{"product": field, "tile_id": TILES[0], "kind": "coadd",
                    "flagged": True, "reasons": ["psf_fwhm_arcsec 3.1 > 2.5"]},
                   {"product": field, "tile_id": TILES[1], "kind": "coadd"}], catalog=catalog)
    assert main(["runs", "show", exp]) == 0
    shown = capsys.readouterr().out
    assert "qa         2 tile(s) × product measured, 1 flagged" in shown
    assert f"flagged    {field} {TILES[0]}: psf_fwhm_arcsec 3.1 > 2.5" in shown
    assert main(["runs", "rollback", "--field", field, "--reason", "no"]) == 0
    assert production_tiles(field, catalog=catalog)[TILES[0]] == prod
    assert main(["runs", "history", "--field", field]) == 0
    hist = capsys.readouterr().out
    assert "rolled back promotion" in hist
    assert f"{TILES[0]} {prod}" in hist
    # bad input: a clear error on stderr, exit 1, production unchanged
    assert main(["runs", "promote", new_run_id("exp"), "--reason", "x"]) == 1
    assert "unknown run" in capsys.readouterr().err
    assert main(["runs", "promote", "not-a-run", "--reason", "x"]) == 1
    assert "not a run id" in capsys.readouterr().err
    assert production_tiles(field, catalog=catalog)[TILES[0]] == prod


def test_a_run_the_gc_collects_while_a_promotion_waits_is_refused(
        catalog: Catalog, field_runs: dict[str, Any]) -> None:
    """The promotion reads the run, then waits for the field's lock that the gc holds
    (as lazysky.gc does) while it marks the run and deletes its rows: once the lock is
    free, the promotion re-reads what the gc left and refuses; production is unchanged."""
    from lazysky.catalog.schema import run_expiry, run_tiles

    field, prod, exp = field_runs["field"], field_runs["prod"], field_runs["exp"]
    publish(prod, catalog=catalog)
    before = production_tiles(field, catalog=catalog)
    engine = get_engine(catalog.dsn)
    outcome: list[BaseException | object] = []
    try:
        with engine.begin() as gc_conn:
            gc_conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
                _LOCK_NAMESPACE, sa.func.hashtext(field))))
            waiter = threading.Thread(target=lambda: outcome.append(
                _try(lambda: promote(exp, reason="race", catalog=catalog))))
            waiter.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the promotion waits on the lock
                with engine.connect() as probe:
                    if probe.execute(sa.text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND NOT granted")).scalar():
                        break
                time.sleep(0.05)
            else:
                pytest.fail("the promotion never waited for the field's lock")
            gc_conn.execute(run_expiry.insert().values(run_id=exp, reason="exp: 30 days",
                                                       by="test"))
            gc_conn.execute(run_tiles.delete().where(run_tiles.c.run_id == exp))
        waiter.join(timeout=60)
    finally:
        engine.dispose()
    assert len(outcome) == 1
    assert isinstance(outcome[0], CatalogError), outcome
    assert f"run {exp} is expiring (lazysky gc collected it" in str(outcome[0])
    assert production_tiles(field, catalog=catalog) == before


def _try(call: Callable[[], object]) -> BaseException | object:
    try:
        return call()
    except BaseException as exc:
        return exc

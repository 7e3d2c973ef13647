"""Versioned schema, constraints and production views."""

from __future__ import annotations

import re

import psycopg
import pytest
import sqlalchemy as sa

from lazysky.catalog import Catalog, CatalogError, finish_run, register_run
from lazysky.catalog.database import libpq_dsn
from lazysky.catalog.schema import SCHEMA_VERSION, current_version, runs, upgrade
from lazysky.runs import Run, new_run_id

pytestmark = pytest.mark.postgres


def test_upgrade_is_recorded_and_idempotent(catalog: Catalog) -> None:
    assert upgrade(catalog.engine()) == SCHEMA_VERSION
    with catalog.engine().connect() as conn:
        assert current_version(conn) == SCHEMA_VERSION
        n = conn.execute(sa.text("SELECT count(*) FROM lazysky_schema")).scalar()
    assert n == SCHEMA_VERSION


def test_gist_indexes_exist(catalog: Catalog) -> None:
    with catalog.engine().connect() as conn:
        defs = set(conn.execute(sa.text(
            "SELECT indexdef FROM pg_indexes WHERE indexdef LIKE '%USING gist%'")).scalars())
    # pos: pgSphere's default class or, since v11, lazysky's copy of it (catalog/_gist.py)
    assert any(re.search(r"coadd_sources USING gist \(pos( spoint_lazysky)?\)", d) for d in defs)
    assert any(re.search(r"diff_sources USING gist \(pos( spoint_lazysky)?\)", d) for d in defs)
    assert any("exposures USING gist (footprint)" in d for d in defs)


@pytest.mark.parametrize(("sql", "constraint"), [
    ("INSERT INTO runs (run_id, software_version) VALUES ('bogus', '0')", "run_id_form"),
    ("INSERT INTO exposures VALUES ('e', 'i', 'r', 60000, -1, NULL)", "exptime_positive"),
])
def test_constraints_hold_in_the_database(catalog: Catalog, sql: str, constraint: str) -> None:
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn, pytest.raises(
            psycopg.errors.CheckViolation, match=constraint):
        conn.execute(sql)


def test_run_lifecycle_and_lineage(catalog: Catalog) -> None:
    parent = Run(new_run_id("prod"), config={"k": 1}, inputs={"a.fits": "f" * 64})
    child = Run(new_run_id("repr"), parent_run_id=parent.run_id)
    register_run(parent, catalog=catalog)
    register_run(parent, catalog=catalog)  # again: no-op
    register_run(child, catalog=catalog)
    finish_run(parent.run_id, status="done", timings={"detect": 1.5}, catalog=catalog)
    with catalog.engine().connect() as conn:
        row = conn.execute(sa.select(runs).where(runs.c.run_id == parent.run_id)).one()
        kid = conn.execute(sa.select(runs).where(runs.c.run_id == child.run_id)).one()
        prod_ids = set(conn.execute(sa.text("SELECT run_id FROM runs_prod")).scalars())
    assert (row.run_type, row.status, row.timings, row.inputs) == (
        "prod", "done", {"detect": 1.5}, {"a.fits": "f" * 64})
    assert row.finished_at is not None
    assert kid.parent_run_id == parent.run_id
    assert parent.run_id in prod_ids
    assert child.run_id not in prod_ids
    orphan = Run(new_run_id("repr"), parent_run_id=new_run_id("prod"))
    with pytest.raises(CatalogError, match="cannot register run"):
        register_run(orphan, catalog=catalog)
    with pytest.raises(CatalogError, match="not registered"):
        finish_run(new_run_id("exp"), catalog=catalog)


def test_a_v1_catalog_upgrades_to_the_current_schema(scratch: str) -> None:
    """A database made by the first release (v1 only) upgrades in place, rows kept."""
    from lazysky.catalog.database import get_engine
    from lazysky.catalog.schema import apply_up_to

    engine = get_engine(scratch)
    try:
        with engine.begin() as conn:  # what v1 made
            apply_up_to(conn, 1)
            conn.execute(runs.insert().values(run_id=new_run_id("prod"), software_version="0",
                                              status="done"))
            with pytest.raises(sa.exc.IntegrityError, match="run_status"), conn.begin_nested():
                conn.execute(sa.text("UPDATE runs SET status = 'done_with_errors'"))
        assert upgrade(engine) == SCHEMA_VERSION
        with engine.begin() as conn:
            conn.execute(sa.text(
                "UPDATE runs SET status = 'done_with_errors', errors = '{\"x.fits\": \"bad\"}'"))
            row = conn.execute(sa.text("SELECT status, errors FROM runs_prod")).one()
            assert tuple(row) == ("done_with_errors", {"x.fits": "bad"})
            assert conn.execute(sa.text("SELECT count(*) FROM run_tiles")).scalar() == 0
    finally:
        engine.dispose()


def test_tiles_done_are_recorded_per_stage_idempotently(catalog: Catalog) -> None:
    from lazysky.catalog import done_tiles, mark_tile_done

    run = Run(new_run_id("test"))
    register_run(run, catalog=catalog)
    assert done_tiles(run.run_id, "detect-coadd", catalog=catalog) == {}
    mark_tile_done(run.run_id, "detect-coadd", "t000_000", rows=12, catalog=catalog)
    mark_tile_done(run.run_id, "detect-coadd", "t000_000", rows=13, catalog=catalog)  # again
    mark_tile_done(run.run_id, "detect-coadd", "t000_001", catalog=catalog)
    mark_tile_done(run.run_id, "detect-diff", "t000_000", rows=2, catalog=catalog)
    assert done_tiles(run.run_id, "detect-coadd", catalog=catalog) == {
        "t000_000": 13, "t000_001": 0}
    assert done_tiles(run.run_id, "detect-diff", catalog=catalog) == {"t000_000": 2}
    with pytest.raises(CatalogError, match="cannot mark tile"):
        mark_tile_done(new_run_id("test"), "detect-coadd", "t000_000", catalog=catalog)
    finish_run(run.run_id, status="done_with_errors", errors={"e1": "corrupt"},
               catalog=catalog)
    with catalog.engine().connect() as conn:
        row = conn.execute(sa.select(runs.c.status, runs.c.errors).where(
            runs.c.run_id == run.run_id)).one()
    assert tuple(row) == ("done_with_errors", {"e1": "corrupt"})

"""The replace path's index: coadd rows of a (run, tile) found without a primary key."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from lazysky.catalog import Catalog, write_sources
from lazysky.catalog.database import libpq_dsn

pytestmark = pytest.mark.postgres


def _indexes(conn: psycopg.Connection, table: str) -> dict[str, tuple[bool, str]]:
    rows = conn.execute(
        "SELECT c.relname, i.indisunique, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass",
        (table,)).fetchall()
    return {name: (unique, definition) for name, unique, definition in rows}


def test_coadd_rows_are_found_by_a_non_unique_run_tile_index(catalog: Catalog) -> None:
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        coadd = _indexes(conn, "coadd_sources")
        diff = _indexes(conn, "diff_sources")
        dedup = conn.execute(
            "SELECT coalesce(reloptions::text, '') FROM pg_class "
            "WHERE relname = 'ix_coadd_sources_run_tile'").fetchone()
    assert coadd["ix_coadd_sources_run_tile"][0] is False
    assert coadd["ix_coadd_sources_run_tile"][1].endswith("USING btree (run_id, tile_id)")
    assert not any(unique for unique, _ in coadd.values())  # no primary key any more
    assert dedup is not None
    assert "deduplicate_items=off" not in dedup[0]
    # difference sources keep (run_id, tile_id, number) as their key
    assert diff["diff_sources_pkey"][0] is True


def test_the_replace_finds_the_tile_by_the_index(catalog: Catalog,
                                                make_run: Callable[..., str],
                                                sources: Callable[..., dict[str, np.ndarray]]
                                                ) -> None:
    """With statistics that know the table, the DELETE of one (run, tile) is an index
    scan, not a scan of the whole table (at 10 M rows that would be seconds a tile)."""
    run = make_run()
    for t in range(4):
        write_sources("coadd", run, f"plan-{t}", sources(1500, seed=t), catalog=catalog)
    with psycopg.connect(libpq_dsn(catalog.dsn), autocommit=True) as conn:
        conn.execute("ANALYZE coadd_sources")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN DELETE FROM coadd_sources WHERE run_id = %s AND tile_id = %s",
            (run, "plan-2")).fetchall())
    assert "ix_coadd_sources_run_tile" in plan, plan
    assert "Seq Scan" not in plan, plan


def test_a_v4_catalog_upgrades_keeping_its_rows(catalog: Catalog) -> None:
    """A catalog with the primary key (schema v4) gets the index; rows kept; then the
    replace works on it."""
    from lazysky.catalog import open_catalog, register_run
    from lazysky.catalog._extension import ensure_pg_sphere
    from lazysky.catalog.database import get_engine
    from lazysky.catalog.schema import MIGRATIONS, SCHEMA_VERSION, schema_version, upgrade
    from lazysky.runs import Run, new_run_id

    admin = libpq_dsn(catalog.dsn).replace("/lazysky?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS upgrade_index")
        conn.execute("CREATE DATABASE upgrade_index")
    dsn = catalog.dsn.replace("/lazysky?", "/upgrade_index?")
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        ensure_pg_sphere(conn)
    engine = get_engine(dsn)
    run = Run(new_run_id("exp"))
    try:
        with engine.begin() as conn:  # the schema before this change, with rows
            schema_version.create(conn)
            for step in MIGRATIONS:
                if step.apply.__name__ == "_v5_coadd_run_tile_index":
                    break
                step.apply(conn)
                conn.execute(schema_version.insert().values(version=step.version,
                                                            description="old"))
            conn.execute(sa.text("DROP INDEX IF EXISTS ix_coadd_sources_run_tile"))
            conn.execute(sa.text("INSERT INTO runs (run_id, software_version) "
                                 "VALUES (:r, '0')"), {"r": run.run_id})
            conn.execute(sa.text(
                "INSERT INTO coadd_sources (run_id, tile_id, number, x, y, ra, dec) "
                "SELECT :r, 't' || (i % 3), i, 0, 0, i * 0.01, 0 "
                "FROM generate_series(1, 300) i"), {"r": run.run_id})
        with psycopg.connect(libpq_dsn(dsn)) as conn:
            assert "coadd_sources_pkey" in _indexes(conn, "coadd_sources")
        assert upgrade(engine) == SCHEMA_VERSION
        with psycopg.connect(libpq_dsn(dsn)) as conn:
            after = _indexes(conn, "coadd_sources")
            n = conn.execute("SELECT count(*) FROM coadd_sources").fetchone()
        assert "coadd_sources_pkey" not in after
        assert "ix_coadd_sources_run_tile" in after
        assert n == (300,)
        scratch = open_catalog(dsn=dsn)
        register_run(run, catalog=scratch)
        rows = {"x": np.zeros(5), "y": np.zeros(5), "ra": np.arange(5.0), "dec": np.zeros(5)}
        got = write_sources("coadd", run.run_id, "t1", rows, catalog=scratch)
        assert (got.deleted, got.inserted) == (100, 5)
        scratch.engine().dispose()
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE upgrade_index WITH (FORCE)")

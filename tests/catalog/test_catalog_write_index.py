"""The replace path's index: coadd rows of a (run, tile) found without a primary key."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from lazysky.catalog import Catalog, write_sources
from lazysky.catalog.database import libpq_dsn
from lazysky.runs import parse_run_id

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
        # every partition holding rows has it too, and no unique index
        parts = conn.execute(
            "SELECT c.relname, bool_or(i.indisunique), "
            "bool_or(pg_get_indexdef(i.indexrelid) LIKE '%btree (run_id, tile_id)') "
            "FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid "
            "JOIN pg_index i ON i.indrelid = c.oid WHERE c.relname LIKE 'coadd_sources__%%' "
            "AND c.relkind = 'r' GROUP BY c.relname").fetchall()
    assert coadd["ix_coadd_sources_run_tile"][0] is False
    assert coadd["ix_coadd_sources_run_tile"][1].endswith("USING btree (run_id, tile_id)")
    assert not any(unique for unique, _ in coadd.values())  # no primary key any more
    assert dedup is not None
    assert "deduplicate_items=off" not in dedup[0]
    assert parts
    assert all(not unique and has_index for _, unique, has_index in parts), parts
    # difference sources keep (run_id, tile_id, number) (+ partition keys) as their key
    assert diff["diff_sources_pkey"][0] is True


def test_the_replace_finds_the_tile_by_the_index(catalog: Catalog,
                                                make_run: Callable[..., str],
                                                sources: Callable[..., dict[str, np.ndarray]]
                                                ) -> None:
    """With statistics that know the table, the writer's DELETE of one (run, tile) is an
    index scan, not a scan of the whole partition (at 10 M rows: seconds a tile)."""
    run = make_run()
    for t in range(4):
        write_sources("coadd", run, f"plan-{t}", sources(1500, seed=t), catalog=catalog)
    rid = parse_run_id(run)
    with psycopg.connect(libpq_dsn(catalog.dsn), autocommit=True) as conn:
        conn.execute("ANALYZE coadd_sources")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN DELETE FROM coadd_sources WHERE run_type = %s AND run_month = %s "
            "AND run_id = %s AND tile_id = %s",
            (rid.type, rid.date.replace(day=1), run, "plan-2")).fetchall())
        used = set(re.findall(r"Index Scan on (\w+)|Index Scan using (\w+)", plan))
        names = {n for pair in used for n in pair if n}
        run_tile = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
            "WHERE pg_get_indexdef(c.oid) LIKE '%%coadd_sources%%btree (run_id, tile_id)'"
        ).fetchall()}
    assert names, plan
    assert names <= run_tile, plan
    assert "Seq Scan" not in plan, plan


def test_a_v5_catalog_upgrades_keeping_its_rows(scratch: str) -> None:
    """A catalog with the primary key (schema v5, partitioned) gets the index; rows
    kept; then the replace works on it."""
    from lazysky.catalog import register_run
    from lazysky.catalog.database import get_engine
    from lazysky.catalog.schema import (
        MIGRATIONS,
        SCHEMA_VERSION,
        apply_up_to,
        coadd_sources,
        upgrade,
    )
    from lazysky.runs import Run, new_run_id

    before = next(m.version for m in MIGRATIONS
                  if m.apply.__name__.endswith("_coadd_run_tile_index")) - 1
    engine = get_engine(scratch)
    run = Run(new_run_id("exp"))
    rid = parse_run_id(run.run_id)
    try:
        with engine.begin() as conn:  # the schema before this change, with rows
            apply_up_to(conn, before)
            conn.execute(sa.text("DROP INDEX IF EXISTS ix_coadd_sources_run_tile"))
            conn.execute(sa.text("INSERT INTO runs (run_id, software_version) "
                                 "VALUES (:r, '0')"), {"r": run.run_id})
            cols = {c.name for c in coadd_sources.columns}
            keys = ", run_type, run_month" if "run_month" in cols else ""
            vals = ", :t, :m" if keys else ""
            conn.execute(sa.text(
                f"INSERT INTO coadd_sources (run_id, tile_id, number, x, y, ra, dec{keys}) "
                f"SELECT :r, 't' || (i % 3), i, 0, 0, i * 0.01, 0{vals} "
                "FROM generate_series(1, 300) i"),
                {"r": run.run_id, "t": rid.type, "m": rid.date.replace(day=1)})
        with psycopg.connect(libpq_dsn(scratch)) as conn:
            assert "coadd_sources_pkey" in _indexes(conn, "coadd_sources")
        assert upgrade(engine) == SCHEMA_VERSION
        with psycopg.connect(libpq_dsn(scratch)) as conn:
            after = _indexes(conn, "coadd_sources")
            n = conn.execute("SELECT count(*) FROM coadd_sources").fetchone()
        assert "coadd_sources_pkey" not in after
        assert "ix_coadd_sources_run_tile" in after
        assert n == (300,)
        catalog = Catalog(scratch)  # not open_catalog: it remembers a DSN as prepared
        register_run(run, catalog=catalog)
        rows = {"x": np.zeros(5), "y": np.zeros(5), "ra": np.arange(5.0), "dec": np.zeros(5)}
        got = write_sources("coadd", run.run_id, "t1", rows, catalog=catalog)
        assert (got.deleted, got.inserted) == (100, 5)
        catalog.engine().dispose()
    finally:
        engine.dispose()

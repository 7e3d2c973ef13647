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
        with psycopg.connect(libpq_dsn(scratch)) as conn:  # v11: the GiST rebuilt, rows kept
            classes = _pos_index_classes(conn)
            conn.execute("SET enable_seqscan = off")
            near = conn.execute("SELECT count(*) FROM coadd_sources WHERE pos <@ scircle("
                                "spoint(radians(1.0), 0), radians(0.015))").fetchone()
        assert set(classes.values()) == {"spoint_lazysky"}, classes
        assert near == (3,)  # ra 0.99, 1.00, 1.01 (rows i = 99, 100, 101)
        catalog = Catalog(scratch)  # not open_catalog: it remembers a DSN as prepared
        register_run(run, catalog=catalog)
        rows = {"x": np.zeros(5), "y": np.zeros(5), "ra": np.arange(5.0), "dec": np.zeros(5)}
        got = write_sources("coadd", run.run_id, "t1", rows, catalog=catalog)
        assert (got.deleted, got.inserted) == (100, 5)
        catalog.engine().dispose()
    finally:
        engine.dispose()


def _pos_index_classes(conn: psycopg.Connection) -> dict[str, str]:
    """Every GiST index on a source table's (or partition's) ``pos``: name -> opclass."""
    rows = conn.execute(
        "SELECT ic.relname, oc.opcname FROM pg_index i "
        "JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class tc ON tc.oid = i.indrelid "
        "JOIN pg_am a ON a.oid = ic.relam JOIN pg_opclass oc ON oc.oid = i.indclass[0] "
        "WHERE a.amname = 'gist' AND tc.relname ~ '^(coadd|diff)_sources' "
        "AND pg_get_indexdef(i.indexrelid) LIKE '%%(pos%%'").fetchall()
    return {name: opclass for name, opclass in rows}


def test_positions_are_indexed_with_the_class_without_decompress(catalog: Catalog) -> None:
    """Every source table's and partition's GiST index on pos uses lazysky's class, which
    has every operator of pgSphere's default class and all its support functions but the
    no-op decompress (and a write then a cone search use it: tests/catalog/test_*cone*,
    test_catalog_xmatch read those plans)."""
    from lazysky.catalog._gist import OPCLASS

    members = (
        "SELECT 'op', o.amopstrategy, o.amopopr::regoperator::text FROM pg_amop o "
        "WHERE o.amopfamily = %(f)s UNION ALL "
        "SELECT 'fn', p.amprocnum, p.amproc::regprocedure::text FROM pg_amproc p "
        "WHERE p.amprocfamily = %(f)s")
    family = ("SELECT c.opcfamily FROM pg_opclass c JOIN pg_am a ON a.oid = c.opcmethod "
              "JOIN pg_type t ON t.oid = c.opcintype WHERE a.amname = 'gist' "
              "AND t.typname = 'spoint' AND ")
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        classes = _pos_index_classes(conn)
        ours_f = conn.execute(family + "c.opcname = %s", (OPCLASS,)).fetchone()
        default_f = conn.execute(family + "c.opcdefault").fetchone()
        assert ours_f is not None
        assert default_f is not None
        ours = set(conn.execute(members, {"f": ours_f[0]}).fetchall())
        default = set(conn.execute(members, {"f": default_f[0]}).fetchall())
    assert {"ix_coadd_sources_pos", "ix_diff_sources_pos"} <= set(classes)
    assert len(classes) > 2  # the partitions' indexes too
    assert set(classes.values()) == {OPCLASS}, classes
    assert default - ours == {("fn", 4, "g_spherekey_decompress(internal)")}
    assert ours < default


def test_without_superuser_the_default_class_stays(catalog: Catalog) -> None:
    """A role that may not create operator classes gets None, nothing made, no error."""
    from lazysky.catalog._gist import ensure_spoint_opclass

    engine = sa.create_engine(catalog.engine().url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn, conn.begin() as tx:
            conn.execute(sa.text("DROP OPERATOR CLASS spoint_lazysky USING gist CASCADE"))
            conn.execute(sa.text("SET LOCAL ROLE lazysky_reader"))
            assert ensure_spoint_opclass(conn) is None
            conn.execute(sa.text("RESET ROLE"))
            left = conn.execute(sa.text(
                "SELECT count(*) FROM pg_opclass WHERE opcname = 'spoint_lazysky'")).scalar()
            assert left == 0
            tx.rollback()  # the catalog keeps its class and indexes
    finally:
        engine.dispose()
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        assert "ix_coadd_sources_pos" in _pos_index_classes(conn)


def test_a_written_tile_is_found_whole_through_the_new_class(
        catalog: Catalog, make_run: Callable[..., str],
        sources: Callable[..., dict[str, np.ndarray]]) -> None:
    """Rows written after v11 are all there, and a cone over them is answered by an index
    scan of a partition index built with lazysky's class, with the brute-force answer."""
    from astropy.coordinates import SkyCoord

    from lazysky.catalog._gist import OPCLASS

    run = make_run()
    rows = sources(2000, seed=11, ra_range=(40.0, 41.0), dec_range=(-30.0, -29.0))
    got = write_sources("coadd", run, "opclass-0", rows, catalog=catalog)
    centre, radius = (40.5, -29.5), 0.2
    # run_id || '': as cone_search writes a run filter (never drive from the run index)
    cone = ("SELECT number FROM coadd_sources WHERE run_type = 'test' AND run_id || '' = %s "
            "AND pos <@ scircle(spoint(radians(%s), radians(%s)), radians(%s))")
    args = (run, *centre, radius)
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        n = conn.execute("SELECT count(*) FROM coadd_sources WHERE run_id = %s",
                         (run,)).fetchone()
        found = {r[0] for r in conn.execute(cone, args).fetchall()}
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + cone, args).fetchall())
        classes = _pos_index_classes(conn)
    assert got.inserted == 2000
    assert n == (2000,)
    used = re.findall(r"Index Scan (?:using|on) (\w+_pos_idx\w*)", plan)
    assert used, plan
    assert {classes[name] for name in used} == {OPCLASS}, plan
    sep = SkyCoord(rows["ra"], rows["dec"], unit="deg").separation(
        SkyCoord(*centre, unit="deg")).deg
    expected = set((np.flatnonzero(sep < radius) + 1).tolist())  # numbers are 1…n
    assert len(expected) > 50
    assert found == expected

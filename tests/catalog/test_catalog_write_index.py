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
from lazysky.catalog.schema import RUN_TILE_BLOOM_DISTINCT
from lazysky.runs import parse_run_id

pytestmark = pytest.mark.postgres

#: v12's BRIN as PostgreSQL ≥ 14 (the test server) spells it
_BRIN = ("USING brin (run_id, tile_id text_bloom_ops (n_distinct_per_range="
         f"'{RUN_TILE_BLOOM_DISTINCT}'))")


def _indexes(conn: psycopg.Connection, table: str) -> dict[str, tuple[bool, str]]:
    rows = conn.execute(
        "SELECT c.relname, i.indisunique, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass",
        (table,)).fetchall()
    return {name: (unique, definition) for name, unique, definition in rows}


def test_coadd_rows_are_found_by_a_brin_run_tile_index(catalog: Catalog) -> None:
    """v12: coadd_sources and every partition holding rows have a BRIN on (run_id,
    tile_id) with the chosen pages per range and autosummarize, no btree on those columns
    and no unique index; difference sources keep their primary key."""
    from lazysky.catalog.schema import RUN_TILE_BRIN_PAGES

    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        coadd = _indexes(conn, "coadd_sources")
        diff = _indexes(conn, "diff_sources")
        options = conn.execute(
            "SELECT reloptions FROM pg_class WHERE relname = 'ix_coadd_sources_run_tile_brin'"
        ).fetchone()
        parts = conn.execute(
            "SELECT c.relname, bool_or(i.indisunique), "
            "bool_or(pg_get_indexdef(i.indexrelid) LIKE '%%USING brin (run_id, tile_id %%'), "
            "bool_or(pg_get_indexdef(i.indexrelid) LIKE '%%btree (run_id, tile_id)%%') "
            "FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid "
            "JOIN pg_index i ON i.indrelid = c.oid WHERE c.relname LIKE 'coadd_sources__%%' "
            "AND c.relkind = 'r' GROUP BY c.relname").fetchall()
    assert "ix_coadd_sources_run_tile" not in coadd  # v6's btree is gone
    brin = coadd["ix_coadd_sources_run_tile_brin"]
    assert brin[0] is False
    assert _BRIN in brin[1]  # run_id by min/max, tile_id by a Bloom filter
    assert options is not None
    # autosummarize off: the writer summarises (autovacuum's request queue overflows)
    assert options[0] == [f"pages_per_range={RUN_TILE_BRIN_PAGES}"]
    assert not any(unique for unique, _ in coadd.values())
    assert parts
    assert all(not unique and has_brin and not has_btree
               for _, unique, has_brin, has_btree in parts), parts
    assert diff["diff_sources_pkey"][0] is True


#: A tile's box inside one sky cell (schema v14), as a pipeline's tiles are.
_TILE_BOX = {"ra_range": (10.0, 11.0), "dec_range": (20.0, 21.0)}


def _one_cell(sources: Callable[..., dict[str, np.ndarray]], n: int, *,
              seed: int) -> dict[str, np.ndarray]:
    return sources(n, seed=seed, **_TILE_BOX)


def _cell(run: str) -> str:
    """The sky cell (leaf partition) the run's tiles in _TILE_BOX land in."""
    from lazysky.catalog.cells import cell_name, cells_of
    from lazysky.catalog.schema import partition_name

    rid = parse_run_id(run)
    ((band, slab),) = cells_of([10.5], [20.5])
    return cell_name(partition_name("coadd_sources", rid.type, rid.date.replace(day=1)),
                     band, slab)


def _plan(conn: psycopg.Connection, statement: str, args: tuple[object, ...]) -> str:
    return "\n".join(r[0] for r in conn.execute("EXPLAIN " + statement, args).fetchall())


def test_the_write_looks_up_the_ledger_and_a_retry_scans_the_brin(
        catalog: Catalog, make_run: Callable[..., str],
        sources: Callable[..., dict[str, np.ndarray]]) -> None:
    """A first write of a (run, tile) asks only the ledger (an index scan of its primary
    key) and deletes nothing; a retry's DELETE is a bitmap scan of the BRIN, never a
    sequential scan of the partition."""
    from lazysky.catalog.write import _FORGET_SQL

    run = make_run()
    for t in range(4):
        got = write_sources("coadd", run, f"plan-{t}", _one_cell(sources, 1500, seed=t),
                            catalog=catalog)
        assert got.deleted == 0
    again = write_sources("coadd", run, "plan-2", sources(700, seed=9), catalog=catalog)
    assert (again.deleted, again.inserted) == (1500, 700)
    rid = parse_run_id(run)
    with psycopg.connect(libpq_dsn(catalog.dsn), autocommit=True) as conn:
        conn.execute("ANALYZE coadd_sources")
        conn.execute("ANALYZE source_tiles")
        ledger = conn.execute(
            "SELECT tile_id, rows FROM source_tiles WHERE run_id = %s AND source_table = "
            "'coadd_sources' ORDER BY tile_id", (run,)).fetchall()
        conn.execute("SET enable_seqscan = off")  # a tiny ledger: a seq scan is cheaper
        lookup = _plan(conn, _FORGET_SQL.replace("%(run)s", "%s").replace(
            "%(table)s", "%s").replace("%(tile)s", "%s"), (run, "coadd_sources", "plan-9"))
        conn.execute("RESET enable_seqscan")
        # the tile's sky cell (each cell is planned alone; other tests' tiny cells may
        # rightly be read by a sequential scan)
        delete = _plan(conn, f"DELETE FROM {_cell(run)} WHERE run_type = %s AND run_month = "
                       "%s AND run_id = %s AND tile_id = %s",
                       (rid.type, rid.date.replace(day=1), run, "plan-2"))
    assert ledger == [("plan-0", 1500), ("plan-1", 1500), ("plan-2", 700), ("plan-3", 1500)]
    assert re.search(r"Index (Only )?Scan using source_tiles_pkey on source_tiles", lookup), \
        lookup
    assert " on coadd_sources" not in lookup, lookup  # the source table is not read
    assert re.search(r"Bitmap Index Scan on coadd_sources__\w+_run_id_tile_id_idx", delete), \
        delete
    assert "Seq Scan" not in delete, delete


def test_the_writer_summarises_the_ranges_it_filled(
        catalog: Catalog, make_run: Callable[..., str],
        sources: Callable[..., dict[str, np.ndarray]]) -> None:
    """After writes filling several BRIN ranges, every full range of the partition is
    summarised (a tile search then reads its ranges, not the whole new tail): what is
    left for ``brin_summarize_new_values`` is at most the partial last range."""
    from lazysky.catalog.schema import RUN_TILE_BRIN_PAGES

    run = make_run()
    part = _cell(run)
    for t in range(3):
        write_sources("coadd", run, f"sum-{t}", _one_cell(sources, 6000, seed=20 + t),
                      catalog=catalog)
    with psycopg.connect(libpq_dsn(catalog.dsn), autocommit=True) as conn:
        pages = conn.execute("SELECT pg_relation_size(%s) / current_setting('block_size')::int",
                             (part,)).fetchone()
        index = conn.execute(
            "SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON "
            "c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'brin' "
            "AND i.indrelid = %s::regclass", (part,)).fetchone()
        assert pages is not None
        assert index is not None
        left = conn.execute("SELECT brin_summarize_new_values(%s::regclass)",
                            (index[0],)).fetchone()
    assert pages[0] >= 3 * RUN_TILE_BRIN_PAGES  # the writes filled several ranges
    assert left is not None
    assert left[0] <= 1, f"{left[0]} ranges of {pages[0] // RUN_TILE_BRIN_PAGES} unsummarised"


def test_a_failed_write_records_nothing_in_the_ledger(
        catalog: Catalog, make_run: Callable[..., str],
        sources: Callable[..., dict[str, np.ndarray]]) -> None:
    """The ledger row commits with the rows or not at all: a write refused after the
    ledger statement (a CHECK on the rows) leaves neither, so the next first write of that
    (run, tile) still skips the DELETE correctly, and a failed retry keeps the old rows."""
    from lazysky.catalog import CatalogWriteError

    run = make_run()
    bad = sources(5, seed=1)
    bad["number"] = np.arange(5)  # 0 violates coadd_sources_number_positive
    with pytest.raises(CatalogWriteError, match="Nothing was changed"):
        write_sources("coadd", run, "fails", bad, catalog=catalog)
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        assert conn.execute("SELECT count(*) FROM source_tiles WHERE run_id = %s",
                            (run,)).fetchone() == (0,)
    first = write_sources("coadd", run, "fails", sources(6, seed=2), catalog=catalog)
    assert (first.deleted, first.inserted) == (0, 6)
    with pytest.raises(CatalogWriteError, match="Nothing was changed"):
        write_sources("coadd", run, "fails", bad, catalog=catalog)
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        assert conn.execute("SELECT rows FROM source_tiles WHERE run_id = %s",
                            (run,)).fetchall() == [(6,)]
        assert conn.execute("SELECT count(*) FROM coadd_sources WHERE run_id = %s",
                            (run,)).fetchone() == (6,)
    retry = write_sources("coadd", run, "fails", sources(4, seed=3), catalog=catalog)
    assert (retry.deleted, retry.inserted) == (6, 4)


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
        assert "ix_coadd_sources_run_tile_brin" in after  # v12 (v6 made a btree)
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


def test_a_v11_catalog_upgrades_to_the_brin_and_the_ledger(scratch: str) -> None:
    """From v11 (the btree, rows of both source tables written before the ledger existed):
    the upgrade swaps the btree for the BRIN, fills the ledger from the rows (so a
    retry of an old (run, tile) still replaces it), and keeps every row."""
    from lazysky.catalog import register_run
    from lazysky.catalog.database import get_engine
    from lazysky.catalog.schema import MIGRATIONS, SCHEMA_VERSION, apply_up_to, upgrade
    from lazysky.runs import Run, new_run_id

    before = next(m.version for m in MIGRATIONS
                  if m.apply.__name__.endswith("_brin_run_tile")) - 1
    engine = get_engine(scratch)
    run = Run(new_run_id("exp"))
    rid = parse_run_id(run.run_id)
    keys = {"r": run.run_id, "t": rid.type, "m": rid.date.replace(day=1)}
    try:
        with engine.begin() as conn:
            apply_up_to(conn, before)
            conn.execute(sa.text("INSERT INTO runs (run_id, software_version) "
                                 "VALUES (:r, '0')"), keys)
            conn.execute(sa.text(
                "INSERT INTO coadd_sources (run_id, tile_id, number, x, y, ra, dec, "
                "run_type, run_month) SELECT :r, 'c' || (i % 4), i, 0, 0, i * 0.01, 0, :t, "
                ":m FROM generate_series(1, 400) i"), keys)
            conn.execute(sa.text(
                "INSERT INTO diff_sources (run_id, tile_id, number, x, y, ra, dec, sign, "
                "run_type, run_month) SELECT :r, 'd0', i, 0, 0, i * 0.01, 0, 1, :t, :m "
                "FROM generate_series(1, 30) i"), keys)
        with psycopg.connect(libpq_dsn(scratch)) as conn:
            assert "ix_coadd_sources_run_tile" in _indexes(conn, "coadd_sources")
        assert upgrade(engine) == SCHEMA_VERSION
        with psycopg.connect(libpq_dsn(scratch)) as conn:
            after = _indexes(conn, "coadd_sources")
            ledger = conn.execute("SELECT source_table, tile_id, rows FROM source_tiles "
                                  "ORDER BY 1, 2").fetchall()
            counts = conn.execute("SELECT (SELECT count(*) FROM coadd_sources), "
                                  "(SELECT count(*) FROM diff_sources)").fetchone()
        assert "ix_coadd_sources_run_tile" not in after
        assert _BRIN in after["ix_coadd_sources_run_tile_brin"][1]
        assert ledger == [*(("coadd_sources", f"c{k}", 100) for k in range(4)),
                          ("diff_sources", "d0", 30)]
        assert counts == (400, 30)
        catalog = Catalog(scratch)
        register_run(run, catalog=catalog)
        rows = {"x": np.zeros(3), "y": np.zeros(3), "ra": np.arange(3.0), "dec": np.zeros(3)}
        old = write_sources("coadd", run.run_id, "c2", rows, catalog=catalog)
        new = write_sources("coadd", run.run_id, "c9", rows, catalog=catalog)
        diff = write_sources("diff", run.run_id, "d0", {**rows, "sign": np.ones(3)},
                             catalog=catalog)
        assert (old.deleted, new.deleted, diff.deleted) == (100, 0, 30)
        catalog.engine().dispose()
    finally:
        engine.dispose()


def test_summarising_steps_aside_for_a_busy_partition(
        catalog: Catalog, make_run: Callable[..., str],
        sources: Callable[..., dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch) -> None:
    """While another session holds a lock summarising would queue behind (VACUUM,
    ANALYZE), the writer's summarising does nothing at once instead of waiting; once it
    is released, the ranges left are summarised."""
    from lazysky.catalog import write as write_module

    run = make_run()
    part = _cell(run)
    monkeypatch.setattr(write_module, "SUMMARIZE_RANGES", 0)  # leave the ranges to us
    for t in range(2):
        write_sources("coadd", run, f"busy-{t}", _one_cell(sources, 6000, seed=40 + t),
                      catalog=catalog)
    monkeypatch.undo()
    dsn = libpq_dsn(catalog.dsn)
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn) as writer:
        holder.execute(f"LOCK TABLE {part} IN SHARE UPDATE EXCLUSIVE MODE")
        assert write_module._summarize_ranges(writer, part) == 0
        holder.rollback()  # released
        assert write_module._summarize_ranges(writer, part) >= 1
        assert write_module._summarize_ranges(writer, part) == 0  # nothing left

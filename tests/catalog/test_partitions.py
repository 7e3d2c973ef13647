"""Source tables partitioned by processing type and month (schema v5)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from lazysky.catalog import Catalog, CatalogWriteError, cone_query, open_catalog, write_sources
from lazysky.catalog.cells import cell_name, cells_of, ensure_cells
from lazysky.catalog.cone import explain
from lazysky.catalog.database import get_engine
from lazysky.catalog.production import promote, publish
from lazysky.catalog.schema import MONTHS_AHEAD, partition_name
from lazysky.runs import RUN_TYPES, new_run_id

pytestmark = pytest.mark.postgres

Sources = Callable[..., dict[str, np.ndarray]]


def _partition_of(catalog: Catalog, table: str, run_id: str) -> set[str]:
    with catalog.engine().connect() as conn:
        return set(conn.execute(sa.text(
            f"SELECT DISTINCT tableoid::regclass::text FROM {table} WHERE run_id = :r"),
            {"r": run_id}).scalars())


def _month_after(day: dt.date, months: int) -> dt.date:
    y, m = divmod(day.month - 1 + months, 12)
    return dt.date(day.year + y, m + 1, 1)


def test_upgrade_creates_the_next_months_ahead(catalog: Catalog) -> None:
    today = dt.datetime.now(dt.UTC).date()
    wanted = {partition_name(t, k, _month_after(today, i)) for t in ("coadd_sources",
              "diff_sources") for k in RUN_TYPES for i in range(MONTHS_AHEAD + 1)}
    with catalog.engine().connect() as conn:
        have = set(conn.execute(sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"))
            .scalars())
    assert wanted <= have


def test_rows_land_in_their_type_and_month_partition(catalog: Catalog, sources: Sources,
                                                     make_run: Callable[..., str]) -> None:
    from lazysky.catalog import register_run
    from lazysky.runs import Run

    old = new_run_id("exp", date="2019-03-14")  # a reprocessing of old data: its month
    register_run(Run(old), catalog=catalog)     # partition is made when it registers
    prod = make_run("prod")
    data = sources(50, seed=3, ra_range=(200.0, 200.2), dec_range=(10.0, 10.2))
    write_sources("coadd", old, "t1", data, catalog=catalog)
    write_sources("coadd", prod, "t1", data, catalog=catalog)
    write_sources("coadd", prod, "t1", data, catalog=catalog)  # a replace stays put
    # v14: a month partition of coadd_sources is split into sky cells; the rows are in
    # the cell of their position in their type and month
    ((band, slab),) = cells_of([200.1], [10.1])
    assert _partition_of(catalog, "coadd_sources", old) == {
        cell_name("coadd_sources__exp__2019_03", band, slab)}
    month = dt.datetime.now(dt.UTC).date()
    assert _partition_of(catalog, "coadd_sources", prod) == {
        cell_name(partition_name("coadd_sources", "prod", month), band, slab)}
    with catalog.engine().connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM coadd_sources WHERE run_id = :r"),
                            {"r": prod}).scalar() == 50
    # a cone search of one run reads that run's partition alone
    plan = explain(cone_query(200.1, 10.1, "5arcmin", run=old), catalog=catalog)
    assert set(re.findall(r"coadd_sources__\w+?__\d{4}_\d{2}", plan)) == {
        "coadd_sources__exp__2019_03"}


def test_a_row_cannot_claim_another_runs_partition(catalog: Catalog,
                                                   make_run: Callable[..., str]) -> None:
    run = make_run("exp")
    today = dt.datetime.now(dt.UTC).date()
    raw = catalog.engine().raw_connection()
    try:  # the sky cell of (1, 1) in both months (made by write_sources, as tiles land)
        for run_type, month in (("prod", today), ("exp", _month_after(today, 1))):
            ensure_cells(raw.driver_connection, partition_name("coadd_sources", run_type,
                                                               month), cells_of([1], [1]))
    finally:
        raw.close()
    with pytest.raises(sa.exc.IntegrityError, match=r"coadd_sources__prod__\d{4}_\d{2}_run_id"), \
            catalog.engine().begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO coadd_sources (run_id, tile_id, number, x, y, ra, dec, run_type, "
            "run_month) VALUES (:r, 't', 1, 0, 0, 1, 1, 'prod', date_trunc('month', now()))"),
            {"r": run})
    with pytest.raises(sa.exc.IntegrityError, match=r"coadd_sources__exp__\d{4}_\d{2}_run_id"), \
            catalog.engine().begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO coadd_sources (run_id, tile_id, number, x, y, ra, dec, run_type, "
            "run_month) VALUES (:r, 't', 1, 0, 0, 1, 1, 'exp', "
            "date_trunc('month', now()) + interval '1 month')"), {"r": run})  # exists, wrong


def test_writing_an_unregistered_run_is_refused(catalog: Catalog, sources: Sources) -> None:
    rid = new_run_id("val", date="2018-06-01")  # no partition and no run: a clear error
    with pytest.raises(CatalogWriteError, match="not registered"):
        write_sources("coadd", rid, "t", sources(3, seed=1), catalog=catalog)


def test_a_production_search_reads_only_the_partitions_of_production(
        scratch: str, sources: Sources, finish_lazysky_run: Callable[..., None]) -> None:
    """EXPLAIN ANALYZE of a cone on the production view: while production holds only
    prod runs, every other type's partitions are never executed; promote an experiment
    and its partition is read too."""
    from lazysky.catalog import register_run
    from lazysky.runs import Run

    catalog = open_catalog(dsn=scratch)
    try:
        prod, exp = new_run_id("prod"), new_run_id("exp")
        for run in (prod, exp):
            register_run(Run(run), catalog=catalog)
            data = sources(200, seed=len(run), ra_range=(30.0, 30.5), dec_range=(0.0, 0.5))
            write_sources("coadd", run, "t1", data, catalog=catalog)
            finish_lazysky_run(catalog, run, "deep", ["t1"])
        publish(prod, catalog=catalog)
        query = cone_query(30.25, 0.25, "10arcmin", table="coadd_prod")

        def executed(plan: str) -> set[str]:
            """The run types whose source partitions were scanned."""
            out = set()
            for line in plan.splitlines():
                m = re.search(r"on coadd_sources__(\w+?)__\d{4}_\d{2}", line)
                if m and "never executed" not in line:
                    out.add(m.group(1))
            return out

        plan = explain(query, analyze=True, catalog=catalog)
        assert executed(plan) == {"prod"}, plan
        assert "never executed" in plan
        promote(exp, reason="better", catalog=catalog)
        assert executed(explain(query, analyze=True, catalog=catalog)) == {"exp"}
    finally:
        catalog.engine().dispose()


def test_a_v4_catalog_upgrades_to_partitions_with_its_rows(scratch: str) -> None:
    from lazysky.catalog.schema import SCHEMA_VERSION, apply_up_to, upgrade

    engine = get_engine(scratch)
    runs = [new_run_id("prod", date="2026-01-05"), new_run_id("exp", date="2025-12-31")]
    try:
        with engine.begin() as conn:
            apply_up_to(conn, 4)
            for i, run in enumerate(runs):
                conn.execute(sa.text("INSERT INTO runs (run_id, software_version) "
                                     "VALUES (:r, '0')"), {"r": run})
                for table in ("coadd_sources", "diff_sources"):
                    extra = ("", "") if table == "coadd_sources" else (", sign", ", 1")
                    conn.execute(sa.text(
                        f"INSERT INTO {table} (run_id, tile_id, number, x, y, ra, dec{extra[0]}) "
                        f"SELECT :r, 't', n, 0, 0, 10 + n * 0.001, 20{extra[1]} "
                        "FROM generate_series(1, :k) n"), {"r": run, "k": 10 * (i + 1)})
        assert upgrade(engine) == SCHEMA_VERSION
        catalog: Any = type("C", (), {"engine": lambda self: engine})()
        for table in ("coadd_sources", "diff_sources"):
            assert _partition_of(catalog, table, runs[0]) == {f"{table}__prod__2026_01"}
            assert _partition_of(catalog, table, runs[1]) == {f"{table}__exp__2025_12"}
            with engine.connect() as conn:
                counts = dict(conn.execute(sa.text(
                    f"SELECT run_id, count(*) FROM {table} GROUP BY run_id")).all())
                assert conn.execute(sa.text(f"SELECT to_regclass('{table}_v4')")).scalar() \
                    is None
            assert counts == {runs[0]: 10, runs[1]: 20}
    finally:
        engine.dispose()


def test_a_month_partition_is_dropped_whole(catalog: Catalog, sources: Sources) -> None:
    """What gc does when every run of a type and month has expired."""
    from lazysky.catalog import register_run
    from lazysky.catalog.schema import drop_month_partitions, month_partitions
    from lazysky.runs import Run

    gone = new_run_id("test", date="2020-02-10")
    register_run(Run(gone), catalog=catalog)
    write_sources("diff", gone, "t", {**sources(5, seed=2), "sign": np.ones(5)},
                  catalog=catalog)
    with catalog.engine().begin() as conn:
        assert ("test", dt.date(2020, 2, 1)) in month_partitions(conn)
        dropped = drop_month_partitions(conn, "test", dt.date(2020, 2, 29))
        assert ("test", dt.date(2020, 2, 1)) not in month_partitions(conn)
        assert conn.execute(sa.text("SELECT count(*) FROM diff_sources WHERE run_id = :r"),
                            {"r": gone}).scalar() == 0
    assert dropped == ["coadd_sources__test__2020_02", "diff_sources__test__2020_02"]
    with catalog.engine().begin() as conn:  # again: nothing left to drop
        assert drop_month_partitions(conn, "test", dt.date(2020, 2, 1)) == []


def test_sessions_use_generic_plans(catalog: Catalog) -> None:
    """Prepared production cones are not re-planned per call (bench_partitions.py)."""
    with catalog.engine().connect() as conn:
        assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_generic_plan"
    # and a generic plan still reads only the run's partition, pruned at start-up
    from lazysky.catalog import register_run
    from lazysky.runs import Run

    run = new_run_id("exp", date="2019-05-02")
    register_run(Run(run), catalog=catalog)
    raw = catalog.engine().raw_connection()
    try:
        cur = raw.driver_connection.cursor()
        cur.execute("PREPARE c(text, text, date) AS SELECT count(*) FROM coadd_sources "
                    "WHERE run_id = $1 AND run_type = $2 AND run_month = $3")
        from psycopg import sql

        cur.execute(sql.SQL("EXPLAIN (ANALYZE, COSTS OFF) EXECUTE c({}, 'exp', '2019-05-01')")
                    .format(sql.Literal(run)))
        plan = "\n".join(r[0] for r in cur.fetchall())
        cur.execute("DEALLOCATE c")
    finally:
        raw.close()
    assert "Subplans Removed" in plan, plan

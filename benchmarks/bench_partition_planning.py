"""Cone-query cost against the number of leaf partitions: could #7 split months by Dec band?

The bulk load slows as one partition's GiST grows (docs/catalog.md); splitting each
(run type, month) partition into Dec bands would keep every index small, at the price
of more partitions for every query to plan or lock. This measures that price, on empty
look-alike tables (its own schema ``s<bands>`` in a private embedded server; nothing of
lazysky's schema is touched): ``src`` partitioned by run type (5), then month (4), then,
for ``bands`` > 1, Dec in ``bands`` equal ranges; a GiST on ``pos``; 20 000 rows in one
1° × 1° patch of one leaf. For each layout, a cone of ``--radius-deg`` at (1.5°, 0.5°):

* planning time (``EXPLAIN (SUMMARY)``, median of 100) without and with a Dec range
  (``dec BETWEEN dec0 - r AND dec0 + r``, which the planner prunes on);
* ms per query, one client, unprepared (planned each time) and prepared with a generic
  plan (``plan_cache_mode = force_generic_plan``, as lazysky's sessions plan cones:
  pruned at executor start-up), each without and with the Dec range.

Usage::

    python benchmarks/bench_partition_planning.py --bands 1 18 90 --radius-deg 0.016667
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import shutil
import statistics
import time
from pathlib import Path

import psycopg

from lazysky.catalog import open_catalog
from lazysky.catalog import server as catalog_server
from lazysky.catalog.database import libpq_dsn
from lazysky.config import load_settings

TYPES = ["exp", "prod", "repr", "test", "val"]
MONTHS = [datetime.date(2026, 11, 1), datetime.date(2026, 12, 1), datetime.date(2027, 1, 1),
          datetime.date(2027, 2, 1), datetime.date(2027, 3, 1)]
Q_NODEC = ("SELECT ra, dec FROM {s}.src WHERE "
           "pos <@ scircle(spoint(radians(%s), radians(%s)), radians(%s))")
Q_DEC = ("SELECT ra, dec FROM {s}.src WHERE dec BETWEEN %s - %s AND %s + %s AND "
         "pos <@ scircle(spoint(radians(%s), radians(%s)), radians(%s))")


def build(conn: psycopg.Connection, bands: int) -> tuple[str, int]:
    """The look-alike partitioned table with ``bands`` Dec bands; its schema and leaves."""
    s = f"s{bands}"
    conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
    conn.execute(f"CREATE SCHEMA {s}")
    conn.execute(f"CREATE TABLE {s}.src (run_type text NOT NULL, run_month date NOT NULL, "
                 f"ra float8 NOT NULL, dec float8 NOT NULL, pos spoint GENERATED ALWAYS AS "
                 f"(spoint(radians(ra), radians(dec))) STORED) PARTITION BY LIST (run_type)")
    for t in TYPES:
        conn.execute(f"CREATE TABLE {s}.src_{t} PARTITION OF {s}.src FOR VALUES IN ('{t}') "
                     f"PARTITION BY RANGE (run_month)")
        for m0, m1 in itertools.pairwise(MONTHS):
            leaf = f"{s}.src_{t}_{m0:%Y%m}"
            bounds = f"FOR VALUES FROM ('{m0}') TO ('{m1}')"
            if bands == 1:
                conn.execute(f"CREATE TABLE {leaf} PARTITION OF {s}.src_{t} {bounds}")
                continue
            conn.execute(f"CREATE TABLE {leaf} PARTITION OF {s}.src_{t} {bounds} "
                         f"PARTITION BY RANGE (dec)")
            edges = [-90 + 180 * i / bands for i in range(bands + 1)]
            for b in range(bands):
                hi = "MAXVALUE" if b == bands - 1 else edges[b + 1]
                conn.execute(f"CREATE TABLE {leaf}_b{b} PARTITION OF {leaf} "
                             f"FOR VALUES FROM ({edges[b]}) TO ({hi})")
    conn.execute(f"CREATE INDEX ON {s}.src USING gist (pos)")
    conn.execute(f"INSERT INTO {s}.src (run_type, run_month, ra, dec) SELECT 'test', "
                 f"'2026-11-05', 1 + random(), random() FROM generate_series(1, 20000)")
    conn.execute(f"ANALYZE {s}.src")
    row = conn.execute("SELECT count(*) FROM pg_inherits i JOIN pg_class r ON "
                       "r.oid = i.inhrelid WHERE r.relkind = 'r' AND "
                       "r.relnamespace = %s::regnamespace", (s,)).fetchone()
    return s, int(row[0]) if row else 0


def planning_ms(conn: psycopg.Connection, query: str, args: tuple, n: int = 100) -> float:
    times = []
    for _ in range(n):
        with conn.cursor() as cur:
            out = [r[0] for r in cur.execute("EXPLAIN (SUMMARY) " + query, args).fetchall()]
        times.append(float(next(x for x in out if "Planning Time" in x).split()[-2]))
    return statistics.median(times)


def query_ms(dsn: str, query: str, args: tuple, *, prepared: bool, n: int) -> float:
    threshold = 0 if prepared else None
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=threshold) as conn, \
            conn.cursor(binary=prepared) as cur:
        if prepared:
            cur.execute("SET plan_cache_mode = force_generic_plan")
        cur.execute(query, args).fetchall()
        t0 = time.perf_counter()
        for _ in range(n):
            cur.execute(query, args).fetchall()
        return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bands", type=int, nargs="+", default=[1, 6, 18, 90])
    ap.add_argument("--radius-deg", type=float, default=1 / 60)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/lazysky-bench-planning"))
    args = ap.parse_args()
    if args.dir.exists():
        shutil.rmtree(args.dir)
    dsn = libpq_dsn(open_catalog(load_settings(catalog_dir=args.dir)).dsn)
    r = args.radius_deg
    nodec, dec = (1.5, 0.5, r), (0.5, r, 0.5, r, 1.5, 0.5, r)
    print(f"cone r = {r * 60:.2f}′ at (1.5°, 0.5°); ms, medians / means of one client")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for bands in args.bands:
            s, leaves = build(conn, bands)
            q0, q1 = Q_NODEC.format(s=s), Q_DEC.format(s=s)
            rows = len(conn.execute(q1, dec).fetchall())
            n = args.queries
            print(f"bands {bands:3d}: {leaves:5d} leaves, {rows} rows; planning: no Dec range "
                  f"{planning_ms(conn, q0, nodec):.3f}, Dec range {planning_ms(conn, q1, dec):.3f};"
                  f" per query: unprepared {query_ms(dsn, q0, nodec, prepared=False, n=n):.3f}"
                  f" / {query_ms(dsn, q1, dec, prepared=False, n=n):.3f} (Dec range), generic "
                  f"plan {query_ms(dsn, q0, nodec, prepared=True, n=n):.3f} / "
                  f"{query_ms(dsn, q1, dec, prepared=True, n=n):.3f} (Dec range)", flush=True)
            conn.execute(f"DROP SCHEMA {s} CASCADE")
    catalog_server.stop(args.dir)
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()

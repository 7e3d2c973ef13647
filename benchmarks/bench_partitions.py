"""Production cone searches with ten times as many experimental rows beside them.

Issue 13's goal: the cone-search p95 on production must stay within 10 % when the
catalog holds ten times as many experimental rows (same sky, same density) as
production rows, compared with the same searches on production rows alone. The
source tables are partitioned by processing type (schema v5), and the production views
read only the partitions of types that hold production, so the experiments' rows and
indexes are never touched.

Run (it starts its own embedded server in --dir, by default /var/tmp/lazysky-bench-part)::

    python benchmarks/bench_partitions.py --prod-rows 1000000 --ratio 10

Steps, in one run, on two databases of one embedded server: load the same
``--prod-rows`` production rows (same seed) into both and publish them; load
``ratio × prod-rows`` experimental rows on the same sky into the second ("beside")
only; then time cone searches on ``coadd_sources_prod`` (radius 1′ and 6′, ``--queries``
random centres in the field, prepared statements, one client per database),
alternating the two databases query by query so that whatever else the machine does
weighs on both alike (each series runs twice; the second is kept). Prints p50/p95 and
the ratio, the partitions a production cone reads, the machine and its load average.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from lazysky.catalog import open_catalog, write_sources
from lazysky.catalog.cone import cone_query, explain
from lazysky.catalog.database import SESSION_OPTIONS, libpq_dsn
from lazysky.catalog.production import plan_run, publish
from lazysky.catalog.records import finish_run, mark_tile_done, register_run
from lazysky.config import load_settings
from lazysky.runs import Run, new_run_id

TILE_ROWS = 10_000
TILE_DEG = 1.0
FIELD_DEC = (-5.0, 5.0)
RADII_DEG = {"1′": 1 / 60, "6′": 0.1}
#: e.g. BENCH_PLAN_CACHE_MODE=auto: PostgreSQL's default instead of lazysky's sessions'
PLAN_CACHE_MODE = os.environ.get("BENCH_PLAN_CACHE_MODE", "")


def _tile(rng: np.random.Generator, t: int) -> dict[str, np.ndarray]:
    rows = int((FIELD_DEC[1] - FIELD_DEC[0]) / TILE_DEG)
    ra0, dec0 = (t // rows) * TILE_DEG, FIELD_DEC[0] + (t % rows) * TILE_DEG
    lo, hi = np.sin(np.radians([dec0, dec0 + TILE_DEG]))
    n = TILE_ROWS
    dec = np.sort(np.degrees(np.arcsin(rng.uniform(lo, hi, n))))
    dra = rng.uniform(0, TILE_DEG, n)
    return {"x": dra * 2048, "y": (dec - dec0) * 2048, "ra": ra0 + dra, "dec": dec,
            "flux_aper": rng.lognormal(5, 1, n), "fluxerr_aper": rng.uniform(1, 10, n),
            "snr": rng.uniform(5, 500, n)}


def _load_worker(args: tuple[str, str, list[int], int]) -> None:
    dsn, run, tiles, seed = args
    catalog = open_catalog(dsn=dsn)
    rng = np.random.default_rng(seed)
    for t in tiles:
        write_sources("coadd", run, f"t{t:05d}", _tile(rng, t), catalog=catalog)


def load(dsn: str, run: str, n_tiles: int, *, writers: int, seed: int) -> float:
    """Write ``n_tiles`` tiles of ``run``; returns rows/s."""
    t0 = time.perf_counter()
    shares = [list(range(i, n_tiles, writers)) for i in range(writers)]
    with mp.get_context("spawn").Pool(writers) as pool:
        pool.map(_load_worker, [(dsn, run, s, seed + i) for i, s in enumerate(shares)])
    return n_tiles * TILE_ROWS / (time.perf_counter() - t0)


def finish(catalog: Any, run: str, n_tiles: int) -> None:
    """Record the run as `lazysky run` would: field, tile plan, stages done, status."""
    tiles = [f"t{t:05d}" for t in range(n_tiles)]
    plan_run(run, field="bench", tiles=tiles, catalog=catalog)
    for t in tiles:
        for stage in ("detect-coadd", "detect-diff"):
            mark_tile_done(run, stage, t, catalog=catalog)
    finish_run(run, status="done", catalog=catalog)


_QUERY = ("SELECT run_id, tile_id, number, ra, dec FROM coadd_sources_prod "
          "WHERE pos <@ scircle(spoint(radians(%s), radians(%s)), radians(%s))")


def latencies(dsns: list[str], centres: np.ndarray,
              radius_deg: float) -> list[np.ndarray]:
    """Seconds per cone search on each database's production view, interleaved."""
    out = [np.empty(len(centres)) for _ in dsns]
    # sessions as lazysky opens them (SESSION_OPTIONS), unless told otherwise
    conns = [psycopg.connect(libpq_dsn(d), prepare_threshold=0, options=SESSION_OPTIONS)
             for d in dsns]
    for c in conns:
        if PLAN_CACHE_MODE:
            c.execute(f"SET plan_cache_mode = {PLAN_CACHE_MODE}")
    try:
        for _ in range(2):  # the first pass warms caches and the prepared plans
            for i, (ra, dec) in enumerate(centres):
                order = range(len(conns)) if i % 2 == 0 else reversed(range(len(conns)))
                for k in order:
                    t0 = time.perf_counter()
                    conns[k].execute(_QUERY, (float(ra), float(dec), radius_deg)).fetchall()
                    out[k][i] = time.perf_counter() - t0
    finally:
        for c in conns:
            c.close()
    return out


def _second_database(dsn: str, name: str) -> str:
    admin = libpq_dsn(dsn).replace("/lazysky?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return dsn.replace("/lazysky?", f"/{name}?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prod-rows", type=int, default=1_000_000)
    ap.add_argument("--ratio", type=int, default=10, help="experimental rows per "
                    "production row (default 10)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/lazysky-bench-part"))
    ap.add_argument("--keep", action="store_true", help="keep the server's data directory")
    args = ap.parse_args()
    if args.dir.exists():
        shutil.rmtree(args.dir)
    catalog = open_catalog(load_settings(catalog_dir=args.dir))
    dsn = catalog.dsn
    n_tiles = max(1, args.prod_rows // TILE_ROWS)
    per_col = int((FIELD_DEC[1] - FIELD_DEC[0]) / TILE_DEG)
    span_ra = max(1, n_tiles // per_col) * TILE_DEG
    rng = np.random.default_rng(7)
    centres = np.column_stack([rng.uniform(0.2, span_ra - 0.2, args.queries),
                               rng.uniform(FIELD_DEC[0] + 0.2, FIELD_DEC[1] - 0.2,
                                           args.queries)])
    print(f"# Production cones beside {args.ratio}× experimental rows\n")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    alone_catalog = open_catalog(dsn=_second_database(dsn, "alone"))
    prod = new_run_id("prod")
    for cat in (catalog, alone_catalog):  # the same production rows in both
        register_run(Run(prod), catalog=cat)
        rate = load(cat.dsn, prod, n_tiles, writers=args.writers, seed=1)
        finish(cat, prod, n_tiles)
        publish(prod, catalog=cat)
    print(f"production: {n_tiles * TILE_ROWS:,d} rows in each database "
          f"(loaded at {rate:,.0f} rows/s)")
    exps = []
    for i in range(args.ratio):  # experiments over the same sky, as in real life
        exp = new_run_id("exp")
        register_run(Run(exp), catalog=catalog)
        load(dsn, exp, n_tiles, writers=args.writers, seed=100 + i)
        finish(catalog, exp, n_tiles)
        exps.append(exp)
    for cat in (catalog, alone_catalog):
        with psycopg.connect(libpq_dsn(cat.dsn), autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE coadd_sources")
    with psycopg.connect(libpq_dsn(dsn)) as conn:
        sizes = dict(conn.execute(
            "SELECT run_type, count(*) FROM coadd_sources GROUP BY run_type").fetchall())
    print(f"beside: {len(exps)} experiments, {sizes.get('exp', 0):,d} rows beside "
          f"{sizes.get('prod', 0):,d} production rows; alone: the production rows only\n")
    print(f"load average before the searches {os.getloadavg()[0]:.2f}\n")
    alone, beside = {}, {}
    for k, r in RADII_DEG.items():
        alone[k], beside[k] = latencies([alone_catalog.dsn, dsn], centres, r)
    plan = explain(cone_query(float(centres[0, 0]), float(centres[0, 1]), "6arcmin",
                              table="coadd_prod"), analyze=True, catalog=catalog)
    read = sorted({m for line in plan.splitlines() if "never executed" not in line
                   for m in re.findall(r"on (coadd_sources__\w+?)(?:_pos_idx)?\s", line)})

    print("| radius | p50 alone (ms) | p95 alone (ms) | p50 beside (ms) | p95 beside (ms) "
          "| p95 ratio | goal ≤ 1.10 |")
    print("|---|---|---|---|---|---|---|")
    for k in RADII_DEG:
        a50, a95 = (np.percentile(alone[k], q) * 1e3 for q in (50, 95))
        b50, b95 = (np.percentile(beside[k], q) * 1e3 for q in (50, 95))
        ratio = b95 / a95
        print(f"| {k} | {a50:.3f} | {a95:.3f} | {b50:.3f} | {b95:.3f} | {ratio:.3f} | "
              f"{'met' if ratio <= 1.10 else 'not met'} |")
    print(f"\npartitions a production cone reads (EXPLAIN ANALYZE): {', '.join(read)}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    catalog.engine().dispose()
    alone_catalog.engine().dispose()
    if not args.keep:
        from lazysky.catalog import server

        server.stop(args.dir)
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Catalog benchmarks: bulk load, cone-search latency (pgSphere vs q3c vs seq scan),
throughput with several clients, cross-match.

The SQL cones are sent as :func:`lazysky.catalog.cone_search` sends them (schema v14):
with the cone's box on ``ra``/``dec`` (:func:`lazysky.catalog.cells.cone_bounds`), which
lets PostgreSQL prune to the sky cells the cone touches; the goals are judged on that
shape. The same cones without the box (what ad-hoc SQL naming no position range pays)
are reported beside them.

Run (it starts its own embedded server in --dir, by default /var/tmp/lazysky-bench)::

    python benchmarks/bench_catalog.py --rows 1000000
    python benchmarks/bench_catalog.py --rows 10000000 --queries 200 --dir DIR
    python benchmarks/bench_catalog.py --rows 2000000 --ab-opclass 40   # GiST class A/B
    python benchmarks/bench_catalog.py --rows 2000000 --ab-index 40   # (run, tile) index A/B
    python benchmarks/bench_catalog.py --rows 10000000 --keep --ab-copy 40   # write path A/B
    python benchmarks/bench_catalog.py --rows 10000000 --ab-index-growth   # same, as it grows
    python benchmarks/bench_catalog.py --rows 10000000 --ab-cells   # sky cells vs month partition
    python benchmarks/bench_catalog.py --rows 10000000 --keep --ab-cells-queries   # its queries
    python benchmarks/bench_catalog.py --rows 4000000 --ab-settings '' 'shared_buffers=1GB'

q3c (Debian package ``postgresql-15-q3c``) is installed with apt-get when run as root
and missing; otherwise its columns are skipped with a note. Prints a Markdown report
(paste it into docs/catalog.md), ending with a verdict table per goal of issue 7.
Timings are wall-clock on whatever machine runs it: the numbers mean something only next
to the machine's description and load average, which are printed. On a shared machine
the CPU columns (µs per row or query, client processes + every server process) are the
steadier guide.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import sqlalchemy as sa

from lazysky.catalog import Catalog, cone_search, crossmatch, open_catalog, write_sources
from lazysky.catalog import write as write_module
from lazysky.catalog.cells import (
    DEC_BAND_DEG,
    SLABS_AT_EQUATOR,
    cells_of,
    cone_bounds,
    ensure_cells,
)
from lazysky.catalog.database import libpq_dsn
from lazysky.catalog.records import register_run
from lazysky.catalog.schema import coadd_sources, partition_name
from lazysky.config import load_settings
from lazysky.runs import Run, new_run_id, parse_run_id

RADII_DEG = {"1′": 1 / 60, "6′": 0.1, "1°": 1.0}
TILE_ROWS = 10_000      # sources per (run, tile) write
TILE_DEG = 1.0          # tiles of 1° × 1°: 10 000 sources/deg², a deep survey's density
FIELD_DEC = (-10.0, 10.0)  # the field: a band across RA = 0/360 (wrap included)
RA_START = 357.0


def _tile_origin(t: int) -> tuple[float, float]:
    rows = int((FIELD_DEC[1] - FIELD_DEC[0]) / TILE_DEG)
    return (RA_START + (t // rows) * TILE_DEG) % 360, FIELD_DEC[0] + (t % rows) * TILE_DEG


def _field_ra_span(rows: int) -> float:
    n_tiles = rows // TILE_ROWS
    per_col = int((FIELD_DEC[1] - FIELD_DEC[0]) / TILE_DEG)
    return max(1, n_tiles // per_col) * TILE_DEG


def _tile(rng: np.random.Generator, n: int, t: int) -> dict[str, np.ndarray]:
    """One tile's sources, as the pipeline writes them.

    Uniform within the tile, in detection order: ``sep.extract`` reports sources as its
    raster scan finishes them, i.e. by increasing ``y`` (checked: rank correlation 0.99998
    on a synthetic image), and the runner numbers them 1…n in that order. ``y`` runs
    along Dec here (north up). Until 2026-11-24 the benchmark wrote them in random
    order, which costs the primary-key btree ~10 % more server CPU per row (A/B in
    docs/catalog.md).
    """
    ra0, dec0 = _tile_origin(t)
    lo, hi = np.sin(np.radians([dec0, dec0 + TILE_DEG]))
    dra = rng.uniform(0, TILE_DEG, n)
    dec = np.sort(np.degrees(np.arcsin(rng.uniform(lo, hi, n))))
    return {
        "x": dra / TILE_DEG * 2048, "y": (dec - dec0) / TILE_DEG * 2048,
        "ra": (ra0 + dra) % 360,
        "dec": dec,
        "flux_aper": rng.lognormal(5, 1, n), "fluxerr_aper": rng.uniform(1, 10, n),
        "flux_kron": rng.lognormal(5, 1, n), "fluxerr_kron": rng.uniform(1, 10, n),
        "snr": rng.uniform(5, 500, n), "a": rng.uniform(1, 3, n), "b": rng.uniform(0.5, 1, n),
        "theta": rng.uniform(-1.5, 1.5, n), "flags": rng.integers(0, 4, n),
    }


def _load_worker(args: tuple[str, str, int, int, int]) -> float:
    """Write ``n_tiles`` tiles; returns this process's CPU seconds spent on them."""
    dsn, run, first, n_tiles, seed = args
    if "BENCH_SUMMARIZE_RANGES" in os.environ:  # an override for experiments (0: none);
        # unset, the writers summarise as in production (--ab-cells states which it was)
        write_module.SUMMARIZE_RANGES = int(os.environ["BENCH_SUMMARIZE_RANGES"])
    catalog = open_catalog(dsn=dsn)
    rng = np.random.default_rng(seed)
    cpu0 = time.process_time()
    for t in range(first, first + n_tiles):
        write_sources("coadd", run, f"bench-{t:06d}", _tile(rng, TILE_ROWS, t), catalog=catalog)
    return time.process_time() - cpu0


_TICK = os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(catalog_dir: Path) -> float:
    """CPU seconds (user + system) used so far by the embedded server's processes.

    The postmaster's own time, its running children's, and (``cutime``/``cstime``) that
    of the children it has reaped: backends of closed connections count too.
    """
    try:
        postmaster = int((catalog_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == postmaster:
            total += sum(int(f) for f in fields[11:15]) / _TICK
        elif int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


_KINDS = ("checkpointer", "background writer", "walwriter", "autovacuum worker")


def server_cpu_by_kind(catalog_dir: Path) -> dict[str, float]:
    """CPU seconds so far of the embedded server's processes, by kind.

    Kinds: ``backends`` (client connections), the auxiliary processes of ``_KINDS``,
    and ``exited`` (the postmaster itself plus the children it has reaped: autovacuum
    workers that finished, backends of closed connections).
    """
    out = dict.fromkeys(("backends", *_KINDS, "exited"), 0.0)
    try:
        postmaster = int((catalog_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return out
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(entry) == postmaster:
            out["exited"] += sum(int(f) for f in fields[11:15]) / _TICK
        elif int(fields[1]) == postmaster:
            kind = next((k for k in _KINDS if f"postgres: {k}" in title), "backends")
            if kind == "backends" and "postgres: " in title and "[local]" not in title:
                kind = "exited"  # other auxiliary processes: launchers, archiver
            out[kind] += (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _warm_worker(dsn: str) -> None:
    open_catalog(dsn=dsn).engine().dispose()


_STATS_SQL = (
    "SELECT b.buffers_backend, b.buffers_checkpoint, b.buffers_clean, "
    "b.checkpoints_timed + b.checkpoints_req, w.wal_bytes, w.wal_fpi, w.wal_buffers_full "
    "FROM pg_stat_bgwriter b, pg_stat_wal w")
_STATS = ("backend_writes", "checkpoint_writes", "bgwriter_writes", "checkpoints",
          "wal_bytes", "wal_fpi", "wal_buffers_full")


_VMSTAT = ("allocstall", "pgscan_direct", "pgscan_kswapd")


def server_stats(dsn: str) -> dict[str, float]:
    """The server's cumulative write statistics (pg_stat_bgwriter, pg_stat_wal) and the
    kernel's page reclaim counters (/proc/vmstat: reclaim costs the allocating process
    CPU once free memory runs out)."""
    with psycopg.connect(libpq_dsn(dsn)) as conn:
        got = conn.execute(_STATS_SQL).fetchone()
    out = dict(zip(_STATS, (float(v) for v in got or ()), strict=True))
    vm = dict.fromkeys(_VMSTAT, 0.0)
    with contextlib.suppress(OSError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            key = next((k for k in _VMSTAT if name.startswith(k)), None)
            if key:
                vm[key] += float(value)
    return {**out, **vm, **_machine_cpu()}


def _machine_cpu() -> dict[str, float]:
    """CPU seconds the whole machine spent busy (every process and kernel thread) and
    idle, from /proc/stat: what the benchmark's own processes do not account for is
    the kernel's (e.g. writeback of dirty pages) or another program's."""
    with contextlib.suppress(OSError, ValueError):
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        # steal: time the hypervisor ran something else while this VM's CPUs wanted to run
        return {"machine_busy": (sum(fields[:8]) - idle) / _TICK, "machine_idle": idle / _TICK,
                "machine_steal": fields[7] / _TICK}
    return {"machine_busy": float("nan"), "machine_idle": float("nan"),
            "machine_steal": float("nan")}


def _load_step(pool: Any, dsn: str, run: str, done: int, todo: int, writers: int,
               catalog_dir: Path | None) -> tuple[float, float, dict[str, float]]:
    """Write tiles ``done … done + todo - 1``; rows/s, CPU µs/row, server stat deltas."""
    share = [todo // writers + (1 if i < todo % writers else 0) for i in range(writers)]
    starts = np.cumsum([0, *share[:-1]]) + done
    st0 = server_stats(dsn)
    srv0 = server_cpu_seconds(catalog_dir) if catalog_dir else float("nan")
    kind0 = server_cpu_by_kind(catalog_dir) if catalog_dir else {}
    t0 = time.perf_counter()
    spent = pool.map(_load_worker, [(dsn, run, int(s), k, int(s) + 7)
                                    for s, k in zip(starts, share, strict=True) if k])
    dt = time.perf_counter() - t0
    srv = (server_cpu_seconds(catalog_dir) if catalog_dir else float("nan")) - srv0
    kind1 = server_cpu_by_kind(catalog_dir) if catalog_dir else {}
    st1 = server_stats(dsn)
    rows = todo * TILE_ROWS
    deltas = {k: st1[k] - st0[k] for k in (*_STATS, *_VMSTAT, "machine_busy", "machine_idle",
                                           "machine_steal")}
    deltas["writers_us"] = sum(spent) / rows * 1e6
    deltas.update({f"{k}_us": (kind1[k] - kind0[k]) / rows * 1e6 for k in kind1})
    return rows / dt, (sum(spent) + srv) / rows * 1e6, deltas


def _stats_text(stats: dict[str, float], rows: int) -> str:
    return (f"per 1000 rows: buffers written by backends "
            f"{stats['backend_writes'] / rows * 1e3:.1f}, by the checkpointer "
            f"{stats['checkpoint_writes'] / rows * 1e3:.1f}, by the "
            f"bgwriter {stats['bgwriter_writes'] / rows * 1e3:.1f}, full-page images "
            f"{stats['wal_fpi'] / rows * 1e3:.1f}; WAL {stats['wal_bytes'] / rows:.0f} B/row; "
            f"checkpoints {stats['checkpoints']:.0f}; reclaim per 1000 rows: pages scanned "
            f"directly {stats['pgscan_direct'] / rows * 1e3:.0f}, by kswapd "
            f"{stats['pgscan_kswapd'] / rows * 1e3:.0f}; CPU µs/row: writers "
            f"{stats['writers_us']:.2f}, "
            + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in stats.items()
                        if k.endswith("_us") and k != "writers_us")
            + f"; whole machine: busy {stats['machine_busy'] / rows * 1e6:.2f} µs/row (of it "
              f"stolen by the hypervisor {stats['machine_steal'] / rows * 1e6:.2f}), idle "
              f"{stats['machine_idle'] / rows * 1e6:.2f}")


def load(catalog: Catalog, run: str, rows: int, *, writers: int,
         catalog_dir: Path | None = None) -> list[tuple[int, float, float]]:
    """Load ``rows`` rows with ``writers`` processes.

    Returns (rows so far, rows/s, CPU µs per row: writers + server) per step.
    """
    n_tiles = rows // TILE_ROWS
    step_tiles = max(n_tiles // 10, writers)
    steps: list[tuple[int, float, float]] = []
    done = 0
    ctx = mp.get_context("spawn")
    with ctx.Pool(writers) as pool:
        # warm-up: start the processes, import lazysky, open the catalog (not timed)
        pool.map(_warm_worker, [catalog.dsn] * writers)
        while done < n_tiles:
            todo = min(step_tiles, n_tiles - done)
            rate, us_per_row, stats = _load_step(pool, catalog.dsn, run, done, todo,
                                                 writers, catalog_dir)
            done += todo
            steps.append((done * TILE_ROWS, rate, us_per_row))
            print(f"  loaded {done * TILE_ROWS:>10,d} rows: {rate:,.0f} rows/s, "
                  f"{us_per_row:.1f} CPU-µs/row (writers + server), load average "
                  f"{os.getloadavg()[0]:.1f}; {_stats_text(stats, todo * TILE_ROWS)}",
                  flush=True)
    return steps


def ab_settings(bench_dir: Path, rows: int, variants: list[str], *,
                writers: int, query_rounds: int = 0, clients: int = 4) -> list[str]:
    """Interleaved A/B of embedded-server settings as the table grows.

    One embedded server per variant (``bench_dir/A``, ``bench_dir/B``, …), each started
    with its variant as ``LAZYSKY_PG_SETTINGS`` (``''``: lazysky's defaults). The same
    tiles are loaded into every server a tenth of ``rows`` at a time, the variants
    alternating step by step (which goes first alternates too), so the machine's load
    hits all alike. Returns the report lines: per variant and step, rows/s, CPU µs per
    row (writers + that server), and the server's write statistics. With
    ``query_rounds``, then as many interleaved rounds of queries on every server: 200
    prepared 6′ cones (p50/p95), ``clients`` prepared 1′ clients for 5 s (queries/s, CPU
    µs/query), cones with their box as cone_search sends them, and a 20 000-position
    cross-match (wall and CPU seconds).
    """
    from lazysky.catalog import server as catalog_server

    sides: dict[str, tuple[Catalog, str, Path]] = {}
    for i, text in enumerate(variants):
        label = chr(ord("A") + i)
        side_dir = bench_dir / label
        side_dir.mkdir(parents=True, exist_ok=True)
        side_dir.chmod(0o755)
        os.environ[catalog_server.SETTINGS_ENV] = text
        try:
            cat = open_catalog(load_settings(catalog_dir=side_dir, catalog_dsn=None))
        finally:
            del os.environ[catalog_server.SETTINGS_ENV]
        run = Run(new_run_id("test"), description="benchmark settings A/B")
        register_run(run, catalog=cat)
        sides[label] = (cat, run.run_id, side_dir)
    lines = [f"A/B of server settings, {rows:,d} rows per server loaded in steps of "
             f"{rows // 10:,d}, variants interleaved, {writers} writers, load average "
             f"{os.getloadavg()[0]:.2f} at start:"]
    for label, text in zip(sides, variants, strict=True):
        with psycopg.connect(libpq_dsn(sides[label][0].dsn)) as conn:
            shown = {k: conn.execute(f"SHOW {k}").fetchone() for k in
                     ("shared_buffers", "max_wal_size", "wal_compression",
                      "checkpoint_completion_target")}
        lines.append(f"  {label}: LAZYSKY_PG_SETTINGS={text!r} -> "
                     + ", ".join(f"{k} {v[0] if v else '?'}" for k, v in shown.items()))
    print("\n".join(lines), flush=True)
    n_tiles = rows // TILE_ROWS
    step_tiles = max(n_tiles // 10, writers)
    results: dict[str, list[tuple[float, float, dict[str, float]]]] = {k: [] for k in sides}
    done, step = 0, 0
    with mp.get_context("spawn").Pool(writers) as pool:
        for cat, _, _ in sides.values():
            pool.map(_warm_worker, [cat.dsn] * writers)
        while done < n_tiles:
            todo = min(step_tiles, n_tiles - done)
            order = list(sides) if step % 2 == 0 else list(sides)[::-1]
            for label in order:
                cat, run_id, side_dir = sides[label]
                got = _load_step(pool, cat.dsn, run_id, done, todo, writers, side_dir)
                results[label].append(got)
                print(f"  {label} {(done + todo) * TILE_ROWS:>10,d} rows: {got[0]:,.0f} rows/s, "
                      f"{got[1]:.1f} CPU-µs/row, load average {os.getloadavg()[0]:.1f}; "
                      f"{_stats_text(got[2], todo * TILE_ROWS)}", flush=True)
            done += todo
            step += 1
    for label, res in results.items():
        rates = [r[0] for r in res]
        lines.append(f"  {label}: rows/s per step {', '.join(f'{r:,.0f}' for r in rates)} "
                     f"(mean {np.mean(rates):,.0f}, min {min(rates):,.0f}, last {rates[-1]:,.0f})")
        lines.append(f"  {label}: CPU µs/row per step {', '.join(f'{r[1]:.1f}' for r in res)} "
                     f"(median {np.median([r[1] for r in res]):.1f})")
        written = [r[2]["backend_writes"] / (step_tiles * TILE_ROWS) * 1e3 for r in res]
        lines.append(f"  {label}: buffers written by backends per 1000 rows per step "
                     f"{', '.join(f'{w:.1f}' for w in written)}")
    if query_rounds:
        lines.extend(_ab_queries(sides, rows, query_rounds, clients))
    for label, (cat, _, side_dir) in sides.items():
        with psycopg.connect(libpq_dsn(cat.dsn)) as conn:
            size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))"
                                ).fetchone()
        lines.append(f"  {label}: database size {size[0] if size else '?'}")
        cat.engine().dispose()
        catalog_server.stop(side_dir)
    lines.append(f"  load average at the end {os.getloadavg()[0]:.2f}")
    return lines


def _ab_queries(sides: dict[str, tuple[Catalog, str, Path]], rows: int, rounds: int,
                clients: int) -> list[str]:
    """Interleaved query rounds on every side of :func:`ab_settings`; report lines."""
    _SPAN[0] = _field_ra_span(rows)
    got: dict[str, dict[str, list[float]]] = {
        k: {"p50": [], "p95": [], "qps": [], "cpu_q": [], "xm": [], "xm_cpu": []}
        for k in sides}
    for cat, _, _ in sides.values():
        with psycopg.connect(libpq_dsn(cat.dsn), autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE coadd_sources")
    far = _centres(20_000, seed=17)
    for r in range(rounds):
        for label in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            cat, _, side_dir = sides[label]
            dsn = libpq_dsn(cat.dsn)
            p50, p95, _ = sql_latency(dsn, "pgsphere", 0.1, 200)
            tput = throughput(dsn, 1 / 60, clients, 5.0, rounds=1, catalog_dir=side_dir,
                              shapes=((True, True),))[(True, True)]
            srv0, cpu0, t0 = server_cpu_seconds(side_dir), time.process_time(), time.perf_counter()
            crossmatch(far[:, 0], far[:, 1], "1arcsec", catalog=cat)
            xm = time.perf_counter() - t0
            xm_cpu = time.process_time() - cpu0 + server_cpu_seconds(side_dir) - srv0
            for key, value in (("p50", p50), ("p95", p95), ("qps", tput[0][0]),
                               ("cpu_q", tput[0][1]), ("xm", xm), ("xm_cpu", xm_cpu)):
                got[label][key].append(value)
            print(f"  query round {r + 1} {label}: 6′ SQL p50/p95 {p50:.2f}/{p95:.2f} ms, "
                  f"{clients} clients 1′ {tput[0][0]:,.0f} q/s "
                  f"({tput[0][1]:.0f} CPU-µs/query), cross-match 20 000: {xm:.2f} s "
                  f"(CPU {xm_cpu:.2f} s), load average {os.getloadavg()[0]:.1f}", flush=True)
    out = [f"query rounds ({rounds}, interleaved), medians:"]
    for label, g in got.items():
        out.append(f"  {label}: 6′ SQL p50 {np.median(g['p50']):.2f} ms, p95 "
                   f"{np.median(g['p95']):.2f} ms; {clients} prepared clients at 1′ "
                   f"{np.median(g['qps']):,.0f} q/s, {np.median(g['cpu_q']):.0f} CPU-µs/query; "
                   f"cross-match 20 000 positions {np.median(g['xm']):.2f} s, CPU "
                   f"{np.median(g['xm_cpu']):.2f} s")
    return out


def row_by_row(catalog: Catalog, run: str, n: int) -> float:
    """rows/s of one INSERT per row (one transaction), the naive way.

    The sky cells the rows fall in (schema v14) are made first, untimed, as
    ``write_sources`` makes them: a plain INSERT into a cell not made yet fails ("no
    partition of relation … found for row"), so only the inserts are timed.
    """
    data = _tile(np.random.default_rng(99), n, 0)
    cols = list(data)
    keys: tuple[Any, ...] = ()
    month: str | None = None
    if "run_month" in coadd_sources.c:  # partitioned (v5): the writer fills the keys
        rid = parse_run_id(run)
        keys = (rid.type, rid.date.replace(day=1))
        cols = ["run_type", "run_month", *cols]
        month = partition_name(coadd_sources.name, rid.type, rid.date.replace(day=1))
    sql = (f"INSERT INTO coadd_sources (run_id, tile_id, number, {', '.join(cols)}) "
           f"VALUES (%s, %s, %s, {', '.join(['%s'] * len(cols))})")
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn, conn.cursor() as cur:
        if month is not None:  # its own transaction (None: a month made before v14)
            ensure_cells(conn, month, cells_of(data["ra"], data["dec"]))
        t0 = time.perf_counter()
        for i in range(n):
            cur.execute(sql, (run, "rowbyrow", i + 1, *keys,
                              *(data[c][i].item() for c in cols[len(keys):])))
        conn.commit()
        return n / (time.perf_counter() - t0)


def ensure_q3c(conn: psycopg.Connection[Any]) -> bool:
    if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'q3c'").fetchone() is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            print("  installing postgresql-15-q3c with apt-get", flush=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "postgresql-15-q3c"],
                           check=False, capture_output=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        else:
            print("  q3c missing: apt-get install postgresql-15-q3c (skipped)")
            return False
    conn.execute("CREATE EXTENSION IF NOT EXISTS q3c")
    conn.execute("CREATE INDEX IF NOT EXISTS ix_coadd_sources_q3c "
                 "ON coadd_sources (q3c_ang2ipix(ra, dec))")
    conn.execute("ANALYZE coadd_sources")
    return True


_CONE_SQL = ("SELECT ra, dec FROM coadd_sources WHERE pos <@ scircle(spoint(radians(%s), "
             "radians(%s)), radians(%s))")
#: The cone's box (cells.cone_bounds), as cone_search adds it: lets PostgreSQL prune to
#: the sky cells the cone touches (at plan time; prepared, at run time).
_BOX_SQL = " AND dec BETWEEN %s AND %s AND (ra BETWEEN %s AND %s OR ra BETWEEN %s AND %s)"
_BOX_KEYS = ("dec_lo", "dec_hi", "ra_lo1", "ra_hi1", "ra_lo2", "ra_hi2")
QUERIES = {
    "pgsphere": _CONE_SQL + _BOX_SQL,  # the shape cone_search sends
    "pgsphere-nobox": _CONE_SQL,  # ad-hoc SQL naming no position range
    "q3c": "SELECT ra, dec FROM coadd_sources WHERE q3c_radial_query(ra, dec, %s, %s, %s)",
}


def _params(kind: str, ra: float, dec: float, radius: float) -> tuple[float, ...]:
    """The parameters of ``QUERIES[kind]`` for one cone (the box from cone_bounds)."""
    if kind != "pgsphere":
        return (ra, dec, radius)
    box = cone_bounds(ra, dec, radius)
    return (ra, dec, radius, *(box[k] for k in _BOX_KEYS))


_SPAN = [1.0]  # RA extent of the loaded field (set in main)


def _centres(n: int, seed: int) -> np.ndarray:
    """Cone centres spread over the loaded field (inside it by 1°)."""
    rng = np.random.default_rng(seed)
    ra = (RA_START + 1.0 + rng.uniform(0, max(_SPAN[0] - 2.0, 0.1), n)) % 360
    dec = rng.uniform(FIELD_DEC[0] + 1.0, FIELD_DEC[1] - 1.0, n)
    return np.column_stack([ra, dec])


def _connect(dsn: str, *, prepared: bool) -> psycopg.Connection[Any]:
    """A client connection; ``prepared``: as an application serving cones would run one.

    Prepared: the cone statement is prepared on first use and planned once
    (``plan_cache_mode = force_generic_plan``; the generic plan is the same GiST index
    scan) and rows come back binary. Otherwise every query is parsed and planned anew
    and rows come back as text (the way of the earlier runs, kept for comparison).
    """
    conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=0 if prepared else None)
    if prepared:
        conn.execute("SET plan_cache_mode = force_generic_plan")
    return conn


def sql_latency(dsn: str, kind: str, radius: float, n: int, *, seqscan: bool = False,
                prepared: bool = True) -> tuple[float, float, float]:
    """p50, p95 (ms) and mean rows of ``n`` cone queries (``QUERIES[kind]``).

    The same centres for every kind (seeded by radius and ``n``); the parameters (the
    box too) are computed before the timing, which covers the SQL alone.
    """
    times, rows = [], []
    params = [_params(kind, ra, dec, radius)
              for ra, dec in _centres(n, seed=int(radius * 1e6) + n)]
    with _connect(dsn, prepared=prepared) as conn, conn.cursor(binary=prepared) as cur:
        if seqscan:
            cur.execute("SET enable_indexscan = off")
            cur.execute("SET enable_bitmapscan = off")
        for args in params:
            t0 = time.perf_counter()
            got = cur.execute(QUERIES[kind], args).fetchall()
            times.append(time.perf_counter() - t0)
            rows.append(len(got))
    ms = np.array(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), float(np.mean(rows))


def api_latency(catalog: Catalog, radius: float, n: int) -> tuple[float, float]:
    times = []
    for ra, dec in _centres(n, seed=5):
        t0 = time.perf_counter()
        cone_search(ra, dec, radius, catalog=catalog)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def _qps_worker(args: tuple[str, float, float, int, float, bool, bool]) -> tuple[int, float]:
    """Queries done in ``seconds`` and this client's CPU seconds.

    ``box``: the cones as cone_search sends them (with the box), else without it; the
    parameters are computed before the timing.
    """
    dsn, radius, seconds, seed, span, prepared, box = args
    _SPAN[0] = span
    done = 0
    kind = "pgsphere" if box else "pgsphere-nobox"
    params = [_params(kind, ra, dec, radius) for ra, dec in _centres(5000, seed)]
    with _connect(dsn, prepared=prepared) as conn, conn.cursor(binary=prepared) as cur:
        cur.execute(QUERIES[kind], _params(kind, 0.0, 0.0, radius)).fetchall()  # prepare
        cpu0 = time.process_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            cur.execute(QUERIES[kind], params[done % len(params)]).fetchall()
            done += 1
        return done, time.process_time() - cpu0


#: (prepared, box) of the throughput runs: the product's shape first.
SHAPES = ((True, True), (False, True), (True, False), (False, False))


def _shape_text(prepared: bool, box: bool) -> str:
    return (f"{'prepared, binary rows' if prepared else 'unprepared, text rows'}, "
            f"{'with' if box else 'without'} the cone's box")


def throughput(dsn: str, radius: float, clients: int, seconds: float, *,
               rounds: int = 2, catalog_dir: Path | None = None,
               shapes: tuple[tuple[bool, bool], ...] = SHAPES
               ) -> dict[tuple[bool, bool], list[tuple[float, float]]]:
    """Queries/s of ``clients`` processes, the statement ``shapes`` interleaved.

    A shape is (prepared, box): prepared statements or not, the cones with their box
    (as cone_search sends them) or without. Returns, per shape, (queries/s, CPU µs per
    query: clients + server) of each round.
    """
    out: dict[tuple[bool, bool], list[tuple[float, float]]] = {s: [] for s in shapes}
    with mp.get_context("spawn").Pool(clients) as pool:
        for _ in range(rounds):
            for prepared, box in shapes:
                srv0 = server_cpu_seconds(catalog_dir) if catalog_dir else float("nan")
                got = pool.map(_qps_worker, [(dsn, radius, seconds, 100 + i, _SPAN[0],
                                              prepared, box) for i in range(clients)])
                srv = (server_cpu_seconds(catalog_dir) if catalog_dir else float("nan")) - srv0
                n = sum(g[0] for g in got)
                out[(prepared, box)].append((n / seconds,
                                             (sum(g[1] for g in got) + srv) / n * 1e6))
    return out


def _backend_cpu_ns(pid: int) -> int:
    """CPU time (ns) a local server process has run: /proc/<pid>/schedstat."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _test_month_partition() -> str:
    """The coadd partition of this month's ``test`` runs (what the benchmark writes)."""
    return partition_name(coadd_sources.name, "test",
                          parse_run_id(new_run_id("test")).date.replace(day=1))


def ab_key(catalog: Catalog, tiles: int) -> list[str]:
    """Interleaved A/B of the replace path's index (schema v6) on the loaded table.

    The catalog is copied (``CREATE DATABASE … TEMPLATE``) into ``lazysky_pk``, whose
    coadd_sources gets back the primary key ``(run_id, tile_id, number)`` (plus the
    partition keys) instead of the index on ``(run_id, tile_id)``. The same ``tiles``
    new tiles are then written into both, alternately (which database goes first
    alternates too), and the CPU time of each database's backend is read around every
    write from ``/proc/<pid>/schedstat`` (the embedded server runs here): CPU-µs per
    row, steadier than wall time on a shared machine. Returns the report lines.
    """
    dsn = libpq_dsn(catalog.dsn)
    with psycopg.connect(dsn) as conn:
        split = conn.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%s)",
                             (_test_month_partition(),)).fetchone()
    if split and split[0]:
        # a primary key of a table split by ra/dec must include them: not v6's question
        msg = ("--ab-key compares v6's (run, tile) index with the primary key on plain month "
               "partitions; since v14 they are split into sky cells, where no such key can "
               "be declared. Run it at commit 94b4b68 (schema v13) or earlier.")
        raise SystemExit(msg)
    copy_dsn = dsn.replace("/lazysky?", "/lazysky_pk?")
    catalog.engine().dispose()
    with psycopg.connect(dsn.replace("/lazysky?", "/postgres?"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS lazysky_pk")
        conn.execute("CREATE DATABASE lazysky_pk TEMPLATE lazysky")
    with psycopg.connect(copy_dsn, autocommit=True) as conn:
        partitioned = conn.execute(  # a key of a partitioned table includes its keys
            "SELECT 1 FROM pg_attribute WHERE attrelid = 'coadd_sources'::regclass "
            "AND attname = 'run_month'").fetchone() is not None
        conn.execute("ALTER TABLE coadd_sources ADD CONSTRAINT coadd_sources_pkey "
                     "PRIMARY KEY (run_id, tile_id, number"
                     f"{', run_type, run_month' if partitioned else ''})")
        conn.execute("DROP INDEX IF EXISTS ix_coadd_sources_run_tile")
        conn.execute("DROP INDEX IF EXISTS ix_coadd_sources_run_tile_brin")  # v12
        conn.execute("VACUUM ANALYZE coadd_sources")
    sides = {"(run_id, tile_id) index": catalog, "primary key": open_catalog(dsn=copy_dsn)}
    lines = [f"A/B of the replace path's index, {tiles} tiles of {TILE_ROWS:,d} rows each "
             f"way, interleaved, load average {os.getloadavg()[0]:.1f}:",
             *_interleaved_writes(sides, tiles)]
    with psycopg.connect(dsn) as a, psycopg.connect(copy_dsn) as b:
        index = "ix_coadd_sources_run_tile_brin"  # v12; before it, ix_coadd_sources_run_tile
        for conn, name in ((a, index), (b, "coadd_sources_pkey")):
            size = conn.execute(  # summed over the partitions' indexes
                "SELECT pg_size_pretty(sum(pg_relation_size(relid))) "
                "FROM pg_partition_tree(%s::regclass)", (name,)).fetchone()
            lines.append(f"  size of {name}: {size[0] if size else '?'}")
    return lines


def _interleaved_writes(sides: dict[str, Catalog], tiles: int, *,
                        writer: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Write the same ``tiles`` new tiles into every side, alternately; report lines.

    Which side goes first alternates too. The CPU time of each side's backend is read
    around every write from ``/proc/<pid>/schedstat`` (the embedded server runs here):
    CPU-µs per row, steadier than wall time on a shared machine. ``writer``: per side,
    attributes of :mod:`lazysky.catalog.write` to set for that side's writes only (e.g.
    ``{"SUMMARIZE_RANGES": 0}``).
    """
    writer = writer or {}
    runs, pids = {}, {}
    for label, cat in sides.items():
        run = Run(new_run_id("test"), description="benchmark A/B")
        register_run(run, catalog=cat)
        runs[label] = run.run_id
        raw = cat.engine().raw_connection()
        try:
            pg: psycopg.Connection[Any] = raw.driver_connection  # type: ignore[assignment]
            got = pg.execute("SELECT pg_backend_pid()").fetchone()
        finally:
            raw.close()
        pids[label] = int(got[0]) if got else 0
    cpu: dict[str, list[float]] = {label: [] for label in sides}
    wall: dict[str, list[float]] = {label: [] for label in sides}
    rng = np.random.default_rng(123)
    first = 900_000  # tile numbers beyond any load: new sky, as a survey's next tiles
    for i in range(tiles):
        data = _tile(rng, TILE_ROWS, first + i)
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for label in order:
            ns0, t0 = _backend_cpu_ns(pids[label]), time.perf_counter()
            switched = writer.get(label, {})
            saved = {name: getattr(write_module, name) for name in switched}
            for name, value in switched.items():
                setattr(write_module, name, value)
            try:
                write_sources("coadd", runs[label], f"ab-{first + i:06d}", data,
                              catalog=sides[label])
            finally:
                for name, value in saved.items():
                    setattr(write_module, name, value)
            wall[label].append(time.perf_counter() - t0)
            cpu[label].append((_backend_cpu_ns(pids[label]) - ns0) / 1e3 / TILE_ROWS)
    return [f"  {label}: backend CPU median {np.median(cpu[label]):.2f} µs/row (mean "
            f"{np.mean(cpu[label]):.2f}), wall median {np.median(wall[label]) * 1e3:.0f} ms "
            f"per tile" for label in sides]


def ab_copy(catalog: Catalog, tiles: int) -> list[str]:
    """Interleaved A/B of the write path on the loaded table (schema v13).

    The same ``tiles`` new tiles are written alternately straight into coadd_sources
    (binary COPY, the default) and through the staging table (``write.DIRECT_COPY =
    False``, the fallback when ``spoint`` has no binary input), each side with its own
    connection and run, into the same partition; the backends' CPU is read around every
    write. Returns the report lines.
    """
    other = open_catalog(dsn=catalog.dsn)  # a second pool: a backend of its own
    sides = {"direct COPY": catalog, "staging table": other}
    return [f"A/B of the write path, {tiles} tiles of {TILE_ROWS:,d} rows each way, "
            f"interleaved, load average {os.getloadavg()[0]:.1f}:",
            *_interleaved_writes(sides, tiles,
                                 writer={"staging table": {"DIRECT_COPY": False}})]


def _copy_database(catalog: Catalog, name: str) -> str:
    """``CREATE DATABASE name TEMPLATE lazysky``; returns its libpq DSN."""
    dsn = libpq_dsn(catalog.dsn)
    catalog.engine().dispose()
    with psycopg.connect(dsn.replace("/lazysky?", "/postgres?"), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = 'lazysky' AND pid <> pg_backend_pid()")
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name} TEMPLATE lazysky")
    return dsn.replace("/lazysky?", f"/{name}?")


def ab_opclass(catalog: Catalog, tiles: int) -> list[str]:
    """Interleaved A/B of the GiST operator class of ``pos`` (schema v11) on the table.

    The catalog is copied into ``lazysky_default``, whose GiST index on ``pos`` is built
    again with pgSphere's default class (``spoint``); the original's is built again with
    lazysky's (:data:`lazysky.catalog._gist.OPCLASS`), so both indexes are fresh builds
    of the same rows. Then :func:`_interleaved_writes`. Returns the report lines.
    """
    from lazysky.catalog._gist import OPCLASS

    copy_dsn = _copy_database(catalog, "lazysky_default")
    for dsn, opclass in ((libpq_dsn(catalog.dsn), OPCLASS), (copy_dsn, "spoint")):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP INDEX ix_coadd_sources_pos")
            conn.execute(f"CREATE INDEX ix_coadd_sources_pos ON coadd_sources "
                         f"USING gist (pos {opclass})")
            conn.execute("VACUUM ANALYZE coadd_sources")
    sides = {f"{OPCLASS} (v11)": catalog, "spoint (pgSphere's default)":
             open_catalog(dsn=copy_dsn)}
    return [f"A/B of the GiST operator class of pos, {tiles} tiles of {TILE_ROWS:,d} rows "
            f"each way, interleaved, load average {os.getloadavg()[0]:.1f}:",
            *_interleaved_writes(sides, tiles),
            f"  load average at the end {os.getloadavg()[0]:.1f}"]


def _tile_read_ms(dsn: str, run: str, tiles: list[str]) -> tuple[float, float]:
    """Median ms to count one (run, tile)'s rows, and to count one run's rows (3 times)."""
    with psycopg.connect(dsn) as conn:
        one = []
        for tile in tiles:
            t0 = time.perf_counter()
            conn.execute("SELECT count(*) FROM coadd_sources WHERE run_id = %s "
                         "AND tile_id = %s", (run, tile)).fetchone()
            one.append(time.perf_counter() - t0)
        whole = []
        for _ in range(3):
            t0 = time.perf_counter()
            conn.execute("SELECT count(*) FROM coadd_sources WHERE run_id = %s",
                         (run,)).fetchone()
            whole.append(time.perf_counter() - t0)
    return float(np.median(one)) * 1e3, float(np.median(whole)) * 1e3


def ab_index(catalog: Catalog, tiles: int, run: str | None) -> list[str]:
    """Interleaved A/B of how coadd rows of a (run, tile) are found (schema v12).

    Sides, all freshly built on the same loaded rows: the catalog itself with v12's BRIN
    on ``(run_id, tile_id)`` (:func:`~lazysky.catalog.schema.run_tile_brin_sql`), the
    writer summarising its newest ranges after each write; a copy ``lazysky_nosum`` with
    the same BRIN but no summarising by the writer (``write.SUMMARIZE_RANGES = 0`` for
    its writes); a copy ``lazysky_minmax`` whose BRIN summarises ``tile_id`` by min/max
    instead of a Bloom filter; a copy ``lazysky_btree`` with v6's btree instead. The
    writer (with its ``source_tiles`` ledger) is otherwise the same code on every side, so
    a first write deletes nothing anywhere and the sides differ by the index's upkeep
    alone. Then
    :func:`_interleaved_writes`; then, per side, reads (count) of loaded tiles, of the
    loaded run and of tiles the A/B just wrote (the newest ranges), and a re-write
    (retry) of 3 of the A/B's tiles, whose DELETE on a BRIN reads every range not
    summarised yet.
    """
    from lazysky.catalog.schema import RUN_TILE_BRIN_PAGES, run_tile_brin_sql

    with catalog.engine().connect() as sa_conn:
        v12 = run_tile_brin_sql(sa_conn)
    minmax = (f"CREATE INDEX ix_coadd_sources_run_tile_brin ON coadd_sources USING brin "
              f"(run_id, tile_id) WITH (pages_per_range = {RUN_TILE_BRIN_PAGES})")
    btree = "CREATE INDEX ix_coadd_sources_run_tile ON coadd_sources (run_id, tile_id)"
    sides_sql = {
        "BRIN (v12)": (libpq_dsn(catalog.dsn), v12),
        "BRIN (v12), no summarising by the writer": (
            _copy_database(catalog, "lazysky_nosum"), v12),
        "BRIN, tile_id by min/max": (_copy_database(catalog, "lazysky_minmax"), minmax),
        "btree (v6–v11)": (_copy_database(catalog, "lazysky_btree"), btree),
    }
    for dsn, create in sides_sql.values():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP INDEX IF EXISTS ix_coadd_sources_run_tile_brin")
            conn.execute("DROP INDEX IF EXISTS ix_coadd_sources_run_tile")
            conn.execute(create)
            conn.execute("VACUUM ANALYZE coadd_sources")
    lines = [f"  index of side {label!r}: {create}"
             for label, (_, create) in sides_sql.items()]
    sides = {label: (catalog if i == 0 else open_catalog(dsn=dsn))
             for i, (label, (dsn, _)) in enumerate(sides_sql.items())}
    lines = [f"A/B of the (run_id, tile_id) index, {tiles} tiles of {TILE_ROWS:,d} rows each "
             f"way, interleaved, load average {os.getloadavg()[0]:.1f}:", *lines,
             *_interleaved_writes(sides, tiles, writer={
                 "BRIN (v12), no summarising by the writer": {"SUMMARIZE_RANGES": 0}})]
    for label, (dsn, _) in sides_sql.items():
        with psycopg.connect(dsn) as conn:
            size = conn.execute(
                "SELECT pg_size_pretty(sum(pg_relation_size(relid))) FROM pg_partition_tree("
                "coalesce(to_regclass('ix_coadd_sources_run_tile_brin'), "
                "to_regclass('ix_coadd_sources_run_tile')))").fetchone()
            ab_run = conn.execute("SELECT run_id FROM source_tiles WHERE tile_id LIKE 'ab-%' "
                                  "ORDER BY written_at DESC LIMIT 1").fetchone()
            ab_tiles = [r[0] for r in conn.execute(
                "SELECT tile_id FROM source_tiles WHERE tile_id LIKE 'ab-%%' AND run_id = %s "
                "ORDER BY tile_id LIMIT 3", (ab_run[0] if ab_run else "",)).fetchall()]
        text = f"  {label}: index size {size[0] if size else '?'}"
        if run:
            loaded = [f"bench-{t:06d}" for t in range(0, 200, 10)]
            one, whole = _tile_read_ms(dsn, run, loaded)
            text += (f"; count(*) of one loaded tile {one:.1f} ms, of the loaded run "
                     f"{whole:.0f} ms (medians)")
        if ab_run and ab_tiles:
            newest, _ = _tile_read_ms(dsn, ab_run[0], ab_tiles)
            text += f"; count(*) of one A/B tile {newest:.1f} ms"
            cat = sides[label]
            rng = np.random.default_rng(5)
            retry = []
            for tile in ab_tiles:
                t0 = time.perf_counter()
                got = write_sources("coadd", ab_run[0], tile,
                                    _tile(rng, TILE_ROWS, 900_000), catalog=cat)
                retry.append(time.perf_counter() - t0)
                assert got.deleted == TILE_ROWS, got
            text += f"; re-write (retry) of a tile {np.median(retry) * 1e3:.0f} ms (median)"
        lines.append(text)
    lines.append(f"  load average at the end {os.getloadavg()[0]:.1f}")
    return lines


def _ab_growth(sides: dict[str, str], rows: int, *, writers: int, catalog_dir: Path,
               what: str) -> list[str]:
    """Load ``rows`` rows into every side (label → DSN), interleaved step by step.

    A tenth at a time with ``writers`` processes, the databases alternating step by step
    (and which goes first), on one server: the server's CPU during a step is that side's.
    Returns the report lines: rows/s and CPU µs/row (writers + server; loading backends
    alone) per step and side.
    """
    runs = {}
    for label, dsn in sides.items():
        run = Run(new_run_id("test"), description=f"benchmark A/B: {what}")
        register_run(run, catalog=open_catalog(dsn=dsn))
        runs[label] = run.run_id
    n_tiles = rows // TILE_ROWS
    step_tiles = max(n_tiles // 10, writers)
    got: dict[str, list[tuple[float, float, float]]] = {label: [] for label in sides}
    load0 = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    with ctx.Pool(writers) as pool:
        for dsn in sides.values():
            pool.map(_warm_worker, [dsn] * writers)
        done, i = 0, 0
        while done < n_tiles:
            todo = min(step_tiles, n_tiles - done)
            for label in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
                rate, us, stats = _load_step(pool, sides[label], runs[label], done, todo,
                                             writers, catalog_dir)
                got[label].append((rate, us, stats.get("backends_us", float("nan"))))
                print(f"  {label}: {(done + todo) * TILE_ROWS:>10,d} rows: {rate:,.0f} rows/s, "
                      f"{us:.2f} CPU-µs/row (writers + server), backends "
                      f"{got[label][-1][2]:.2f}, load average {os.getloadavg()[0]:.1f}",
                      flush=True)
            done += todo
            i += 1
    lines = [f"A/B of {what} as the table grows to {rows:,d} rows per side, {writers} "
             f"writers, steps interleaved; load average {load0:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end:"]
    for label, steps in got.items():
        rates, cpu, backend = (np.array(c) for c in zip(*steps, strict=True))
        lines.append(
            f"  {label}: rows/s per step {', '.join(f'{r:,.0f}' for r in rates)} (mean "
            f"{rates.mean():,.0f}); CPU µs/row (writers + server) "
            f"{', '.join(f'{c:.2f}' for c in cpu)} (median {np.median(cpu):.2f}); loading "
            f"backends {', '.join(f'{b:.2f}' for b in backend)} (median "
            f"{np.median(backend):.2f})")
    return lines


def ab_index_growth(catalog: Catalog, rows: int, *, writers: int,
                    catalog_dir: Path) -> list[str]:
    """Both (run_id, tile_id) indexes as the table grows, interleaved step by step.

    The empty catalog (v12: BRIN) is copied into ``lazysky_btree`` with v6's btree
    instead, then both are loaded by :func:`_ab_growth`. The writer code is the same (on
    the btree side its BRIN summarising finds no BRIN: one catalog query per write).
    """
    copy_dsn = _copy_database(catalog, "lazysky_btree")
    with psycopg.connect(copy_dsn, autocommit=True) as conn:
        conn.execute("DROP INDEX IF EXISTS ix_coadd_sources_run_tile_brin")
        conn.execute("CREATE INDEX ix_coadd_sources_run_tile ON coadd_sources "
                     "(run_id, tile_id)")
    return _ab_growth({"BRIN (v12)": libpq_dsn(catalog.dsn), "btree (v6–v11)": copy_dsn},
                      rows, writers=writers, catalog_dir=catalog_dir,
                      what="the (run_id, tile_id) index")


#: The copy of the catalog whose month partition is one plain table (as before v14).
_MONTH_DB = "lazysky_month"


def _ab_cells_sides(catalog: Catalog) -> dict[str, str]:
    """The two databases of :func:`ab_cells`: label → libpq DSN."""
    dsn = libpq_dsn(catalog.dsn)
    return {"cells": dsn, "month partition": dsn.replace("/lazysky?", f"/{_MONTH_DB}?")}


def ab_cells_queries(catalog: Catalog, rows: int, *, n: int = 200,
                     rounds: int = 3) -> list[str]:
    """The query goals on the two databases :func:`ab_cells` loaded, interleaved.

    1′ and 6′ cones, prepared (generic plan, as ``cone_search`` runs them) and not, with
    the cone's box (as ``cone_search`` sends them) and without it; 4 prepared clients
    with and without the box; the cross-match of 100 000 positions
    (:func:`lazysky.catalog.xmatch.crossmatch`, which adds each position's box itself).
    ``rounds`` rounds, the two sides alternating. Returns the report lines (medians of
    the rounds).
    """
    _SPAN[0] = _field_ra_span(rows)
    sides = _ab_cells_sides(catalog)
    for dsn in sides.values():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE coadd_sources")
    cells = [(r, prepared, box) for r in ("1′", "6′") for prepared in (True, False)
             for box in (True, False)]
    got: dict[tuple[str, str, bool, bool], list[tuple[float, float, float]]] = {}
    for i in range(rounds):
        for label in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            for r, prepared, box in cells:
                got.setdefault((label, r, prepared, box), []).append(sql_latency(
                    sides[label], "pgsphere" if box else "pgsphere-nobox", RADII_DEG[r], n,
                    prepared=prepared))
    lines = [f"cone latency, {n} queries per cell, {rounds} interleaved rounds (medians), "
             f"p50 / p95 ms; load average {os.getloadavg()[0]:.1f}:",
             f"| radius | statement | the cone's box in the query | {' | '.join(sides)} | "
             "mean rows |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r, prepared, box in cells:
        vals, mean_rows = [], []
        for label in sides:
            p50, p95, rows_got = (float(np.median(c)) for c in zip(
                *got[(label, r, prepared, box)], strict=True))
            vals.append(f"{p50:.2f} / {p95:.2f}")
            mean_rows.append(f"{rows_got:,.1f}")
        lines.append(f"| {r} | {'prepared (generic plan)' if prepared else 'unprepared'} | "
                     f"{'yes (as cone_search)' if box else 'no'} | {' | '.join(vals)} | "
                     f"{' / '.join(dict.fromkeys(mean_rows))} |")
    # the other two query goals: 4 prepared clients (with and without the cone's box)
    # and the cross-match of 100 000 positions (half on sources)
    with psycopg.connect(sides["cells"]) as conn:
        sample = np.array(conn.execute(
            "SELECT ra, dec FROM coadd_sources TABLESAMPLE SYSTEM (1) LIMIT 50000").fetchall(),
            dtype=float).reshape(-1, 2)
    far = _centres(100_000 - len(sample), seed=17)
    ra, dec = np.concatenate([sample[:, 0], far[:, 0]]), np.concatenate([sample[:, 1],
                                                                         far[:, 1]])
    shapes = ((True, True), (True, False))
    qps: dict[tuple[str, bool], list[float]] = {(lb, b): [] for lb in sides for _, b in shapes}
    xm: dict[str, list[float]] = {label: [] for label in sides}
    matches: dict[str, int] = {}
    for i in range(rounds):
        for label in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            tput = throughput(sides[label], RADII_DEG["1′"], 4, 5.0, rounds=1, shapes=shapes)
            for (_, box), runs in tput.items():
                qps[(label, box)].append(runs[0][0])
            cat = open_catalog(dsn=sides[label])
            t0 = time.perf_counter()
            matches[label] = len(crossmatch(ra, dec, "1arcsec", catalog=cat))
            xm[label].append(time.perf_counter() - t0)
    for label in sides:
        with_box, without = qps[(label, True)], qps[(label, False)]
        lines.append(f"  {label}: 4 prepared clients at 1′ {np.median(with_box):,.0f} "
                     f"queries/s with the cone's box (rounds: "
                     f"{', '.join(f'{q:,.0f}' for q in with_box)}), "
                     f"{np.median(without):,.0f} without it (rounds: "
                     f"{', '.join(f'{q:,.0f}' for q in without)}); cross-match 100 000 "
                     f"positions at 1″ {np.median(xm[label]):.2f} s (rounds: "
                     f"{', '.join(f'{t:.2f}' for t in xm[label])}; "
                     f"{matches[label]:,d} matches)")
    return lines


def ab_cells(catalog: Catalog, rows: int, *, writers: int, catalog_dir: Path) -> list[str]:
    """This month's partition split into sky cells (v14) vs one plain table (v13).

    The empty catalog (v14) is copied into ``lazysky_month``, whose coadd partition of
    this month's ``test`` runs is made again as v13 had it: dropped (it is empty) and
    made by :func:`~lazysky.catalog.schema.ensure_partitions` with ``cells=False``, one
    plain table with the run-id CHECK; the indexes come from the parent as on every
    partition. Both are then loaded by :func:`_ab_growth` (the writers make the cells as
    tiles land on the cells side) and queried by :func:`ab_cells_queries`. The writers
    summarise BRIN ranges as in production on both sides (the cells each write filled,
    or the month partition); ``BENCH_SUMMARIZE_RANGES`` in the environment overrides it
    for both, and the report says which it was.
    """
    from lazysky.catalog.schema import ensure_partitions

    name = _test_month_partition()
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        kind = conn.execute("SELECT relkind::text FROM pg_class WHERE oid = to_regclass(%s)",
                            (name,)).fetchone()
        if not kind or kind[0] != "p":
            msg = f"--ab-cells: {name} is {kind[0] if kind else 'missing'}, not split (v14)"
            raise SystemExit(msg)
        full = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {name})").fetchone()
        if full and full[0]:
            msg = f"--ab-cells needs an empty {name} (run it without --keep)"
            raise SystemExit(msg)
    copy_dsn = _copy_database(catalog, _MONTH_DB)
    month_catalog = open_catalog(dsn=copy_dsn)
    with month_catalog.engine().begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {name}"))
        ensure_partitions(conn, [("test", parse_run_id(new_run_id("test")).date)],
                          cells=False)
        made = conn.execute(sa.text("SELECT relkind::text FROM pg_class WHERE oid = "
                                    "to_regclass(:n)"), {"n": name}).scalar()
    month_catalog.engine().dispose()
    assert made == "r", made
    summarize = int(os.environ.get("BENCH_SUMMARIZE_RANGES", write_module.SUMMARIZE_RANGES))
    summarizing = (f"BRIN summarising by the writers on, both sides, as in production "
                   f"(SUMMARIZE_RANGES = {summarize}: the cells each write filled, or the "
                   f"month partition)" if summarize > 0 else
                   f"no BRIN summarising by the writers on either side "
                   f"(BENCH_SUMMARIZE_RANGES = {summarize})")
    sides = _ab_cells_sides(catalog)
    lines = _ab_growth(sides, rows, writers=writers, catalog_dir=catalog_dir,
                       what=f"sky cells ({DEC_BAND_DEG:g}° Dec bands × RA slabs, "
                            f"{SLABS_AT_EQUATOR} at the equator; v14) vs one month "
                            f"partition (v13); {summarizing}")
    for label, dsn in sides.items():
        with psycopg.connect(dsn) as conn:
            got = conn.execute(
                "SELECT count(*) FILTER (WHERE isleaf), pg_size_pretty(sum(pg_relation_size("
                "relid))) FROM pg_partition_tree(%s::regclass)", (name,)).fetchone()
            size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))"
                                ).fetchone()
        lines.append(f"  {label}: {name} has {got[0] if got else '?'} leaf table(s), "
                     f"{got[1] if got else '?'} of heap; database {size[0] if size else '?'}")
    return [*lines, *ab_cells_queries(catalog, rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300, help="queries per latency cell")
    ap.add_argument("--writers", type=int, default=2, help="loader processes")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--xmatch", type=int, default=100_000, help="positions to cross-match")
    ap.add_argument("--dir", default="/var/tmp/lazysky-bench", help="embedded catalog dir")
    ap.add_argument("--keep", action="store_true", help="reuse rows already loaded")
    ap.add_argument("--ab-key", type=int, default=0, metavar="TILES",
                    help="after the load, A/B the (run, tile) index against the old "
                         "primary key with TILES tiles each way, then stop")
    ap.add_argument("--ab-opclass", type=int, default=0, metavar="TILES",
                    help="after the load, A/B the GiST class of pos (v11) against "
                         "pgSphere's default with TILES tiles each way, then stop")
    ap.add_argument("--ab-copy", type=int, default=0, metavar="TILES",
                    help="after loading, A/B of the write path: binary COPY straight into "
                         "the table vs through the staging table, on the loaded table")
    ap.add_argument("--ab-cells", action="store_true",
                    help="instead of the benchmark: load --rows into the v14 catalog (this "
                         "month's test partition split into sky cells) and into a copy "
                         "whose month partition is one plain table (v13), interleaved step "
                         "by step, then the query goals on both")
    ap.add_argument("--ab-cells-queries", action="store_true",
                    help="with --keep: only the query part of an --ab-cells run")
    ap.add_argument("--ab-index", type=int, default=0, metavar="TILES",
                    help="after the load, A/B the (run_id, tile_id) BRIN (v12) against "
                         "a BRIN of 32 pages per range and the v6 btree, TILES tiles "
                         "each way, then stop")
    ap.add_argument("--ab-index-growth", action="store_true",
                    help="instead of the benchmark: load --rows into the v12 catalog and "
                         "into a copy with the v6 btree, interleaved step by step")
    ap.add_argument("--ab-settings", nargs="+", default=None, metavar="SETTINGS",
                    help="instead of the benchmark: load --rows into one embedded server "
                         "per SETTINGS (LAZYSKY_PG_SETTINGS text; '' = lazysky's "
                         "defaults), interleaved step by step, and compare the curves")
    ap.add_argument("--query-rounds", type=int, default=0, metavar="N",
                    help="with --ab-settings: then N interleaved rounds of queries on "
                         "every server (6′ latency, 4-client throughput, cross-match)")
    ap.add_argument("--load-only", action="store_true",
                    help="stop after the bulk load (and the row-by-row baseline)")
    args = ap.parse_args()

    bench_dir = Path(args.dir)
    if bench_dir.exists() and not args.keep:
        from lazysky.catalog import server

        for sub in [bench_dir, *bench_dir.iterdir()]:
            if (sub / "pgdata").exists():
                server.stop(sub)
        shutil.rmtree(bench_dir)
    bench_dir.mkdir(parents=True, exist_ok=True)
    bench_dir.chmod(0o755)
    if args.ab_settings:
        print("\n".join(ab_settings(bench_dir, args.rows, args.ab_settings,
                                    writers=args.writers, query_rounds=args.query_rounds,
                                    clients=args.clients)))
        return
    catalog = open_catalog(load_settings(catalog_dir=bench_dir, catalog_dsn=None))
    dsn = libpq_dsn(catalog.dsn)
    with psycopg.connect(dsn) as conn:
        have = conn.execute("SELECT count(*) FROM coadd_sources").fetchone()
    report = [f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}, "
              f"load average {os.getloadavg()[0]:.2f} at start"]
    load_rates: list[float] | None = None
    if args.ab_cells_queries:
        print("\n".join([*report, *ab_cells_queries(catalog, args.rows)]))
        return
    if args.ab_cells:
        print("\n".join([*report, *ab_cells(catalog, args.rows, writers=args.writers,
                                             catalog_dir=bench_dir)]))
        return
    if args.ab_index_growth:
        print("\n".join([*report, *ab_index_growth(catalog, args.rows, writers=args.writers,
                                                    catalog_dir=bench_dir)]))
        return
    if not have or have[0] < args.rows:
        run = Run(new_run_id("test"), description="benchmark")
        register_run(run, catalog=catalog)
        print(f"bulk load {args.rows:,d} rows, {args.writers} writer processes, "
              f"{TILE_ROWS:,d} rows per (run, tile)", flush=True)
        steps = load(catalog, run.run_id, args.rows - (have[0] if have else 0),
                     writers=args.writers, catalog_dir=bench_dir)
        rbr = row_by_row(catalog, run.run_id, 20_000)
        rates = [st[1] for st in steps]
        cpu = [st[2] for st in steps]
        load_rates = rates
        report.append(f"bulk load (write_sources, {args.writers} processes, indexed table): "
                      f"first 10 %: {rates[0]:,.0f} rows/s, last 10 %: {rates[-1]:,.0f} rows/s, "
                      f"mean {np.mean(rates):,.0f} rows/s, per step: "
                      f"{', '.join(f'{r:,.0f}' for r in rates)}; CPU (writers + server) "
                      f"{np.median(cpu):.1f} µs/row (median of steps, i.e. "
                      f"{2e6 / np.median(cpu):,.0f} rows/s if 2 cores did nothing else); "
                      f"row-by-row INSERT: {rbr:,.0f} rows/s; ratio {np.mean(rates) / rbr:.0f}×")
    if args.load_only:
        print("\n".join(report))
        return
    if args.ab_key:
        print("\n".join([*report, *ab_key(catalog, args.ab_key)]))
        return
    if args.ab_index:
        with psycopg.connect(dsn) as conn:
            got = conn.execute("SELECT run_id FROM source_tiles WHERE tile_id = "
                               "'bench-000000' LIMIT 1").fetchone()
        print("\n".join([*report, *ab_index(catalog, args.ab_index,
                                               got[0] if got else None)]))
        return
    if args.ab_copy:
        print("\n".join([*report, *ab_copy(catalog, args.ab_copy)]))
        return
    if args.ab_opclass:
        print("\n".join([*report, *ab_opclass(catalog, args.ab_opclass)]))
        return
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE coadd_sources")
        nrows = conn.execute("SELECT count(*) FROM coadd_sources").fetchone()
        q3c = ensure_q3c(conn)
    total_rows = nrows[0] if nrows else 0
    _SPAN[0] = _field_ra_span(total_rows)
    report.append(f"rows in coadd_sources: {total_rows:,d} in a field of RA {RA_START:g}° + "
                  f"{_SPAN[0]:g}° (across 0/360) × Dec {FIELD_DEC[0]:g}…{FIELD_DEC[1]:g}°, "
                  f"{TILE_ROWS / TILE_DEG**2:,.0f} sources/deg²")
    report.append("")
    report.append("SQL columns: prepared statements planned once, binary rows (see _connect); "
                  "seq scan: unprepared. pgSphere SQL: with the cone's box on ra/dec as "
                  "cone_search sends it (PostgreSQL prunes to the sky cells the cone touches; "
                  "the goals are judged on it); without the cone's box: the same cones in "
                  "ad-hoc SQL naming no position range (every cell's index probed); seq scan: "
                  "the SQL with the box, index scans off.")
    report.append("")
    report.append("| radius | mean rows | pgSphere SQL p50/p95 ms | pgSphere SQL without the "
                  "cone's box p50/p95 ms | q3c SQL p50/p95 ms | seq scan p50/p95 ms | "
                  "cone_search() p50/p95 ms |")
    report.append("|---|---|---|---|---|---|---|")
    sql_p95: dict[str, float] = {}
    nobox_p95: dict[str, float] = {}
    api_p95: dict[str, float] = {}
    for label, radius in RADII_DEG.items():
        p50, p95, mean_rows = sql_latency(dsn, "pgsphere", radius, args.queries)
        nb = sql_latency(dsn, "pgsphere-nobox", radius, args.queries)
        if nb[2] != mean_rows:  # the same cones: the box must not change what they hold
            print(f"  WARNING: {label}: {mean_rows} rows per cone with the box, {nb[2]} "
                  f"without", flush=True)
        q = sql_latency(dsn, "q3c", radius, args.queries) if q3c else None
        s = sql_latency(dsn, "pgsphere", radius, 5, seqscan=True, prepared=False)
        a = api_latency(catalog, radius, args.queries)
        sql_p95[label], nobox_p95[label], api_p95[label] = p95, nb[1], a[1]
        qtxt = f"{q[0]:.2f} / {q[1]:.2f}" if q else "n/a"
        report.append(f"| {label} | {mean_rows:,.0f} | {p50:.2f} / {p95:.2f} | "
                      f"{nb[0]:.2f} / {nb[1]:.2f} | {qtxt} | "
                      f"{s[0]:.0f} / {s[1]:.0f} | {a[0]:.2f} / {a[1]:.2f} |")
        print(report[-1], flush=True)
    tput = throughput(dsn, 1 / 60, args.clients, 5.0, rounds=2, catalog_dir=bench_dir)
    report.append("")
    for shape, runs in tput.items():
        report.append(f"throughput, {args.clients} clients, r = 1′ (SQL, {_shape_text(*shape)}): "
                      f"{', '.join(f'{q:,.0f}' for q, _ in runs)} queries/s in "
                      f"{len(runs)} interleaved rounds of 5 s; CPU (clients + server) "
                      f"{np.median([c for _, c in runs]):.0f} µs/query")
    qps = float(np.median([q for q, _ in tput[(True, True)]]))
    qps_nobox = float(np.median([q for q, _ in tput[(True, False)]]))
    with psycopg.connect(dsn) as conn:
        sample = conn.execute("SELECT ra, dec FROM coadd_sources TABLESAMPLE SYSTEM (1) "
                              "LIMIT %s", (args.xmatch // 2,)).fetchall()
    near = np.array(sample, dtype=float)
    far = _centres(args.xmatch - len(near), seed=17)
    ra = np.concatenate([near[:, 0], far[:, 0]])
    dec = np.concatenate([near[:, 1], far[:, 1]])
    xm_times, xm_cpu = [], []
    for _ in range(3):
        srv0, cpu0 = server_cpu_seconds(bench_dir), time.process_time()
        t0 = time.perf_counter()
        matched = crossmatch(ra, dec, "1arcsec", catalog=catalog)
        xm_times.append(time.perf_counter() - t0)
        xm_cpu.append(time.process_time() - cpu0 + server_cpu_seconds(bench_dir) - srv0)
    xm = float(np.median(xm_times))
    report.append(f"cross-match {args.xmatch:,d} positions (half on sources) at 1″: "
                  f"{', '.join(f'{t:.2f}' for t in xm_times)} s (median {xm:.2f} s; CPU "
                  f"client + server {np.median(xm_cpu):.2f} s; {len(matched):,d} matches)")
    report.append(f"load average at the end: {os.getloadavg()[0]:.2f}")
    report.append("")
    report.extend(verdicts(total_rows, load_rates, sql_p95, api_p95, qps, xm, args.xmatch,
                           nobox_p95=nobox_p95, qps_nobox=qps_nobox))
    print("\n".join(report))


def verdicts(rows: int, load_rates: list[float] | None, sql_p95: dict[str, float],
             api_p95: dict[str, float], qps: float, xmatch_s: float,
             xmatch_n: int, *, nobox_p95: dict[str, float] | None = None,
             qps_nobox: float | None = None) -> list[str]:
    """The goals of issue 7 against this run's numbers, as a Markdown table.

    ``sql_p95`` and ``qps`` are the cones with their box, as cone_search sends them: the
    verdicts. ``nobox_p95`` and ``qps_nobox``, the same without the box, are printed
    beside them.
    """
    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    out = [f"Goals (stated at 10 M rows on 2 cores; this run: {rows:,d} rows, "
           f"{os.cpu_count()} cores)", "",
           "| goal | measured | verdict |", "| --- | --- | --- |"]
    if load_rates:
        ok = min(float(np.mean(load_rates)), load_rates[-1]) >= 150_000
        out.append(f"| bulk load ≥ 150 000 rows/s, sustained as the table grows | mean "
                   f"{np.mean(load_rates):,.0f}, last 10 % {load_rates[-1]:,.0f} rows/s | "
                   f"{mark(bool(ok))} |")
    else:
        out.append("| bulk load ≥ 150 000 rows/s | not measured (rows already loaded, --keep) "
                   "| n/a |")
    small = [k for k in RADII_DEG if RADII_DEG[k] <= 0.1]
    beside = (f" (without the cone's box: "
              f"{', '.join(f'{k}: {nobox_p95[k]:.2f} ms' for k in small)})"
              if nobox_p95 else "")
    out.append(f"| SQL p95 ≤ 1 ms for r ≤ 6′ (with the cone's box, as cone_search) | "
               f"{', '.join(f'{k}: {sql_p95[k]:.2f} ms' for k in small)}{beside} | "
               f"{mark(all(sql_p95[k] <= 1.0 for k in small))} |")
    out.append(f"| cone_search p95 ≤ 5 ms (r ≤ 6′) | "
               f"{', '.join(f'{k}: {api_p95[k]:.2f} ms' for k in small)} | "
               f"{mark(all(api_p95[k] <= 5.0 for k in small))} |")
    beside = f"; without the cone's box {qps_nobox:,.0f} /s" if qps_nobox is not None else ""
    out.append(f"| ≥ 10 000 queries/s with 4 clients | {qps:,.0f} /s (prepared, with the "
               f"cone's box, median){beside} | {mark(qps >= 10_000)} |")
    out.append(f"| cross-match 100 000 × 10 M at 1″ ≤ 2 s | {xmatch_n:,d} positions: "
               f"{xmatch_s:.2f} s (median of 3) | "
               f"{mark(xmatch_s <= 2.0)} |")
    return out


if __name__ == "__main__":
    main()

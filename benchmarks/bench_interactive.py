"""Interactive speed (issue 11): reprocess one tile with a changed detection threshold on a
warm local cluster, and ``compare_runs`` on a demo-sized run; median of several runs each,
with the share of wall time that is Dask overhead.

Side by side in one run, on the survey of ``lazysky demo`` (tiny camera, 4 epochs × 2
dithers, 24 transients, 256 px tiles):

* **reference**: the non-interactive way to see a changed threshold, ``lazysky run`` of the
  whole configuration again (``lazysky.run``);
* **reprocess, detect only**: ``lazysky.reprocess(run, tiles=[one], overrides={"detect.
  threshold": 3})`` — the parent's images are reused;
* **reprocess, whole chain**: one tile with a changed ``stack.sigma`` (raw exposures →
  calibrate → coadd → difference → detect → catalog for that tile and its neighbours);
* **compare_runs** of the run with a child covering every tile.

Dask overhead = (wall − time some task was computing) / wall, from the scheduler's task
stream (the union of the tasks' compute intervals, so two workers computing at once are
not counted twice); also printed: (wall − Σ task compute) / wall, clipped at 0. The rest
of the wall time is the client (graph building, catalog queries) and the scheduler.

Run::

    python benchmarks/bench_interactive.py [--repeat 5] [--dir /var/tmp/lazysky-bench-inter]

It starts its own embedded catalog in ``--dir`` and prints a Markdown report
(docs/interactive.md quotes it) with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any


def _busy(stream: list[dict[str, Any]]) -> tuple[float, float]:
    """``(union, sum)`` of the tasks' compute intervals (seconds)."""
    spans = sorted((s["start"], s["stop"]) for t in stream for s in t.get("startstops", ())
                   if s.get("action") == "compute")
    total = sum(b - a for a, b in spans)
    union, end = 0.0, -1e300
    for a, b in spans:
        if b <= end:
            continue
        union += b - max(a, end)
        end = b
    return union, total


def _timed(client: Any, fn: Any) -> tuple[float, float, float, Any]:
    """``(wall, overhead share by union, overhead share by sum, result)`` of one call."""
    from distributed import get_task_stream

    with get_task_stream(client) as ts:
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    union, total = _busy(ts.data)
    return wall, (wall - union) / wall, max(wall - total, 0.0) / wall, out


def _report(name: str, rows: list[tuple[float, float, float, Any]]) -> str:
    walls = [r[0] for r in rows]
    return (f"| {name} | {len(rows)} | {statistics.median(walls):.2f} | "
            f"{min(walls):.2f}–{max(walls):.2f} | "
            f"{100 * statistics.median(r[1] for r in rows):.0f} % | "
            f"{100 * statistics.median(r[2] for r in rows):.0f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (≥ 5)")
    parser.add_argument("--repeat-slow", type=int, default=3,
                        help="timed runs of the whole-chain cases (the full rerun, one tile "
                             "from raw)")
    parser.add_argument("--dir", default="/var/tmp/lazysky-bench-inter")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    import lazysky
    from lazysky.catalog import open_catalog
    from lazysky.config import load_settings
    from lazysky.runconfig import RunConfig
    from lazysky.simulator import SurveySpec, simulate_survey

    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    settings = load_settings(catalog_dir=base / "catalog", catalog_dsn=None,
                             store_url=str(base / "store"))
    catalog = open_catalog(settings)
    spec = SurveySpec(instrument="tiny", n_epochs=4, n_dithers=2, n_transients=24, seed=42)
    simulate_survey(spec, base / "survey")
    cfg = RunConfig.model_validate({
        "type": "test", "store": str(base / "store"),
        "ingest": [str(base / "survey" / "raw"), str(base / "survey" / "calib")],
        "field": {"name": "deep1", "tile_px": 256},
        "reference": ["deep1-r-e00[01]-*"], "science": ["deep1-r-e00[23]-*"],
    })
    print(f"machine: {platform.node()}, {os.cpu_count()} cores; load average at start "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    with LocalCluster(n_workers=args.workers, threads_per_worker=1,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        kw = {"settings": settings, "catalog": catalog}
        t0 = time.perf_counter()
        summary = lazysky.run(cfg, client=client, **kw)
        print(f"parent run {summary.run_id}: {time.perf_counter() - t0:.1f} s (cold), "
              f"{summary.tiles} tiles, {summary.sources} sources")
        parent = lazysky.open_run(summary.run_id, **kw)
        tile = max(parent.tile_rows, key=lambda t: parent.tile_rows[t])
        # warm: the workers have imported everything and run every kind of task once
        lazysky.reprocess(parent, tiles=[tile], overrides={"detect.threshold": 4.0},
                          client=client, **kw)

        results: dict[str, list[tuple[float, float, float, Any]]] = {}
        results["reprocess 1 tile, detect only (threshold 5 → 3)"] = [
            _timed(client, lambda: lazysky.reprocess(
                parent, tiles=[tile], overrides={"detect.threshold": 3.0}, client=client,
                **kw)) for _ in range(args.repeat)]
        child_all = lazysky.reprocess(parent, overrides={"detect.threshold": 3.0},
                                      client=client, **kw)
        results[f"compare_runs, {len(child_all.tiles)} tiles (coadd)"] = [
            _timed(client, lambda: lazysky.compare_runs(parent, child_all, **kw))
            for _ in range(args.repeat)]
        results["compare_runs, differences"] = [
            _timed(client, lambda: lazysky.compare_runs(parent, child_all, table="diff", **kw))
            for _ in range(args.repeat)]
        results["reprocess 1 tile, whole chain (stack.sigma 3 → 2.5)"] = [
            _timed(client, lambda: lazysky.reprocess(
                parent, tiles=[tile], overrides={"stack.sigma": 2.5}, client=client, **kw))
            for _ in range(args.repeat_slow)]
        results[f"reference: lazysky.run of the whole field again ({summary.tiles} tiles)"] = [
            _timed(client, lambda: lazysky.run(cfg, client=client, **kw))
            for _ in range(args.repeat_slow)]
        workers_rss = client.run(
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    cmp = results[f"compare_runs, {len(child_all.tiles)} tiles (coadd)"][0][3]
    print()
    print("| case | runs | median wall (s) | range (s) | Dask overhead (idle) | "
          "(wall − Σ compute) / wall |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        print(_report(name, rows))
    ref = statistics.median(r[0] for r in results[next(k for k in results
                                                          if k.startswith("reference"))])
    one = statistics.median(r[0] for r in results[next(iter(results))])
    print(f"\nreprocess one tile (detect only) vs rerun the field: {one / ref:.3f}× the time "
          f"({ref / one:.1f}× faster)")
    print(f"compare_runs totals: {cmp.totals}")
    print(f"peak RSS: client {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
          f" MiB, workers {', '.join(f'{v:.0f}' for v in workers_rss.values())} MiB")
    print(f"load average at the end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

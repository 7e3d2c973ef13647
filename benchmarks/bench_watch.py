"""What watching costs: the demo's run with and without lazysky's plugin and QA.

Simulates the demo's survey once (``lazysky demo``: 4 detectors, 4 epochs x 2 dithers),
then runs the demo's configuration (ingest → masters → reference → differences →
detect → catalog → qa → associate, with the per-stage progress bars the demo shows) in
arms, each on a fresh store and a fresh ``LocalCluster`` of 2 worker processes,
interleaved (arm 1, arm 2, …, then in reverse order, …) so a drifting machine load hits
all alike:

* ``watched``: ``cluster.watch`` on (plugin, ``/lazysky`` page, ``/metrics`` collector,
  bars fed by the scheduler) and ``qa_enabled`` on; while it runs, a thread fetches
  ``/lazysky/api/runs`` and ``/metrics`` once a second, as an open page and a
  Prometheus scrape would;
* ``bare``: neither (the issue's comparison: watched against bare, goal under 3 %);
* ``plugin`` (plugin and scrapes, no QA) and ``qa`` (QA, no plugin), with ``--arms``, to
  tell the two costs apart.

Reports each run's wall time and CPU seconds (this process — client, scheduler,
scraper — and the two workers; PostgreSQL's are not counted), the medians per arm and
their ratios to ``bare``, the stage timings' medians, and the machine's load average
before and after. On a busy machine the CPU ratio is the steadier of the two.

    python benchmarks/bench_watch.py [--repeats 3] [--arms watched,bare] [--out DIR]
                                     [--json FILE]

Needs the embedded catalog (or ``LAZYSKY_CATALOG_DSN``); set ``LAZYSKY_CATALOG_DIR`` to
keep it out of your home directory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import psutil


def _scrape(base: str, stop: threading.Event, counts: dict[str, int]) -> None:
    """Read the page's JSON and /metrics once a second, like a browser and Prometheus."""
    while not stop.wait(1.0):
        for path in ("/lazysky/api/runs", "/metrics"):
            try:
                with urllib.request.urlopen(base + path, timeout=5) as r:  # 127.0.0.1 only
                    r.read()
                counts[path] = counts.get(path, 0) + 1
            except OSError:
                counts[f"{path} failed"] = counts.get(f"{path} failed", 0) + 1


ARMS = {"watched": (True, True), "bare": (False, False), "plugin": (True, False),
        "qa": (False, True)}  # arm: (cluster.watch, qa_enabled)


def _one(survey: Path, work: Path, *, arm: str, index: int) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    from lazysky.config import load_settings
    from lazysky.runconfig import RunConfig
    from lazysky.runner import run

    cfg = RunConfig.model_validate({
        "type": "test", "store": str(work / f"store-{index}"),
        "ingest": [str(survey / "raw"), str(survey / "calib")],
        "field": {"name": "deep1", "tile_px": 256},
        "reference": [f"deep1-r-e{e:03d}-*" for e in range(2)],
        "science": [f"deep1-r-e{e:03d}-*" for e in range(2, 4)],
    })  # fmt: skip
    watch, qa = ARMS[arm]
    settings = load_settings(cluster={"watch": watch}, qa_enabled=qa)
    stop, counts = threading.Event(), {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        base = client.dashboard_link.rsplit("/status", 1)[0]
        scraper = threading.Thread(target=_scrape, args=(base, stop, counts), daemon=True)
        if watch:
            scraper.start()
        workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
        cpu0 = time.process_time() + sum(_cpu(w) for w in workers)
        t0 = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            summary = run(cfg, settings=settings, client=client, show_progress=True)
        wall = time.perf_counter() - t0
        cpu = time.process_time() + sum(_cpu(w) for w in workers) - cpu0
        stop.set()
        if watch:
            scraper.join()
    return {"arm": arm, "watch": watch, "qa": qa, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "status": summary.status,
            "timings": dict(summary.timings), "sources": summary.sources,
            "dia_sources": summary.dia_sources, "scrapes": counts}


def _cpu(proc: Any) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting")
    parser.add_argument("--arms", default="watched,bare",
                        help=f"comma-separated, of {sorted(ARMS)}; ratios are to 'bare'")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or "bare" not in arms or len(arms) < 2:
        parser.error(f"--arms: {bad or args.arms!r}; expected two or more of {sorted(ARMS)}, "
                     "'bare' among them")

    from lazysky.simulator import SurveySpec, simulate_survey

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-watch-"))
    survey = out / "survey"
    if not (survey / "survey.json").exists():
        simulate_survey(SurveySpec(instrument="tiny", n_epochs=4, n_dithers=2,
                                   n_transients=24, seed=42), survey, overwrite=True)
    # an untimed first run: numba compiles (or loads from its cache) the coadd kernels
    # and the OS caches the survey's files, costs the first timed arm would pay alone
    warm = _one(survey, out, arm="bare", index=-1)
    print(json.dumps({"warm-up (untimed)": warm["wall_s"], "cpu_s": warm["cpu_s"]}),
          flush=True)
    load_before = os.getloadavg()
    results = []
    for i in range(args.repeats):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            r = _one(survey, out, arm=arm, index=len(results))
            results.append(r)
            print(json.dumps(r), flush=True)
    load_after = os.getloadavg()
    walls = {a: [r["wall_s"] for r in results if r["arm"] == a] for a in arms}
    cpus = {a: [r["cpu_s"] for r in results if r["arm"] == a] for a in arms}
    med = {a: statistics.median(w) for a, w in walls.items()}
    med_cpu = {a: statistics.median(c) for a, c in cpus.items()}
    same = {(r["sources"], r["dia_sources"]) for r in results}
    stages = sorted({k for r in results for k in r["timings"]})
    print()
    print("| arm | runs | wall (s), each | median (s) | / bare | CPU (s), each | median (s) "
          "| / bare |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for a in arms:
        print(f"| {a} | {len(walls[a])} | {', '.join(f'{x:.1f}' for x in walls[a])} | "
              f"{med[a]:.1f} | {med[a] / med['bare']:.3f} | "
              f"{', '.join(f'{x:.1f}' for x in cpus[a])} | {med_cpu[a]:.1f} | "
              f"{med_cpu[a] / med_cpu['bare']:.3f} |")
    print()
    print("| stage (median s) | " + " | ".join(arms) + " |")
    print("| --- |" + " --- |" * len(arms))
    for st in stages:
        cells = [statistics.median([r["timings"].get(st, 0.0) for r in results
                                    if r["arm"] == a]) for a in arms]
        print(f"| {st} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    print()
    for a in arms:
        if a != "bare":
            print(f"{a} / bare = {med[a] / med['bare']:.3f} by wall "
                  f"({100.0 * (med[a] - med['bare']) / med['bare']:+.1f} %; goal within 3 %), "
                  f"{med_cpu[a] / med_cpu['bare']:.3f} by CPU")
    print(f"same rows in every run: {len(same) == 1}")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} "
          f"{load_after[2]:.2f} (2 cores)")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "median_s": med, "median_cpu_s": med_cpu,
                                         "load_before": load_before,
                                         "load_after": load_after}, indent=2))


if __name__ == "__main__":
    main()

"""What watching costs: the demo's run with and without lazysky's scheduler plugin.

Simulates the demo's survey once (``lazysky demo``: 4 detectors, 4 epochs x 2 dithers),
then runs the demo's configuration (ingest → masters → reference → differences →
detect → catalog, with the per-stage progress bars the demo shows) alternately with
``cluster.watch`` on (plugin, ``/lazysky`` page, ``/metrics`` collector, bars polling the
scheduler) and off, each on a fresh store and a fresh ``LocalCluster`` of 2 worker
processes, interleaved (on, off, on, off, …) so a drifting machine load hits both
alike. While a watched run goes on, a thread fetches ``/lazysky/api/runs`` and
``/metrics`` once a second, as an open page and a Prometheus scrape would.

Reports each run's wall time, the medians and their difference (goal: under 3 %), and
the machine's load average before and after. QA (helper ``qa``) has no on/off switch in
this tree yet, so only the plugin is measured.

    python benchmarks/bench_watch.py [--repeats 3] [--out DIR] [--json FILE]

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


def _one(survey: Path, work: Path, *, watch: bool, index: int) -> dict[str, Any]:
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
    settings = load_settings(cluster={"watch": watch})
    stop, counts = threading.Event(), {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        base = client.dashboard_link.rsplit("/status", 1)[0]
        scraper = threading.Thread(target=_scrape, args=(base, stop, counts), daemon=True)
        if watch:
            scraper.start()
        t0 = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            summary = run(cfg, settings=settings, client=client, show_progress=True)
        wall = time.perf_counter() - t0
        stop.set()
        if watch:
            scraper.join()
    return {"watch": watch, "wall_s": round(wall, 2), "status": summary.status,
            "timings": dict(summary.timings), "sources": summary.sources,
            "dia_sources": summary.dia_sources, "scrapes": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from lazysky.simulator import SurveySpec, simulate_survey

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-watch-"))
    survey = out / "survey"
    if not (survey / "survey.json").exists():
        simulate_survey(SurveySpec(instrument="tiny", n_epochs=4, n_dithers=2,
                                   n_transients=24, seed=42), survey, overwrite=True)
    load_before = os.getloadavg()
    results = []
    for i in range(args.repeats):
        for watch in (True, False) if i % 2 == 0 else (False, True):
            r = _one(survey, out, watch=watch, index=len(results))
            results.append(r)
            print(json.dumps(r), flush=True)
    load_after = os.getloadavg()
    on = [r["wall_s"] for r in results if r["watch"]]
    off = [r["wall_s"] for r in results if not r["watch"]]
    m_on, m_off = statistics.median(on), statistics.median(off)
    same = {(r["sources"], r["dia_sources"]) for r in results}
    print()
    print("| setting | runs | wall (s), each | median (s) |")
    print("| --- | --- | --- | --- |")
    print(f"| plugin on (page + /metrics scraped 1/s) | {len(on)} | "
          f"{', '.join(f'{x:.1f}' for x in on)} | {m_on:.1f} |")
    print(f"| plugin off | {len(off)} | {', '.join(f'{x:.1f}' for x in off)} | {m_off:.1f} |")
    print()
    print(f"on / off = {m_on / m_off:.3f} ({100.0 * (m_on - m_off) / m_off:+.1f} %; goal "
          f"within 3 %); same rows in every run: {len(same) == 1}")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} "
          f"{load_after[2]:.2f} (2 cores)")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "median_on_s": m_on,
                                         "median_off_s": m_off,
                                         "load_before": load_before,
                                         "load_after": load_after}, indent=2))


if __name__ == "__main__":
    main()

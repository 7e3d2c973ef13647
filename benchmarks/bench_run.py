"""End-to-end run (`lazysky.runner.run`): wall time per stage and peak memory, 1 vs 2 workers.

Simulates each survey once, then runs the same configuration on a fresh store with a
``LocalCluster`` of 1 and of 2 worker processes (one thread each), sampling every
worker's resident memory twice a second. Reports per-stage seconds (the run's own
timings), wall time, the speed-up, and the peak RSS of the busiest worker and of the
client process.

    python benchmarks/bench_run.py [--surveys demo large] [--workers 1 2] [--out DIR]

Needs the embedded catalog (or ``LAZYSKY_CATALOG_DSN``); set ``LAZYSKY_CATALOG_DIR`` to
keep it out of your home directory.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

SURVEYS: dict[str, dict[str, Any]] = {
    # the demo's survey (lazysky demo): 4 detectors of 272 x 256 px, 4 epochs x 2 dithers
    "demo": {"instrument": "tiny", "n_epochs": 4, "n_dithers": 2, "n_transients": 24,
             "seed": 42},
    # 4x the exposures of the demo: 8 epochs x 4 dithers
    "large": {"instrument": "tiny", "n_epochs": 8, "n_dithers": 4, "n_transients": 60,
              "seed": 7},
}


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _one(survey: Path, n_ref: int, n_epochs: int, workers: int, work: Path) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    from lazysky.runconfig import RunConfig
    from lazysky.runner import run

    cfg = RunConfig.model_validate({
        "type": "test", "store": str(work / f"store-{workers}"),
        "ingest": [str(survey / "raw"), str(survey / "calib")],
        "field": {"name": "deep1", "tile_px": 256},
        "reference": [f"deep1-r-e{e:03d}-*" for e in range(n_ref)],
        "science": [f"deep1-r-e{e:03d}-*" for e in range(n_ref, n_epochs)],
    })  # fmt: skip
    peak: dict[str, int] = {}
    stop = threading.Event()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        base = client.run(_rss)

        def sample() -> None:
            while not stop.is_set():
                try:
                    for w, rss in client.run(_rss).items():
                        peak[w] = max(peak.get(w, 0), rss - base.get(w, 0))
                except Exception:  # a worker restarting between samples
                    pass
                time.sleep(0.5)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = run(cfg, client=client)
        wall = time.perf_counter() - t0
        stop.set()
        thread.join()
    return {
        "workers": workers, "wall_s": round(wall, 1), "timings": dict(summary.timings),
        "status": summary.status, "sources": summary.sources,
        "dia_sources": summary.dia_sources,
        "worker_peak_mib": round(max(peak.values(), default=0) / 2**20),
        "client_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--surveys", nargs="+", default=["demo", "large"], choices=SURVEYS)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from lazysky.simulator import SurveySpec, simulate_survey

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-run-"))
    results = []
    for name in args.surveys:
        spec = SurveySpec(**SURVEYS[name])
        survey = out / name / "survey"
        if not (survey / "survey.json").exists():
            simulate_survey(spec, survey, overwrite=True)
        n_ref = min(2, spec.n_epochs - 1) if spec.n_reference_epochs is None \
            else spec.n_reference_epochs
        for workers in args.workers:
            r = _one(survey, n_ref, spec.n_epochs, workers, out / name)
            r["survey"] = name
            r["exposures"] = spec.n_epochs * spec.n_dithers
            results.append(r)
            print(json.dumps(r), flush=True)
    stages = ["ingest", "masters", "reference", "difference", "detect"]
    print()
    print("| survey | exposures | workers | " + " | ".join(stages)
          + " | wall (s) | speed-up | worker peak (MiB) | client peak (MiB) |")
    print("|" + " --- |" * (len(stages) + 7))
    for r in results:
        one = next((x for x in results if x["survey"] == r["survey"] and x["workers"] == 1),
                   None)
        speed = f"{one['wall_s'] / r['wall_s']:.2f}" if one else "-"
        print(f"| {r['survey']} | {r['exposures']} | {r['workers']} | "
              + " | ".join(f"{r['timings'].get(s, 0):.1f}" for s in stages)
              + f" | {r['wall_s']:.1f} | {speed} | {r['worker_peak_mib']} | "
              f"{r['client_maxrss_mib']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

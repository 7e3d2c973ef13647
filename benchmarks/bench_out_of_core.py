"""Out-of-core: inputs several times the workers' memory, per-worker peak set by the chunks.

A ``LocalCluster`` of 2 worker processes × 1 thread, each with ``memory_limit`` (default
1 GiB), combines a master bias from N ccdmosaic-sized frames (4096 × 2048 + overscan,
uint16) ingested into a Zarr store (``bench_masters_memory.make_frames``): the inputs, as
float32, total N × 32 MiB — 1 GiB for N = 32, 3 GiB for N = 96, i.e. 0.5× and 1.5× the
cluster's *total* memory and 1× and 3× one worker's. The result is written to a Zarr
store (nothing is gathered), and each worker's own peak RSS (``VmHWM``, reset when the
workers are warm) is read afterwards. The claim to check: the peak per worker depends on
``max_block_bytes`` (the chunk of the combine), not on N, and nothing spills.

What this does **not** show yet: a coadd of a sky field larger than memory (resample +
stack on a big grid). The master combine is the step whose memory used to grow with the
input (see ``docs/benchmarks/masters_memory.md``); the coadd's blocks are grid tiles.

Usage::

    python benchmarks/bench_out_of_core.py [--frames 32,96] [--memory-limit-gib 1.0]
        [--budget-mib 64] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_masters_memory import make_frames


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset() -> float:
    Path("/proc/self/clear_refs").write_text("5")
    return _vm("VmRSS")


def _peak() -> float:
    return _vm("VmHWM")


def run(store: Path, n: int, out: Path, *, memory_limit: float, budget: int) -> dict[str, Any]:
    import dask.array as da
    from distributed import Client, LocalCluster

    from lazysky.pipeline import master_bias
    from lazysky.zarr_store import open_exposure

    frames = [open_exposure(store, f"bench-bias-{i:03d}") for i in range(n)]
    bias = master_bias(frames, max_block_bytes=budget)["bias"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit, dashboard_address=None) as cluster, \
            Client(cluster) as client:  # fmt: skip
        client.run(lambda: __import__("lazysky.pipeline"))
        base = client.run(_reset)
        t0 = time.perf_counter()
        da.to_zarr(bias.data, str(out), overwrite=True)
        wall = time.perf_counter() - t0
        peaks = client.run(_peak)
        spilled = client.run(lambda dask_worker: len(dask_worker.data.slow)
                             if hasattr(dask_worker.data, "slow") else 0)  # fmt: skip
    return {"n_frames": n, "input_float32_gib": n * 4096 * 2048 * 4 / 2**30,
            "wall_s": wall, "tile": [bias.data.chunks[1][0], bias.data.chunks[2][0]],
            "workers": {w: {"base_mib": round(base[w]), "peak_mib": round(peaks[w]),
                            "spilled_keys": spilled[w]} for w in peaks}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", default="32,96")
    parser.add_argument("--memory-limit-gib", type=float, default=1.0)
    parser.add_argument("--budget-mib", type=float, default=64.0, help="max_block_bytes")
    parser.add_argument("--workdir", help="keep frames here (reused if present)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    from lazysky.zarr_store import ingest

    ns = [int(v) for v in args.frames.split(",")]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lazysky-bench-ooc-"))
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    results = []
    try:
        paths = make_frames(root / "fits", max(ns))
        report = ingest(paths, root / "store")
        if not report.ok:
            raise SystemExit(report.summary())
        for n in ns:
            res = run(root / "store", n, root / f"master-{n}.zarr",
                      memory_limit=args.memory_limit_gib * 2**30,
                      budget=int(args.budget_mib * 2**20))  # fmt: skip
            results.append(res)
            peaks = [w["peak_mib"] for w in res["workers"].values()]
            spilled = [w["spilled_keys"] for w in res["workers"].values()]
            growth = [w["peak_mib"] - w["base_mib"] for w in res["workers"].values()]
            print(f"N={n:<4} inputs {res['input_float32_gib']:.2f} GiB (float32)  "
                  f"wall {res['wall_s']:.0f} s  tile {res['tile'][0]}x{res['tile'][1]}  "
                  f"worker peaks {peaks} MiB (growth {growth})  limit "
                  f"{args.memory_limit_gib * 1024:.0f} MiB  spilled {spilled}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: ZOGY difference imaging throughput, 1 vs 2 workers, with peak memory.

A synthetic pair of ``--size`` px square (stars of 10³–10⁵ e⁻, Moffat PSFs of FWHM 2.6
and 3.3 px, Gaussian sky noise, a reference twice as deep) is generated on the workers
and persisted, then :func:`lazysky.pipeline.difference` (PSF per tile, flux-ratio fit,
ZOGY per tile with its halo) is computed on a ``distributed.LocalCluster`` of 1 and of 2
workers with 1 thread each. Reported: wall seconds (median of ``--repeat`` runs), Mpix/s,
the speed-up, and the peak RSS of any worker (sampled every 50 ms) above its RSS before
the run.

No reference tool runs beside it: no ZOGY implementation is installed in the project's
environment (properimage is not a dependency), so this measures lazysky's scaling only.

Usage::

    python benchmarks/bench_difference.py [--size 4096] [--tile 1024] [--repeat 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from lazysky.pipeline import SkyGrid
from lazysky.pipeline.difference import difference
from lazysky.pipeline.psf import moffat_stamp


def _tile(block_id: tuple[int, int] | None = None, *, shape: tuple[int, int], fwhm: float,
          scale: float, sigma: float, seed: int, kind: str) -> np.ndarray:  # fmt: skip
    """One tile of a synthetic image (stars placed by the tile's own seeded stream)."""
    iy, ix = block_id if block_id is not None else (0, 0)
    rng_pos = np.random.default_rng([iy, ix, 7])  # same stars in both images
    rng = np.random.default_rng([iy, ix, seed])
    img = np.zeros(shape)
    stamp = moffat_stamp(fwhm, 3.0, 25)
    n = int(shape[0] * shape[1] / 4000)
    for y, x, f in zip(rng_pos.integers(12, shape[0] - 12, n),
                       rng_pos.integers(12, shape[1] - 12, n),
                       10 ** rng_pos.uniform(3, 5, n), strict=True):  # fmt: skip
        img[y - 12 : y + 13, x - 12 : x + 13] += scale * f * stamp
    var = img + sigma**2
    if kind == "variance":
        return var.astype(np.float32)
    return (img + rng.normal(0, 1, shape) * np.sqrt(var)).astype(np.float32)


def make_pair(size: int, tile: int) -> tuple[xr.Dataset, xr.Dataset]:
    grid = SkyGrid(150.0, 2.0, 0.5, (size, size), tile_px=tile)

    def ds(fwhm: float, scale: float, sigma: float, seed: int) -> xr.Dataset:
        planes = {
            k: da.map_blocks(_tile, shape=(tile, tile), fwhm=fwhm, scale=scale, sigma=sigma,
                             seed=seed, kind=k, chunks=grid.chunks, dtype=np.float32)
            for k in ("image", "variance")
        }  # fmt: skip
        planes["mask"] = da.zeros(grid.shape, dtype=np.uint16, chunks=grid.chunks)
        return xr.Dataset({k: (("y", "x"), v) for k, v in planes.items()},
                          attrs={"grid": grid.to_dict(), "units": "electron"})  # fmt: skip

    return ds(2.6, 1.0, 5.0, 1), ds(3.3, 2.0, 3.0, 2)


class PeakRss:
    """Sample the RSS of every worker of a client every 50 ms; peak above the start."""

    def __init__(self, client: Any) -> None:
        import psutil

        self.procs = [psutil.Process(p) for p in
                      client.run(lambda: __import__("os").getpid()).values()]  # fmt: skip
        self.base = {p.pid: p.memory_info().rss for p in self.procs}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.procs:
                self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> float:
        return max(self.peak[k] - self.base[k] for k in self.peak) / 2**20


def run(n_workers: int, size: int, tile: int, repeat: int) -> dict[str, Any]:
    import warnings

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:  # fmt: skip
        sci, ref = make_pair(size, tile)
        sci, ref = sci.persist(), ref.persist()
        client.wait_for_workers(n_workers)
        from distributed import wait

        wait([v.data for v in (*sci.data_vars.values(), *ref.data_vars.values())])
        times, peaks = [], []
        for _ in range(repeat):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                diff = difference(sci, ref)
            with PeakRss(client) as mem:
                t0 = time.perf_counter()
                out = diff[["image", "variance", "score", "mask"]].persist()
                wait([v.data for v in out.data_vars.values()])
                times.append(time.perf_counter() - t0)
            peaks.append(mem.mib)
            del out
        ratio = float(diff.flux_ratio.compute())
    wall = statistics.median(times)
    return {"workers": n_workers, "size": size, "tile": tile, "seconds": wall,
            "all_seconds": times, "mpix_per_s": size * size / 1e6 / wall,
            "peak_worker_mib": max(peaks), "flux_ratio": ratio}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    rows = [run(n, a.size, a.tile, a.repeat) for n in (1, 2)]
    print(f"ZOGY difference of a {a.size} x {a.size} pair, {a.tile}-px tiles "
          f"(median of {a.repeat}):")  # fmt: skip
    print(f"{'workers':>7} {'seconds':>8} {'Mpix/s':>7} {'speed-up':>8} {'peak MiB/worker':>15}")
    for r in rows:
        speedup = rows[0]["seconds"] / r["seconds"]
        print(f"{r['workers']:>7} {r['seconds']:>8.2f} {r['mpix_per_s']:>7.2f} "
              f"{speedup:>8.2f} {r['peak_worker_mib']:>15.0f}")
    print(f"flux ratio fitted: {rows[0]['flux_ratio']:.4f} (true 2)")
    print(f"command: python benchmarks/bench_difference.py --size {a.size} --tile {a.tile} "
          f"--repeat {a.repeat}")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

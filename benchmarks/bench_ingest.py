"""Ingest throughput: FITS → Zarr on local disk and through a moto S3 server.

Measures, for one synthetic MEF exposure (simulator-like: uint16 with BZERO, CHECKSUM):

* plain astropy reading of every detector (``hdu.data``), the reference;
* ``lazysky.zarr_store.ingest`` to a local directory and to ``s3://`` on a moto server
  (127.0.0.1), in MB/s of FITS bytes and as a ratio to the astropy read;
* peak memory per worker: ingest on a ``LocalCluster`` of worker processes, reading each
  worker's peak RSS (``ru_maxrss``) before and after.

Usage::

    python benchmarks/bench_ingest.py [--detectors 8] [--size 2048] [--repeat 3] [--batch 4]
                                      [--no-s3] [--json FILE]

Numbers go to stdout as a table, and as JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits


def make_exposure(path: Path, *, detectors: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    hdus: list[Any] = [fits.PrimaryHDU()]
    hdus[0].header.update({"EXPID": f"bench-e{seed:03d}", "INSTRUME": "bench", "FILTER": "r"})
    for k in range(detectors):
        sky = rng.poisson(1200.0, size=(size, size)).astype(np.uint16)  # realistic entropy
        hdu = fits.ImageHDU(sky, name=f"CCD{k + 1:02d}")
        hdu.header.update({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0,
                           "CRVAL2": 2.0, "CRPIX1": size / 2, "CRPIX2": size / 2,
                           "CD1_1": -5.5e-5, "CD2_2": 5.5e-5, "CD1_2": 0.0, "CD2_1": 0.0})
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path, checksum=True)
    return path


def best_of(repeat: int, fn: Callable[[], Any], reset: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if reset is not None:
            reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def astropy_read(path: Path) -> None:
    with fits.open(path, memmap=False) as hdul:
        for hdu in hdul[1:]:
            np.asarray(hdu.data).sum()  # make sure every byte is read and scaled


def _start_sampler(dask_worker: Any) -> float:
    """On a worker: sample this process's RSS every 5 ms until told to stop."""
    import threading

    import psutil

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "stop": threading.Event()}

    def sample() -> None:
        while not state["stop"].wait(0.005):  # type: ignore[attr-defined]
            state["peak"] = max(state["peak"], proc.memory_info().rss)  # type: ignore[call-overload]

    threading.Thread(target=sample, daemon=True).start()
    dask_worker.lazysky_rss = state
    return float(state["peak"]) / 2**20  # type: ignore[arg-type]


def _stop_sampler(dask_worker: Any) -> float:
    state = dask_worker.lazysky_rss
    state["stop"].set()
    return float(state["peak"]) / 2**20


def worker_peak_memory(path: Path, store: Path) -> dict[str, Any]:
    """Peak RSS of each of 2 single-threaded worker processes during an ingest."""
    from distributed import Client, LocalCluster

    from lazysky.zarr_store import ingest

    def warm_up() -> None:
        import lazysky.zarr_store  # noqa: F401  (imports count as baseline)

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(warm_up)
        before = client.run(_start_sampler)
        report = ingest(path, store)
        after = client.run(_stop_sampler)
    if not report.ok:
        raise SystemExit(report.summary())
    return {w: {"baseline_mib": round(before[w], 1), "peak_mib": round(after[w], 1),
                "growth_mib": round(after[w] - before[w], 1)} for w in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048, help="detector side in pixels")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4,
                        help="also ingest this many such files in one call (0: skip)")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    import dask

    from lazysky.zarr_store import ingest

    tmp = Path(tempfile.mkdtemp(prefix="lazysky-bench-"))
    try:
        path = make_exposure(tmp / "bench.fits", detectors=args.detectors, size=args.size)
        mb = path.stat().st_size / 1e6
        results: dict[str, Any] = {"file_mb": round(mb, 1), "detectors": args.detectors,
                                   "size": args.size, "threads": dask.system.CPU_COUNT}
        t_ref = best_of(args.repeat, lambda: astropy_read(path))
        results["astropy_read_mb_s"] = round(mb / t_ref, 1)

        store = tmp / "store"
        t_local = best_of(args.repeat, lambda: ingest(path, store),
                          reset=lambda: shutil.rmtree(store, ignore_errors=True))
        results["local_ingest_mb_s"] = round(mb / t_local, 1)
        results["local_ratio_to_astropy"] = round(t_ref / t_local, 3)
        t_noop = best_of(args.repeat, lambda: ingest(path, store))
        results["local_reingest_noop_s"] = round(t_noop, 3)

        if args.batch:
            batch = [path] + [
                make_exposure(tmp / f"bench{k}.fits", detectors=args.detectors,
                              size=args.size, seed=k) for k in range(1, args.batch)]
            t_ref_batch = best_of(args.repeat, lambda: [astropy_read(p) for p in batch])
            store_b = tmp / "store-batch"
            t_batch = best_of(args.repeat, lambda: ingest(batch, store_b),
                              reset=lambda: shutil.rmtree(store_b, ignore_errors=True))
            results[f"local_batch{args.batch}_ingest_mb_s"] = round(len(batch) * mb / t_batch, 1)
            results[f"local_batch{args.batch}_ratio_to_astropy"] = round(t_ref_batch / t_batch, 3)

        if not args.no_s3:
            import boto3
            from moto.server import ThreadedMotoServer

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            try:
                host, port = server.get_host_and_port()
                endpoint = f"http://{host}:{port}"
                opts = {"key": "bench", "secret": "bench",
                        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
                s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id="bench", aws_secret_access_key="bench")

                def fresh_bucket() -> None:
                    fresh_bucket.name = f"bench-{uuid.uuid4().hex[:10]}"  # type: ignore[attr-defined]
                    s3.create_bucket(Bucket=fresh_bucket.name)  # type: ignore[attr-defined]

                t_s3 = best_of(args.repeat, lambda: ingest(
                    path, f"s3://{fresh_bucket.name}/survey",  # type: ignore[attr-defined]
                    storage_options=opts), reset=fresh_bucket)
                results["s3_moto_ingest_mb_s"] = round(mb / t_s3, 1)
                results["s3_ratio_to_astropy"] = round(t_ref / t_s3, 3)
            finally:
                from lazysky.zarr_store._s3 import close_s3_filesystems

                close_s3_filesystems()
                server.stop()

        results["worker_memory"] = worker_peak_memory(path, tmp / "store-cluster")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

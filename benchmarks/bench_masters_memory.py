"""Master bias and flat: peak memory and time against the number of frames, lazysky vs ccdproc.

For each N (default 8, 16, 32) one-detector bias frames the size of a ccdmosaic CCD
(4096 × 2048 data + 50 overscan columns, uint16, bias 2000 ADU, read noise 7 e⁻ at
4 e⁻/ADU, a few hundred cosmic rays each) are written as FITS and ingested into a Zarr
store; with ``--kinds flat`` also N flat frames (the same bias and noise, plus a lamp
level of ~20 000 ADU that differs by up to ±5 % from frame to frame, times a fixed
vignetting and 1 % pixel-response pattern, with Poisson noise and cosmic rays). Each
configuration then runs in its **own child process**:

* ``lazysky-threads``: ``open_exposure`` on the store, ``master_bias(...,
  max_block_bytes=BUDGET)``, computed with the threaded scheduler (2 threads);
* ``lazysky-distributed``: the same graph on a ``LocalCluster`` of one worker process
  with 2 threads; the worker's own peak RSS (``VmHWM``, reset with ``clear_refs`` before
  the compute) is reported;
* ``ccdproc``: the usual ccdproc pattern on the FITS files: ``subtract_overscan``
  (per-row median) and ``trim_image`` per frame, written out, then
  ``ccdproc.combine(..., method="average", sigma_clip=True, sigma_clip_func=np.ma.median,
  sigma_clip_dev_func=mad_std, mem_limit=BUDGET)``.

For flats: lazysky ``master_flat(frames, bias=0, max_iters=0)`` (each frame in e⁻ divided
by its mosaic level inside the combine, the master normalised to mean 1); ccdproc the
same reduction per frame then ``combine(..., scale=1/mean)`` and the result divided by
its mean. ccdproc clips the frames *before* scaling them, lazysky after, so a few
pixels at the clipping limit may differ; the agreement is reported relative (×10⁻⁶).

Both reject at 3 robust σ around the median, one pass (lazysky ``max_iters=0``, as
ccdproc's combine clips once), so the master biases must agree to float32 rounding.
Reported per run: wall and CPU seconds, peak RSS of the process (``VmHWM``, reset
with ``clear_refs`` once the imports are done: ``ru_maxrss`` would carry the parent's
peak across ``exec``) and its growth, the agreement with ccdproc (max |diff| and
robust rms in ADU) and ccdproc's peak against its ``mem_limit``.

Usage::

    python benchmarks/bench_masters_memory.py [--frames 8,16,32] [--budget-mib 128]
        [--kinds bias,flat] [--configs lazysky-threads,lazysky-distributed,ccdproc]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

NY, NX, OVERSCAN = 4096, 2048, 50
GAIN, RDNOISE, BIAS = 4.0, 7.0, 2000.0
LAMP = 20000.0  # flat level, ADU


def _response() -> np.ndarray:
    """The flats' fixed pattern: vignetting (−10 % in the corners) × 1 % pixel response."""
    y, x = np.mgrid[0:NY, 0:NX].astype(np.float32)
    r2 = ((y - NY / 2) / NY) ** 2 + ((x - NX / 2) / NX) ** 2
    prnu = np.random.default_rng(1).normal(1.0, 0.01, (NY, NX)).astype(np.float32)
    return (1.0 - 0.2 * r2) * prnu


def make_frames(root: Path, n: int, kind: str = "bias") -> list[Path]:
    """``n`` raw bias or flat MEFs (one detector), reusing those already written."""
    from astropy.io import fits

    root.mkdir(parents=True, exist_ok=True)
    pattern = np.random.default_rng(0).normal(0, 3.0, (NY, NX + OVERSCAN))  # fixed pattern
    response = _response() if kind == "flat" else None
    paths = []
    for i in range(n):
        path = root / f"{kind}-{i:03d}.fits"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(1000 + i + (0 if kind == "bias" else 10**6))
        adu = BIAS + pattern + rng.normal(0, RDNOISE / GAIN, (NY, NX + OVERSCAN))
        if response is not None:  # lamp × response, Poisson noise in electrons
            level = LAMP * (1 + rng.uniform(-0.05, 0.05))
            adu[:, :NX] += rng.poisson(level * GAIN * response) / GAIN
        for _ in range(300):  # cosmic rays, a few pixels each
            y, x = rng.integers(0, NY - 3), rng.integers(0, NX - 3)
            adu[y : y + rng.integers(1, 3), x : x + rng.integers(1, 4)] += rng.uniform(200, 3000)
        primary = fits.PrimaryHDU()
        primary.header.update({"EXPID": f"bench-{kind}-{i:03d}",
                               "EXPTIME": 0.0 if kind == "bias" else 10.0,
                               "IMAGETYP": kind, "FILTER": "r", "MJD-OBS": 61000.0})  # fmt: skip
        hdu = fits.ImageHDU(np.clip(np.round(adu), 0, 65535).astype(np.uint16), name="CCD01")
        hdu.header.update({"GAIN": GAIN, "RDNOISE": RDNOISE, "SATURATE": 65535.0,
                           "DATASEC": f"[1:{NX},1:{NY}]",
                           "BIASSEC": f"[{NX + 1}:{NX + OVERSCAN},1:{NY}]"})  # fmt: skip
        fits.HDUList([primary, hdu]).writeto(path)
    return paths


def _base_mib() -> float:
    """This process's RSS now, after resetting its peak (``ru_maxrss`` survives ``exec``)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _vm("VmRSS")


def _rss_mib() -> float:
    return _vm("VmHWM")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------- children (one per run)


def child_lazysky(
    store: Path, n: int, budget: int, out: Path, distributed: bool, kind: str = "bias"
) -> dict[str, Any]:
    import dask
    import xarray as xr

    from lazysky.pipeline import master_bias, master_flat
    from lazysky.zarr_store import open_exposure

    frames = [open_exposure(store, f"bench-{kind}-{i:03d}") for i in range(n)]
    if kind == "bias":
        master = master_bias(frames, max_iters=0, max_block_bytes=budget)["bias"]
    else:  # the frames carry no fixed bias pattern beyond the overscan's level
        zero = xr.DataArray(da_zeros((1, NY, NX)), dims=("detector", "y", "x"))
        master = master_flat(frames, bias=zero, max_iters=0, max_block_bytes=budget)["flat"]
    base, cpu0, t0 = _base_mib(), _cpu_s(), time.perf_counter()
    res: dict[str, Any] = {"tile": [master.data.chunks[1][0], master.data.chunks[2][0]]}
    if not distributed:
        with dask.config.set(scheduler="threads", num_workers=2):
            values = master.values
    else:
        from distributed import Client, LocalCluster

        def reset_peak() -> float:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            return _vm("VmHWM")

        cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                               dashboard_address=None)  # fmt: skip
        with cluster, Client(cluster) as client:
            client.run(lambda: __import__("lazysky.pipeline"))
            (worker_base,) = client.run(reset_peak).values()
            values = master.values
            (worker_peak,) = client.run(lambda: _vm("VmHWM")).values()
        res.update(worker_base_mib=round(worker_base, 1), worker_peak_mib=round(worker_peak, 1),
                   worker_growth_mib=round(worker_peak - worker_base, 1))  # fmt: skip
    res.update(wall_s=time.perf_counter() - t0, cpu_s=_cpu_s() - cpu0, base_mib=base,
               peak_mib=_rss_mib())  # fmt: skip
    np.save(out, np.asarray(values)[0])
    return res


def da_zeros(shape: tuple[int, ...]) -> Any:
    """A lazy float32 zero master (no memory until a block is used)."""
    import dask.array as da

    return da.zeros(shape, dtype=np.float32, chunks=(1, 1024, 1024))


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_ccdproc(
    paths: list[Path], budget: int, out: Path, work: Path, kind: str = "bias"
) -> dict[str, Any]:
    import ccdproc
    from astropy.nddata import CCDData
    from astropy.stats import mad_std

    base, cpu0, t0 = _base_mib(), _cpu_s(), time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    reduced = []
    for p in paths:
        ccd = CCDData.read(p, hdu=1, unit="adu")
        ccd = ccdproc.subtract_overscan(ccd, fits_section=f"[{NX + 1}:{NX + OVERSCAN},1:{NY}]",
                                        median=True, overscan_axis=1)  # fmt: skip
        ccd = ccdproc.trim_image(ccd, fits_section=f"[1:{NX},1:{NY}]")
        target = work / p.name
        ccd.write(target, overwrite=True)
        reduced.append(str(target))
    t_reduce = time.perf_counter() - t0
    scale = None if kind == "bias" else (lambda a: 1.0 / np.ma.average(a))
    master = ccdproc.combine(reduced, method="average", sigma_clip=True,
                             sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                             sigma_clip_func=np.ma.median, sigma_clip_dev_func=mad_std,
                             mem_limit=budget, dtype=np.float32, scale=scale)  # fmt: skip
    data = np.asarray(master.data, dtype=np.float32)
    if kind == "flat":
        data = data / np.float32(np.mean(data, dtype=np.float64))
    res = {"wall_s": time.perf_counter() - t0, "reduce_s": t_reduce, "cpu_s": _cpu_s() - cpu0,
           "base_mib": base, "peak_mib": _rss_mib()}  # fmt: skip
    np.save(out, data)
    return res


# ---------------------------------------------------------------- parent


def run_child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = (a.astype(np.float64) - b.astype(np.float64)).ravel()
    d = d[np.isfinite(d)]
    return {"max_abs_adu": float(np.max(np.abs(d))),
            "robust_rms_adu": float(1.4826 * np.median(np.abs(d - np.median(d))))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", default="8,16,32")
    parser.add_argument("--budget-mib", type=float, default=128.0,
                        help="lazysky max_block_bytes and ccdproc mem_limit")  # fmt: skip
    parser.add_argument("--configs", default="lazysky-threads,lazysky-distributed,ccdproc")
    parser.add_argument("--kinds", default="bias,flat", help="masters to build: bias,flat")
    parser.add_argument("--workdir", help="keep frames here (default: a temporary directory)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        config, n, budget, out, root, kind = args.child[:6]
        paths = sorted(Path(root, "fits").glob(f"{kind}-*.fits"))[: int(n)]
        if config == "ccdproc":
            res = child_ccdproc(paths, int(budget), Path(out), Path(root, f"ccdproc-{kind}-{n}"),
                                kind=kind)  # fmt: skip
        else:
            res = child_lazysky(Path(root, "store"), int(n), int(budget), Path(out),
                                distributed=config == "lazysky-distributed", kind=kind)  # fmt: skip
        print(json.dumps(res))
        return

    from lazysky.zarr_store import ingest

    ns = [int(v) for v in args.frames.split(",")]
    configs = args.configs.split(",")
    kinds = args.kinds.split(",")
    if not set(kinds) <= {"bias", "flat"}:
        raise SystemExit(f"--kinds: bias and/or flat, got {args.kinds!r}")
    budget = int(args.budget_mib * 2**20)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lazysky-bench-masters-"))
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(f"# frames {NY} x {NX} (+{OVERSCAN} overscan) uint16, budget {args.budget_mib} MiB, "
          f"2 threads, {os.cpu_count()} cores")  # fmt: skip
    results: list[dict[str, Any]] = []
    try:
        paths = [p for kind in kinds for p in make_frames(root / "fits", max(ns), kind)]
        report = ingest(paths, root / "store")
        if not report.ok:
            raise SystemExit(report.summary())
        for kind in kinds:
            for n in ns:
                outs = {}
                for config in configs:
                    out = root / f"{config}-{kind}-{n}.npy"
                    res = run_child([config, str(n), str(budget), str(out), str(root), kind])
                    res.update(config=config, n_frames=n, kind=kind)
                    outs[config] = out
                    results.append(res)
                if "ccdproc" in outs and outs["ccdproc"].exists():
                    ref = np.load(outs["ccdproc"])
                    for r in results[-len(configs):]:
                        if r["config"] != "ccdproc" and outs[r["config"]].exists():
                            r["vs_ccdproc"] = agreement(np.load(outs[r["config"]]), ref)
                for r in results[-len(configs):]:
                    print(_row(r), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['kind']:<4} {r['config']:<20} N={r['n_frames']:<3} ERROR {r['error']}"
    growth = r["peak_mib"] - r["base_mib"]
    text = (f"{r['kind']:<4} {r['config']:<20} N={r['n_frames']:<3} wall {r['wall_s']:7.1f} s  cpu "
            f"{r['cpu_s']:7.1f} s  peak {r['peak_mib']:7.0f} MiB  growth {growth:7.0f} MiB")
    if "worker_growth_mib" in r:
        text += f"  worker peak {r['worker_peak_mib']:.0f} (+{r['worker_growth_mib']:.0f}) MiB"
    if "tile" in r:
        text += f"  tile {r['tile'][0]}x{r['tile'][1]}"
    if "vs_ccdproc" in r:
        a = r["vs_ccdproc"]
        unit = "ADU" if r["kind"] == "bias" else "(relative)"
        text += f"  vs ccdproc max|d| {a['max_abs_adu']:.2g} rms {a['robust_rms_adu']:.2g} {unit}"
    return text


if __name__ == "__main__":
    main()

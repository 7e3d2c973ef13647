"""Out-of-core: inputs several times the workers' memory, per-worker peak set by the chunks.

A ``LocalCluster`` of 2 worker processes × 1 thread, each with ``memory_limit`` (default
1 GiB), combines a master bias from N ccdmosaic-sized frames (4096 × 2048 + overscan,
uint16) ingested into a Zarr store (``bench_masters_memory.make_frames``): the inputs, as
float32, total N × 32 MiB — 1 GiB for N = 32, 3 GiB for N = 96, i.e. 0.5× and 1.5× the
cluster's *total* memory and 1× and 3× one worker's. The result is written to a Zarr
store (nothing is gathered), and each worker's own peak RSS (``VmHWM``, reset when the
workers are warm) is read afterwards. The claim to check: the peak per worker depends on
``max_block_bytes`` (the chunk of the combine), not on N, and nothing spills.

With ``--coadd-from DIR`` (a ``bench_coadd.py --workdir``), also a coadd: the calibrated
exposures of ``DIR/cal`` written to Zarr (512² chunks), each repeated ``--coadd-copies``
times under its own read keys, resampled and stacked onto a grid of ``--tile-px`` tiles
and written to Zarr tile by tile on the same kind of cluster; per-worker peak RSS again.

Usage::

    python benchmarks/bench_out_of_core.py [--frames 32,96] [--memory-limit-gib 1.0]
        [--budget-mib 64] [--workdir DIR] [--json FILE]
        [--coadd-from DIR [--coadd-copies 1,4] [--tile-px 512]] [--skip-masters]
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


# --- the coadd: resample + stack of N exposures onto a grid, written tile by tile -------


def coadd_store(cal_dir: Path, store: Path, chunk: int) -> list[str]:
    """The calibrated FITS frames of ``cal_dir`` as Zarr arrays (image, variance, mask)."""
    import numpy as np
    import zarr
    from astropy.io import fits

    names = []
    for p in sorted(cal_dir.glob("*.cal.fits")):
        name = p.name.removesuffix(".cal.fits")
        names.append(name)
        if (store / name / "done").exists():
            continue
        with fits.open(p) as hdul:
            img = next(h for h in hdul[1:] if not h.name.endswith(("_VAR", "_MASK")))
            planes = {"image": img.data, "variance": hdul[f"{img.name}_VAR"].data,
                      "mask": hdul[f"{img.name}_MASK"].data}  # fmt: skip
            for k, v in planes.items():
                dtype = np.uint16 if k == "mask" else np.float32
                arr = zarr.create_array(str(store / name / k), shape=(1, *v.shape),
                                        chunks=(1, chunk, chunk), dtype=dtype,
                                        overwrite=True)  # fmt: skip
                arr[0] = np.nan_to_num(v, nan=0.0).astype(dtype)
            (store / name / "header.txt").write_text(img.header.tostring(sep="\n"))
        (store / name / "done").write_text("")
    return names


def open_calibrated(store: Path, name: str, copy: int) -> Any:
    """One exposure from the store, lazily; ``copy`` gives its reads their own keys."""
    import dask.array as da
    import numpy as np
    import xarray as xr
    from astropy.io import fits
    from astropy.wcs import WCS

    data = {k: (("detector", "y", "x"), da.from_zarr(str(store / name / k),
                                                    name=f"read-{name}-{k}-copy{copy}"))
            for k in ("image", "variance", "mask")}  # fmt: skip
    header = fits.Header.fromstring((store / name / "header.txt").read_text(), sep="\n")
    text = WCS(header).celestial.to_header(relax=True).tostring(sep="\n")
    ds = xr.Dataset(data, coords={"detector": ["CCD01"], "header": ("detector", [text]),
                                  "exposure": f"{name}-copy{copy}"})  # fmt: skip
    ds["image"].attrs["units"] = "electron"
    ds["variance"] = ds.variance.where(ds.variance > 0, np.inf)
    return ds


def run_coadd(store: Path, names: list[str], copies: int, out: Path, *, memory_limit: float,
              tile_px: int) -> dict[str, Any]:  # fmt: skip
    import dask.array as da
    import zarr
    from distributed import Client, LocalCluster

    from lazysky.pipeline import SkyGrid, detector_footprints, resample_exposure, stack

    cals = [open_calibrated(store, n, c) for c in range(copies) for n in names]
    grid = SkyGrid.covering([f for c in cals[: len(names)] for f in detector_footprints(c)],
                            pixel_scale_arcsec=0.26, tile_px=tile_px)  # fmt: skip
    coadd = stack([p for c in cals for p in resample_exposure(c, grid)], grid)
    planes = ("image", "variance", "weight", "count", "mask")
    targets = [zarr.create_array(str(out / k), shape=grid.shape, chunks=(tile_px, tile_px),
                                 dtype=coadd[k].dtype, overwrite=True) for k in planes]  # fmt: skip
    input_bytes = sum(int(c[k].nbytes) for c in cals for k in ("image", "variance", "mask"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit, dashboard_address=None) as cluster, \
            Client(cluster) as client:  # fmt: skip
        client.run(lambda: __import__("lazysky.pipeline"))
        base = client.run(_reset)
        t0 = time.perf_counter()
        da.store([coadd[k].data for k in planes], targets, lock=False)
        wall = time.perf_counter() - t0
        peaks = client.run(_peak)
        spilled = client.run(lambda dask_worker: len(dask_worker.data.slow)
                             if hasattr(dask_worker.data, "slow") else 0)  # fmt: skip
    n_exp = len(cals)
    return {"exposures": n_exp, "input_gib": input_bytes / 2**30,
            "output_gib": grid.shape[0] * grid.shape[1] * 16 / 2**30, "grid": list(grid.shape),
            "tile_px": tile_px, "wall_s": wall,
            "workers": {w: {"base_mib": round(base[w]), "peak_mib": round(peaks[w]),
                            "spilled_keys": spilled[w]} for w in peaks}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", default="32,96")
    parser.add_argument("--memory-limit-gib", type=float, default=1.0)
    parser.add_argument("--budget-mib", type=float, default=64.0, help="max_block_bytes")
    parser.add_argument("--workdir", help="keep frames here (reused if present)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--coadd-from", help="a bench_coadd.py --workdir (its cal/ frames): "
                        "also run the out-of-core coadd")  # fmt: skip
    parser.add_argument("--coadd-copies", default="1,4",
                        help="each run stacks this many copies of those exposures")  # fmt: skip
    parser.add_argument("--tile-px", type=int, default=512, help="coadd grid tile")
    parser.add_argument("--skip-masters", action="store_true")
    args = parser.parse_args()
    if args.coadd_from:
        main_coadd(args)
    if args.skip_masters:
        return

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


def main_coadd(args: Any) -> None:
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lazysky-bench-ooc-"))
    names = coadd_store(Path(args.coadd_from) / "cal", root / "cal-store", 512)
    results = []
    for copies in (int(v) for v in args.coadd_copies.split(",")):
        res = run_coadd(root / "cal-store", names, copies, root / f"coadd-{copies}.zarr",
                        memory_limit=args.memory_limit_gib * 2**30,
                        tile_px=args.tile_px)  # fmt: skip
        results.append(res)
        w = res["workers"].values()
        print(f"coadd of {res['exposures']:<3} exposures: inputs {res['input_gib']:.2f} GiB, "
              f"output {res['output_gib']:.2f} GiB, grid {res['grid']}, tile {res['tile_px']}  "
              f"wall {res['wall_s']:.0f} s  worker peaks {[x['peak_mib'] for x in w]} MiB "
              f"(growth {[x['peak_mib'] - x['base_mib'] for x in w]})  limit "
              f"{args.memory_limit_gib * 1024:.0f} MiB  spilled {[x['spilled_keys'] for x in w]}",
              flush=True)  # fmt: skip
    if args.json:
        Path(args.json).with_suffix(".coadd.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

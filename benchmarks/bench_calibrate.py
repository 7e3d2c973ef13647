"""Calibration throughput and agreement: lazysky ``calibrate_exposure`` vs ccdproc.

Identical inputs: raw multi-extension exposures of the ``ccdmosaic`` instrument (4096 ×
2048 CCDs with 50 overscan columns) and its bias/dark/flat frames, written by
``lazysky.simulator.simulate_survey``; the same masters for both (lazysky's
``make_masters``, computed once in the parent and stored as Zarr). Each tool runs in its
own child process, reading the raw FITS files itself:

* ``lazysky``: ``read_raw`` + ``calibrate_exposure(raw, masters)`` (overscan per-row
  median, bias, gain, dark × EXPTIME, flat; also the variance and mask planes), the
  ``image`` computed with the threaded scheduler (2 threads);
* ``ccdproc``: per detector ``CCDData`` from the HDU, ``subtract_overscan(median=True)``,
  ``trim_image``, ``subtract_bias`` (ADU), ``gain_correct`` (e⁻/ADU), ``subtract_dark``
  (the e⁻/s master as a 1 s dark, scaled to EXPTIME), ``flat_correct(norm_value=1)``
  (lazysky's flat is already normalised to a mosaic mean of 1); one core (ccdproc is
  numpy on whole arrays).

Reported: wall and CPU seconds, Mpix/s of raw pixels and the ratio, peak RSS (``VmHWM``
after a reset at the start of the child), and the agreement of the calibrated images
(max |diff| and robust rms in e⁻, and relative to the image's sky noise).

Usage::

    python benchmarks/bench_calibrate.py [--detectors 2] [--exposures 2] [--workdir DIR]
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


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start() -> tuple[float, float, float]:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (ru_maxrss survives exec)
    r = resource.getrusage(resource.RUSAGE_SELF)
    return _vm("VmRSS"), r.ru_utime + r.ru_stime, time.perf_counter()


def _stop(start: tuple[float, float, float]) -> dict[str, float]:
    base, cpu0, t0 = start
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": r.ru_utime + r.ru_stime - cpu0,
            "base_mib": base, "peak_mib": _vm("VmHWM")}  # fmt: skip


def simulate(root: Path, detectors: int, exposures: int) -> None:
    from lazysky.simulator import SurveySpec, simulate_survey

    if (root / "survey.json").exists():
        return
    spec = SurveySpec(instrument="ccdmosaic", n_epochs=1, n_dithers=exposures,
                      detectors=tuple(f"CCD{i + 1:02d}" for i in range(detectors)),
                      n_transients=0, n_variables=0, n_movers=0, seed=5,
                      n_bias=5, n_dark=3, n_flat=5)  # fmt: skip
    simulate_survey(spec, root)


def make_masters_store(root: Path) -> Path:
    import xarray as xr

    from lazysky.pipeline import make_masters
    from lazysky.pipeline.fitsio import read_raw

    target = root / "masters.zarr"
    if target.exists():
        return target
    frames = {k: [read_raw(p) for p in sorted(root.glob(f"calib/*-{k}-[0-9]*.fits"))]
              for k in ("bias", "dark", "flat-r")}  # fmt: skip
    m = make_masters(bias=frames["bias"], dark=frames["dark"], flat=frames["flat-r"]).compute()
    keep = ["bias", "dark", "flat", "bias_variance", "dark_variance", "flat_variance", "bpm"]
    ds = xr.Dataset({k: (m[k].dims, m[k].values) for k in keep},
                    coords={"detector": m.detector.values})  # fmt: skip
    ds.to_zarr(target, mode="w")
    return target


def child_lazysky(raws: list[Path], masters_path: Path, out: Path) -> dict[str, Any]:
    import dask
    import xarray as xr

    from lazysky.pipeline import calibrate_exposure
    from lazysky.pipeline.fitsio import read_raw

    masters = xr.open_zarr(masters_path).compute()
    start = _start()
    images = []
    with dask.config.set(scheduler="threads", num_workers=2):
        for p in raws:
            images.append(calibrate_exposure(read_raw(p), masters).image.values)
    res = _stop(start)
    np.save(out, np.stack(images))
    return res


def child_ccdproc(raws: list[Path], masters_path: Path, out: Path) -> dict[str, Any]:
    import astropy.units as u
    import ccdproc
    import xarray as xr
    from astropy.io import fits
    from astropy.nddata import CCDData

    m = xr.open_zarr(masters_path).compute()
    start = _start()
    images = []
    for p in raws:
        with fits.open(p) as hdul:
            t = float(hdul[0].header["EXPTIME"])
            dets = []
            for d, name in enumerate(m.detector.values):
                h = hdul[str(name)]
                ccd = CCDData(h.data.astype(np.float64), unit="adu", meta=h.header)
                ccd = ccdproc.subtract_overscan(ccd, fits_section=h.header["BIASSEC"],
                                                median=True, overscan_axis=1)  # fmt: skip
                ccd = ccdproc.trim_image(ccd, fits_section=h.header["DATASEC"])
                ccd = ccdproc.subtract_bias(ccd, CCDData(m.bias.values[d], unit="adu"))
                ccd = ccdproc.gain_correct(ccd, float(h.header["GAIN"]) * u.electron / u.adu)
                dark = CCDData(m.dark.values[d], unit="electron")
                ccd = ccdproc.subtract_dark(ccd, dark, dark_exposure=1 * u.s,
                                            data_exposure=t * u.s, scale=True)  # fmt: skip
                flat = CCDData(m.flat.values[d], unit="")
                ccd = ccdproc.flat_correct(ccd, flat, norm_value=1.0)
                dets.append(np.asarray(ccd.data, dtype=np.float32))
        images.append(np.stack(dets))
    res = _stop(start)
    np.save(out, np.stack(images))
    return res


def run_child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", type=int, default=2)
    parser.add_argument("--exposures", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", help="keep the simulated data here (reused if present)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, root_s, out = args.child
        root = Path(root_s)
        raws = sorted((root / "raw").glob("*.fits"))
        fn = child_lazysky if kind == "lazysky" else child_ccdproc
        print(json.dumps(fn(raws, root / "masters.zarr", Path(out))))
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="lazysky-bench-calibrate-"))
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    results: dict[str, Any] = {"detectors": args.detectors, "exposures": args.exposures,
                               "cores": os.cpu_count(), "runs": []}  # fmt: skip
    try:
        t0 = time.perf_counter()
        simulate(root, args.detectors, args.exposures)
        make_masters_store(root)
        print(f"# simulated + masters in {time.perf_counter() - t0:.0f} s ({root})")
        mpix = args.exposures * args.detectors * 4096 * 2098 / 1e6
        for rep in range(args.repeats):
            for kind in ("lazysky", "ccdproc"):
                res = run_child([kind, str(root), str(root / f"{kind}.npy")])
                res.update(tool=kind, repeat=rep)
                if "wall_s" in res:
                    res["mpix_per_s"] = mpix / res["wall_s"]
                results["runs"].append(res)
        lz, cp = np.load(root / "lazysky.npy"), np.load(root / "ccdproc.npy")
        flat = __import__("xarray").open_zarr(root / "masters.zarr").flat.values
        good = np.broadcast_to(flat > 0.01, lz.shape)
        d = (lz.astype(np.float64) - cp)[good]
        sky_sigma = 1.4826 * float(np.median(np.abs(cp[good] - np.median(cp[good]))))
        results["agreement"] = {
            "max_abs_e": float(np.max(np.abs(d))),
            "robust_rms_e": float(1.4826 * np.median(np.abs(d - np.median(d)))),
            "max_abs_over_sky_sigma": float(np.max(np.abs(d)) / sky_sigma),
            "median_image_e": float(np.median(cp[good])),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"raw Mpix per run: {mpix:.1f}")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['tool']:<8} ERROR {r['error']}")
            continue
        print(f"{r['tool']:<8} wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s  "
              f"{r['mpix_per_s']:6.1f} Mpix/s  peak {r['peak_mib']:6.0f} MiB "
              f"(+{r['peak_mib'] - r['base_mib']:.0f})")  # fmt: skip
    ok = [r for r in results["runs"] if "wall_s" in r]
    med = {k: float(np.median([r["wall_s"] for r in ok if r["tool"] == k]))
           for k in ("lazysky", "ccdproc")}  # fmt: skip
    results["throughput_ratio_lazysky_over_ccdproc"] = med["ccdproc"] / med["lazysky"]
    print(f"throughput ratio lazysky / ccdproc (median wall): "
          f"{results['throughput_ratio_lazysky_over_ccdproc']:.2f}")  # fmt: skip
    print("agreement:", json.dumps(results["agreement"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Coadd: lazysky ``coadd_files`` vs SWarp on the same calibrated frames and output grid.

* **Inputs**: ``simulate_survey`` with the ``ccdmosaic`` instrument (``--detectors``,
  ``--exposures`` dithered exposures), calibrated once by
  ``lazysky.pipeline.fitsio.calibrate_files`` **without** cosmic-ray flagging, so that the
  cosmic rays are still in the inputs and the combine itself must reject them.
* **lazysky**: ``coadd_files(cal, out, method="clipped-mean")`` (resample bilinear, each
  frame's sky subtracted first), threaded scheduler with 2 threads, in a child process.
* **SWarp** (``/usr/bin/SWarp``): one image and one weight file per detector
  (``1/variance``, 0 where masked; written before the clock starts),
  ``COMBINE_TYPE CLIPPED``, ``RESAMPLING_TYPE BILINEAR``, ``SUBTRACT_BACK Y``,
  ``FSCALASTRO_TYPE NONE``, ``NTHREADS 2``; the output grid is forced to lazysky's (its
  coadd's WCS and size written to ``swarp.head``).
* **Photometry**: aperture flux (r = 2.5 × FWHM) of isolated (no other truth source
  within 20 px), unsaturated truth stars with 2 × 10⁴–10⁶ e⁻, local sky from an annulus,
  against the truth ``flux_e`` (mean over exposures): median ratio and robust scatter,
  for both coadds.
* **Cosmic rays**: every truth hit (``raw/<id>.cosmics.ecsv``) more than 15 px from any
  truth source brighter than mag 25, mapped onto the coadd grid: a hit "survives" when the
  coadd pixel there exceeds the local median (9 × 9) by 5 robust σ of the coadd noise.

Usage::

    python benchmarks/bench_coadd.py [--detectors 1] [--exposures 3] [--workdir DIR]
                                     [--resampling BILINEAR] [--json FILE] [--stages]
                                     [--repeat 3] [--cli] [--cli-baseline SRC]

lazysky runs once untimed first (numba compiles its kernels into its disk cache when that
is cold: a one-time cost, printed as the "first run"). Then each tool runs ``--repeat``
times, alternating (lazysky, SWarp, lazysky, …), so both see the same load; the summary
gives the **median** wall and CPU seconds of each, their ratios, the peak memory, and the
load average before and after (wall times mean little on a loaded machine: read the CPU
ratio there). lazysky is timed from after its imports (dask, ``lazysky.pipeline``: ~2 s,
printed, a one-time cost per process); SWarp as a whole process.

``--cli`` adds the user's measure: the whole one-shot process ``python -m lazysky coadd
CAL… --out X.fits`` (interpreter start, imports, numba's first call, the coadd, the
exit) against the ``SWarp`` process, interleaved (lazysky, SWarp, lazysky, …), both
timed the same way (``/usr/bin/time -v``: wall, CPU, peak RSS), medians of ``--repeat``.
``--cli-baseline SRC`` also runs another checkout's lazysky (``PYTHONPATH=SRC``, e.g.
``/work/main/src``) in the same rotation: before/after ratios from one run. Each
lazysky arm runs once untimed first (its numba cache: each checkout has its own).
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

SWARP = "/usr/bin/SWarp"


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(root: Path, detectors: int, exposures: int) -> list[Path]:
    """Simulate and calibrate (reused when present); the calibrated files."""
    from lazysky.pipeline.fitsio import calibrate_files
    from lazysky.simulator import SurveySpec, simulate_survey

    if not (root / "survey.json").exists():
        spec = SurveySpec(instrument="ccdmosaic", n_epochs=1, n_dithers=exposures,
                          detectors=tuple(f"CCD{i + 1:02d}" for i in range(detectors)),
                          star_mag_range=(17.0, 24.5), n_transients=0, n_variables=0,
                          n_movers=0, seed=7, n_bias=3, n_dark=0, n_flat=3)  # fmt: skip
        simulate_survey(spec, root)
    cal = root / "cal"
    raws = sorted((root / "raw").glob("*.fits"))
    if not cal.is_dir():
        cal.mkdir()
        calibrate_files(raws, cal, bias=sorted(root.glob("calib/*-bias-*.fits")),
                        flat=sorted(root.glob("calib/*-flat-*.fits")), cosmics=False)  # fmt: skip
    return sorted(cal.glob("*.cal.fits"))


def swarp_inputs(cals: list[Path], work: Path) -> list[Path]:
    from astropy.io import fits

    work.mkdir(exist_ok=True)
    images = []
    for p in cals:
        with fits.open(p) as hdul:
            for h in hdul[1:]:
                if h.name.endswith(("_VAR", "_MASK")):
                    continue
                var, mask = hdul[f"{h.name}_VAR"].data, hdul[f"{h.name}_MASK"].data
                with np.errstate(divide="ignore"):
                    w = np.where((mask == 0) & np.isfinite(var) & (var > 0), 1.0 / var, 0.0)
                img = work / f"{p.name.removesuffix('.cal.fits')}-{h.name}.fits"
                fits.PrimaryHDU(np.nan_to_num(h.data).astype(np.float32), h.header).writeto(
                    img, overwrite=True)
                fits.PrimaryHDU(w.astype(np.float32), h.header).writeto(
                    img.with_suffix(".weight.fits"), overwrite=True)
                images.append(img)
    return images


def child_lazysky(cals: list[Path], out: Path) -> dict[str, Any]:
    t_import = time.perf_counter()
    import dask

    from lazysky.pipeline.fitsio import coadd_files

    import_s = time.perf_counter() - t_import  # reported, not timed: a one-time cost
    Path("/proc/self/clear_refs").write_text("5")
    base, t0 = _vm("VmRSS"), time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    with dask.config.set(scheduler="threads", num_workers=2):
        coadd_files(cals, out, method="clipped-mean", overwrite=True)
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": time.perf_counter() - t0, "peak_mib": _vm("VmHWM"), "base_mib": base,
            "cpu_s": r.ru_utime + r.ru_stime - r0.ru_utime - r0.ru_stime,
            "import_s": import_s}  # fmt: skip


def child_stages(cals: list[Path], out: Path) -> dict[str, Any]:
    """``coadd_files``' stages one after the other (each persisted): wall and CPU seconds."""
    import dask

    from lazysky.pipeline import SkyGrid, detector_footprints, resample_exposure, stack
    from lazysky.pipeline.background import subtract_background
    from lazysky.pipeline.fitsio import read_calibrated
    from lazysky.pipeline.stack import write_coadd_fits

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    laps: dict[str, dict[str, float]] = {}
    mark = [time.perf_counter(), cpu()]

    def lap(name: str) -> None:
        w, c = time.perf_counter(), cpu()
        laps[name] = {"wall_s": w - mark[0], "cpu_s": c - mark[1]}
        mark[:] = [w, c]

    with dask.config.set(scheduler="threads", num_workers=2):
        # read_calibrated is lazy: persisted here so that the read is timed on its own;
        # whole detectors, as coadd_files reads them
        ds = list(dask.persist(*[d for p in cals for d in read_calibrated(p, tile_px=None)]))
        lap("read")
        cals_bg = list(dask.persist(*[subtract_background(d) for d in ds]))
        lap("background")
        grid = SkyGrid.covering([f for c in cals_bg for f in detector_footprints(c)],
                                pixel_scale_arcsec=0.26, tile_px=2048)  # fmt: skip
        # as in coadd_files, each tile is resampled and stacked in one task (strip by
        # strip): the two stages are one
        pieces = [p for c in cals_bg for p in resample_exposure(c, grid)]
        coadd = stack(pieces, grid).persist()
        lap("resample+stack")
        write_coadd_fits(coadd, out, overwrite=True)
        lap("write")
    return laps


def run_swarp(images: list[Path], lazysky_coadd: Path, out: Path, resampling: str) -> dict:
    from astropy.io import fits
    from astropy.wcs import WCS

    h = fits.getheader(lazysky_coadd)
    head = WCS(h).to_header()
    head["NAXIS1"], head["NAXIS2"] = h["NAXIS1"], h["NAXIS2"]
    out.with_suffix(".head").write_text(
        "".join(f"{c.image:<80}" for c in head.cards) + f"{'END':<80}")
    resample_dir = out.parent / "swarp-resamp"
    resample_dir.mkdir(exist_ok=True)
    cmd = [SWARP, *map(str, images), "-IMAGEOUT_NAME", str(out),
           "-WEIGHTOUT_NAME", str(out.with_suffix(".weight.fits")),
           "-COMBINE_TYPE", "CLIPPED", "-RESAMPLING_TYPE", resampling, "-SUBTRACT_BACK", "Y",
           "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_SUFFIX", ".weight.fits",
           "-FSCALASTRO_TYPE", "NONE", "-NTHREADS", "2", "-RESAMPLE_DIR", str(resample_dir),
           "-VERBOSE_TYPE", "QUIET", "-WRITE_XML", "N", "-HEADER_SUFFIX", ".head"]  # fmt: skip
    return _timed(cmd, cwd=out.parent)


def _timed(cmd: list[str], env: dict[str, str] | None = None,
           cwd: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` under ``/usr/bin/time -v``: wall, CPU (user + system), peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          check=False, cwd=cwd, env=env)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr[-2000:]}")
    stats = {line.split(":")[0].strip(): line.split(":")[-1].strip()
             for line in proc.stderr.splitlines() if ":" in line}  # fmt: skip
    rss_kib = float(stats.get("Maximum resident set size (kbytes)", "nan"))
    return {"wall_s": wall, "peak_mib": rss_kib / 1024,
            "cpu_s": float(stats.get("User time (seconds)", "nan"))
            + float(stats.get("System time (seconds)", "nan"))}  # fmt: skip


def run_cli(cals: list[Path], out: Path, src: Path) -> dict[str, Any]:
    """The whole ``python -m lazysky coadd`` process, with lazysky imported from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "lazysky", "-q", "coadd", *map(str, cals), "--out", str(out),
           "--method", "clipped-mean", "--overwrite"]  # fmt: skip
    return _timed(cmd, env=env)


def cli_arms(cals: list[Path], images: list[Path], root: Path, repeat: int, resampling: str,
             baseline: Path | None) -> dict[str, Any]:
    """Whole processes, interleaved: [baseline lazysky,] this lazysky, SWarp; medians."""
    import lazysky

    arms = {"lazysky-cli": Path(lazysky.__file__).resolve().parents[1]}
    if baseline is not None:
        arms = {"baseline-cli": baseline.resolve(), **arms}
    outs = {name: root / f"{name}-coadd.fits" for name in arms}
    first = {name: run_cli(cals, outs[name], src) for name, src in arms.items()}  # untimed
    load0 = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*arms, "swarp-cli"]}
    for _ in range(max(repeat, 1)):
        for name, src in arms.items():
            runs[name].append(run_cli(cals, outs[name], src))
        runs["swarp-cli"].append(run_swarp(images, outs["lazysky-cli"],
                                           root / "swarp-cli-coadd.fits", resampling))  # fmt: skip
    load1 = os.getloadavg()
    same = {name: outs[name].read_bytes() == outs["lazysky-cli"].read_bytes() for name in outs}
    return {"medians": {name: _medians(r) for name, r in runs.items()}, "runs": runs,
            "first_run": first, "sources": {k: str(v) for k, v in arms.items()},
            "identical_to_lazysky_cli": same,
            "load_average": {"before": load0, "after": load1}}  # fmt: skip


def measure(coadd: Path, root: Path, count: Any = None) -> dict[str, Any]:
    """Star photometry vs truth, and surviving cosmic rays, on one coadd image.

    ``count`` (lazysky's COUNT plane: exposures kept per pixel) splits the surviving hits
    by how many exposures were kept there (1: nothing could have rejected them).
    """
    from astropy.io import fits
    from astropy.table import Table, vstack
    from astropy.wcs import WCS
    from photutils.aperture import CircularAnnulus, CircularAperture, aperture_photometry
    from scipy import ndimage

    with fits.open(coadd) as hdul:
        img = np.asarray(hdul[0].data, dtype=np.float64)
        wcs = WCS(hdul[0].header)
    truth = vstack([Table.read(p) for p in sorted((root / "raw").glob("*.truth.ecsv"))])
    stars: dict[int, list[Any]] = {}
    for row in truth:
        stars.setdefault(int(row["id"]), []).append(row)
    ids = list(stars)
    ra = np.array([stars[i][0]["ra"] for i in ids])
    dec = np.array([stars[i][0]["dec"] for i in ids])
    flux = np.array([np.mean([r["flux_e"] for r in stars[i]]) for i in ids])
    kind = np.array([str(stars[i][0]["kind"]) for i in ids])
    mag = np.array([stars[i][0]["mag"] for i in ids])
    sat = np.array([any(bool(r["saturated"]) for r in stars[i]) for i in ids])
    x, y = wcs.world_to_pixel_values(ra, dec)
    inside = (x > 30) & (y > 30) & (x < img.shape[1] - 30) & (y < img.shape[0] - 30)
    bright_any = mag < 25
    pick = []
    for k in np.flatnonzero(inside & (kind == "star") & ~sat & (flux > 2e4) & (flux < 1e6)):
        d = np.hypot(x - x[k], y - y[k])
        if np.sum((d < 20) & bright_any) == 1:
            pick.append(k)
    pick_a = np.array(pick, dtype=int)
    fwhm_px = 0.95 / 0.26
    pos = np.column_stack([x[pick_a], y[pick_a]])
    good = np.nan_to_num(img)
    ap = aperture_photometry(good, CircularAperture(pos, r=2.5 * fwhm_px))
    ann = CircularAnnulus(pos, r_in=4 * fwhm_px, r_out=6 * fwhm_px)
    sky = np.array([np.median(m.get_values(good)) for m in ann.to_mask(method="center")])
    phot = np.asarray(ap["aperture_sum"]) - sky * np.pi * (2.5 * fwhm_px) ** 2
    ratio = phot / flux[pick_a]
    # cosmic rays
    noise = 1.4826 * np.median(np.abs(good - np.median(good)))
    local = ndimage.median_filter(good, size=9)
    hits = survived = 0
    by_count: dict[str, int] = {}
    bx, by = x[inside & bright_any], y[inside & bright_any]
    for p in sorted((root / "raw").glob("*.cosmics.ecsv")):
        cr = Table.read(p)
        raw_name = p.name.replace(".cosmics.ecsv", ".fits")
        for det in set(map(str, cr["detector"])):
            rows = cr[cr["detector"] == det]
            rw = WCS(fits.getheader(root / "raw" / raw_name, det))
            cra, cdec = rw.pixel_to_world_values(np.asarray(rows["x"], float),
                                                 np.asarray(rows["y"], float))  # fmt: skip
            cx, cy = wcs.world_to_pixel_values(cra, cdec)
            for u, v in zip(np.round(cx).astype(int), np.round(cy).astype(int), strict=True):
                if not (10 <= u < img.shape[1] - 10 and 10 <= v < img.shape[0] - 10):
                    continue
                if np.any(np.hypot(bx - u, by - v) < 15):
                    continue
                hits += 1
                up = int(good[v, u] - local[v, u] > 5 * noise)
                survived += up
                if count is not None and up:
                    key = str(int(count[v, u]))
                    by_count[key] = by_count.get(key, 0) + 1
    scatter = 1.4826 * np.median(np.abs(ratio - np.median(ratio)))
    return {"n_stars": len(pick_a), "flux_ratio_median": float(np.median(ratio)),
            "flux_ratio_robust_scatter": float(scatter),
            "cr_hits_checked": hits, "cr_surviving_5sigma": survived,
            "cr_surviving_by_lazysky_count": by_count,
            "noise_robust_sigma": float(noise), "phot": phot.tolist(),
            "ids": pick_a.tolist()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", type=int, default=1)
    parser.add_argument("--exposures", type=int, default=3)
    parser.add_argument("--resampling", default="BILINEAR", choices=["BILINEAR", "LANCZOS3"])
    parser.add_argument("--workdir", help="keep the simulated data here (reused if present)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--stages", action="store_true",
                        help="also time lazysky's stages (read, background, resample+stack, "
                             "write) in a second child")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each tool, alternating; medians are reported")  # fmt: skip
    parser.add_argument("--cli", action="store_true",
                        help="also time whole one-shot 'python -m lazysky coadd' processes "
                             "against SWarp's, interleaved")  # fmt: skip
    parser.add_argument("--cli-baseline", type=Path, metavar="SRC",
                        help="with --cli: also run the lazysky of this source directory "
                             "(PYTHONPATH), e.g. /work/main/src, for before/after")  # fmt: skip
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cal_dir, out, *mode = args.child
        child = child_stages if mode == ["stages"] else child_lazysky
        print(json.dumps(child(sorted(Path(cal_dir).glob("*.cal.fits")), Path(out))))
        return
    if not Path(SWARP).exists():
        raise SystemExit(f"{SWARP} not found: apt-get install swarp")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lazysky-bench-coadd-"))
    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}  ({os.cpu_count()} cores)")
    try:
        t0 = time.perf_counter()
        cals = prepare(root, args.detectors, args.exposures)
        images = swarp_inputs(cals, root / "swarp-in")
        print(f"# simulated + calibrated + SWarp inputs in {time.perf_counter() - t0:.0f} s")
        out_l = root / "lazysky-coadd.fits"
        cmd = [sys.executable, __file__, "--child", str(root / "cal"), str(out_l)]
        # one untimed lazysky run first: numba compiles its kernels into its on-disk cache
        # when that is cold (a fresh install, or after an edit of _coadd_jit.py); reported
        # apart ("first run"), as a one-time cost, not mixed into the medians
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        first = json.loads(proc.stdout.strip().splitlines()[-1])
        load0 = os.getloadavg()
        runs: dict[str, list[dict[str, Any]]] = {"lazysky": [], "swarp": []}
        for _ in range(max(args.repeat, 1)):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs["lazysky"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            runs["swarp"].append(run_swarp(images, out_l, root / "swarp-coadd.fits",
                                           args.resampling))  # fmt: skip
        load1 = os.getloadavg()
        lz, sw = (_medians(runs[t]) for t in ("lazysky", "swarp"))
        stages = None
        if args.stages:
            proc = subprocess.run([sys.executable, __file__, "--child", str(root / "cal"),
                                   str(root / "stages-coadd.fits"), "stages"],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            stages = json.loads(proc.stdout.strip().splitlines()[-1])
        res: dict[str, Any] = {"lazysky": lz, "swarp": sw, "runs": runs, "lazysky_first_run": first,
                               "load_average": {"before": load0, "after": load1}}  # fmt: skip
        if args.cli or args.cli_baseline:
            res["cli"] = cli_arms(cals, images, root, args.repeat, args.resampling,
                                  args.cli_baseline)  # fmt: skip
        from astropy.io import fits

        count = fits.getdata(out_l, "COUNT")
        res["lazysky"].update(measure(out_l, root, count))
        res["swarp"].update(measure(root / "swarp-coadd.fits", root, count))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    for tool in ("lazysky", "swarp"):
        r = res[tool]
        print(f"{tool:<8} (median) wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s  peak "
              f"{r['peak_mib']:6.0f} MiB  stars {r['n_stars']}  flux/truth median "
              f"{r['flux_ratio_median']:.4f} scatter {r['flux_ratio_robust_scatter']:.4f}  "
              f"CR surviving {r['cr_surviving_5sigma']}/{r['cr_hits_checked']} "
              f"(by exposures kept there: {r['cr_surviving_by_lazysky_count']})")  # fmt: skip
    both = np.array(res["lazysky"]["phot"]) / np.array(res["swarp"]["phot"])
    res["lazysky_over_swarp_flux_median"] = float(np.median(both))
    res["throughput_ratio_lazysky_over_swarp"] = res["swarp"]["wall_s"] / res["lazysky"]["wall_s"]
    res["cpu_ratio_swarp_over_lazysky"] = res["swarp"]["cpu_s"] / res["lazysky"]["cpu_s"]
    n = len(runs["lazysky"])
    walls = {t: " ".join(f"{r['wall_s']:.1f}" for r in runs[t]) for t in runs}
    print(f"runs (wall s): lazysky {walls['lazysky']} | swarp {walls['swarp']}; lazysky's "
          f"untimed first run (numba's cache warm-up) {first['wall_s']:.1f} s wall / "
          f"{first['cpu_s']:.1f} s cpu")
    print(f"load average (1/5/15 min) before {_load(load0)}, after {_load(load1)}; lazysky's "
          f"imports before each timed call (dask, lazysky.pipeline; not in the ratios: "
          f"SWarp is timed as a whole process) {res['lazysky']['import_s']:.1f} s (median)")
    print(f"throughput ratio lazysky / SWarp (wall, median of {n}): "
          f"{res['throughput_ratio_lazysky_over_swarp']:.2f}; by CPU seconds (SWarp's / "
          f"lazysky's): {res['cpu_ratio_swarp_over_lazysky']:.2f}; peak memory "
          f"{res['lazysky']['peak_mib']:.0f} vs {res['swarp']['peak_mib']:.0f} MiB; "
          f"star flux lazysky / SWarp median {res['lazysky_over_swarp_flux_median']:.4f}")
    if stages:
        res["lazysky_stages"] = stages
        print("lazysky stages (run again, each persisted): " + ", ".join(
            f"{k} {v['wall_s']:.1f} s wall / {v['cpu_s']:.1f} s cpu" for k, v in stages.items()))
    if "cli" in res:
        _print_cli(res["cli"])
    if args.json:
        for tool in ("lazysky", "swarp"):
            res[tool].pop("phot")
        Path(args.json).write_text(json.dumps(res, indent=2))


def _print_cli(cli: dict[str, Any]) -> None:
    med, sw = cli["medians"], cli["medians"]["swarp-cli"]
    print("whole processes (python -m lazysky coadd … / SWarp …), interleaved, medians of "
          f"{len(cli['runs']['swarp-cli'])}:")
    for name, m in med.items():
        walls = " ".join(f"{r['wall_s']:.2f}" for r in cli["runs"][name])
        first = cli["first_run"].get(name)
        print(f"  {name:<13} wall {m['wall_s']:5.2f} s  cpu {m['cpu_s']:5.2f} s  peak "
              f"{m['peak_mib']:5.0f} MiB  runs {walls}"
              + (f"  (untimed first run {first['wall_s']:.2f} s)" if first else "")
              + (f"  from {cli['sources'][name]}" if name in cli["sources"] else ""))
    for name in cli["sources"]:
        m = med[name]
        print(f"  throughput {name} / SWarp: wall {sw['wall_s'] / m['wall_s']:.2f}, "
              f"CPU {sw['cpu_s'] / m['cpu_s']:.2f}; output identical to lazysky-cli's: "
              f"{cli['identical_to_lazysky_cli'][name]}")
    if "baseline-cli" in med:
        b, n = med["baseline-cli"], med["lazysky-cli"]
        print(f"  lazysky-cli / baseline-cli: wall {n['wall_s'] / b['wall_s']:.2f}, "
              f"CPU {n['cpu_s'] / b['cpu_s']:.2f}, peak {n['peak_mib'] / b['peak_mib']:.2f}")
    la = cli["load_average"]
    print(f"  load average (1/5/15 min) before {_load(la['before'])}, after {_load(la['after'])}")


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each number over the runs (wall, CPU, peak memory)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {k: float(np.median([r[k] for r in runs])) for k in keys}


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{a:.1f}" for a in avg)


if __name__ == "__main__":
    main()

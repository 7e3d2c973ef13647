"""``lazysky detect`` vs Source Extractor, side by side, on one simulated image.

The image: ``--size`` pixels square (default 4096) at 0.5"/px, a seeded scene of Moffat
stars (β = 3, FWHM 2.6 px, power-law fluxes) and exponential-disc galaxies on white
noise, written as a lazysky coadd FITS (PRIMARY + VARIANCE + MASK, sky already 0) and as
the plain image + variance files Source Extractor takes. Both tools run as child
processes, one at a time, ``--repeat`` times each (alternating); reported: median wall
time, peak RSS of the child (``/usr/bin/time -v``, else ``RUSAGE_CHILDREN`` of a wrapper),
completeness of stars with S/N >= 10 and purity (detections within 1" of a truth source),
and the lazysky / Source Extractor ratios. Same threshold (our filtered-image S/N 5 is
Source Extractor's DETECT_THRESH 1.875 on the same 3 × 3 filter), minimum area 5,
deblending 32 / 0.005, cleaning, our variance as MAP_VAR, one thread each.

Run: ``python benchmarks/bench_detect.py [--size 4096] [--repeat 3] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from lazysky.pipeline import SkyGrid
from lazysky.pipeline._sep_reference import find_source_extractor, sextractor_threshold

SCALE = 0.5
FWHM = 2.6
BETA = 3.0
NOISE = 10.0  # e- per pixel, sky-subtracted


def _moffat_stamp(dx: float, dy: float, half: int) -> np.ndarray:
    alpha = FWHM / (2 * math.sqrt(2 ** (1 / BETA) - 1))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    # 3 x 3 sub-sampling: a pixel-integrated profile
    acc = np.zeros(yy.shape)
    for sy in (-1 / 3, 0, 1 / 3):
        for sx in (-1 / 3, 0, 1 / 3):
            r2 = (xx - dx + sx) ** 2 + (yy - dy + sy) ** 2
            acc += (1 + r2 / alpha**2) ** (-BETA)
    return acc / acc.sum()


def _galaxy_stamp(dx: float, dy: float, r_e: float, q: float, pa: float, half: int) -> np.ndarray:
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    x, y = xx - dx, yy - dy
    c, s = math.cos(pa), math.sin(pa)
    u, v = c * x + s * y, (-s * x + c * y) / q
    prof = np.exp(-1.678 * np.hypot(u, v) / r_e)
    from scipy.ndimage import gaussian_filter

    prof = gaussian_filter(prof, FWHM / 2.3548)
    return prof / prof.sum()


def make_image(size: int, seed: int) -> tuple[np.ndarray, Table]:
    """The image (e-, sky 0) and its truth: x, y, flux, kind."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, NOISE, (size, size)).astype(np.float32)
    n_star = int(1.2e-3 * size * size)  # ~20 000 at 4096²
    n_gal = n_star // 5
    rows = []
    for kind, n in (("star", n_star), ("galaxy", n_gal)):
        xs, ys = rng.uniform(-5, size + 5, n), rng.uniform(-5, size + 5, n)
        # power-law counts: N(>f) ∝ f^-0.6, from 50 e- (S/N ~1) to 1e6 e-
        u = rng.uniform(0, 1, n)
        fl = 50.0 * (1 - u * (1 - (1e6 / 50.0) ** -0.6)) ** (-1 / 0.6)
        for x, y, f in zip(xs, ys, fl, strict=True):
            ix, iy = round(x), round(y)
            if kind == "star":
                half = 12 if f < 1e5 else 30
                stamp = _moffat_stamp(x - ix, y - iy, half)
            else:
                half = 20
                stamp = _galaxy_stamp(x - ix, y - iy, rng.uniform(1.5, 5.0),
                                      rng.uniform(0.3, 1.0), rng.uniform(0, math.pi), half)
            y0, y1, x0, x1 = iy - half, iy + half + 1, ix - half, ix + half + 1
            sy, sx = slice(max(y0, 0), min(y1, size)), slice(max(x0, 0), min(x1, size))
            if sy.start >= sy.stop or sx.start >= sx.stop:
                continue
            img[sy, sx] += (f * stamp[sy.start - y0 : sy.stop - y0,
                                      sx.start - x0 : sx.stop - x0]).astype(np.float32)
            rows.append((x, y, f, kind))
    truth = Table(rows=rows, names=("x", "y", "flux", "kind"))
    return img, truth


def write_inputs(img: np.ndarray, d: Path) -> tuple[Path, Path, Path]:
    size = img.shape[0]
    grid = SkyGrid(150.0, 2.0, SCALE, img.shape, tile_px=2048)
    header = grid.wcs.to_header()
    var = np.full(img.shape, NOISE**2, np.float32)
    coadd = d / "coadd.fits"
    primary = fits.PrimaryHDU(img, header=header)
    primary.header["COMBINET"] = ("synthetic", "sky already subtracted")
    fits.HDUList([primary, fits.ImageHDU(var, header=header, name="VARIANCE"),
                  fits.ImageHDU(np.zeros(img.shape, np.uint16), header=header, name="MASK")]
                 ).writeto(coadd, overwrite=True)  # fmt: skip
    image = d / "image.fits"
    fits.PrimaryHDU(img, header=header).writeto(image, overwrite=True)
    variance = d / "var.fits"
    fits.PrimaryHDU(var, header=header).writeto(variance, overwrite=True)
    del size
    return coadd, image, variance


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process."""
    timer = shutil.which("time") or "/usr/bin/time"
    if Path(timer).exists():
        t0 = time.perf_counter()
        done = subprocess.run([timer, "-v", *cmd], cwd=cwd, capture_output=True, text=True,
                              check=False)  # fmt: skip
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed: {done.stderr[-2000:]}")
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        rss = int(m.group(1)) / 1024 if m else float("nan")
        return wall, rss
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:]); w = time.perf_counter() - t; "
               "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(r.returncode)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, capture_output=True,
                          text=True, check=True)  # fmt: skip
    wall, rss = done.stdout.split()[-2:]
    return float(wall), int(rss) / 1024


def scores(x: np.ndarray, y: np.ndarray, truth: Table, size: int) -> tuple[float, float]:
    r = 1.0 / SCALE  # 1 arcsec
    tx, ty = truth["x"], truth["y"]
    inner = (tx > 10) & (tx < size - 11) & (ty > 10) & (ty < size - 11)
    # S/N of an optimal measurement of a background-limited star: f / (σ sqrt(4π σ_psf²))
    snr = truth["flux"] / (NOISE * math.sqrt(4 * math.pi) * FWHM / 2.3548)
    stars = inner & (truth["kind"] == "star") & (snr >= 10)
    tree = cKDTree(np.column_stack([x, y]))
    d, _ = tree.query(np.column_stack([truth["x"][stars], truth["y"][stars]]))
    completeness = float(np.mean(d < r))
    det_inner = (x > 10) & (x < size - 11) & (y > 10) & (y < size - 11)
    d2, _ = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(
        np.column_stack([x[det_inner], y[det_inner]]))
    purity = float(np.mean(d2 < r))
    return completeness, purity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=5.0)
    ap.add_argument("--out", type=Path, help="keep the inputs and catalogues here")
    args = ap.parse_args(argv)
    sex = find_source_extractor()
    if sex is None:
        raise SystemExit("source-extractor is not installed: nothing to compare with")
    d = args.out or Path(tempfile.mkdtemp(prefix="bench-detect-"))
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    img, truth = make_image(args.size, args.seed)
    coadd, image, variance = write_inputs(img, d)
    print(f"image {args.size}² px, {len(truth)} sources, made in "
          f"{time.perf_counter() - t0:.1f} s")
    (d / "k.conv").write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    (d / "p.param").write_text("NUMBER\nX_IMAGE\nY_IMAGE\nFLUX_AUTO\nFLAGS\n")
    (d / "empty.sex").write_text("")
    st = sextractor_threshold(args.threshold)
    lazysky_cmd = [sys.executable, "-m", "lazysky", "-q", "detect", str(coadd), "--out",
                   str(d / "lazysky.fits"), "--threshold", str(args.threshold), "--overwrite"]
    sex_cmd = [sex, str(image), "-c", "empty.sex", "-CATALOG_NAME", "sex.cat",
               "-CATALOG_TYPE", "FITS_1.0", "-PARAMETERS_NAME", "p.param",
               "-DETECT_THRESH", f"{st}", "-ANALYSIS_THRESH", f"{st}", "-DETECT_MINAREA", "5",
               "-FILTER", "Y", "-FILTER_NAME", "k.conv", "-DEBLEND_NTHRESH", "32",
               "-DEBLEND_MINCONT", "0.005", "-CLEAN", "Y", "-BACK_TYPE", "MANUAL",
               "-BACK_VALUE", "0", "-WEIGHT_TYPE", "MAP_VAR", "-WEIGHT_IMAGE", str(variance),
               "-MEMORY_PIXSTACK", "3000000", "-MEMORY_OBJSTACK", "30000",
               "-CHECKIMAGE_TYPE", "NONE", "-VERBOSE_TYPE", "QUIET", "-NTHREADS", "1"]
    env_note = os.environ.get("PYTHONPATH", "")
    runs: dict[str, list[tuple[float, float]]] = {"lazysky": [], "sextractor": []}
    for _ in range(args.repeat):
        runs["lazysky"].append(run_measured(lazysky_cmd, d))
        runs["sextractor"].append(run_measured(sex_cmd, d))
    from lazysky.pipeline.detect import detect_file

    inproc = []
    for _ in range(args.repeat):  # the kernel alone, without the interpreter's start-up
        t1 = time.perf_counter()
        detect_file(coadd, d / "inproc.fits", threshold=args.threshold, overwrite=True)
        inproc.append(time.perf_counter() - t1)
    ours = Table.read(d / "lazysky.fits")
    theirs = Table.read(d / "sex.cat", hdu=1)
    c1, p1 = scores(np.asarray(ours["x"]), np.asarray(ours["y"]), truth, args.size)
    c2, p2 = scores(np.asarray(theirs["X_IMAGE"]) - 1, np.asarray(theirs["Y_IMAGE"]) - 1, truth,
                    args.size)  # fmt: skip
    res = {}
    for name, (c, p, n) in {"lazysky": (c1, p1, len(ours)),
                            "sextractor": (c2, p2, len(theirs))}.items():  # fmt: skip
        walls = [w for w, _ in runs[name]]
        rss = [r for _, r in runs[name]]
        res[name] = {"wall_s_median": statistics.median(walls), "walls": walls,
                     "peak_rss_mib": max(rss), "n_detections": n, "completeness_snr10": c,
                     "purity": p}  # fmt: skip
    res["lazysky"]["in_process_wall_s_median"] = statistics.median(inproc)
    ratio = {k: res["lazysky"][k] / res["sextractor"][k]
             for k in ("wall_s_median", "peak_rss_mib", "completeness_snr10", "purity")}
    print(f"{'':12s}{'wall (s)':>10s}{'peak RSS (MiB)':>16s}{'detections':>12s}"
          f"{'completeness':>14s}{'purity':>8s}")
    for name, r in res.items():
        print(f"{name:12s}{r['wall_s_median']:10.2f}{r['peak_rss_mib']:16.0f}"
              f"{r['n_detections']:12d}{r['completeness_snr10']:14.3f}{r['purity']:8.3f}")
    print(f"lazysky in-process (detect_file, no interpreter start-up): "
          f"{statistics.median(inproc):.2f} s, ratio "
          f"{statistics.median(inproc) / res['sextractor']['wall_s_median']:.2f}")
    print("ratio lazysky / Source Extractor: "
          + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    report = {"args": vars(args) | {"out": str(d)}, "results": res, "ratios": ratio,
              "pythonpath": env_note}
    (d / "bench_detect.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of the survey simulator on the Roman-like exposure, and against GalSim.

What it measures
----------------
1. **The full path** of :func:`lazysky.simulator.simulate_survey` for one Roman-like
   exposure (scene, one Dask task per 4088 × 4088 detector, FITS + truth written to a
   temporary directory), once per Dask scheduler (``threads``, ``processes``, ``sync``):
   wall seconds, seconds per raw megapixel and peak memory. Every run is a fresh Python
   process: its peak RSS is ``ru_maxrss`` of itself plus that of its largest child (the
   ``processes`` workers), and a psutil sampler (every 50 ms) records the largest RSS of
   the whole process tree at any instant.
2. **GalSim side by side**, one core each (``OMP_NUM_THREADS=1``): the same sources of
   detector SCA01 (positions, electrons, Sérsic shapes, Moffat PSF taken from lazysky)
   drawn with GalSim the standard way (each object on a stamp of the size lazysky uses,
   ``drawImage(method="auto", add_to_image=True)``, default ``gsparams``), plus sky,
   Poisson and read noise; against lazysky's ``render_detector`` (which also draws the
   flat field, dark current, cosmic rays, saturation and the ADC) and against lazysky's
   source kernels alone. Both noiseless images are compared: total flux, the aperture
   fluxes of the 20 brightest isolated stars and the cores of the 20 brightest isolated
   galaxies.

How to run
----------
::

    python benchmarks/bench_simulator.py                 # 18 detectors (~7 min, idle 2 cores)
    python benchmarks/bench_simulator.py --quick         # 2 detectors, GalSim on 1/10 of galaxies
    python benchmarks/bench_simulator.py --detectors 6 --repeats 3 --json out.json

Needs ``galsim`` (``pip install galsim``, the ``bench`` extra); without it part 2 is
skipped with a note. Nothing here is a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
SCHEDULERS = ("threads", "processes", "sync")
N_ROMAN_DETECTORS = 18
DETECTOR_PX = 4088 * 4088
COMPARE_INDEX = 0  # SCA01
APERTURE_PX = 4.0  # aperture radius of the star-flux comparison (PSF FWHM is ~1.6 px)
GALAXY_CORE_PX = 1.5  # aperture radius of the galaxy-core comparison (sensitive to blur)
ISOLATION_PX = 10.0  # no source above 0.1 % of the star's flux within this radius
SINGLE_CORE_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


# --------------------------------------------------------------------------------------
# Measuring one run: wall time and peak memory
# --------------------------------------------------------------------------------------


class TreeRssSampler:
    """Samples the summed RSS of this process and all its children in a thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a worker that just exited
                    continue
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rusage_summary() -> dict[str, float]:
    """Peak RSS (MiB) of this process and of its largest finished child (Linux: KiB),
    and the CPU seconds and page faults of both (since the process started)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    own, child = me.ru_maxrss / 1024, kids.ru_maxrss / 1024
    return {
        "rss_self_mib": own,
        "rss_child_mib": child,
        "rss_mib": own + child,
        "cpu_user_s": me.ru_utime + kids.ru_utime,
        "cpu_sys_s": me.ru_stime + kids.ru_stime,
        "major_faults": me.ru_majflt + kids.ru_majflt,
        "minor_faults": me.ru_minflt + kids.ru_minflt,
    }


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of ``repeats`` calls of ``fn`` (and every timing)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# --------------------------------------------------------------------------------------
# Part 1: the full exposure on one Dask scheduler (runs in a fresh child process)
# --------------------------------------------------------------------------------------


def detector_names(n: int) -> tuple[str, ...]:
    return tuple(f"SCA{i:02d}" for i in range(1, n + 1))


def roman_spec(detectors: tuple[str, ...]) -> Any:
    """One Roman-like exposure, no calibration frames."""
    from lazysky.simulator import SurveySpec

    return SurveySpec(
        instrument="roman",
        n_epochs=1,
        n_dithers=1,
        n_bias=0,
        n_dark=0,
        n_flat=0,
        detectors=detectors,
    )


def run_survey(scheduler: str, n_detectors: int) -> dict[str, Any]:
    """Simulate and write one exposure; wall seconds and peak memory."""
    from lazysky.simulator import simulate_survey

    spec = roman_spec(detector_names(n_detectors))
    with tempfile.TemporaryDirectory(prefix="lazysky-bench-") as tmp, TreeRssSampler() as s:
        t0 = time.perf_counter()
        simulate_survey(spec, tmp, calibrations=False, scheduler=scheduler)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "rss_tree_mib": s.peak_bytes / 2**20, **rusage_summary()}


# --------------------------------------------------------------------------------------
# Part 2: one detector, lazysky and GalSim on the same sources
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorSources:
    """The sources lazysky draws on one detector, in pixels and electrons.

    Derived exactly as :func:`lazysky.simulator.render_detector` does; galaxies can be
    thinned to every ``galaxy_step``-th one (``galaxy_step=1``: everything).
    """

    shape: tuple[int, int]
    pixel_scale_arcsec: float
    fwhm_px: float
    beta: float
    sky_e: float
    read_noise_e: float
    star_x: FloatArray
    star_y: FloatArray
    star_flux: FloatArray
    gal_x: FloatArray
    gal_y: FloatArray
    gal_flux: FloatArray
    gal_r_eff_px: FloatArray
    gal_n: FloatArray
    gal_q: FloatArray
    gal_theta_rad: FloatArray
    galaxy_step: int


def detector_sources(index: int, galaxy_step: int) -> tuple[DetectorSources, Any]:
    """The sources of detector ``index`` of the benchmark exposure, and the pieces to
    call ``render_detector`` (instrument, scene, pointing, seed)."""
    from lazysky.simulator import plan_exposures, survey_scene
    from lazysky.simulator.exposure import _sources_on

    spec = roman_spec(detector_names(index + 1))
    inst, scene = spec.inst, survey_scene(spec)
    p = plan_exposures(spec)[0]
    rows, x, y, mag = _sources_on(scene, p, inst, index, margin=60.0)
    with np.errstate(over="ignore"):
        zp = inst.band(p.filter).zeropoint_mag
        flux = np.where(np.isfinite(mag), 10 ** (-0.4 * (mag - zp)), 0.0) * p.exptime_s
    table = scene.table
    point = np.asarray(table["kind"][rows] != "galaxy") & (flux > 0)
    gal = np.flatnonzero(~point & (flux > 0))[::galaxy_step]
    g = rows[gal]
    scale = inst.pixel_scale_arcsec
    src = DetectorSources(
        shape=tuple(inst.detector_shape),
        pixel_scale_arcsec=scale,
        fwhm_px=p.seeing_arcsec / scale,
        beta=inst.psf_beta,
        sky_e=p.sky_e_per_s_px * p.exptime_s,
        read_noise_e=inst.read_noise_e,
        star_x=x[point],
        star_y=y[point],
        star_flux=flux[point],
        gal_x=x[gal],
        gal_y=y[gal],
        gal_flux=flux[gal],
        gal_r_eff_px=np.asarray(table["r_eff_arcsec"][g]) / scale,
        gal_n=np.asarray(table["sersic_n"][g]),
        gal_q=np.asarray(table["axis_ratio"][g]),
        gal_theta_rad=np.radians(np.asarray(table["pa_deg"][g]) + p.pa_deg),
        galaxy_step=galaxy_step,
    )
    return src, (inst, scene, p, spec.seed)


def lazysky_stars(image: FloatArray, src: DetectorSources) -> None:
    from lazysky.simulator.render import add_point_sources

    add_point_sources(
        image, src.star_x, src.star_y, src.star_flux, fwhm_px=src.fwhm_px, beta=src.beta
    )


def lazysky_galaxies(image: FloatArray, src: DetectorSources) -> None:
    from lazysky.simulator.render import add_sersic_galaxies

    add_sersic_galaxies(
        image,
        src.gal_x,
        src.gal_y,
        src.gal_flux,
        r_eff_px=src.gal_r_eff_px,
        sersic_n=src.gal_n,
        axis_ratio=src.gal_q,
        theta_rad=src.gal_theta_rad,
        psf_fwhm_px=src.fwhm_px,
        psf_beta=src.beta,
    )


@contextmanager
def captured_light() -> Iterator[list[FloatArray]]:
    """Record the noiseless image ``render_detector`` hands to ``read_out``."""
    from lazysky.simulator import exposure

    original = exposure.read_out
    seen: list[FloatArray] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(np.array(args[2]))
        return original(*args, **kwargs)

    exposure.read_out = spy
    try:
        yield seen
    finally:
        exposure.read_out = original


def run_lazysky_detector(galaxy_step: int, repeats: int) -> dict[str, Any]:
    """Time ``render_detector`` for SCA01 and lazysky's source kernels on its sources."""
    from lazysky.simulator import render_detector

    src, (inst, scene, p, seed) = detector_sources(COMPARE_INDEX, galaxy_step)

    def render() -> object:
        return render_detector(inst, scene, p, COMPARE_INDEX, seed, (2, 0))

    out: dict[str, Any] = {"n_stars": src.star_x.size, "n_galaxies": src.gal_x.size}
    out["render_s"], out["render_times"] = median_time(render, repeats)
    out.update(rusage_summary())

    light = np.full(src.shape, src.sky_e)
    out["stars_s"], _ = median_time(lambda: lazysky_stars(np.zeros(src.shape), src), repeats)
    out["galaxies_s"], _ = median_time(lambda: lazysky_galaxies(np.zeros(src.shape), src), repeats)
    lazysky_stars(light, src)
    lazysky_galaxies(light, src)
    if galaxy_step == 1:  # the kernels above drew exactly what render_detector draws
        with captured_light() as seen:
            render()
        out["same_as_render_detector"] = bool(np.array_equal(seen[0], light))
    light -= src.sky_e
    np.save(os.environ["LAZYSKY_BENCH_LIGHT"], light.astype(np.float32))
    return out


def _stamp_half(radius_px: FloatArray) -> NDArray[np.int64]:
    """lazysky's stamp half-size for a source of this radius (see ``render.py``)."""
    from lazysky.simulator.render import _STAMP_RADII

    radii = np.asarray(_STAMP_RADII)
    k = np.minimum(np.searchsorted(radii, radius_px), len(radii) - 1)
    return np.asarray(radii[k], dtype=np.int64)


def star_stamp_half(src: DetectorSources) -> NDArray[np.int64]:
    """Half-size of each star's stamp in lazysky (flux lost < 0.1 % and < noise / 10)."""
    from lazysky.simulator.render import moffat_alpha

    alpha = moffat_alpha(src.fwhm_px, src.beta)
    lost = np.minimum(1e-3, 0.1 / np.sqrt(np.maximum(src.star_flux, 1.0)))
    radius = np.minimum(alpha * np.sqrt(lost ** (1.0 / (1.0 - src.beta)) - 1.0), 135)
    return _stamp_half(radius)


def galaxy_radius_px(src: DetectorSources) -> FloatArray:
    """The radius lazysky truncates a galaxy at (before the PSF)."""
    return np.clip(4.0 * src.gal_r_eff_px + 2.0, 2.0, 60.0)


def galaxy_stamp_half(src: DetectorSources) -> NDArray[np.int64]:
    """Half-size of each galaxy's stamp in lazysky: truncation radius + PSF kernel."""
    from lazysky.simulator.render import moffat_kernel

    pad = moffat_kernel(src.fwhm_px, src.beta).shape[0] // 2
    return _stamp_half(galaxy_radius_px(src)) + pad


def galsim_add(image: Any, obj: Any, x: float, y: float, half: int) -> None:
    """Draw ``obj`` centred on lazysky pixel (x, y) into its stamp of ``image``."""
    import galsim

    cx, cy = math.floor(x + 0.5) + 1, math.floor(y + 0.5) + 1  # GalSim pixels are 1-based
    bounds = galsim.BoundsI(cx - half, cx + half, cy - half, cy + half) & image.bounds
    if bounds.isDefined():
        center = galsim.PositionD(x + 1.0, y + 1.0)
        obj.drawImage(image=image[bounds], add_to_image=True, center=center, method="auto")


def galsim_stars(image: Any, src: DetectorSources) -> None:
    import galsim

    psf = galsim.Moffat(beta=src.beta, fwhm=src.fwhm_px * src.pixel_scale_arcsec)
    halves = star_stamp_half(src)
    for x, y, f, h in zip(src.star_x, src.star_y, src.star_flux, halves, strict=True):
        galsim_add(image, psf.withFlux(float(f)), float(x), float(y), int(h))


def galsim_sersic(src: DetectorSources, i: int) -> Any:
    """Galaxy ``i`` as lazysky draws it: ``exp(-b_n (r / r_eff)^(1/n))`` with ``r_eff`` on
    the major axis, truncated at lazysky's radius ``4 r_eff + 2`` px, holding all its flux.

    GalSim's ``half_light_radius`` of a truncated Sérsic is that of the truncated profile,
    not lazysky's ``r_eff``, so the profile is given by its scale radius
    ``r0 = r_eff / b_n^n``; the shear keeps the area, hence the ``sqrt(q)``.
    """
    import galsim

    from lazysky.simulator.render import sersic_b

    scale, q, n = src.pixel_scale_arcsec, float(src.gal_q[i]), float(src.gal_n[i])
    r0 = float(src.gal_r_eff_px[i] / sersic_b(np.asarray(n)) ** n) * scale * math.sqrt(q)
    trunc = float(galaxy_radius_px(src)[i]) * scale * math.sqrt(q)
    prof = galsim.Sersic(n, scale_radius=r0, flux=float(src.gal_flux[i]), trunc=trunc)
    return prof.shear(q=q, beta=float(src.gal_theta_rad[i]) * galsim.radians)


def galsim_galaxies(image: Any, src: DetectorSources) -> None:
    import galsim

    psf = galsim.Moffat(beta=src.beta, fwhm=src.fwhm_px * src.pixel_scale_arcsec)
    halves = galaxy_stamp_half(src)
    for i in range(src.gal_x.size):
        obj = galsim.Convolve(galsim_sersic(src, i), psf)
        galsim_add(image, obj, float(src.gal_x[i]), float(src.gal_y[i]), int(halves[i]))


def galsim_noise(image: Any, src: DetectorSources, seed: int) -> None:
    """Sky, Poisson noise and read noise, in place (electrons)."""
    import galsim

    rng = galsim.BaseDeviate(seed)
    image += src.sky_e
    image.addNoise(galsim.PoissonNoise(rng))
    image.addNoise(galsim.GaussianNoise(rng, sigma=src.read_noise_e))


def run_galsim_detector(galaxy_step: int, repeats: int) -> dict[str, Any]:
    """Time GalSim on the sources of SCA01: stars, galaxies, noise; keep one image."""
    import galsim

    src, _ = detector_sources(COMPARE_INDEX, galaxy_step)
    ny, nx = src.shape

    def blank() -> Any:
        return galsim.ImageF(nx, ny, scale=src.pixel_scale_arcsec)

    stars, galaxies, noise = [], [], []
    image = blank()
    for r in range(repeats):
        image = blank()
        t0 = time.perf_counter()
        galsim_stars(image, src)
        t1 = time.perf_counter()
        galsim_galaxies(image, src)
        t2 = time.perf_counter()
        noiseless = image.array.copy() if r == 0 else None
        galsim_noise(image, src, seed=r + 1)
        t3 = time.perf_counter()
        stars.append(t1 - t0)
        galaxies.append(t2 - t1)
        noise.append(t3 - t2)
        if noiseless is not None:
            np.save(os.environ["LAZYSKY_BENCH_LIGHT"], noiseless)
    total = [a + b + c for a, b, c in zip(stars, galaxies, noise, strict=True)]
    return {
        "galsim_version": galsim.__version__,
        "n_stars": src.star_x.size,
        "n_galaxies": src.gal_x.size,
        "stars_s": statistics.median(stars),
        "galaxies_s": statistics.median(galaxies),
        "noise_s": statistics.median(noise),
        "total_s": statistics.median(total),
        "total_times": total,
        **rusage_summary(),
    }


# --------------------------------------------------------------------------------------
# Agreement of the two noiseless images
# --------------------------------------------------------------------------------------


def isolated_brightest(
    src: DetectorSources, x: FloatArray, y: FloatArray, flux: FloatArray, n: int
) -> NDArray[np.int64]:
    """Indices of the ``n`` brightest of (x, y, flux) away from the edges, with no other
    source (star or drawn galaxy) above 0.1 % of their flux within ``ISOLATION_PX``."""
    ny, nx = src.shape
    xs = np.concatenate([src.star_x, src.gal_x])
    ys = np.concatenate([src.star_y, src.gal_y])
    fs = np.concatenate([src.star_flux, src.gal_flux])
    chosen: list[int] = []
    edge = ISOLATION_PX + APERTURE_PX
    for i in np.argsort(-flux):
        if not (edge < x[i] < nx - 1 - edge and edge < y[i] < ny - 1 - edge):
            continue
        near = np.hypot(xs - x[i], ys - y[i]) < ISOLATION_PX
        if np.count_nonzero(near & (fs > 1e-3 * flux[i])) == 1:  # itself only
            chosen.append(int(i))
        if len(chosen) == n:
            break
    return np.asarray(chosen, dtype=np.int64)


def aperture_sum(image: NDArray[np.floating[Any]], x: float, y: float, r: float) -> float:
    """Sum of the pixels whose centres are within ``r`` of (x, y) (0-based)."""
    y0, x0 = math.floor(y - r), math.floor(x - r)
    cut = image[y0 : y0 + 2 * math.ceil(r) + 2, x0 : x0 + 2 * math.ceil(r) + 2]
    yy, xx = np.mgrid[y0 : y0 + cut.shape[0], x0 : x0 + cut.shape[1]]
    return float(cut[(xx - x) ** 2 + (yy - y) ** 2 <= r * r].sum())


def aperture_ratios(
    lazy: NDArray[np.float32],
    gs: NDArray[np.float32],
    x: FloatArray,
    y: FloatArray,
    which: NDArray[np.int64],
    radius_px: float,
) -> dict[str, float]:
    """Median, min and max of GalSim ÷ lazysky aperture sums of sources ``which``."""
    ratios = [
        aperture_sum(gs, x[i], y[i], radius_px) / aperture_sum(lazy, x[i], y[i], radius_px)
        for i in which
    ]
    return {
        "n": len(ratios),
        "radius_px": radius_px,
        "median": float(np.median(ratios)),
        "min": float(np.min(ratios)),
        "max": float(np.max(ratios)),
    }


def agreement(lazy: NDArray[np.float32], gs: NDArray[np.float32], galaxy_step: int) -> dict:
    """GalSim ÷ lazysky: total flux, apertures of isolated bright stars and galaxy cores."""
    src, _ = detector_sources(COMPARE_INDEX, galaxy_step)
    stars = isolated_brightest(src, src.star_x, src.star_y, src.star_flux, 20)
    gals = isolated_brightest(src, src.gal_x, src.gal_y, src.gal_flux, 20)
    total_gs, total_lazy = gs.sum(dtype=np.float64), lazy.sum(dtype=np.float64)
    return {
        "total_flux_lazysky_e": float(total_lazy),
        "total_flux_galsim_e": float(total_gs),
        "total_flux_ratio": float(total_gs / total_lazy),
        "stars": aperture_ratios(lazy, gs, src.star_x, src.star_y, stars, APERTURE_PX),
        "galaxy_cores": aperture_ratios(lazy, gs, src.gal_x, src.gal_y, gals, GALAXY_CORE_PX),
    }


# --------------------------------------------------------------------------------------
# Parent: run every configuration in its own process, print the table
# --------------------------------------------------------------------------------------


def run_child(task: dict[str, Any], *, single_core: bool, light_path: str = "") -> dict:
    """Run ``task`` in a fresh interpreter (fresh peak RSS); return its JSON answer."""
    env = {**os.environ, "LAZYSKY_BENCH_LIGHT": light_path}
    if single_core:
        env.update(SINGLE_CORE_ENV)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(task)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        msg = f"benchmark step {task} failed:\n{proc.stderr[-3000:]}"
        raise RuntimeError(msg)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def child_main(task: dict[str, Any]) -> None:
    if task["kind"] == "survey":
        result = run_survey(task["scheduler"], task["n_detectors"])
    elif task["kind"] == "lazysky-detector":
        result = run_lazysky_detector(task["galaxy_step"], task["repeats"])
    else:
        result = run_galsim_detector(task["galaxy_step"], task["repeats"])
    print(json.dumps(result))


@dataclass
class Row:
    """One line of the results table."""

    configuration: str
    detectors: int
    mpix: float
    wall_s: float
    s_per_mpix: float
    peak_rss_mib: float
    peak_tree_rss_mib: float | None
    repeats: int
    times_s: list[float]
    vs_galsim: float | None = None
    scheduler: str = ""
    cpu_s: float | None = None
    runs: list[dict[str, Any]] | None = None  # every child's raw answer (faults, CPU, RSS)


def scheduler_rows(schedulers: list[str], n_det: int, repeats: int) -> list[Row]:
    """Every scheduler ``repeats`` times, interleaved so load drifts hit all alike."""
    runs: dict[str, list[dict]] = {s: [] for s in schedulers}
    for _ in range(repeats):
        for s in schedulers:
            task = {"kind": "survey", "scheduler": s, "n_detectors": n_det}
            runs[s].append(run_child(task, single_core=False))
            r = runs[s][-1]
            print(
                f"  {s:9s} {r['wall_s']:7.1f} s  (CPU user {r['cpu_user_s']:.0f} s, "
                f"sys {r['cpu_sys_s']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    mpix = n_det * DETECTOR_PX / 1e6
    rows = []
    for s, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        rows.append(
            Row(
                configuration=f"lazysky simulate_survey, {s}",
                detectors=n_det,
                mpix=mpix,
                wall_s=wall,
                s_per_mpix=wall / mpix,
                peak_rss_mib=max(r["rss_mib"] for r in rs),
                peak_tree_rss_mib=max(r["rss_tree_mib"] for r in rs),
                repeats=len(rs),
                times_s=[r["wall_s"] for r in rs],
                scheduler=s,
                cpu_s=statistics.median(r["cpu_user_s"] + r["cpu_sys_s"] for r in rs),
                runs=rs,
            )
        )
    return rows


def compare_with_galsim(galaxy_step: int, repeats: int) -> dict[str, Any]:
    """lazysky and GalSim on SCA01 (one core each), and the agreement of their images."""
    with tempfile.TemporaryDirectory(prefix="lazysky-bench-") as tmp:
        lazy_path, gs_path = os.path.join(tmp, "lazy.npy"), os.path.join(tmp, "gs.npy")
        task = {"galaxy_step": galaxy_step, "repeats": repeats}
        lazy = run_child(
            {"kind": "lazysky-detector", **task}, single_core=True, light_path=lazy_path
        )
        print(f"  lazysky render_detector {lazy['render_s']:.1f} s", file=sys.stderr)
        gs = run_child({"kind": "galsim-detector", **task}, single_core=True, light_path=gs_path)
        print(f"  GalSim {gs['total_s']:.1f} s", file=sys.stderr)
        agree = agreement(np.load(lazy_path), np.load(gs_path), galaxy_step)
    return {"lazysky": lazy, "galsim": gs, "agreement": agree, "galaxy_step": galaxy_step}


def galsim_full_estimate(cmp: dict[str, Any]) -> float:
    """GalSim seconds for all of SCA01 (scaled from the per-galaxy cost if thinned)."""
    gs, step = cmp["galsim"], cmp["galaxy_step"]
    return float(gs["stars_s"] + gs["galaxies_s"] * step + gs["noise_s"])


def detector_rows(cmp: dict[str, Any]) -> list[Row]:
    lazy, gs = cmp["lazysky"], cmp["galsim"]
    mpix = DETECTOR_PX / 1e6
    galsim_s = galsim_full_estimate(cmp)
    star = "" if cmp["galaxy_step"] == 1 else " *"
    return [
        Row(
            "lazysky render_detector SCA01, 1 core",
            1,
            mpix,
            lazy["render_s"],
            lazy["render_s"] / mpix,
            lazy["rss_mib"],
            None,
            len(lazy["render_times"]),
            lazy["render_times"],
            vs_galsim=lazy["render_s"] / galsim_s,
        ),
        Row(
            "GalSim SCA01 same sources + noise, 1 core" + star,
            1,
            mpix,
            galsim_s,
            galsim_s / mpix,
            gs["rss_mib"],
            None,
            len(gs["total_times"]),
            gs["total_times"],
            vs_galsim=1.0,
        ),
    ]


def format_rows(rows: list[Row]) -> str:
    head = (
        f"{'configuration':<44} {'det':>3} {'Mpix':>6} {'wall s':>7} {'s/Mpix':>7} {'CPU s':>6} "
        f"{'RSS MiB':>8} {'tree MiB':>8} {'n':>2} {'÷GalSim':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        tree = f"{r.peak_tree_rss_mib:8.0f}" if r.peak_tree_rss_mib is not None else " " * 8
        ratio = f"{r.vs_galsim:8.3f}" if r.vs_galsim is not None else " " * 8
        cpu = f"{r.cpu_s:6.0f}" if r.cpu_s is not None else " " * 6
        lines.append(
            f"{r.configuration:<44} {r.detectors:>3} {r.mpix:6.1f} {r.wall_s:7.1f} "
            f"{r.s_per_mpix:7.3f} {cpu} {r.peak_rss_mib:8.0f} {tree} {r.repeats:>2} {ratio}"
        )
    return "\n".join(lines)


def format_costs(cmp: dict[str, Any]) -> str:
    lazy, gs = cmp["lazysky"], cmp["galsim"]
    n_s, n_g = gs["n_stars"], gs["n_galaxies"]
    lines = [
        f"per-object cost on SCA01 ({n_s} stars, {n_g} galaxies drawn; "
        f"GalSim {gs['galsim_version']}, medians of {len(gs['total_times'])}):",
        f"  {'stage':<28} {'lazysky':>12} {'GalSim':>12} {'GalSim ÷ lazysky':>17}",
    ]
    for label, key, n in (
        ("star (Moffat)", "stars_s", n_s),
        ("galaxy (Sérsic ⊗ PSF)", "galaxies_s", n_g),
    ):
        a, b = 1e3 * lazy[key] / max(n, 1), 1e3 * gs[key] / max(n, 1)
        lines.append(f"  {label:<28} {a:9.3f} ms {b:9.3f} ms {b / a:16.0f}×")
    lines.append(f"  {'sky + Poisson + read noise':<28} {'':>12} {gs['noise_s']:10.2f} s")
    return "\n".join(lines)


def format_agreement(agree: dict[str, Any]) -> str:
    lines = [
        "agreement of the noiseless images (GalSim ÷ lazysky):",
        f"  total flux: {agree['total_flux_ratio']:.5f} "
        f"({agree['total_flux_galsim_e']:.4e} / {agree['total_flux_lazysky_e']:.4e} e-)",
    ]
    for key, label in (("stars", "stars"), ("galaxy_cores", "galaxies, core")):
        r = agree[key]
        lines.append(
            f"  {r['n']} brightest isolated {label}, r = {r['radius_px']:g} px: median "
            f"{r['median']:.5f} (range {r['min']:.5f} … {r['max']:.5f})"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import dask

    import lazysky

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "load_avg_start": os.getloadavg(),
        "python": platform.python_version(),
        "lazysky": lazysky.__version__,
        "numpy": np.__version__,
        "dask": dask.__version__,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--detectors", type=int, default=None, help="use SCA01…SCAnn (default 18)")
    ap.add_argument(
        "--quick", action="store_true", help="2 detectors, GalSim on every 10th galaxy, 3 repeats"
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="runs per scheduler (default 1; 3 with --quick)"
    )
    ap.add_argument("--schedulers", default=",".join(SCHEDULERS), help="comma-separated")
    ap.add_argument(
        "--galaxy-step",
        type=int,
        default=None,
        help="GalSim draws every n-th galaxy (default 1; 10 with --quick)",
    )
    ap.add_argument("--no-galsim", action="store_true", help="skip the GalSim comparison")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n_default = 2 if args.quick else N_ROMAN_DETECTORS
    args.detectors = args.detectors or n_default
    if not 1 <= args.detectors <= N_ROMAN_DETECTORS:
        ap.error(f"--detectors must be 1…{N_ROMAN_DETECTORS}, got {args.detectors}")
    args.repeats = args.repeats or (3 if args.quick else 1)
    args.galaxy_step = args.galaxy_step or (10 if args.quick else 1)
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    unknown = sorted(set(schedulers) - set(SCHEDULERS))
    if unknown:
        ap.error(f"unknown scheduler(s) {unknown}; choose from {list(SCHEDULERS)}")
    args.schedulers = schedulers
    return args


def have_galsim() -> bool:
    try:
        import galsim  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    command = "python benchmarks/bench_simulator.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    info = machine()
    print(f"command: {command.strip()}\nmachine: {json.dumps(info)}", flush=True)
    print(
        f"full exposure, {args.detectors} detector(s), {args.repeats} run(s) per scheduler:",
        file=sys.stderr,
    )
    rows = scheduler_rows(args.schedulers, args.detectors, args.repeats)
    cmp: dict[str, Any] | None = None
    if args.no_galsim or not have_galsim():
        print("GalSim comparison skipped (--no-galsim, or `pip install galsim`)")
    else:
        print("SCA01, lazysky vs GalSim, 1 core each, 3 runs:", file=sys.stderr)
        cmp = compare_with_galsim(args.galaxy_step, repeats=3)
        galsim_s_per_mpix = galsim_full_estimate(cmp) / (DETECTOR_PX / 1e6)
        for r in rows:
            r.vs_galsim = r.s_per_mpix / galsim_s_per_mpix
        rows += detector_rows(cmp)
    info["load_avg_end"] = os.getloadavg()
    print()
    print(format_rows(rows))
    print(
        "(CPU s: user + sys of the run and its children, imports included; RSS MiB: ru_maxrss "
        "of the run + its largest child; tree MiB: sampled peak of the whole process tree; "
        "÷GalSim: s/Mpix ÷ GalSim's s/Mpix on SCA01, < 1 = faster)"
    )
    if cmp is not None and cmp["galaxy_step"] > 1:
        print(
            f"* GalSim drew every {cmp['galaxy_step']}th galaxy; its time for all of them is "
            "extrapolated from the per-galaxy cost"
        )
    fastest = min((r for r in rows if r.scheduler), key=lambda r: r.wall_s)
    print(f"fastest scheduler by median wall time: {fastest.scheduler} ({os.cpu_count()} cores)")
    if cmp is not None:
        print()
        print(format_costs(cmp))
        if "same_as_render_detector" in cmp["lazysky"]:
            print(
                f"  lazysky kernels drew the same image as render_detector: "
                f"{cmp['lazysky']['same_as_render_detector']}"
            )
        print(format_agreement(cmp["agreement"]))
    print(f"load average at start {info['load_avg_start']}, at end {info['load_avg_end']}")
    if args.json:
        doc = {
            "command": command,
            "machine": info,
            "rows": [asdict(r) for r in rows],
            "galsim_comparison": cmp,
        }
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()

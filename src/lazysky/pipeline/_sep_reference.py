"""Source Extractor, configured like :func:`lazysky.pipeline.detect`: the reference that the
detection tests and ``benchmarks/bench_detect.py`` compare against.

Same threshold (our filtered-image S/N ``t`` is Source Extractor's per-pixel
``DETECT_THRESH = t · sqrt(Σk²) / Σk`` on the same filter ``k``), same minimum area,
deblending and cleaning, our variance plane as ``WEIGHT_TYPE MAP_VAR``, the sky taken as
already subtracted (``BACK_TYPE MANUAL``, 0).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from numpy.typing import NDArray

from lazysky.errors import ParameterError
from lazysky.pipeline._sep import DEFAULT_KERNEL

__all__ = ["find_source_extractor", "run_source_extractor", "sextractor_threshold"]

_PARAMS = ("NUMBER", "X_IMAGE", "Y_IMAGE", "ALPHA_J2000", "DELTA_J2000", "FLUX_AUTO",
           "FLUXERR_AUTO", "FLUX_APER", "FLUXERR_APER", "FLAGS")  # fmt: skip


def find_source_extractor() -> str | None:
    """Path of ``source-extractor`` (or ``sex``), None when not installed."""
    return shutil.which("source-extractor") or shutil.which("sex")


def sextractor_threshold(threshold: float, kernel: NDArray[Any] = DEFAULT_KERNEL) -> float:
    """Source Extractor's DETECT_THRESH equivalent to our ``threshold`` (filtered S/N).

    Examples
    --------
    >>> sextractor_threshold(5.0)
    1.875
    """
    k = np.asarray(kernel, dtype=float)
    return float(threshold * math.sqrt(float((k**2).sum())) / float(k.sum()))


def run_source_extractor(
    image: str | os.PathLike[str],
    *,
    variance: str | os.PathLike[str] | None = None,
    threshold: float = 5.0,
    min_area: int = 5,
    aperture_radius_px: float = 4.0,
    kernel: NDArray[Any] = DEFAULT_KERNEL,
    subtract_background: bool = False,
    workdir: str | os.PathLike[str] | None = None,
) -> Table:
    """Run Source Extractor on a FITS image (HDU 0); 0-based ``x``, ``y`` like ours.

    ``variance``: a FITS variance image (``inf``/NaN pixels must already be replaced by a
    huge value, see :func:`write_variance_for_sextractor`); without it Source Extractor
    measures the noise itself. ``subtract_background``: its own 64-px mesh background
    (like ``detect_pixels(subtract_background=True)``), else the sky is taken as 0.
    """
    exe = find_source_extractor()
    if exe is None:
        msg = "Source Extractor (source-extractor) is not installed"
        raise ParameterError(msg)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        d = Path(tmp)
        (d / "p.param").write_text("\n".join(_PARAMS) + "\n")
        k = np.asarray(kernel, dtype=float)
        rows = "\n".join(" ".join(f"{v:g}" for v in r) for r in k)
        (d / "k.conv").write_text(f"CONV NORM\n{rows}\n")
        (d / "empty.sex").write_text("")
        t = sextractor_threshold(threshold, k)
        args = [exe, str(image), "-c", str(d / "empty.sex"),
                "-CATALOG_NAME", str(d / "out.cat"), "-CATALOG_TYPE", "ASCII_HEAD",
                "-PARAMETERS_NAME", str(d / "p.param"),
                "-DETECT_THRESH", f"{t:.6f}", "-ANALYSIS_THRESH", f"{t:.6f}",
                "-DETECT_MINAREA", str(int(min_area)), "-FILTER", "Y",
                "-FILTER_NAME", str(d / "k.conv"), "-DEBLEND_NTHRESH", "32",
                "-DEBLEND_MINCONT", "0.005", "-CLEAN", "Y", "-CLEAN_PARAM", "1.0",
                "-PHOT_AUTOPARAMS", "2.5,3.5", "-PHOT_APERTURES", f"{2 * aperture_radius_px:g}",
                "-CHECKIMAGE_TYPE", "NONE",
                "-MEMORY_PIXSTACK", "3000000", "-MEMORY_OBJSTACK", "30000",
                "-VERBOSE_TYPE", "QUIET", "-NTHREADS", "1"]  # fmt: skip
        if subtract_background:
            args += ["-BACK_TYPE", "AUTO", "-BACK_SIZE", "64", "-BACK_FILTERSIZE", "3"]
        else:
            args += ["-BACK_TYPE", "MANUAL", "-BACK_VALUE", "0.0"]
        if variance is not None:
            args += ["-WEIGHT_TYPE", "MAP_VAR", "-WEIGHT_IMAGE", str(variance),
                     "-WEIGHT_THRESH", "1e29"]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, cwd=d, check=False)
        if done.returncode != 0:
            msg = f"source-extractor failed ({done.returncode}): {done.stderr[-500:]}"
            raise ParameterError(msg)
        cat = Table.read(d / "out.cat", format="ascii.sextractor")
    cat["x"] = np.asarray(cat["X_IMAGE"], dtype=float) - 1.0
    cat["y"] = np.asarray(cat["Y_IMAGE"], dtype=float) - 1.0
    return cat


def write_variance_for_sextractor(variance: NDArray[Any], path: str | os.PathLike[str],
                                  header: fits.Header | None = None) -> Path:  # fmt: skip
    """Write a variance plane with non-finite/non-positive pixels set to 1e30 (> WEIGHT_THRESH)."""
    v = np.array(variance, dtype=np.float32)
    v[~(np.isfinite(v) & (v > 0))] = 1e30
    fits.PrimaryHDU(v, header=header).writeto(path, overwrite=True)
    return Path(path)

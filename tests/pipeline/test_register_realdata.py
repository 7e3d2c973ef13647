"""The five M13 frames (no WCS at all) registered by their stars and coadded by the CLI.

The frames are 5 s exposures, defocused (stars are ~12 px rings) and faint (the brightest
isolated stars have S/N ~15): a single star's centroid is uncertain to ~1 px, so the
per-star residual rms is ~1.5–2 px, while the transform (fitted to 15–25 stars) places
each frame to ~0.3–0.5 px (``centre_error_px``). The coadd is measured against the
reference frame put through the same command: aperture S/N with the noise measured in
blank-sky apertures (resampling correlates the noise, so the per-pixel variance would
flatter the coadd), and the half-light radius of the same stars (registration errors
would blur them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from lazysky.cli import main
from lazysky.pipeline.register import find_stars, register_frames

REAL_DATA = Path(  # as tests/conftest.py (not importable: tests/ is not a package)
    os.environ.get("LAZYSKY_REAL_DATA", Path(__file__).parents[2] / ".." / "shared/data/real")
)
pytestmark = pytest.mark.realdata
FRAMES = [REAL_DATA / f"M13_blue_000{k}.fits" for k in range(1, 6)]


@pytest.fixture(scope="module")
def m13() -> list[np.ndarray]:
    if not all(p.is_file() for p in FRAMES):
        pytest.skip(f"the M13 frames are not in {REAL_DATA}")
    return [fits.getdata(p).astype(np.float32) for p in FRAMES]


def test_all_five_register(m13: list[np.ndarray]) -> None:
    regs = register_frames(m13, names=[p.name for p in FRAMES])
    for r in regs[1:]:
        shift = r.apply(695.5, 519.5)
        print(f"{r.name}: {r.n_matched} stars, rms {r.rms_px:.2f} px, centre error "
              f"{r.centre_error_px:.2f} px, centre -> {np.round(shift, 2)}")  # fmt: skip
        assert r.n_matched >= 12
        assert r.rms_px < 2.5
        assert r.centre_error_px < 0.6
        # frames of one camera: no scale change, hardly any rotation
        scale = float(np.sqrt(abs(np.linalg.det(r.matrix))))
        assert scale == pytest.approx(1.0, abs=0.005)
    # the frames drift along x by ~11 px per exposure
    xs = [r.apply(695.5, 519.5)[0] - 695.5 for r in regs]
    assert np.all(np.diff(xs) > 5)


def _measure(path: Path, radec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aperture S/N (noise from blank-sky apertures) and half-light radius at ``radec``."""
    import sep

    with fits.open(path) as hdul:
        img = np.ascontiguousarray(hdul[0].data, dtype=np.float32)
        wcs = WCS(hdul[0].header)
        count = hdul["COUNT"].data
    x, y = wcs.world_to_pixel_values(radec[:, 0], radec[:, 1])
    r_ap = 8.0
    flux, _, _ = sep.sum_circle(img, x, y, r_ap, bkgann=(14.0, 20.0))
    rng = np.random.default_rng(3)
    full = count == count.max()
    sky_y, sky_x = np.nonzero(full[30:-30, 30:-30])
    pick = rng.choice(len(sky_x), 400, replace=False)
    bx, by = sky_x[pick] + 30.0, sky_y[pick] + 30.0
    stars = find_stars(img, threshold_sigma=2.0)
    far = np.min(np.hypot(bx[:, None] - stars[:, 0], by[:, None] - stars[:, 1]), axis=1) > 25
    blank, _, _ = sep.sum_circle(img, bx[far], by[far], r_ap, bkgann=(14.0, 20.0))
    noise = 1.4826 * np.median(np.abs(blank - np.median(blank)))
    r50, _ = sep.flux_radius(img, x, y, np.full(len(x), 15.0), 0.5, subpix=5)
    return flux / noise, r50


def test_cli_coadd_is_deeper_and_as_sharp(m13: list[np.ndarray], tmp_path: Path) -> None:
    coadd, single = tmp_path / "coadd.fits", tmp_path / "single.fits"
    assert main(["coadd", *map(str, FRAMES), "--out", str(coadd), "--register", "stars"]) == 0
    assert main(["coadd", str(FRAMES[0]), "--out", str(single), "--register", "stars"]) == 0
    with fits.open(coadd) as hdul:
        h = hdul[0].header
        assert h["REGISTER"] == "stars"
        assert h["WCSNAME"] == "lazysky pseudo-celestial"
        assert int(np.max(hdul["COUNT"].data)) == 5
    with fits.open(single) as hdul:
        img = np.ascontiguousarray(hdul[0].data, dtype=np.float32)
        wcs = WCS(hdul[0].header)
    stars = find_stars(img)[:40]
    ny, nx = img.shape
    inner = (
        (stars[:, 0] > 40) & (stars[:, 0] < nx - 40) & (stars[:, 1] > 40) & (stars[:, 1] < ny - 40)
    )
    radec = np.column_stack(wcs.pixel_to_world_values(stars[inner, 0], stars[inner, 1]))
    snr_1, r50_1 = _measure(single, radec)
    snr_5, r50_5 = _measure(coadd, radec)
    good = (snr_1 > 5) & np.isfinite(r50_1) & np.isfinite(r50_5) & (r50_1 > 0)
    gain = float(np.median(snr_5[good] / snr_1[good]))
    blur = float(np.median(r50_5[good] / r50_1[good]))
    print(f"{good.sum()} stars: S/N coadd/single median {gain:.2f} (sqrt(5) = 2.24); "
          f"half-light radius ratio {blur:.3f}")  # fmt: skip
    assert good.sum() >= 10
    assert gain > 1.6
    assert blur < 1.15

"""One detector: its fixed properties (gain, flat, dark, bias, defects) and a raw readout.

The fixed properties are drawn from the instrument's ``defect_seed`` and the detector's
index, never from a survey's seed: the same camera has the same hot pixels, bad columns
and flat field in every survey, so calibrations carry over between surveys.

Examples
--------
>>> from lazysky.simulator import load_instrument
>>> from lazysky.simulator.detector import detector_model
>>> model = detector_model(load_instrument("tiny"), 0)
>>> model.flat.shape, round(float(model.flat.mean()), 1)
((256, 256), 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from lazysky.simulator.instruments import Instrument
from lazysky.simulator.render import (
    CosmicRays,
    add_cosmic_rays,
    bleed_saturation,
    make_cosmic_rays,
)

__all__ = ["DetectorModel", "RawReadout", "detector_model", "read_out"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class DetectorModel:
    """Fixed properties of one detector.

    ``flat`` (active area) is the true relative response: vignetting × pixel response ×
    bad columns, normalised so its mean over the whole mosaic is 1. ``dark_e_per_s``
    includes hot pixels and hot columns; ``bias_adu`` covers the raw array, overscan
    included, with its row gradient and fixed pattern.
    """

    index: int
    name: str
    gain: float
    read_noise_e: float
    bias_adu: NDArray[np.float32]
    flat: NDArray[np.float32]
    dark_e_per_s: NDArray[np.float32]
    hot_pixels: NDArray[np.bool_]
    bad_columns: tuple[int, ...]
    saturate_adu: float
    """Digital saturation (ADU): charge at full well reads exactly this; SATURATE."""


def _vignetting_norm(inst: Instrument) -> float:
    """Mean of 1 − v r²/R² over every detector pixel of the mosaic (exact)."""
    ny, nx = inst.detector_shape
    r_max = inst.field_radius_px
    total = 0.0
    for d in inst.detectors:
        ax, bx = d.x0 - 0.5, d.x0 + nx - 0.5
        ay, by = d.y0 - 0.5, d.y0 + ny - 0.5
        mean_x2 = (bx**3 - ax**3) / (3 * (bx - ax))
        mean_y2 = (by**3 - ay**3) / (3 * (by - ay))
        total += 1.0 - inst.vignetting * (mean_x2 + mean_y2) / r_max**2
    return total / inst.n_detectors


def detector_model(inst: Instrument, index: int) -> DetectorModel:
    """The fixed properties of detector ``index`` of ``inst`` (deterministic)."""
    det = inst.detectors[index]
    rng = np.random.default_rng(np.random.SeedSequence([inst.defect_seed, index]))
    ny, nx = inst.detector_shape
    rny, rnx = inst.raw_shape
    gain = inst.gain_e_per_adu * (1.0 + 0.03 * float(rng.standard_normal()))
    read_noise = inst.read_noise_e * (1.0 + 0.05 * float(rng.standard_normal()))

    # Flat: vignetting across the focal plane, a gentle QE tilt, pixel response
    # (rows and columns broadcast: no full-size coordinate grids).
    xs = np.arange(nx, dtype=np.float32)[None, :]
    ys = np.arange(ny, dtype=np.float32)[:, None]
    r2 = ((xs + det.x0) ** 2 + (ys + det.y0) ** 2) / np.float32(inst.field_radius_px**2)
    vig = (1.0 - inst.vignetting * r2) / np.float32(_vignetting_norm(inst))
    tx, ty = rng.uniform(-1, 1, 2)
    tilt = (1.0 + 0.01 * (tx * (xs / nx - 0.5) + ty * (ys / ny - 0.5))).astype(np.float32)
    flat = rng.standard_normal((ny, nx), dtype=np.float32)
    flat *= np.float32(inst.prnu_sigma)
    flat += np.float32(1.0)
    flat *= vig.astype(np.float32)
    flat *= tilt

    dark = np.full((ny, nx), inst.dark_e_per_s, dtype=np.float32)
    hot = np.zeros((ny, nx), dtype=bool)
    hot.flat[rng.integers(0, ny * nx, int(rng.binomial(ny * nx, inst.hot_pixel_fraction)))] = True
    n_hot = int(hot.sum())
    dark[hot] += (inst.hot_pixel_dark_e_per_s * rng.lognormal(0.0, 0.8, n_hot)).astype(np.float32)
    bad_cols = tuple(int(c) for c in rng.choice(nx, size=inst.bad_columns, replace=False))
    for k, col in enumerate(bad_cols):
        start = int(rng.integers(0, ny // 2))
        if k % 2 == 0:  # a dead (low-response) column from a charge trap upwards
            flat[start:, col] *= 0.05
        else:  # a hot column
            dark[start:, col] += inst.hot_pixel_dark_e_per_s

    level = inst.bias_adu + 15.0 * float(rng.standard_normal())
    row_gradient = np.linspace(0.0, 2.0, rny, dtype=np.float32)[:, None]
    bias = rng.standard_normal((rny, rnx), dtype=np.float32)
    bias *= np.float32(0.6)  # fixed pattern
    bias += row_gradient + np.float32(level)
    saturate = float(min(65535.0, np.floor(level + inst.full_well_e / gain)))
    return DetectorModel(
        index=index,
        name=det.name,
        gain=gain,
        read_noise_e=read_noise,
        bias_adu=bias,
        flat=flat,
        dark_e_per_s=dark,
        hot_pixels=hot,
        bad_columns=bad_cols,
        saturate_adu=saturate,
    )


@dataclass(frozen=True)
class RawReadout:
    """A raw detector array (ADU) and the truth of what happened on it."""

    data: NDArray[np.uint16]
    cosmic_rays: CosmicRays
    saturated: NDArray[np.bool_]


def read_out(
    inst: Instrument,
    model: DetectorModel,
    light_e: FloatArray | None,
    *,
    exptime_s: float,
    rng: np.random.Generator,
    cosmic_rays: bool = True,
) -> RawReadout:
    """Expose and read out a detector.

    ``light_e`` is the expected charge from the sky and sources (electrons, before the
    flat field; None for a bias or dark). The flat field and dark current apply, then
    Poisson noise, cosmic rays, full-well clipping with bleeding along columns, read noise,
    gain and bias; overscan columns get bias and read noise only.
    """
    ny, nx = inst.detector_shape
    expected = model.dark_e_per_s.astype(np.float64) * exptime_s
    if light_e is not None:
        expected += light_e * model.flat
    electrons = rng.poisson(expected).astype(np.float64)
    area_cm2 = ny * nx * (inst.pixel_size_um * 1e-4) ** 2
    n_hits = (
        int(rng.poisson(inst.cosmic_ray_rate_per_cm2_s * area_cm2 * exptime_s))
        if cosmic_rays
        else 0
    )
    rays = make_cosmic_rays(
        rng,
        (ny, nx),
        n_hits,
        track_mean_px=inst.cosmic_ray_track_mean_px,
        electrons_median=inst.cosmic_ray_electrons_median,
    )
    add_cosmic_rays(electrons, rays)
    saturated = bleed_saturation(electrons, inst.full_well_e)

    raw = model.bias_adu.astype(np.float64) + 1.5 * float(rng.standard_normal())  # bias drift
    raw[:, :nx] += electrons / model.gain
    raw += rng.normal(0.0, model.read_noise_e / model.gain, raw.shape)
    raw = np.clip(np.rint(raw), 0, model.saturate_adu)
    raw[:, :nx][saturated] = model.saturate_adu  # the ADC tops out: flat-topped stars
    data = raw.astype(np.uint16)
    return RawReadout(data=data, cosmic_rays=rays, saturated=saturated)

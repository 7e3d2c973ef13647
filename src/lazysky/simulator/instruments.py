"""Instruments as data: cameras described by YAML files, not by code paths.

The packaged instruments live in ``lazysky/simulator/instruments/*.yaml``:

- ``roman``: a Roman-WFI-like near-infrared mosaic (18 × 4088², 0.11″/px);
- ``ccdmosaic``: a ground-based optical CCD mosaic (8 × 2048 × 4096, 0.26″/px, overscan);
- ``tiny``: a 2 × 2 mosaic of 256² CCDs for fast tests.

Any YAML file with the same fields describes a new camera: ``load_instrument("my.yaml")``.

Examples
--------
>>> from lazysky.simulator import load_instrument
>>> inst = load_instrument("tiny")
>>> inst.n_detectors, inst.detectors[0].name
(4, 'CCD01')
"""

from __future__ import annotations

import math
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lazysky.errors import ParameterError

__all__ = ["DetectorPlacement", "FilterBand", "Instrument", "list_instruments", "load_instrument"]


class FilterBand(BaseModel):
    """Photometric calibration of one filter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    zeropoint_mag: float = Field(description="Magnitude of a source giving 1 e-/s in total.")
    sky_mag_per_arcsec2: float = Field(description="Sky surface brightness (mag/arcsec²).")


class Layout(BaseModel):
    """Detectors on a regular grid, optionally with columns shifted vertically."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: tuple[int, int] = Field(description="(columns, rows) of detectors.")
    gap_px: tuple[float, float] = Field(description="Gaps between detectors (x, y), pixels.")
    column_offsets_px: tuple[float, ...] | None = Field(
        None, description="Vertical shift of each column (a staggered focal plane)."
    )

    @model_validator(mode="after")
    def _check(self) -> Layout:
        if min(self.grid) < 1:
            msg = f"layout.grid must be two positive integers, got {self.grid}"
            raise ValueError(msg)
        if self.column_offsets_px is not None and len(self.column_offsets_px) != self.grid[0]:
            msg = (
                f"layout.column_offsets_px needs one value per column ({self.grid[0]}), "
                f"got {len(self.column_offsets_px)}"
            )
            raise ValueError(msg)
        return self


class DetectorPlacement(BaseModel):
    """Where one detector sits on the focal plane (pixel units, boresight at 0, 0)."""

    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    x0: float = Field(description="Focal-plane x of the detector's pixel (0, 0) centre.")
    y0: float = Field(description="Focal-plane y of the detector's pixel (0, 0) centre.")


class Instrument(BaseModel):
    """A camera: detectors, their layout, electronics, defects, optics and filters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    telescope: str
    description: str = ""
    kind: Literal["ground", "space"]
    pixel_scale_arcsec: float = Field(gt=0)
    pixel_size_um: float = Field(gt=0)
    detector_shape: tuple[int, int] = Field(description="(ny, nx) of the active area.")
    overscan_px: int = Field(0, ge=0, description="Overscan columns right of the data.")
    detector_prefix: str = "DET"
    layout: Layout
    gain_e_per_adu: float = Field(gt=0)
    read_noise_e: float = Field(ge=0)
    bias_adu: float = Field(ge=0)
    dark_e_per_s: float = Field(ge=0)
    full_well_e: float = Field(gt=0)
    hot_pixel_fraction: float = Field(ge=0, lt=1)
    hot_pixel_dark_e_per_s: float = Field(ge=0)
    bad_columns: int = Field(ge=0)
    prnu_sigma: float = Field(ge=0, lt=0.5)
    vignetting: float = Field(ge=0, lt=1, description="Fraction of light lost at the field edge.")
    cosmic_ray_rate_per_cm2_s: float = Field(ge=0)
    cosmic_ray_track_mean_px: float = Field(ge=0)
    cosmic_ray_electrons_median: float = Field(gt=0)
    psf_beta: float = Field(gt=1.5, description="Moffat β of the PSF.")
    seeing_fwhm_arcsec: float = Field(gt=0, description="Median PSF FWHM.")
    seeing_scatter: float = Field(ge=0, description="Log-normal σ of the FWHM per exposure.")
    pointing_error_arcsec: float = Field(ge=0)
    dither_arcsec: float = Field(ge=0)
    default_exptime_s: float = Field(gt=0)
    default_filter: str
    filters: dict[str, FilterBand]
    defect_seed: int = Field(
        description="Seeds the detectors' fixed defects (same camera, same defects)."
    )

    @model_validator(mode="after")
    def _check(self) -> Instrument:
        if min(self.detector_shape) < 8:
            msg = f"detector_shape must be at least 8 x 8 pixels, got {self.detector_shape}"
            raise ValueError(msg)
        if self.default_filter not in self.filters:
            msg = (
                f"default_filter {self.default_filter!r} is not one of the filters "
                f"{sorted(self.filters)}"
            )
            raise ValueError(msg)
        return self

    @property
    def n_detectors(self) -> int:
        return self.layout.grid[0] * self.layout.grid[1]

    @property
    def raw_shape(self) -> tuple[int, int]:
        """(ny, nx) of a raw detector array, overscan included."""
        ny, nx = self.detector_shape
        return ny, nx + self.overscan_px

    @property
    def saturate_adu(self) -> float:
        """The SATURATE level in ADU: bias plus full well, or the 16-bit ceiling if lower."""
        return float(min(65535.0, self.bias_adu + self.full_well_e / self.gain_e_per_adu))

    @cached_property
    def detectors(self) -> tuple[DetectorPlacement, ...]:
        """The detectors, numbered row by row from the bottom left of the focal plane."""
        ncol, nrow = self.layout.grid
        ny, nx = self.detector_shape
        gx, gy = self.layout.gap_px
        offsets = self.layout.column_offsets_px or (0.0,) * ncol
        width = ncol * nx + (ncol - 1) * gx
        height = nrow * ny + (nrow - 1) * gy
        out = []
        for row in range(nrow):
            for col in range(ncol):
                i = row * ncol + col
                out.append(
                    DetectorPlacement(
                        index=i,
                        name=f"{self.detector_prefix}{i + 1:02d}",
                        x0=-width / 2 + col * (nx + gx) + 0.5,
                        y0=-height / 2 + row * (ny + gy) + offsets[col] - max(offsets) / 2 + 0.5,
                    )
                )
        return tuple(out)

    @property
    def field_radius_px(self) -> float:
        """Distance from the boresight to the farthest detector corner, in pixels."""
        ny, nx = self.detector_shape
        return max(
            math.hypot(d.x0 + cx, d.y0 + cy)
            for d in self.detectors
            for cx in (0, nx)
            for cy in (0, ny)
        )

    def detector(self, name: str) -> DetectorPlacement:
        """The detector called ``name``; a clear error lists the valid names."""
        for d in self.detectors:
            if d.name == name:
                return d
        msg = (
            f"instrument {self.name!r} has no detector {name!r}; "
            f"its detectors are {[d.name for d in self.detectors]}"
        )
        raise ParameterError(msg)

    def band(self, filter_name: str) -> FilterBand:
        """The calibration of ``filter_name``; a clear error lists the valid filters."""
        try:
            return self.filters[filter_name]
        except KeyError:
            msg = (
                f"instrument {self.name!r} has no filter {filter_name!r}; "
                f"choose one of {sorted(self.filters)}"
            )
            raise ParameterError(msg) from None

    def describe(self) -> str:
        """One line: detectors, shape, scale and kind."""
        ny, nx = self.detector_shape
        return (
            f'{self.n_detectors} x ({nx} x {ny}) px at {self.pixel_scale_arcsec}"/px, '
            f"{self.kind}, filters {', '.join(self.filters)} — {self.description}"
        )


def list_instruments() -> list[str]:
    """Names of the packaged instruments."""
    folder = resources.files("lazysky.simulator") / "instruments"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def load_instrument(name_or_path: str | Path | Instrument) -> Instrument:
    """Load a packaged instrument by name, or any instrument YAML file by path.

    Raises
    ------
    ParameterError
        Unknown name (the message lists the known ones), unreadable file, or a file
        whose fields are invalid (the message names the field).
    """
    if isinstance(name_or_path, Instrument):
        return name_or_path
    text: str
    source: str
    known = list_instruments()
    if str(name_or_path) in known:
        folder = resources.files("lazysky.simulator") / "instruments"
        text = (folder / f"{name_or_path}.yaml").read_text()
        source = f"packaged instrument {name_or_path!r}"
    else:
        path = Path(name_or_path)
        if path.suffix not in {".yaml", ".yml"} or not path.is_file():
            msg = (
                f"unknown instrument {str(name_or_path)!r}: choose one of {known} "
                "or give the path of an instrument YAML file"
            )
            raise ParameterError(msg)
        text = path.read_text()
        source = f"instrument file {str(path)!r}"
    try:
        data = yaml.safe_load(text)
        return Instrument.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        msg = f"invalid {source}: {exc}"
        raise ParameterError(msg) from None

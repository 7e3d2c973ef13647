"""A survey: a field revisited over epochs with dithers, its calibrations, and its truth.

:func:`simulate_survey` writes, under an output directory or fsspec URL::

    raw/<exposure_id>.fits            one multi-extension FITS per exposure
    raw/<exposure_id>.truth.ecsv      every source on a detector: id, kind, RA, Dec,
                                      detector, x, y (0-based px), flux_e, mag, saturated
    raw/<exposure_id>.cosmics.ecsv    every pixel a cosmic ray hit, with its charge (e-)
    calib/{bias,dark,flat-<filter>}-NNN.fits   calibration frames, same format
    truth/scene.ecsv                  the sky: every source and its light-curve parameters
    survey.json                       the specification, exposures, files and SHA-256s,
                                      written last: a survey without it is incomplete

Everything is a pure function of the :class:`SurveySpec` (seed included): the same
specification gives the same bytes. Detectors are rendered in parallel, one Dask task
each, on whatever Dask scheduler is active (a distributed client if one exists).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lazysky.errors import ParameterError
from lazysky.simulator.exposure import Pointing
from lazysky.simulator.instruments import Instrument, load_instrument
from lazysky.simulator.scene import Scene, SceneSpec, make_scene

__all__ = ["ExposureInfo", "SimulatedSurvey", "SurveySpec", "plan_exposures", "survey_scene"]

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Random-number streams, keyed with the seed: (stream, ...) → independent generators.
STREAM_SCENE, STREAM_PLAN, STREAM_EXPOSURE, STREAM_CALIB = 0, 1, 2, 3


class SurveySpec(BaseModel):
    """What to simulate. Every field has a realistic default; see ``lazysky simulate -h``.

    Raises
    ------
    ParameterError
        On any invalid value; the message names the field and what was expected.

    Examples
    --------
    >>> spec = SurveySpec(instrument="tiny", n_epochs=3, n_dithers=1, seed=7)
    >>> spec.filter, spec.reference_epochs
    ('r', 2)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    instrument: str = Field("tiny", description="Packaged instrument name or YAML path.")
    field_name: str = Field("deep1", description="Field name; part of every exposure id.")
    ra_deg: float = Field(150.1, ge=0.0, lt=360.0, description="Field centre RA (deg).")
    dec_deg: float = Field(2.2, ge=-90.0, le=90.0, description="Field centre Dec (deg).")
    position_angle_deg: float = Field(0.0, description="Focal-plane rotation (deg).")
    filter: str | None = Field(None, description="Filter (default: the instrument's).")
    n_epochs: int = Field(4, ge=1, le=1000, description="Visits of the field.")
    n_dithers: int = Field(2, ge=1, le=100, description="Exposures per visit.")
    n_reference_epochs: int | None = Field(
        None, ge=0, description="Leading epochs with no transient (default min(2, n−1))."
    )
    exptime_s: float | None = Field(None, gt=0, description="Seconds per exposure.")
    cadence_days: float = Field(5.0, gt=0, description="Days between epochs.")
    start_mjd: float = Field(61000.0, ge=0, description="MJD of the first exposure.")
    star_density_per_deg2: float = Field(3.0e4, ge=0)
    star_mag_range: tuple[float, float] = (14.0, 25.5)
    star_count_slope: float = Field(0.3, gt=0)
    galaxy_density_per_deg2: float = Field(1.5e5, ge=0)
    galaxy_mag_range: tuple[float, float] = (17.0, 26.0)
    galaxy_count_slope: float = Field(0.4, gt=0)
    n_transients: int = Field(10, ge=0, le=100000)
    transient_host_fraction: float = Field(0.5, ge=0, le=1)
    transient_peak_mag_range: tuple[float, float] = (19.0, 22.5)
    n_variables: int = Field(5, ge=0)
    n_movers: int = Field(1, ge=0)
    detectors: tuple[str, ...] | None = Field(None, description="Only these detectors.")
    seed: int = Field(0, ge=0, description="Same seed, same bytes.")
    n_bias: int = Field(5, ge=0)
    n_dark: int = Field(3, ge=0)
    n_flat: int = Field(5, ge=0)
    flat_level_e: float = Field(20000.0, gt=0)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ParameterError(_explain(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> SurveySpec:
        inst = load_instrument(self.instrument)
        if not _ID_RE.match(self.field_name):
            msg = f"field_name must be letters, digits, '_', '.', '+', '-', got {self.field_name!r}"
            raise ValueError(msg)
        if self.filter is not None:
            inst.band(self.filter)
        if self.detectors is not None:
            if not self.detectors:
                msg = "detectors must name at least one detector (or be omitted for all)"
                raise ValueError(msg)
            for name in self.detectors:
                inst.detector(name)
        if self.n_reference_epochs is not None and self.n_reference_epochs > self.n_epochs:
            msg = (
                f"n_reference_epochs ({self.n_reference_epochs}) exceeds n_epochs ({self.n_epochs})"
            )
            raise ValueError(msg)
        for name in ("star_mag_range", "galaxy_mag_range", "transient_peak_mag_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                msg = f"{name} must be (bright, faint) with bright < faint, got ({lo}, {hi})"
                raise ValueError(msg)
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> SurveySpec:
        """Read a specification from YAML; keyword arguments override its fields."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            msg = f"cannot read the survey specification {str(path)!r}: {exc}"
            raise ParameterError(msg) from None
        if not isinstance(data, dict):
            msg = f"the survey specification {str(path)!r} must be a mapping of fields"
            raise ParameterError(msg)
        return cls(**{**data, **overrides})

    @property
    def inst(self) -> Instrument:
        return load_instrument(self.instrument)

    @property
    def band_name(self) -> str:
        return self.filter or self.inst.default_filter

    @property
    def exposure_time(self) -> float:
        return self.exptime_s if self.exptime_s is not None else self.inst.default_exptime_s

    @property
    def reference_epochs(self) -> int:
        if self.n_reference_epochs is not None:
            return self.n_reference_epochs
        return min(2, self.n_epochs - 1)

    @property
    def detector_indices(self) -> list[int]:
        inst = self.inst
        if self.detectors is None:
            return list(range(inst.n_detectors))
        return [inst.detector(n).index for n in self.detectors]


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "survey"
        text = str(err["msg"]).removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if err["loc"] and "input" in err else ""
        parts.append(f"{where}: {text}{got}")
    return "invalid survey specification: " + "; ".join(parts)


@dataclass(frozen=True)
class ExposureInfo:
    """One exposure of the survey as planned and written."""

    exposure_id: str
    epoch: int
    dither: int
    mjd: float
    ra_deg: float
    dec_deg: float
    seeing_arcsec: float
    files: dict[str, str] = field(default_factory=dict)


def _epoch_mjds(spec: SurveySpec) -> list[float]:
    return [spec.start_mjd + e * spec.cadence_days for e in range(spec.n_epochs)]


def plan_exposures(spec: SurveySpec) -> list[Pointing]:
    """Pointings of every exposure: dithers, pointing errors, seeing and sky per exposure."""
    inst = spec.inst
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(STREAM_PLAN,)))
    band = inst.band(spec.band_name)
    sky_rate = (
        10 ** (-0.4 * (band.sky_mag_per_arcsec2 - band.zeropoint_mag)) * inst.pixel_scale_arcsec**2
    )
    pattern = [(0, 0), (1, 1), (-1, 1), (1, -1), (-1, -1), (2, 0), (0, 2), (-2, 0), (0, -2)]
    sky_scatter = 0.1 if inst.kind == "ground" else 0.02
    cosd = math.cos(math.radians(spec.dec_deg))
    out = []
    overhead_s = 30.0
    for e, t_epoch in enumerate(_epoch_mjds(spec)):
        t_epoch += float(rng.uniform(0.0, 0.1))
        for d in range(spec.n_dithers):
            px, py = pattern[d % len(pattern)]
            scale = inst.dither_arcsec * (1 + d // len(pattern))
            err = rng.normal(0.0, inst.pointing_error_arcsec, 2)
            dx, dy = (px * scale + err[0]) / 3600.0, (py * scale + err[1]) / 3600.0
            out.append(
                Pointing(
                    exposure_id=f"{spec.field_name}-{spec.band_name}-e{e:03d}-d{d:02d}",
                    image_type="object",
                    mjd=round(t_epoch + d * (spec.exposure_time + overhead_s) / 86400.0, 8),
                    exptime_s=spec.exposure_time,
                    filter=spec.band_name,
                    ra_deg=(spec.ra_deg + dx / cosd) % 360.0,
                    dec_deg=float(np.clip(spec.dec_deg + dy, -90.0, 90.0)),
                    pa_deg=spec.position_angle_deg,
                    seeing_arcsec=float(
                        inst.seeing_fwhm_arcsec * rng.lognormal(0.0, inst.seeing_scatter)
                    ),
                    sky_e_per_s_px=float(sky_rate * rng.lognormal(0.0, sky_scatter)),
                    epoch=e,
                    dither=d,
                    field=spec.field_name,
                )
            )
    return out


def survey_scene(spec: SurveySpec) -> Scene:
    """The sky of the survey (deterministic for the spec)."""
    inst = spec.inst
    field_deg = inst.field_radius_px * inst.pixel_scale_arcsec / 3600.0
    dither_deg = (
        inst.dither_arcsec * 2 * (1 + spec.n_dithers // 9) + 5 * inst.pointing_error_arcsec
    ) / 3600
    mjds = _epoch_mjds(spec)
    ref = spec.reference_epochs
    t_lo = mjds[ref - 1] + 0.2 * spec.cadence_days if ref > 0 else spec.start_mjd - 10.0
    t_hi = mjds[-1] - 0.3 if spec.n_epochs > ref else t_lo + 1.0
    scene_spec = SceneSpec(
        ra_deg=spec.ra_deg,
        dec_deg=spec.dec_deg,
        radius_deg=field_deg + dither_deg + 30.0 / 3600.0,
        star_density_per_deg2=spec.star_density_per_deg2,
        star_mag_range=spec.star_mag_range,
        star_count_slope=spec.star_count_slope,
        galaxy_density_per_deg2=spec.galaxy_density_per_deg2,
        galaxy_mag_range=spec.galaxy_mag_range,
        galaxy_count_slope=spec.galaxy_count_slope,
        n_transients=spec.n_transients,
        transient_host_fraction=spec.transient_host_fraction,
        transient_peak_mag_range=spec.transient_peak_mag_range,
        transient_window_mjd=(t_lo, max(t_hi, t_lo + 0.1)),
        n_variables=spec.n_variables,
        n_movers=spec.n_movers,
        mover_time_mjd=0.5 * (mjds[0] + mjds[-1]),
        inner_radius_deg=0.7 * field_deg,
    )
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(STREAM_SCENE,)))
    return make_scene(scene_spec, rng)


@dataclass
class SimulatedSurvey:
    """What :func:`simulate_survey` wrote: where, and a summary of it."""

    root: str
    spec: SurveySpec
    exposures: list[ExposureInfo]
    calibrations: dict[str, list[str]]
    n_sources: dict[str, int]
    checksums: dict[str, str]

    @property
    def manifest(self) -> str:
        return f"{self.root.rstrip('/')}/survey.json"

    def summary(self) -> str:
        """A few lines for people: what was simulated and where it is."""
        inst = self.spec.inst
        ndet = len(self.spec.detector_indices)
        ny, nx = inst.raw_shape
        lines = [
            f"simulated survey {self.spec.field_name!r} with {inst.name} "
            f"({ndet} detector{'s' * (ndet > 1)} of {nx} x {ny} px), seed {self.spec.seed}",
            f"  {len(self.exposures)} exposures: {self.spec.n_epochs} epochs x "
            f"{self.spec.n_dithers} dithers, {self.spec.exposure_time:g} s "
            f"in {self.spec.band_name}",
            "  sources: "
            + ", ".join(
                f"{v} {'galaxies' if k == 'galaxy' else k + 's'}"
                for k, v in self.n_sources.items()
                if v
            ),
            "  calibrations: " + ", ".join(f"{len(v)} {k}" for k, v in self.calibrations.items()),
            f"  written to {self.root} (manifest: survey.json)",
        ]
        return "\n".join(lines)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_json(survey: SimulatedSurvey, version: str) -> bytes:
    """The survey manifest, byte-stable for a given survey."""
    doc = {
        "format": "lazysky-simulated-survey/1",
        "lazysky_version": version,
        "spec": survey.spec.model_dump(mode="json"),
        "instrument": survey.spec.inst.model_dump(mode="json"),
        "exposures": [e.__dict__ for e in survey.exposures],
        "calibrations": survey.calibrations,
        "n_sources": survey.n_sources,
        "sha256": survey.checksums,
    }
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def table_bytes(table: Any) -> bytes:
    """Serialise an astropy table as ECSV (text with units and metadata) to bytes."""
    text = io.StringIO()
    table.write(text, format="ascii.ecsv")
    return text.getvalue().encode()

"""The configuration of a processing run (``lazysky run CONFIG.yaml``): a typed, validated model.

A run names its inputs (exposures already in a store, and FITS files to ingest first),
the calibration sets, the field and its grid, which exposures make the reference and
which are science epochs, and the parameters of every step. Exposure sets are lists of
glob patterns on exposure ids (``"deep1-r-e00[0-1]-*"``); the calibration sets default to
every bias, dark and flat (by ``IMAGETYP``) in the store.

Examples
--------
>>> cfg = RunConfig.model_validate({
...     "ingest": ["survey/raw", "survey/calib"],
...     "reference": ["deep1-r-e000-*"],
...     "science": ["deep1-r-e00[1-3]-*"],
...     "steps": {"detect": {"threshold": 5.0}},
... })
>>> cfg.type, cfg.steps.stack.method, cfg.field.tile_px
('exp', 'clipped-mean', 2048)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from lazysky.errors import ConfigError

__all__ = [
    "CalibrationSets",
    "CanaryConfig",
    "FieldConfig",
    "RunConfig",
    "StepParameters",
    "load_run_config",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationSets(_Model):
    """Exposure-id patterns of the calibration frames (None: every frame of that IMAGETYP)."""

    bias: list[str] | None = Field(None, description="Bias frames (IMAGETYP bias).")
    dark: list[str] | None = Field(None, description="Dark frames (IMAGETYP dark).")
    flat: list[str] | None = Field(
        None, description="Flat frames (IMAGETYP flat, same filter as the science)."
    )


class FieldConfig(_Model):
    """The field and its sky grid."""

    name: str = Field("field", description="A name for the field (products, summaries).")
    filter: str | None = Field(None, description="Only exposures in this filter (None: any).")
    pixel_scale_arcsec: float | None = Field(
        None, gt=0, description="Grid pixel scale (None: the finest of the inputs)."
    )
    tile_px: int = Field(2048, ge=16, description="Tile side in pixels (Zarr chunk, dask block).")


class CalibrateStep(_Model):
    """Parameters of ``calibrate_exposure``, ``flag_cosmic_rays``, ``subtract_background``."""

    edge_px: int = Field(0, ge=0, description="Pixels flagged EDGE at the detector border.")
    cosmic_sigclip: float = Field(4.5, gt=0, description="L.A.Cosmic detection limit (σ).")
    cosmic_objlim: float = Field(5.0, gt=0, description="L.A.Cosmic contrast limit.")
    background_box_px: int = Field(64, ge=4, description="Background mesh box (pixels).")


class StackStep(_Model):
    """Parameters of ``stack``."""

    method: Literal["clipped-mean", "median"] = Field("clipped-mean", description="Combine.")
    sigma: float = Field(3.0, gt=0, description="Clipping threshold (σ).")


class DifferenceStep(_Model):
    """Parameters of ``difference``."""

    method: Literal["zogy", "alard-lupton"] = Field(
        "zogy", description="Difference method: ZOGY, or Alard & Lupton's kernel fit."
    )
    astrometric_sigma_px: float | Literal["auto"] = Field(
        0.3,
        description="Registration noise (pixels) in ZOGY's S_corr, or 'auto' from matched "
        "stars. 0.3 px covers what resampling dithered frames leaves; on the demo survey it "
        "cuts false positives at bright stars and galaxies from 42 to 5 at the same "
        "recovery (docs/run.md).",
    )


class DetectStep(_Model):
    """Parameters of ``detect`` (coadds) and ``detect_difference`` (differences)."""

    threshold: float = Field(5.0, gt=0, description="Detection threshold on coadds (σ).")
    diff_threshold: float = Field(5.0, gt=0, description="Threshold on S_corr (σ).")


class StepParameters(_Model):
    """Every step's parameters (recorded with the run and in the products' attributes)."""

    calibrate: CalibrateStep = Field(default_factory=CalibrateStep)
    stack: StackStep = Field(default_factory=StackStep)
    difference: DifferenceStep = Field(default_factory=DifferenceStep)
    detect: DetectStep = Field(default_factory=DetectStep)


class CanaryConfig(_Model):
    """A canary: a candidate workflow version on a share of a batch's science exposures."""

    version: str = Field(description="The candidate workflow version (lazysky workflows).")
    share: float = Field(
        ge=0, le=100, description="Percent of the science exposures (by a hash of the "
        "exposure id) the candidate processes; the active version takes the rest.")


class RunConfig(_Model):
    """One processing run: inputs, calibration sets, field, reference, science, steps."""

    type: Literal["prod", "exp", "test", "val", "repr"] = Field(
        "exp", description="Processing type of the run (DESIGN.md)."
    )
    run_id: str | None = Field(
        None, description="Resume this run (same id); None starts a new one."
    )
    description: str = Field("", description="Free text recorded with the run.")
    store: str | None = Field(
        None, description="The Zarr store (None: the settings' store_url)."
    )
    ingest: list[str] = Field(
        default_factory=list,
        description="FITS files, directories or globs (local or URLs) to ingest first.",
    )
    calibrations: CalibrationSets = Field(default_factory=CalibrationSets)
    field: FieldConfig = Field(default_factory=FieldConfig)
    reference: list[str] = Field(
        description="Exposure-id patterns of the exposures stacked into the reference.",
        min_length=1,
    )
    science: list[str] = Field(
        default_factory=list,
        description="Exposure-id patterns of the science exposures (each epoch = one VISIT).",
    )
    steps: StepParameters = Field(default_factory=StepParameters)
    # --- workflow versions and canaries (lazysky.workflows, docs/workflows.md) ---------
    workflow: str | None = Field(
        None, description="Run the steps of this registered workflow version. Without "
        "it and without steps, a run takes the active version of its type (if any).")
    canary: CanaryConfig | None = Field(
        None, description="Batch submissions only: run a candidate version on a share "
        "of the science exposures, under its own run (type val).")
    science_share: tuple[float, float] | None = Field(
        None, description="Only the science exposures whose bucket (SHA-256 of the "
        "exposure id, in [0, 100)) is in [lo, hi): one side of a canary split.")

    @model_validator(mode="after")
    def _valid_share(self) -> RunConfig:
        share = self.science_share
        if share is not None and not 0.0 <= share[0] <= share[1] <= 100.0:
            msg = f"science_share must be [lo, hi] with 0 <= lo <= hi <= 100; got {share}"
            raise ValueError(msg)
        return self

    @field_validator("workflow")
    @classmethod
    def _valid_workflow(cls, v: str | None) -> str | None:
        if v is not None:
            from lazysky.workflows import validate_name

            validate_name(v)
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # steps never given stay unsaid, so a stored configuration (a batch submission)
        # still runs the workflow version active when it runs, not the defaults of today
        data: dict[str, Any] = handler(self)
        if "steps" not in self.model_fields_set:
            data.pop("steps", None)
        return data

    @field_validator("run_id")
    @classmethod
    def _valid_run_id(cls, v: str | None) -> str | None:
        if v is not None:
            from lazysky.runs import validate_run_id

            validate_run_id(v)
        return v


def read_yaml_mapping(source: Any, *, what: str, of: str) -> dict[str, Any]:
    """A mapping given as such or read from a YAML file, else a clear ConfigError naming
    the file (``what``: e.g. "run configuration"; ``of``: what the mapping holds)."""
    where = f"the {what}"
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            msg = f"cannot read the {what} {path}: {exc}"
            raise ConfigError(msg) from exc
        except yaml.YAMLError as exc:
            msg = f"{path} is not valid YAML: {exc}"
            raise ConfigError(msg) from exc
    if not isinstance(data, dict):
        msg = f"{where} must be a mapping of {of}, got {type(data).__name__}"
        raise ConfigError(msg)
    return data


def load_run_config(source: str | os.PathLike[str] | dict[str, Any]) -> RunConfig:
    """Read and validate a run configuration (a YAML file or a mapping).

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a field is unknown or invalid (the message
        names the file and the field).
    """
    data = read_yaml_mapping(source, what="run configuration", of="settings")
    where = "the run configuration" if isinstance(source, Mapping) else str(Path(source))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        msg = f"{where}: {problems}"
        raise ConfigError(msg) from exc

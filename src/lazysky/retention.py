"""Retention settings: how long each layer of each processing type is kept.

Three layers (docs/lifecycle.md):

* **products** (gold): a run's Zarr products and its catalog rows, per processing type;
* **calibrated** (silver): the master calibrations under ``calib/``, per processing type
  of the runs that used them (a master goes once every run that used it is past this);
* **raw** (bronze): ingested exposures, ``until-unused`` (they go once every run that
  used them has expired) or ``forever``.

A retention is a duration of at least a day — ``7d``, ``36h``, ``2w``, ``1y`` (365 days)
— or ``forever``. Shorter ones are refused: a test run must outlive the night it ran in.

Examples
--------
>>> r = RetentionSettings(products={"test": "3d"})
>>> r.products["test"], r.products["exp"], r.products["prod"]
('3d', '90d', 'forever')
>>> duration("2w").days
14
>>> duration("forever") is None
True
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lazysky.errors import ParameterError
from lazysky.runs import RUN_TYPES

__all__ = [
    "DEFAULT_CALIBRATED",
    "DEFAULT_PRODUCTS",
    "FOREVER",
    "LAYERS",
    "RetentionSettings",
    "duration",
]

FOREVER = "forever"
UNTIL_UNUSED = "until-unused"
#: the layers of the store a retention applies to
LAYERS = ("products", "calibrated", "raw")
#: products (gold): test runs a week, experiments a quarter, production forever
DEFAULT_PRODUCTS: dict[str, str] = {"prod": FOREVER, "exp": "90d", "test": "7d",
                                    "val": "30d", "repr": "365d"}
#: calibrated (silver): the same as the products of the runs that used them
DEFAULT_CALIBRATED: dict[str, str] = dict(DEFAULT_PRODUCTS)
_UNITS = {"h": dt.timedelta(hours=1), "d": dt.timedelta(days=1), "w": dt.timedelta(weeks=1),
          "y": dt.timedelta(days=365)}
_FORM = re.compile(r"^\s*([0-9]+)\s*([hdwy])\s*$")


def duration(value: str, *, setting: str = "retention") -> dt.timedelta | None:
    """A retention as a :class:`datetime.timedelta` (``None``: ``forever``).

    Raises
    ------
    ParameterError
        Not ``<n>h|d|w|y`` or ``forever``, or shorter than a day (the message names
        ``setting``).

    Examples
    --------
    >>> duration("36h")
    datetime.timedelta(days=1, seconds=43200)
    """
    if isinstance(value, str) and value.strip().lower() == FOREVER:
        return None
    match = _FORM.match(value) if isinstance(value, str) else None
    if match is None:
        msg = (f"{setting}: {value!r} is not a retention; expected a duration such as 7d, "
               f"36h, 2w, 1y, or 'forever'")
        raise ParameterError(msg)
    span = int(match.group(1)) * _UNITS[match.group(2)]
    if span < dt.timedelta(days=1):
        msg = (f"{setting}: {value!r} is shorter than a day; a retention must be at least "
               "1d (or 'forever')")
        raise ParameterError(msg)
    return span


def _per_type(value: Any, defaults: dict[str, str], layer: str) -> dict[str, str]:
    if value is None:
        return dict(defaults)
    if not isinstance(value, dict):
        msg = (f"retention.{layer} must map processing types ({', '.join(RUN_TYPES)}) to "
               f"durations, e.g. {{test: 7d}}; got {value!r}")
        raise ValueError(msg)
    unknown = sorted(str(k) for k in value if k not in RUN_TYPES)
    if unknown:
        msg = (f"retention.{layer}: unknown processing type(s) {unknown}; allowed: "
               f"{', '.join(RUN_TYPES)}")
        raise ValueError(msg)
    out = {**defaults, **{str(k): str(v).strip() for k, v in value.items()}}
    for kind, text in out.items():
        try:
            duration(text, setting=f"retention.{layer}.{kind}")
        except ParameterError as exc:
            raise ValueError(str(exc)) from None
    return out


class RetentionSettings(BaseModel):
    """How long each layer is kept, per processing type (see docs/lifecycle.md).

    Types not named keep their defaults, so ``{products: {test: 3d}}`` only shortens the
    test runs. Production and promoted runs are never collected, whatever these say.
    """

    model_config = ConfigDict(extra="forbid")

    products: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PRODUCTS),
        description="Zarr products and catalog rows of a run, per processing type "
        "(prod, exp, test, val, repr): a duration of at least a day (7d, 36h, 2w, 1y) or "
        "'forever'. Counted from the run's end (its start if it never finished).")
    calibrated: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_CALIBRATED),
        description="Master calibrations (calib/): a master goes once every run that "
        "used it is past this retention of its type (or expired), none in use.")
    raw: Literal["until-unused", "forever"] = Field(
        "until-unused", description="Ingested exposures (raw/): 'until-unused' removes "
        "one once every run that used it has expired; 'forever' keeps them all.")

    @model_validator(mode="before")
    @classmethod
    def _layers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in LAYERS)
            if unknown:
                msg = (f"retention: unknown layer(s) {unknown}; allowed: "
                       f"{', '.join(LAYERS)}")
                raise ValueError(msg)
        return data

    @field_validator("products", mode="before")
    @classmethod
    def _products(cls, value: Any) -> dict[str, str]:
        return _per_type(value, DEFAULT_PRODUCTS, "products")

    @field_validator("calibrated", mode="before")
    @classmethod
    def _calibrated(cls, value: Any) -> dict[str, str]:
        return _per_type(value, DEFAULT_CALIBRATED, "calibrated")

    def keep_for(self, layer: str, run_type: str) -> dt.timedelta | None:
        """The retention of ``layer`` for runs of ``run_type`` (``None``: forever)."""
        if layer not in ("products", "calibrated"):
            msg = f"layer must be 'products' or 'calibrated', got {layer!r}"
            raise ParameterError(msg)
        if run_type not in RUN_TYPES:
            msg = f"run type must be one of {', '.join(RUN_TYPES)}; got {run_type!r}"
            raise ParameterError(msg)
        table: dict[str, str] = getattr(self, layer)
        return duration(table[run_type], setting=f"retention.{layer}.{run_type}")

"""Parsing positions and radii given by people: degrees, sexagesimal, units.

Accepted once, here, at the boundary (CLI arguments, HTTP parameters, Python calls):

- numbers (int/float, or strings of them) are degrees;
- strings with units: ``10arcsec``, ``1.5arcmin``, ``0.5deg``, ``2d30m``;
- sexagesimal: RA ``10:30:00`` / ``10h30m00s`` (hours), Dec ``-05:00:00`` (degrees);
- :class:`astropy.units.Quantity` / :class:`astropy.coordinates.Angle`.

Everything else (NaN, infinities, booleans, SQL fragments, empty strings) raises a
:class:`~lazysky.errors.ParameterError` that names the parameter and what was expected.

Examples
--------
>>> parse_radius("10arcsec") * 3600
10.0
>>> parse_position("10:00:00", "-05:30:00")
(150.0, -5.5)
"""

from __future__ import annotations

import math
import re
from typing import Any

import astropy.units as u
from astropy.coordinates import Angle

from lazysky.errors import ParameterError

__all__ = ["MAX_RADIUS_DEG", "parse_angle", "parse_position", "parse_radius"]

MAX_RADIUS_DEG = 90.0  # pgSphere circles have radius <= 90 deg
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_ALLOWED = re.compile(r"[0-9a-zA-Z.:+\-\s'\"°]+")


def parse_angle(value: Any, *, name: str, sexagesimal_unit: u.UnitBase = u.deg) -> float:
    """An angle in degrees from a number, a string with units or sexagesimal, a Quantity.

    Parameters
    ----------
    value
        What the user gave.
    name
        The parameter's name, for the error message.
    sexagesimal_unit
        The unit of unit-less sexagesimal strings (``u.hourangle`` for RA).
    """
    expected = (f"{name} must be an angle: degrees (12.5), a value with a unit (10arcsec, "
                f"0.5deg) or sexagesimal (10:30:00)")
    if isinstance(value, bool) or value is None:
        msg = f"{expected}; got {value!r}"
        raise ParameterError(msg)
    if isinstance(value, u.Quantity):
        try:
            deg = float(value.to_value(u.deg))
        except (u.UnitsError, TypeError):
            msg = f"{expected}; got the quantity {value!r}, not an angle"
            raise ParameterError(msg) from None
    elif isinstance(value, int | float):
        deg = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > 64 or not text or not _ALLOWED.fullmatch(text):
            msg = f"{expected}; got {value!r}"
            raise ParameterError(msg)
        if _NUMBER.fullmatch(text):
            deg = float(text)
        else:
            try:
                unit = sexagesimal_unit if re.search(r"[:\s]", text) else None
                deg = float(Angle(text, unit=unit).to_value(u.deg))
            except (ValueError, u.UnitsError, TypeError):
                msg = f"{expected}; got {value!r}"
                raise ParameterError(msg) from None
    else:
        try:
            deg = float(value)
        except (TypeError, ValueError):
            msg = f"{expected}; got {value!r}"
            raise ParameterError(msg) from None
    if not math.isfinite(deg):
        msg = f"{name} must be a finite angle; got {value!r}"
        raise ParameterError(msg)
    return deg


def parse_position(ra: Any, dec: Any) -> tuple[float, float]:
    """RA and Dec in degrees, validated: RA in [0, 360), Dec in [-90, 90]."""
    ra_deg = parse_angle(ra, name="RA", sexagesimal_unit=u.hourangle)
    dec_deg = parse_angle(dec, name="Dec")
    if not 0.0 <= ra_deg < 360.0:
        msg = f"RA must lie in [0, 360) degrees; got {ra!r} ({ra_deg!r} deg)"
        raise ParameterError(msg)
    if not -90.0 <= dec_deg <= 90.0:
        msg = f"Dec must lie in [-90, 90] degrees; got {dec!r} ({dec_deg!r} deg)"
        raise ParameterError(msg)
    return ra_deg, dec_deg


def parse_radius(radius: Any, *, max_deg: float = MAX_RADIUS_DEG) -> float:
    """A search radius in degrees, validated: 0 < radius <= ``max_deg``."""
    deg = parse_angle(radius, name="radius")
    if deg <= 0.0:
        msg = f"the radius must be positive; got {radius!r}"
        raise ParameterError(msg)
    if deg > max_deg:
        msg = f"the radius must be at most {max_deg:g} deg; got {radius!r} ({deg:g} deg)"
        raise ParameterError(msg)
    return deg

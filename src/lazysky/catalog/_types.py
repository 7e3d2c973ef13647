"""pgSphere column types (``spoint``, ``scircle``, ``spoly``) as SQLAlchemy types.

Values travel as bound parameters in pgSphere's text form (radians) with an explicit
cast (``%(p)s::spoint``), never as floats formatted into the SQL text. The comparators
add pgSphere's operators to columns and expressions of these types:

======================  =========  ===========================================
method                  operator   meaning
======================  =========  ===========================================
``contained_by(o)``     ``<@``     left lies inside ``o`` (uses the GiST index)
``contains_region(o)``  ``@>``     left contains ``o``
``overlaps(o)``         ``&&``     left and ``o`` overlap
``distance(o)``         ``<->``    angular distance in radians
======================  =========  ===========================================

pgSphere works in radians; :meth:`SPoint.from_degrees` and :meth:`SCircle.from_degrees`
convert once, here.

Examples
--------
>>> c = SCircle.from_degrees(10.0, -5.0, 1 / 60)
>>> c.center.lon_deg, round(c.radius_deg * 60, 9)
(10.0, 1.0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.types import UserDefinedType

from lazysky.errors import ParameterError

__all__ = ["SCircle", "SCircleType", "SPoint", "SPointType", "SPoly", "SPolyType"]

_NUM = r"\s*([-+0-9.eEinfaINFA]+)\s*"
_POINT_RE = re.compile(rf"\({_NUM},{_NUM}\)")
_CIRCLE_RE = re.compile(rf"<\s*\({_NUM},{_NUM}\)\s*,{_NUM}>")


@dataclass(frozen=True)
class SPoint:
    """A point on the sphere, longitude and latitude in radians."""

    lon_rad: float
    lat_rad: float

    @classmethod
    def from_degrees(cls, lon_deg: float, lat_deg: float) -> SPoint:
        """A point from degrees (RA, Dec)."""
        return cls(math.radians(lon_deg), math.radians(lat_deg))

    @property
    def lon_deg(self) -> float:
        """Longitude (RA) in degrees."""
        return math.degrees(self.lon_rad)

    @property
    def lat_deg(self) -> float:
        """Latitude (Dec) in degrees."""
        return math.degrees(self.lat_rad)

    def to_pgsphere(self) -> str:
        """pgSphere's text form, full float precision."""
        return f"({self.lon_rad!r}, {self.lat_rad!r})"


@dataclass(frozen=True)
class SCircle:
    """A circle on the sphere: centre and radius (radians)."""

    center: SPoint
    radius_rad: float

    @classmethod
    def from_degrees(cls, lon_deg: float, lat_deg: float, radius_deg: float) -> SCircle:
        """A circle from degrees (RA, Dec, radius)."""
        return cls(SPoint.from_degrees(lon_deg, lat_deg), math.radians(radius_deg))

    @property
    def radius_deg(self) -> float:
        """Radius in degrees."""
        return math.degrees(self.radius_rad)

    def to_pgsphere(self) -> str:
        """pgSphere's text form."""
        return f"<{self.center.to_pgsphere()}, {self.radius_rad!r}>"


@dataclass(frozen=True)
class SPoly:
    """A spherical polygon: three or more vertices (great-circle edges)."""

    vertices: tuple[SPoint, ...]

    def __post_init__(self) -> None:
        if len(self.vertices) < 3:
            msg = f"a spherical polygon needs at least 3 vertices, got {len(self.vertices)}"
            raise ParameterError(msg)

    @classmethod
    def from_degrees(cls, vertices_deg: Sequence[tuple[float, float]]) -> SPoly:
        """A polygon from ``[(ra_deg, dec_deg), …]``."""
        return cls(tuple(SPoint.from_degrees(lo, la) for lo, la in vertices_deg))

    def to_pgsphere(self) -> str:
        """pgSphere's text form."""
        return "{" + ", ".join(v.to_pgsphere() for v in self.vertices) + "}"


def _parse_point(text: str) -> SPoint:
    m = _POINT_RE.fullmatch(text.strip())
    if m is None:  # pragma: no cover - pgSphere output is regular
        msg = f"cannot parse pgSphere spoint {text!r}"
        raise ValueError(msg)
    return SPoint(float(m.group(1)), float(m.group(2)))


def _parse_circle(text: str) -> SCircle:
    m = _CIRCLE_RE.fullmatch(text.strip())
    if m is None:  # pragma: no cover
        msg = f"cannot parse pgSphere scircle {text!r}"
        raise ValueError(msg)
    return SCircle(SPoint(float(m.group(1)), float(m.group(2))), float(m.group(3)))


def _parse_poly(text: str) -> SPoly:
    return SPoly(tuple(SPoint(float(a), float(b)) for a, b in _POINT_RE.findall(text)))


class _SphereComparator(UserDefinedType.Comparator):
    """pgSphere operators on columns of the sphere types."""

    def _operand(self, other: Any) -> Any:
        if isinstance(other, SPoint | SCircle | SPoly):
            return sa.bindparam(None, other, type_=_TYPE_OF[type(other)]())
        return other

    def contained_by(self, other: Any) -> sa.ColumnElement[bool]:
        """``self <@ other``: inside (the spatial-index operator for cone searches)."""
        return self.expr.op("<@", is_comparison=True)(self._operand(other))

    def contains_region(self, other: Any) -> sa.ColumnElement[bool]:
        """``self @> other``: contains."""
        return self.expr.op("@>", is_comparison=True)(self._operand(other))

    def overlaps(self, other: Any) -> sa.ColumnElement[bool]:
        """``self && other``: overlaps."""
        return self.expr.op("&&", is_comparison=True)(self._operand(other))

    def distance(self, other: Any) -> sa.ColumnElement[float]:
        """``self <-> other``: angular distance in radians."""
        return self.expr.op("<->", return_type=sa.Float(53))(self._operand(other))


class _SphereType(UserDefinedType):
    """Common machinery: text form in, parsed value out, bound parameters cast."""

    cache_ok = True
    render_bind_cast = True
    comparator_factory = _SphereComparator
    _name = ""
    _value_cls: type[Any] = object
    _parse: Callable[[str], Any] = staticmethod(str)

    def get_col_spec(self, **kw: Any) -> str:
        return self._name

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], str | None]:
        value_cls, name = self._value_cls, self._name

        def process(value: Any) -> str | None:
            if value is None:
                return None
            if isinstance(value, value_cls):
                return str(value.to_pgsphere())
            msg = f"a {name} column takes {value_cls.__name__} values, got {value!r}"
            raise ParameterError(msg)

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        parse = type(self)._parse

        def process(value: Any) -> Any:
            return None if value is None else parse(value)

        return process


class SPointType(_SphereType):
    """The pgSphere ``spoint`` type (values: :class:`SPoint`)."""

    cache_ok = True
    _name = "spoint"
    _value_cls = SPoint
    _parse = staticmethod(_parse_point)


class SCircleType(_SphereType):
    """The pgSphere ``scircle`` type (values: :class:`SCircle`)."""

    cache_ok = True
    _name = "scircle"
    _value_cls = SCircle
    _parse = staticmethod(_parse_circle)


class SPolyType(_SphereType):
    """The pgSphere ``spoly`` type (values: :class:`SPoly`)."""

    cache_ok = True
    _name = "spoly"
    _value_cls = SPoly
    _parse = staticmethod(_parse_poly)


_TYPE_OF: dict[type, type[_SphereType]] = {
    SPoint: SPointType,
    SCircle: SCircleType,
    SPoly: SPolyType,
}

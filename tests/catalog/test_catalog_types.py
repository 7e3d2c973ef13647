"""pgSphere types as SQLAlchemy types: bound parameters, round trips, operators."""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa

from lazysky.catalog import Catalog, SCircle, SCircleType, SPoint, SPointType, SPoly, SPolyType
from lazysky.catalog.schema import coadd_sources
from lazysky.errors import ParameterError

pytestmark = pytest.mark.postgres


def test_values_are_bound_never_formatted_into_sql(catalog: Catalog) -> None:
    circle = SCircle.from_degrees(123.456789, -12.345678, 0.0123456)
    stmt = sa.select(coadd_sources.c.ra).where(coadd_sources.c.pos.contained_by(circle))
    compiled = stmt.compile(dialect=catalog.engine().dialect)
    sql_text = str(compiled)
    assert "::scircle" in sql_text
    assert "2.15" not in sql_text  # radians of 123.456789 deg
    assert "0.0002" not in sql_text
    assert list(compiled.params.values()) == [circle]


@pytest.mark.parametrize("value", [
    SPoint.from_degrees(359.999999, -89.5),
    SCircle.from_degrees(0.0, 90.0, 1 / 3600),
    SPoly.from_degrees([(10, 10), (11, 10), (11, 11), (10, 11)]),
])
def test_round_trip_through_postgres(catalog: Catalog, value: object) -> None:
    type_ = {SPoint: SPointType, SCircle: SCircleType, SPoly: SPolyType}[type(value)]()
    with catalog.engine().connect() as conn:
        got = conn.execute(sa.select(sa.bindparam("v", value, type_=type_))).scalar_one()
    assert type(got) is type(value)
    if isinstance(value, SPoint):
        assert got.lon_rad == pytest.approx(value.lon_rad, abs=1e-14)
        assert got.lat_rad == pytest.approx(value.lat_rad, abs=1e-14)
    elif isinstance(value, SCircle):
        assert got.radius_rad == pytest.approx(value.radius_rad, rel=1e-12)
        assert got.center.lat_deg == pytest.approx(90.0)
    else:
        assert len(got.vertices) == 4


def test_operators_and_distance(catalog: Catalog) -> None:
    p = sa.bindparam("p", SPoint.from_degrees(10.5, 10.5), type_=SPointType())
    poly = SPoly.from_degrees([(10, 10), (11, 10), (11, 11), (10, 11)])
    far = SCircle.from_degrees(200.0, -30.0, 1.0)
    with catalog.engine().connect() as conn:
        inside, outside, overlaps, contains, dist = conn.execute(sa.select(
            p.comparator.contained_by(poly),
            p.comparator.contained_by(far),
            sa.bindparam("c", far, type_=SCircleType()).comparator.overlaps(
                SCircle.from_degrees(200.5, -30.0, 1.0)),
            sa.bindparam("q", poly, type_=SPolyType()).comparator.contains_region(
                SPoint.from_degrees(10.2, 10.9)),
            p.comparator.distance(SPoint.from_degrees(10.5, 11.5)),
        )).one()
    assert (inside, outside, overlaps, contains) == (True, False, True, True)
    assert dist == pytest.approx(math.radians(1.0), rel=1e-12)


def test_wrong_python_value_is_a_clear_error(catalog: Catalog) -> None:
    with catalog.engine().connect() as conn, pytest.raises(
            sa.exc.StatementError, match="spoint column takes SPoint values"):
        conn.execute(sa.select(sa.bindparam("v", (1.0, 2.0), type_=SPointType())))
    with pytest.raises(ParameterError, match="at least 3 vertices"):
        SPoly.from_degrees([(0, 0), (1, 1)])

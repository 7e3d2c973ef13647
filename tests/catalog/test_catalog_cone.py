"""Cone search == brute-force SkyCoord.separation (RA wrap, poles), on the GiST index."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from lazysky.catalog import Catalog, coadd_sources, cone_query, cone_search, write_sources
from lazysky.catalog.cone import explain
from lazysky.catalog.production import promote, publish
from lazysky.errors import ParameterError

pytestmark = pytest.mark.postgres

#: An index scan on a month partition's GiST index (coadd_sources__exp__2026_11_pos_idx)
GIST_SCAN = re.compile(r"Index Scan (using|on) coadd_sources__\w+_pos_idx")

Sources = Callable[..., dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def sky(catalog: Catalog, sources: Sources) -> dict[str, Any]:
    """A run with sources all over the sky, and dense around RA=0/360 and both poles."""
    from lazysky.catalog import register_run
    from lazysky.runs import Run, new_run_id

    run = Run(new_run_id("exp"))
    register_run(run, catalog=catalog)
    parts = [
        sources(20_000, seed=1),
        sources(5_000, seed=2, ra_range=(358.0, 362.0), dec_range=(-3.0, 3.0)),
        sources(5_000, seed=3, dec_range=(87.0, 90.0)),
        sources(5_000, seed=4, dec_range=(-90.0, -87.0)),
        sources(2_000, seed=5, ra_range=(299.95, 300.05), dec_range=(-45.05, -44.95)),
    ]
    ra = np.concatenate([p["ra"] for p in parts])
    dec = np.concatenate([p["dec"] for p in parts])
    for i, part in enumerate(parts):
        write_sources("coadd", run.run_id, f"sky-{i}", part, catalog=catalog)
    with catalog.engine().begin() as conn:
        conn.exec_driver_sql("ANALYZE coadd_sources")
    return {"run": run.run_id, "coords": SkyCoord(ra * u.deg, dec * u.deg)}


@pytest.mark.parametrize(("ra", "dec", "radius"), [
    (0.2, 1.0, 1.0),          # straddles RA = 0/360
    (359.7, -1.5, 0.7),
    (0.0, 0.0, 10 / 60),
    (17.0, 90.0, 2.0),        # on the north pole
    (250.0, 88.9, 1.5),       # around the north pole
    (123.0, -89.7, 0.5),      # around the south pole
    (45.0, 30.0, 3.0),
    (300.0, -45.0, 1 / 60),
])
def test_cone_equals_brute_force(catalog: Catalog, sky: dict[str, Any], ra: float,
                                 dec: float, radius: float) -> None:
    got = cone_search(ra, dec, radius, run=sky["run"], limit=None, catalog=catalog)
    sep = sky["coords"].separation(SkyCoord(ra * u.deg, dec * u.deg)).deg
    expected = sep <= radius
    ambiguous = np.abs(sep - radius) < 1e-7  # float rounding at the very edge
    got_coords = SkyCoord(np.asarray(got["ra"]) * u.deg, np.asarray(got["dec"]) * u.deg)
    got_sep = got_coords.separation(SkyCoord(ra * u.deg, dec * u.deg)).deg
    assert np.all(got_sep <= radius + 1e-7)
    assert expected.sum() > 0
    assert abs(len(got) - expected.sum()) <= ambiguous.sum()
    assert len(got) >= (expected & ~ambiguous).sum()
    # nearest first, distance in arcsec agrees with astropy
    np.testing.assert_allclose(np.asarray(got["distance"]), got_sep * 3600, atol=1e-6)
    assert np.all(np.diff(np.asarray(got["distance"])) >= 0)
    assert got["ra"].unit == u.deg
    assert got["distance"].unit == u.arcsec


def test_largest_cone_is_a_hemisphere(catalog: Catalog, sky: dict[str, Any]) -> None:
    got = cone_search(0.0, 90.0, 90.0, run=sky["run"], limit=None, columns=["dec"],
                      catalog=catalog)
    dec = np.asarray(sky["coords"].dec.deg)
    assert len(got) == np.count_nonzero(dec >= 0)


def test_query_uses_the_gist_index(catalog: Catalog, sky: dict[str, Any]) -> None:
    # the sky fixture spreads ~100 rows per sky cell (v14), which a seq scan reads faster
    plan = explain(cone_query(10.0, 20.0, "6arcmin", run=sky["run"]), catalog=catalog,
                   planner={"enable_seqscan": "off"})
    assert GIST_SCAN.search(plan), plan
    assert "Seq Scan" not in plan
    assert "Append" not in plan  # the run's own partition alone, and of it one sky cell


def test_production_view_and_run_filter(catalog: Catalog, make_run: Callable[..., str],
                                        sources: Sources,
                                        finish_lazysky_run: Callable[..., None]) -> None:
    prod, exp = make_run("prod"), make_run("exp")
    data = sources(20, seed=9, ra_range=(100.0, 100.1), dec_range=(-20.0, -19.9))
    write_sources("coadd", prod, "v", data, catalog=catalog)
    write_sources("coadd", exp, "v", data, catalog=catalog)
    finish_lazysky_run(catalog, prod, "view-field", ["v"])
    finish_lazysky_run(catalog, exp, "view-field", ["v"])
    assert len(cone_search(100.05, -19.95, "0.2deg", table="coadd_prod", run=prod,
                           catalog=catalog)) == 0  # finished, not yet published
    publish(prod, catalog=catalog)
    everything = cone_search(100.05, -19.95, "0.2deg", catalog=catalog)
    assert {prod, exp} <= set(everything["run_id"])
    only_prod = cone_search(100.05, -19.95, "0.2deg", table="coadd_prod", catalog=catalog)
    assert set(only_prod["run_id"]) <= {r for r in everything["run_id"] if r.startswith("prod")}
    assert prod in set(only_prod["run_id"])
    one = cone_search(100.05, -19.95, "0.2deg", run=exp, catalog=catalog)
    assert set(one["run_id"]) == {exp}
    assert len(one) == 20
    promote(exp, reason="the experiment is better", catalog=catalog)  # the view switches
    switched = cone_search(100.05, -19.95, "0.2deg", table="coadd_prod", catalog=catalog)
    assert exp in set(switched["run_id"])
    assert prod not in set(switched["run_id"])
    # the view keeps the GiST index usable (tiny partitions may rightly be seq-scanned,
    # so the planner is told to prefer indexes: one it could not use would still show)
    plan = explain(cone_query(100.05, -19.95, "0.2deg", table="coadd_prod"), catalog=catalog,
                   planner={"enable_seqscan": "off"})
    assert "coadd_sources__prod" in plan
    assert "Seq Scan on coadd_sources" not in plan
    assert GIST_SCAN.search(plan), plan


def test_columns_where_limit(catalog: Catalog, sky: dict[str, Any]) -> None:
    t = cone_search(45.0, 30.0, 3.0, run=sky["run"], columns=["ra", "dec", "snr"],
                    where=[coadd_sources.c.snr > 250], limit=5, catalog=catalog)
    assert t.colnames == ["ra", "dec", "snr", "distance"]
    assert len(t) == 5
    assert np.all(np.asarray(t["snr"]) > 250)
    empty = cone_search(45.0, 30.0, "1arcsec", run=sky["run"], catalog=catalog)
    assert len(empty) == 0
    assert "distance" in empty.colnames


def test_sexagesimal_and_units(catalog: Catalog, sky: dict[str, Any]) -> None:
    a = cone_search("03:00:00", "+30:00:00", "180arcmin", run=sky["run"], catalog=catalog)
    b = cone_search(45.0, 30.0, 3.0 * u.deg, run=sky["run"], catalog=catalog)
    c = cone_search("3h00m00s", "30d00m00s", "3deg", run=sky["run"], catalog=catalog)
    assert len(a) == len(b) == len(c) > 0


@pytest.mark.parametrize(("ra", "dec", "radius", "match"), [
    (360.0, 0, 1, r"RA must lie in \[0, 360\)"),
    (-0.1, 0, 1, "RA must lie"),
    (10, 90.5, 1, r"Dec must lie in \[-90, 90\]"),
    (10, -91, 1, "Dec must lie"),
    (10, 0, 0, "radius must be positive"),
    (10, 0, -1, "radius must be positive"),
    (10, 0, 500, "at most 90 deg"),
    (10, 0, 90.5, "at most 90 deg"),
    (float("nan"), 0, 1, "finite"),
    (10, float("inf"), 1, "finite"),
    (10, 0, "nan", "must be an angle"),
    ("abc", 0, 1, "RA must be an angle"),
    (10, "1; DROP TABLE runs", 1, "Dec must be an angle"),
    (10, 0, "1) OR 1=1 --", "radius must be an angle"),
    (10, 0, "10 kg", "radius must be an angle"),
    (True, 0, 1, "RA must be an angle"),
    (None, 0, 1, "RA must be an angle"),
    (10, 0, 5 * u.kg, "not an angle"),
])
def test_bad_input_is_a_clear_error(ra: Any, dec: Any, radius: Any, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        cone_query(ra, dec, radius)


def test_bad_options() -> None:
    with pytest.raises(ParameterError, match="table must be one of"):
        cone_query(1, 1, 1, table="runs")
    with pytest.raises(ParameterError, match="unknown column"):
        cone_query(1, 1, 1, columns=["ra", "pos; DROP TABLE runs"])
    with pytest.raises(ParameterError, match="never SQL"):
        cone_query(1, 1, 1, where=["snr > 5"])  # type: ignore[list-item]
    with pytest.raises(ParameterError, match="limit"):
        cone_query(1, 1, 1, limit=0)
    with pytest.raises(ParameterError, match="run id"):
        cone_query(1, 1, 1, run="x' OR '1'='1")


def test_binary_fetch_equals_sqlalchemy_execution(catalog: Catalog, make_run: Callable[..., str],
                                                  sources: Sources) -> None:
    """cone_search reads binary rows from the driver; the same query with SQLAlchemy's
    ordinary (text) rows gives the same Table: NULLs as NaN, ints, text, units; a where
    clause SQLAlchemy completes at execution (``in_``) works too; the connection's
    cursors are text again afterwards."""
    import psycopg

    from lazysky.catalog.cone import _fetch_binary, to_table

    run = make_run()
    data = sources(400, seed=11, ra_range=(200.0, 200.5), dec_range=(10.0, 10.5))
    data["flux_kron"] = np.where(np.arange(400) % 3 == 0, np.nan, 7.5)
    write_sources("coadd", run, "bin-0", data, catalog=catalog)
    flags_in = coadd_sources.c.flags.in_([0, 2])
    for where in ([], [coadd_sources.c.snr > 100], [flags_in]):
        got = cone_search(200.25, 10.25, "10arcmin", run=run, where=where, catalog=catalog)
        stmt = cone_query(200.25, 10.25, "10arcmin", run=run, where=where)
        with catalog.engine().connect() as conn:
            ref = to_table(conn.execute(stmt), stmt)
        assert len(got) > 20
        assert got.colnames == ref.colnames
        for name in got.colnames:
            assert got[name].dtype == ref[name].dtype, name
            assert got[name].unit == ref[name].unit, name
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]))
        assert np.isnan(np.asarray(got["flux_kron"])).any()
        assert set(got["run_id"]) == {run}
    assert set(np.asarray(got["flags"])) <= {0, 2}
    with catalog.engine().connect() as conn:
        rows, names = _fetch_binary(conn, stmt)
        assert len(rows) == len(got)
        assert names == got.colnames
        driver = conn.connection.driver_connection
        assert driver.cursor_factory is psycopg.Cursor  # the pooled connection is as it was
        assert driver.cursor().format == psycopg.pq.Format.TEXT

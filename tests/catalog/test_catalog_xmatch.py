"""Cross-match == brute force, and its plan probes the GiST index per position."""

from __future__ import annotations

import re
from collections.abc import Callable

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from lazysky.catalog import Catalog, crossmatch, write_sources
from lazysky.catalog.xmatch import crossmatch_plan
from lazysky.errors import ParameterError

pytestmark = pytest.mark.postgres

#: An index scan on a month partition's GiST index (coadd_sources__exp__2026_11_pos_idx)
GIST_SCAN = re.compile(r"Index Scan (using|on) coadd_sources__\w+_pos_idx")

Sources = Callable[..., dict[str, np.ndarray]]


def test_crossmatch_equals_brute_force(catalog: Catalog, make_run: Callable[..., str],
                                       sources: Sources) -> None:
    run = make_run()
    data = sources(5000, seed=31, ra_range=(359.5, 360.5), dec_range=(-0.5, 0.5))
    write_sources("coadd", run, "xm", data, catalog=catalog)
    rng = np.random.default_rng(5)
    # half the positions near a source (within ~2"), half random
    pick = rng.choice(len(data["ra"]), 300, replace=False)
    ra = np.concatenate([(data["ra"][pick] + rng.normal(0, 1 / 3600, 300)) % 360,
                         rng.uniform(359.5, 360.5, 300) % 360])
    dec = np.concatenate([data["dec"][pick] + rng.normal(0, 1 / 3600, 300),
                          rng.uniform(-0.5, 0.5, 300)])
    radius = 2 / 3600
    got = crossmatch(ra, dec, "2arcsec", run=run, catalog=catalog)
    pos = SkyCoord(ra * u.deg, dec * u.deg)
    cat = SkyCoord(data["ra"] * u.deg, data["dec"] * u.deg)
    i_pos, i_cat, sep, _ = cat.search_around_sky(pos, radius * u.deg)
    expected = sorted(zip(i_pos.tolist(), (i_cat + 1).tolist(), strict=True))
    assert sorted(zip(got["index"].tolist(), got["number"].tolist(), strict=True)) == expected
    assert len(expected) > 250
    np.testing.assert_allclose(np.sort(np.asarray(got["distance"])),
                               np.sort(sep.arcsec), atol=1e-6)


def test_parallel_parts_give_the_same_answer(catalog: Catalog, make_run: Callable[..., str],
                                             sources: Sources) -> None:
    run = make_run()
    data = sources(20_000, seed=41, ra_range=(10.0, 11.0), dec_range=(-1.0, 0.0))
    write_sources("coadd", run, "xm-par", data, catalog=catalog)
    rng = np.random.default_rng(9)
    ra = np.concatenate([data["ra"][:6000], rng.uniform(10, 11, 6000)])
    dec = np.concatenate([data["dec"][:6000], rng.uniform(-1, 0, 6000)])
    one = crossmatch(ra, dec, "3arcsec", run=run, catalog=catalog, n_connections=1)
    two = crossmatch(ra, dec, "3arcsec", run=run, catalog=catalog, n_connections=2)
    assert len(one) >= 6000
    for name in ("index", "number", "distance"):
        np.testing.assert_array_equal(np.asarray(one[name]), np.asarray(two[name]))
    assert np.all(np.diff(np.asarray(two["index"])) >= 0)


def test_crossmatch_plan_probes_the_index(catalog: Catalog,
                                         seq_scanned_rows: Callable[[str], dict[str, int]],
                                         ) -> None:
    rng = np.random.default_rng(1)
    plan = crossmatch_plan(rng.uniform(0, 360, 2000), rng.uniform(-60, 60, 2000), "1arcsec",
                           catalog=catalog)
    assert "Nested Loop" in plan
    assert GIST_SCAN.search(plan), plan
    assert not any(seq_scanned_rows(plan).values()), plan


def test_plans_with_a_fresh_run_still_use_the_gist_index(
        catalog: Catalog, make_run: Callable[..., str], sources: Sources) -> None:
    """Statistics that do not know a new run must not steer the join to the primary key."""
    from lazysky.catalog import cone_query
    from lazysky.catalog.cone import explain

    with catalog.engine().begin() as conn:
        conn.exec_driver_sql("ANALYZE coadd_sources")
    run = make_run()  # written after ANALYZE: the planner thinks it has no rows
    write_sources("coadd", run, "fresh", sources(20_000, seed=2, ra_range=(50.0, 51.0),
                                                 dec_range=(0.0, 1.0)), catalog=catalog)
    rng = np.random.default_rng(3)
    plan = crossmatch_plan(rng.uniform(50, 51, 12_000), rng.uniform(0, 1, 12_000), "3arcsec",
                           run=run, catalog=catalog)
    assert GIST_SCAN.search(plan), plan
    assert "pkey" not in plan
    cone_plan = explain(cone_query(50.5, 0.5, "6arcmin", run=run), catalog=catalog)
    assert GIST_SCAN.search(cone_plan), cone_plan
    assert "pkey" not in cone_plan


def test_crossmatch_bad_input(catalog: Catalog) -> None:
    with pytest.raises(ParameterError, match="position 1"):
        crossmatch([1.0, 400.0], [0.0, 0.0], "1arcsec", catalog=catalog)
    with pytest.raises(ParameterError, match="equal length"):
        crossmatch([1.0, 2.0], [0.0], "1arcsec", catalog=catalog)
    with pytest.raises(ParameterError, match="radius"):
        crossmatch([1.0], [0.0], "0arcsec", catalog=catalog)

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


def test_crossmatch_plan_probes_the_index(catalog: Catalog, make_run: Callable[..., str],
                                         sources: Sources,
                                         seq_scanned_rows: Callable[[str], dict[str, int]],
                                         ) -> None:
    from lazysky.catalog.cells import cell_name, cells_of
    from lazysky.catalog.schema import partition_name
    from lazysky.runs import parse_run_id

    run = make_run()  # one dense sky cell, as a survey's are
    write_sources("coadd", run, "dense", sources(5000, seed=7, ra_range=(130.0, 131.0),
                                                 dec_range=(30.0, 31.0)), catalog=catalog)
    write_sources("coadd", run, "far", sources(50, seed=8, ra_range=(250.0, 251.0),
                                               dec_range=(-40.0, -39.0)), catalog=catalog)
    rid = parse_run_id(run)
    ((band, slab),) = cells_of([130.5], [30.5])
    dense = cell_name(partition_name("coadd_sources", rid.type, rid.date.replace(day=1)),
                      band, slab)
    with catalog.engine().begin() as conn:
        conn.exec_driver_sql(f"ANALYZE {dense}")
    rng = np.random.default_rng(1)
    plan = crossmatch_plan(rng.uniform(0, 360, 2000), rng.uniform(-60, 60, 2000), "1arcsec",
                           catalog=catalog)
    assert "Nested Loop" in plan
    assert re.search(rf"Index Scan (using|on) {dense}_pos_idx", plan), plan
    # a cell of a few heap pages (other tests' scattered rows) is rightly read whole per
    # probe; one with more rows never is
    assert all(rows < 1000 for rows in seq_scanned_rows(plan).values()), plan
    # run: each position probes only the cells its box touches (pruned at run time)
    ran = crossmatch_plan(rng.uniform(130.2, 130.8, 300), rng.uniform(30.2, 30.8, 300),
                          "1arcsec", catalog=catalog, analyze=True)
    probes = re.search(rf"on {dense} .*\(actual .* loops=(\d+)\)", ran)
    assert probes, ran
    assert int(probes.group(1)) == 300, ran
    cells = {c for c in re.findall(r"Scan (?:using \w+ )?on (coadd_sources__\w+) ", ran)
             if not c.endswith("_idx")}
    assert len(cells) >= 2, ran  # the month's other cells are in the plan ...
    never = {c for c in re.findall(r"on (coadd_sources__\w+) [^\n]*\(never executed\)", ran)
             if not c.endswith("_idx")}
    same = {c for c in cells if c.endswith(dense[dense.rindex("__"):])}  # other types'
    assert dense in same
    assert never == cells - same, ran  # ... and never probed


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

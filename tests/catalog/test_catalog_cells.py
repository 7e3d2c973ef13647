"""Sky cells (schema v14): cells made as tiles land, rows in the right cell, the cone's
box never losing a source, and the upgrade from v13."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import astropy.units as u
import numpy as np
import psycopg
import pytest
import sqlalchemy as sa
from astropy.coordinates import SkyCoord

from lazysky.catalog import Catalog, write_sources
from lazysky.catalog.cells import (
    DEC_BAND_DEG,
    N_BANDS,
    cell_name,
    cells_of,
    cone_bounds_arrays,
    slabs_in_band,
)
from lazysky.catalog.database import libpq_dsn
from lazysky.catalog.schema import partition_name
from lazysky.runs import parse_run_id

Sources = Callable[..., dict[str, np.ndarray]]


def _in_box(box: dict[str, np.ndarray], ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    return ((dec >= box["dec_lo"]) & (dec <= box["dec_hi"])
            & (((ra >= box["ra_lo1"]) & (ra <= box["ra_hi1"]))
               | ((ra >= box["ra_lo2"]) & (ra <= box["ra_hi2"]))))


@pytest.mark.parametrize("dec_range", [(-60.0, 60.0), (80.0, 90.0), (-90.0, -85.0)])
def test_the_box_holds_the_whole_cone(dec_range: tuple[float, float]) -> None:
    """Points on each cone's edge (the farthest a source in it can be) and inside lie in
    its box: across RA = 0/360, near and around the poles, small and large radii."""
    rng = np.random.default_rng(5)
    n = 400
    ra = rng.choice([0.0, 359.99, 0.01, 180.0, 90.0], n) + rng.uniform(-0.005, 0.005, n)
    ra = np.mod(np.where(rng.random(n) < 0.5, rng.uniform(0, 360, n), ra), 360.0)
    dec = rng.uniform(*dec_range, n)
    radius = np.exp(rng.uniform(np.log(1 / 3600), np.log(30.0), n))
    box = cone_bounds_arrays(ra, dec, radius)
    centre = SkyCoord(ra * u.deg, dec * u.deg)
    for angle in np.linspace(0, 360, 73):
        for fraction in (1.0, 0.5):
            edge = centre.directional_offset_by(angle * u.deg, fraction * radius * u.deg)
            inside = _in_box(box, edge.ra.deg, edge.dec.deg)
            assert inside.all(), (ra[~inside], dec[~inside], radius[~inside], angle)


def test_the_box_is_tight_away_from_the_poles() -> None:
    """The box is what prunes: at the equator it is the cone's own extent (plus the
    margin), and one RA range unless the cone crosses RA = 0."""
    box = cone_bounds_arrays(np.array([100.0, 0.05]), np.array([0.0, 0.0]), 0.1)
    assert box["dec_hi"][0] - box["dec_lo"][0] == pytest.approx(0.2, abs=1e-5)
    assert box["ra_hi1"][0] - box["ra_lo1"][0] == pytest.approx(0.2, abs=1e-5)
    assert (box["ra_lo2"][0], box["ra_hi2"][0]) == (box["ra_lo1"][0], box["ra_hi1"][0])
    assert box["ra_lo1"][1] == pytest.approx(359.95, abs=1e-5)  # across RA = 0: two ranges
    assert box["ra_hi1"][1] == 360.0
    assert (box["ra_lo2"][1], box["ra_hi2"][1]) == pytest.approx((0.0, 0.15), abs=1e-5)
    polar = cone_bounds_arrays(np.array([10.0]), np.array([89.95]), 0.1)  # holds the pole
    assert (polar["ra_lo1"][0], polar["ra_hi1"][0], polar["dec_hi"][0]) == (0.0, 360.0, 90.0)


def test_cells_cover_the_sky_in_bands_and_slabs() -> None:
    assert N_BANDS * DEC_BAND_DEG == 180.0
    assert slabs_in_band(N_BANDS // 2) == 6  # 60° at the equator ...
    assert slabs_in_band(0) == slabs_in_band(N_BANDS - 1) == 1  # ... one at the poles
    # a lower bound belongs to its cell (Dec 2 starts band 23; RA 60 the second slab)
    assert cells_of([0.0, 359.999, 60.0, 59.999], [-90.0, 90.0, 2.0, 1.999]) == [
        (0, 0), (22, 0), (23, 1), (N_BANDS - 1, 0)]


def _leaves(catalog: Catalog, run: str) -> dict[str, int]:
    with catalog.engine().connect() as conn:
        got = conn.execute(sa.text(
            "SELECT tableoid::regclass::text, count(*) FROM coadd_sources WHERE run_id = :r "
            "GROUP BY 1"), {"r": run})
        return {str(name): int(n) for name, n in got}


def test_rows_land_in_the_cell_of_their_position_made_as_they_land(
        catalog: Catalog, make_run: Callable[..., str], sources: Sources) -> None:
    """Positions on every kind of bound (band and slab edges, the poles, RA just below
    360, floats a hair below a bound) go to the cell computed for them, which the write
    made; a second write into the same cells makes none."""
    run = make_run()
    rid = parse_run_id(run)
    month = partition_name("coadd_sources", rid.type, rid.date.replace(day=1))
    below = float(np.nextafter(2.0, 0.0))
    ra = np.array([0.0, 359.9999999, 60.0, np.nextafter(60.0, 0.0), 10.0, 10.0, 10.0, 200.0])
    dec = np.array([-90.0, 90.0, 2.0, 2.0, below, -2.0, 1e-12, -33.3])
    rows = sources(len(ra), seed=1)
    rows["ra"], rows["dec"] = ra, dec
    with catalog.engine().connect() as conn:
        before = set(conn.execute(sa.text(
            "SELECT relname FROM pg_class WHERE relname LIKE :p"), {"p": f"{month}__%"})
            .scalars())
    write_sources("coadd", run, "edges", rows, catalog=catalog)
    expected: dict[str, int] = {}
    for r, d in zip(ra, dec, strict=True):
        ((band, slab),) = cells_of([r], [d])
        name = cell_name(month, band, slab)
        expected[name] = expected.get(name, 0) + 1
    assert _leaves(catalog, run) == expected
    with catalog.engine().connect() as conn:
        after = set(conn.execute(sa.text(
            "SELECT relname FROM pg_class WHERE relname LIKE :p"), {"p": f"{month}__%"})
            .scalars())
    assert set(expected) <= after
    assert set(expected) - before  # some were made by this write
    again = write_sources("coadd", run, "edges", rows, catalog=catalog)
    assert (again.deleted, again.inserted) == (len(ra), len(ra))
    assert _leaves(catalog, run) == expected


def test_writers_racing_into_new_cells(catalog: Catalog, make_run: Callable[..., str],
                                       sources: Sources) -> None:
    """Several processes' first tiles into the same missing cells at once: each cell is
    made once, every row lands."""
    import subprocess
    import sys
    import textwrap

    run = make_run("val")  # a type no other test writes: its cells are all missing
    script = textwrap.dedent("""
        import sys, numpy as np
        from lazysky.catalog import open_catalog, write_sources
        dsn, run, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
        cat = open_catalog(dsn=dsn)
        rng = np.random.default_rng(worker)
        for t in range(4):
            n = 300
            rows = {"x": rng.uniform(0, 10, n), "y": rng.uniform(0, 10, n),
                    "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-80, 80, n)}
            write_sources("coadd", run, f"w{worker}-{t}", rows, catalog=cat)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, catalog.dsn, run, str(w)],
                              stderr=subprocess.PIPE, text=True) for w in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert sum(_leaves(catalog, run).values()) == 3 * 4 * 300


def test_a_v13_catalog_upgrades_new_months_only(scratch: str, sources: Sources) -> None:
    """v14 re-makes the empty month partitions of coadd_sources split into cells; a month
    that holds rows stays a plain table (no row moves) and is still written, summarised
    and searched as before."""
    from lazysky.catalog import cone_search, register_run
    from lazysky.catalog.database import Catalog as Cat
    from lazysky.catalog.database import get_engine
    from lazysky.catalog.schema import CELLS_VERSION, apply_up_to, upgrade
    from lazysky.runs import Run, new_run_id

    engine = get_engine(scratch)
    old = Run(new_run_id("exp"))
    rid = parse_run_id(old.run_id)
    month = rid.date.replace(day=1)
    full = partition_name("coadd_sources", "exp", month)
    empty = partition_name("coadd_sources", "prod", month)

    def kind(name: str) -> Any:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT relkind::text FROM pg_class WHERE "
                                        "oid = to_regclass(:n)"), {"n": name}).scalar()

    try:
        with engine.begin() as conn:
            apply_up_to(conn, CELLS_VERSION - 1)
            conn.execute(sa.text("INSERT INTO runs (run_id, software_version) VALUES "
                                 "(:r, '0')"), {"r": old.run_id})
        assert (kind(full), kind(empty)) == ("r", "r")
        cat = Cat(scratch, None)
        data = sources(200, seed=2, ra_range=(40.0, 40.5), dec_range=(5.0, 5.5))
        write_sources("coadd", old.run_id, "t0", data, catalog=cat)
        assert upgrade(engine) >= CELLS_VERSION
        assert (kind(full), kind(empty)) == ("r", "p")
        nxt = partition_name("coadd_sources", "exp",
                             (month + dt.timedelta(days=32)).replace(day=1))
        assert kind(nxt) == "p"  # the months made ahead: split
        assert kind(partition_name("diff_sources", "prod", month)) == "r"  # keeps its key
        # the month with rows: written again (a replace) and searched, rows in place
        again = write_sources("coadd", old.run_id, "t0", data, catalog=cat)
        assert (again.deleted, again.inserted) == (200, 200)
        got = cone_search(40.25, 5.25, "0.5deg", run=old.run_id, limit=None, catalog=cat)
        assert len(got) == 200
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"SELECT count(*) FROM {full}")).scalar() == 200
        # a new run of the split month lands in a cell
        prod = Run(new_run_id("prod"))
        register_run(prod, catalog=cat)
        write_sources("coadd", prod.run_id, "t0", data, catalog=cat)
        ((band, slab),) = cells_of([40.25], [5.25])
        with psycopg.connect(libpq_dsn(scratch)) as conn:
            got_rows = conn.execute(
                f"SELECT count(*) FROM {cell_name(empty, band, slab)}").fetchone()
        assert got_rows == (200,)
    finally:
        engine.dispose()


def test_the_database_makes_the_cells_python_computes(catalog: Catalog) -> None:
    """``lazysky_cell_bounds`` (which makes the partitions' bounds) and ``cells_of``
    agree on every cell of the grid, to the last bit of every bound."""
    from lazysky.catalog import cells

    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        for band in range(N_BANDS):
            n = slabs_in_band(band)
            for slab in range(n):
                got = conn.execute("SELECT * FROM lazysky_cell_bounds(%s, %s)",
                                   (band, slab)).fetchone()
                expected = (n,
                            None if band == 0 else cells._BAND_LO[band],
                            None if band == N_BANDS - 1 else cells._BAND_LO[band + 1],
                            None if slab == 0 else cells._SLAB_LO[band][slab],
                            None if slab == n - 1 else cells._SLAB_LO[band][slab + 1])
                assert got == expected, (band, slab)


def test_a_writer_without_ownership_makes_its_cells(
        catalog: Catalog, plain_writer: Catalog, make_run: Callable[..., str],
        sources: Sources) -> None:
    """A role with only SELECT, INSERT and DELETE (PostgreSQL lets only the owner add a
    partition) writes a tile into a cell not made yet: ``lazysky_ensure_cell`` makes it as
    the owner; and the function refuses anything but a cell of the grid."""
    writer = plain_writer
    run = make_run("repr")
    rid = parse_run_id(run)
    month = partition_name("coadd_sources", rid.type, rid.date.replace(day=1))
    data = sources(40, seed=9, ra_range=(301.0, 301.5), dec_range=(-71.0, -70.5))
    ((band, slab),) = cells_of(data["ra"], data["dec"])
    cell = cell_name(month, band, slab)
    with catalog.engine().connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass(:c)"), {"c": cell}).scalar() is None
    write_sources("coadd", run, "t", data, catalog=writer)
    assert _leaves(catalog, run) == {cell: 40}
    with psycopg.connect(libpq_dsn(writer.dsn), autocommit=True) as conn:
        owner = conn.execute("SELECT pg_get_userbyid(relowner) FROM pg_class "
                             "WHERE oid = to_regclass(%s)", (cell,)).fetchone()
        assert owner is not None
        assert owner[0] != "test_writer"
        for args, error in (((month, N_BANDS, 0), "band must be in"),
                            ((month, band, 99), "slab of band"),
                            (("runs", 0, 0), "not a month partition"),
                            ((partition_name("diff_sources", rid.type,
                                             rid.date.replace(day=1)), 0, 0),
                             "not a month partition")):
            with pytest.raises(psycopg.errors.RaiseException, match=error):
                conn.execute("SELECT lazysky_ensure_cell(%s, %s, %s)", args)

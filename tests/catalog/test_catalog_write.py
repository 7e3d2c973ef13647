"""Bulk writes: round trip, idempotent (run, tile) replace, bad input, concurrency, SIGKILL."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from lazysky.catalog import (
    Catalog,
    CatalogWriteError,
    Exposure,
    SPoly,
    coadd_sources,
    diff_sources,
    write_exposures,
    write_sources,
)
from lazysky.catalog.database import libpq_dsn
from lazysky.errors import ParameterError
from lazysky.runs import new_run_id

pytestmark = pytest.mark.postgres

Sources = Callable[..., dict[str, np.ndarray]]


def _rows(catalog: Catalog, table: sa.Table, run: str, tile: str) -> list[sa.Row[tuple]]:
    with catalog.engine().connect() as conn:
        return list(conn.execute(
            sa.select(table).where(table.c.run_id == run, table.c.tile_id == tile)
            .order_by(table.c.number)))


def test_round_trip_with_nan_as_null(catalog: Catalog, make_run: Callable[..., str],
                                     sources: Sources) -> None:
    run = make_run()
    data = sources(50, seed=1)
    data["flux_kron"] = np.where(np.arange(50) % 2 == 0, np.nan, 5.0)
    result = write_sources("coadd", run, "t0001", data, catalog=catalog)
    assert (result.table, result.deleted, result.inserted) == ("coadd_sources", 0, 50)
    rows = _rows(catalog, coadd_sources, run, "t0001")
    assert [r.number for r in rows] == list(range(1, 51))
    np.testing.assert_array_equal([r.ra for r in rows], data["ra"])
    np.testing.assert_array_equal([r.dec for r in rows], data["dec"])
    np.testing.assert_array_equal([r.snr for r in rows], data["snr"])
    np.testing.assert_array_equal([r.flags for r in rows], data["flags"])
    assert rows[0].flux_kron is None
    assert rows[1].flux_kron == 5.0
    # pos is the database's spoint of ra/dec
    assert rows[7].pos.lon_rad == pytest.approx(math.radians(data["ra"][7]), abs=1e-14)
    assert rows[7].pos.lat_rad == pytest.approx(math.radians(data["dec"][7]), abs=1e-14)


def test_rows_are_stored_in_spatial_order(catalog: Catalog, make_run: Callable[..., str],
                                          sources: Sources) -> None:
    run = make_run()
    write_sources("coadd", run, "order", sources(2000, seed=3, ra_range=(20.0, 21.0),
                                                 dec_range=(5.0, 6.0)), catalog=catalog)
    with catalog.engine().connect() as conn:
        stored = conn.execute(sa.text(
            "SELECT ra, dec, number FROM coadd_sources WHERE run_id = :r AND tile_id = 'order' "
            "ORDER BY ctid"), {"r": run}).all()
    strips = np.floor(np.array([r.dec for r in stored]) * 60)
    assert np.all(np.diff(strips) >= 0)
    assert sorted(r.number for r in stored) == list(range(1, 2001))


def test_replace_is_idempotent_per_run_and_tile(catalog: Catalog, make_run: Callable[..., str],
                                                sources: Sources) -> None:
    run, other = make_run(), make_run()
    write_sources("coadd", other, "t0002", sources(7, seed=3), catalog=catalog)
    write_sources("coadd", run, "t0003", sources(9, seed=4), catalog=catalog)
    first = sources(30, seed=2)
    write_sources("coadd", run, "t0002", first, catalog=catalog)
    again = write_sources("coadd", run, "t0002", first, catalog=catalog)  # a retried task
    assert (again.deleted, again.inserted) == (30, 30)
    assert len(_rows(catalog, coadd_sources, run, "t0002")) == 30
    smaller = sources(12, seed=5)
    write_sources("coadd", run, "t0002", smaller, catalog=catalog)  # a re-run
    rows = _rows(catalog, coadd_sources, run, "t0002")
    np.testing.assert_array_equal([r.ra for r in rows], smaller["ra"])
    # other runs and tiles untouched
    assert len(_rows(catalog, coadd_sources, other, "t0002")) == 7
    assert len(_rows(catalog, coadd_sources, run, "t0003")) == 9


def test_ra_is_wrapped(catalog: Catalog, make_run: Callable[..., str], sources: Sources) -> None:
    run = make_run()
    data = sources(3, seed=1)
    data["ra"] = np.array([-1e-9, 360.0, 370.5])
    write_sources("coadd", run, "wrap", data, catalog=catalog)
    got = [r.ra for r in _rows(catalog, coadd_sources, run, "wrap")]
    assert got[1:] == [0.0, pytest.approx(10.5)]
    assert 359.99 < got[0] < 360.0


def test_difference_sources_with_sign_and_exposures(catalog: Catalog,
                                                    make_run: Callable[..., str],
                                                    sources: Sources) -> None:
    run = make_run()
    fp = SPoly.from_degrees([(10, 10), (11, 10), (11, 11), (10, 11)])
    write_exposures([Exposure("deep1-r-e003-d01", "tiny", "r", 60000.5, 30.0, fp),
                     Exposure("deep1-r-e004-d01", "tiny", "r", 60001.5, 30.0, fp)],
                    catalog=catalog)
    data = sources(6, seed=7)
    for key in ("flux_aper", "fluxerr_aper", "a", "b", "theta", "snr"):
        data.pop(key)
    data["flux_psf"] = np.array([-5.0, 3.0, -1.0, 2.0, 8.0, -9.0])
    data["sign"] = np.sign(data["flux_psf"]).astype(int)
    data["exposure_id"] = np.array(["deep1-r-e003-d01", "deep1-r-e004-d01"] * 3)
    write_sources("diff", run, "t0009", data, catalog=catalog)
    rows = _rows(catalog, diff_sources, run, "t0009")
    assert [r.sign for r in rows] == [-1, 1, -1, 1, 1, -1]
    assert [r.exposure_id for r in rows] == list(data["exposure_id"])
    with pytest.raises(ParameterError, match="sign"):
        write_sources("diff", run, "t0009", {k: v for k, v in data.items() if k != "sign"},
                      catalog=catalog)
    bad = dict(data, exposure_id=np.array(["nope"] * 6))
    with pytest.raises(CatalogWriteError, match="register the run"):
        write_sources("diff", run, "t0009", bad, catalog=catalog)
    assert len(_rows(catalog, diff_sources, run, "t0009")) == 6


def test_unregistered_run_is_a_clear_error(catalog: Catalog, sources: Sources) -> None:
    with pytest.raises(CatalogWriteError, match="register the run"):
        write_sources("coadd", new_run_id("exp"), "t1", sources(3, seed=0), catalog=catalog)


@pytest.mark.parametrize(("change", "match"), [
    ({"ra": np.array([1.0, np.nan, 3.0])}, "'ra' must be finite"),
    ({"dec": np.array([1.0, 91.0, 3.0])}, r"dec must lie in \[-90, 90\]"),
    ({"x": np.array([1.0, np.inf, 3.0])}, "'x' must be finite"),
    ({"snr": np.array(["a", "b", "c"])}, "'snr' must be numeric"),
    ({"bogus": np.zeros(3)}, "unknown column"),
    ({"y": np.zeros(2)}, "1-d with 3 rows"),
    ({"number": np.array([3, 1, 3])}, "'number' must be unique within a \\(run, tile\\); 3"),
])
def test_bad_rows_are_refused_before_writing(catalog: Catalog, make_run: Callable[..., str],
                                             sources: Sources, change: dict[str, np.ndarray],
                                             match: str) -> None:
    run = make_run()
    write_sources("coadd", run, "keep", sources(3, seed=1), catalog=catalog)
    data = dict(sources(3, seed=1), **change)
    with pytest.raises(ParameterError, match=match):
        write_sources("coadd", run, "keep", data, catalog=catalog)
    assert len(_rows(catalog, coadd_sources, run, "keep")) == 3


def test_bad_arguments(catalog: Catalog, make_run: Callable[..., str], sources: Sources) -> None:
    with pytest.raises(ParameterError, match="'coadd' or 'diff'"):
        write_sources("runs", make_run(), "t", sources(1, seed=0), catalog=catalog)
    with pytest.raises(ParameterError, match="run id"):
        write_sources("coadd", "prod'; DROP TABLE runs; --", "t", sources(1, seed=0),
                      catalog=catalog)
    with pytest.raises(ParameterError, match="tile_id"):
        write_sources("coadd", make_run(), "", sources(1, seed=0), catalog=catalog)
    with pytest.raises(ParameterError, match="astropy Table"):
        write_sources("coadd", make_run(), "t", [1, 2, 3], catalog=catalog)
    with pytest.raises(ParameterError, match="durable must be True or False"):
        write_sources("coadd", make_run(), "t", sources(1, seed=0), catalog=catalog,
                      durable="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("durable", [False, True])
def test_asynchronous_commit_stays_inside_the_write(catalog: Catalog,
                                                    make_run: Callable[..., str],
                                                    sources: Sources, durable: bool) -> None:
    """The loader's ``synchronous_commit = off`` is SET LOCAL: the connection (pooled,
    reused by e.g. mark_tile_done right after) is back to synchronous commits, and the
    rows are committed either way."""
    from lazysky.catalog.schema import SOURCE_TABLES
    from lazysky.catalog.write import _columns_of, _prepare, _replace

    run = make_run()
    tbl = SOURCE_TABLES["coadd"]
    rows, names, _ = _prepare(tbl, sources(30, seed=4))
    # autocommit: like the pool's idle connections, so the write is its own transaction
    with psycopg.connect(libpq_dsn(catalog.dsn), autocommit=True) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        deleted, inserted = _replace(conn, tbl, run, "async", rows, names, _columns_of(tbl),
                                     [], durable=durable)
        assert (deleted, inserted) == (0, 30)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert len(_rows(catalog, coadd_sources, run, "async")) == 30


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from lazysky.catalog import open_catalog, write_sources
    dsn, run, worker, n_rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cat = open_catalog(dsn=dsn)
    rng = np.random.default_rng(worker)
    def rows(n, flag):
        return {"x": rng.uniform(0, 10, n), "y": rng.uniform(0, 10, n),
                "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-90, 90, n),
                "flags": np.full(n, flag)}
    for i in range(n_rounds):
        write_sources("coadd", run, f"own-{worker}", rows(200 + worker, worker), catalog=cat)
        write_sources("coadd", run, "shared", rows(100 * (worker + 1), worker), catalog=cat)
""")


@pytest.mark.slow
def test_concurrent_writers_in_several_processes(catalog: Catalog,
                                                 make_run: Callable[..., str]) -> None:
    run = make_run()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, catalog.dsn, run, str(w), "5"],
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        errors.append(err if p.returncode else "")
    assert not any(errors), errors
    for w in range(4):
        rows = _rows(catalog, coadd_sources, run, f"own-{w}")
        assert len(rows) == 200 + w
        assert {r.flags for r in rows} == {w}
    shared = _rows(catalog, coadd_sources, run, "shared")
    writers = {r.flags for r in shared}
    assert len(writers) == 1, "rows of two writers mixed in one (run, tile)"
    assert len(shared) == 100 * (writers.pop() + 1)


_LOADER = textwrap.dedent("""
    import sys, numpy as np
    from lazysky.catalog import open_catalog, write_sources
    dsn, run, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = np.random.default_rng(0)
    rows = {"x": rng.uniform(0, 10, n), "y": rng.uniform(0, 10, n),
            "ra": rng.uniform(0, 360, n), "dec": rng.uniform(-90, 90, n),
            "flags": np.full(n, 7)}
    cat = open_catalog(dsn=dsn)
    print("ready", flush=True)
    write_sources("coadd", run, "killed", rows, catalog=cat)
    print("finished", flush=True)
""")


@pytest.mark.slow
def test_sigkill_mid_copy_leaves_previous_rows(catalog: Catalog, make_run: Callable[..., str],
                                               sources: Sources) -> None:
    run = make_run()
    before = sources(25, seed=11)
    write_sources("coadd", run, "killed", before, catalog=catalog)
    n = 1_500_000
    loader = subprocess.Popen([sys.executable, "-c", _LOADER, catalog.dsn, run, str(n)],
                              stdout=subprocess.PIPE, text=True)
    assert loader.stdout is not None
    assert loader.stdout.readline().strip() == "ready"
    seen = 0
    with psycopg.connect(libpq_dsn(catalog.dsn), autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = conn.execute("SELECT tuples_processed FROM pg_stat_progress_copy "
                               "WHERE command = 'COPY FROM'").fetchone()
            if row and row[0] > 0:
                seen = int(row[0])
                os.kill(loader.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    loader.wait(timeout=30)
    loader.stdout.close()
    assert loader.returncode == -signal.SIGKILL
    assert 0 < seen < n, "the loader was not caught in the middle of its COPY"
    rows = _rows(catalog, coadd_sources, run, "killed")
    np.testing.assert_array_equal([r.ra for r in rows], before["ra"])
    assert all(r.flags != 7 for r in rows)
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:  # the ledger: the write before
        assert conn.execute("SELECT rows FROM source_tiles WHERE run_id = %s AND tile_id = "
                            "'killed'", (run,)).fetchall() == [(25,)]
    retry = write_sources("coadd", run, "killed", sources(8, seed=12), catalog=catalog)
    assert (retry.deleted, retry.inserted) == (25, 8)


def test_a_plain_role_relies_on_the_foreign_key_triggers(
        catalog: Catalog, plain_writer: Catalog, make_run: Callable[..., str],
        sources: Sources) -> None:
    """Without superuser rights the per-row foreign-key triggers do the checking."""
    writer = plain_writer
    run = make_run()
    write_sources("coadd", run, "plain", sources(10, seed=1), catalog=writer)
    assert len(_rows(catalog, coadd_sources, run, "plain")) == 10
    with pytest.raises(CatalogWriteError, match="register the run"):
        write_sources("coadd", new_run_id("exp"), "plain", sources(3, seed=0), catalog=writer)

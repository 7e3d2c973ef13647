"""Binary COPY straight into the source tables (schema v13) and its staging-table fallback."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
import pytest
import sqlalchemy as sa

from lazysky.catalog import (
    Catalog,
    CatalogWriteError,
    Exposure,
    SPoly,
    write_exposures,
    write_sources,
)
from lazysky.catalog import write as write_module
from lazysky.catalog._binary import HAS_RECEIVE_SQL, RECEIVE_FUNCTION, ensure_spoint_receive
from lazysky.catalog.database import libpq_dsn

pytestmark = pytest.mark.postgres

Sources = Callable[..., dict[str, np.ndarray]]


@pytest.fixture
def copy_targets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tables the writer's COPYs went into (the real COPY still runs)."""
    targets: list[str] = []
    real = write_module._copy_binary

    def recording(cur: Any, target: str, columns: list[str], payload: memoryview) -> None:
        targets.append(target)
        real(cur, target, columns, payload)

    monkeypatch.setattr(write_module, "_copy_binary", recording)
    return targets


def _stored(catalog: Catalog, table: str, run: str, tile: str) -> list[tuple[Any, ...]]:
    """Every column of the stored rows but tile_id (pos as text), by number."""
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        cols = [r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped AND attname <> 'tile_id' ORDER BY attnum",
            (table,)).fetchall()]
        select = ", ".join(f"{c}::text" if c == "pos" else c for c in cols)
        return conn.execute(f"SELECT {select} FROM {table} WHERE run_id = %s AND "
                            f"tile_id = %s ORDER BY number", (run, tile)).fetchall()


def _with_nans(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(data["ra"])
    data["snr"][[0, n - 1]] = np.nan  # first and last row
    data["flux_aper"][::3] = np.nan
    data["theta"][:] = np.nan  # a whole column
    data["a"][5] = np.nan
    return data


def test_direct_and_staged_writes_store_the_same_coadd_rows(
        catalog: Catalog, make_run: Callable[..., str], sources: Sources,
        copy_targets: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run()
    data = _with_nans(sources(500, seed=21))
    direct = write_sources("coadd", run, "direct", data, catalog=catalog)
    monkeypatch.setattr(write_module, "DIRECT_COPY", False)
    staged = write_sources("coadd", run, "staged", data, catalog=catalog)
    assert copy_targets == ["coadd_sources", "_stage_coadd_sources"]
    assert direct.inserted == staged.inserted == 500
    a = _stored(catalog, "coadd_sources", run, "direct")
    assert a == _stored(catalog, "coadd_sources", run, "staged")
    assert len(a) == 500
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        nulls = conn.execute(
            "SELECT count(*) FILTER (WHERE snr IS NULL), count(*) FILTER (WHERE theta IS NULL),"
            " count(*) FILTER (WHERE flux_aper IS NULL), count(*) FILTER (WHERE a IS NULL), "
            "count(*) FILTER (WHERE b IS NULL) FROM coadd_sources WHERE run_id = %s AND "
            "tile_id = 'direct'", (run,)).fetchone()
    assert nulls == (2, 500, 167, 1, 0)


def test_direct_and_staged_writes_store_the_same_difference_rows(
        catalog: Catalog, make_run: Callable[..., str], sources: Sources,
        copy_targets: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Exposure ids of different lengths: each row's text is sent at its own length."""
    run = make_run()
    fp = SPoly.from_degrees([(10, 10), (11, 10), (11, 11), (10, 11)])
    ids = ["e1", "deep1-r-e017-d02", "deep1-r-e018-d02-long-name"]
    write_exposures([Exposure(e, "tiny", "r", 60000.5 + i, 30.0, fp)
                     for i, e in enumerate(ids)], catalog=catalog)
    data = sources(300, seed=22)
    for key in ("flux_aper", "fluxerr_aper"):
        data.pop(key)
    data["flux_psf"] = np.random.default_rng(1).normal(0, 5, 300)
    data["flux_psf"][::7] = np.nan
    data["sign"] = np.where(np.nan_to_num(data["flux_psf"]) < 0, -1, 1)
    data["exposure_id"] = np.array(ids * 100)
    write_sources("diff", run, "direct", data, catalog=catalog)
    monkeypatch.setattr(write_module, "DIRECT_COPY", False)
    write_sources("diff", run, "staged", data, catalog=catalog)
    assert copy_targets == ["diff_sources", "_stage_diff_sources"]
    a = _stored(catalog, "diff_sources", run, "direct")
    assert a == _stored(catalog, "diff_sources", run, "staged")
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        got = conn.execute("SELECT exposure_id, count(*), count(flux_psf) FROM diff_sources "
                           "WHERE run_id = %s AND tile_id = 'direct' GROUP BY 1 ORDER BY 1",
                           (run,)).fetchall()
    assert got == [("deep1-r-e017-d02", 100, 86), ("deep1-r-e018-d02-long-name", 100, 86),
                   ("e1", 100, 85)]


@pytest.mark.parametrize("direct", [True, False])
def test_an_empty_tile_and_a_non_ascii_tile_id(
        catalog: Catalog, make_run: Callable[..., str], sources: Sources,
        monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    """A tile where nothing was detected replaces its rows with none; a tile id is text
    in the connection's encoding."""
    monkeypatch.setattr(write_module, "DIRECT_COPY", direct)
    run = make_run()
    write_sources("coadd", run, "empty", sources(5, seed=1), catalog=catalog)
    empty = {k: v[:0] for k, v in sources(5, seed=1).items()}
    got = write_sources("coadd", run, "empty", empty, catalog=catalog)
    assert (got.deleted, got.inserted) == (5, 0)
    write_sources("coadd", run, "tuile-déjà-vu-北", sources(4, seed=2), catalog=catalog)
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        assert conn.execute("SELECT tile_id, count(*) FROM coadd_sources WHERE run_id = %s "
                            "GROUP BY 1 ORDER BY 1", (run,)).fetchall() == [
            ("tuile-déjà-vu-北", 4)]


def test_a_row_the_table_refuses_changes_nothing(catalog: Catalog,
                                                 make_run: Callable[..., str],
                                                 sources: Sources,
                                                 copy_targets: list[str]) -> None:
    """A CHECK failing inside the direct COPY (number 0): the previous rows and the
    ledger's record of them stay."""
    run = make_run()
    before = sources(20, seed=3)
    write_sources("coadd", run, "keep", before, catalog=catalog)
    bad = sources(10, seed=4)
    bad["number"] = np.arange(10)  # 0 … 9: number must be > 0
    with pytest.raises(CatalogWriteError, match=r"(?s)number_positive.*Nothing was changed"):
        write_sources("coadd", run, "keep", bad, catalog=catalog)
    assert copy_targets == ["coadd_sources", "coadd_sources"]
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        ras = [r[0] for r in conn.execute("SELECT ra FROM coadd_sources WHERE run_id = %s "
                                          "AND tile_id = 'keep' ORDER BY number", (run,))]
        ledger = conn.execute("SELECT rows FROM source_tiles WHERE run_id = %s AND "
                              "tile_id = 'keep'", (run,)).fetchall()
    np.testing.assert_array_equal(ras, before["ra"])
    assert ledger == [(20,)]


def test_the_declared_receive_function_refuses_every_binary_spoint(catalog: Catalog) -> None:
    """v13 only makes the lookup succeed: a binary spoint is still refused."""
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        assert conn.execute(HAS_RECEIVE_SQL).fetchone() == (True,)
        assert conn.execute("SELECT typreceive::text FROM pg_type WHERE typname = 'spoint'"
                            ).fetchone() == (RECEIVE_FUNCTION,)
        conn.execute("CREATE TEMP TABLE points (p spoint)")
        row = struct.pack(">hi", 1, 16) + struct.pack(">dd", 0.5, 0.25)
        with pytest.raises(psycopg.errors.FeatureNotSupported,
                           match="cannot accept a value"), \
                conn.cursor().copy("COPY points FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(write_module._COPY_HEADER + row + write_module._COPY_TRAILER)


def test_without_a_receive_function_the_writer_stages(
        catalog: Catalog, scratch: str, sources: Sources, copy_targets: list[str]) -> None:
    """A catalog restored from a dump has lost the declaration: writes still work,
    through the staging table, and a superuser's upgrade declares it again."""
    from lazysky.catalog import register_run
    from lazysky.catalog.database import get_engine
    from lazysky.catalog.schema import upgrade
    from lazysky.runs import Run, new_run_id

    upgrade(get_engine(scratch))  # not open_catalog: it prepares a DSN once per process
    cat = Catalog(scratch, None)
    try:
        with psycopg.connect(libpq_dsn(scratch), autocommit=True) as conn:
            conn.execute("ALTER TYPE spoint SET (RECEIVE = NONE)")
            assert conn.execute(HAS_RECEIVE_SQL).fetchone() == (False,)
        run = Run(new_run_id("test"))
        register_run(run, catalog=cat)
        data = _with_nans(sources(50, seed=5))
        assert write_sources("coadd", run.run_id, "t1", data, catalog=cat).inserted == 50
        assert copy_targets == ["_stage_coadd_sources"]
        with cat.engine().begin() as conn:
            assert ensure_spoint_receive(conn) is True
        assert write_sources("coadd", run.run_id, "t1", data, catalog=cat).deleted == 50
        assert copy_targets == ["_stage_coadd_sources", "coadd_sources"]
    finally:
        cat.engine().dispose()


def test_a_plain_role_does_not_declare_it(catalog: Catalog, scratch: str) -> None:
    assert catalog.server is not None
    with psycopg.connect(libpq_dsn(scratch), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'test_plain'").fetchone():
            conn.execute("CREATE ROLE test_plain LOGIN")
        conn.execute("ALTER TYPE spoint SET (RECEIVE = NONE)")
    from lazysky.catalog.database import get_engine

    plain = catalog.server.dsn(user="test_plain").replace("/lazysky?", "/catalog_scratch?")
    engine = get_engine(plain)
    try:
        with engine.begin() as conn:
            assert ensure_spoint_receive(conn) is False
            assert conn.execute(sa.text(HAS_RECEIVE_SQL)).scalar() is False
    finally:
        engine.dispose()


def test_the_function_belongs_to_the_extension(catalog: Catalog) -> None:
    """So DROP EXTENSION pg_sphere takes it along instead of refusing."""
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        member = conn.execute(
            "SELECT e.extname FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid "
            "WHERE d.classid = 'pg_proc'::regclass AND d.deptype = 'e' "
            "AND d.objid = %s::regprocedure", (f"{RECEIVE_FUNCTION}(internal)",)).fetchall()
        in_extension = conn.execute(
            "SELECT 1 FROM pg_depend WHERE classid = 'pg_type'::regclass AND deptype = 'e' "
            "AND objid = 'spoint'::regtype").fetchone() is not None
    assert member == ([("pg_sphere",)] if in_extension else [])

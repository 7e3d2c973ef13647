"""Catalog test helpers; the embedded server itself (``catalog``) is in tests/conftest.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import psycopg
import pytest

from lazysky.catalog import Catalog, register_run
from lazysky.catalog.database import libpq_dsn
from lazysky.runs import Run, new_run_id


@pytest.fixture
def catalog_env(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment variables pointing a subprocess (lazysky CLI) at the test catalog."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAZYSKY_")}
    env["LAZYSKY_CATALOG_DSN"] = catalog.dsn
    return env


def _make_run(catalog: Catalog, kind: str = "test") -> str:
    run = Run(new_run_id(kind), config={"test": True})
    register_run(run, catalog=catalog)
    return run.run_id


def finish_as_lazysky_run(catalog: Catalog, run_id: str, field: str,
                          tiles: list[str]) -> None:
    """Record what `lazysky run` records of a finished run written by hand: its field and
    tile plan, both detection stages done for every tile, status done."""
    from lazysky.catalog import finish_run, mark_tile_done
    from lazysky.catalog.production import plan_run

    plan_run(run_id, field=field, tiles=tiles, catalog=catalog)
    for tile in tiles:
        for stage in ("detect-coadd", "detect-diff"):
            mark_tile_done(run_id, stage, tile, catalog=catalog)
    finish_run(run_id, status="done", catalog=catalog)


@pytest.fixture(scope="session")
def finish_lazysky_run() -> Callable[[Catalog, str, str, list[str]], None]:
    """:func:`finish_as_lazysky_run`, for tests (a fixture: `from conftest import` is
    ambiguous with several conftest modules)."""
    return finish_as_lazysky_run


@pytest.fixture
def plain_writer(catalog: Catalog) -> Catalog:
    """The catalog as ``test_writer``, a role with only SELECT, INSERT and DELETE on the
    tables (no superuser, owns nothing): what a deployment may give its loaders."""
    assert catalog.server is not None
    with psycopg.connect(libpq_dsn(catalog.dsn), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'test_writer'").fetchone():
            conn.execute("CREATE ROLE test_writer LOGIN")
        conn.execute("GRANT SELECT, INSERT, DELETE ON ALL TABLES IN SCHEMA public "
                     "TO test_writer")
    return Catalog(catalog.server.dsn(user="test_writer"), catalog.server)


@pytest.fixture
def make_run(catalog: Catalog) -> Callable[..., str]:
    """Register a fresh run (``make_run("prod")``) and return its id."""
    return lambda kind="test": _make_run(catalog, kind)


@pytest.fixture(scope="session")
def sources() -> Callable[..., dict[str, np.ndarray]]:
    """``sources(n, seed=…, ra_range=…, dec_range=…)``: random source columns."""
    return random_sources


def random_sources(n: int, *, seed: int, ra_range: tuple[float, float] = (0.0, 360.0),
                   dec_range: tuple[float, float] = (-90.0, 90.0)) -> dict[str, np.ndarray]:
    """Sources uniform on the sphere within the given RA/Dec box."""
    rng = np.random.default_rng(seed)
    lo, hi = np.sin(np.radians(dec_range))
    return {
        "x": rng.uniform(0, 2048, n),
        "y": rng.uniform(0, 2048, n),
        "ra": rng.uniform(*ra_range, n) % 360.0,
        "dec": np.degrees(np.arcsin(rng.uniform(lo, hi, n))),
        "flux_aper": rng.uniform(10, 1e4, n),
        "fluxerr_aper": rng.uniform(1, 10, n),
        "snr": rng.uniform(5, 500, n),
        "a": rng.uniform(1, 3, n),
        "b": rng.uniform(0.5, 1, n),
        "theta": rng.uniform(-np.pi / 2, np.pi / 2, n),
        "flags": rng.integers(0, 4, n),
    }


@pytest.fixture
def scratch(catalog: Catalog) -> Iterator[str]:
    """A DSN of an empty scratch database with pgSphere (dropped afterwards)."""
    from lazysky.catalog._extension import ensure_pg_sphere

    admin = libpq_dsn(catalog.dsn).replace("/lazysky?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS catalog_scratch")
        conn.execute("CREATE DATABASE catalog_scratch")
    dsn = catalog.dsn.replace("/lazysky?", "/catalog_scratch?")
    with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
        ensure_pg_sphere(conn)
    yield dsn
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE catalog_scratch WITH (FORCE)")


@pytest.fixture
def seq_scanned_rows(catalog: Catalog) -> Callable[[str], dict[str, int]]:
    """``f(plan)``: the source partitions a plan seq-scans, with the rows each holds.

    An empty partition (next month's, made ahead of time) is rightly seq-scanned, as is
    a sky cell of a few heap pages; the caller judges by the rows."""
    import re

    def scanned(plan: str) -> dict[str, int]:
        names = set(re.findall(r"Seq Scan on ((?:coadd|diff)_sources\w*)", plan))
        with catalog.engine().connect() as conn:
            return {n: int(conn.exec_driver_sql(f"SELECT count(*) FROM {n}").scalar() or 0)
                    for n in sorted(names)}

    return scanned

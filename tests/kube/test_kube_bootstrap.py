"""The catalog-bootstrap Job's code on the real embedded PostgreSQL: pgSphere (through the
Debian-trap-aware ensure_pg_sphere), schema, and a read-only role the SCS can use."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from lazysky.catalog import Catalog, open_catalog
from lazysky.catalog.database import READER_ROLE
from lazysky.cli import main
from lazysky.kube import bootstrap_catalog

pytestmark = pytest.mark.postgres


@pytest.fixture
def fresh_db(catalog: Catalog) -> Iterator[str]:
    """A new, empty database on the test server (no pgSphere, no tables)."""
    assert catalog.server is not None
    name = f"kube_boot_{uuid.uuid4().hex[:8]}"
    admin = catalog.server.dsn(dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield catalog.server.dsn(dbname=name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_bootstrap_then_the_reader_serves(fresh_db: str, catalog: Catalog) -> None:
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regtype('spoint')").fetchone() == (None,)
    result = bootstrap_catalog(fresh_db)
    assert result.reader_role == READER_ROLE
    assert result.schema_version >= 1
    assert result.pg_sphere_version
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT spoint(0.1, 0.2) <@ scircle(spoint(0.1, 0.2), 0.01)"
                            ).fetchone() == (True,)
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    assert tables
    # what `lazysky serve` does in its pod: open the catalog as the read-only role
    assert catalog.server is not None
    dbname = fresh_db.split("@/", 1)[1].split("?", 1)[0]
    reader_dsn = catalog.server.dsn(user=READER_ROLE, dbname=dbname)
    reader = open_catalog(dsn=reader_dsn)
    table = tables[0]
    with reader.engine().connect() as conn:
        conn.execute(sa.text(f'SELECT count(*) FROM "{table}"')).scalar()
    with psycopg.connect(reader_dsn) as conn, pytest.raises(
            psycopg.errors.ReadOnlySqlTransaction):
        conn.execute(f'DELETE FROM "{table}"')
    # idempotent: a second run (the Job re-applied) changes nothing and succeeds
    assert bootstrap_catalog(fresh_db) == result


def test_bootstrap_cli(fresh_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kube", "bootstrap-catalog", "--dsn", fresh_db]) == 0
    assert "catalog ready: pgSphere" in capsys.readouterr().out


def test_bootstrap_without_a_dsn(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LAZYSKY_CATALOG_DSN", raising=False)
    monkeypatch.delenv("LAZYSKY_CONFIG", raising=False)
    assert main(["kube", "bootstrap-catalog"]) == 1
    assert "catalog_dsn is not set" in capsys.readouterr().err


def test_bootstrap_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    dsn = "postgresql://lazysky@127.0.0.1:1/lazysky?connect_timeout=2"
    assert main(["kube", "bootstrap-catalog", "--dsn", dsn]) == 1
    assert "cannot connect to the catalog" in capsys.readouterr().err

"""The embedded server: start/stop/status, idempotence, root handling, pgSphere trap."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import psycopg
import pytest

from lazysky.catalog import Catalog, CatalogServerError
from lazysky.catalog import server as catalog_server
from lazysky.catalog._extension import ensure_pg_sphere, strip_legacy_smoc_operators
from lazysky.catalog.database import libpq_dsn
from lazysky.config import load_settings

pytestmark = pytest.mark.postgres


def test_session_server_runs_and_has_pgsphere(catalog: Catalog, catalog_dir: Path) -> None:
    state = catalog_server.status(catalog_dir)
    assert state.running
    assert state.pid
    assert catalog.dsn == state.server.dsn()
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        user = conn.execute("SELECT current_user").fetchone()
        version = conn.execute("SELECT pg_sphere_version()").fetchone()
        listen = conn.execute("SHOW listen_addresses").fetchone()
    assert user == ("lazysky",)
    assert version is not None
    assert version[0]
    assert listen == ("",), "the embedded server must not listen on TCP"


def test_server_settings_are_in_force(catalog: Catalog) -> None:
    """Every setting lazysky writes into the embedded cluster's postgresql.conf applies
    (e.g. wal_buffers, which loaders need; a typo would only be a log line)."""
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        for name, value in catalog_server.SERVER_SETTINGS.items():
            got = conn.execute(
                "SELECT setting, unit, pending_restart FROM pg_settings WHERE name = %s",
                (name,)).fetchone()
            assert got is not None, name
            shown = conn.execute(f"SHOW {name}").fetchone()
            assert shown == (value.strip("'"),), (name, shown, value)
            assert got[2] is False, name


@pytest.mark.skipif(os.geteuid() != 0, reason="root-only behaviour")
def test_as_root_the_server_runs_as_postgres(catalog_dir: Path, catalog: Catalog) -> None:
    import pwd

    pg = pwd.getpwnam("postgres")
    assert (catalog_dir / "pgdata").stat().st_uid == pg.pw_uid
    assert (catalog_dir / "socket").stat().st_mode & 0o777 == 0o700
    pid = catalog_server.status(catalog_dir).pid
    assert Path(f"/proc/{pid}").stat().st_uid == pg.pw_uid


@pytest.mark.skipif(os.geteuid() != 0, reason="root-only behaviour")
def test_as_root_an_unreachable_dir_is_a_clear_error() -> None:
    private = Path(tempfile.mkdtemp(prefix="lazysky-private-", dir="/tmp"))  # mode 0700
    try:
        with pytest.raises(CatalogServerError, match=r"cannot reach.*LAZYSKY_CATALOG_DIR"):
            catalog_server.start(private / "catalog")
    finally:
        import shutil

        shutil.rmtree(private)


def test_default_catalog_dir_as_root_is_outside_home() -> None:
    settings = load_settings()
    if os.geteuid() == 0:
        assert settings.catalog_dir == Path("/var/lib/lazysky/catalog")
    else:
        assert str(settings.catalog_dir).startswith("~")


def test_start_is_idempotent(catalog_dir: Path, catalog: Catalog) -> None:
    pid = catalog_server.status(catalog_dir).pid
    again = catalog_server.start(catalog_dir)
    assert again.dsn() == catalog.dsn
    assert catalog_server.status(catalog_dir).pid == pid


@pytest.mark.slow
def test_up_status_down_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(tempfile.mkdtemp(prefix="lazysky-cycle-", dir="/tmp"))
    path.chmod(0o755)
    try:
        assert not catalog_server.status(path).initialised
        server = catalog_server.start(path)
        state = catalog_server.status(path)
        assert state.running
        assert "running" in str(state)
        with psycopg.connect(server.dsn(dbname="postgres")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert catalog_server.stop(path) is True
        assert not catalog_server.status(path).running
        assert catalog_server.stop(path) is False
        # a setting the server does not know: the start fails naming it and the file;
        # the next start without it rewrites the file and runs
        monkeypatch.setenv(catalog_server.SETTINGS_ENV, "no_such_setting=1")
        with pytest.raises(CatalogServerError, match=r"(?s)did not start.*"
                           r"no_such_setting.*lazysky\.conf"):
            catalog_server.start(path)
        assert not catalog_server.status(path).running
        monkeypatch.delenv(catalog_server.SETTINGS_ENV)
        catalog_server.start(path)  # restarts on the existing cluster
        assert catalog_server.status(path).running
    finally:
        catalog_server.stop(path)
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def test_strip_removes_exactly_the_two_legacy_smoc_operators() -> None:
    packaged = sorted(Path("/usr/share/postgresql").glob("*/extension/pg_sphere--1.2*.sql"))
    if not packaged:
        pytest.skip("no packaged pg_sphere 1.2 script on this machine")
    text = packaged[-1].read_text()
    stripped, n = strip_legacy_smoc_operators(text)
    assert n == 2
    at_ops = re.findall(r"CREATE OPERATOR @ \((.*?)\);", stripped, re.DOTALL)
    assert at_ops
    assert not [op for op in at_ops if "smoc" in op]
    assert len(re.findall(r"CREATE OPERATOR @ \(", text)) == len(at_ops) + 2
    assert "MODULE_PATHNAME" not in stripped
    assert "\\echo" not in stripped
    assert stripped.count("CREATE OPERATOR <@") == text.count("CREATE OPERATOR <@")


def test_workaround_installs_a_working_pgsphere_with_gist(
        catalog: Catalog, caplog: pytest.LogCaptureFixture) -> None:
    """The Debian-bookworm work-around path, forced on a scratch database."""
    admin = libpq_dsn(catalog.dsn).replace("/lazysky?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS sphere_scratch")
        conn.execute("CREATE DATABASE sphere_scratch")
    try:
        scratch = libpq_dsn(catalog.dsn).replace("/lazysky?", "/sphere_scratch?")
        with psycopg.connect(scratch, autocommit=True) as conn:
            with caplog.at_level("WARNING", logger="lazysky.catalog._extension"):
                version = ensure_pg_sphere(conn, force_script=True)
            assert version
            assert "without its 2 legacy '@' operators on smoc" in caplog.text
            assert conn.execute(
                "SELECT count(*) FROM pg_extension WHERE extname = 'pg_sphere'"
            ).fetchone() == (0,)
            conn.execute("CREATE TABLE p (pos spoint)")
            conn.execute("INSERT INTO p SELECT spoint(random() * 6.28, random() * 3 - 1.5)"
                         " FROM generate_series(1, 2000)")
            conn.execute("CREATE INDEX ON p USING gist (pos)")
            conn.execute("ANALYZE p")
            plan = "\n".join(r[0] for r in conn.execute(
                "EXPLAIN SELECT * FROM p WHERE pos <@ scircle(spoint(1, 0.2), 0.01)"))
            assert "Index" in plan
            assert "p_pos_idx" in plan
            # second call: detected as present, nothing done
            assert ensure_pg_sphere(conn) == version
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("DROP DATABASE IF EXISTS sphere_scratch")

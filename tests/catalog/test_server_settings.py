"""The embedded server's settings: computed from the machine's memory, overridable."""

from __future__ import annotations

import os
import re
from pathlib import Path

import psycopg
import pytest

from lazysky.catalog import Catalog
from lazysky.catalog import server as catalog_server
from lazysky.catalog.database import libpq_dsn
from lazysky.errors import ConfigError, ParameterError

GiB = 2**30


@pytest.mark.parametrize(("memory", "expected"), [
    (2 * GiB, "512MB"),          # a quarter of the memory …
    (3 * GiB, "768MB"),
    (256 * 2**20, "128MB"),      # … at least PostgreSQL's default …
    (24 * GiB, "1024MB"),        # … at most 1 GB
    (1024 * GiB, "1024MB"),
])
def test_shared_buffers_is_a_quarter_of_memory_within_bounds(memory: int,
                                                             expected: str) -> None:
    got = catalog_server.build_server_settings(memory)
    assert got["shared_buffers"] == expected
    for name, value in catalog_server.SERVER_SETTINGS.items():
        assert got[name] == value


def test_overrides_win_and_add_settings() -> None:
    got = catalog_server.build_server_settings(
        24 * GiB, overrides={"shared_buffers": "1GB", "wal_compression": "lz4"})
    assert got["shared_buffers"] == "1GB"
    assert got["wal_compression"] == "lz4"
    assert got["max_wal_size"] == catalog_server.SERVER_SETTINGS["max_wal_size"]


@pytest.mark.parametrize("memory", [0, -1, 1.5, True, "8GB"])
def test_memory_must_be_a_positive_byte_count(memory: object) -> None:
    with pytest.raises(ParameterError, match="memory_bytes must be a positive number"):
        catalog_server.build_server_settings(memory)  # type: ignore[arg-type]


def test_machine_memory_is_at_most_the_physical_ram() -> None:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0]  # MemTotal: N kB
    physical = int(meminfo.split()[1]) * 1024
    got = catalog_server.machine_memory_bytes()
    assert 0 < got <= physical


def test_parse_overrides() -> None:
    parse = catalog_server.parse_settings_overrides
    assert parse("") == {}
    assert parse(" shared_buffers = 2GB ;; Max_WAL_Size=8GB; ") == {
        "shared_buffers": "2GB", "max_wal_size": "8GB"}
    assert parse("log_line_prefix='%m [%p] '") == {"log_line_prefix": "%m [%p] "}
    assert parse("pg_stat_statements.max=500") == {"pg_stat_statements.max": "500"}


@pytest.mark.parametrize(("text", "match"), [
    ("shared_buffers", r"'shared_buffers' is not a setting; expected name=value"),
    ("shared buffers=1GB", r"is not a setting"),
    ("=1GB", r"is not a setting"),
    ("listen_addresses=*", r"listen_addresses cannot be overridden.*unix_socket_directories"),
    ("unix_socket_permissions=0777", r"cannot be overridden"),
    ("include=/etc/passwd", r"cannot be overridden"),
    ("work_mem=1MB\nlisten_addresses='*'", r"spans lines"),
])
def test_bad_overrides_are_clear_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        catalog_server.parse_settings_overrides(text)
    assert catalog_server.SETTINGS_ENV in str(err.value)


def test_conf_file_is_rewritten_and_included_once(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster made before lazysky.conf existed (its settings appended to
    postgresql.conf) gets the include at its end, once; each start rewrites the file
    with the environment's overrides."""
    server = catalog_server.EmbeddedServer(tmp_path / "catalog")
    server.pgdata.mkdir(parents=True)
    main_conf = server.pgdata / "postgresql.conf"
    main_conf.write_text("# lazysky embedded catalog\nshared_buffers = 1GB\n")
    monkeypatch.setenv(catalog_server.SETTINGS_ENV, "shared_buffers=3GB;work_mem=64MB")
    catalog_server._write_conf(server)
    monkeypatch.setenv(catalog_server.SETTINGS_ENV, "work_mem=32MB")
    got = catalog_server._write_conf(server)
    text = main_conf.read_text()
    assert text.count("include = 'lazysky.conf'") == 1
    assert text.index("shared_buffers = 1GB") < text.index("include = 'lazysky.conf'")
    conf = (server.pgdata / "lazysky.conf").read_text()
    assert "work_mem = 32MB\n" in conf
    assert "3GB" not in conf
    expected = catalog_server.build_server_settings(catalog_server.machine_memory_bytes())
    assert f"shared_buffers = {expected['shared_buffers']}\n" in conf
    assert got["shared_buffers"] == expected["shared_buffers"]
    assert f"unix_socket_directories = '{server.socket_dir}'\n" in conf
    assert "listen_addresses = ''\n" in conf
    assert not list(server.pgdata.glob("*.tmp"))


def test_the_running_server_uses_the_computed_settings(catalog: Catalog) -> None:
    """The session's embedded server runs with shared_buffers sized from this machine
    (and every other computed setting), read back from pg_settings."""
    expected = catalog_server.build_server_settings(
        catalog_server.machine_memory_bytes(),
        overrides=catalog_server.parse_settings_overrides(
            os.environ.get(catalog_server.SETTINGS_ENV, "")))
    with psycopg.connect(libpq_dsn(catalog.dsn)) as conn:
        for name, value in expected.items():
            if re.fullmatch(r"\d+(kB|MB|GB|TB)", value):  # SHOW picks its own unit
                same = conn.execute("SELECT pg_size_bytes(current_setting(%s)) = "
                                    "pg_size_bytes(%s)", (name, value)).fetchone()
                assert same == (True,), (name, value)
            else:
                shown = conn.execute(f"SHOW {name}").fetchone()
                assert shown == (value,), (name, shown, value)
            source = conn.execute("SELECT sourcefile FROM pg_settings WHERE name = %s",
                                  (name,)).fetchone()
            assert source is not None
            assert source[0] is None or source[0].endswith(("lazysky.conf",
                                                            "postgresql.auto.conf")), name

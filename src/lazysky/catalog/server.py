"""The embedded catalog server: a private PostgreSQL that lazysky runs itself.

When no DSN is configured, lazysky starts PostgreSQL from the installed server binaries
(``initdb``, ``pg_ctl``), in its own directory, listening only on a Unix socket in that
directory, with ``pg_sphere`` created in the ``lazysky`` database. The layout of the
catalog directory::

    <catalog_dir>/pgdata/          the cluster (mode 0700)
    <catalog_dir>/pgdata/lazysky.conf   lazysky's server settings, rewritten at every start
    <catalog_dir>/socket/          the Unix socket (mode 0700: only its owner connects)
    <catalog_dir>/server.log       the server's log

PostgreSQL refuses to run as root. Run as root, lazysky runs the server as the
``postgres`` system user (through ``runuser``) and hands it the catalog directory, which
must then lie where that user can reach it (not under a 0700 home directory; the default
as root is ``/var/lib/lazysky/catalog``). Run as a normal user, the server runs as that
user. Authentication is ``trust`` on the private socket: the directory's permissions are
the access control.

The settings (:func:`build_server_settings`) size ``shared_buffers`` from the machine's
memory; ``LAZYSKY_PG_SETTINGS`` (``name=value;name=value``) overrides any of them but
the socket and listening ones, from the next start on.

:func:`start`, :func:`stop` and :func:`status` are idempotent and safe to call from
several processes at once (a file lock serialises them).

Examples
--------
>>> from lazysky.catalog.server import start, stop
>>> server = start("/var/tmp/lazysky-doc-catalog")  # doctest: +SKIP
>>> server.dsn()  # doctest: +SKIP
'postgresql://lazysky@/lazysky?host=%2Fvar%2Ftmp%2Flazysky-doc-catalog%2Fsocket&port=5432'
>>> stop("/var/tmp/lazysky-doc-catalog")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from lazysky.catalog._errors import CatalogServerError
from lazysky.errors import ConfigError, ParameterError

__all__ = [
    "EmbeddedServer", "build_server_settings", "find_pg_bindir", "machine_memory_bytes",
    "parse_settings_overrides", "start", "status", "stop",
]

logger = logging.getLogger(__name__)

SUPERUSER = "lazysky"
DATABASE = "lazysky"
DEFAULT_PORT = 5432
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, keep a margin

#: Fixed server settings of the embedded cluster (PostgreSQL defaults otherwise);
#: :func:`build_server_settings` adds the ones computed from the machine.
SERVER_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "",
    "max_connections": "100",
    "max_wal_size": "4GB",
    # bulk loads write ~0.5 kB of WAL per row: with the default (1/32 of shared_buffers,
    # 8MB) the loaders keep stalling to write WAL themselves instead of the WAL writer
    "wal_buffers": "64MB",
    "checkpoint_timeout": "15min",
    "log_min_messages": "warning",
    "jit": "off",  # compiling costs more than short cone and cross-match queries take
}

#: Settings lazysky owns: the private socket is the access control (trust
#: authentication), so these are never taken from :data:`SETTINGS_ENV`.
PROTECTED_SETTINGS = frozenset({
    "listen_addresses", "port", "unix_socket_directories", "unix_socket_permissions",
    "unix_socket_group", "hba_file", "ident_file", "data_directory", "config_file",
    "include", "include_if_exists", "include_dir",
})

#: Environment variable of server setting overrides: ``name=value`` pairs separated by
#: ``;`` (e.g. ``shared_buffers=2GB;max_wal_size=8GB``); applied at the next start.
SETTINGS_ENV = "LAZYSKY_PG_SETTINGS"

#: ``shared_buffers`` is this fraction of the machine's memory, within the bounds below.
SHARED_BUFFERS_FRACTION = 0.25
SHARED_BUFFERS_MIN_MB = 128       # PostgreSQL's own default
# 1 GB: at 10 M rows (2.8 GB of heap + indexes) 6 GB bought nothing over 1 GB, neither
# for bulk loads nor for cones or cross-matches (interleaved A/Bs, docs/catalog.md),
# while 1 GB did ~6x fewer buffer reads than 256 MB for cone clients at 11 M rows; a
# bigger pool would only hold memory the pipeline's workers may need
SHARED_BUFFERS_MAX_MB = 1024

_CONF_FILE = "lazysky.conf"       # in pgdata, rewritten at every start
_INCLUDE_LINE = f"include = '{_CONF_FILE}'"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?$")
_BARE_VALUE_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def machine_memory_bytes() -> int:
    """The memory this process may use: physical RAM, or a lower cgroup limit.

    A container's limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``) wins
    over the host's RAM, so a CI job in a 4 GB container sizes for 4 GB.
    """
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            limit = int(Path(limit_file).read_text().strip())  # "max" -> ValueError
            if 0 < limit < total:
                total = limit
    return int(total)


def parse_settings_overrides(text: str, *, source: str = SETTINGS_ENV) -> dict[str, str]:
    """Server setting overrides from ``name=value;name=value`` (``source`` names them).

    Raises
    ------
    ConfigError
        When an item is not ``name=value``, a name is not a PostgreSQL setting name, a
        value spans lines, or a setting is one lazysky owns (:data:`PROTECTED_SETTINGS`).

    Examples
    --------
    >>> parse_settings_overrides("shared_buffers=2GB; max_wal_size = 8GB")
    {'shared_buffers': '2GB', 'max_wal_size': '8GB'}
    """
    out: dict[str, str] = {}
    for raw in text.split(";"):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or not _NAME_RE.match(name):
            msg = (f"{source}: {item!r} is not a setting; expected name=value pairs "
                   f"separated by ';', e.g. 'shared_buffers=2GB;max_wal_size=8GB'")
            raise ConfigError(msg)
        if name in PROTECTED_SETTINGS:
            msg = (f"{source}: {name} cannot be overridden: lazysky sets it (the server "
                   f"listens only on its private socket); settings lazysky owns: "
                   f"{', '.join(sorted(PROTECTED_SETTINGS))}")
            raise ConfigError(msg)
        if "\n" in value or "\r" in value:
            msg = f"{source}: the value of {name} spans lines: {value!r}"
            raise ConfigError(msg)
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1].replace("''", "'")
        out[name] = value
    return out


def build_server_settings(
    memory_bytes: int, *, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The embedded server's settings for a machine with ``memory_bytes`` of memory.

    :data:`SERVER_SETTINGS`, plus ``shared_buffers`` =
    :data:`SHARED_BUFFERS_FRACTION` of the memory, at least
    :data:`SHARED_BUFFERS_MIN_MB` and at most :data:`SHARED_BUFFERS_MAX_MB` (PostgreSQL
    touches its buffer pages only as it uses them), then ``overrides``.

    Parameters
    ----------
    memory_bytes
        The machine's (or container's) memory (:func:`machine_memory_bytes`).
    overrides
        Settings that win (:func:`parse_settings_overrides` of :data:`SETTINGS_ENV`).

    Returns
    -------
    dict
        Setting name → value, as PostgreSQL spells it (``"6026MB"``).

    Raises
    ------
    ParameterError
        When ``memory_bytes`` is not a positive number.

    Examples
    --------
    >>> build_server_settings(24 * 2**30)["shared_buffers"]
    '1024MB'
    >>> build_server_settings(2 * 2**30)["shared_buffers"]
    '512MB'
    >>> build_server_settings(2**30, overrides={"shared_buffers": "1GB"})["shared_buffers"]
    '1GB'
    """
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes <= 0:
        msg = f"memory_bytes must be a positive number of bytes, got {memory_bytes!r}"
        raise ParameterError(msg)
    shared_mb = int(memory_bytes * SHARED_BUFFERS_FRACTION) // 2**20
    shared_mb = min(max(shared_mb, SHARED_BUFFERS_MIN_MB), SHARED_BUFFERS_MAX_MB)
    settings = dict(SERVER_SETTINGS)
    settings["shared_buffers"] = f"{shared_mb}MB"
    settings.update(overrides or {})
    return settings


def _conf_value(value: str) -> str:
    """A value as postgresql.conf spells it (quoted unless a bare word or number)."""
    if _BARE_VALUE_RE.match(value):
        return value
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class EmbeddedServer:
    """Where an embedded server lives and how to reach it."""

    catalog_dir: Path
    port: int = DEFAULT_PORT

    @property
    def pgdata(self) -> Path:
        """The cluster's data directory."""
        return self.catalog_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        """The directory holding the Unix socket."""
        return self.catalog_dir / "socket"

    @property
    def log_file(self) -> Path:
        """The server's log file."""
        return self.catalog_dir / "server.log"

    def dsn(self, *, user: str = SUPERUSER, dbname: str = DATABASE) -> str:
        """A libpq URI for the server (``postgresql://user@/db?host=<socket dir>``)."""
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{user}@/{dbname}?host={host}&port={self.port}"


@dataclass(frozen=True)
class ServerStatus:
    """The state of an embedded server."""

    running: bool
    initialised: bool
    server: EmbeddedServer
    pid: int | None = None

    def __str__(self) -> str:
        if self.running:
            return f"running (pid {self.pid}) in {self.server.catalog_dir}: {self.server.dsn()}"
        state = "stopped" if self.initialised else "not initialised"
        return f"{state} ({self.server.catalog_dir})"


def find_pg_bindir() -> Path:
    """The directory of the newest installed PostgreSQL server binaries.

    ``$LAZYSKY_PG_BINDIR`` wins, then ``pg_ctl`` on ``PATH``, then Debian's
    ``/usr/lib/postgresql/<N>/bin``.

    Raises
    ------
    CatalogServerError
        When no ``initdb``/``pg_ctl`` is installed (the message says what to install).
    """
    candidates: list[Path] = []
    if env := os.environ.get("LAZYSKY_PG_BINDIR"):
        candidates.append(Path(env))
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).parent)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(debian)
    for cand in candidates:
        if (cand / "initdb").is_file() and (cand / "pg_ctl").is_file():
            return cand
    msg = (
        "no PostgreSQL server binaries (initdb, pg_ctl) found; install them (Debian: "
        "apt-get install postgresql-15 postgresql-15-pgsphere, or run bootstrap.sh), set "
        "LAZYSKY_PG_BINDIR to their directory, or configure LAZYSKY_CATALOG_DSN"
    )
    raise CatalogServerError(msg)


def _server_user() -> pwd.struct_passwd | None:
    """The system user the server runs as when we are root (else None: ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        msg = (
            "running as root, lazysky runs the catalog server as the 'postgres' system "
            "user, which does not exist; install the postgresql package (it creates it) "
            "or run lazysky as a normal user"
        )
        raise CatalogServerError(msg) from None


def _run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    user = _server_user()
    full = ["runuser", "-u", user.pw_name, "--", *cmd] if user else list(cmd)
    logger.debug("running %s", " ".join(full))
    proc = subprocess.run(full, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        msg = (
            f"{Path(cmd[0]).name} failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()}"
        )
        raise CatalogServerError(msg)
    return proc


def _prepare_dirs(server: EmbeddedServer) -> None:
    server.catalog_dir.mkdir(parents=True, exist_ok=True)
    user = _server_user()
    for d in (server.catalog_dir, server.socket_dir):
        d.mkdir(exist_ok=True)
        if user is not None:
            os.chown(d, user.pw_uid, user.pw_gid)
    server.socket_dir.chmod(0o700)
    if user is not None:
        probe = _run(["test", "-w", str(server.catalog_dir)], check=False)
        if probe.returncode != 0:
            msg = (
                f"the catalog server runs as the 'postgres' user (lazysky runs as root), "
                f"which cannot reach {server.catalog_dir}: a parent directory (e.g. a 0700 "
                f"home) blocks it; set LAZYSKY_CATALOG_DIR to a directory it can reach, "
                f"such as /var/lib/lazysky/catalog"
            )
            raise CatalogServerError(msg)
    sock = server.socket_dir / f".s.PGSQL.{server.port}"
    if len(str(sock)) > _SOCKET_PATH_MAX:
        msg = (
            f"the catalog socket path {sock} is too long for a Unix socket "
            f"({len(str(sock))} > {_SOCKET_PATH_MAX} bytes); use a shorter catalog_dir"
        )
        raise CatalogServerError(msg)


@contextlib.contextmanager
def locked(catalog_dir: Path) -> Iterator[None]:
    """Hold the catalog directory's file lock (one process at a time)."""
    catalog_dir.mkdir(parents=True, exist_ok=True)
    with open(catalog_dir / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _initdb(server: EmbeddedServer, bindir: Path) -> None:
    logger.info("initialising the embedded catalog cluster in %s", server.pgdata)
    _run([
        str(bindir / "initdb"), "-D", str(server.pgdata), "-U", SUPERUSER,
        "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions",
    ])


def _write_conf(server: EmbeddedServer) -> dict[str, str]:
    """Write ``<pgdata>/lazysky.conf`` for the next start; returns its settings.

    The settings are :func:`build_server_settings` for this machine with the overrides
    of :data:`SETTINGS_ENV`, then the private socket. ``postgresql.conf`` includes the
    file at its end (a cluster made before the file existed gets the include appended),
    so it wins over the cluster's own lines; ``ALTER SYSTEM`` still wins over both.
    """
    overrides = parse_settings_overrides(os.environ.get(SETTINGS_ENV, ""))
    settings = build_server_settings(machine_memory_bytes(), overrides=overrides)
    lines = [f"{k} = {_conf_value(v)}" for k, v in settings.items()]
    lines.append(f"unix_socket_directories = {_conf_value(str(server.socket_dir))}")
    lines.append("unix_socket_permissions = 0700")
    target = server.pgdata / _CONF_FILE
    tmp = target.with_name(_CONF_FILE + ".tmp")
    tmp.write_text(f"# written by lazysky at every start of the embedded server; edits are "
                   f"lost: set {SETTINGS_ENV} or use ALTER SYSTEM\n" + "\n".join(lines) + "\n")
    user = _server_user()
    if user is not None:
        os.chown(tmp, user.pw_uid, user.pw_gid)
    tmp.replace(target)
    main_conf = server.pgdata / "postgresql.conf"
    if _INCLUDE_LINE not in main_conf.read_text():
        with open(main_conf, "a") as fh:
            fh.write(f"\n# lazysky embedded catalog: its settings (rewritten at every "
                     f"start)\n{_INCLUDE_LINE}\n")
    logger.debug("embedded server settings: %s", settings)
    return settings


def status(catalog_dir: str | os.PathLike[str], *, port: int = DEFAULT_PORT) -> ServerStatus:
    """Is the embedded server in ``catalog_dir`` running?"""
    server = EmbeddedServer(Path(catalog_dir).expanduser().resolve(), port)
    if not (server.pgdata / "PG_VERSION").exists():
        return ServerStatus(False, False, server)
    proc = _run([str(find_pg_bindir() / "pg_ctl"), "-D", str(server.pgdata), "status"],
                check=False)
    if proc.returncode == 0:
        pid_line = (server.pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
        return ServerStatus(True, True, server, int(pid_line) if pid_line.isdigit() else None)
    return ServerStatus(False, True, server)


def start(
    catalog_dir: str | os.PathLike[str], *, port: int = DEFAULT_PORT, timeout_s: int = 60
) -> EmbeddedServer:
    """Start the embedded server (initialising it first if needed); idempotent.

    Parameters
    ----------
    catalog_dir
        The catalog directory (created if missing).
    port
        The port number naming the socket file (nothing listens on TCP).
    timeout_s
        How long to wait for the server to accept connections.

    Returns
    -------
    EmbeddedServer
        Where it runs; ``.dsn()`` gives the connection string.

    Raises
    ------
    CatalogServerError
        When the binaries are missing, the directory is unusable or the server fails
        to start (the message quotes the server log).
    """
    server = EmbeddedServer(Path(catalog_dir).expanduser().resolve(), port)
    bindir = find_pg_bindir()
    with locked(server.catalog_dir):
        _prepare_dirs(server)
        if not (server.pgdata / "PG_VERSION").exists():
            if server.pgdata.exists() and any(server.pgdata.iterdir()):
                msg = f"{server.pgdata} exists but holds no PostgreSQL cluster; remove it"
                raise CatalogServerError(msg)
            _initdb(server, bindir)
        if status(server.catalog_dir, port=port).running:
            return server
        settings = _write_conf(server)
        logger.info("starting the embedded catalog server in %s (shared_buffers %s)",
                    server.catalog_dir, settings["shared_buffers"])
        proc = _run([
            str(bindir / "pg_ctl"), "-D", str(server.pgdata), "-l", str(server.log_file),
            "-o", f"-p {port}", "-w", "-t", str(timeout_s), "start",
        ], check=False)
        if proc.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join(server.log_file.read_text().splitlines()[-10:])
            msg = f"the embedded catalog server did not start: {proc.stderr.strip()}\n{tail}"
            raise CatalogServerError(msg)
    return server


def stop(catalog_dir: str | os.PathLike[str], *, port: int = DEFAULT_PORT) -> bool:
    """Stop the embedded server (fast shutdown); returns whether it was running."""
    server = EmbeddedServer(Path(catalog_dir).expanduser().resolve(), port)
    with locked(server.catalog_dir):
        if not status(server.catalog_dir, port=port).running:
            return False
        logger.info("stopping the embedded catalog server in %s", server.catalog_dir)
        _run([str(find_pg_bindir() / "pg_ctl"), "-D", str(server.pgdata),
              "-m", "fast", "-w", "stop"])
    return True

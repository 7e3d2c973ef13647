"""The embedded catalog server: a private PostgreSQL that lazysky runs itself.

When no DSN is configured, lazysky starts PostgreSQL from the installed server binaries
(``initdb``, ``pg_ctl``), in its own directory, listening only on a Unix socket in that
directory, with ``pg_sphere`` created in the ``lazysky`` database. The layout of the
catalog directory::

    <catalog_dir>/pgdata/          the cluster (mode 0700)
    <catalog_dir>/socket/          the Unix socket (mode 0700: only its owner connects)
    <catalog_dir>/server.log       the server's log

PostgreSQL refuses to run as root. Run as root, lazysky runs the server as the
``postgres`` system user (through ``runuser``) and hands it the catalog directory, which
must then lie where that user can reach it (not under a 0700 home directory; the default
as root is ``/var/lib/lazysky/catalog``). Run as a normal user, the server runs as that
user. Authentication is ``trust`` on the private socket: the directory's permissions are
the access control.

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
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from lazysky.catalog._errors import CatalogServerError

__all__ = ["EmbeddedServer", "find_pg_bindir", "start", "status", "stop"]

logger = logging.getLogger(__name__)

SUPERUSER = "lazysky"
DATABASE = "lazysky"
DEFAULT_PORT = 5432
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, keep a margin

#: Server settings of the embedded cluster (PostgreSQL defaults otherwise).
SERVER_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "''",
    "max_connections": "100",
    # 1 GB holds the GiST index of ~10 M sources (0.7 GB) and the hot heap pages: at
    # 11 M rows 4 cone clients did ~6x fewer buffer reads than with 256MB (pages are
    # only allocated as they are used)
    "shared_buffers": "1GB",
    "max_wal_size": "4GB",
    # bulk loads write ~0.5 kB of WAL per row: with the default (1/32 of shared_buffers,
    # 8MB) the loaders keep stalling to write WAL themselves instead of the WAL writer
    "wal_buffers": "64MB",
    "checkpoint_timeout": "15min",
    "log_min_messages": "warning",
    "jit": "off",  # compiling costs more than short cone and cross-match queries take
}


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
    lines = [f"{k} = {v}" for k, v in SERVER_SETTINGS.items()]
    lines.append(f"unix_socket_directories = '{server.socket_dir}'")
    lines.append("unix_socket_permissions = 0700")
    conf = "\n# lazysky embedded catalog\n" + "\n".join(lines) + "\n"
    with open(server.pgdata / "postgresql.conf", "a") as fh:
        fh.write(conf)


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
        logger.info("starting the embedded catalog server in %s", server.catalog_dir)
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

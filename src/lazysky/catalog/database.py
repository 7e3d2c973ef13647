"""Opening the catalog: DSN from the settings, database and pgSphere, schema, engines.

:func:`open_catalog` is the one entry point: with no DSN configured it starts the
embedded server (:mod:`lazysky.catalog.server`), creates the ``lazysky`` database,
pgSphere and the read-only role ``lazysky_reader``, upgrades the schema, and returns a
:class:`Catalog` holding the DSN. Engines are made once per process and per DSN
(:func:`get_engine`), never at import; a forked process (a Dask worker) gets its own.

Examples
--------
>>> from lazysky.catalog import open_catalog
>>> catalog = open_catalog()  # doctest: +SKIP
>>> catalog.engine().dialect.name  # doctest: +SKIP
'postgresql'
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from lazysky.catalog import server as _server
from lazysky.catalog._errors import CatalogError
from lazysky.catalog._extension import ensure_pg_sphere
from lazysky.catalog.schema import LOCK_KEY, upgrade
from lazysky.config import Settings, load_settings

__all__ = ["READER_ROLE", "Catalog", "get_engine", "open_catalog", "sqlalchemy_url"]

logger = logging.getLogger(__name__)

READER_ROLE = "lazysky_reader"
_ENGINES: dict[tuple[int, str, bool], sa.Engine] = {}
_PREPARED: set[tuple[int, str]] = set()


def sqlalchemy_url(dsn: str) -> sa.URL:
    """A SQLAlchemy URL (psycopg 3 driver) from a libpq URI or SQLAlchemy URL."""
    if "://" not in dsn:
        msg = f"the catalog DSN must be a URI such as postgresql://user@host/db, got {dsn!r}"
        raise CatalogError(msg)
    url = make_url(dsn)
    if url.get_backend_name() != "postgresql":
        msg = f"the catalog needs PostgreSQL, the DSN names {url.get_backend_name()!r}"
        raise CatalogError(msg)
    return url.set(drivername="postgresql+psycopg")


def libpq_dsn(dsn: str) -> str:
    """A libpq URI for psycopg from a DSN that may carry a SQLAlchemy driver name."""
    return sqlalchemy_url(dsn).set(drivername="postgresql").render_as_string(
        hide_password=False)


#: Options of every lazysky session. Generic plans for prepared statements: psycopg
#: prepares a query run 5 times on a connection (a cone search, a write), and with
#: custom plans PostgreSQL re-plans every branch and partition of the production views
#: each time — ~1 ms per cone once experiments fill their partitions
#: (benchmarks/bench_partitions.py: p95 beside 10x experiments 2.3-5x that of
#: production alone with custom plans, 1.02x with generic ones). Partitions are still
#: pruned: at executor start-up from the parameters, and by the views' one-time filters.
SESSION_OPTIONS = "-c plan_cache_mode=force_generic_plan"


def get_engine(dsn: str, *, read_only: bool = False, statement_timeout_ms: int | None = None,
               pool_size: int = 5) -> sa.Engine:
    """The SQLAlchemy engine of this process for ``dsn`` (made on first use).

    Parameters
    ----------
    dsn
        The catalog DSN.
    read_only
        Sessions default to read-only transactions (the SCS service uses this).
    statement_timeout_ms
        Cancel statements running longer than this.
    pool_size
        Connections kept open per process.
    """
    key = (os.getpid(), f"{dsn}|{statement_timeout_ms}", read_only)
    engine = _ENGINES.get(key)
    if engine is None:
        options = [SESSION_OPTIONS]
        if read_only:
            options.append("-c default_transaction_read_only=on")
        if statement_timeout_ms is not None:
            options.append(f"-c statement_timeout={int(statement_timeout_ms)}")
        connect_args: dict[str, Any] = {"options": " ".join(options)} if options else {}
        engine = sa.create_engine(sqlalchemy_url(dsn), pool_size=pool_size,
                                  pool_pre_ping=False, connect_args=connect_args)
        _ENGINES[key] = engine
    return engine


def _prepare_embedded(server: _server.EmbeddedServer) -> None:
    with psycopg.connect(server.dsn(dbname="postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (_server.DATABASE,)).fetchone()
        if not exists:
            logger.info("creating the catalog database %r", _server.DATABASE)
            conn.execute(f'CREATE DATABASE "{_server.DATABASE}"')
        role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                            (READER_ROLE,)).fetchone()
        if not role:
            conn.execute(f"CREATE ROLE {READER_ROLE} LOGIN")
            conn.execute(f"ALTER ROLE {READER_ROLE} SET default_transaction_read_only = on")
            conn.execute(f"ALTER ROLE {READER_ROLE} SET statement_timeout = '10s'")


def _grant_reader(engine: sa.Engine) -> None:
    """Let the read-only role read every table (serialised: concurrent GRANTs collide)."""
    with engine.begin() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LOCK_KEY)))
        missing = conn.execute(sa.text(
            "SELECT count(*) FROM pg_roles r, pg_class c "
            "WHERE r.rolname = :r AND c.relnamespace = 'public'::regnamespace "
            "AND c.relkind IN ('r', 'p', 'v') AND NOT c.relispartition "  # read via parents
            "AND NOT has_table_privilege(r.oid, c.oid, 'SELECT')"),
            {"r": READER_ROLE}).scalar()
        if missing:
            conn.execute(sa.text(f"GRANT USAGE ON SCHEMA public TO {READER_ROLE}"))
            conn.execute(sa.text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READER_ROLE}"))


@dataclass(frozen=True)
class Catalog:
    """An opened catalog: its DSN and, for the embedded server, where it runs."""

    dsn: str
    server: _server.EmbeddedServer | None = None

    @property
    def reader_dsn(self) -> str:
        """The DSN of the read-only role (the SCS service connects with it)."""
        if self.server is not None:
            return self.server.dsn(user=READER_ROLE)
        return self.dsn

    def engine(self, **kwargs: Any) -> sa.Engine:
        """This process's engine for the catalog (see :func:`get_engine`)."""
        return get_engine(self.dsn, **kwargs)


def open_catalog(settings: Settings | None = None, *, dsn: str | None = None,
                 upgrade_schema: bool = True) -> Catalog:
    """Open the catalog: start the embedded server if needed, ensure pgSphere and schema.

    Parameters
    ----------
    settings
        lazysky settings (default: :func:`lazysky.config.load_settings`).
    dsn
        A DSN that wins over the settings.
    upgrade_schema
        Create or upgrade the schema (idempotent; done once per process and DSN).

    Raises
    ------
    CatalogError
        When the server cannot be reached or prepared (the message says why).
    """
    if dsn is None:
        settings = settings if settings is not None else load_settings()
        dsn = settings.catalog_dsn
        server = None
        if dsn is None:
            server = _server.start(settings.catalog_dir)
            dsn = server.dsn()
            if (os.getpid(), dsn) not in _PREPARED:
                with _server.locked(server.catalog_dir):
                    _prepare_embedded(server)
    else:
        server = None
    catalog = Catalog(dsn, server)
    if upgrade_schema and (os.getpid(), dsn) not in _PREPARED:
        try:
            with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
                conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
                try:
                    version = ensure_pg_sphere(conn)
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        except psycopg.OperationalError as exc:
            msg = f"cannot connect to the catalog at {dsn}: {str(exc).strip()}"
            raise CatalogError(msg) from None
        logger.debug("pgSphere %s in %s", version, dsn)
        upgrade(catalog.engine())
        _grant_reader(catalog.engine())
        _PREPARED.add((os.getpid(), dsn))
    return catalog

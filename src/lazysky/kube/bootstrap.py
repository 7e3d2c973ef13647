"""Preparing a catalog server once: pgSphere, the schema, the read-only role.

What the ``catalog-bootstrap`` Job runs (``lazysky kube bootstrap-catalog``) against the
catalog's PostgreSQL, as its owner role. pgSphere comes through
:func:`lazysky.catalog.open_catalog`, i.e. :func:`~lazysky.catalog._extension.ensure_pg_sphere`,
which works around Debian bookworm's broken ``CREATE EXTENSION pg_sphere``. Idempotent.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lazysky.config import load_settings
from lazysky.errors import ConfigError

__all__ = ["BootstrapResult", "bootstrap_catalog"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapResult:
    """What :func:`bootstrap_catalog` found or made."""

    pg_sphere_version: str
    schema_version: int
    reader_role: str
    reader_password_set: bool


def bootstrap_catalog(dsn: str | None = None, *,
                      reader_password: str | None = None) -> BootstrapResult:
    """Create pgSphere, the schema and the read-only role in the catalog at ``dsn``.

    Parameters
    ----------
    dsn
        The catalog as its owner (default: ``catalog_dsn`` of the settings; libpq reads
        the password from ``PGPASSWORD``).
    reader_password
        Password of the read-only role ``lazysky_reader`` (default: the
        ``READER_PASSWORD`` environment variable; None leaves it unchanged).

    Raises
    ------
    ConfigError
        No DSN configured (the embedded catalog prepares itself).
    CatalogError
        The server cannot be reached or prepared.

    Examples
    --------
    >>> bootstrap_catalog("postgresql://lazysky@catalog-db:5432/lazysky")  # doctest: +SKIP
    BootstrapResult(pg_sphere_version='1.2.0', schema_version=2, ...)
    """
    import psycopg
    from psycopg import sql

    from lazysky.catalog import open_catalog
    from lazysky.catalog.database import READER_ROLE, libpq_dsn
    from lazysky.catalog.schema import current_version

    dsn = dsn or load_settings().catalog_dsn
    if not dsn:
        msg = (
            "catalog_dsn is not set (LAZYSKY_CATALOG_DSN); expected the DSN of the "
            "catalog server to bootstrap, e.g. postgresql://lazysky@catalog-db:5432/lazysky"
        )
        raise ConfigError(msg)
    if reader_password is None:
        reader_password = os.environ.get("READER_PASSWORD") or None
    from lazysky.catalog import CatalogError

    try:
        with psycopg.connect(libpq_dsn(dsn), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                (READER_ROLE,)).fetchone():
                logger.info("creating the read-only role %s", READER_ROLE)
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(
                    sql.Identifier(READER_ROLE)))
            role = sql.Identifier(READER_ROLE)
            conn.execute(sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on")
                         .format(role))
            conn.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = '10s'").format(role))
            if reader_password is not None:
                conn.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                    role, sql.Literal(reader_password)))
    except psycopg.OperationalError as exc:
        msg = f"cannot connect to the catalog at {dsn}: {str(exc).strip()}"
        raise CatalogError(msg) from None
    catalog = open_catalog(dsn=dsn)  # pgSphere (Debian trap handled), schema, GRANTs
    with catalog.engine().connect() as conn:
        schema = current_version(conn)
        version = conn.exec_driver_sql("SELECT pg_sphere_version()").scalar()
    logger.info("catalog %s ready: pgSphere %s, schema v%d, role %s", dsn, version, schema,
                READER_ROLE)
    return BootstrapResult(str(version), int(schema), READER_ROLE, reader_password is not None)

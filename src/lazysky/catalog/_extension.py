"""Creating the ``pg_sphere`` extension, including on Debian bookworm's broken package.

Debian bookworm's ``postgresql-15-pgsphere`` (1.1.1 snapshot, extension version 1.2.0)
fails ``CREATE EXTENSION pg_sphere`` on recent PostgreSQL 15 minor releases with
"commutator operator @> is already the commutator of operator <@". The cause is two
legacy compatibility operators ``@`` on ``smoc`` at the end of the packaged script
(upstream pgSphere dropped them, issues #85 and #137). :func:`ensure_pg_sphere` tries
``CREATE EXTENSION`` first; on exactly that error it loads the packaged script without
those two statements (the types, functions, operators and GiST operator classes are
then ordinary objects of the database rather than members of an extension) and logs a
warning that says so. On a machine with a fixed or newer pgSphere, ``CREATE EXTENSION``
simply works.
"""

from __future__ import annotations

import logging
import re

import psycopg

from lazysky.catalog._errors import CatalogError

__all__ = ["ensure_pg_sphere", "pg_sphere_version", "strip_legacy_smoc_operators"]

logger = logging.getLogger(__name__)

_TRAP = "is already the commutator of operator"
_LEGACY_SMOC_AT = re.compile(
    r"CREATE\s+OPERATOR\s+@\s*\(\s*LEFTARG\s*=\s*\w+\s*,\s*RIGHTARG\s*=\s*smoc\b[^;]*\);",
    re.IGNORECASE,
)


def pg_sphere_version(conn: psycopg.Connection) -> str | None:
    """The pgSphere version usable in this database, or None when it is absent."""
    row = conn.execute("SELECT to_regtype('spoint') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return None
    got = conn.execute("SELECT pg_sphere_version()").fetchone()
    return str(got[0]) if got else "unknown"


def strip_legacy_smoc_operators(script: str) -> tuple[str, int]:
    """The extension script without the legacy ``@`` operators on ``smoc``.

    Also drops the ``\\echo … \\quit`` guard and fills in ``MODULE_PATHNAME``, so the
    text runs as plain SQL. Returns the script and how many statements were removed.
    """
    body, n_removed = _LEGACY_SMOC_AT.subn("", script)
    body = "\n".join(ln for ln in body.splitlines() if not ln.lstrip().startswith("\\"))
    return body.replace("MODULE_PATHNAME", "$libdir/pg_sphere"), n_removed


def _load_packaged_script(conn: psycopg.Connection) -> str:
    row = conn.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_sphere'"
    ).fetchone()
    if row is None:
        msg = (
            "pg_sphere is not installed on the catalog server; install it (Debian: "
            "apt-get install postgresql-15-pgsphere, as bootstrap.sh does)"
        )
        raise CatalogError(msg)
    version = str(row[0])
    sharedir_row = conn.execute(
        "SELECT setting FROM pg_config WHERE name = 'SHAREDIR'"
    ).fetchone()
    assert sharedir_row is not None  # pg_config always has SHAREDIR
    path = f"{sharedir_row[0]}/extension/pg_sphere--{version}.sql"
    text_row = conn.execute("SELECT pg_read_file(%s)", (path,)).fetchone()
    assert text_row is not None
    logger.debug("read %s (%d characters)", path, len(text_row[0]))
    return str(text_row[0])


def _install_from_script(conn: psycopg.Connection) -> None:
    script, n_removed = strip_legacy_smoc_operators(_load_packaged_script(conn))
    with conn.transaction():
        conn.execute(script.encode())  # no parameters: one simple-protocol batch
    logger.warning(
        "CREATE EXTENSION pg_sphere failed on this server with the known Debian "
        "bookworm packaging bug ('commutator operator @> is already the commutator of "
        "operator <@'); installed pgSphere %s from the packaged extension script "
        "instead, without its %d legacy '@' operators on smoc (removed upstream, "
        "pgsphere issues #85/#137). Everything lazysky uses, GiST indexes included, "
        "works; the objects are not registered as an extension.",
        pg_sphere_version(conn), n_removed,
    )


def ensure_pg_sphere(conn: psycopg.Connection, *, force_script: bool = False) -> str:
    """Make pgSphere available in the connected database; returns its version.

    Parameters
    ----------
    conn
        A connection (autocommit or not) as a role allowed to create it.
    force_script
        Skip ``CREATE EXTENSION`` and load the packaged script directly (used in tests
        to exercise the work-around on machines where the package is fine).

    Raises
    ------
    CatalogError
        When pgSphere is not installed on the server, or cannot be created.
    """
    if (have := pg_sphere_version(conn)) is not None:
        return have
    if force_script:
        _install_from_script(conn)
    else:
        try:
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_sphere")
            logger.info("created the pg_sphere extension")
        except psycopg.errors.InsufficientPrivilege as exc:
            msg = (
                f"pg_sphere is missing from the catalog database and this role may not "
                f"create it ({exc}); ask the database owner to run CREATE EXTENSION pg_sphere"
            )
            raise CatalogError(msg) from None
        except psycopg.errors.UndefinedFile as exc:
            msg = (
                f"pg_sphere is not installed on the catalog server ({exc}); install it "
                f"(Debian: apt-get install postgresql-15-pgsphere, as bootstrap.sh does)"
            )
            raise CatalogError(msg) from None
        except psycopg.Error as exc:
            if _TRAP not in str(exc):
                msg = f"CREATE EXTENSION pg_sphere failed: {exc}"
                raise CatalogError(msg) from None
            _install_from_script(conn)
    version = pg_sphere_version(conn)
    if version is None:  # pragma: no cover - both paths create spoint
        msg = "pg_sphere was created but the spoint type is missing"
        raise CatalogError(msg)
    return version

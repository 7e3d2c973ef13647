"""A binary-input declaration for ``spoint``, so rows COPY straight into the source tables
(schema v13).

PostgreSQL's binary ``COPY … FROM`` looks up the binary input function of *every* column
of the target table, the generated ones included, before it reads a row; pgSphere 1.2's
``spoint`` declares none, so a binary COPY into ``coadd_sources`` fails at once with "no
binary input function available for type spoint", although ``pos`` is never sent (it is
generated from ``ra``/``dec``). That is why :func:`lazysky.catalog.write_sources` used to
COPY into a temporary staging table and then ``INSERT … SELECT`` the rows across: the
staging table's own COPY, heap and scan, and a per-row ``heap_insert`` where COPY would
use PostgreSQL's multi-row insert, cost a loading backend ~4–10 % of its CPU (interleaved
A/Bs in docs/catalog.md).

:func:`ensure_spoint_receive` gives ``spoint`` a receive function,
:data:`RECEIVE_FUNCTION`, which refuses every value: it is PostgreSQL's own
``pg_node_tree_recv`` (a C function that ignores its input and raises "cannot accept a
value of type pg_node_tree"), declared as returning ``spoint``. So nothing about what an
``spoint`` may hold changes — a client still cannot send one in binary, only the lookup
succeeds — and the writer COPYs binary rows straight into the source table. Declaring a
``LANGUAGE internal`` function and altering a type need a superuser (the embedded
server's owner is one); under another role, or when a newer pgSphere brings a real
receive function, nothing is done. The declaration does not survive a dump and restore
(the extension script re-creates the type without it); the writer checks for it at
every write and falls back to the staging table when it is missing.

Examples
--------
>>> from lazysky.catalog._binary import ensure_spoint_receive
>>> ensure_spoint_receive(conn)  # doctest: +SKIP
True
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

__all__ = ["HAS_RECEIVE_SQL", "RECEIVE_FUNCTION", "ensure_spoint_receive"]

logger = logging.getLogger(__name__)

#: The receive function lazysky declares for ``spoint`` (it refuses every value).
RECEIVE_FUNCTION = "lazysky_spoint_recv"
#: Whether ``spoint`` has a binary input function (one row, one boolean; NULL without
#: pgSphere).
HAS_RECEIVE_SQL = ("SELECT typreceive <> 0 FROM pg_type "
                   "WHERE oid = to_regtype('spoint')")


def _extension_member(conn: sa.Connection, catalog: str, oid_sql: str) -> bool:
    """Whether the object (``catalog``, ``oid_sql``) belongs to the pg_sphere extension."""
    return conn.execute(sa.text(
        f"SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid "
        f"WHERE d.classid = '{catalog}'::regclass AND d.objid = {oid_sql} "
        f"AND d.deptype = 'e' AND e.extname = 'pg_sphere'")).first() is not None


def ensure_spoint_receive(conn: sa.Connection) -> bool:
    """Give ``spoint`` a (refusing) binary input function if it has none.

    Returns whether ``spoint`` has one now. False, with the reason logged, when the role
    is no superuser; the writer then keeps its staging table.
    """
    if conn.execute(sa.text(HAS_RECEIVE_SQL)).scalar():
        return True
    if not conn.execute(sa.text(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar():
        logger.info("catalog: not a superuser, so spoint keeps no binary input function and "
                    "write_sources COPYs through a staging table (a superuser may upgrade "
                    "the schema for direct COPY, ~4-10 %% less server CPU per row)")
        return False
    conn.execute(sa.text(
        f"CREATE OR REPLACE FUNCTION {RECEIVE_FUNCTION}(internal) RETURNS spoint "
        f"LANGUAGE internal STRICT IMMUTABLE PARALLEL SAFE AS 'pg_node_tree_recv'"))
    conn.execute(sa.text(
        f"COMMENT ON FUNCTION {RECEIVE_FUNCTION}(internal) IS 'lazysky: refuses every "
        f"binary spoint (PostgreSQL''s pg_node_tree_recv: \"cannot accept a value of type "
        f"pg_node_tree\"); it exists so that binary COPY into tables with a generated "
        f"spoint column finds a receive function'"))
    conn.execute(sa.text(f"ALTER TYPE spoint SET (RECEIVE = {RECEIVE_FUNCTION})"))
    if _extension_member(conn, "pg_type", "'spoint'::regtype") and not _extension_member(
            conn, "pg_proc", f"'{RECEIVE_FUNCTION}(internal)'::regprocedure"):
        # DROP EXTENSION pg_sphere then takes the function along with the type
        conn.execute(sa.text(
            f"ALTER EXTENSION pg_sphere ADD FUNCTION {RECEIVE_FUNCTION}(internal)"))
    logger.info("catalog: declared %s as spoint's binary input (it refuses every value) so "
                "that write_sources can COPY binary rows straight into the source tables",
                RECEIVE_FUNCTION)
    return True

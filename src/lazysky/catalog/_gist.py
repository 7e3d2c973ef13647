"""The GiST operator class of the source tables' positions (schema v11).

pgSphere 1.2's default GiST operator class for ``spoint`` declares a *decompress* support
function, ``g_spherekey_decompress``, that returns its argument unchanged. PostgreSQL
calls it through the function manager for every index entry it looks at, and an insert
looks at every entry of one internal page per level (``gistchoose`` weighs the penalty of
each): by ``perf`` on a loading backend (1.5 M rows), ``gistdentryinit`` +
``FunctionCall1Coll`` + ``g_spherekey_decompress`` were ~5.6 % of its CPU for nothing.
Since PostgreSQL 11 a GiST operator class may leave *decompress* out (PostgreSQL then
uses the stored key as it is), so :func:`ensure_spoint_opclass` makes
:data:`OPCLASS`: a copy of the default class — the same operators, the same support
functions, the same storage type, read from the system catalogs — without it. The
index it builds is the same index (same keys, same pages); cone searches and
cross-matches use it exactly as before.

Creating an operator class needs a superuser (the embedded server's owner is one).
Under another role, or when the installed pgSphere's default class has no decompress
function (newer releases may drop it), nothing is made and the default class stays.

Examples
--------
>>> from lazysky.catalog._gist import ensure_spoint_opclass
>>> ensure_spoint_opclass(conn)  # doctest: +SKIP
'spoint_lazysky'
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

__all__ = ["OPCLASS", "ensure_spoint_opclass", "opclass_sql"]

logger = logging.getLogger(__name__)

#: lazysky's GiST operator class for ``spoint`` (pgSphere's default, minus decompress)
OPCLASS = "spoint_lazysky"
_DECOMPRESS = 4  # GiST support function number of decompress

_DEFAULT_CLASS = sa.text(
    "SELECT c.oid, c.opcfamily, c.opckeytype FROM pg_opclass c "
    "JOIN pg_am a ON a.oid = c.opcmethod JOIN pg_type t ON t.oid = c.opcintype "
    "WHERE a.amname = 'gist' AND t.typname = 'spoint' AND c.opcdefault")
_OPERATORS = sa.text(
    "SELECT o.amopstrategy, p.oprname, format_type(o.amoplefttype, NULL), "
    "format_type(o.amoprighttype, NULL), o.amoppurpose, "
    "CASE WHEN o.amoppurpose = 'o' THEN quote_ident(n.nspname) || '.' || "
    "quote_ident(f.opfname) END "
    "FROM pg_amop o JOIN pg_operator p ON p.oid = o.amopopr "
    "LEFT JOIN pg_opfamily f ON f.oid = o.amopsortfamily "
    "LEFT JOIN pg_namespace n ON n.oid = f.opfnamespace "
    "WHERE o.amopfamily = :family ORDER BY o.amopstrategy")
_FUNCTIONS = sa.text(
    "SELECT amprocnum, amproc::regprocedure::text FROM pg_amproc "
    "WHERE amprocfamily = :family ORDER BY amprocnum")


def opclass_sql(conn: sa.Connection) -> str | None:
    """``CREATE OPERATOR CLASS`` for :data:`OPCLASS`, copied from pgSphere's default.

    None when the default class has no decompress function (nothing to gain) or no
    default GiST class for ``spoint`` exists.
    """
    found = conn.execute(_DEFAULT_CLASS).first()
    if found is None:
        return None
    family, keytype = found[1], found[2]
    functions = conn.execute(_FUNCTIONS, {"family": family}).all()
    if not any(num == _DECOMPRESS for num, _ in functions):
        return None
    items = []
    for strategy, name, left, right, purpose, sort_family in conn.execute(
            _OPERATORS, {"family": family}):
        order = f" FOR ORDER BY {sort_family}" if purpose == "o" else ""
        items.append(f"OPERATOR {strategy} {name} ({left}, {right}){order}")
    items += [f"FUNCTION {num} {proc}" for num, proc in functions if num != _DECOMPRESS]
    if keytype:
        items.append("STORAGE " + str(conn.execute(
            sa.text("SELECT format_type(:t, NULL)"), {"t": keytype}).scalar_one()))
    return (f"CREATE OPERATOR CLASS {OPCLASS} FOR TYPE spoint USING gist AS "
            + ", ".join(items))


def ensure_spoint_opclass(conn: sa.Connection) -> str | None:
    """Make :data:`OPCLASS` if it is missing and worth having; return its name or None.

    None (and the reason logged) when the role is no superuser or pgSphere's default
    class already does without decompress: indexes then use the default class.
    """
    if conn.execute(sa.text("SELECT 1 FROM pg_opclass c JOIN pg_am a ON a.oid = "
                            "c.opcmethod WHERE a.amname = 'gist' AND c.opcname = :n"),
                    {"n": OPCLASS}).first() is not None:
        return OPCLASS
    if not conn.execute(sa.text(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar():
        logger.info("catalog: not a superuser, so spoint positions keep pgSphere's default "
                    "GiST operator class (a superuser may upgrade the schema to get %s, "
                    "~5 %% cheaper inserts)", OPCLASS)
        return None
    statement = opclass_sql(conn)
    if statement is None:
        logger.info("catalog: pgSphere's GiST operator class for spoint has no decompress "
                    "function; the default class is used as it is")
        return None
    conn.execute(sa.text(statement))
    logger.info("catalog: created the GiST operator class %s (pgSphere's default for "
                "spoint without its no-op decompress function)", OPCLASS)
    return OPCLASS

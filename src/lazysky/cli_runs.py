"""``lazysky runs``: list, show, compare, promote, roll back, history.

The command-line face of :mod:`lazysky.catalog.production` (and of
:func:`lazysky.compare_runs` when the interactive API is installed).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_runs_parser"]


def _catalog(args: argparse.Namespace) -> Any:
    from lazysky.catalog import open_catalog
    from lazysky.config import load_settings

    return open_catalog(load_settings(args.settings))


def _print_table(table: Any, fmt: str) -> None:
    import sys

    if fmt == "table":
        table.pprint_all() if len(table) else print("no runs")
    else:
        table.write(sys.stdout, format={"csv": "ascii.csv", "json": "pandas.json"}.get(
            fmt, "ascii.csv"))


def _cmd_list(args: argparse.Namespace) -> int:
    from lazysky.catalog.production import list_runs

    table = list_runs(type=args.type, status=args.status, field=args.field, limit=args.limit,
                      catalog=_catalog(args))
    if not args.long:
        del table["description"]
    _print_table(table, args.format)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from lazysky.catalog.production import list_promotions, run_record

    catalog = _catalog(args)
    print(run_record(args.run_id, catalog=catalog))
    history = list_promotions(run_id=args.run_id, catalog=catalog)
    for p in history:
        print(f"history    {p}")
    from lazysky.catalog.qa import read_qa

    qa = read_qa(args.run_id, catalog=catalog)
    flagged = qa[qa["flagged"]] if len(qa) else qa
    if len(qa):
        print(f"qa         {len(qa)} tile(s) × product measured, {len(flagged)} flagged")
    for row in flagged:
        print(f"flagged    {row['product']} {row['tile_id']}: {'; '.join(row['reasons'])}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from lazysky.catalog.production import promote

    print(promote(args.run_id, reason=args.reason, by=args.by, catalog=_catalog(args)))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from lazysky.catalog.production import rollback

    print(rollback(args.promotion_id, field=args.field, reason=args.reason, by=args.by,
                   catalog=_catalog(args)))
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from lazysky.catalog.production import list_promotions, production_tiles

    catalog = _catalog(args)
    changes = list_promotions(field=args.field, catalog=catalog)
    for p in changes:
        print(p)
    if not changes:
        print("no production changes" + (f" for {args.field}" if args.field else ""))
    if args.field:
        tiles = production_tiles(args.field, catalog=catalog)
        print(f"production of {args.field} now: " + (", ".join(
            f"{t} {r}" for t, r in tiles.items()) if tiles else "none"))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from lazysky.config import load_settings

    try:
        from lazysky.interactive import compare_runs  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - the interactive API ships with lazysky
        from lazysky.errors import ConfigError

        msg = "lazysky runs compare needs lazysky.interactive (not installed)"
        raise ConfigError(msg) from None
    result = compare_runs(args.a, args.b, settings=load_settings(args.settings),
                          catalog=_catalog(args))
    print(result)
    if args.figure:
        result.figure().savefig(args.figure, dpi=100)
        print(f"figure: {args.figure}")
    return 0


def add_runs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lazysky runs ACTION …`` to the command's sub-parsers."""
    from lazysky.runs import RUN_STATUSES, RUN_TYPES

    p = sub.add_parser("runs", help="processing runs: list, show, compare, promote, "
                       "rollback, history")

    def usage(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(handler=usage)
    rsub = p.add_subparsers(dest="runs_command", metavar="ACTION")
    q = rsub.add_parser("list", help="runs, newest first")
    q.add_argument("--type", choices=RUN_TYPES, help="only runs of this type")
    q.add_argument("--status", choices=RUN_STATUSES, help="only runs in this state")
    q.add_argument("--field", help="only runs of this field")
    q.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    q.add_argument("--long", action="store_true", help="with descriptions")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.set_defaults(handler=_cmd_list)
    q = rsub.add_parser("show", help="one run: status, tiles, errors, production held, "
                        "history")
    q.add_argument("run_id")
    q.set_defaults(handler=_cmd_show)
    q = rsub.add_parser("compare", help="two runs side by side: matched sources, only in "
                        "one, flux ratio, offsets (and truth when simulated)")
    q.add_argument("a", help="run id")
    q.add_argument("b", help="run id")
    q.add_argument("--figure", help="also write the comparison figure (PNG)")
    q.set_defaults(handler=_cmd_compare)
    q = rsub.add_parser("promote", help="make a finished run the production of its tiles")
    q.add_argument("run_id")
    q.add_argument("--reason", required=True, help="why (recorded)")
    q.add_argument("--by", help="who (default user@host)")
    q.set_defaults(handler=_cmd_promote)
    q = rsub.add_parser("rollback", help="undo a promotion (default: the field's newest)")
    q.add_argument("promotion_id", nargs="?", type=int, help="the promotion to undo")
    q.add_argument("--field", help="undo this field's newest promotion")
    q.add_argument("--reason", required=True, help="why (recorded)")
    q.add_argument("--by", help="who (default user@host)")
    q.set_defaults(handler=_cmd_rollback)
    q = rsub.add_parser("history", help="production changes (promote, publish, rollback)")
    q.add_argument("--field", help="of this field, with its production now")
    q.set_defaults(handler=_cmd_history)
    for action in rsub.choices.values():
        action.add_argument("--settings", help="lazysky settings YAML "
                            "(default: $LAZYSKY_CONFIG)")

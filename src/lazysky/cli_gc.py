"""``lazysky gc``: remove expired runs, and the calibrations and raw data only they used.

The command-line face of :func:`lazysky.gc.collect` (docs/lifecycle.md).
"""

from __future__ import annotations

import argparse

__all__ = ["add_gc_parser"]


def _cmd_gc(args: argparse.Namespace) -> int:
    import json

    from lazysky.catalog import open_catalog
    from lazysky.config import load_settings
    from lazysky.gc import collect, parse_now

    now = parse_now(args.now, what="--now")  # a bad --now fails before the catalog is opened
    settings = load_settings(args.settings)
    report = collect(now=now, dry_run=args.dry_run, settings=settings,
                     catalog=open_catalog(settings), store=args.store, wait=args.wait)
    print(json.dumps(report.as_dict(), indent=1) if args.format == "json" else report)
    return 1 if report.errors else 0


def add_gc_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lazysky gc [--dry-run] [--now ISO]`` to the command's sub-parsers."""
    p = sub.add_parser("gc", help="remove expired runs (products and catalog rows), then "
                       "master calibrations and raw exposures no kept run uses")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would go and how much space it frees; change nothing")
    p.add_argument("--now", help="measure retention against this ISO 8601 time "
                   "(default: the clock), e.g. 2027-01-01 to see what expires by then")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="wait this long for another gc to end before giving up "
                   "(default: 10)")
    p.add_argument("--store", help="the store (default: the settings' store_url)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--settings", help="lazysky settings YAML (default: $LAZYSKY_CONFIG)")
    p.set_defaults(handler=_cmd_gc)

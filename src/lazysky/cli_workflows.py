"""``lazysky workflows``: list, show, register, activate, promote, rollback, compare, history.

The command-line face of :mod:`lazysky.workflows` (docs/workflows.md).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_workflows_parser"]


def _catalog(args: argparse.Namespace) -> Any:
    from lazysky.catalog import open_catalog
    from lazysky.config import load_settings

    return open_catalog(load_settings(args.settings))


def _cmd_list(args: argparse.Namespace) -> int:
    from lazysky.workflows import list_versions

    versions = list_versions(catalog=_catalog(args))
    if not versions:
        print("no workflow versions (lazysky workflows register FILE --name NAME)")
        return 0
    print(f"{'name':<24} {'active for':<14} {'sha256':<12} {'software':<16} registered")
    for v in versions:
        same = f"  = {', '.join(v.same_content)}" if v.same_content else ""
        print(f"{v.name:<24} {','.join(v.active_for) or '-':<14} {v.sha256[:12]:<12} "
              f"{v.software_version:<16} {v.registered_at:%Y-%m-%d %H:%M} "
              f"{v.registered_by}{same}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from lazysky.workflows import get_version, history

    catalog = _catalog(args)
    print(get_version(args.name, catalog=catalog))
    for act in history(catalog=catalog):
        if args.name in (act.version, act.previous):
            print(f"history    {act}")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from lazysky.workflows import register

    print(register(args.file, name=args.name, description=args.description, by=args.by,
                   catalog=_catalog(args)))
    return 0


def _cmd_activate(args: argparse.Namespace) -> int:
    from lazysky.workflows import activate, promote

    change = promote if args.workflows_command == "promote" else activate
    print(change(args.name, run_type=args.type, reason=args.reason, by=args.by,
                 catalog=_catalog(args)))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from lazysky.workflows import rollback

    print(rollback(run_type=args.type, reason=args.reason, by=args.by,
                   catalog=_catalog(args)))
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from lazysky.workflows import active_versions, history

    catalog = _catalog(args)
    changes = history(run_type=args.type, catalog=catalog)
    for act in changes:
        print(act)
    if not changes:
        print("no activations" + (f" for {args.type}" if args.type else ""))
    active = active_versions(catalog=catalog)
    print("active now: " + (", ".join(f"{t} {v}" for t, v in sorted(active.items()))
                            if active else "none"))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from lazysky.errors import ParameterError
    from lazysky.runs import RUN_ID_PATTERN
    from lazysky.workflows import canary_of, compare_runs, compare_versions

    catalog = _catalog(args)
    if args.execution is not None:
        pair = canary_of(args.execution, catalog=catalog)
        if pair is None:
            msg = (f"batch execution {args.execution} ran no canary (lazysky batch show "
                   "lists executions)")
            raise ParameterError(msg)
        a, b = pair
    elif args.a and args.b:
        a, b = args.a, args.b
    else:
        msg = "give two versions, two run ids, or --execution ID"
        raise ParameterError(msg)
    import re

    if all(re.match(RUN_ID_PATTERN, x) for x in (a, b)):
        print(compare_runs(a, b, radius_arcsec=args.radius_arcsec, catalog=catalog))
        return 0
    diffs = compare_versions(a, b, catalog=catalog)
    print(f"{a} -> {b}: " + ("identical parameters" if not diffs else
                             f"{len(diffs)} difference(s)"))
    for key, (va, vb) in diffs.items():
        print(f"  {key}: {va} -> {vb}")
    return 0


def _cmd_canaries(args: argparse.Namespace) -> int:
    from lazysky.workflows import executions_with_canary

    rows = executions_with_canary(catalog=_catalog(args))
    if not rows:
        print("no canary has run")
    for r in rows:
        print(f"execution {r['execution_id']}: {r['version'] or '(steps)'} {r['run_id']} | "
              f"canary {r['canary_version']} {r['share']:g} % {r['canary_run_id']}")
    return 0


def add_workflows_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lazysky workflows ACTION …`` to the command's sub-parsers."""
    from lazysky.runs import RUN_TYPES

    p = sub.add_parser("workflows", help="workflow versions: list, show, register, activate, "
                       "promote, rollback, compare, history")

    def usage(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(handler=usage)
    wsub = p.add_subparsers(dest="workflows_command", metavar="ACTION")
    q = wsub.add_parser("list", help="registered versions and the types they are active for")
    q.set_defaults(handler=_cmd_list)
    q = wsub.add_parser("show", help="one version: parameters, hash, history")
    q.add_argument("name")
    q.set_defaults(handler=_cmd_show)
    q = wsub.add_parser("register", help="register step parameters (YAML) as a version")
    q.add_argument("file", help="YAML: step parameters, {steps: …}, or a run configuration")
    q.add_argument("--name", required=True, help="the version's name (immutable)")
    q.add_argument("--description", help="recorded with it (default: the file's)")
    q.add_argument("--by", help="who (default user@host)")
    q.set_defaults(handler=_cmd_register)
    for action, text in (("activate", "make a version the active one of a type"),
                         ("promote", "promote a canary's candidate: active for new batches")):
        q = wsub.add_parser(action, help=text)
        q.add_argument("name", help="the version")
        q.add_argument("--type", choices=RUN_TYPES, required=action == "activate",
                       default="prod", help="processing type" + (
                           " (default prod)" if action == "promote" else ""))
        q.add_argument("--reason", required=True, help="why (recorded)")
        q.add_argument("--by", help="who (default user@host)")
        q.set_defaults(handler=_cmd_activate)
    q = wsub.add_parser("rollback", help="restore the version active before the last change")
    q.add_argument("--type", choices=RUN_TYPES, required=True, help="processing type")
    q.add_argument("--reason", required=True, help="why (recorded)")
    q.add_argument("--by", help="who (default user@host)")
    q.set_defaults(handler=_cmd_rollback)
    q = wsub.add_parser("compare", help="two versions' parameters, or two runs' catalogs "
                        "(a canary and its base: --execution ID)")
    q.add_argument("a", nargs="?", help="a version or a run id")
    q.add_argument("b", nargs="?", help="a version or a run id")
    q.add_argument("--execution", type=int, help="the batch execution split by a canary")
    q.add_argument("--radius-arcsec", type=float, default=1.0,
                   help="match radius for the coadd sources (default 1)")
    q.set_defaults(handler=_cmd_compare)
    q = wsub.add_parser("history", help="activations, promotions, rollbacks; active now")
    q.add_argument("--type", choices=RUN_TYPES, help="of this type only")
    q.set_defaults(handler=_cmd_history)
    q = wsub.add_parser("canaries", help="batch executions split by a canary, newest first")
    q.set_defaults(handler=_cmd_canaries)
    for one in wsub.choices.values():
        one.add_argument("--settings", help="lazysky settings YAML "
                            "(default: $LAZYSKY_CONFIG)")

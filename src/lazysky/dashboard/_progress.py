"""Terminal progress bars per stage, fed by the scheduler's lazysky plugin.

While a stage's futures run on a terminal, :func:`show_progress` asks the scheduler (the
plugin's ``lazysky_runs`` handler) twice a second how many tiles of each stage are done
and redraws one bar per stage in place; it works the same under a local or a remote
(Kubernetes) client. Elsewhere (a log file, a CronJob's output) it asks nothing while the
stage runs and prints the final state once. The wait between polls ends the moment the
futures finish, so watching never holds a stage up. Without the plugin (``cluster.watch: false``) it
only says so and waits.

Examples
--------
>>> from lazysky.dashboard._progress import bar
>>> bar("reference", 3, 4, width=8, seconds=1.5)
'reference   [######··]   3/4   tiles  1.5 s'
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["bar", "show_progress", "stages_of"]

POLL_S = 0.5


def bar(stage: str, done: int, total: int, *, width: int = 30, failed: int = 0,
        seconds: float = 0.0, unit: str = "tiles") -> str:
    """One line: ``stage  [#####·····]  done/total unit  seconds`` (pure)."""
    frac = done / total if total else 0.0
    n = round(frac * width)
    fail = f"  {failed} failed" if failed else ""
    return (f"{stage:<11} [{'#' * n}{'·' * (width - n)}] {done:>3}/{total:<3} {unit:<5} "
            f"{seconds:.1f} s{fail}")


def stages_of(stage: str) -> tuple[str, ...]:
    """The page stages one runner compute covers (detection carries the catalog writes)."""
    return ("detect", "catalog") if stage == "detect" else (stage,)


def _lines(snap: dict[str, Any], stages: Sequence[str]) -> list[str]:
    out = []
    for stage in stages:
        st = snap["stages"].get(stage)
        if st is None:  # a stage the page has no tiles for (qa): its tasks
            other = snap.get("tasks", {}).get(stage)
            if other is not None:
                out.append(bar(stage, other["tasks_done"], other["tasks"],
                               seconds=other["seconds"], unit="tasks"))
            continue
        if st["total"]:
            out.append(bar(stage, st["done"], st["total"], failed=st["failed"],
                           seconds=st["seconds"]))
        else:
            out.append(bar(stage, st["tasks_done"], st["tasks"], seconds=st["seconds"],
                           unit="tasks"))
    return out


def _plugin_registered(dask_scheduler: Any) -> bool:
    return "lazysky" in dask_scheduler.plugins


def _watched(client: Any) -> bool:
    """Whether the lazysky plugin is on ``client``'s scheduler (asked without a failed
    handler call, which the scheduler would log as an error)."""
    try:
        return bool(client.run_on_scheduler(_plugin_registered))
    except (ImportError, AttributeError, ValueError):  # a scheduler without lazysky
        return False


def show_progress(client: Any, futures: Any, *, run_id: str, stage: str, label: str = "",
                  out: TextIO | None = None) -> None:
    """Draw per-stage bars until ``futures`` are finished (or one failed).

    Parameters
    ----------
    client
        The ``distributed.Client`` the futures run on.
    futures
        A future or a list of them (what ``client.compute`` returned).
    run_id, stage
        The run and the runner stage the futures compute.
    label
        The heading printed above the bars.
    out
        Where to draw (default ``sys.stdout``).
    """
    from lazysky.dashboard._plugin import runs

    out = out if out is not None else sys.stdout
    futs = futures if isinstance(futures, list | tuple) else [futures]
    print(f"[{label or stage}]", file=out, flush=True)
    if not _watched(client):  # no plugin on that scheduler (cluster.watch false)
        from distributed import wait

        print("  (no progress bars: lazysky's scheduler plugin is off, cluster.watch)",
              file=out, flush=True)
        wait(futs)
        return
    live = bool(getattr(out, "isatty", lambda: False)())
    if not live:  # a log file: only the final state, so nothing to poll meanwhile
        from distributed import wait

        wait(futs)
        snaps = runs(client, run_id)
        lines = _lines(snaps[0], stages_of(stage)) if snaps else []
        out.write("".join(f"{line}\n" for line in lines))
        out.flush()
        return
    drawn = 0
    while True:
        finished = _wait(futs, POLL_S)
        snaps = runs(client, run_id)
        lines = _lines(snaps[0], stages_of(stage)) if snaps else []
        if drawn:
            out.write(f"\x1b[{drawn}F")  # back to the first bar, redraw in place
        out.write("".join(f"{line}\x1b[K\n" for line in lines))
        out.flush()
        drawn = len(lines)
        if finished:
            return


def _wait(futs: Sequence[Any], seconds: float) -> bool:
    """Wait up to ``seconds`` for every future to finish (errors count): whether they have.
    Returns as soon as they have, so a stage's end is never held up by a poll's sleep."""
    from distributed import wait

    try:
        wait(futs, timeout=seconds)
    except TimeoutError:
        return False
    return True

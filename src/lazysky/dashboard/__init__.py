"""Watch lazysky runs on the Dask dashboard: a page, Prometheus metrics, terminal bars.

* :class:`LazySkyPlugin`, a ``distributed`` scheduler plugin registered by :func:`watch`
  (the runner does it on every client it runs on), follows every lazysky task by its
  annotation (run, stage) and name (tile), and the runner's messages (run and grid, rows
  written, QA values, how the run ended);
* the page ``/lazysky`` on the dashboard (linked from its navigation bar) and its JSON
  twin ``/lazysky/api/runs[/<run_id>]``;
* ``lazysky_*`` metrics on the scheduler's ``/metrics``, beside Dask's own;
* :func:`show_progress`: one bar per stage in the terminal, fed by the scheduler.

See docs/dashboard.md.

Examples
--------
>>> from lazysky.dashboard import watch, runs
>>> watch(client)  # doctest: +SKIP
>>> runs(client)[0]["stages"]["reference"]["done"]  # doctest: +SKIP
12
"""

from lazysky.dashboard._plugin import (
    TOPIC,
    LazySkyPlugin,
    annotate,
    announce_end,
    announce_run,
    publish_qa,
    publish_run_qa,
    report_rows,
    runs,
    watch,
)
from lazysky.dashboard._progress import show_progress
from lazysky.dashboard._state import STAGES, TILE_STATES, RunState

__all__ = [
    "STAGES",
    "TILE_STATES",
    "TOPIC",
    "LazySkyPlugin",
    "RunState",
    "annotate",
    "announce_end",
    "announce_run",
    "publish_qa",
    "publish_run_qa",
    "report_rows",
    "runs",
    "show_progress",
    "watch",
]

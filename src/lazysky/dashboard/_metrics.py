"""lazysky's Prometheus metrics, served on the scheduler's ``/metrics`` beside Dask's own.

distributed serves ``/metrics`` from ``prometheus_client``'s default registry in the
scheduler's process; a collector registered there once per process reads the runs of
every live :class:`~lazysky.dashboard.LazySkyPlugin` at each scrape (no work between
scrapes). Every metric is labelled with ``run_id``:

* ``lazysky_tiles{run_id, field, stage, state}`` — tiles per stage and state
  (pending, running, done, failed);
* ``lazysky_tasks_done_total{run_id, stage}``, ``lazysky_tasks{run_id, stage}``;
* ``lazysky_rows_written_total{run_id, table}`` — catalog rows (``coadd``, ``diff``);
* ``lazysky_stage_seconds{run_id, stage}`` — seconds per stage (the runner's, once the
  run ended, else the span of the stage's tasks so far);
* ``lazysky_failures{run_id}``, ``lazysky_run_active{run_id, status}``;
* ``lazysky_qa{run_id, tile, metric}`` and ``lazysky_tiles_flagged{run_id}``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["collect", "register_collector", "unregister_collector"]

logger = logging.getLogger(__name__)

_plugins: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False


def collect(snapshots: list[dict[str, Any]]) -> Iterator[Any]:
    """The metric families of some runs' snapshots (pure: no registry involved)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from lazysky.dashboard._state import TILE_STATES

    tiles = GaugeMetricFamily("lazysky_tiles", "Tiles of a lazysky run per stage and state",
                              labels=["run_id", "field", "stage", "state"])
    tasks = GaugeMetricFamily("lazysky_tasks", "Tasks of a lazysky run per stage",
                              labels=["run_id", "stage"])
    done = CounterMetricFamily("lazysky_tasks_done", "Tasks of a lazysky run finished",
                               labels=["run_id", "stage"])
    rows = CounterMetricFamily("lazysky_rows_written", "Catalog rows written by a lazysky run",
                               labels=["run_id", "table"])
    seconds = GaugeMetricFamily("lazysky_stage_seconds", "Seconds per stage of a lazysky run",
                                labels=["run_id", "stage"])
    failures = GaugeMetricFamily("lazysky_failures", "Failures recorded for a lazysky run",
                                 labels=["run_id"])
    active = GaugeMetricFamily("lazysky_run_active", "1 while a lazysky run goes on",
                               labels=["run_id", "status"])
    qa = GaugeMetricFamily("lazysky_qa", "QA values per tile of a lazysky run",
                           labels=["run_id", "tile", "metric"])
    flagged = GaugeMetricFamily("lazysky_tiles_flagged", "Tiles flagged by QA",
                                labels=["run_id"])
    for snap in snapshots:
        rid = snap["run_id"]
        for stage, st in snap["stages"].items():
            for state in TILE_STATES:
                tiles.add_metric([rid, snap["field"], stage, state], st[state])
            tasks.add_metric([rid, stage], st["tasks"])
            done.add_metric([rid, stage], st["tasks_done"])
        for stage in dict.fromkeys([*snap["stages"], *snap["timings"]]):
            value = snap["timings"].get(stage, snap["stages"].get(stage, {}).get("seconds", 0.0))
            seconds.add_metric([rid, stage], float(value))
        rows.add_metric([rid, "coadd"], snap["sources"])
        rows.add_metric([rid, "diff"], snap["dia_sources"])
        failures.add_metric([rid], len(snap["failures"]))
        active.add_metric([rid, snap["status"]], 1.0 if snap["status"] == "running" else 0.0)
        n_flagged = 0
        for tile in snap["tiles"]:
            for metric, value in tile["qa"].items():
                if metric == "flagged":
                    n_flagged += bool(value)
                elif value is not None:
                    qa.add_metric([rid, tile["tile"], metric], float(value))
        flagged.add_metric([rid], n_flagged)
    yield from (tiles, tasks, done, rows, seconds, failures, active, qa, flagged)


class _Collector:
    """Reads every live plugin at scrape time."""

    def collect(self) -> Iterator[Any]:
        snaps = [s for p in list(_plugins) for s in p.snapshot()]
        yield from collect(snaps)

    def describe(self) -> list[Any]:
        return []  # no fixed set: metrics appear with runs


def register_collector(plugin: Any) -> None:
    """Serve ``plugin``'s runs on this process's ``/metrics`` (idempotent)."""
    global _registered
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # pragma: no cover - distributed serves no /metrics then either
        logger.info("prometheus_client is not installed: no lazysky metrics on /metrics")
        return
    with _lock:
        _plugins.add(plugin)
        if not _registered:
            REGISTRY.register(_Collector())
            _registered = True


def unregister_collector(plugin: Any) -> None:
    """Stop serving ``plugin``'s runs."""
    with _lock:
        _plugins.discard(plugin)

"""The scheduler plugin that follows lazysky runs, and the calls that feed it.

The runner computes each stage under ``dask.annotate(lazysky={"run": …, "stage": …})``
(:func:`annotate`), so the plugin knows every task's run and stage from its annotation,
and the tile from its name. The runner's own facts (the run and its grid, rows written,
how it ended) and QA values reach the plugin as scheduler events on the topic
``lazysky`` (:func:`announce_run`, :func:`report_rows`, :func:`publish_qa`,
:func:`announce_end`): without the plugin they are a few entries in the scheduler's
event log and nothing else, so a run never depends on being watched.

Registered once per scheduler (:func:`watch`; idempotent: a second run on the same
cluster keeps the first's history), the plugin adds the ``/lazysky`` page and
``/lazysky/api/runs`` to the dashboard, and lazysky metrics to ``/metrics``.

Examples
--------
>>> from lazysky.dashboard import watch
>>> watch(client)  # doctest: +SKIP
>>> client.dashboard_link.replace("status", "lazysky")  # doctest: +SKIP
'http://127.0.0.1:8787/lazysky'
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import dask
from distributed.diagnostics.plugin import SchedulerPlugin

from lazysky.dashboard._state import RunState
from lazysky.errors import ParameterError

__all__ = [
    "TOPIC",
    "LazySkyPlugin",
    "annotate",
    "announce_end",
    "announce_run",
    "publish_qa",
    "publish_run_qa",
    "report_rows",
    "runs",
    "tile_qa_summary",
    "watch",
]

logger = logging.getLogger(__name__)

#: the scheduler event topic of the runner's messages
TOPIC = "lazysky"
#: the annotation that marks a lazysky task with its run and stage
ANNOTATION = "lazysky"
#: runs kept in memory (the oldest finished one goes first)
MAX_RUNS = 20


class LazySkyPlugin(SchedulerPlugin):
    """Follows lazysky runs on the scheduler (see the module docstring).

    Parameters
    ----------
    max_runs
        How many runs to keep (active and recent); older finished ones are dropped.
    """

    name = "lazysky"
    idempotent = True

    def __init__(self, *, max_runs: int = MAX_RUNS) -> None:
        if int(max_runs) < 1:
            msg = f"max_runs must be >= 1, got {max_runs!r}"
            raise ParameterError(msg)
        self.max_runs = int(max_runs)
        self.runs: OrderedDict[str, RunState] = OrderedDict()
        self.scheduler: Any = None

    # --- the scheduler's hooks ---------------------------------------------------------
    async def start(self, scheduler: Any) -> None:
        """Attach to ``scheduler``: handler, page, JSON route, Prometheus collector."""
        self.scheduler = scheduler
        scheduler.handlers["lazysky_runs"] = self._handle_runs
        from lazysky.dashboard._metrics import register_collector
        from lazysky.dashboard._page import add_routes

        add_routes(scheduler, self)
        register_collector(self)

    async def close(self) -> None:
        """Detach from the scheduler (its metrics go with it)."""
        from lazysky.dashboard._metrics import unregister_collector

        unregister_collector(self)

    def update_graph(self, scheduler: Any, *, keys: Any = (), tasks: Sequence[Any] = (),
                     annotations: Mapping[str, Mapping[Any, Any]] | None = None,
                     **kwargs: Any) -> None:
        """Count a run's tasks per stage and tile as they arrive."""
        ours = (annotations or {}).get(ANNOTATION)
        if not ours:
            return
        by: dict[tuple[str, str], list[Any]] = {}
        for key, ann in ours.items():
            if isinstance(ann, Mapping) and ann.get("run"):
                by.setdefault((str(ann["run"]), str(ann.get("stage", ""))), []).append(key)
        for (run_id, stage), ks in by.items():
            self._run(run_id).add_tasks(ks, stage)

    def transition(self, key: Any, start: str, finish: str, *args: Any,
                   **kwargs: Any) -> None:
        """Follow a lazysky task's state (processing, memory, erred)."""
        if finish not in ("processing", "memory", "erred"):
            return
        ts: Any = self.scheduler.tasks.get(key) if self.scheduler is not None else None
        ann = ts.annotations.get(ANNOTATION) if ts is not None and ts.annotations else None
        if not isinstance(ann, Mapping) or not ann.get("run"):
            return
        error, blamed = "", None
        if finish == "erred":
            blame = ts.exception_blame or ts
            blamed = blame.key
            error = str(blame.exception_text or kwargs.get("exception_text") or "")
        self._run(ann["run"]).task(key, ann["stage"], finish, error=error, blamed=blamed)

    def log_event(self, topic: str, msg: Any) -> None:
        """The runner's messages (topic ``lazysky``)."""
        if topic != TOPIC or not isinstance(msg, Mapping):
            return
        kind, run_id = msg.get("kind"), msg.get("run_id")
        if not isinstance(run_id, str):
            return
        if kind == "run":  # a new attempt of a run id starts afresh
            self.runs.pop(run_id, None)
            st = self._run(run_id)
            st.field = str(msg.get("field", ""))
            st.tiles = {str(t): [list(map(float, c)) for c in corners]
                        for t, corners in dict(msg.get("tiles") or {}).items()}
            st.exposures = [str(e) for e in msg.get("exposures") or []]
        elif kind == "rows":
            self._run(run_id).add_rows(str(msg["table"]), str(msg["tile"]), int(msg["rows"]))
        elif kind == "qa":  # one tile (publish_qa) or a batch of them (publish_run_qa)
            many = msg.get("tiles")
            got = many.items() if isinstance(many, Mapping) else [
                (msg["tile"], msg.get("values"))]
            st = self._run(run_id)
            for tile, values in got:
                st.add_qa(str(tile), dict(values or {}))
        elif kind == "end":
            self._run(run_id).finish(str(msg.get("status", "done")),
                                     timings=msg.get("timings") or {},
                                     errors=msg.get("errors") or {})

    # --- state ---------------------------------------------------------------------------
    def _run(self, run_id: str) -> RunState:
        st = self.runs.get(run_id)
        if st is None:
            st = self.runs[run_id] = RunState(run_id)
            while len(self.runs) > self.max_runs:
                old = next((k for k, v in self.runs.items() if v.finished is not None), None)
                if old is None:
                    break
                del self.runs[old]
        return st

    def snapshot(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every kept run (newest first), or the one ``run_id``, as JSON-ready data."""
        if run_id is None:
            return [s.snapshot() for s in reversed(self.runs.values())]
        return [self.runs[run_id].snapshot()] if run_id in self.runs else []

    def _handle_runs(self, run_id: str | None = None) -> list[dict[str, Any]]:
        return self.snapshot(run_id)


# --- the client side: what the runner calls -------------------------------------------------
def watch(client: Any, *, max_runs: int = MAX_RUNS) -> None:
    """Register the plugin on ``client``'s scheduler (once: a second call keeps its runs).

    The scheduler needs lazysky installed (the Kubernetes image has it).
    """
    client.register_plugin(LazySkyPlugin(max_runs=max_runs), name=LazySkyPlugin.name)


@contextmanager
def annotate(run_id: str, stage: str) -> Iterator[None]:
    """Mark the tasks of graphs submitted inside as ``stage`` of ``run_id`` (no run id:
    nothing is marked)."""
    if not run_id:
        yield
        return
    with dask.annotate(**{ANNOTATION: {"run": run_id, "stage": stage}}):
        yield


def _send(client: Any, msg: dict[str, Any]) -> None:
    try:
        client.log_event(TOPIC, msg)
    except (OSError, TypeError, AttributeError) as exc:  # watching never sinks a run
        logger.warning("could not tell the dashboard about run %s: %s", msg.get("run_id"),
                       exc)


def announce_run(client: Any, run_id: str, *, field: str, grid: Any,
                 exposures: Sequence[str] = ()) -> None:
    """Tell the page about a run: its field, its grid's tiles (sky corners), exposures."""
    import numpy as np

    wcs = grid.wcs
    tiles: dict[str, list[list[float]]] = {}
    for tile in grid.tile_ids():
        sy, sx = grid.tile_slices(tile)
        xs = np.array([sx.start, sx.stop, sx.stop, sx.start], dtype=float) - 0.5
        ys = np.array([sy.start, sy.start, sy.stop, sy.stop], dtype=float) - 0.5
        ra, dec = wcs.all_pix2world(xs, ys, 0)
        tiles[tile] = [[round(float(r), 7), round(float(d), 7)] for r, d in zip(ra, dec,
                                                                               strict=True)]
    _send(client, {"kind": "run", "run_id": run_id, "field": field, "tiles": tiles,
                   "exposures": list(exposures), "time": time.time()})


def announce_end(client: Any, run_id: str, *, status: str,
                 timings: Mapping[str, float] | None = None,
                 errors: Mapping[str, str] | None = None) -> None:
    """Tell the page how a run ended (status, seconds per stage, what it skipped)."""
    _send(client, {"kind": "end", "run_id": run_id, "status": status,
                   "timings": dict(timings or {}),
                   "errors": {str(k): str(v) for k, v in (errors or {}).items()}})


def report_rows(run_id: str, table: str, tile: str, rows: int) -> None:
    """From a task: ``rows`` sources of ``table`` were written for ``tile`` (live count).

    Does nothing outside a Dask worker.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(TOPIC, {"kind": "rows", "run_id": run_id, "table": table,
                             "tile": tile, "rows": int(rows)})


def publish_qa(client: Any, run_id: str, tile_id: str, values: Mapping[str, Any]) -> None:
    """QA values of one tile (``{metric: number, …, "flagged": bool}``) for the page.

    Examples
    --------
    >>> publish_qa(client, run_id, "t000_001", {"fwhm_px": 2.4, "flagged": False})  # doctest: +SKIP
    """
    _send(client, {"kind": "qa", "run_id": run_id, "tile": tile_id,
                   "values": _clean_qa(tile_id, values)})


def _clean_qa(tile_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, bool) or v is None:
            clean[str(k)] = v
        else:
            try:
                clean[str(k)] = float(v)
            except (TypeError, ValueError):
                msg = (f"QA value {k}={v!r} of tile {tile_id} is not a number; expected "
                       "numbers, and a bool 'flagged'")
                raise ParameterError(msg) from None
    return clean


def tile_qa_summary(products: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One tile's QA for the page from its products' (reference coadd and epochs): per
    metric the largest value (the worst), detections summed, flagged if any is.

    Examples
    --------
    >>> tile_qa_summary({"deep1": {"psf_fwhm_px": 2.0, "n_detections": 5, "flagged": False},
    ...                  "deep1-v2": {"psf_fwhm_px": 2.5, "n_detections": 1, "flagged": True}})
    {'psf_fwhm_px': 2.5, 'n_detections': 6, 'flagged': True}
    """
    out: dict[str, Any] = {}
    for values in products.values():
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
                continue
            out[k] = out.get(k, 0) + v if k == "n_detections" else max(out.get(k, v), v)
    out["flagged"] = any(bool(v.get("flagged")) for v in products.values())
    return out


def publish_run_qa(client: Any, run_id: str,
                   by_tile: Mapping[str, Mapping[str, Mapping[str, Any]]], *,
                   batch: int = 1000) -> None:
    """A run's QA (``{tile: {product: values}}``, as :func:`lazysky.pipeline.qa.run_qa`
    returns) for the page, one :func:`tile_qa_summary` per tile, ``batch`` tiles per
    message to the scheduler (a survey run has thousands of tiles)."""
    if batch < 1:
        raise ParameterError(f"batch: expected a number of tiles >= 1, got {batch!r}")
    items = [(str(t), _clean_qa(str(t), tile_qa_summary(p))) for t, p in by_tile.items()]
    for i in range(0, len(items), batch):
        _send(client, {"kind": "qa", "run_id": run_id, "tiles": dict(items[i:i + batch])})


def runs(client: Any, run_id: str | None = None) -> list[dict[str, Any]]:
    """The plugin's runs (newest first) as the page sees them, from a client.

    Raises
    ------
    ParameterError
        The plugin is not registered on that scheduler (call :func:`watch`).
    """
    got = client.sync(client.scheduler.lazysky_runs, run_id=run_id)
    if got is None:  # the scheduler has no such handler (it logs a warning)
        msg = "the lazysky plugin is not on this scheduler: call lazysky.dashboard.watch(client)"
        raise ParameterError(msg)
    return list(got)

"""What the lazysky page knows of a run: pure bookkeeping, no Dask, no I/O.

A :class:`RunState` is fed two kinds of facts — task transitions (the scheduler plugin
passes each lazysky task's key, stage and new state) and the runner's messages (the run
and its grid, rows written, QA values, how the run ended) — and answers with a
JSON-ready snapshot (:meth:`RunState.snapshot`) that the page, its JSON endpoint, the
Prometheus collector and the terminal progress bars all read.

Tiles are found in task names: every per-tile task of the pipeline carries the tile id
(``stack-t000_001-…``, ``write-product-t000_001-…``, ``detect-t000_001-…``,
``noisecorr-t000_001-…``, ``catalog-coadd-t000_001-<run>``). A tile is *done* in a stage
when every one of its tasks there has finished, *failed* when one erred (with the text
of the exception that caused it and the exposure the failing task read, when its name
says), *running* once one has started, *pending* before.

Examples
--------
>>> from lazysky.dashboard._state import RunState
>>> st = RunState("test-20260101-abc", field="deep1", tiles={"t000_000": []})
>>> st.task("stack-t000_000-ff", "reference", "processing", now=1.0)
>>> st.task("stack-t000_000-ff", "reference", "memory", now=3.0)
>>> st.snapshot()["stages"]["reference"]["done"]
1
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["STAGES", "TILE_STATES", "RunState", "stage_of", "tile_of"]

#: the stages the page shows per tile, in run order
STAGES = ("reference", "difference", "detect", "catalog")
#: the runner's stages without tiles (their seconds come from the runner)
RUN_STAGES = ("ingest", "select", "masters", "reference", "difference", "detect", "catalog")
TILE_STATES = ("pending", "running", "done", "failed")
#: how many characters of an exception's text are kept per failure
ERROR_CHARS = 2000

_TILE = re.compile(r"(?:^|-)(t\d{3}_\d{3})(?:-|$)")


def key_name(key: Any) -> str:
    """The name part of a Dask key (``"x-…"`` or ``("x-…", 0, 1)``)."""
    if isinstance(key, tuple) and key:
        key = key[0]
    return key.decode() if isinstance(key, bytes) else str(key)


def tile_of(key: Any) -> str | None:
    """The tile id a task's name carries, if any.

    Examples
    --------
    >>> tile_of(("write-product-t001_002-abc", 0))
    't001_002'
    >>> tile_of("calibrate-abc") is None
    True
    """
    m = _TILE.search(key_name(key))
    return m.group(1) if m else None


def stage_of(key: Any, annotated: str) -> str:
    """The page stage of a task computed under the runner stage ``annotated``.

    The runner computes detection and the catalog writes in one graph: the writes
    (``catalog-…``) are the ``catalog`` stage.
    """
    if annotated == "detect" and key_name(key).startswith("catalog-"):
        return "catalog"
    return annotated


@dataclass
class _Tile:
    total: int = 0
    done: int = 0
    running: int = 0
    failed: bool = False


@dataclass
class RunState:
    """Everything the page shows of one run (see the module docstring).

    Parameters
    ----------
    run_id
        The processing run.
    field
        The field's name.
    tiles
        Tile id → its sky corners ``[[ra, dec], …]`` in degrees (from the run's grid).
    exposures
        The exposures the run reads (to name the one a failing task concerns).
    """

    run_id: str
    field: str = ""
    tiles: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)
    exposures: list[str] = dataclasses.field(default_factory=list)
    status: str = "running"
    started: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None
    stages: dict[str, dict[str, _Tile]] = dataclasses.field(default_factory=dict)
    tasks: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # stage -> [total, done]
    # stage -> [first, last] task transition (seconds, scheduler clock)
    spans: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rows: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # table: tile: n
    qa: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    _seen: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> last state counted

    # --- facts in ---------------------------------------------------------------------
    def add_tasks(self, keys: Sequence[Any], stage: str) -> None:
        """Tasks of this run entered the scheduler under ``stage`` (counted once each)."""
        for key in keys:
            name = key_name(key) if not isinstance(key, tuple) else repr(key)
            if name in self._seen:
                continue
            self._seen[name] = "waiting"
            st = stage_of(key, stage)
            self.tasks.setdefault(st, [0, 0])[0] += 1
            tile = tile_of(key)
            if tile is not None:
                self.stages.setdefault(st, {}).setdefault(tile, _Tile()).total += 1

    def task(self, key: Any, stage: str, state: str, *, now: float | None = None,
             error: str = "", blamed: Any = None) -> None:
        """A task of this run moved to ``state`` (``processing``, ``memory``, ``erred``)."""
        if self.finished is not None:
            return  # the run ended: what it shows is final
        name = key_name(key) if not isinstance(key, tuple) else repr(key)
        if name not in self._seen:
            self.add_tasks([key], stage)
        before = self._seen[name]
        if before in ("memory", "erred") or state == before:
            return  # finished tasks count once (a released result stays done)
        st = stage_of(key, stage)
        now = time.time() if now is None else now
        span = self.spans.setdefault(st, [now, now])
        span[0], span[1] = min(span[0], now), max(span[1], now)
        tile = tile_of(key)
        rec = self.stages.get(st, {}).get(tile) if tile else None
        if rec is not None and before == "processing":
            rec.running -= 1
        if state == "processing":
            if rec is not None:
                rec.running += 1
        elif state == "memory":
            self.tasks[st][1] += 1
            if rec is not None:
                rec.done += 1
        elif state == "erred":
            if rec is not None:
                rec.failed = True
            if tile is not None or blamed is None or key_name(blamed) == key_name(key):
                self._failure(st, tile, blamed if blamed is not None else key, error)
        self._seen[name] = state

    def _failure(self, stage: str, tile: str | None, blamed: Any, error: str) -> None:
        blamed_name = key_name(blamed)
        for f in self.failures:
            if f["stage"] == stage and f["tile"] == tile and f["task"] == blamed_name:
                return
        exposure = next((e for e in sorted(self.exposures, key=len, reverse=True)
                         if e in blamed_name), None)
        self.failures.append({"stage": stage, "tile": tile, "exposure": exposure,
                              "task": blamed_name, "error": error[:ERROR_CHARS]})

    def add_rows(self, table: str, tile: str, rows: int) -> None:
        """``rows`` sources of ``table`` (``coadd`` or ``diff``) were written for ``tile``."""
        self.rows.setdefault(table, {})[tile] = int(rows)

    def add_qa(self, tile: str, values: Mapping[str, Any]) -> None:
        """QA values of a tile (numbers, and ``flagged``)."""
        self.qa.setdefault(tile, {}).update(values)

    def finish(self, status: str, *, timings: Mapping[str, float] | None = None,
               errors: Mapping[str, str] | None = None, now: float | None = None) -> None:
        """The run ended: its status, the runner's seconds per stage, what it skipped."""
        self.status = status
        self.finished = time.time() if now is None else now
        self.timings.update({k: float(v) for k, v in (timings or {}).items()})
        for what, text in (errors or {}).items():
            exposure = next((e for e in self.exposures if e in what), None)
            self.failures.append({"stage": "ingest", "tile": None,
                                  "exposure": exposure or what, "task": None,
                                  "error": str(text)[:ERROR_CHARS]})
        for tiles in self.stages.values():  # nothing runs any more
            for rec in tiles.values():
                rec.running = 0
        self._seen.clear()  # late transitions change nothing: free the per-task memory

    # --- facts out --------------------------------------------------------------------
    def tile_state(self, stage: str, tile: str) -> str:
        """``pending``, ``running``, ``done`` or ``failed`` of ``tile`` in ``stage``."""
        rec = self.stages.get(stage, {}).get(tile)
        if rec is None:
            return "pending"
        if rec.failed:
            return "failed"
        if rec.total and rec.done >= rec.total:
            return "done"
        return "running" if rec.running or rec.done else "pending"

    def overall(self, tile: str) -> str:
        """One state for a tile across stages (what the map colours by)."""
        states = [self.tile_state(s, tile) for s in STAGES if tile in self.stages.get(s, {})]
        if "failed" in states:
            return "failed"
        if states and all(s == "done" for s in states) and self.status != "running":
            return "done"
        if any(s in ("running", "done") for s in states):
            return "running" if self.status == "running" else "pending"
        return "pending"

    def snapshot(self) -> dict[str, Any]:
        """The run as plain JSON-ready data (what ``/lazysky/api/runs`` returns)."""
        stages: dict[str, Any] = {}
        for st in STAGES:
            states = {t: self.tile_state(st, t) for t in self.stages.get(st, {})}
            counts = {s: sum(1 for v in states.values() if v == s) for s in TILE_STATES}
            span = self.spans.get(st)
            total, done = self.tasks.get(st, [0, 0])
            stages[st] = {"tiles": states, **counts, "total": len(states),
                          "tasks": total, "tasks_done": done,
                          "seconds": round(span[1] - span[0], 3) if span else 0.0}
        tiles = [{"tile": t, "corners": c, "state": self.overall(t),
                  "stages": {st: stages[st]["tiles"].get(t, "pending") for st in STAGES},
                  "sources": self.rows.get("coadd", {}).get(t),
                  "dia_sources": self.rows.get("diff", {}).get(t),
                  "qa": dict(self.qa.get(t, {}))}
                 for t, c in self.tiles.items()]
        return {
            "run_id": self.run_id, "field": self.field, "status": self.status,
            "started": self.started, "finished": self.finished,
            "stages": stages, "tiles": tiles, "failures": list(self.failures),
            "sources": sum(self.rows.get("coadd", {}).values()),
            "dia_sources": sum(self.rows.get("diff", {}).values()),
            "timings": dict(self.timings),
            # every annotated stage's task counts, the page's stages and others (qa)
            "tasks": {st: {"tasks": n[0], "tasks_done": n[1],
                           "seconds": round(self.spans[st][1] - self.spans[st][0], 3)
                           if st in self.spans else 0.0}
                      for st, n in self.tasks.items()},
        }

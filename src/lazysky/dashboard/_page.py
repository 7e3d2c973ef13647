"""The ``/lazysky`` page of the Dask dashboard and its JSON twin ``/lazysky/api/runs``.

Added to the scheduler's running HTTP application through distributed's own extension
points: a Bokeh application served like the dashboard's own pages (its template and
navigation bar, where it adds a "Lazysky" link) and a Tornado route for the JSON. The page
shows one run at a time (the newest, or the one chosen): a sky map of the grid's tiles
coloured by state or by a QA metric, with hover details; progress, tiles and seconds
per stage; sources written; failures with their error text and exposure or tile. A
periodic callback refreshes it every second while the page is open.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lazysky.dashboard._state import STAGES

__all__ = ["STATE_COLOURS", "add_routes", "lazysky_doc", "map_data"]

logger = logging.getLogger(__name__)

PAGE = "/lazysky"
API = "/lazysky/api/runs"
STATE_COLOURS = {"pending": "#d9d9d9", "running": "#6baed6", "done": "#31a354",
                 "failed": "#de2d26"}
FLAGGED_COLOUR = "#ff7f00"
#: refresh period of the page (ms)
REFRESH_MS = 1000


def _viridis(value: float, lo: float, hi: float) -> str:
    from bokeh.palettes import Viridis256

    if hi <= lo:
        return str(Viridis256[128])
    i = round((value - lo) / (hi - lo) * 255)
    return str(Viridis256[max(0, min(255, i))])


def map_data(snap: dict[str, Any], colour_by: str = "state") -> dict[str, list[Any]]:
    """The sky map's columns for a run snapshot: one patch per tile.

    ``colour_by`` is ``"state"`` or a QA metric; tiles without that metric are grey,
    flagged tiles get an orange outline.
    """
    tiles = snap["tiles"]
    values = [t["qa"].get(colour_by) for t in tiles]
    numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    lo, hi = (min(numbers), max(numbers)) if numbers else (0.0, 0.0)
    colours, lines, qa_text = [], [], []
    for t, v in zip(tiles, values, strict=True):
        if colour_by == "state":
            colours.append(STATE_COLOURS.get(t["state"], "#d9d9d9"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            colours.append(_viridis(float(v), lo, hi))
        else:
            colours.append(STATE_COLOURS["pending"])
        lines.append(FLAGGED_COLOUR if t["qa"].get("flagged") else "#404040")
        qa_text.append(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in sorted(t["qa"].items())) or "-")
    return {
        "tile": [t["tile"] for t in tiles],
        "xs": [[c[0] for c in t["corners"]] for t in tiles],
        "ys": [[c[1] for c in t["corners"]] for t in tiles],
        "state": [t["state"] for t in tiles],
        "stages": [", ".join(f"{s} {t['stages'][s]}" for s in STAGES) for t in tiles],
        "sources": ["-" if t["sources"] is None else str(t["sources"]) for t in tiles],
        "dia_sources": ["-" if t["dia_sources"] is None else str(t["dia_sources"])
                        for t in tiles],
        "qa": qa_text,
        "colour": colours,
        "line": lines,
    }


def _stage_data(snap: dict[str, Any]) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {k: [] for k in ("stage", "progress", "done", "running",
                                                  "failed", "pending", "tasks", "seconds")}
    for stage in STAGES:
        st = snap["stages"][stage]
        total = st["total"] or 0
        rows["stage"].append(stage)
        rows["progress"].append(f"{100.0 * st['done'] / total:.0f} %" if total else "-")
        for k in ("done", "running", "failed", "pending"):
            rows[k].append(st[k])
        rows["tasks"].append(f"{st['tasks_done']}/{st['tasks']}")
        secs = snap["timings"].get(stage, st["seconds"])
        rows["seconds"].append(f"{secs:.1f}")
    return rows


def _failure_data(snap: dict[str, Any]) -> dict[str, list[Any]]:
    fs = snap["failures"]
    return {"stage": [f["stage"] for f in fs], "tile": [f["tile"] or "-" for f in fs],
            "exposure": [f["exposure"] or "-" for f in fs],
            "error": [f["error"].strip().splitlines()[-1] if f["error"].strip() else ""
                      for f in fs]}


def _header(snap: dict[str, Any] | None) -> str:
    if snap is None:
        return "<h2>lazysky</h2><p>No lazysky run on this cluster yet.</p>"
    return (f"<h2>lazysky run {snap['run_id']}</h2>"
            f"<p>field <b>{snap['field']}</b> · status <b id='lazysky-status'>"
            f"{snap['status']}</b> · {len(snap['tiles'])} tiles · "
            f"{snap['sources']} sources in the coadd, {snap['dia_sources']} in the "
            f"differences · {len(snap['failures'])} failure(s)</p>")


def lazysky_doc(plugin: Any, scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """Build the page's Bokeh document (called per browser session by Bokeh)."""
    from bokeh import models
    from bokeh.layouts import column, row
    from bokeh.plotting import figure

    bm: Any = models  # bokeh's models are made at import: mypy sees no attributes
    ColumnDataSource, DataTable, Div = bm.ColumnDataSource, bm.DataTable, bm.Div
    HoverTool, Select, TableColumn = bm.HoverTool, bm.Select, bm.TableColumn

    def current() -> dict[str, Any] | None:
        snaps = plugin.snapshot(select.value) if select.value else plugin.snapshot()
        return snaps[0] if snaps else None

    def run_options() -> list[tuple[str, str]]:
        return [("", "the newest run"), *((r, r) for r in reversed(plugin.runs))]

    select = Select(title="run", options=run_options(), value="", width=420)
    colour = Select(title="colour by", options=["state"], value="state", width=200)
    header = Div(text=_header(None), sizing_mode="stretch_width")
    empty = map_data({"tiles": []})
    tiles = ColumnDataSource(empty, name="lazysky-tiles")
    stages = ColumnDataSource(_stage_data({"stages": {s: {
        "total": 0, "done": 0, "running": 0, "failed": 0, "pending": 0, "tasks": 0,
        "tasks_done": 0, "seconds": 0.0} for s in STAGES}, "timings": {}}),
        name="lazysky-stages")
    failures = ColumnDataSource({"stage": [], "tile": [], "exposure": [], "error": []},
                                name="lazysky-failures")
    sky = figure(title="tiles on the sky", x_axis_label="RA (deg)",
                 y_axis_label="Dec (deg)", match_aspect=True, height=480, width=560,
                 tools="pan,wheel_zoom,box_zoom,reset,save", name="lazysky-map")
    x_range: Any = sky.x_range
    x_range.flipped = True  # RA grows to the east, on the left
    sky.patches("xs", "ys", source=tiles, fill_color="colour", line_color="line",
                line_width=1.5, fill_alpha=0.85, name="lazysky-tile-patches")
    sky.add_tools(HoverTool(tooltips=[("tile", "@tile"), ("state", "@state"),
                                      ("stages", "@stages"), ("sources", "@sources"),
                                      ("difference sources", "@dia_sources"),
                                      ("QA", "@qa")]))
    stage_table = DataTable(source=stages, columns=[TableColumn(field=f, title=f) for f in (
        "stage", "progress", "done", "running", "failed", "pending", "tasks", "seconds")],
        height=150, width=620, index_position=None, name="lazysky-stage-table")
    fail_table = DataTable(source=failures, columns=[
        TableColumn(field="stage", title="stage", width=80),
        TableColumn(field="tile", title="tile", width=80),
        TableColumn(field="exposure", title="exposure", width=160),
        TableColumn(field="error", title="error", width=600)],
        height=200, sizing_mode="stretch_width", index_position=None,
        name="lazysky-failure-table")

    def update() -> None:
        options = run_options()
        if [tuple(o) for o in select.options] != options:
            select.options = options
        snap = current()
        header.text = _header(snap)
        if snap is None:
            return
        metrics = sorted({k for t in snap["tiles"] for k in t["qa"] if k != "flagged"})
        if colour.options != ["state", *metrics]:
            colour.options = ["state", *metrics]
        data = map_data(snap, colour.value if colour.value in metrics else "state")
        if dict(tiles.data) != data:
            tiles.data = data
        sdata = _stage_data(snap)
        if dict(stages.data) != sdata:
            stages.data = sdata
        fdata = _failure_data(snap)
        if dict(failures.data) != fdata:
            failures.data = fdata

    update()
    select.on_change("value", lambda attr, old, new: update())
    colour.on_change("value", lambda attr, old, new: update())
    doc.add_periodic_callback(update, REFRESH_MS)
    layout = column(header, row(select, colour),
                    row(sky, column(Div(text="<h3>stages</h3>"), stage_table)),
                    Div(text="<h3>failures</h3>"), fail_table, sizing_mode="stretch_width",
                    name="lazysky-page")
    doc.add_root(layout)
    doc.title = "Dask: lazysky"
    try:
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME
    except ImportError:  # pragma: no cover - distributed moved them: a bare page still works
        pass


def _json_handler(plugin: Any) -> Any:
    from tornado import web

    class RunsHandler(web.RequestHandler):
        def get(self, run_id: str | None = None) -> None:
            runs = plugin.snapshot(run_id or None)
            if run_id and not runs:
                self.set_status(404)
                self.write({"error": f"no run {run_id!r} on this scheduler",
                            "runs": list(plugin.runs)})
                return
            self.set_header("Content-Type", "application/json")
            self.write(json.dumps({"runs": runs}))

    return RunsHandler


def _bokeh_prefix(scheduler: Any) -> str:
    for app in getattr(scheduler.http_application, "applications", []):
        prefix = getattr(app, "prefix", None)
        if isinstance(prefix, str):
            return prefix
    return ""


def add_routes(scheduler: Any, plugin: Any) -> None:
    """Add the page and the JSON route to ``scheduler``'s running HTTP server."""
    http = getattr(scheduler, "http_application", None)
    if http is None:  # a scheduler without HTTP server: nothing to add to
        return
    prefix = _bokeh_prefix(scheduler).rstrip("/")
    handler = _json_handler(plugin)
    http.add_handlers(r".*", [(prefix + API + r"/?", handler),
                              (prefix + API + r"/([^/]+)", handler)])
    try:
        from functools import partial

        from distributed.dashboard.core import BokehApplication
        from distributed.dashboard.scheduler import template_variables
        from tornado.ioloop import IOLoop
    except ImportError:
        logger.info("bokeh is not installed: /lazysky serves only %s", API)
        return
    variables = template_variables(scheduler)
    if "lazysky" not in variables["pages"]:
        variables["pages"].append("lazysky")  # the dashboard's navigation bar
    app = BokehApplication({PAGE: partial(lazysky_doc, plugin)}, scheduler, prefix=prefix,
                           template_variables=variables)
    http.add_application(app)
    app.initialize(IOLoop.current())
    app.start()

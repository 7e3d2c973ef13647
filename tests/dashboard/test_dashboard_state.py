"""The page's bookkeeping, map colours, metrics and bars, on hand-made facts (no cluster)."""

from __future__ import annotations

import io

import pytest

from lazysky.dashboard import LazySkyPlugin, RunState
from lazysky.dashboard._metrics import collect
from lazysky.dashboard._page import FLAGGED_COLOUR, STATE_COLOURS, map_data
from lazysky.dashboard._progress import bar, show_progress
from lazysky.dashboard._state import stage_of, tile_of
from lazysky.errors import ParameterError

RUN = "test-20260101-abc"
CORNERS = [[10.0, 0.0], [10.1, 0.0], [10.1, 0.1], [10.0, 0.1]]


def _state() -> RunState:
    st = RunState(RUN, field="deep1", tiles={"t000_000": CORNERS, "t000_001": CORNERS},
                  exposures=["deep1-r-e000-d00", "deep1-r-e000-d0"])
    st.add_tasks(["stack-t000_000-a", "write-product-t000_000-b", "stack-t000_001-c",
                  ("calibrate-d", 0, 0, 0)], "reference")
    return st


def test_task_names_give_tile_and_stage() -> None:
    assert tile_of(("resample-deep1-r-e000-d00-CCD01-t003_012-ab", 0, 0)) == "t003_012"
    assert tile_of("catalog-diff-t000_001-test-20260101-abc") == "t000_001"
    assert tile_of("noisecorr-abcdef") is None
    assert tile_of("stack-t000_0010-x") is None  # not a tile id
    assert stage_of("catalog-coadd-t000_000-r", "detect") == "catalog"
    assert stage_of("detect-t000_000-x", "detect") == "detect"
    assert stage_of("catalog-coadd-t000_000-r", "reference") == "reference"


def test_tile_states_follow_their_tasks() -> None:
    st = _state()
    assert st.tile_state("reference", "t000_000") == "pending"
    st.task("stack-t000_000-a", "reference", "processing", now=1.0)
    assert st.tile_state("reference", "t000_000") == "running"
    st.task("stack-t000_000-a", "reference", "memory", now=2.0)
    assert st.tile_state("reference", "t000_000") == "running"  # its write is still to do
    st.task("write-product-t000_000-b", "reference", "memory", now=4.0)
    st.task("write-product-t000_000-b", "reference", "memory", now=5.0)  # counted once
    assert st.tile_state("reference", "t000_000") == "done"
    snap = st.snapshot()["stages"]["reference"]
    assert (snap["done"], snap["pending"], snap["total"]) == (1, 1, 2)
    assert (snap["tasks_done"], snap["tasks"]) == (2, 4)
    assert snap["seconds"] == 3.0
    assert st.tile_state("difference", "t000_000") == "pending"


def test_a_failure_names_tile_exposure_and_error() -> None:
    st = _state()
    blamed = ("open-deep1-r-e000-d00-ff", 0, 0, 0)
    st.task(blamed, "reference", "erred", error="RuntimeError: bad chunk", blamed=blamed)
    st.task("stack-t000_001-c", "reference", "erred", error="RuntimeError: bad chunk",
            blamed=blamed)
    st.task("stack-t000_001-c", "reference", "erred", error="again", blamed=blamed)
    assert st.tile_state("reference", "t000_001") == "failed"
    assert st.overall("t000_001") == "failed"
    assert st.failures == [
        {"stage": "reference", "tile": None, "exposure": "deep1-r-e000-d00",
         "task": "open-deep1-r-e000-d00-ff", "error": "RuntimeError: bad chunk"},
        {"stage": "reference", "tile": "t000_001", "exposure": "deep1-r-e000-d00",
         "task": "open-deep1-r-e000-d00-ff", "error": "RuntimeError: bad chunk"},
    ]
    st.finish("failed", timings={"ingest": 1.5}, errors={"/raw/x.fits": "truncated"})
    snap = st.snapshot()
    assert snap["status"] == "failed"
    assert snap["timings"] == {"ingest": 1.5}
    assert snap["failures"][-1] == {"stage": "ingest", "tile": None, "exposure": "/raw/x.fits",
                                    "task": None, "error": "truncated"}
    assert st.overall("t000_000") == "pending"  # never finished


def test_rows_and_qa_in_snapshot_and_metrics() -> None:
    st = _state()
    for key in ("stack-t000_000-a", "write-product-t000_000-b", "stack-t000_001-c"):
        st.task(key, "reference", "memory")
    st.add_rows("coadd", "t000_000", 12)
    st.add_rows("coadd", "t000_000", 12)  # a retried write replaces, never adds
    st.add_rows("diff", "t000_001", 3)
    st.add_qa("t000_001", {"fwhm_px": 2.0, "flagged": True})
    st.finish("done")
    snap = st.snapshot()
    assert (snap["sources"], snap["dia_sources"]) == (12, 3)
    assert [t["state"] for t in snap["tiles"]] == ["done", "done"]
    fams = {f.name: f for f in collect([snap])}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in fams.values() for s in f.samples}
    assert samples[("lazysky_tiles", (("field", "deep1"), ("run_id", RUN),
                                      ("stage", "reference"), ("state", "done")))] == 2
    assert samples[("lazysky_rows_written_total", (("run_id", RUN), ("table", "coadd")))] == 12
    assert samples[("lazysky_qa", (("metric", "fwhm_px"), ("run_id", RUN),
                                   ("tile", "t000_001")))] == 2.0
    assert samples[("lazysky_tiles_flagged", (("run_id", RUN),))] == 1
    assert samples[("lazysky_run_active", (("run_id", RUN), ("status", "done")))] == 0


def test_map_colours_by_state_or_metric() -> None:
    st = _state()
    st.task("stack-t000_001-c", "reference", "erred", error="x")
    st.add_qa("t000_000", {"fwhm_px": 2.0})
    st.add_qa("t000_001", {"fwhm_px": 3.0, "flagged": True})
    snap = st.snapshot()
    by_state = map_data(snap)
    assert by_state["colour"] == [STATE_COLOURS["pending"], STATE_COLOURS["failed"]]
    assert by_state["line"][1] == FLAGGED_COLOUR
    assert by_state["xs"][0] == [10.0, 10.1, 10.1, 10.0]
    by_fwhm = map_data(snap, "fwhm_px")
    assert by_fwhm["colour"][0] != by_fwhm["colour"][1]  # low and high ends of the scale
    assert map_data(snap, "no-such-metric")["colour"] == [STATE_COLOURS["pending"]] * 2


def test_bar_and_plugin_arguments() -> None:
    assert bar("detect", 0, 0, width=4) == "detect      [····]   0/0   tiles 0.0 s"
    assert bar("catalog", 2, 4, width=4, failed=1).endswith("1 failed")
    with pytest.raises(ParameterError, match="max_runs must be >= 1"):
        LazySkyPlugin(max_runs=0)


def test_plugin_keeps_the_newest_runs() -> None:
    plugin = LazySkyPlugin(max_runs=2)
    for i in range(3):
        plugin.log_event("lazysky", {"kind": "run", "run_id": f"r{i}", "field": "f",
                                     "tiles": {"t000_000": CORNERS}})
        plugin.log_event("lazysky", {"kind": "end", "run_id": f"r{i}", "status": "done"})
    plugin.log_event("other-topic", {"kind": "end", "run_id": "r9"})
    assert [s["run_id"] for s in plugin.snapshot()] == ["r2", "r1"]
    assert plugin.snapshot("r0") == []


def test_progress_says_so_without_plugin() -> None:
    from distributed import Client, LocalCluster

    out = io.StringIO()
    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        fut = client.submit(sum, [1, 2])
        show_progress(client, [fut], run_id=RUN, stage="reference", label="sums", out=out)
        assert fut.result() == 3
    assert out.getvalue() == ("[sums]\n  (no progress bars: lazysky's scheduler plugin is off, "
                              "cluster.watch)\n")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _slow_tile(tile: str) -> str:
    import time

    time.sleep(1.5)
    return tile


def test_progress_redraws_on_a_terminal_and_ends_with_the_stage() -> None:
    """On a terminal the bars are redrawn while the stage runs and the last drawing is the
    finished state."""
    import dask
    from distributed import Client, LocalCluster

    from lazysky.dashboard import annotate, watch

    out = _Terminal()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        watch(client)
        tasks = [dask.delayed(_slow_tile)(t, dask_key_name=f"stack-{t}-{RUN}")
                 for t in ("t000_000", "t000_001")]
        with annotate(RUN, "reference"):
            futs = client.compute(tasks)
        show_progress(client, futs, run_id=RUN, stage="reference", label="coadd", out=out)
        assert all(f.done() for f in futs)
    text = out.getvalue()
    drawings = text.split("\x1b[1F")  # each redraw goes back over the one bar
    assert len(drawings) >= 2, text  # drawn while running, then again
    assert "reference   [" in drawings[0]
    assert "2/2   tiles" in drawings[-1], text
    assert "2/2" not in drawings[0], text


def test_grafana_dashboard_uses_the_metrics_lazysky_serves() -> None:
    """Every lazysky_* series a panel queries is one the collector serves."""
    import json
    import re
    from pathlib import Path

    st = _state()
    st.add_qa("t000_000", {"fwhm_px": 2.0})
    served = set()
    for fam in collect([st.snapshot()]):
        served |= {s.name for s in fam.samples}
    dash = json.loads((Path(__file__).parents[2] / "kube" / "grafana"
                       / "lazysky-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    used = {m for e in exprs for m in re.findall(r"\blazysky_[a-z_]+", e)}
    assert used, "the dashboard queries no lazysky metric"
    assert used <= served, sorted(used - served)
    assert {"lazysky_tiles", "lazysky_rows_written_total", "lazysky_stage_seconds",
            "lazysky_qa"} <= used
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_annotate_marks_only_a_named_run() -> None:
    import dask

    from lazysky.dashboard import annotate

    with annotate(RUN, "reference"):
        assert dask.get_annotations() == {"lazysky": {"run": RUN, "stage": "reference"}}
    with annotate("", "reference"):
        assert "lazysky" not in dask.get_annotations()

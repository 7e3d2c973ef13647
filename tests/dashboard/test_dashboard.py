"""The lazysky dashboard page, its JSON, /metrics and the terminal bars, on real runs.

The session's local cluster with the plugin (``tiny_cluster``) runs the tiny survey
twice: the session's clean run (``tiny_clean``, with its progress bars), whose page data
must equal the catalog's ``run_tiles`` and the products' complete tiles,
and a run that fails — a corrupt raw file among its inputs (skipped at ingest) and one
reference exposure whose pixels were damaged in the store (the tiles it covers fail) —
whose failures must show with their error text, exposure and tile.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lazysky.catalog import Catalog, done_tiles
from lazysky.config import load_settings
from lazysky.dashboard import publish_qa, runs
from lazysky.errors import ParameterError
from lazysky.runner import RunSummary, run
from lazysky.zarr_store.products import complete_tiles

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

FIELD = "deep1"


def _config(survey: Path, store: Path, **extra: Any) -> Any:
    from test_run_end_to_end import _config as e2e_config

    return e2e_config(survey, store, **extra)


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


def _damage_one_detector(store: Path, exposure: str) -> Path:
    """Overwrite the first pixel chunk of ``exposure``'s first detector with garbage."""
    chunks = sorted(p for p in (store / "raw" / exposure / "sci").rglob("*")
                    if p.is_file() and "c" in p.relative_to(store / "raw" / exposure / "sci")
                    .parts[:1])
    assert chunks, f"no pixel chunk under {store / 'raw' / exposure / 'sci'}"
    chunks[0].write_bytes(b"not a blosc frame" * 64)
    return chunks[0]


@pytest.fixture(scope="module")
def watched(tiny_survey: Path, tiny_clean: dict[str, Any], tiny_client: Any,
            tmp_path_factory: pytest.TempPathFactory, catalog: Catalog) -> dict[str, Any]:
    """Two runs the plugin of ``tiny_cluster``'s scheduler watched: the session's clean
    run (``tiny_clean``, drawn with progress bars) and a failing run made here.

    The plugin keeps the newest MAX_RUNS (20) runs of the session's cluster: in the
    suite's order this module is the first to use it after the clean run.
    """
    from lazysky.runs import new_run_id

    settings = load_settings(catalog_dsn=catalog.dsn)
    clean: RunSummary = tiny_clean["summary"]
    store = Path(clean.store)
    # the failing run: the clean run's ingested store (copied), one reference exposure
    # damaged, and a truncated raw file to ingest
    bad_store = tmp_path_factory.mktemp("dash-bad-store")
    shutil.copytree(store / "raw", bad_store / "raw")
    shutil.copytree(store / "calib", bad_store / "calib")
    damaged = _damage_one_detector(bad_store, "deep1-r-e000-d00")
    good = (tiny_survey / "raw" / "deep1-r-e002-d00.fits").read_bytes()
    truncated = tmp_path_factory.mktemp("dash-bad-raw") / "deep1-r-e009-d00.fits"
    truncated.write_bytes(good[: len(good) // 2])
    failing_id = new_run_id("test")
    cfg = _config(tiny_survey, bad_store, run_id=failing_id).model_copy(
        update={"ingest": [str(truncated)]})
    with pytest.raises(Exception) as failed:  # noqa: PT011 - whatever the codec raises
        run(cfg, settings=settings, client=tiny_client, catalog=catalog)
    return {"client": tiny_client, "clean": clean, "progress": tiny_clean["progress"],
            "store": store, "bad_store": bad_store, "damaged": damaged,
            "truncated": truncated, "error": failed.value, "failing_id": failing_id,
            "base": tiny_client.dashboard_link.rsplit("/status", 1)[0]}


@pytest.fixture(scope="module")
def pages(watched: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The JSON of every run, by run id, as served over HTTP."""
    status, body = _get(watched["base"] + "/lazysky/api/runs")
    assert status == 200
    return {r["run_id"]: r for r in json.loads(body)["runs"]}


def test_clean_run_page_matches_catalog_and_products(
        watched: dict[str, Any], pages: dict[str, dict[str, Any]], catalog: Catalog) -> None:
    clean: RunSummary = watched["clean"]
    page = pages[clean.run_id]
    assert page["status"] == "done"
    assert page["field"] == FIELD
    assert len(page["tiles"]) == clean.tiles
    states = {t["tile"]: t["stages"] for t in page["tiles"]}
    # what the products and the catalog say is done, the page says is done
    co = complete_tiles(watched["store"], clean.run_id, "coadd", FIELD)
    assert sorted(t for t, s in states.items() if s["reference"] == "done") == co
    dco = done_tiles(clean.run_id, "detect-coadd", catalog=catalog)
    ddia = done_tiles(clean.run_id, "detect-diff", catalog=catalog)
    assert {t for t, s in states.items() if s["catalog"] == "done"} == set(dco) | set(ddia)
    assert {t for t, s in states.items() if s["difference"] == "done"} == set(ddia)
    assert all(t["state"] == "done" for t in page["tiles"])
    # rows per tile as the catalog recorded them, and the run's totals
    assert {t["tile"]: t["sources"] for t in page["tiles"]} == dco
    assert {t["tile"]: t["dia_sources"] for t in page["tiles"]} == ddia
    assert (page["sources"], page["dia_sources"]) == (clean.sources, clean.dia_sources)
    assert page["failures"] == []
    for stage in ("reference", "difference", "detect", "catalog"):
        st = page["stages"][stage]
        assert st["done"] == st["total"] == clean.tiles, stage
        assert st["tasks_done"] == st["tasks"] > 0
    assert page["timings"] == clean.timings  # the runner's seconds per stage
    # tile corners on the sky around the field
    ra = [c[0] for t in page["tiles"] for c in t["corners"]]
    assert max(ra) - min(ra) < 5.0


def test_failing_run_shows_failed_tiles_with_their_error(
        watched: dict[str, Any], pages: dict[str, dict[str, Any]]) -> None:
    page = pages[watched["failing_id"]]
    assert page["status"] == "failed"
    failed = [t for t in page["tiles"] if t["state"] == "failed"]
    assert failed, "no tile shows as failed"
    assert page["stages"]["reference"]["failed"] == len(failed)
    tile_failures = [f for f in page["failures"] if f["tile"] is not None]
    assert {f["tile"] for f in tile_failures} == {t["tile"] for t in failed}
    cause = "blosc decompression"  # what reading the damaged chunk raises
    assert cause in str(watched["error"])
    for f in tile_failures:
        assert f["stage"] == "reference"
        assert f["exposure"] == "deep1-r-e000-d00"
        assert f["task"].startswith("open-deep1-r-e000-d00-")  # the task that failed first
        assert cause in f["error"]
    # the failing task itself is listed too (no tile: it reads a detector's pixels)
    [root] = [f for f in page["failures"] if f["stage"] == "reference" and f["tile"] is None]
    assert root["exposure"] == "deep1-r-e000-d00"
    assert cause in root["error"]
    # a failed tile was never written
    done = set(complete_tiles(watched["bad_store"], page["run_id"], "coadd", FIELD))
    assert not done & {t["tile"] for t in failed}
    # the corrupt raw file, skipped at ingest, is listed with its error
    [skipped] = [f for f in page["failures"] if f["stage"] == "ingest"]
    assert skipped["exposure"] == str(watched["truncated"])
    assert "truncated" in skipped["error"] or "FITS" in skipped["error"], skipped


def test_metrics_list_the_runs(watched: dict[str, Any],
                               pages: dict[str, dict[str, Any]]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _get(watched["base"] + "/metrics")
    assert status == 200
    samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert any(name.startswith("dask_scheduler_") for name, _ in samples)  # Dask's own
    for rid, page in pages.items():
        for stage, st in page["stages"].items():
            for state in ("pending", "running", "done", "failed"):
                key = ("lazysky_tiles", (("field", FIELD), ("run_id", rid), ("stage", stage),
                                         ("state", state)))
                assert samples[key] == st[state], key
        assert samples[("lazysky_rows_written_total", (("run_id", rid), ("table", "coadd")))] \
            == page["sources"]
        assert samples[("lazysky_failures", (("run_id", rid),))] == len(page["failures"])
    clean = watched["clean"]
    assert samples[("lazysky_stage_seconds", (("run_id", clean.run_id), ("stage", "detect")))] \
        == clean.timings["detect"]
    assert samples[("lazysky_rows_written_total", (("run_id", clean.run_id),
                                                   ("table", "diff")))] == clean.dia_sources


def test_qa_values_reach_page_and_metrics(watched: dict[str, Any], catalog: Catalog) -> None:
    from lazysky.catalog.qa import qa_by_tile
    from lazysky.dashboard._plugin import tile_qa_summary

    client, rid = watched["client"], watched["clean"].run_id
    # the run's own QA stage published every tile's QA (the worst value over products)
    recorded = qa_by_tile(rid, catalog=catalog)
    assert recorded
    shown = {t["tile"]: t["qa"] for t in runs(client, rid)[0]["tiles"]}
    assert shown == {t: tile_qa_summary(p) for t, p in recorded.items()}
    assert all("psf_fwhm_px" in v and "flagged" in v for v in shown.values())
    tile = runs(client, rid)[0]["tiles"][0]["tile"]
    publish_qa(client, rid, tile, {"fwhm_px": 2.5, "bkg_rms": 3, "flagged": True})
    [snap] = runs(client, rid)
    qa = {t["tile"]: t["qa"] for t in snap["tiles"]}
    # published values join (and override) what the run's QA stage gave the tile
    assert {k: qa[tile][k] for k in ("fwhm_px", "bkg_rms", "flagged")} == {
        "fwhm_px": 2.5, "bkg_rms": 3.0, "flagged": True}
    assert "psf_fwhm_px" in qa[tile]
    _, body = _get(watched["base"] + "/metrics")
    text = body.decode()
    assert f'lazysky_qa{{metric="fwhm_px",run_id="{rid}",tile="{tile}"}} 2.5' in text
    flagged = sum(bool(v["flagged"]) for v in {**shown, tile: {"flagged": True}}.values())
    assert f'lazysky_tiles_flagged{{run_id="{rid}"}} {float(flagged)}' in text
    with pytest.raises(ParameterError, match=r"fwhm_px='wide'.*expected numbers"):
        publish_qa(client, rid, tile, {"fwhm_px": "wide"})
    # a run's QA goes in batches of tiles (here 2 per message): every tile arrives
    from lazysky.dashboard._plugin import publish_run_qa

    bumped = {t: {p: {**v, "limiting_mag": 99.0} for p, v in prods.items()}
              for t, prods in recorded.items()}
    publish_run_qa(client, rid, bumped, batch=2)
    shown = {t["tile"]: t["qa"] for t in runs(client, rid)[0]["tiles"]}
    assert len(recorded) > 2
    assert {t: shown[t]["limiting_mag"] for t in recorded} == dict.fromkeys(recorded, 99.0)
    with pytest.raises(ParameterError, match="batch: expected a number of tiles >= 1, got 0"):
        publish_run_qa(client, rid, bumped, batch=0)


def test_page_answers_and_links_from_navigation(watched: dict[str, Any]) -> None:
    status, body = _get(watched["base"] + "/lazysky")
    assert status == 200
    assert b"lazysky" in body.lower()
    assert b"bokeh" in body.lower()
    _, status_page = _get(watched["base"] + "/status")
    assert b'href="lazysky"' in status_page
    with pytest.raises(urllib.error.HTTPError, match="404"):
        _get(watched["base"] + "/lazysky/api/runs/test-20260101-nosuchrun")


def test_terminal_shows_a_bar_per_stage(watched: dict[str, Any]) -> None:
    out, n = watched["progress"], watched["clean"].tiles
    for label in ("[reference coadd]", "[differences]", "[detect + catalog]"):
        assert label in out
    for stage in ("reference", "difference", "detect", "catalog"):
        bars = [line for line in out.splitlines() if line.startswith(f"{stage} ")]
        assert bars, f"no bar for {stage} in {out!r}"
        assert f"{n:>3}/{n:<3} tiles" in bars[-1], bars[-1]  # every tile done at the end
    # QA has no tiles on the page: its bar counts tasks (a tile x product each), all done
    import re

    qa = [line for line in out.splitlines() if line.startswith("qa ")]
    assert qa, f"no bar for qa in {out!r}"
    done, total = map(int, re.search(r"(\d+)/(\d+)\s+tasks", qa[-1]).groups())
    assert done == total >= n, qa[-1]


def test_runs_without_plugin_is_a_clear_error() -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client, \
            pytest.raises(ParameterError, match=r"lazysky\.dashboard\.watch"):
        runs(client)


CHROMIUM = os.environ.get("LAZYSKY_CHROMIUM", "/usr/bin/chromium")


@pytest.mark.browser
def test_page_draws_in_a_real_browser(watched: dict[str, Any],
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """Debian's chromium, headless, driven by Playwright: no JS error, a glyph per tile."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (bash bootstrap.sh test installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    newest = runs(watched["client"])[0]
    errors: list[str] = []
    artifacts = Path(os.environ.get("LAZYSKY_TEST_ARTIFACTS")
                     or tmp_path_factory.getbasetemp() / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-gpu",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(watched["base"] + "/lazysky", wait_until="load")
            page.wait_for_function(
                "() => window.Bokeh && Bokeh.documents.length > 0 && "
                "Bokeh.documents[0].get_model_by_name('lazysky-tiles') !== null && "
                "Bokeh.documents[0].get_model_by_name('lazysky-tiles')"
                ".get_length() > 0", timeout=30_000)
            n_glyphs = page.evaluate(
                "() => Bokeh.documents[0].get_model_by_name('lazysky-tiles').get_length()")
            shown = page.evaluate(
                "() => Bokeh.documents[0].get_model_by_name('lazysky-tiles')"
                ".get_column('tile')")
            # the map's renderer view exists, i.e. the glyphs were laid out and drawn
            drawn = page.evaluate(
                "() => Bokeh.index.query_one("
                "v => v.model.name === 'lazysky-tile-patches') !== null")
            page.get_by_text(f"lazysky run {newest['run_id']}").wait_for(timeout=10_000)
            page.get_by_text("blosc decompression").first.wait_for(timeout=10_000)
            page.wait_for_timeout(1500)  # one periodic update more, still without errors
            page.screenshot(path=str(artifacts / "lazysky-page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors
    assert n_glyphs == len(newest["tiles"])
    assert sorted(shown) == sorted(t["tile"] for t in newest["tiles"])
    assert drawn
    assert (artifacts / "lazysky-page.png").stat().st_size > 10_000

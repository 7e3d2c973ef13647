"""`lazysky run` end to end on a tiny survey: rows vs truth, reruns, resume, faults.

One clean run is the reference; every other run (a second run of the same
configuration, a run killed half-way and resumed, a run that loses a worker, a run with
a corrupt exposure among its inputs) must end with exactly its rows.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import yaml
from astropy.table import Table

from lazysky.catalog import Catalog, coadd_sources, diff_sources, runs
from lazysky.catalog.schema import INTERNAL_COLUMNS
from lazysky.config import load_settings
from lazysky.runconfig import RunConfig
from lazysky.runner import RunSummary, run
from lazysky.runs import new_run_id
from lazysky.simulator import SurveySpec

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SPEC = SurveySpec(
    instrument="tiny", n_epochs=3, n_dithers=1, n_transients=12, detectors=["CCD01", "CCD02"],
    transient_peak_mag_range=(18.5, 21.0), seed=3, n_bias=3, n_dark=2, n_flat=3,
)


@pytest.fixture(scope="module")
def survey(tiny_survey: Path) -> Path:
    """The session's simulation of SPEC (tests/conftest.py ``tiny_survey``)."""
    return tiny_survey


def _config(survey: Path, store: Path, **extra: Any) -> RunConfig:
    return RunConfig.model_validate({
        "type": "test",
        "store": str(store),
        "ingest": [str(survey / "raw"), str(survey / "calib")],
        "field": {"name": "deep1", "tile_px": 128},
        "reference": ["deep1-r-e00[01]-*"],
        "science": ["deep1-r-e002-*"],
        **extra,
    })


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def clean(tiny_clean_run: RunSummary) -> RunSummary:
    """The reference run: the session's clean run of ``survey`` with ``_config`` (the same
    run the batch, autoscaling and interactive tests compare against)."""
    return tiny_clean_run


def _rows(catalog: Catalog, run_id: str) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with catalog.engine().connect() as conn:
        for table in (coadd_sources, diff_sources):
            cols = [c for c in table.c if c.name not in ("run_id", *INTERNAL_COLUMNS)]
            got = conn.execute(sa.select(*cols).where(table.c.run_id == run_id)
                               .order_by(table.c.tile_id, table.c.number)).all()
            out[table.name] = [tuple(r) for r in got]
    return out


def _table(rows: list[tuple[Any, ...]], table: sa.Table) -> Table:
    names = [c.name for c in table.c if c.name not in ("run_id", *INTERNAL_COLUMNS)]
    return Table(rows=rows, names=names) if rows else Table(names=names)


def test_clean_run_is_recorded(clean: RunSummary, catalog: Catalog, survey: Path) -> None:
    assert clean.status == "done", clean.errors
    assert clean.reference == ("deep1-r-e000-d00", "deep1-r-e001-d00")
    assert dict(clean.epochs) == {"v2": ("deep1-r-e002-d00",)}
    assert set(clean.timings) >= {"ingest", "masters", "reference", "difference", "detect"}
    with catalog.engine().connect() as conn:
        row = conn.execute(sa.select(runs).where(runs.c.run_id == clean.run_id)).one()
    assert row.status == "done"
    assert row.config["reference"] == ["deep1-r-e00[01]-*"]
    assert set(row.timings) == set(clean.timings)
    # the inputs' checksums are those of the files the simulator wrote
    import hashlib

    raw = survey / "raw" / "deep1-r-e002-d00.fits"
    assert row.inputs["deep1-r-e002-d00"] == hashlib.sha256(raw.read_bytes()).hexdigest()
    assert len(row.inputs) == 3 + 3 + 2 + 3  # bias, dark, flat, science
    # products carry the run
    from lazysky import __version__
    from lazysky.zarr_store.products import open_product, product_grid

    ref = open_product(clean.store, clean.run_id, "coadd", "deep1")
    diff = open_product(clean.store, clean.run_id, "diff", "deep1-v2")
    for product in (ref, diff):
        assert product.attrs["run_id"] == clean.run_id
        assert product.attrs["software_version"] == __version__
        assert product.attrs["input_sha256"] == row.inputs
        assert product.attrs["run_config"] == row.config
        assert product.attrs["run_status"] == "done"
        assert product.attrs["run_timings"] == row.timings
    assert clean.run_id in str(clean)
    # the PSFs are stored with the products, per tile: the coadds' (estimated from their
    # stars) and the difference's P_D; the difference used the coadds' stored ones
    sci = open_product(clean.store, clean.run_id, "coadd", "deep1-v2")
    n_tiles = product_grid(ref).n_tiles
    for product in (ref, sci, diff):
        psf = product["psf"].values
        assert psf.shape[:2] == n_tiles
        np.testing.assert_allclose(psf.sum(axis=(2, 3)), 1.0, atol=0.01)
        c = psf.shape[-1] // 2
        assert np.all(psf[..., c, c] == psf.max(axis=(2, 3)))
    for product in (ref, sci):
        fwhm = product["psf_fwhm"].values
        assert np.all((fwhm > 1.5) & (fwhm < 8.0)), fwhm
    ratio = diff["flux_ratio"].values
    assert ratio.shape == n_tiles
    assert np.all(ratio == ratio[0, 0])
    assert 0.5 < ratio[0, 0] < 2


def test_rows_match_the_truth(clean: RunSummary, catalog: Catalog, survey: Path) -> None:
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    from lazysky.demo import _truth_per_epoch, score_transients

    rows = _rows(catalog, clean.run_id)
    co = _table(rows["coadd_sources"], coadd_sources)
    assert clean.sources == len(co) > 20
    # coadd: bright point sources of the reference epochs are found where the truth is
    truth = Table.read(survey / "raw" / "deep1-r-e000-d00.truth.ecsv")
    bright = truth[(truth["kind"] == "star") & (truth["flux_e"] > 2e4) & ~truth["saturated"]]
    _, sep, _ = SkyCoord(bright["ra"], bright["dec"], unit="deg").match_to_catalog_sky(
        SkyCoord(co["ra"], co["dec"], unit="deg"))
    assert np.mean(sep < 0.5 * u.arcsec) >= 0.95
    assert np.median(sep.to_value(u.arcsec)) < 0.1
    # differences: the bright transients of the science epoch, and few false positives
    dia = _table(rows["diff_sources"], diff_sources)
    assert clean.dia_sources == len(dia)
    assert set(dia["exposure_id"]) <= {"deep1-r-e002-d00"}
    t = _truth_per_epoch(survey, {"v2": ("deep1-r-e002-d00",)})
    score = score_transients(dia, t, {"v2": "deep1-r-e002-d00"}, {"v2": 1.0})
    shining = t["v2"][(t["v2"]["kind"] == "transient") & (t["v2"]["flux_e"] > 3e3)]
    assert len(shining) >= 3, "the survey must have bright transients to find"
    _, sep, _ = SkyCoord(shining["ra"], shining["dec"], unit="deg").match_to_catalog_sky(
        SkyCoord(dia["ra"], dia["dec"], unit="deg"))
    assert np.all(sep < 1.0 * u.arcsec), "every bright transient is recovered"
    assert score["false_positives"] <= 2


def test_the_same_run_twice_gives_identical_rows(
        clean: RunSummary, survey: Path, tmp_path: Path, client: Any, catalog: Catalog) -> None:
    """Run again, this time as production: same rows, and the finished production run
    publishes itself (the production views show it on every tile; a test run never)."""
    from lazysky.catalog.production import production_tiles, run_record

    again = run(_config(survey, tmp_path / "store", type="prod"), settings=load_settings(
        catalog_dsn=catalog.dsn), client=client, catalog=catalog)
    assert again.run_id != clean.run_id
    assert again.run_id.startswith("prod-")
    assert _rows(catalog, again.run_id) == _rows(catalog, clean.run_id)
    planned = run_record(again.run_id, catalog=catalog).planned_tiles
    assert planned is not None
    assert len(planned) == again.tiles
    assert production_tiles("deep1", catalog=catalog) == dict.fromkeys(planned, again.run_id)
    assert run_record(clean.run_id, catalog=catalog).production_tiles == ()
    with catalog.engine().connect() as conn:
        shown = conn.execute(sa.text(
            "SELECT count(*) FROM coadd_sources_prod WHERE run_id = :r"),
            {"r": again.run_id}).scalar()
    assert shown == len(_rows(catalog, again.run_id)["coadd_sources"]) > 0


def test_a_killed_run_resumes_to_the_clean_rows(
        clean: RunSummary, survey: Path, tmp_path: Path, client: Any, catalog: Catalog) -> None:
    run_id = new_run_id("test")
    store = tmp_path / "store"
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(survey, store).model_dump(mode="json")))
    env = {**os.environ, "LAZYSKY_CATALOG_DSN": catalog.dsn,
           "LAZYSKY_CLUSTER__MAX_WORKERS": "2", "LAZYSKY_CLUSTER__DASHBOARD_ADDRESS": ":0"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "lazysky"), "run", str(cfg_path), "--run-id",
         run_id, "--no-progress"], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = store / "products" / run_id / "coadd" / "deep1" / ".done"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if done.is_dir() and len(list(done.iterdir())) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-write
        proc.wait()
    partial = len(list(done.iterdir()))
    assert 0 < partial < 15
    resumed = run(_config(survey, store, run_id=run_id), settings=load_settings(
        catalog_dsn=catalog.dsn), client=client, catalog=catalog)
    assert resumed.status == "done"
    assert _rows(catalog, run_id) == _rows(catalog, clean.run_id)


def test_a_lost_worker_neither_loses_nor_duplicates_rows(
        clean: RunSummary, survey: Path, tmp_path: Path, client: Any, catalog: Catalog) -> None:
    store = tmp_path / "store"
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["summary"] = run(_config(survey, store), settings=load_settings(
                catalog_dsn=catalog.dsn), client=client, catalog=catalog)
        except BaseException as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=go)
    thread.start()
    killed = False
    status = None
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        products = store / "products"
        busy = products.is_dir() and any(products.glob("*/coadd/deep1/.done/*"))
        if busy and status is None:
            # the dashboard answers while the run goes on
            with urllib.request.urlopen(client.dashboard_link, timeout=30) as reply:
                status = reply.status
        if busy and not killed:
            pids = client.run(os.getpid)
            os.kill(next(iter(pids.values())), signal.SIGKILL)
            killed = True
        time.sleep(0.1)
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    assert killed, "the run ended before a worker could be killed"
    assert status == 200
    assert _rows(catalog, result["summary"].run_id) == _rows(catalog, clean.run_id)


@pytest.fixture(scope="module")
def faulty(survey: Path, tmp_path_factory: pytest.TempPathFactory, client: Any,
           catalog: Catalog) -> tuple[RunSummary, Path]:
    """One run whose inputs hold both bad kinds of exposure the runner must skip: a raw
    file truncated mid-data (``deep1-r-e009-d00.fits``) and a second frame of epoch 2
    (``deep1-r-e002-d09``) whose CCD02 lost its WCS. Each test checks its own."""
    from astropy.io import fits

    tmp = tmp_path_factory.mktemp("e2e-faulty")
    raw = tmp / "raw"
    shutil.copytree(survey / "raw", raw)
    good = (raw / "deep1-r-e002-d00.fits").read_bytes()
    bad = raw / "deep1-r-e009-d00.fits"
    bad.write_bytes(good[: len(good) // 2])  # truncated mid-data
    with fits.open(raw / "deep1-r-e002-d00.fits") as hdul:
        hdul[0].header["EXPID"] = "deep1-r-e002-d09"  # a second frame of epoch 2 ...
        for key in ("CTYPE1", "CTYPE2"):  # ... whose CCD02 lost its WCS
            del hdul["CCD02"].header[key]
        hdul.writeto(raw / "deep1-r-e002-d09.fits", output_verify="silentfix", checksum=True)
    cfg = _config(survey, tmp / "store").model_copy(
        update={"ingest": [str(raw), str(survey / "calib")]})
    summary = run(cfg, settings=load_settings(catalog_dsn=catalog.dsn), client=client,
                  catalog=catalog)
    return summary, bad


def test_a_corrupt_exposure_is_skipped_and_recorded(
        clean: RunSummary, faulty: tuple[RunSummary, Path], catalog: Catalog) -> None:
    summary, bad = faulty
    assert summary.status == "done_with_errors"
    assert str(bad) in summary.errors
    assert "deep1-r-e009-d00.fits" in str(summary)
    with catalog.engine().connect() as conn:
        row = conn.execute(sa.select(runs.c.status, runs.c.errors).where(
            runs.c.run_id == summary.run_id)).one()
    assert row.status == "done_with_errors"
    assert str(bad) in row.errors
    # nothing else was skipped: the two bad inputs of the run, and only they
    assert sorted(row.errors) == sorted(summary.errors) == sorted(
        [str(bad), "deep1-r-e002-d09"])
    assert _rows(catalog, summary.run_id) == _rows(catalog, clean.run_id)


def test_an_exposure_without_wcs_is_skipped_and_recorded(
        clean: RunSummary, faulty: tuple[RunSummary, Path], catalog: Catalog) -> None:
    summary, _ = faulty
    assert summary.status == "done_with_errors"
    assert "deep1-r-e002-d09" in summary.errors
    assert "detector CCD02 has no celestial WCS" in summary.errors["deep1-r-e002-d09"]
    assert dict(summary.epochs) == {"v2": ("deep1-r-e002-d00",)}
    assert _rows(catalog, summary.run_id) == _rows(catalog, clean.run_id)

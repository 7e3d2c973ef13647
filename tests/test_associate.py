"""Association across epochs against the simulator's truth, on one small run.

One module-scoped run of a small survey (one detector, a one-epoch reference and three
science epochs half a day apart, many bright transients, variables and movers) goes
through ``lazysky.runner.run``, whose ``associate`` stage writes the objects; every test
reads that run. Truth: ``raw/<exposure>.truth.ecsv`` (every source's position and flux
in each exposure) and ``truth/scene.ecsv``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from lazysky.associate import (
    association_plan,
    forced_psf_photometry,
    group_detections,
    lightcurve,
    position_sigma_arcsec,
    run_objects,
)
from lazysky.catalog import Catalog
from lazysky.config import load_settings
from lazysky.errors import ParameterError
from lazysky.runconfig import RunConfig
from lazysky.runner import RunSummary, run
from lazysky.simulator import SurveySpec, simulate_survey

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

MATCH_ARCSEC = 1.5
SPEC = SurveySpec(
    instrument="tiny", n_epochs=4, n_dithers=1, n_reference_epochs=1, n_transients=60,
    n_variables=80, n_movers=12, cadence_days=0.5, detectors=["CCD01"],
    transient_peak_mag_range=(18.0, 20.0), seed=7, n_bias=3, n_dark=0, n_flat=3,
)


def _config(survey: Path, store: Path, **extra: Any) -> RunConfig:
    return RunConfig.model_validate({
        "type": "test", "store": str(store),
        "ingest": [str(survey / "raw"), str(survey / "calib")],
        "field": {"name": "deep1", "tile_px": 256},
        "reference": ["deep1-r-e000-*"], "science": ["deep1-r-e00[123]-*"], **extra,
    })


@pytest.fixture(scope="module")
def client(tiny_client: Any) -> Any:
    """The session's two-worker cluster (tests/conftest.py), through this module's client."""
    return tiny_client


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("assoc-survey")
    simulate_survey(SPEC, root)
    return root


@pytest.fixture(scope="module")
def done(survey: Path, tmp_path_factory: pytest.TempPathFactory, client: Any,
         catalog: Catalog) -> RunSummary:
    store = tmp_path_factory.mktemp("assoc-store")
    summary = run(_config(survey, store), settings=load_settings(catalog_dsn=catalog.dsn),
                  client=client, catalog=catalog)
    assert summary.status == "done", summary.errors
    return summary


def _detections(catalog: Catalog, run_id: str) -> Table:
    with catalog.engine().connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT s.tile_id, s.number, s.ra, s.dec, s.snr, s.flux_psf, s.fluxerr_psf, "
            "s.exposure_id, e.mjd, l.object_id FROM diff_sources s "
            "JOIN exposures e USING (exposure_id) "
            "LEFT JOIN object_detections l USING (run_id, tile_id, number) "
            "WHERE s.run_id = :r"), {"r": run_id}).all()
    names = ["tile_id", "number", "ra", "dec", "snr", "flux_psf", "fluxerr_psf",
             "exposure_id", "mjd", "object_id"]
    cols = list(zip(*rows, strict=True))
    floats = {"ra", "dec", "snr", "flux_psf", "fluxerr_psf", "mjd"}
    return Table([np.array([np.nan if v is None else v for v in c], dtype=float)
                  if n in floats else np.array(c) for n, c in zip(names, cols, strict=True)],
                 names=names)


def _objects(catalog: Catalog, run_id: str) -> Table:
    with catalog.engine().connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT object_id, number, ra, dec, first_mjd, last_mjd, n_detections, n_epochs "
            "FROM objects WHERE run_id = :r ORDER BY number"), {"r": run_id}).all()
    return Table(rows=rows, names=["object_id", "number", "ra", "dec", "first_mjd",
                                   "last_mjd", "n_detections", "n_epochs"])


@functools.lru_cache(maxsize=16)
def _truth(survey: Path, exposure_id: str) -> Table:
    t = Table.read(survey / "raw" / f"{exposure_id}.truth.ecsv", format="ascii.ecsv")
    return t[np.isin(np.asarray(t["kind"]).astype(str), ("transient", "variable", "mover"))]


def _matched(det: Table, survey: Path) -> dict[int, list[int]]:
    """Truth id → the rows of ``det`` that match it (nearest truth within 1.5")."""
    out: dict[int, list[int]] = {}
    for eid in sorted(set(det["exposure_id"])):
        rows = np.flatnonzero(np.asarray(det["exposure_id"]) == eid)
        truth = _truth(survey, eid)
        idx, sep, _ = SkyCoord(det["ra"][rows], det["dec"][rows], unit="deg"
                               ).match_to_catalog_sky(SkyCoord(truth["ra"], truth["dec"],
                                                               unit="deg"))
        for r, i, s in zip(rows, idx, sep, strict=True):
            if s < MATCH_ARCSEC * u.arcsec:
                out.setdefault(int(truth["id"][i]), []).append(int(r))
    return out


def _confused(survey: Path) -> set[int]:
    """Truth ids with another transient/variable within 3" (their detections may blend)."""
    scene = Table.read(survey / "truth" / "scene.ecsv", format="ascii.ecsv")
    real = scene[np.isin(np.asarray(scene["kind"]).astype(str), ("transient", "variable"))]
    c = SkyCoord(real["ra"], real["dec"], unit="deg")
    i, j, _, _ = c.search_around_sky(c, 3 * u.arcsec)
    return {int(real["id"][k]) for k in i[i != j]}


def test_transients_and_variables_become_one_object_each(done: RunSummary, catalog: Catalog,
                                                         survey: Path) -> None:
    det = _detections(catalog, done.run_id)
    objs = _objects(catalog, done.run_id)
    assert len(det)
    assert np.all(det["object_id"] > 0), "every detection belongs to an object"
    scene = Table.read(survey / "truth" / "scene.ecsv", format="ascii.ecsv")
    kind = dict(zip(scene["id"].tolist(), np.asarray(scene["kind"]).astype(str), strict=True))
    matched = _matched(det, survey)
    confused = _confused(survey)
    checked = {"transient": 0, "variable": 0}
    multi_epoch = 0
    by_id = {int(o["object_id"]): o for o in objs}
    for tid, rows in matched.items():
        if kind[tid] not in checked or tid in confused:
            continue
        ids = set(det["object_id"][rows].tolist())
        assert len(ids) == 1, f"{kind[tid]} {tid} split into objects {ids}"
        oid = ids.pop()
        # the object holds exactly this source's detections, nothing else
        assert sorted(np.flatnonzero(det["object_id"] == oid).tolist()) == sorted(rows)
        o = by_id[oid]
        epochs = sorted(set(det["mjd"][rows].tolist()))
        assert o["n_detections"] == len(rows)
        assert o["n_epochs"] == len(epochs)
        assert o["first_mjd"] == epochs[0]
        assert o["last_mjd"] == epochs[-1]
        # the epochs are ones where the truth says the source shone
        for eid in set(det["exposure_id"][rows].tolist()):
            truth = _truth(survey, eid)
            flux = float(truth["flux_e"][truth["id"] == tid][0])
            assert flux > 0, (tid, eid)
        sep = SkyCoord(o["ra"], o["dec"], unit="deg").separation(SkyCoord(
            scene["ra"][scene["id"] == tid][0], scene["dec"][scene["id"] == tid][0],
            unit="deg"))
        assert sep < MATCH_ARCSEC * u.arcsec
        checked[kind[tid]] += 1
        multi_epoch += len(epochs) > 1
    assert checked["transient"] >= 10, checked
    assert checked["variable"] >= 1, checked
    assert multi_epoch >= 8


def test_a_mover_is_not_one_static_object(done: RunSummary, catalog: Catalog,
                                          survey: Path) -> None:
    det = _detections(catalog, done.run_id)
    scene = Table.read(survey / "truth" / "scene.ecsv", format="ascii.ecsv")
    movers = set(scene["id"][np.asarray(scene["kind"]).astype(str) == "mover"].tolist())
    matched = {t: rows for t, rows in _matched(det, survey).items() if t in movers}
    seen = [rows for rows in matched.values() if len(set(det["mjd"][rows].tolist())) >= 2]
    assert seen, f"no mover detected in two epochs (matched: {matched})"
    for rows in seen:
        # detections of a mover on different epochs never share an object
        for a in rows:
            for b in rows:
                if det["mjd"][a] != det["mjd"][b]:
                    assert det["object_id"][a] != det["object_id"][b]


def test_forced_photometry_is_on_every_epoch(done: RunSummary, catalog: Catalog) -> None:
    det = _detections(catalog, done.run_id)
    objs = run_objects(done.run_id, catalog=catalog)
    assert sorted(objs["object_id"]) == sorted(set(det["object_id"]))
    n_epochs = len(done.epochs)
    checked = 0
    for o in objs:
        lc = lightcurve(int(o["object_id"]), catalog=catalog)
        assert len(lc) == n_epochs
        assert list(lc["mjd"]) == sorted(lc["mjd"])
        assert lc.meta["run_id"] == done.run_id
        rows = det[det["object_id"] == o["object_id"]]
        assert set(lc["exposure_id"][lc["detected"]]) == set(rows["exposure_id"])
        for r in rows:
            f = lc[lc["exposure_id"] == r["exposure_id"]][0]
            if abs(r["snr"]) < 10 or f["flags"]:
                continue
            # a detection at S/N >= 10 is measured, with its sign, by forced photometry
            assert np.sign(f["flux"]) == np.sign(r["snr"]), dict(zip(f.colnames, f,
                                                                     strict=True))
            assert abs(f["flux"] / f["fluxerr"]) > 5
            checked += 1
    assert checked >= 20


def test_forced_psf_photometry_recovers_an_injected_flux_lazily() -> None:
    import dask
    import dask.array as da
    import xarray as xr

    from lazysky.pipeline.grid import SkyGrid
    from lazysky.pipeline.psf import _moffat, moffat_stamp

    grid = SkyGrid(150.0, 2.0, 0.5, (60, 80), tile_px=40)
    stamp = moffat_stamp(3.0, 3.0, 15)
    rng = np.random.default_rng(4)
    sigma = 20.0
    ra, dec = grid.wcs.pixel_to_world_values([52.3, 10.0], [17.6, 40.2])
    flux_true = 5000.0
    image = rng.normal(0.0, sigma, grid.shape)
    # an analytic Moffat (unit total flux) centred at pixel (x, y) = (52.3, 17.6)
    model = np.zeros(grid.shape)
    model[2:33, 37:68] = _moffat(31, 3.0, 3.0, dx=0.3, dy=0.6)
    image += flux_true * model
    within = flux_true * model[17 - 7: 17 + 8, 52 - 7: 52 + 8].sum()  # the 15 px stamp's
    mask = np.zeros(grid.shape, np.uint16)
    mask[40, 10] = 1  # the second position's centre is masked
    psf = np.broadcast_to(stamp, (*grid.n_tiles, *stamp.shape))
    chunks = (40, 40)
    ds = xr.Dataset({
        "image": (("y", "x"), da.from_array(image, chunks=chunks)),
        "variance": (("y", "x"), da.full(grid.shape, sigma**2, chunks=chunks)),
        "mask": (("y", "x"), da.from_array(mask, chunks=chunks)),
        "psf": (("tile_y", "tile_x", "v", "u"), da.from_array(psf, chunks=(1, 1, 15, 15))),
    }, attrs={"grid": grid.to_dict()})
    def refuse(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        msg = f"a dask graph was computed inside a lazy API (keys {str(keys)[:200]})"
        raise RuntimeError(msg)

    with dask.config.set(scheduler=refuse):
        tasks = forced_psf_photometry({"v7": ds}, ra, dec, bad_bits=1)
    assert sorted(tasks) == [("v7", "t000_001"), ("v7", "t001_000")]
    assert all(str(t.key).startswith(f"forced-v7-{tile}-") for (_, tile), t in tasks.items())
    (done,) = dask.compute(tasks)
    star = done[("v7", "t000_001")]
    expected_err = sigma / np.sqrt(((stamp / stamp.sum()) ** 2).sum())
    assert star["fluxerr"][0] == pytest.approx(expected_err, rel=0.05)
    assert abs(star["flux"][0] - within) < 4 * star["fluxerr"][0]
    masked = done[("v7", "t001_000")]
    assert np.isnan(masked["flux"][0])
    assert masked["flags"][0] & 2048


def test_forced_photometry_before_a_transient_is_consistent_with_zero(
        done: RunSummary, catalog: Catalog, survey: Path) -> None:
    det = _detections(catalog, done.run_id)
    scene = Table.read(survey / "truth" / "scene.ecsv", format="ascii.ecsv")
    kind = dict(zip(scene["id"].tolist(), np.asarray(scene["kind"]).astype(str), strict=True))
    pulls = []
    confused = _confused(survey)
    for tid, rows in _matched(det, survey).items():
        if kind[tid] != "transient" or tid in confused:
            continue
        lc = lightcurve(int(det["object_id"][rows[0]]), catalog=catalog)
        t0 = float(scene["t0"][scene["id"] == tid][0])  # the truth: no light before t0
        for row in lc:
            if row["mjd"] < t0 and np.isfinite(row["flux"]):
                pulls.append(row["flux"] / row["fluxerr"])
    assert len(pulls) >= 3, pulls
    assert np.all(np.abs(pulls) < 5), pulls


def test_association_is_idempotent_when_the_run_is_repeated(
        done: RunSummary, survey: Path, catalog: Catalog, client: Any) -> None:
    def snapshot() -> tuple[list[Any], int, int]:
        with catalog.engine().connect() as conn:
            objs = conn.execute(sa.text(
                "SELECT number, ra, dec, first_mjd, last_mjd, n_detections, n_epochs "
                "FROM objects WHERE run_id = :r ORDER BY number"), {"r": done.run_id}).all()
            links = conn.execute(sa.text(
                "SELECT count(*) FROM object_detections WHERE run_id = :r"),
                {"r": done.run_id}).scalar()
            phot = conn.execute(sa.text(
                "SELECT count(*) FROM forced_photometry f JOIN objects o USING (object_id) "
                "WHERE o.run_id = :r"), {"r": done.run_id}).scalar()
        return [tuple(r) for r in objs], int(links or 0), int(phot or 0)

    before = snapshot()
    assert before[0]
    assert before[2] == len(before[0]) * len(done.epochs)
    again = run(_config(survey, Path(done.store), run_id=done.run_id),
                settings=load_settings(catalog_dsn=catalog.dsn), client=client,
                catalog=catalog)
    assert again.status == "done"
    assert "associate" in again.timings
    after = snapshot()
    assert after[1:] == before[1:]
    np.testing.assert_allclose(np.array(after[0], float), np.array(before[0], float),
                               rtol=0, atol=1e-9)


def test_the_pair_search_probes_the_gist_index(done: RunSummary, catalog: Catalog) -> None:
    """A GiST probe of the run's own partition per detection, on a run of 3 000 sources
    with fresh statistics (on the tiny module run, once autovacuum has analysed it, a
    walk of its 53 rows by primary key is as good and PostgreSQL may rightly take it)."""
    import re

    from lazysky.catalog import register_run, write_sources
    from lazysky.runs import Run, new_run_id

    rng = np.random.default_rng(2)
    big = new_run_id("test")
    register_run(Run(big, config={}), catalog=catalog)
    n = 3000
    write_sources("diff", big, "t000_000", {
        "x": rng.uniform(0, 100, n), "y": rng.uniform(0, 100, n),
        "ra": rng.uniform(150.0, 150.2, n), "dec": rng.uniform(2.0, 2.2, n),
        "sign": np.ones(n, np.int16), "snr": np.full(n, 10.0)}, catalog=catalog)
    with catalog.engine().begin() as conn:
        conn.exec_driver_sql("ANALYZE diff_sources")
    for run_id in (big, done.run_id):
        plan = association_plan(run_id, catalog=catalog)
        assert "Seq Scan on diff_sources" not in plan
        # the run's own partition alone (its type and month)
        month = run_id.split("-")[1]
        assert set(re.findall(r"diff_sources__\w+?__\d{4}_\d{2}", plan)) == {
            f"diff_sources__test__{month[:4]}_{month[4:6]}"}, plan
    plan = association_plan(big, catalog=catalog)
    assert re.search(r"Nested Loop[\s\S]*Index Scan using diff_sources__test__\d{4}_\d{2}"
                     r"_pos_idx on \S+ b\b", plan), plan


def test_lightcurve_cli(done: RunSummary, catalog: Catalog, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    from lazysky.cli import main

    monkeypatch.setenv("LAZYSKY_CATALOG_DSN", catalog.dsn)
    oid = int(_objects(catalog, done.run_id)["object_id"][0])
    assert main(["lightcurve", str(oid), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["object"]["object_id"] == oid
    assert len(doc["lightcurve"]) == len(done.epochs)
    assert main(["lightcurve", str(oid), "--format", "csv"]) == 0
    csv = Table.read(capsys.readouterr().out, format="ascii.csv")
    assert list(csv["mjd"]) == [r["mjd"] for r in doc["lightcurve"]]
    assert main(["lightcurve", "999999999"]) == 1
    assert "no object 999999999" in capsys.readouterr().err


def test_bad_input_is_refused(done: RunSummary, catalog: Catalog, tmp_path: Path) -> None:
    import lazysky
    from lazysky.catalog import register_run
    from lazysky.runs import Run, new_run_id

    with pytest.raises(ParameterError, match="no object 999999999"):
        lightcurve(999999999, catalog=catalog)
    with pytest.raises(ParameterError, match="object_id must be an integer"):
        lightcurve("12", catalog=catalog)  # type: ignore[arg-type]
    unknown = new_run_id("test")
    with pytest.raises(ParameterError, match=f"no run {unknown!r}"):
        lazysky.associate(unknown, catalog=catalog)
    bare = new_run_id("test")  # registered, but nothing differenced
    register_run(Run(bare, config={"store": str(tmp_path)}), catalog=catalog)
    with pytest.raises(ParameterError, match="has no difference images"):
        lazysky.associate(bare, catalog=catalog)
    with pytest.raises(ParameterError, match="k_sigma must be a positive number"):
        lazysky.associate(done.run_id, catalog=catalog, k_sigma=0)
    with pytest.raises(ParameterError, match="max_radius_arcsec"):
        association_plan(done.run_id, catalog=catalog, max_radius_arcsec=float("nan"))


def test_kernels() -> None:
    sig = position_sigma_arcsec([4.7, 1000.0, -9.4], fwhm_arcsec=1.41, floor_arcsec=0.05)
    np.testing.assert_allclose(sig, [1.41 / (2.35 * 4.7), 0.05, 1.41 / (2.35 * 9.4)])
    # a chain of close pairs is one object; a pair beyond k·σ is not linked
    labels = group_detections(5, [0, 1, 3], [1, 2, 4], [0.1, 0.1, 0.9], np.full(5, 0.2),
                              k_sigma=3.0)
    assert labels.tolist() == [0, 0, 0, 1, 2]
    # the cap wins over a large σ
    labels = group_detections(2, [0], [1], [1.5], np.full(2, 5.0), max_radius_arcsec=1.0)
    assert labels.tolist() == [0, 1]


def test_docstring_examples_run() -> None:
    import doctest

    import lazysky.associate

    result = doctest.testmod(lazysky.associate, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0

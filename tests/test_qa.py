"""Science QA per tile (lazysky.pipeline.qa) against the simulator's truth, its catalog
rows and flags, its settings, and the QA figures (lazysky.figures).

One module-scoped run of a small survey made for QA (one detector, enough bright stars
for a PSF in every full tile) is shared by the run-level tests; the kernels are tested on
small arrays with known answers.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
import sqlalchemy as sa
from astropy.io import fits
from astropy.wcs import WCS

from lazysky.catalog import Catalog
from lazysky.catalog.qa import QA_COLUMNS, qa_by_tile, read_qa, write_qa
from lazysky.config import QaThresholds, load_settings
from lazysky.errors import ConfigError, ParameterError
from lazysky.pipeline.qa import (
    METRICS,
    QaPlan,
    background_stats,
    flag_tile,
    limiting_magnitude,
    match_stars,
    merge_plans,
    plan_qa,
    qa_tasks,
    run_qa,
    score_std,
    source_mask,
    zeropoint_from_headers,
)
from lazysky.runconfig import RunConfig
from lazysky.runner import RunSummary, run
from lazysky.simulator import SurveySpec, simulate_survey
from lazysky.zarr_store.products import open_product, product_grid

# a small field dense enough in bright stars for a PSF fit in every full 128 px tile
SPEC = SurveySpec(
    instrument="tiny", n_epochs=3, n_dithers=1, n_transients=8, detectors=["CCD01"],
    transient_peak_mag_range=(18.5, 20.5), seed=7, n_bias=3, n_dark=2, n_flat=3,
    star_density_per_deg2=8.0e4, star_mag_range=(16.0, 21.5),
    galaxy_density_per_deg2=1.0e4, n_variables=0, n_movers=0,
)
REFERENCE = ("deep1-r-e000-d00", "deep1-r-e001-d00")
EPOCH = ("deep1-r-e002-d00",)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory: pytest.TempPathFactory, tiny_client: Any,
           catalog: Catalog) -> tuple[RunSummary, Path]:
    survey = tmp_path_factory.mktemp("qa-survey")
    simulate_survey(SPEC, survey)
    cfg = RunConfig.model_validate({
        "type": "test", "store": str(tmp_path_factory.mktemp("qa-store")),
        "ingest": [str(survey / "raw"), str(survey / "calib")],
        "field": {"name": "deep1", "tile_px": 128},
        "reference": ["deep1-r-e00[01]-*"], "science": ["deep1-r-e002-*"],
    })
    summary = run(cfg, settings=load_settings(catalog_dsn=catalog.dsn), client=tiny_client,
                  catalog=catalog)
    assert summary.status == "done", summary.errors
    return summary, survey


def _full_tiles(grid: Any) -> list[str]:
    return [t for t in grid.tile_ids() if grid.tile_shape(t) == (grid.tile_px, grid.tile_px)]


def _truth_fwhm_px(grid: Any, tile: str, exposures: tuple[str, ...], survey: Path) -> float:
    """FWHM the truth implies at a tile's centre: each input's Moffat (SEEING, β 3 of the
    tiny instrument) through the pipeline's bilinear resampling at that input's sub-pixel
    phase (a 2 × 2 kernel centred on the true position), the inputs mixed equally (their
    frame weights differ by the sky's ~10 %); measured as the diameter of the disk of
    equal area to the half-maximum region, on a 1/20 pixel grid."""
    over = 20
    o = np.arange(-12 * over, 12 * over + 1) / over
    sy, sx = grid.tile_slices(tile)
    yc, xc = (sy.start + sy.stop) // 2, (sx.start + sx.stop) // 2
    ra, dec = grid.wcs.pixel_to_world_values(xc, yc)
    mix = np.zeros((o.size, o.size))
    for eid in exposures:
        with fits.open(survey / "raw" / f"{eid}.fits") as hdul:
            fwhm = float(hdul[0].header["SEEING"]) / grid.pixel_scale_arcsec
            x, y = WCS(hdul[1].header).world_to_pixel_values(ra, dec)
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
        fx, fy = float(x) % 1.0, float(y) % 1.0
        for dy, wy in ((-fy, 1.0 - fy), (1.0 - fy, fy)):
            for dx, wx in ((-fx, 1.0 - fx), (1.0 - fx, fx)):
                r2 = ((o[:, None] - dy) ** 2 + (o[None, :] - dx) ** 2) / alpha**2
                mix += wy * wx * (1.0 + r2) ** -3.0 / len(exposures)
    return 2.0 * math.sqrt(np.count_nonzero(mix >= mix.max() / 2) / over**2 / math.pi)


# --- run level: rows, truth, flags ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.postgres
def test_qa_rows_for_every_tile_and_product(qa_run: tuple[RunSummary, Path],
                                            catalog: Catalog) -> None:
    from lazysky.catalog import done_tiles

    summary, _ = qa_run
    assert "qa" in summary.timings
    qa = read_qa(summary.run_id, catalog=catalog)
    ref = open_product(summary.store, summary.run_id, "coadd", "deep1")
    tiles = product_grid(ref).tile_ids()
    assert sorted(zip(qa["product"], qa["tile_id"], strict=True)) == sorted(
        (p, t) for p in ("deep1", "deep1-v2") for t in tiles)
    assert set(qa["kind"][qa["product"] == "deep1"]) == {"coadd"}
    assert set(qa["kind"][qa["product"] == "deep1-v2"]) == {"diff"}
    assert set(qa.colnames) == set(QA_COLUMNS)
    # detections: the catalog's rows per tile (coadd sources; the epoch's differences)
    done = done_tiles(summary.run_id, "detect-coadd", catalog=catalog)
    got = {str(t): int(n) for t, n, p in zip(qa["tile_id"], qa["n_detections"], qa["product"],
                                             strict=True) if p == "deep1"}
    assert got == {t: done.get(t, 0) for t in tiles}
    assert sum(qa["n_detections"][qa["product"] == "deep1-v2"]) == summary.dia_sources
    # no header zeropoint in the simulator's files: instrumental magnitudes of e- per frame
    assert np.all(~np.isfinite(qa["zeropoint_mag"]))
    full = np.isin(qa["tile_id"], _full_tiles(product_grid(ref)))
    assert np.all((qa["limiting_mag"][full] < -5) & (qa["limiting_mag"][full] > -12))
    # the products carry the QA too
    for kind, name in (("coadd", "deep1"), ("diff", "deep1-v2")):
        attrs = open_product(summary.store, summary.run_id, kind, name).attrs
        assert attrs["qa"] == qa_by_tile(summary.run_id, catalog=catalog)
        assert attrs["qa_flagged"] == sorted(
            f"{p}/{t}" for p, t, f in zip(qa["product"], qa["tile_id"], qa["flagged"],
                                          strict=True) if f)


@pytest.mark.slow
@pytest.mark.postgres
def test_psf_fwhm_matches_the_simulated_seeing(qa_run: tuple[RunSummary, Path],
                                               catalog: Catalog) -> None:
    summary, survey = qa_run
    qa = read_qa(summary.run_id, catalog=catalog)
    grid = product_grid(open_product(summary.store, summary.run_id, "coadd", "deep1"))
    checked = 0
    for product, inputs in (("deep1", REFERENCE), ("deep1-v2", EPOCH)):
        for tile in _full_tiles(grid):
            row = qa[(qa["product"] == product) & (qa["tile_id"] == tile)][0]
            assert row["psf_source"] == "qa-fit", dict(row)
            assert row["psf_n_stars"] >= 3, dict(row)
            truth = _truth_fwhm_px(grid, tile, inputs, survey)
            assert abs(row["psf_fwhm_px"] / truth - 1.0) < 0.05, (product, tile, truth,
                                                                  row["psf_fwhm_px"])
            assert row["psf_fwhm_arcsec"] == pytest.approx(
                row["psf_fwhm_px"] * grid.pixel_scale_arcsec)
            checked += 1
    assert checked >= 8


@pytest.mark.slow
@pytest.mark.postgres
def test_score_rms_and_astrometric_residual(qa_run: tuple[RunSummary, Path],
                                            catalog: Catalog) -> None:
    summary, _ = qa_run
    qa = read_qa(summary.run_id, catalog=catalog)
    grid = product_grid(open_product(summary.store, summary.run_id, "coadd", "deep1"))
    epoch = qa[(qa["product"] == "deep1-v2") & np.isin(qa["tile_id"], _full_tiles(grid))]
    assert len(epoch) >= 4
    # S_corr has unit variance on empty sky (the median over the full tiles)
    assert abs(float(np.median(epoch["score_std"])) - 1.0) < 0.05, list(epoch["score_std"])
    # the epoch's stars sit where the reference's do: the same true positions, exact WCS
    assert np.all(epoch["astrometric_n_stars"] >= 3)
    assert np.all(epoch["astrometric_offset_px"] < 0.05), list(epoch["astrometric_offset_px"])
    # the per-star scatter is the centroid noise of S/N >= 20 stars: a tenth of a pixel
    assert np.all(epoch["astrometric_rms_px"] < 0.15)
    ref = qa[qa["product"] == "deep1"]
    assert np.all(~np.isfinite(ref["score_std"]))
    assert np.all(ref["astrometric_n_stars"] == 0)
    # the background against astropy's sigma-clipped statistics of the unmasked pixels
    # (an independent estimate; both lie below sqrt(variance): the bilinear resampling
    # averages neighbouring pixels, which lowers their scatter and correlates them)
    from astropy.stats import sigma_clipped_stats

    coadd = open_product(summary.store, summary.run_id, "coadd", "deep1")
    for tile in _full_tiles(grid):
        sy, sx = grid.tile_slices(tile)
        image = coadd["image"][sy, sx].values
        _, median, std = sigma_clipped_stats(image, mask=coadd["mask"][sy, sx].values != 0,
                                             sigma=3.0, maxiters=10)
        row = ref[ref["tile_id"] == tile][0]
        # the clipped std keeps the faint wings of sources that the source mask drops
        assert 0.9 < row["background_rms"] / std <= 1.0, (tile, std, dict(row))
        # the background subtraction leaves the sky within a fifth of its noise of zero; the
        # source-free level is at most the clipped median (which keeps the positive wings)
        assert abs(row["background"]) < 0.2 * std
        assert row["background"] <= median
        assert row["background_rms"] < math.sqrt(float(np.nanmedian(
            coadd["variance"][sy, sx].values)))


@pytest.mark.slow
@pytest.mark.postgres
def test_flags_follow_the_thresholds(qa_run: tuple[RunSummary, Path],
                                     catalog: Catalog) -> None:
    summary, _ = qa_run
    qa = read_qa(summary.run_id, catalog=catalog)
    scale = product_grid(open_product(summary.store, summary.run_id, "coadd",
                                      "deep1")).pixel_scale_arcsec
    for row in qa:  # what the run recorded is what its (default) thresholds say
        values = dict(zip(qa.colnames, row, strict=True))
        reasons = flag_tile(values, QaThresholds(), pixel_scale_arcsec=scale)
        assert list(row["reasons"]) == reasons
        assert bool(row["flagged"]) == bool(reasons)

    args = {"reference": "deep1", "reference_ids": REFERENCE,
            "epochs": {"deep1-v2": EPOCH}, "meta": {}, "catalog": catalog}
    # resumed: the rows exist, nothing is recomputed (new thresholds do not apply)
    before = read_qa(summary.run_id, catalog=catalog)
    run_qa(summary.store, summary.run_id, thresholds=QaThresholds(psf_fwhm_arcsec_max=0.1),
           **args)
    again = read_qa(summary.run_id, catalog=catalog)
    assert list(again["flagged"]) == list(before["flagged"])

    # recomputed with tight thresholds: every tile flagged, for the reasons crossed; the
    # measured values do not depend on the thresholds (the last test of the module to
    # touch the rows: the figures that follow only read them)
    with catalog.engine().begin() as conn:
        conn.execute(sa.text("DELETE FROM tile_qa WHERE run_id = :r"), {"r": summary.run_id})
    run_qa(summary.store, summary.run_id, **args,
           thresholds=QaThresholds(psf_fwhm_arcsec_max=0.5, score_std_tolerance=0.001))
    tight = read_qa(summary.run_id, catalog=catalog)
    assert np.all(tight["flagged"])
    fitted = tight["psf_source"] == "qa-fit"
    assert all(any(r.startswith("psf_fwhm") for r in rs) for rs in tight["reasons"][fitted])
    epochs = tight["product"] == "deep1-v2"
    assert all(any(r.startswith("score_std") for r in rs)
               for rs in tight["reasons"][epochs & np.isfinite(tight["score_std"])])
    # the run measured QA on the graphs it was writing (beside the writes, nothing read
    # back); recomputed from the written products, every value is the same
    def by_key(t: Any) -> dict[tuple[str, str], Any]:
        return {(str(r["product"]), str(r["tile_id"])): r for r in t}

    old_rows, new_rows = by_key(before), by_key(tight)
    assert set(old_rows) == set(new_rows)
    for key, r in new_rows.items():
        for m in METRICS:
            np.testing.assert_allclose(float(r[m]), float(old_rows[key][m]), rtol=1e-12,
                                       equal_nan=True, err_msg=f"{key} {m}")
        assert r["psf_source"] == old_rows[key]["psf_source"]
    attrs = open_product(summary.store, summary.run_id, "coadd", "deep1").attrs
    assert len(attrs["qa_flagged"]) == len(tight)


@pytest.mark.slow
@pytest.mark.postgres
def test_qa_figures_are_pngs_with_content(qa_run: tuple[RunSummary, Path], catalog: Catalog,
                                          tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    from lazysky.figures import qa_figures, tile_map

    summary, _ = qa_run
    paths = qa_figures(summary.run_id, store=summary.store, out_dir=tmp_path,
                       catalog=catalog)
    names = {p.name: p for p in paths}
    expect = {"qa_tile_map.png": (800, 700), "qa_tile_map_deep1-v2.png": (800, 700),
              "qa_histograms.png": (1200, 800)}
    assert set(expect) <= set(names)
    assert ("qa_transients.png" in names) == (summary.dia_sources > 0)
    for name, path in names.items():
        head = path.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        if name in expect:
            assert (width, height) == expect[name]
        pixels = mpimg.imread(path)[..., :3]
        assert pixels.std() > 0.05
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    grid = product_grid(open_product(summary.store, summary.run_id, "coadd", "deep1"))
    with pytest.raises(ParameterError, match="metric must be one of psf_fwhm_arcsec"):
        tile_map(read_qa(summary.run_id, catalog=catalog), grid, tmp_path / "x.png",
                 metric="seeing")


# --- settings ------------------------------------------------------------------------------
def test_bad_thresholds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"qa_thresholds\.psf_fwhm_arcsec_max: Input should "
                       r"be greater than 0 \(got -1\)"):
        load_settings(qa_thresholds={"psf_fwhm_arcsec_max": -1})
    with pytest.raises(ConfigError, match=r"unknown QA threshold\(s\) \['seeing_max'\]; "
                       r"allowed: psf_fwhm_arcsec_max, psf_min_stars"):
        load_settings(qa_thresholds={"seeing_max": 2.0})
    monkeypatch.setenv("LAZYSKY_QA_THRESHOLDS__PSF_MIN_STARS", "-2")
    with pytest.raises(ConfigError, match=r"qa_thresholds\.psf_min_stars"):
        load_settings()
    monkeypatch.setenv("LAZYSKY_QA_THRESHOLDS__PSF_MIN_STARS", "4")
    monkeypatch.setenv("LAZYSKY_QA_ENABLED", "false")
    s = load_settings()
    assert s.qa_thresholds.psf_min_stars == 4
    assert s.qa_enabled is False


def test_flag_tile_tight_flags_loose_does_not() -> None:
    values = {"psf_fwhm_px": 3.0, "psf_n_stars": 5, "background_rms": 30.0,
              "astrometric_offset_px": 0.04, "score_std": 1.08, "limiting_mag": 21.0}
    tight = QaThresholds(psf_fwhm_arcsec_max=1.0, psf_min_stars=6, background_rms_max=10.0,
                         astrometric_offset_px_max=0.01, score_std_tolerance=0.05,
                         limiting_mag_min=22.0)
    reasons = flag_tile(values, tight, pixel_scale_arcsec=0.5)
    assert [r.split()[0] for r in reasons] == ["psf_fwhm", "psf_n_stars", "background_rms",
                                               "astrometric_offset", "score_std",
                                               "limiting_mag"]
    loose = QaThresholds(psf_fwhm_arcsec_max=2.0, psf_min_stars=5, background_rms_max=31.0,
                         astrometric_offset_px_max=0.05, score_std_tolerance=0.1,
                         limiting_mag_min=20.0)
    assert flag_tile(values, loose, pixel_scale_arcsec=0.5) == []
    # a metric the tile could not measure never flags it
    nan = dict.fromkeys(values, math.nan) | {"psf_n_stars": 5}
    assert flag_tile(nan, tight, pixel_scale_arcsec=0.5) == ["psf_n_stars 5 < 6"]


# --- kernels -------------------------------------------------------------------------------
def test_background_and_score_ignore_sources_and_masked_pixels() -> None:
    rng = np.random.default_rng(4)
    img = rng.normal(12.0, 3.0, (200, 200))
    yy, xx = np.mgrid[:200, :200]
    for y, x in rng.uniform(10, 190, (30, 2)):
        img += 400.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5**2))
    mask = np.zeros(img.shape, np.uint16)
    mask[:, :20] = 1  # BAD: wild values there must not count
    img[:, :20] = 1e5
    bg = background_stats(img, mask)
    assert bg.level == pytest.approx(12.0, abs=0.1)
    assert bg.rms == pytest.approx(3.0, rel=0.03)
    assert bg.n_pixels < 180 * 200
    # a source mask given (computed once for the background and S_corr) is the one used
    assert background_stats(img, mask, sources=source_mask(img, mask)) == bg
    wider = background_stats(img, mask, sources=source_mask(img, mask, grow_px=8))
    assert wider.n_pixels < bg.n_pixels
    score = (img - 12.0) / 3.0
    assert score_std(score, mask) == pytest.approx(1.0, abs=0.03)
    assert score_std(score * 1.3, mask) == pytest.approx(1.3, abs=0.04)
    assert math.isnan(score_std(score, np.ones(img.shape, np.uint16)))


def test_limiting_magnitude_is_five_sigma_of_the_psf_noise_area() -> None:
    from lazysky.pipeline.psf import moffat_stamp

    psf = moffat_stamp(3.0, 3.0, 25)
    n_eff = 1.0 / float(np.sum(psf**2))
    var = np.full((50, 50), 100.0)
    mask = np.zeros(var.shape, np.uint16)
    expect = 27.0 - 2.5 * math.log10(5.0 * math.sqrt(100.0 * n_eff))
    assert limiting_magnitude(var, mask, psf, zeropoint_mag=27.0) == pytest.approx(expect)
    # a PSF twice as wide: four times the noise area, 0.75 mag shallower
    wide = limiting_magnitude(var, mask, moffat_stamp(6.0, 3.0, 49), zeropoint_mag=27.0)
    assert expect - wide == pytest.approx(0.75, abs=0.02)
    assert zeropoint_from_headers([{"MAGZPT": 27.0}, {"PHOTZP": "27.2"}]) == 27.1
    assert zeropoint_from_headers([{"MAGZPT": 27.0}, {}]) is None


def test_match_stars_recovers_an_offset() -> None:
    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 128, (15, 2))
    moved = np.add(ref, [0.2, -0.1]) + rng.normal(0, 0.02, ref.shape)
    moved[3] += 0.9  # a blended star: clipped
    off, rms, n = match_stars(np.column_stack([moved, np.ones(15)]), ref)
    assert off == pytest.approx(math.hypot(0.2, 0.1), abs=0.015)
    assert rms < 0.05
    assert n == 14
    assert match_stars(np.zeros((0, 4)), ref) == (pytest.approx(math.nan, nan_ok=True),
                                                   pytest.approx(math.nan, nan_ok=True), 0)


@contextmanager
def _raise_if_dask_computes() -> Iterator[None]:
    def scheduler(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        msg = f"a dask graph was computed inside a lazy API (keys {str(keys)[:200]})"
        raise RuntimeError(msg)

    with dask.config.set(scheduler=scheduler):
        yield


@pytest.mark.slow
@pytest.mark.postgres
def test_qa_tasks_are_lazy_and_named(qa_run: tuple[RunSummary, Path]) -> None:
    summary, _ = qa_run
    open_ = {k: open_product(summary.store, summary.run_id, k, "deep1-v2")
             for k in ("coadd", "diff")}
    ref = open_product(summary.store, summary.run_id, "coadd", "deep1")
    with _raise_if_dask_computes():
        tasks = qa_tasks(ref, {"deep1-v2": (open_["coadd"], open_["diff"])},
                         run_id=summary.run_id, n_detections={}, zeropoints={},
                         tiles=["t000_001"])
    assert {v.key for v in tasks.values()} == {
        f"qa-deep1-t000_001-{summary.run_id}", f"qa-deep1-v2-t000_001-{summary.run_id}"}
    with pytest.raises(ParameterError, match="include the reference's name"):
        qa_tasks(ref, {"deep1": (open_["coadd"], open_["diff"])}, run_id=summary.run_id,
                 n_detections={}, zeropoints={})


@pytest.mark.postgres
def test_write_qa_refuses_rows_without_keys(catalog: Catalog) -> None:
    from lazysky.catalog import CatalogError
    from lazysky.runs import new_run_id

    run_id = new_run_id("test")
    with pytest.raises(CatalogError, match=r"lacks \['kind'\]"):
        write_qa(run_id, [{"product": "deep1", "tile_id": "t000_000"}],
                 catalog=catalog)
    with pytest.raises(CatalogError, match="refused the QA rows"):  # run not registered
        write_qa(run_id, [{"product": "deep1", "tile_id": "t000_000", "kind": "coadd"}],
                 catalog=catalog)


def test_merge_plans_and_plan_products_refuse_what_does_not_fit(
        qa_run: tuple[RunSummary, Path], catalog: Catalog) -> None:
    def plan(run: str, keys: list[tuple[str, str]]) -> QaPlan:
        return QaPlan(run_id=run, reference="deep1", epochs={"deep1-v2": EPOCH}, keys=keys,
                      tasks=[object() for _ in keys], pixel_scale_arcsec=0.4)

    a, b = plan("r1", [("deep1", "t0")]), plan("r1", [("deep1-v2", "t0"), ("deep1", "t1")])
    merged = merge_plans([a, b])
    assert merged.keys == [("deep1", "t0"), ("deep1-v2", "t0"), ("deep1", "t1")]
    assert merged.tasks == [*a.tasks, *b.tasks]
    with pytest.raises(ParameterError, match="at least one QaPlan"):
        merge_plans([])
    with pytest.raises(ParameterError, match=r"every plan must be of run r1 .* got "
                       r"\(run, reference\) \[\('r2', 'deep1'\)\]"):
        merge_plans([a, plan("r2", [("deep1", "t2")])])
    with pytest.raises(ParameterError, match="a \\(product, tile\\) pair is in two plans"):
        merge_plans([a, a])
    # products given for an epoch the run does not have
    summary, _ = qa_run
    sci = open_product(summary.store, summary.run_id, "coadd", "deep1-v2")
    diff = open_product(summary.store, summary.run_id, "diff", "deep1-v2")
    with pytest.raises(ParameterError, match=r"products: \['deep1-v9'\] are not among the "
                       r"epochs \['deep1-v2'\]"):
        plan_qa(summary.store, summary.run_id, reference="deep1", reference_ids=REFERENCE,
                epochs={"deep1-v2": EPOCH}, meta={}, catalog=catalog,
                products={"deep1-v9": (sci, diff)})

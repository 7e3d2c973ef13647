"""The interactive API on the tiny survey's clean run: open_run, cutout, reprocess, compare.

The parent is the session's clean run of the tiny survey (``tiny_clean_rows``); the
children are real runs on a real local cluster, written to the real catalog.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
import numpy as np
import pytest
import sqlalchemy as sa

import lazysky
from lazysky._reprocess import _region_tiles
from lazysky.catalog import Catalog, CatalogError, coadd_sources, diff_sources
from lazysky.config import load_settings
from lazysky.errors import ParameterError
from lazysky.interactive import RunView

pytestmark = [pytest.mark.postgres]


@contextmanager
def raise_if_dask_computes() -> Iterator[None]:
    def scheduler(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        msg = f"a dask graph was computed inside a lazy API (keys {str(keys)[:200]})"
        raise RuntimeError(msg)

    with dask.config.set(scheduler=scheduler):
        yield


@pytest.fixture(scope="module")
def settings(catalog: Catalog) -> Any:
    return load_settings(catalog_dsn=catalog.dsn)


@pytest.fixture(scope="module")
def parent_id(tiny_clean_run: Any, tiny_clean_rows: dict[str, Any]) -> str:
    """The run id of the session's clean run (the one ``tiny_clean_rows`` holds)."""
    return str(tiny_clean_run.run_id)


@pytest.fixture(scope="module")
def parent(parent_id: str, settings: Any, catalog: Catalog) -> RunView:
    view = lazysky.open_run(parent_id, settings=settings, catalog=catalog)
    assert isinstance(view, RunView)
    return view


def _count(catalog: Catalog, table: sa.Table, run_id: str, tile: str | None = None) -> int:
    stmt = sa.select(sa.func.count()).select_from(table).where(table.c.run_id == run_id)
    if tile is not None:
        stmt = stmt.where(table.c.tile_id == tile)
    with catalog.engine().connect() as conn:
        return int(conn.execute(stmt).scalar_one())


def _state(catalog: Catalog) -> tuple[int, ...]:
    """Rows of runs, run tiles, sources and the production views (what must not move)."""
    with catalog.engine().connect() as conn:
        return tuple(int(conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one())
                     for t in ("runs", "run_tiles", "coadd_sources", "diff_sources",
                               "coadd_sources_prod", "diff_sources_prod"))


@pytest.fixture(scope="module")
def busiest_tile(parent: RunView) -> str:
    return max(parent.tile_rows, key=lambda t: parent.tile_rows[t])


@pytest.fixture(scope="module")
def detect_child(parent: RunView, busiest_tile: str, tiny_client: Any, settings: Any,
                 catalog: Catalog) -> tuple[RunView, tuple[int, ...], tuple[int, ...]]:
    """One tile reprocessed with a lower detection threshold (the parent's images)."""
    before = _state(catalog)
    child = lazysky.reprocess(parent, tiles=[busiest_tile],
                              overrides={"detect": {"threshold": 3.0}}, client=tiny_client,
                              settings=settings, catalog=catalog)
    return child, before, _state(catalog)


# -- open_run ---------------------------------------------------------------------------


def test_open_run_is_lazy_and_complete(parent: RunView, parent_id: str, settings: Any,
                                       catalog: Catalog) -> None:
    with raise_if_dask_computes():
        view = lazysky.open_run(parent_id, settings=settings, catalog=catalog)
        assert isinstance(view, RunView)
        assert set(view.products) == {"coadd/deep1", "coadd/deep1-v2", "diff/deep1-v2"}
        ref, diff = view.reference, view.differences["v2"]
        text, page = repr(view), view._repr_html_()
        grid = view.grid
    assert set(view.epochs) == {"v2"}
    assert {"image", "variance", "mask", "psf"} <= set(ref.data_vars)
    assert {"image", "variance", "score", "mask", "psf"} <= set(diff.data_vars)
    assert ref["image"].chunks is not None  # dask-backed
    assert ref["image"].shape == grid.shape
    assert view.type == "test"
    assert view.status == "done"
    assert view.parent_run_id is None
    assert view.tiles == grid.tile_ids()
    assert sum(view.tile_rows.values()) == _count(catalog, coadd_sources, parent_id)
    assert view.config["field"]["name"] == "deep1"
    assert set(view.timings) >= {"reference", "detect"}
    for item in (parent_id, "test", "done", "coadd/deep1", "t000_000"):
        assert item in text
        assert item in page
    # by field: the latest finished run of that field
    latest = lazysky.open_run(field="deep1", settings=settings, catalog=catalog)
    assert isinstance(latest, RunView)
    assert latest.field_name == "deep1"
    assert latest.status in ("done", "done_with_errors")


def test_open_run_shows_the_dashboard_of_the_connected_client(
        parent: RunView, tiny_client: Any) -> None:
    from distributed import get_client

    assert get_client() is not None
    link = tiny_client.dashboard_link
    assert parent.dashboard == link
    assert link in repr(parent)
    assert f'href="{link}"' in parent._repr_html_()


def test_open_run_unknown_or_malformed(settings: Any, catalog: Catalog) -> None:
    unknown = "exp-20261124-00000000-0000-4000-8000-000000000000"
    with pytest.raises(CatalogError, match=f"unknown run {unknown!r}"):
        lazysky.open_run(unknown, settings=settings, catalog=catalog)
    with pytest.raises(ParameterError, match="not a run id"):
        lazysky.open_run("nope", settings=settings, catalog=catalog)
    with pytest.raises(ParameterError, match="needs a run id, or field="):
        lazysky.open_run(settings=settings, catalog=catalog)
    with pytest.raises(CatalogError, match="no finished run of field 'nowhere'"):
        lazysky.open_run(field="nowhere", settings=settings, catalog=catalog)


# -- cutout -------------------------------------------------------------------------------


class _ChunkReads(dask.callbacks.Callback):
    """Counts the chunk tasks of product arrays that ran (``open-product-…`` block keys;
    dask fuses the read with the slicing, so one per chunk read)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def _pretask(self, key: Any, dsk: Any, state: Any) -> None:
        if isinstance(key, tuple) and str(key[0]).startswith("open-product-"):
            self.reads += 1


def test_cutout_reads_only_the_chunks_it_needs(parent: RunView) -> None:
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    ref = parent.reference
    grid = parent.grid
    t = grid.tile_px
    # 21 x 21 px around a pixel 3 px from a tile corner: 4 chunks of every (y, x) array
    cy, cx = t + 3, 2 * t - 4
    ra, dec = grid.wcs.pixel_to_world_values(cx, cy)
    with dask.config.set(scheduler="sync"), _ChunkReads() as reads:
        cut = lazysky.cutout(ref, SkyCoord(ra, dec, unit="deg"), 21)
    n_vars = len([v for v in ref.data_vars if ref[v].dims == ("y", "x")])
    assert grid.n_tiles == (3, 5)
    assert reads.reads == 4 * n_vars  # 4 of the 15 chunks of each (y, x) array
    with dask.config.set(scheduler="sync"), _ChunkReads() as everything:
        full = ref["image"].values
    assert everything.reads == 15  # the counter sees every chunk of a whole read
    np.testing.assert_array_equal(cut["image"].values,
                                  full[cy - 10:cy + 11, cx - 10:cx + 11])
    assert cut["image"].shape == (21, 21)
    assert cut.attrs["tile"] == grid.tile_id(cy // t, cx // t)
    np.testing.assert_array_equal(cut["psf"].values,
                                  ref["psf"].values[cy // t, cx // t])
    # the cutout's WCS puts the position at its centre pixel
    x, y = cut.attrs["wcs"].world_to_pixel_values(ra, dec)
    assert abs(float(x) - 10) < 1e-6
    assert abs(float(y) - 10) < 1e-6
    # the same cutout from other position and size spellings
    size = 21 * grid.pixel_scale_arcsec * u.arcsec
    for pos, sz in (((float(ra), float(dec)), size), (f"{float(ra)} {float(dec)}", 21 * u.pix)):
        other = lazysky.cutout(ref["image"].assign_attrs(grid=ref.attrs["grid"]), pos, sz)
        np.testing.assert_array_equal(other["image"].values, cut["image"].values)


def test_cutout_bad_input(parent: RunView) -> None:
    ref = parent.reference
    g = parent.grid
    with pytest.raises(ParameterError, match="off the product's grid"):
        lazysky.cutout(ref, (g.ra_deg + 1.0, g.dec_deg), 10)
    with pytest.raises(ParameterError, match="at least one pixel"):
        lazysky.cutout(ref, (g.ra_deg, g.dec_deg), "0.001arcsec")
    with pytest.raises(ParameterError, match="Dec must lie"):
        lazysky.cutout(ref, (g.ra_deg, 95.0), 10)
    with pytest.raises(ParameterError, match="no 'grid' attribute"):
        lazysky.cutout(ref["image"], (g.ra_deg, g.dec_deg), 10)


# -- reprocess ----------------------------------------------------------------------------


def test_reprocess_one_tile_with_a_lower_threshold(
        detect_child: tuple[RunView, tuple[int, ...], tuple[int, ...]], parent: RunView,
        busiest_tile: str, catalog: Catalog, tiny_clean_rows: dict[str, Any]) -> None:
    from test_run_end_to_end import _rows

    child, before, after = detect_child
    assert child.parent_run_id == parent.run_id
    assert child.type == "exp"
    assert child.status == "done"
    assert child.tiles == [busiest_tile]
    assert child.config["steps"]["detect"]["threshold"] == 3.0
    assert child.config["steps"]["stack"] == parent.config["steps"]["stack"]
    # only that tile has rows; more of them than the parent's at 5 sigma there
    with catalog.engine().connect() as conn:
        tiles = conn.execute(sa.select(coadd_sources.c.tile_id).distinct().where(
            coadd_sources.c.run_id == child.run_id)).scalars().all()
    assert tiles == [busiest_tile]
    assert _count(catalog, coadd_sources, child.run_id) > \
        _count(catalog, coadd_sources, parent.run_id, busiest_tile)
    # the images are the parent's (detect-only), so the child's products are those
    assert child.products_run_id == parent.run_id
    assert child.reference.attrs["run_id"] == parent.run_id
    # the parent's rows and the production views did not move; one run was added
    assert _rows(catalog, parent.run_id) == tiny_clean_rows
    assert after[0] == before[0] + 1
    assert after[4:] == before[4:]


def test_compare_parent_and_child(
        detect_child: tuple[RunView, tuple[int, ...], tuple[int, ...]], parent: RunView,
        busiest_tile: str, catalog: Catalog, settings: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    child = detect_child[0]
    cmp = lazysky.compare_runs(parent, child, settings=settings, catalog=catalog)
    t = cmp.table
    assert list(t["tile_id"]) == [busiest_tile]  # the tiles both cover
    row = t[0]
    assert row["n_a"] == _count(catalog, coadd_sources, parent.run_id, busiest_tile)
    assert row["n_b"] == _count(catalog, coadd_sources, child.run_id)
    assert row["matched"] + row["only_a"] == row["n_a"]
    assert row["only_b"] == row["n_b"] - row["matched"]
    assert row["only_b"] > 0
    assert row["matched"] >= 0.8 * row["n_a"]
    # same images, same photometry: matched sources agree
    assert abs(row["flux_ratio_median"] - 1.0) < 0.01
    assert row["offset_median_arcsec"] < 0.25 * parent.grid.pixel_scale_arcsec
    # truth from the survey the run ingested: a lower threshold finds at least as much
    assert row["n_truth"] > 0
    assert row["completeness_b"] >= row["completeness_a"]
    assert row["truth_found_a"] <= row["n_truth"]
    assert "only_b" in repr(cmp)
    fig = cmp.figure()
    assert len(fig.axes) == 2
    dia = lazysky.compare_runs(parent, child, table="diff", truth=False, settings=settings,
                               catalog=catalog)
    assert dia.table["n_a"][0] == _count(catalog, diff_sources, parent.run_id, busiest_tile)
    assert "n_truth" not in dia.table.colnames


def test_runs_compare_command(detect_child: tuple[RunView, tuple[int, ...], tuple[int, ...]],
                              parent: RunView, busiest_tile: str, catalog: Catalog,
                              tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    """`lazysky runs compare A B --figure F`: the same comparison, printed, and its figure."""
    import os

    from lazysky.cli import main

    for name in list(os.environ):
        if name.startswith("LAZYSKY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LAZYSKY_CATALOG_DSN", catalog.dsn)
    figure = tmp_path / "cmp.png"
    child = detect_child[0]
    assert main(["runs", "compare", parent.run_id, child.run_id, "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    assert busiest_tile in out
    assert "only_b" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["runs", "compare", parent.run_id, "not-a-run"]) == 1
    assert "not a run id" in capsys.readouterr().err


@pytest.mark.slow
def test_reprocess_a_corner_tile_from_the_raw_data_equals_the_parent(
        parent: RunView, tiny_client: Any, settings: Any, catalog: Catalog,
        tiny_clean_rows: dict[str, Any]) -> None:
    """The whole chain on one tile (its neighbours' images for the halos), same
    parameters: exactly the parent's rows of that tile, on the same grid."""
    from test_run_end_to_end import _rows

    tile = parent.grid.tile_ids()[0]
    child = lazysky.reprocess(parent, tiles=[tile], steps=["calibrate"], type="test",
                              client=tiny_client, settings=settings, catalog=catalog)
    assert child.parent_run_id == parent.run_id
    assert child.products_run_id == child.run_id
    assert child.tiles == [tile]
    assert child.grid == parent.grid
    rows = _rows(catalog, child.run_id)
    for table, got in rows.items():
        want = [r for r in tiny_clean_rows[table] if r[0] == tile]
        assert got == want, table


# -- bad input: clear errors, nothing written ---------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"overrides": {"detekt.threshold": 3}},
     "unknown step 'detekt'; the steps are calibrate, stack, difference, detect"),
    ({"overrides": {"detect": {"thresh": 3}}},
     "unknown parameter 'thresh' of step 'detect'; its parameters are threshold, "
     "diff_threshold"),
    ({"overrides": {"detect.threshold": -1}}, r"steps\.detect\.threshold"),
    ({"overrides": {"detect": 3}}, "give 'step.parameter'"),
    ({"type": "prod"}, "never makes production runs"),
    ({"type": "nightly"}, "type must be one of exp, test, val, repr"),
    ({"tiles": ["t009_009"]}, "outside the grid"),
    ({"region": ((10.0, -30.0), "10arcsec")}, "is outside the field"),
    ({"region": ("150.1", "1arcsec")}, "position"),
    ({"steps": ["deblend"]}, "steps must be some of calibrate, stack, difference, detect"),
    ({"steps": ["detect"], "overrides": {"stack.sigma": 2.0}}, "add those steps"),
])
def test_reprocess_bad_input_writes_nothing(parent: RunView, settings: Any, catalog: Catalog,
                                            kwargs: dict[str, Any], match: str) -> None:
    before = _state(catalog)
    with pytest.raises(ParameterError, match=match):
        lazysky.reprocess(parent, settings=settings, catalog=catalog, **kwargs)
    assert _state(catalog) == before


def test_reprocess_unknown_run(settings: Any, catalog: Catalog) -> None:
    before = _state(catalog)
    with pytest.raises(CatalogError, match="unknown run"):
        lazysky.reprocess("exp-20261124-00000000-0000-4000-8000-000000000000",
                          tiles=["t000_000"], settings=settings, catalog=catalog)
    assert _state(catalog) == before


def test_region_tiles(parent: RunView) -> None:
    grid = parent.grid
    t = grid.tile_px
    # a small circle in the middle of a tile: that tile; one over a corner: the four
    ra, dec = grid.wcs.pixel_to_world_values(t + t // 2, t // 2)
    assert _region_tiles(grid, ((float(ra), float(dec)), "2arcsec")) == ["t000_001"]
    ra, dec = grid.wcs.pixel_to_world_values(2 * t - 0.5, t - 0.5)
    assert _region_tiles(grid, {"center": (float(ra), float(dec)), "radius": "5arcsec"}) == \
        ["t000_001", "t000_002", "t001_001", "t001_002"]


def test_promote_a_child_then_roll_back(
        detect_child: tuple[RunView, tuple[int, ...], tuple[int, ...]], busiest_tile: str,
        settings: Any, catalog: Catalog) -> None:
    """A one-tile experiment is promotable (it planned only its tile); the production view
    of the field then shows it there, and the rollback takes it back out."""
    from lazysky.catalog.production import production_tiles
    from lazysky.interactive import ProductionView

    child = detect_child[0]
    before = production_tiles("deep1", catalog=catalog)
    promotion = lazysky.promote(child.run_id, reason="test: lower threshold",
                                catalog=catalog)
    try:
        view = lazysky.open_run(field="deep1", production=True, settings=settings,
                                catalog=catalog)
        assert isinstance(view, ProductionView)
        assert view.tiles[busiest_tile] == child.run_id
        assert child.run_id in repr(view)
        image = view.image("coadd", "deep1")
        assert image.chunks is not None  # lazy
        sy, sx = view.grid.tile_slices(busiest_tile)
        np.testing.assert_array_equal(image[sy, sx].values,
                                      child.reference["image"][sy, sx].values)
    finally:
        lazysky.rollback(promotion.promotion_id, reason="test: back", catalog=catalog)
    assert production_tiles("deep1", catalog=catalog) == before

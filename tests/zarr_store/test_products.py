"""Masters and grid products in the Zarr store: round trips, partial and resumed writes,
laziness and bad input, on local disk and on S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import gc
import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from zs_helpers import raise_if_dask_computes, s3_options

from lazysky.errors import ParameterError, StoreError
from lazysky.pipeline import SkyGrid, make_masters, stack
from lazysky.pipeline._mask import MaskBit
from lazysky.pipeline.resample import RESAMPLED_DTYPE, ResampledTile
from lazysky.pipeline.testing import synthetic_exposure
from lazysky.runs import new_run_id
from lazysky.zarr_store._layout import parse_store
from lazysky.zarr_store._s3 import close_s3_filesystems
from lazysky.zarr_store.products import (
    complete_tiles,
    list_products,
    open_masters,
    open_product,
    product_grid,
    write_masters,
    write_product,
)

GRID = SkyGrid(ra_deg=150.0, dec_deg=2.0, pixel_scale_arcsec=0.5, shape=(70, 90), tile_px=32)
RUN = new_run_id("test", date="2026-11-24")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The same tests on a local directory and on a bucket of the moto server."""
    if request.param == "local":
        yield tmp_path / "store"
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    yield parse_store(f"s3://{bucket}/survey", storage_options=s3_options(endpoint))
    # close the S3 sessions now: a socket left for the garbage collector would warn
    # (ResourceWarning -> error) inside whichever later test happens to collect it
    close_s3_filesystems()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _coadd(seed: int = 0, n_exposures: int = 3) -> xr.Dataset:
    """A real :func:`stack` output (3 exposures of seeded noise + a few stars) on GRID."""
    rng = np.random.default_rng(seed)
    pieces = []
    for e in range(n_exposures):
        for tile in GRID.tile_ids()[:-1]:  # the last tile stays empty (NODATA)
            shape = GRID.tile_shape(tile)
            px = np.zeros(shape, RESAMPLED_DTYPE)
            px["image"] = rng.normal(100.0, 5.0, shape)
            px["variance"] = 25.0
            px["mask"] = np.where(rng.random(shape) < 0.02, int(MaskBit.CR), 0)
            weight = da.from_array(np.full((1, 1), 0.04))
            pieces.append(ResampledTile(f"e{e}", "CCD01", tile, da.from_array(px), "electron",
                                        weight))  # fmt: skip
    return stack(pieces, GRID)


def _equal(a: xr.Dataset, b: xr.Dataset) -> None:
    assert sorted(a.data_vars) == sorted(b.data_vars)
    for n in a.data_vars:
        assert a[n].dtype == b[n].dtype, n
        np.testing.assert_array_equal(a[n].values, b[n].values, err_msg=str(n))
        assert a[n].attrs == b[n].attrs, n


# -- products ------------------------------------------------------------------------


def test_product_round_trip(store: Any) -> None:
    coadd = _coadd()
    written = write_product(store, RUN, "coadd", "deep1-r", coadd)
    assert written == GRID.tile_ids()
    assert complete_tiles(store, RUN, "coadd", "deep1-r") == GRID.tile_ids()
    back = open_product(store, RUN, "coadd", "deep1-r")
    assert list_products(store, RUN) == [("coadd", "deep1-r")]
    for n in back.data_vars:  # one dask block (and one Zarr chunk) per tile
        assert back[n].chunks == GRID.chunks
    _equal(coadd.compute(), back.compute())
    for k, v in coadd.attrs.items():
        assert back.attrs[k] == (list(v) if isinstance(v, tuple) else v), k
    assert (back.attrs["run_id"], back.attrs["kind"], back.attrs["name"]) == (
        RUN, "coadd", "deep1-r")  # fmt: skip
    assert product_grid(back) == GRID
    # the empty tile round-trips as stack made it: NODATA, infinite variance
    sy, sx = GRID.tile_slices(GRID.tile_ids()[-1])
    assert np.all(back["mask"].values[sy, sx] & int(MaskBit.NODATA))
    assert np.all(np.isinf(back["variance"].values[sy, sx]))


def test_partial_tiles_then_resume(store: Any) -> None:
    coadd = _coadd(seed=1)
    ref = coadd.compute()
    first = GRID.tile_ids()[::3]
    assert write_product(store, RUN, "coadd", "deep1-r", coadd, tiles=first) == first
    assert complete_tiles(store, RUN, "coadd", "deep1-r") == sorted(first)
    part = open_product(store, RUN, "coadd", "deep1-r").compute()
    for tile in GRID.tile_ids():
        sy, sx = GRID.tile_slices(tile)
        img, msk = part["image"].values[sy, sx], part["mask"].values[sy, sx]
        if tile in first:
            np.testing.assert_array_equal(img, ref["image"].values[sy, sx])
        else:  # not written: reads as NaN and NODATA, never as plausible data
            assert np.all(np.isnan(img))
            assert np.all(msk == int(MaskBit.NODATA))
    done = set(complete_tiles(store, RUN, "coadd", "deep1-r"))
    rest = [t for t in GRID.tile_ids() if t not in done]
    assert write_product(store, RUN, "coadd", "deep1-r", coadd, tiles=rest) == rest
    _equal(ref, open_product(store, RUN, "coadd", "deep1-r").compute())


def _with_psf(coadd: xr.Dataset, seed: int = 5) -> xr.Dataset:
    """The coadd plus per-tile values: a 5x5 stamp and a scalar per tile, one dask block
    per tile (as psf_per_tile returns them)."""
    nty, ntx = GRID.n_tiles
    rng = np.random.default_rng(seed)
    stamps = da.from_array(rng.random((nty, ntx, 5, 5)), chunks=(1, 1, 5, 5))
    fwhm = da.from_array(rng.uniform(2, 4, (nty, ntx)), chunks=1)
    return coadd.assign(psf=(("tile_y", "tile_x", "v", "u"), stamps),
                        psf_fwhm=(("tile_y", "tile_x"), fwhm))  # fmt: skip


def test_per_tile_variables_round_trip_and_resume(store: Any) -> None:
    """A product carries per-tile values (the PSF of each tile) beside its pixels: each
    tile's entry is written by that tile's task, an unwritten tile's entry reads NaN."""
    prod = _with_psf(_coadd(seed=2))
    ref = prod.compute()
    first = GRID.tile_ids()[:2]
    write_product(store, RUN, "coadd", "psf-r", prod, tiles=first)
    part = open_product(store, RUN, "coadd", "psf-r")
    assert part.psf.dims == ("tile_y", "tile_x", "v", "u")
    assert part.psf.chunks == ((1,) * GRID.n_tiles[0], (1,) * GRID.n_tiles[1], (5,), (5,))
    got = part.psf.values
    for tile in GRID.tile_ids():
        iy, ix = (int(v) for v in tile[1:].split("_"))
        if tile in first:
            np.testing.assert_array_equal(got[iy, ix], ref.psf.values[iy, ix])
        else:
            assert np.all(np.isnan(got[iy, ix]))
    write_product(store, RUN, "coadd", "psf-r", prod,
                  tiles=[t for t in GRID.tile_ids() if t not in first])  # fmt: skip
    _equal(ref, open_product(store, RUN, "coadd", "psf-r").compute())


def test_per_tile_variable_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    coadd = _coadd()
    bad = coadd.assign(psf=(("tile_y", "tile_x", "v", "u"), np.zeros((1, 1, 5, 5))))
    with pytest.raises(ParameterError, match=r"per-tile variable 'psf' .* \(3, 3\) tiles"):
        write_product(tmp_path / "s", RUN, "coadd", "bad", bad)
    other = coadd.assign(stars=(("star", "field"), np.zeros((4, 2))))
    with pytest.raises(ParameterError, match="or per-tile values"):
        write_product(tmp_path / "s", RUN, "coadd", "bad", other)


def _chunks(store: Any) -> dict[str, bytes]:
    root = parse_store(store)
    fs = root.fs()
    base = root.path("products", RUN, "coadd", "deep1-r")
    fs.invalidate_cache(base)
    return {p[len(base) + 1 :]: fs.cat_file(p) for p in fs.find(base)
            if "/c/" in p and not p.endswith("zarr.json")}  # fmt: skip


def test_rerun_is_idempotent(store: Any) -> None:
    coadd = _coadd(seed=2)
    write_product(store, RUN, "coadd", "deep1-r", coadd)
    before = _chunks(store)
    assert len(before) == 6 * len(GRID.tile_ids())
    again = GRID.tile_ids()[2:5]
    write_product(store, RUN, "coadd", "deep1-r", coadd, tiles=again)
    assert _chunks(store) == before
    assert complete_tiles(store, RUN, "coadd", "deep1-r") == GRID.tile_ids()


def test_rerun_touches_only_its_tiles(tmp_path: Path) -> None:
    coadd = _coadd(seed=2)
    write_product(tmp_path, RUN, "coadd", "x", coadd)
    base = tmp_path / "products" / RUN / "coadd" / "x" / "image" / "c"
    mtimes = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}
    write_product(tmp_path, RUN, "coadd", "x", coadd, tiles=["t001_002"])
    changed = {p.relative_to(base).as_posix() for p, t in mtimes.items()
               if p.stat().st_mtime_ns != t}  # fmt: skip
    assert changed <= {"1/2"}


def test_product_laziness(tmp_path: Path) -> None:
    coadd = _coadd(seed=3)
    with raise_if_dask_computes():
        pending = write_product(tmp_path, RUN, "coadd", "lazy", coadd, compute=False)
        assert complete_tiles(tmp_path, RUN, "coadd", "lazy") == []  # only the template
        back = open_product(tmp_path, RUN, "coadd", "lazy")
        assert all(isinstance(back[n].data, da.Array) for n in back.data_vars)
    assert sorted(pending.compute()) == GRID.tile_ids()
    assert any(k.startswith("write-product-t000_000-") for k in pending.__dask_graph__())
    _equal(coadd.compute(), open_product(tmp_path, RUN, "coadd", "lazy").compute())


def test_misaligned_chunks_are_refused(tmp_path: Path) -> None:
    coadd = _coadd().chunk({"y": 20, "x": 20})
    with pytest.raises(StoreError, match=r"ds.chunk\(\{'y': 32, 'x': 32\}\)"):
        write_product(tmp_path, RUN, "coadd", "deep1-r", coadd)
    assert not (tmp_path / "products").exists()


def test_in_memory_product_is_written_per_tile(tmp_path: Path) -> None:
    coadd = _coadd().compute()
    assert write_product(tmp_path, RUN, "coadd", "mem", coadd) == GRID.tile_ids()
    _equal(coadd, open_product(tmp_path, RUN, "coadd", "mem").compute())


@pytest.mark.parametrize("run_id", ["prod-2026-1", "bogus-20261124-" + "0" * 8, ""])
def test_bad_run_id(tmp_path: Path, run_id: str) -> None:
    with pytest.raises(ParameterError, match="run id"):
        write_product(tmp_path, run_id, "coadd", "deep1-r", _coadd())
    with pytest.raises(ParameterError, match="run id"):
        open_product(tmp_path, run_id, "coadd", "deep1-r")


def test_bad_kind_name_and_grid(tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match=r"kind must be one of \['coadd', 'diff'\]"):
        write_product(tmp_path, RUN, "stack", "deep1-r", _coadd())
    with pytest.raises(ParameterError, match="product name"):
        write_product(tmp_path, RUN, "coadd", "../up", _coadd())
    no_grid = _coadd()
    del no_grid.attrs["grid"]
    with pytest.raises(ParameterError, match="no 'grid' attribute"):
        write_product(tmp_path, RUN, "coadd", "deep1-r", no_grid)
    with pytest.raises(ParameterError, match=r"shape \(70, 90\)"):
        write_product(tmp_path, RUN, "coadd", "deep1-r", _coadd().isel(y=slice(0, 64)))


def test_missing_product(store: Any) -> None:
    with pytest.raises(StoreError, match="no coadd product 'nope'"):
        open_product(store, RUN, "coadd", "nope")
    assert complete_tiles(store, RUN, "coadd", "nope") == []


def test_other_provenance_is_refused_unless_overwrite(tmp_path: Path) -> None:
    write_product(tmp_path, RUN, "coadd", "deep1-r", _coadd(seed=4))
    other = _coadd(seed=4, n_exposures=2)  # other inputs
    with pytest.raises(StoreError, match=r"attributes \['inputs', 'steps'\] differ"):
        write_product(tmp_path, RUN, "coadd", "deep1-r", other)
    write_product(tmp_path, RUN, "coadd", "deep1-r", other, overwrite=True)
    _equal(other.compute(), open_product(tmp_path, RUN, "coadd", "deep1-r").compute())


# -- masters -------------------------------------------------------------------------


def _frames(kind: str, n: int, seed: int) -> list[xr.Dataset]:
    rng = np.random.default_rng(seed)
    level = {"bias": 0.0, "dark": 30.0, "flat": 3000.0}[kind]
    out = []
    for k in range(n):
        ds = synthetic_exposure(shape=(40, 50), signal_adu=level, imagetyp=kind, tile_px=16)
        noisy = ds.sci.data + da.from_array(
            rng.integers(0, 40, ds.sci.shape).astype(np.uint16), chunks=ds.sci.data.chunks
        )
        sha = hashlib.sha256(f"{kind}{k}".encode()).hexdigest()
        out.append(ds.assign(sci=(ds.sci.dims, noisy)).assign_coords(
            exposure=f"{kind}-{k:03d}", source_sha256=sha))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def frames() -> dict[str, list[xr.Dataset]]:
    return {"bias": _frames("bias", 3, 0), "dark": _frames("dark", 3, 1),
            "flat": _frames("flat", 3, 2)}  # fmt: skip


def test_masters_round_trip(store: Any, frames: dict[str, list[xr.Dataset]]) -> None:
    masters = make_masters(**frames).compute()
    groups = write_masters(store, masters, inputs=frames, chunk_px=16)
    assert sorted(groups) == sorted(f"calib/{k}/CCD0{d}" for k in ("bias", "dark", "flat", "bpm")
                                    for d in (1, 2))  # fmt: skip
    with raise_if_dask_computes():
        back = open_masters(store)
    assert isinstance(back["flat"].data, da.Array)
    _equal(masters, back.compute())
    for c in ("detector", "gain", "rdnoise", "saturate"):
        np.testing.assert_array_equal(masters[c].values, back[c].values)
    ids = {k: [i["exposure_id"] for i in v] for k, v in back.attrs["inputs"].items()}
    assert ids["bias"] == ["bias-000", "bias-001", "bias-002"]
    assert ids["bpm"] == ids["dark"] + ids["flat"]
    want = str(frames["flat"][1].source_sha256.values)
    assert back.attrs["inputs"]["flat"][1]["sha256"] == want
    # a second write replaces the masters whole (idempotent for the same masters)
    write_masters(store, masters, inputs=frames, chunk_px=16)
    _equal(
        masters[["bias", "bias_variance", "bpm"]],
        open_masters(store, kinds=["bias", "bpm"]).compute(),
    )


def test_masters_calibrate_the_same(tmp_path: Path, frames: dict[str, list[xr.Dataset]]) -> None:
    from lazysky.pipeline import calibrate_exposure

    masters = make_masters(**frames)
    sci = _frames("flat", 1, 9)[0]
    write_masters(tmp_path, masters, inputs={k: {f"{k}x": "ab" * 32} for k in frames})
    a = calibrate_exposure(sci, masters.compute()).compute()
    b = calibrate_exposure(sci, open_masters(tmp_path)).compute()
    np.testing.assert_array_equal(a.image.values, b.image.values)
    np.testing.assert_array_equal(a.mask.values, b.mask.values)


def test_masters_bad_input(tmp_path: Path, frames: dict[str, list[xr.Dataset]]) -> None:
    masters = make_masters(bias=frames["bias"]).compute()
    with pytest.raises(StoreError, match="no master calibration"):
        open_masters(tmp_path)
    with pytest.raises(ParameterError, match="no entry for the bias master"):
        write_masters(tmp_path, masters, inputs={})
    with pytest.raises(ParameterError, match="SHA-256"):
        write_masters(tmp_path, masters, inputs={"bias": {"b0": "nothex"}})
    with pytest.raises(ParameterError, match="source_sha256"):
        write_masters(tmp_path, masters, inputs={"bias": [f.drop_vars("source_sha256")
                                                          for f in frames["bias"]]})  # fmt: skip
    with pytest.raises(ParameterError, match="unknown kind"):
        write_masters(tmp_path, masters, inputs={"bias": frames["bias"], "bpm": frames["bias"]})
    with pytest.raises(ParameterError, match="no master in the Dataset"):
        write_masters(tmp_path, masters.drop_vars(["bias", "bias_variance"]), inputs={})
    write_masters(tmp_path, masters, inputs={"bias": frames["bias"]})
    with pytest.raises(StoreError, match=r"no flat calibration .*it has \['bias'\]"):
        open_masters(tmp_path, kinds=["flat"])
    with pytest.raises(ParameterError, match="kind must be one of"):
        open_masters(tmp_path, kinds=["sky"])
    # an interrupted write (group metadata missing) is not read as a master
    (tmp_path / "calib" / "bias" / "CCD02" / "zarr.json").unlink()
    with pytest.raises(StoreError, match=r"write the masters again|incomplete"):
        open_masters(tmp_path)

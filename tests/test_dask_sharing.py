"""Per-tile tasks that read windows of one lazy product compute each upstream block once.

Passing dask arrays straight to ``dask.delayed`` optimises each argument on its own and
renames its tasks, so every tile task would recompute the whole upstream graph (it once
made a tiny run 60 × slower). These tests count the upstream kernel's calls.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from lazysky.pipeline import SkyGrid
from lazysky.pipeline.detect import detect, detect_difference
from lazysky.runs import new_run_id
from lazysky.zarr_store.products import write_product

GRID = SkyGrid(ra_deg=150.0, dec_deg=2.0, pixel_scale_arcsec=0.5, shape=(96, 128), tile_px=32)


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, block: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls += 1
        return block + 0.0


def _product(counter: Counter) -> xr.Dataset:
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 1.0, GRID.shape)
    yy, xx = np.mgrid[: GRID.shape[0], : GRID.shape[1]]
    for y0, x0 in ((31.5, 31.5), (50.0, 90.0), (10.0, 20.0)):  # one on a tile corner
        image += 200.0 * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * 1.5**2))
    base = da.from_array(image, chunks=GRID.chunks)
    counted = base.map_blocks(counter, dtype=float, meta=np.empty((0, 0)))
    ds = xr.Dataset({
        "image": (("y", "x"), counted),
        # like a stack's packed block: every variable is a view of one upstream result
        "variance": (("y", "x"), counted * 0.0 + 1.0),
        "score": (("y", "x"), counted),
        "mask": (("y", "x"), da.zeros(GRID.shape, dtype=np.uint16, chunks=GRID.chunks)),
    })  # fmt: skip
    ds.attrs["grid"] = GRID.to_dict()
    return ds


def _blocks() -> int:
    ny, nx = GRID.n_tiles
    return ny * nx


def test_detect_reads_each_block_once() -> None:
    counter = Counter()
    ds = _product(counter)
    with dask.config.set(scheduler="threads"):
        found = detect(ds, threshold=5.0, halo_px=16).to_table()
    assert len(found) == 3
    assert counter.calls == _blocks()
    counter.calls = 0
    with dask.config.set(scheduler="sync"):
        found = detect_difference(ds, threshold=5.0, halo_px=16).to_table()
    assert len(found) >= 3
    assert counter.calls == _blocks()


def test_write_product_computes_each_block_once(tmp_path: Path) -> None:
    counter = Counter()
    ds = _product(counter)[["image", "variance", "mask"]]
    with dask.config.set(scheduler="sync"):
        written: Any = write_product(tmp_path, new_run_id("test"), "coadd", "x", ds)
    assert len(written) == _blocks()
    assert counter.calls == _blocks()

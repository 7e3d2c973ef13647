"""Ingest as Dask graphs: task names, streaming memory, a distributed cluster."""

from __future__ import annotations

import tracemalloc

import dask
import numpy as np
import pytest
from astropy.io import fits
from dask.callbacks import Callback

from lazysky.zarr_store import ingest, open_exposure


def test_task_names_read_well_on_the_dashboard(make_fits, tmp_path):
    keys: list[str] = []

    class Record(Callback):
        def _pretask(self, key, dsk, state):
            keys.append(key.rsplit("-", 1)[0])  # drop the token

    path = make_fits("named-e1", detectors=2)
    with Record(), dask.config.set(scheduler="threads"):
        assert ingest(path, tmp_path / "s").ok
    assert sorted(keys) == [
        "finalize-named-e1", "ingest-named-e1-CCD01", "ingest-named-e1-CCD02",
        f"inspect-{path.stem}",
    ]


@pytest.mark.slow
def test_streaming_memory_stays_far_below_the_file(make_fits, tmp_path):
    path = make_fits("big", detectors=1, shape=(4096, 2048), dtype="float64")  # 64 MiB
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="sync"):
            assert ingest(path, tmp_path / "s", tile_shape=(256, 256)).ok
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 4, (peak, size)  # a 256-row band is 4 MiB, a read block 6 MiB
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(open_exposure(tmp_path / "s", "big").sci[0].values,
                                      hdul[1].data)


@pytest.mark.slow
def test_runs_on_a_distributed_cluster(make_fits, tmp_path):
    distributed = pytest.importorskip("distributed")
    paths = [make_fits(f"dist{k}", seed=k, detectors=2) for k in range(2)]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        report = ingest(paths, tmp_path / "s", tile_shape=(32, 32))
    assert report.ok, report.summary()
    for k, path in enumerate(paths):
        with fits.open(path) as hdul:
            np.testing.assert_array_equal(open_exposure(tmp_path / "s", f"dist{k}").sci.values,
                                          np.stack([h.data for h in hdul[1:]]))


def test_a_tall_detector_is_split_over_several_tasks(make_fits, tmp_path):
    keys: list[str] = []

    class Record(Callback):
        def _pretask(self, key, dsk, state):
            keys.append(key.rsplit("-", 1)[0])

    path = make_fits("tall", single=True, detectors=1, shape=(200, 40), dtype="int32")
    with Record(), dask.config.set(scheduler="threads"):
        assert ingest(path, tmp_path / "s", tile_shape=(16, 16)).ok  # 13 bands, 4 per task
    assert sorted(k for k in keys if k.startswith("ingest-")) == [
        "ingest-tall-CCD01-y0", "ingest-tall-CCD01-y128", "ingest-tall-CCD01-y192",
        "ingest-tall-CCD01-y64"]
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(open_exposure(tmp_path / "s", "tall").sci[0].values,
                                      hdul[0].data)

"""Autoscaling on a real local cluster: the part of the operator's loop that is ours.

The dask-kubernetes operator polls the scheduler's ``/api/v1/adaptive_target`` (HTTP),
clamps it to the DaskAutoscaler's minimum and maximum, and scales the default worker
group. Here the same route is read over HTTP from a real scheduler: it rises with queued
work and falls when idle; an adaptive cluster stays within its bounds; and a run whose
cluster is scaled down mid-way (a worker retired, as the operator does) still ends with
exactly the rows of a clean run.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import pytest

pytestmark = pytest.mark.slow



@pytest.fixture
def api_config() -> Iterator[None]:
    """Scheduler HTTP routes with the API the operator reads (as the kube specs set)."""
    import distributed  # noqa: F401  (loads distributed's configuration defaults)

    routes = [*dask.config.get("distributed.scheduler.http.routes"),
              "distributed.http.scheduler.api"]
    with dask.config.set({"distributed.scheduler.http.routes": routes}):
        yield


def _target(client: Any) -> int:
    """The scheduler's adaptive target, read the way the operator reads it (HTTP GET)."""
    parts = urllib.parse.urlsplit(client.dashboard_link)
    url = f"{parts.scheme}://{parts.netloc}/api/v1/adaptive_target"
    with urllib.request.urlopen(url, timeout=30) as reply:
        return int(json.loads(reply.read())["workers"])


def _until(check: Callable[[], bool], timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


class _Watch(threading.Thread):
    """Samples the number of workers of a cluster every 50 ms."""

    def __init__(self, cluster: Any) -> None:
        super().__init__(daemon=True)
        self.cluster, self.counts = cluster, [len(cluster.scheduler_info["workers"])]
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.counts.append(len(self.cluster.scheduler_info["workers"]))
        self.counts.append(len(self.cluster.scheduler_info["workers"]))  # as it was left


def test_the_adaptive_target_rises_with_queued_work_and_falls_when_idle(
        api_config: None) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        assert _target(client) == 0  # idle: nothing is needed beyond the minimum
        futures = client.map(time.sleep, [0.1] * 60, pure=False)
        assert _until(lambda: len(cluster.scheduler.queued) > 10)
        busy = _target(client)
        # 60 tasks of unknown duration (0.5 s each by default) for a 5 s target: > 1 worker
        assert 1 < busy <= 60
        client.gather(futures)
        del futures
        assert _until(lambda: _target(client) == 0), "the target stays up when idle"


def test_an_adaptive_cluster_stays_within_its_bounds(api_config: None) -> None:
    from lazysky.cluster import connect

    with connect(kind="local", min_workers=1, max_workers=2,
                 dashboard_address="127.0.0.1:0") as client:
        cluster = client.cluster
        # scale decisions every 200 ms (the operator polls every few seconds)
        cluster.adapt(minimum=1, maximum=2, interval="200ms", wait_count=2)
        watch = _Watch(cluster)
        watch.start()
        try:
            assert _until(lambda: len(cluster.scheduler_info["workers"]) == 1)
            futures = client.map(time.sleep, [0.2] * 60, pure=False)
            assert _until(lambda: _target(client) > 2)  # demand above the maximum ...
            assert _until(lambda: len(cluster.scheduler_info["workers"]) == 2)
            client.gather(futures)
            del futures
            # ... and idle it goes back to the minimum
            assert _until(lambda: len(cluster.scheduler_info["workers"]) == 1)
        finally:
            watch.stop.set()
            watch.join()
        final = len(cluster.scheduler_info["workers"])
        counts = watch.counts
        assert max(counts) == 2  # never above the maximum, though the target was
        assert min(counts[counts.index(1):]) >= 1  # once started, never below the minimum
        assert 1 in counts[counts.index(2):]  # up to the maximum, then back down
        assert final == 1


@pytest.mark.postgres
def test_a_run_scaled_down_midway_ends_with_the_clean_rows(
        api_config: None, tiny_survey: Path, tiny_clean_rows: dict[str, Any],
        catalog: Any, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster
    from test_run_end_to_end import _config, _rows

    from lazysky.config import load_settings
    from lazysky.runner import run

    store = tmp_path / "store"
    result: dict[str, Any] = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        cluster.adapt(minimum=2, maximum=2, interval="200ms", wait_count=1)

        def go() -> None:
            try:
                result["summary"] = run(_config(tiny_survey, store), settings=load_settings(
                    catalog_dsn=catalog.dsn), client=client, catalog=catalog)
            except BaseException as exc:  # reported below
                result["error"] = exc

        watch = _Watch(cluster)
        watch.start()
        thread = threading.Thread(target=go)
        thread.start()
        products = store / "products"
        assert _until(lambda: (products.is_dir() and any(
            products.glob("*/coadd/deep1/.done/*"))) or not thread.is_alive(), timeout=600)
        # the autoscaler's maximum drops mid-run: one worker is retired
        cluster.adapt(minimum=1, maximum=1, interval="200ms", wait_count=1)
        assert _until(lambda: len(cluster.scheduler_info["workers"]) == 1, timeout=120)
        scaled_while_running = thread.is_alive()
        thread.join(timeout=600)
        watch.stop.set()
        watch.join()
    assert "error" not in result, result.get("error")
    assert scaled_while_running, "the run ended before the cluster was scaled down"
    assert watch.counts[0] == 2
    assert 1 in watch.counts
    summary = result["summary"]
    assert summary.status == "done"
    assert _rows(catalog, summary.run_id) == tiny_clean_rows

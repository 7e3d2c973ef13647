"""lazysky.cluster.connect: a real LocalCluster of worker processes, or an existing scheduler."""

from __future__ import annotations

import os
import urllib.request

import dask
import pytest
from distributed import LocalCluster, WorkerPlugin

from lazysky.cluster import connect, dashboard_url
from lazysky.config import ClusterSettings, load_settings
from lazysky.errors import ConfigError


class _Mark(WorkerPlugin):
    """Sets a process-wide value once per worker, as SEP's settings are."""

    name = "lazysky-test-mark"

    def setup(self, worker: object) -> None:
        os.environ["LAZYSKY_TEST_MARK"] = "set-once"


def _mark() -> str | None:
    return os.environ.get("LAZYSKY_TEST_MARK")


def _pid() -> int:
    return os.getpid()


def test_local_cluster_processes_adaptive_plugins_dashboard_and_close() -> None:
    with connect(
        kind="local", min_workers=1, max_workers=2, dashboard_address="127.0.0.1:0",
        worker_plugins=[_Mark()],
    ) as client:
        cluster = client.cluster
        client.wait_for_workers(1)
        info = client.scheduler_info()["workers"]
        assert all(w["nthreads"] == 1 for w in info.values())
        # worker processes, not threads of this process
        assert set(client.run(_pid).values()).isdisjoint({os.getpid()})
        assert set(client.run(_mark).values()) == {"set-once"}
        # adaptive between 1 and 2 workers
        assert cluster._adaptive is not None
        assert (cluster._adaptive.minimum, cluster._adaptive.maximum) == (1, 2)
        # a worker that joins later gets the plugin too (adaptive stopped first, so it
        # cannot retire the new, idle worker before we look)
        cluster._adaptive.stop()
        cluster.scale(2)
        client.wait_for_workers(2)
        assert list(client.run(_mark).values()) == ["set-once", "set-once"]
        url = dashboard_url(client)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=30) as reply:
            assert reply.status == 200
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert cluster.status.name == "closed"


def test_address_attaches_and_leaves_the_cluster_running() -> None:
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        settings = load_settings(cluster={"kind": "address", "address": cluster.scheduler_address})
        with connect(settings) as client:
            assert client.submit(pow, 2, 5).result() == 32
        assert cluster.status.name == "running"
        with connect(ClusterSettings(kind="address", address=cluster.scheduler_address)) as c2:
            assert c2.submit(pow, 3, 2).result() == 9


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.address is not set"):
        connect(kind="address")
    with pytest.raises(ConfigError, match=r"unknown cluster setting\(s\) \['workers'\]"):
        connect(workers=3)
    with pytest.raises(ConfigError, match="invalid cluster settings"):
        connect(kind="local", min_workers=-1)
    with pytest.raises(ConfigError, match="image is not set"):
        connect(kind="kube")


def test_unreachable_scheduler_names_the_address() -> None:
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(ConfigError, match=r"tcp://127\.0\.0\.1:9"),
    ):
        connect(kind="address", address="tcp://127.0.0.1:9")

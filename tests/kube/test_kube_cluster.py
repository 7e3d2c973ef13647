"""connect(kind="kube"): the DaskCluster it would send, its errors, and (with a real
cluster, marker k8s) the round trip through the dask-kubernetes operator."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lazysky.cluster import connect, kube_cluster_spec
from lazysky.config import ClusterSettings
from lazysky.errors import ConfigError
from lazysky.kube import Resources, build_dask_cluster, parse_quantity_bytes

IMAGE = "ghcr.io/lazysky/lazysky:0.1.0"


def _settings(**fields: object) -> ClusterSettings:
    return ClusterSettings.model_validate({"kind": "kube", "image": IMAGE, **fields})


def test_spec_from_settings() -> None:
    cfg = _settings(name="nightly", namespace="survey", min_workers=3, max_workers=50,
                    worker_cpu="2", worker_memory="8Gi", worker_ephemeral_storage="40Gi",
                    env={"LAZYSKY_STORE_URL": "s3://x"},
                    secrets={"PGPASSWORD": "lazysky-db/password"})
    spec = kube_cluster_spec(cfg)
    assert spec["metadata"]["name"] == "nightly"
    assert spec["metadata"]["namespace"] == "survey"
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 3  # the autoscaler takes it from there
    c = worker["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "8Gi",
                                        "ephemeral-storage": "40Gi"}
    limit = int(c["args"][c["args"].index("--memory-limit") + 1])
    assert limit == int(0.85 * parse_quantity_bytes("8Gi"))  # memory_limit 'auto'
    env = {e["name"]: e for e in c["env"]}
    assert env["LAZYSKY_STORE_URL"]["value"] == "s3://x"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "lazysky-db"
    # the same builder the manifests use: identical for identical inputs
    assert spec == build_dask_cluster(
        name="nightly", namespace="survey", image=IMAGE, n_workers=3,
        worker_resources=Resources(
            cpu="2", memory="8Gi", ephemeral_storage="40Gi"),
        env={"LAZYSKY_STORE_URL": "s3://x"}, secrets={"PGPASSWORD": "lazysky-db/password"})


def test_explicit_memory_limit_from_settings() -> None:
    spec = kube_cluster_spec(_settings(worker_memory="4Gi", memory_limit="3GiB"))
    args = spec["spec"]["worker"]["spec"]["containers"][0]["args"]
    assert args[args.index("--memory-limit") + 1] == str(3 * 2**30)


@pytest.mark.parametrize(("fields", "message"), [
    ({"image": None}, "image is not set"),
    ({"image": "lazysky"}, "not pinned"),
    ({"worker_memory": "4Gi", "memory_limit": "4GiB"}, "memory_limit='4GiB'.*too large"),
    ({"worker_memory": "lots"}, "memory='lots' is not a Kubernetes quantity"),
    ({"name": "Nightly_Run"}, "not a valid Kubernetes name"),
    ({"env": {"DB_PASSWORD": "x"}}, "looks like a secret"),
])
def test_bad_settings_fail_before_anything_is_sent(fields: dict[str, object],
                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kube_cluster_spec(_settings(**fields))
    # connect() validates the spec before it builds a KubeCluster: no API call is made
    with pytest.raises(ConfigError, match=message):
        connect(_settings(**fields))


def test_scheduler_env_enables_the_api_the_autoscaler_polls() -> None:
    """The DaskCluster's scheduler env, read by dask's own config loader, serves
    /api/v1/adaptive_target on a real scheduler (what the operator's autoscaler polls)."""
    import json
    import urllib.request

    import dask
    from distributed import LocalCluster

    spec = kube_cluster_spec(_settings())
    container = spec["spec"]["scheduler"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert not [e for e in container["env"] if "valueFrom" in e]  # no credentials
    dask_env = {k: v for k, v in env.items() if k.startswith("DASK_DISTRIBUTED__")}
    assert dask_env
    # dask's own environment parser (what `dask scheduler` runs in the pod)
    routes = dask.config.collect_env(dask_env)["distributed"]["scheduler"]["http"]["routes"]
    assert "distributed.http.scheduler.api" in routes
    # ...which dask's defaults leave out: without the env the operator falls back to RPC
    assert "distributed.http.scheduler.api" not in dask.config.get(
        "distributed.scheduler.http.routes")
    assert "distributed.http.health" in routes
    with dask.config.set({"distributed.scheduler.http.routes": routes}), LocalCluster(
            n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        port = cluster.scheduler.http_server.port
        url = f"http://127.0.0.1:{port}/api/v1/adaptive_target"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert json.loads(reply.read()) == {"workers": 0}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
            assert reply.read() == b"ok"


def test_a_created_cluster_closes_with_its_client() -> None:
    """connect(kind="kube") hands the KubeCluster to a client that closes (deletes) it;
    checked with a real in-process cluster standing in for the KubeCluster."""
    from distributed import LocalCluster

    from lazysky.cluster import _owning_client_class

    cluster = LocalCluster(n_workers=1, processes=False, dashboard_address=":0")
    with _owning_client_class()(cluster, set_as_default=False) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        assert cluster.status.name == "running"
    assert cluster.status.name == "closed"


def test_max_below_min_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"max_workers=2 is below cluster\.min_workers=5"):
        connect(_settings(min_workers=5, max_workers=2))


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lazysky.config import load_settings

    monkeypatch.setenv("LAZYSKY_CLUSTER__KIND", "kube")
    monkeypatch.setenv("LAZYSKY_CLUSTER__ATTACH", "true")
    monkeypatch.setenv("LAZYSKY_CLUSTER__NAME", "lazysky")
    monkeypatch.setenv("LAZYSKY_CLUSTER__NAMESPACE", "survey")
    cfg = load_settings().cluster
    assert (cfg.kind, cfg.attach, cfg.name, cfg.namespace) == ("kube", True, "lazysky",
                                                               "survey")


def _cluster_reachable() -> bool:
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig or not all(Path(p).exists() for p in kubeconfig.split(os.pathsep)):
        return False
    try:
        import shutil

        kubectl = shutil.which("kubectl")
        if kubectl is None:
            return False
        proc = subprocess.run([kubectl, "get", "crd", "daskclusters.kubernetes.dask.org"],
                              capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


needs_cluster = pytest.mark.skipif(
    not _cluster_reachable(),
    reason="needs KUBECONFIG pointing at a cluster with the dask-kubernetes operator")


@pytest.mark.k8s
@needs_cluster
def test_create_compute_and_delete_on_a_real_cluster() -> None:
    image = os.environ.get("LAZYSKY_TEST_IMAGE", IMAGE)
    cfg = _settings(image=image, name="lazysky-test", min_workers=1, max_workers=2,
                    namespace=os.environ.get("LAZYSKY_TEST_NAMESPACE"),
                    worker_memory="1Gi", worker_ephemeral_storage="2Gi")
    with connect(cfg) as client:
        client.wait_for_workers(1, timeout=300)
        assert client.submit(sum, [1, 2, 3]).result(timeout=120) == 6
        info = client.scheduler_info()
        assert all(w["nthreads"] == 1 for w in info["workers"].values())
    ns = ["-n", cfg.namespace] if cfg.namespace else []
    proc = subprocess.run(["kubectl", "get", "daskcluster", "lazysky-test", *ns],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0  # closing the client deleted the DaskCluster


@pytest.mark.k8s
@needs_cluster
def test_attach_by_name_leaves_the_cluster_running() -> None:
    image = os.environ.get("LAZYSKY_TEST_IMAGE", IMAGE)
    owner = connect(_settings(image=image, name="lazysky-attach", min_workers=1,
                              worker_memory="1Gi", worker_ephemeral_storage="2Gi"))
    try:
        with connect(_settings(name="lazysky-attach", attach=True)) as client:
            assert client.submit(lambda: 42).result(timeout=120) == 42
        proc = subprocess.run(["kubectl", "get", "daskcluster", "lazysky-attach"],
                              capture_output=True, check=False)
        assert proc.returncode == 0
    finally:
        owner.close()

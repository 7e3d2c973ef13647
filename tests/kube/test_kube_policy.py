"""Our own policy over every pod template of every overlay, and over the whole stack."""

from __future__ import annotations

import re
from typing import Any

import pytest
from kube_testing import pod_templates

from lazysky.kube import RUN_AS_USER, check_image, parse_quantity_bytes

SECRETISH = re.compile(r"password|secret|token|private|credential|access_key", re.IGNORECASE)


def _pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    pods = [p for o in objects for p in pod_templates(o)]
    # scheduler, worker, catalog-db, bootstrap, scs, batch, gc
    assert len(pods) == 7, [w for w, _, _ in pods]
    return pods


def test_pod_security_restricted(objects: list[dict[str, Any]]) -> None:
    for where, spec, _ in _pods(objects):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, where
        assert psc["runAsUser"] >= 10000, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["runAsUser"] == RUN_AS_USER, where
            assert not sc.get("privileged", False), where
        assert not spec.get("hostNetwork"), where
        assert not spec.get("hostPID"), where
        assert all("hostPath" not in v for v in spec.get("volumes", [])), where


def test_writable_places_are_empty_dirs(objects: list[dict[str, Any]]) -> None:
    for where, spec, _ in _pods(objects):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, where
            assert "emptyDir" in volumes[mounts["/tmp"]], where
            home = {e["name"]: e.get("value") for e in c["env"]}["HOME"]
            assert home == "/tmp", where  # astropy/matplotlib write under HOME
            if "/dask" in where or "worker" in where or "scheduler" in where:
                assert "/scratch" in mounts, where
                assert "emptyDir" in volumes[mounts["/scratch"]], where
                assert "--local-directory" not in c["args"] or c["args"][
                    c["args"].index("--local-directory") + 1] == "/scratch", where


def test_resources_requests_and_limits(objects: list[dict[str, Any]]) -> None:
    for where, spec, _ in _pods(objects):
        for c in spec["containers"]:
            res = c["resources"]
            for part in ("requests", "limits"):
                assert set(res[part]) == {"cpu", "memory", "ephemeral-storage"}, where
            assert res["requests"]["memory"] == res["limits"]["memory"], where
        # the disk-backed emptyDirs fit in the pod's ephemeral-storage limit together
        disk = sum(parse_quantity_bytes(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"]
                   if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
        limit = sum(parse_quantity_bytes(c["resources"]["limits"]["ephemeral-storage"])
                    for c in spec["containers"])
        assert 0 < disk <= limit, where


def test_dask_spill_fits_in_scratch(objects: list[dict[str, Any]]) -> None:
    import dask

    dask_cluster = next(o for o in objects if o["kind"] == "DaskCluster")
    spec = dask_cluster["spec"]["worker"]["spec"]
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"] if "value" in e}
    parsed = dask.config.collect_env({k: v for k, v in env.items() if k.startswith("DASK_")})
    max_spill = int(dask.config.get("distributed.worker.memory.max-spill", config=parsed))
    scratch = next(v for v in spec["volumes"] if v["name"] == "scratch")
    assert 0.5 * parse_quantity_bytes(scratch["emptyDir"]["sizeLimit"]) < max_spill
    assert max_spill < parse_quantity_bytes(scratch["emptyDir"]["sizeLimit"])


def test_dask_worker_memory_limit_below_container_limit(objects: list[dict[str, Any]]) -> None:
    dask = next(o for o in objects if o["kind"] == "DaskCluster")
    c = dask["spec"]["worker"]["spec"]["containers"][0]
    dask_limit = int(c["args"][c["args"].index("--memory-limit") + 1])
    container = parse_quantity_bytes(c["resources"]["limits"]["memory"])
    assert dask_limit <= 0.9 * container
    assert c["args"][c["args"].index("--nthreads") + 1] == "1"


def test_probes(objects: list[dict[str, Any]]) -> None:
    dask = next(o for o in objects if o["kind"] == "DaskCluster")
    sched = dask["spec"]["scheduler"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert sched[probe]["httpGet"] == {"port": "http-dashboard", "path": "/health"}
    ports = {p["name"]: p["containerPort"] for p in sched["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    # long-running servers have both probes; jobs need none
    for where, spec, _ in _pods(objects):
        if where.split("/")[0] in {"Deployment", "StatefulSet"} or "scheduler" in where:
            c = spec["containers"][0]
            assert "readinessProbe" in c, where
            assert "livenessProbe" in c, where


def test_service_account_tokens_only_where_the_api_is_used(
        objects: list[dict[str, Any]]) -> None:
    for where, spec, _ in _pods(objects):
        if where == "CronJob/lazysky-batch":  # the gc CronJob needs no API: no token
            assert spec["automountServiceAccountToken"] is True
            assert spec["serviceAccountName"] == "lazysky-submitter"
        else:
            assert spec["automountServiceAccountToken"] is False, where
            assert "serviceAccountName" not in spec, where


def test_images_pinned(objects: list[dict[str, Any]]) -> None:
    for where, spec, _ in _pods(objects):
        for c in spec["containers"]:
            assert check_image(c["image"]) == c["image"], where
            assert not c["image"].endswith(":latest"), where


def test_no_secret_values_anywhere(objects: list[dict[str, Any]]) -> None:
    assert not [o for o in objects if o["kind"] == "Secret"]
    for o in objects:
        if o["kind"] == "ConfigMap":
            for key, value in o["data"].items():
                assert not SECRETISH.search(key), key
                assert not re.search(r"://[^/@:]*:[^/@]+@", value), key
    for where, spec, _ in _pods(objects):
        for c in spec["containers"]:
            for e in c["env"]:
                if SECRETISH.search(e["name"]):
                    assert "value" not in e, (where, e["name"])
                    assert "secretKeyRef" in e["valueFrom"], (where, e["name"])


def test_scs_uses_the_read_only_role(objects: list[dict[str, Any]]) -> None:
    scs = next(o for o in objects if o["kind"] == "Deployment")
    env = {e["name"]: e for e in scs["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LAZYSKY_CATALOG_DSN"]["value"].startswith("postgresql://lazysky_reader@")
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "reader-password"


def test_submitter_role_is_read_only_and_namespaced(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    assert "ClusterRole" not in kinds
    assert "ClusterRoleBinding" not in kinds
    role = next(o for o in objects if o["kind"] == "Role")
    for rule in role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
        assert "secrets" not in rule["resources"]
        assert "*" not in rule["resources"]


def _policy(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(o["spec"] for o in objects
                if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == name)


def _ports(rules: list[dict[str, Any]]) -> set[int]:
    return {p["port"] for r in rules for p in r.get("ports", [])}


def test_network_policies(objects: list[dict[str, Any]]) -> None:
    deny = _policy(objects, "default-deny-all")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "ingress": [],
                    "egress": []}
    assert _ports(_policy(objects, "allow-dns")["egress"]) == {53}
    assert _ports(_policy(objects, "dask-scheduler")["ingress"]) == {8786, 8787}
    assert _ports(_policy(objects, "dask-workers")["ingress"]) == {8788, 8789, 8790}
    assert _ports(_policy(objects, "catalog-db")["ingress"]) == {5432}
    assert _ports(_policy(objects, "dask-egress")["egress"]) == {
        8786, 8788, 8789, 8790, 5432, 443}
    # every pod port is allowed in by some policy selecting that pod
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]
    for where, spec, labels in _pods(objects):
        if "DaskCluster" in where:
            part = where.rsplit("/", 1)[-1]
            labels = {**labels, "dask.org/cluster-name": "lazysky",
                      "dask.org/component": part}
        allowed = {p["port"] for pol in policies
                   if all(labels.get(k) == v for k, v in
                          pol["podSelector"].get("matchLabels", {}).items())
                   for r in pol.get("ingress", []) for p in r.get("ports", [])}
        for c in spec["containers"]:
            for port in c.get("ports", []):
                assert port["containerPort"] in allowed, (where, port)


@pytest.mark.parametrize("overlay", ["prod"])
def test_worker_and_scheduler_share_one_image(objects: list[dict[str, Any]]) -> None:
    images = {spec["containers"][0]["image"] for where, spec, _ in _pods(objects)
              if "catalog-db" not in where}
    assert len(images) == 1  # scheduler, workers, batch, SCS, bootstrap: one image

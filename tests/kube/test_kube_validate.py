"""The rendered manifests pass the tools: kubernetes-validate --strict, the operator's CRD
schemas (jsonschema), checkov, yamllint, and kustomize builds the same objects we do."""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_testing import KUBE_DIR, as_pods, pod_templates, tool

from lazysky.kube import build_manifests, dump_yaml

K8S_VERSION = "1.30.0"

#: checkov checks we do not meet, each with its reason (docs/kubernetes.md repeats them)
CHECKOV_SKIPS = {
    "CKV_K8S_43": "Image should use digest: the manifests name the release tag (pinned, never "
                  "latest); the digest exists only once the image is built, and an overlay "
                  "pins it with kustomize `images: digest:` (docs/kubernetes.md)",
    "CKV_K8S_35": "Prefer secrets as files: libpq (PGPASSWORD) and boto/s3fs "
                  "(AWS_ACCESS_KEY_ID) read credentials from the environment; the values "
                  "still come only from Secrets (secretKeyRef), never from the manifests",
}
#: per-object exceptions: (check, kind/name) → reason
CHECKOV_OBJECT_SKIPS = {
    ("CKV_K8S_38", "CronJob/lazysky-batch"): "the batch submitter attaches to the DaskCluster "
        "through the Kubernetes API (KubeCluster.from_name), so it needs its token; its Role "
        "is read-only and namespaced",
}


def test_kubernetes_validate_strict(objects: list[dict[str, Any]]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    core = [o for o in objects if not o["apiVersion"].startswith("kubernetes.dask.org")]
    assert len(core) == len(objects) - 2
    for obj in core + as_pods(objects):  # the operator's pod templates as Pods too
        kv.validate(obj, K8S_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_broken_manifest() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    obj = next(o for o in build_manifests() if o["kind"] == "CronJob")
    obj["spec"]["concurrencyPolicy_typo"] = "Forbid"
    with pytest.raises(Exception, match="concurrencyPolicy_typo"):
        kv.validate(obj, K8S_VERSION, strict=True)


@cache
def _crd_validator(kind: str) -> Any:
    """A jsonschema validator from the CRD shipped in the dask-kubernetes wheel; the
    PodSpec/ServiceSpec it references come from kubernetes-validate's strict schemas."""
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    pytest.importorskip("dask_kubernetes")
    kv = pytest.importorskip("kubernetes_validate")
    import dask_kubernetes.operator as op

    crd_dir = Path(op.__file__).parent / "customresources"
    crd = yaml.safe_load((crd_dir / f"{kind.lower()}.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    defs_file = (Path(kv.__file__).parent / "kubernetes-json-schema"
                 / f"v{K8S_VERSION.rsplit('.', 1)[0]}.0-local-strict" / "_definitions.json")
    k8s_defs = json.loads(defs_file.read_text().replace(
        "/api/_definitions.json#/$defs/", "#/$defs/"))["$defs"]

    def retrieve(uri: str) -> Resource:
        if uri.startswith("python://k8s_crd_resolver/"):
            # the CRD points at #/definitions/…, the definitions point at #/$defs/…
            return DRAFT202012.create_resource({"definitions": k8s_defs, "$defs": k8s_defs})
        if uri.startswith("python://dask_kubernetes/"):
            path = Path(op.__file__).parents[1] / uri.removeprefix(
                "python://dask_kubernetes/")
            return DRAFT202012.create_resource(yaml.safe_load(path.read_text()))
        raise LookupError(uri)  # pragma: no cover

    registry: Registry = Registry(retrieve=retrieve)  # type: ignore[call-arg]
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("kind", ["DaskCluster", "DaskAutoscaler"])
def test_dask_objects_match_the_operator_crds(objects: list[dict[str, Any]],
                                              kind: str) -> None:
    validator = _crd_validator(kind)
    obj = next(o for o in objects if o["kind"] == kind)
    errors = [e.message for e in validator.iter_errors(obj)]
    assert not errors, errors


def test_crd_validation_catches_errors() -> None:
    obj = next(o for o in build_manifests() if o["kind"] == "DaskCluster")
    obj["spec"]["worker"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = "root"
    errors = list(_crd_validator("DaskCluster").iter_errors(obj))
    assert errors
    assert "'root'" in errors[0].message
    bad = next(o for o in build_manifests() if o["kind"] == "DaskAutoscaler")
    del bad["spec"]["maximum"]
    assert list(_crd_validator("DaskAutoscaler").iter_errors(bad))


def test_yamllint_clean() -> None:
    linter = pytest.importorskip("yamllint.linter")
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(KUBE_DIR / ".yamllint.yaml"))
    files = sorted(KUBE_DIR.rglob("*.yaml"))
    assert len(files) > 10
    problems = [f"{f}:{p.line}: {p.message}" for f in files
                for p in linter.run(f.read_text(), conf) if p.level == "error"
                or p.level == "warning"]
    assert not problems, problems


def _checkov(directory: Path) -> list[dict[str, Any]]:
    checkov = tool("checkov")
    proc = subprocess.run(
        [checkov, "--framework", "kubernetes", "--skip-download", "--quiet", "--compact",
         "--output", "json", "-d", str(directory)],
        capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    return [f for r in reports for f in r.get("results", {}).get("failed_checks", [])]


def test_checkov_fails_nothing_outside_the_skip_list(tmp_path: Path) -> None:
    objects = build_manifests(overlay="prod")
    (tmp_path / "stack.yaml").write_text(dump_yaml(objects))
    (tmp_path / "dask-pods.yaml").write_text(dump_yaml(as_pods(objects)))
    failed = _checkov(tmp_path)
    unexpected = []
    for f in failed:
        kind_name = f["resource"].split(".")[0] + "/" + f["resource"].split(".")[-1]
        if f["check_id"] in CHECKOV_SKIPS or (f["check_id"], kind_name) in \
                CHECKOV_OBJECT_SKIPS:
            continue
        unexpected.append((f["check_id"], f["check_name"], f["resource"]))
    assert not unexpected, unexpected
    assert failed, "checkov reported nothing at all: did it scan the files?"


def _objects_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_kustomize_builds_what_build_manifests_does(overlay: str) -> None:
    kubectl = tool("kubectl")
    proc = subprocess.run([kubectl, "kustomize", str(KUBE_DIR / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120, check=True)
    built = _objects_key([o for o in yaml.safe_load_all(proc.stdout) if o])
    ours = _objects_key(build_manifests(overlay=overlay))
    assert built.keys() == ours.keys()
    for key, obj in ours.items():
        assert built[key] == obj, key


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_kubernetes_validate_cli_on_what_kustomize_builds(overlay: str,
                                                          tmp_path: Path) -> None:
    """The command line, on exactly what `kubectl apply -k` would send."""
    kubectl, validate = tool("kubectl"), tool("kubernetes-validate")
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(subprocess.run(
        [kubectl, "kustomize", str(KUBE_DIR / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=True).stdout)
    proc = subprocess.run([validate, "--strict", "-k", K8S_VERSION, str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = proc.stdout.count(" passed for resource ")
    assert passed == len(build_manifests(overlay=overlay)) - 2  # all but the two CRDs


def test_a_site_overlay_pins_every_lazysky_image_by_digest(tmp_path: Path) -> None:
    """docs/kubernetes.md's own overlay: kustomize `images:` rewrites every container of the
    lazysky image, the DaskCluster's scheduler and workers included (the CKV_K8S_43 skip's
    reason), and a ConfigMap patch sets the store."""
    import shutil

    kubectl = tool("kubectl")
    shutil.copytree(KUBE_DIR, tmp_path / "kube")
    site = tmp_path / "site"
    site.mkdir()
    digest = "sha256:" + "ab" * 32
    (site / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../kube/overlays/prod"],
        "patches": [{"patch": yaml.safe_dump({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "lazysky-settings", "namespace": "lazysky"},
            "data": {"LAZYSKY_STORE_URL": "s3://my-survey"}})}],
        "images": [{"name": "ghcr.io/lazysky/lazysky", "newName": "registry.example.org/lazysky",
                    "digest": digest}],
    }))
    proc = subprocess.run([kubectl, "kustomize", str(site)], capture_output=True, text=True,
                          timeout=120, check=True)
    objs = [o for o in yaml.safe_load_all(proc.stdout) if o]
    images = [c["image"] for o in objs for _, spec, _ in pod_templates(o)
              for c in spec["containers"]]
    lazysky = [i for i in images if "catalog-db" not in i]
    assert len(lazysky) == 6  # scheduler, worker, bootstrap Job, SCS, batch and gc CronJobs
    assert set(lazysky) == {f"registry.example.org/lazysky@{digest}"}
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    assert cm["data"]["LAZYSKY_STORE_URL"] == "s3://my-survey"

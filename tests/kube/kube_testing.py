"""Helpers for tests/kube (importable as ``kube_testing``: pytest puts this directory on
sys.path): every pod template of an object, the operator's pods as Pods, tool paths."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
KUBE_DIR = ROOT / "kube"


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, pod labels) of every pod template an object holds."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    spec = obj.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "Job"}:
        tpl = spec["template"]
        yield f"{kind}/{name}", tpl["spec"], tpl.get("metadata", {}).get("labels", {})
    elif kind == "CronJob":
        tpl = spec["jobTemplate"]["spec"]["template"]
        yield f"{kind}/{name}", tpl["spec"], tpl.get("metadata", {}).get("labels", {})
    elif kind == "DaskCluster":
        for part in ("scheduler", "worker"):
            tpl = spec[part]
            yield (f"{kind}/{name}/{part}", tpl["spec"],
                   tpl.get("metadata", {}).get("labels", {}))


def as_pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DaskCluster's scheduler and worker templates as bare Pods (for tools that
    do not know the operator's CRDs)."""
    pods = []
    for obj in objects:
        if obj["kind"] != "DaskCluster":
            continue
        for where, spec, labels in pod_templates(obj):
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": where.split("/")[-1], "namespace": obj["metadata"]["namespace"],
                "labels": labels}, "spec": spec})
    return pods


def tool(name: str) -> str:
    """Path of a command-line tool: the venv's first, then .venv-tools (checkov), PATH."""
    for candidate in (Path(sys.executable).parent / name, ROOT / ".venv-tools" / "bin" / name,
                      Path(os.environ.get("LAZYSKY_TOOLS_VENV", ROOT / ".venv-tools"))
                      / "bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (bash bootstrap.sh test installs it)")
    return found

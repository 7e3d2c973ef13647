"""The Dockerfile, linted (no Docker engine here): pinned bases, non-root, the README's
extras, no remote ADD, multi-stage; and the .dockerignore keeps the context small."""

from __future__ import annotations

import re
import tomllib

from kube_testing import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for op, rest in _instructions():
        if op == "FROM":
            stages.append([])
        stages[-1].append((op, rest))
    return stages


def test_bases_are_pinned() -> None:
    names = set()
    for stage in _stages():
        ref = stage[0][1].split()[0]
        if ref in names:  # FROM an earlier stage
            continue
        if " AS " in stage[0][1].upper():
            names.add(stage[0][1].split()[-1])
        image, _, digest = ref.partition("@")
        tag = image.rpartition(":")[2] if ":" in image else ""
        assert digest.startswith("sha256:") or re.match(r"\d+\.\d+(\.\d+)?-", tag), ref


def test_multi_stage_and_non_root() -> None:
    stages = _stages()
    assert len(stages) >= 3
    assert any(op == "COPY" and rest.startswith("--from=build") for op, rest in stages[1])
    for stage in stages[1:3]:  # runtime and catalog-db run as uid 10001, never root
        users = [rest for op, rest in stage if op == "USER"]
        assert users, stage[0]
        uid = users[-1].split(":")[0]
        assert uid.isdigit()
        assert int(uid) >= 10000
    assert _stages()[-1][0][1] == "runtime"  # the default target is the lazysky image


def test_installs_the_readme_extras() -> None:
    installs = [rest for op, rest in _instructions() if op == "RUN" and "pip install" in rest]
    assert installs == ['/opt/lazysky/bin/pip install ".[all]"']
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "all" in extras
    readme = (ROOT / "README.md").read_text()
    assert '.[all,test]' in readme  # development install = the image's extras + test


def test_no_remote_add_and_no_secrets() -> None:
    for op, rest in _instructions():
        assert op != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"
        if op in {"ENV", "ARG"}:
            assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", rest, re.IGNORECASE)


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "benchmarks"} <= ignored
    copied = {rest.split()[0] for op, rest in _instructions()
              if op == "COPY" and not rest.startswith("--from")}
    assert copied == {"pyproject.toml", "src"}
    assert "README.md" not in ignored  # the package metadata reads it
    assert "src" not in ignored

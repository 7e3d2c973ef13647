"""kube/ is what the build_* functions render (no drift), and the CLI prints/writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kube_testing import KUBE_DIR

from lazysky.cli import main
from lazysky.kube import build_manifests, render_tree


def test_committed_kube_dir_matches_the_build_functions(tmp_path: Path) -> None:
    written = render_tree(tmp_path)
    fresh = {p.relative_to(tmp_path) for p in written}
    committed = {p.relative_to(KUBE_DIR) for p in KUBE_DIR.rglob("*.yaml")
                 if p.name != ".yamllint.yaml"}
    assert committed == fresh, "run `lazysky kube render --out kube` and commit"
    for rel in sorted(fresh):
        assert (KUBE_DIR / rel).read_text() == (tmp_path / rel).read_text(), (
            f"kube/{rel} drifted from lazysky.kube: run `lazysky kube render --out kube`")


def test_cli_prints_an_overlay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kube", "render", "--overlay", "prod"]) == 0
    printed = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert printed == build_manifests(overlay="prod")


def test_cli_options_reach_the_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kube", "render", "--overlay", "dev", "--image", "reg.example/lazysky:2.0",
                 "--namespace", "survey"]) == 0
    printed = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    dask = next(d for d in printed if d["kind"] == "DaskCluster")
    assert dask["metadata"]["namespace"] == "survey"
    image = dask["spec"]["scheduler"]["spec"]["containers"][0]["image"]
    assert image == "reg.example/lazysky:2.0"


def test_cli_writes_the_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kube", "render", "--out", str(tmp_path)]) == 0
    listed = capsys.readouterr().out.split()
    assert str(tmp_path / "overlays" / "prod" / "kustomization.yaml") in listed
    for path in listed:
        rel = Path(path).relative_to(tmp_path)
        assert Path(path).read_text() == (KUBE_DIR / rel).read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["kube", "render", "--overlay", "staging"], "unknown overlay 'staging'; expected one of"),
    (["kube", "render", "--image", "lazysky:latest"], "not pinned"),
    (["kube", "render", "--store-url", "s3://u:pw@bucket"], "URL with a password"),
])
def test_cli_bad_input(argv: list[str], message: str, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""
    if "--overlay" not in argv:  # --out writes every overlay; a bad base writes nothing
        assert main([*argv, "--out", str(tmp_path / "out")]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()

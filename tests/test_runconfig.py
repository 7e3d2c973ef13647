"""The run configuration: YAML in, a validated model out, clear errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazysky.errors import ConfigError
from lazysky.runconfig import RunConfig, load_run_config

YAML = """
type: test
ingest: [survey/raw, survey/calib]
field: {name: deep1, filter: r, tile_px: 256}
reference: ["deep1-r-e000-*"]
science: ["deep1-r-e00[1-3]-*"]
steps:
  stack: {method: median}
  detect: {threshold: 4.0}
"""


def test_yaml_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(YAML)
    cfg = load_run_config(path)
    assert cfg.type == "test"
    assert cfg.field.tile_px == 256
    assert cfg.steps.stack.method == "median"
    assert cfg.steps.stack.sigma == 3.0  # defaults fill what the file leaves out
    assert cfg.steps.detect.threshold == 4.0
    assert cfg.calibrations.bias is None
    assert RunConfig.model_validate(cfg.model_dump()) == cfg  # serialisable, recorded as is


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("reference: []", r"reference: List should have at least 1 item"),
        ("science: [a]", r"reference: Field required"),
        ("reference: [a]\nsteps: {stack: {method: mean}}", r"steps\.stack\.method"),
        ("reference: [a]\nfeild: {}", r"feild: Extra inputs are not permitted"),
        ("reference: [a]\nrun_id: exp-2026-xyz", r"run_id"),
        ("- just\n- a list", r"must be a mapping"),
        ("reference: [a\n", r"not valid YAML"),
    ],
)
def test_bad_configuration_names_file_and_field(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_run_config(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the run configuration"):
        load_run_config(tmp_path / "nope.yaml")

"""Workflow versions and canaries (issue 13) on a real catalog, and one real canary batch.

Each test module gets its own catalog database on the embedded server (activations are
global per processing type: they must not leak into the other modules' runs).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import yaml
from test_batch import _drop, _scratch

from lazysky import batch, workflows
from lazysky.catalog import Catalog, open_catalog
from lazysky.catalog.schema import (
    batch_submissions,
    canary_runs,
    workflow_activations,
    workflow_versions,
)
from lazysky.errors import ConfigError, ParameterError
from lazysky.runconfig import RunConfig, StepParameters

pytestmark = [pytest.mark.postgres]

BASE = {"detect": {"threshold": 5.0, "diff_threshold": 5.0}}
CAND = {"detect": {"threshold": 5.0, "diff_threshold": 4.0}}
CONFIG = {"type": "prod", "reference": ["deep1-r-e000-*"], "field": {"tile_px": 128}}


@pytest.fixture(scope="module")
def wfcat(catalog: Catalog) -> Iterator[Catalog]:
    """A fresh catalog database (every migration applied) for this module."""
    name = f"wf_{uuid.uuid4().hex[:10]}"
    admin, dsn = _scratch(catalog, name)
    try:
        yield open_catalog(dsn=dsn)
    finally:
        _drop(admin, name, dsn)


def _count(cat: Catalog, table: sa.Table) -> int:
    with cat.engine().connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def _steps(cfg: RunConfig) -> dict[str, Any]:
    return cfg.steps.model_dump(mode="json")


def _expanded(steps: dict[str, Any]) -> dict[str, Any]:
    return StepParameters.model_validate(steps).model_dump(mode="json")


# --- canary assignment (pure) ----------------------------------------------------------
def test_canary_assignment_is_deterministic_and_monotone_in_the_share() -> None:
    rng = np.random.default_rng(13)
    ids = [f"f{rng.integers(1000)}-{b}-e{rng.integers(10**6):06d}-d{rng.integers(64):02d}"
           for b in "gri" for _ in range(600)]
    shares = np.sort(np.concatenate([[0.0, 100.0], rng.uniform(0, 100, 25)]))
    taken_before: set[str] = set()
    for share in shares:
        taken = {e for e in ids if workflows.in_canary(e, share)}
        # the same exposure always goes the same way (a second pass, fresh hashing)
        assert taken == {e for e in ids if workflows.in_canary(e, float(share))}
        # raising the share only adds exposures
        assert taken_before <= taken, share
        taken_before = taken
        # and takes about that share (binomial: 5 sigma)
        n = len(set(ids))
        sigma = np.sqrt(n * share / 100 * (1 - share / 100))
        assert abs(len(taken) - n * share / 100) <= 5 * sigma + 1
        # the two sides of a split cover every exposure exactly once
        cand = {e for e in ids if workflows.in_share(e, (0.0, share))}
        rest = {e for e in ids if workflows.in_share(e, (share, 100.0))}
        assert cand == taken
        assert not cand & rest
        assert cand | rest == set(ids)
    assert taken_before == set(ids)
    with pytest.raises(ParameterError, match="between 0 and 100"):
        workflows.in_canary("x", 100.5)
    with pytest.raises(ParameterError, match="between 0 and 100"):
        workflows.in_canary("x", -1)
    rid = "prod-20261124-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f"
    assert workflows.canary_run_id(rid) == workflows.canary_run_id(rid) != rid
    assert workflows.canary_run_id(rid).startswith("val-20261124-")


# --- versions ----------------------------------------------------------------------------
def test_register_hashes_validates_and_never_changes_a_version(
        wfcat: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({"steps": BASE, "description": "the nightly"}))
    base = workflows.register(path, name="reg-base", by="ops", catalog=wfcat)
    assert base.steps == _expanded(BASE)  # validated, defaults filled in
    assert base.description == "the nightly"
    assert base.registered_by == "ops"
    assert base.sha256 == workflows.content_hash(_expanded(BASE), base.software_version)
    # the same content under another name is registered, and visibly the same
    twin = workflows.register(_expanded(BASE), name="reg-twin", catalog=wfcat)
    assert twin.sha256 == base.sha256
    assert twin.same_content == ("reg-base",)
    assert workflows.get_version("reg-base", catalog=wfcat).same_content == ("reg-twin",)
    # registering the same name and content again changes nothing
    again = workflows.register(BASE, name="reg-base", catalog=wfcat)
    assert again.registered_at == base.registered_at
    n = _count(wfcat, workflow_versions)
    # other content under a registered name: refused, the version unchanged
    with pytest.raises(ParameterError, match="immutable: register the new parameters"):
        workflows.register(CAND, name="reg-base", catalog=wfcat)
    # invalid configurations: refused, nothing registered
    bad = tmp_path / "bad.yaml"
    for text, match in [
        ("steps: {detect: {threshold: -1}}", r"bad.yaml: steps\.detect\.threshold"),
        ("stak: {method: median}", r"bad.yaml: stak: Extra inputs"),
        ("steps: {stack: {method: mean}}", r"steps\.stack\.method"),
        ("steps: [1, 2", "not valid YAML"),
        ("- 1", "must be a mapping"),
        ("steps: {}\nreference: []", r"reference: List should have at least 1"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            workflows.register(bad, name="reg-bad", catalog=wfcat)
    with pytest.raises(ConfigError, match="cannot read"):
        workflows.register(tmp_path / "missing.yaml", name="reg-bad", catalog=wfcat)
    with pytest.raises(ParameterError, match="name 'bad name' is not allowed"):
        workflows.register(BASE, name="bad name", catalog=wfcat)
    assert _count(wfcat, workflow_versions) == n
    # the database refuses changes from any client, too
    for stmt in ("UPDATE workflow_versions SET steps = '{}' WHERE name = 'reg-base'",
                 "DELETE FROM workflow_versions WHERE name = 'reg-twin'"):
        with pytest.raises(sa.exc.IntegrityError, match="append-only"), \
                wfcat.engine().begin() as conn:
            conn.execute(sa.text(stmt))
    assert workflows.get_version("reg-base", catalog=wfcat).steps == _expanded(BASE)
    assert workflows.compare_versions("reg-base", "reg-twin", catalog=wfcat) == {}


def test_promote_and_rollback_change_what_the_next_batch_runs(wfcat: Catalog) -> None:
    workflows.register(BASE, name="pr-base", catalog=wfcat)
    workflows.register(CAND, name="pr-cand", catalog=wfcat)
    assert workflows.compare_versions("pr-base", "pr-cand", catalog=wfcat) == {
        "detect.diff_threshold": (5.0, 4.0)}
    workflows.activate("pr-base", run_type="exp", reason="first version", by="ops",
                       catalog=wfcat)
    sub = batch.submit({**CONFIG, "type": "exp", "canary": {"version": "pr-cand",
                                                            "share": 10}},
                       at="2099-01-01T00:00", catalog=wfcat)  # never due here
    assert "steps" not in sub.config  # resolved when it runs, not when it was queued

    def next_batch() -> list[RunConfig]:
        """What run-due runs for that submission now (what batch._execute calls)."""
        cfg = RunConfig.model_validate(
            {**batch.get_submission(sub.submission_id, catalog=wfcat).config,
             "run_id": "exp-20261124-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f"})
        return workflows.plan_runs(cfg, catalog=wfcat)

    main, cand = next_batch()
    assert (main.workflow, _steps(main)) == ("pr-base", _expanded(BASE))
    assert (cand.workflow, _steps(cand)) == ("pr-cand", _expanded(CAND))
    assert (main.science_share, cand.science_share) == ((10.0, 100.0), (0.0, 10.0))
    assert cand.type == "val"
    assert cand.run_id == workflows.canary_run_id(str(main.run_id))
    assert "[workflow pr-base]" in main.description  # what lazysky runs show prints
    assert main.canary is None
    assert cand.canary is None
    # promoting the candidate: the next batch runs it, once (no canary of itself)
    p = workflows.promote("pr-cand", run_type="exp", reason="canary looks good",
                          by="alice", catalog=wfcat)
    assert (p.action, p.version, p.previous, p.by) == ("promote", "pr-cand", "pr-base",
                                                       "alice")
    (only,) = next_batch()
    assert (only.workflow, _steps(only), only.science_share) == (
        "pr-cand", _expanded(CAND), None)
    # rolling back restores the previous version, and the canary beside it
    r = workflows.rollback(run_type="exp", reason="diff false positives up", by="bob",
                           catalog=wfcat)
    assert (r.action, r.version, r.previous, r.undoes) == (
        "rollback", "pr-base", "pr-cand", p.activation_id)
    main, cand = next_batch()
    assert (main.workflow, cand.workflow) == ("pr-base", "pr-cand")
    assert workflows.active_version("exp", catalog=wfcat) == "pr-base"
    hist = workflows.history(run_type="exp", catalog=wfcat)
    assert [(h.action, h.version, h.by, h.reason) for h in hist] == [
        ("activate", "pr-base", "ops", "first version"),
        ("promote", "pr-cand", "alice", "canary looks good"),
        ("rollback", "pr-base", "bob", "diff false positives up")]
    # other types are untouched; explicit steps and a named version are what they say
    assert workflows.active_version("prod", catalog=wfcat) is None
    explicit = RunConfig.model_validate({**CONFIG, "type": "exp", "steps": CAND})
    assert _steps(workflows.resolve_run_config(explicit, catalog=wfcat)) == _expanded(CAND)
    named = RunConfig.model_validate({**CONFIG, "type": "exp", "workflow": "pr-cand"})
    assert _steps(workflows.resolve_run_config(named, catalog=wfcat)) == _expanded(CAND)
    # a resolved configuration round-trips (what a run records, what a resume reloads)
    again = RunConfig.model_validate(main.model_dump(mode="json"))
    assert _steps(workflows.resolve_run_config(again, catalog=wfcat)) == _expanded(BASE)
    # a run that started (registered) keeps its version when resumed after a promotion;
    # a new run takes the promoted one
    from lazysky.catalog import register_run
    from lazysky.runs import Run

    register_run(Run(str(main.run_id), config=main.model_dump(mode="json",
                                                              exclude={"run_id"})),
                 catalog=wfcat)
    workflows.promote("pr-cand", run_type="exp", reason="second try", catalog=wfcat)
    resumed, _ = next_batch()
    assert (resumed.run_id, resumed.workflow) == (main.run_id, "pr-base")
    fresh = workflows.plan_runs(RunConfig.model_validate(
        batch.get_submission(sub.submission_id, catalog=wfcat).config), catalog=wfcat)
    assert [(c.workflow, c.type) for c in fresh] == [("pr-cand", "exp")]


def test_bad_input_is_refused_and_changes_nothing(wfcat: Catalog) -> None:
    workflows.register(BASE, name="bad-base", catalog=wfcat)
    workflows.activate("bad-base", run_type="repr", reason="first", catalog=wfcat)
    acts, subs = _count(wfcat, workflow_activations), _count(wfcat, batch_submissions)
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: workflows.activate("nope", run_type="repr", reason="x", catalog=wfcat),
         ParameterError, "unknown workflow version 'nope'; registered: .*bad-base"),
        (lambda: workflows.promote("nope", run_type="repr", reason="x", catalog=wfcat),
         ParameterError, "unknown workflow version"),
        (lambda: workflows.activate("bad-base", run_type="prd", reason="x", catalog=wfcat),
         ParameterError, "type must be one of prod, exp, test, val, repr"),
        (lambda: workflows.activate("bad-base", run_type="repr", reason="x", catalog=wfcat),
         ParameterError, "already active for repr"),
        (lambda: workflows.activate("bad-base", run_type="val", reason=" ", catalog=wfcat),
         ParameterError, "a reason is required"),
        (lambda: workflows.rollback(run_type="repr", reason="x", catalog=wfcat),
         ParameterError, "no earlier workflow version of repr .*bad-base is the first"),
        (lambda: workflows.rollback(run_type="test", reason="x", catalog=wfcat),
         ParameterError, "none is active"),
        (lambda: batch.submit({**CONFIG, "canary": {"version": "bad-base", "share": 150}},
                              catalog=wfcat),
         ConfigError, r"canary\.share: Input should be less than or equal to 100"),
        (lambda: batch.submit({**CONFIG, "canary": {"version": "bad-base", "share": -5}},
                              catalog=wfcat),
         ConfigError, r"canary\.share: Input should be greater than or equal to 0"),
        (lambda: batch.submit({**CONFIG, "canary": {"version": "nope", "share": 5}},
                              catalog=wfcat),
         ParameterError, "unknown workflow version 'nope'"),
        (lambda: batch.submit({**CONFIG, "workflow": "nope"}, catalog=wfcat),
         ParameterError, "unknown workflow version 'nope'"),
        (lambda: batch.submit({**CONFIG, "workflow": "bad-base", "canary": {
            "version": "bad-base", "share": 5}}, catalog=wfcat),
         ConfigError, "is the workflow this submission runs already"),
        (lambda: workflows.resolve_run_config(RunConfig.model_validate(
            {**CONFIG, "canary": {"version": "bad-base", "share": 5}}), catalog=wfcat),
         ConfigError, "only a batch submission runs a canary"),
        (lambda: workflows.resolve_run_config(RunConfig.model_validate(
            {**CONFIG, "workflow": "bad-base", "steps": CAND}), catalog=wfcat),
         ConfigError, "workflow: bad-base fixes the steps"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert _count(wfcat, workflow_activations) == acts
    assert _count(wfcat, batch_submissions) == subs
    assert workflows.active_version("repr", catalog=wfcat) == "bad-base"


def test_the_cli_registers_activates_and_compares(
        wfcat: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from lazysky.cli import main

    monkeypatch.setenv("LAZYSKY_CATALOG_DSN", wfcat.dsn)
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump({"calibrate": {"cosmic_sigclip": 4.0}}))
    assert main(["workflows", "register", str(path), "--name", "cli-v1"]) == 0
    assert main(["workflows", "register", str(path), "--name", "cli-v2"]) == 0
    assert "same as    cli-v1" in capsys.readouterr().out
    assert main(["workflows", "activate", "cli-v1", "--type", "val", "--reason", "go",
                 "--by", "carol"]) == 0
    assert main(["workflows", "list"]) == 0
    out = capsys.readouterr().out
    assert "activated cli-v1 (was none)" in out
    assert any(line.startswith("cli-v1") and " val " in line for line in out.splitlines())
    assert main(["workflows", "compare", "cli-v1", "cli-v2"]) == 0
    assert "identical parameters" in capsys.readouterr().out
    # errors: a message, exit 1, nothing changed
    assert main(["workflows", "activate", "nope", "--type", "val", "--reason", "x"]) == 1
    assert main(["workflows", "rollback", "--type", "val", "--reason", "x"]) == 1
    assert main(["workflows", "compare", "--execution", "987654"]) == 1
    assert main(["workflows", "compare", "cli-v1"]) == 1
    err = capsys.readouterr().err
    assert "unknown workflow version 'nope'" in err
    assert "no earlier workflow version" in err
    assert "batch execution 987654 ran no canary" in err
    assert "give two versions, two run ids, or --execution ID" in err
    assert main(["workflows", "history", "--type", "val"]) == 0
    assert "active now: " in capsys.readouterr().out
    assert workflows.active_version("val", catalog=wfcat) == "cli-v1"


# --- one real canary batch: two runs beside each other --------------------------------------
@pytest.mark.slow
def test_a_canary_batch_runs_both_versions_on_their_shares(
        wfcat: Catalog, tiny_survey: Path, tiny_client: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from lazysky.catalog.production import production_tiles, run_record
    from lazysky.config import load_settings

    workflows.register(BASE, name="run-base", catalog=wfcat)
    workflows.register(CAND, name="run-cand", catalog=wfcat)
    workflows.activate("run-base", run_type="prod", reason="nightly", catalog=wfcat)
    science = ["deep1-r-e001-d00", "deep1-r-e002-d00"]
    buckets = sorted(workflows.canary_bucket(e) for e in science)
    share = (buckets[0] + buckets[1]) / 2  # one science exposure on each side
    sub = batch.submit({
        "type": "prod", "store": str(tmp_path / "store"),
        "ingest": [str(tiny_survey / "raw"), str(tiny_survey / "calib")],
        "field": {"name": "deep1", "tile_px": 128}, "reference": ["deep1-r-e000-*"],
        "science": ["deep1-r-e00[12]-*"], "canary": {"version": "run-cand", "share": share},
    }, catalog=wfcat)
    (done,) = batch.run_due(catalog=wfcat, client=tiny_client, lease_seconds=60,
                            settings=load_settings(catalog_dsn=wfcat.dsn))
    assert done.state == "completed", done.error
    with wfcat.engine().connect() as conn:
        pair = conn.execute(sa.select(canary_runs).where(
            canary_runs.c.execution_id == done.execution_id)).one()
    assert (pair.run_id, pair.version, pair.canary_version, pair.share) == (
        done.run_id, "run-base", "run-cand", share)
    main, cand = (run_record(r, catalog=wfcat) for r in (pair.run_id, pair.canary_run_id))
    assert (main.run_type, cand.run_type) == ("prod", "val")
    assert (main.config["workflow"], cand.config["workflow"]) == ("run-base", "run-cand")
    assert main.config["steps"] == _expanded(BASE)
    assert cand.config["steps"] == _expanded(CAND)
    assert "[workflow run-cand]" in cand.description
    # the candidate took the science exposures below the share, the base the rest
    used = {r.run_id: _inputs(wfcat, r.run_id) & set(science) for r in (main, cand)}
    low = {e for e in science if workflows.canary_bucket(e) < share}
    assert used[cand.run_id] == low
    assert used[main.run_id] == set(science) - low
    # production is the base's run alone: the candidate (val) is never published
    assert set(production_tiles("deep1", catalog=wfcat).values()) == {main.run_id}
    # both stacked the same reference with the same coadd steps: the coadd catalogs agree
    # within resampling noise (each run's grid covers its own exposures, so the same
    # tile id may frame pixels shifted by the science footprints)
    cmp = workflows.compare_runs(main.run_id, cand.run_id, catalog=wfcat)
    assert cmp.tiles
    assert cmp.coadd_a > 0
    assert abs(cmp.coadd_b - cmp.coadd_a) <= 0.05 * cmp.coadd_a
    assert cmp.matched_fraction >= 0.9
    assert cmp.flux_ratio_median == pytest.approx(1.0, abs=0.01)
    assert cmp.offset_median_arcsec < 0.1
    assert (cmp.science_a, cmp.science_b) == (1, 1)
    assert str(cmp).startswith(f"A          {main.run_id}")
    assert workflows.canary_of(done.execution_id, catalog=wfcat) == (main.run_id, cand.run_id)
    from lazysky.cli import main as cli

    monkeypatch.setenv("LAZYSKY_CATALOG_DSN", wfcat.dsn)
    assert cli(["workflows", "canaries"]) == 0
    assert cli(["workflows", "compare", "--execution", str(done.execution_id)]) == 0
    out = capsys.readouterr().out
    assert f"canary run-cand {share:g} % {cand.run_id}" in out
    assert "matched" in out
    assert "flux       median B/A" in out
    assert batch.get_submission(sub.submission_id, catalog=wfcat).state == "completed"


def _inputs(cat: Catalog, run_id: str) -> set[str]:
    from lazysky.catalog.schema import runs

    with cat.engine().connect() as conn:
        return set(conn.execute(sa.select(runs.c.inputs).where(
            runs.c.run_id == run_id)).scalar_one())

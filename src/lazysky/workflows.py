"""Workflow versions and canaries: named, immutable pipeline configurations, one active per type.

A **workflow version** is every step's parameters (the ``steps`` of a run configuration,
validated and with defaults filled in) plus the software version that registered it,
stored under a name in the catalog (``workflow_versions``) with the SHA-256 of its
content: registering the same content under another name is allowed but visible
(:attr:`WorkflowVersion.same_content`). A version never changes: the API refuses it and
a database trigger refuses ``UPDATE`` and ``DELETE`` from any client.

Each processing type (``prod``, ``exp``, ``test``, ``val``, ``repr``) has at most one
**active** version: the newest row of ``workflow_activations`` for that type (actions
``activate``, ``promote``, ``rollback``, each with when, by whom and why; changes of one
type are serialised by an advisory lock). A run configuration without ``steps`` runs the
active version of its type (:func:`resolve_run_config`, called by the runner); one may
name a version (``workflow: NAME``) instead.

A **canary** (``canary: {version: NAME, share: 10}`` in a batch submission) runs the
candidate on ``share`` percent of the science exposures — those whose bucket
(:func:`canary_bucket`: SHA-256 of the exposure id, mapped to [0, 100)) is below the
share — under its own run of type ``val``, beside the submission's own run on the rest
(:func:`plan_runs`). Both runs stack the same reference, so their coadd catalogs overlap
exactly and :func:`compare_runs` compares them there.

Examples
--------
>>> from lazysky import workflows
>>> v = workflows.register({"detect": {"threshold": 4.5}}, name="cr45")  # doctest: +SKIP
>>> workflows.activate("cr45", run_type="prod", reason="first version")  # doctest: +SKIP
>>> workflows.in_canary("deep1-r-e002-d00", 100.0)
True
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from lazysky.catalog.schema import (
    WORKFLOW_NAME_PATTERN,
    canary_runs,
    run_tiles,
    workflow_activations,
    workflow_versions,
)
from lazysky.errors import ConfigError, ParameterError
from lazysky.runconfig import RunConfig, StepParameters
from lazysky.runs import RUN_TYPES, parse_run_id

__all__ = [
    "CANARY_RUN_TYPE",
    "Activation",
    "RunComparison",
    "WorkflowVersion",
    "activate",
    "active_version",
    "active_versions",
    "canary_bucket",
    "canary_of",
    "canary_run_id",
    "check_config",
    "compare_runs",
    "compare_versions",
    "content_hash",
    "executions_with_canary",
    "get_version",
    "history",
    "in_canary",
    "in_share",
    "list_versions",
    "parse_steps",
    "plan_runs",
    "promote",
    "register",
    "resolve_run_config",
    "rollback",
    "validate_name",
]

logger = logging.getLogger(__name__)

#: The type of a canary's candidate run: never published as production by finishing.
CANARY_RUN_TYPE = "val"
_NAME_RE = re.compile(WORKFLOW_NAME_PATTERN)
_LOCK_NAMESPACE = 0x77666C77  # 'wflw': advisory locks per processing type


# --- names, content, buckets (pure) ----------------------------------------------------
def validate_name(name: str) -> str:
    """Return ``name`` if it can name a workflow version, else raise ParameterError.

    Examples
    --------
    >>> validate_name("cr45-v2")
    'cr45-v2'
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        msg = (f"workflow version name {name!r} is not allowed: 1-64 characters, letters, "
               "digits, '.', '_' and '-', starting with a letter or digit (e.g. 'psf-v2')")
        raise ParameterError(msg)
    return name


def content_hash(steps: Mapping[str, Any], software_version: str) -> str:
    """SHA-256 of the canonical JSON of a version's content (steps and software version).

    Examples
    --------
    >>> content_hash({"a": 1, "b": 2}, "1.0") == content_hash({"b": 2, "a": 1}, "1.0")
    True
    """
    text = json.dumps({"software_version": software_version, "steps": steps},
                      sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def canary_bucket(exposure_id: str) -> float:
    """The exposure's bucket in [0, 100): the first 64 bits of SHA-256 of its id, scaled.

    The same exposure id always has the same bucket, on every machine and release.

    Examples
    --------
    >>> 0.0 <= canary_bucket("deep1-r-e002-d00") < 100.0
    True
    """
    digest = hashlib.sha256(str(exposure_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 * 100.0


def _check_share(share: float) -> float:
    try:
        value = float(share)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 100.0:
        msg = f"canary share must be a percent between 0 and 100; got {share!r}"
        raise ParameterError(msg)
    return value


def in_canary(exposure_id: str, share: float) -> bool:
    """Whether a canary of ``share`` percent takes this exposure (bucket < share).

    Deterministic, and monotone in the share: raising it only adds exposures.

    Examples
    --------
    >>> in_canary("deep1-r-e002-d00", 0.0), in_canary("deep1-r-e002-d00", 100.0)
    (False, True)
    """
    return canary_bucket(exposure_id) < _check_share(share)


def canary_run_id(run_id: str) -> str:
    """The run id of the candidate beside ``run_id``: derived, so a retry resumes it.

    Examples
    --------
    >>> rid = "prod-20261124-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f"
    >>> canary_run_id(rid) == canary_run_id(rid), canary_run_id(rid)[:13]
    (True, 'val-20261124-')
    """
    parsed = parse_run_id(run_id)
    return f"{CANARY_RUN_TYPE}-{parsed.date:%Y%m%d}-{uuid.uuid5(parsed.uuid, 'canary')}"


def parse_steps(source: StepParameters | Mapping[str, Any] | str | os.PathLike[str]
                ) -> tuple[StepParameters, str]:
    """Validated step parameters (and a description) from a file, a mapping or a model.

    Accepted: the step parameters themselves (``{detect: {threshold: 4.5}}``), a mapping
    with ``steps`` (and optionally ``description``), or a whole run configuration (its
    steps are taken; the configuration must still be valid).

    Raises
    ------
    ConfigError
        Unreadable file, not YAML, or an invalid parameter (the message names the file
        and the field).

    Examples
    --------
    >>> steps, _ = parse_steps({"steps": {"stack": {"method": "median"}}})
    >>> steps.stack.method, steps.detect.threshold
    ('median', 5.0)
    """
    from pydantic import ValidationError

    if isinstance(source, StepParameters):
        return source, ""
    from lazysky.runconfig import read_yaml_mapping

    data = read_yaml_mapping(source, what="workflow configuration", of="step parameters")
    where = "the workflow configuration" if isinstance(source, Mapping) else str(Path(source))
    description = str(data.get("description") or "")
    if "steps" in data and set(data) - {"steps", "description"}:
        from lazysky.runconfig import load_run_config

        cfg = load_run_config(data)  # a whole run configuration: valid, or refused
        return cfg.steps, description
    steps = data.get("steps", {}) if "steps" in data else data
    prefix = "steps." if "steps" in data else ""
    try:
        return StepParameters.model_validate(steps if steps is not None else {}), description
    except ValidationError as exc:
        problems = "; ".join(
            f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        msg = f"{where}: {problems} (steps are {', '.join(StepParameters.model_fields)})"
        raise ConfigError(msg) from exc


# --- the records -------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkflowVersion:
    """A registered workflow version; ``active_for``: the types it is active for now."""

    name: str
    steps: Mapping[str, Any]
    software_version: str
    sha256: str
    description: str
    registered_at: dt.datetime
    registered_by: str
    same_content: tuple[str, ...] = ()
    active_for: tuple[str, ...] = ()

    @property
    def parameters(self) -> StepParameters:
        """The steps as the validated model a run uses."""
        return StepParameters.model_validate(dict(self.steps))

    def __str__(self) -> str:
        lines = [
            f"workflow   {self.name}",
            f"sha256     {self.sha256}",
            f"software   {self.software_version}",
            f"registered {self.registered_at:%Y-%m-%d %H:%M:%S %Z} by {self.registered_by}",
            f"active for {', '.join(self.active_for) or '-'}",
        ]
        if self.same_content:
            lines.append(f"same as    {', '.join(self.same_content)} (identical content)")
        if self.description:
            lines.append(f"about      {self.description}")
        for step, params in self.steps.items():
            lines.append(f"steps      {step}: " + ", ".join(
                f"{k}={v}" for k, v in dict(params).items()))
        return "\n".join(lines)


@dataclass(frozen=True)
class Activation:
    """One change of the active version of a processing type."""

    activation_id: int
    run_type: str
    version: str
    previous: str | None
    action: str
    undoes: int | None
    at: dt.datetime
    by: str
    reason: str

    def __str__(self) -> str:
        what = (f"rolled back #{self.undoes}: {self.previous} -> {self.version}"
                if self.action == "rollback"
                else f"{self.action}d {self.version} (was {self.previous or 'none'})")
        return (f"#{self.activation_id} {self.at:%Y-%m-%d %H:%M:%S %Z} {self.run_type} "
                f"{self.by}: {what} — {self.reason}")


def _catalog(catalog: Any) -> Any:
    if catalog is not None:
        return catalog
    from lazysky.catalog import open_catalog

    return open_catalog()


def _version(conn: sa.Connection, name: str) -> WorkflowVersion:
    validate_name(name)
    row = conn.execute(sa.select(workflow_versions).where(
        workflow_versions.c.name == name)).mappings().first()
    if row is None:
        known = conn.execute(sa.select(workflow_versions.c.name).order_by(
            workflow_versions.c.name)).scalars().all()
        msg = (f"unknown workflow version {name!r}; registered: "
               f"{', '.join(known) if known else 'none'} (lazysky workflows register)")
        raise ParameterError(msg)
    same = conn.execute(sa.select(workflow_versions.c.name).where(
        workflow_versions.c.sha256 == row["sha256"], workflow_versions.c.name != name)
        .order_by(workflow_versions.c.name)).scalars().all()
    active = tuple(t for t, v in _actives(conn).items() if v == name)
    return WorkflowVersion(**{k: row[k] for k in (
        "name", "steps", "software_version", "sha256", "description", "registered_at",
        "registered_by")}, same_content=tuple(same), active_for=active)


def _actives(conn: sa.Connection) -> dict[str, str]:
    # the view of schema v5: the newest activation of each type names its version
    got = conn.execute(sa.text("SELECT run_type, version FROM workflow_active")).all()
    return {str(t): str(v) for t, v in got}


def get_version(name: str, *, catalog: Any = None) -> WorkflowVersion:
    """A registered version.

    Raises
    ------
    ParameterError
        No version of that name (the message lists the registered ones).

    Examples
    --------
    >>> print(get_version("cr45"))  # doctest: +SKIP
    """
    with _catalog(catalog).engine().connect() as conn:
        return _version(conn, name)


def list_versions(*, catalog: Any = None) -> list[WorkflowVersion]:
    """Every registered version, oldest first.

    Examples
    --------
    >>> [v.name for v in list_versions()]  # doctest: +SKIP
    ['base', 'cr45']
    """
    with _catalog(catalog).engine().connect() as conn:
        names = conn.execute(sa.select(workflow_versions.c.name).order_by(
            workflow_versions.c.registered_at, workflow_versions.c.name)).scalars().all()
        return [_version(conn, n) for n in names]


def register(source: StepParameters | Mapping[str, Any] | str | os.PathLike[str], *,
             name: str, description: str | None = None, by: str | None = None,
             software_version: str | None = None, catalog: Any = None) -> WorkflowVersion:
    """Register a workflow version (validated first; nothing is written when invalid).

    Registering the same name with the same content again returns it unchanged; with
    other content it is refused (versions are immutable). The same content under
    another name is registered and listed in :attr:`WorkflowVersion.same_content`.

    Parameters
    ----------
    source
        Step parameters: a YAML file, a mapping or a :class:`StepParameters` (see
        :func:`parse_steps`).
    name
        The version's name (letters, digits, ``.``, ``_``, ``-``).
    description, by
        Recorded with it (``by`` defaults to ``user@host``).
    software_version
        Default: the installed lazysky's.

    Raises
    ------
    ConfigError
        An invalid configuration.
    ParameterError
        A bad name, or the name registered with other content.

    Examples
    --------
    >>> register("psf-v2.yaml", name="psf-v2", description="Moffat β free")  # doctest: +SKIP
    """
    from lazysky import __version__
    from lazysky.catalog.production import _who

    validate_name(name)
    steps_model, found = parse_steps(source)
    steps = steps_model.model_dump(mode="json")
    software = software_version or __version__
    sha = content_hash(steps, software)
    who = _who(by)
    text = description if description is not None else found
    with _catalog(catalog).engine().begin() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
            _LOCK_NAMESPACE, sa.func.hashtext(f"name:{name}"))))
        have = conn.execute(sa.select(workflow_versions.c.sha256).where(
            workflow_versions.c.name == name)).scalar_one_or_none()
        if have is not None and have != sha:
            msg = (f"workflow version {name!r} is already registered with other content "
                   f"(sha256 {have[:12]}…, this is {sha[:12]}…); versions are immutable: "
                   "register the new parameters under a new name")
            raise ParameterError(msg)
        if have is None:
            conn.execute(workflow_versions.insert().values(
                name=name, steps=steps, software_version=software, sha256=sha,
                description=text, registered_by=who))
            logger.info("registered workflow version %s (%s)", name, sha[:12])
        got = _version(conn, name)
    if got.same_content:
        logger.warning("workflow version %s has the same content as %s", name,
                       ", ".join(got.same_content))
    return got


# --- activation, promotion, rollback -----------------------------------------------------
def _type(run_type: str) -> str:
    if run_type not in RUN_TYPES:
        msg = f"type must be one of {', '.join(RUN_TYPES)}; got {run_type!r}"
        raise ParameterError(msg)
    return run_type


def _as_activation(row: Any) -> Activation:
    return Activation(**{f.name: getattr(row, f.name) for f in dataclasses.fields(Activation)})


def _history(conn: sa.Connection, run_type: str | None) -> list[Activation]:
    a = workflow_activations
    query = sa.select(a).order_by(a.c.activation_id)
    if run_type is not None:
        query = query.where(a.c.run_type == _type(run_type))
    return [_as_activation(r) for r in conn.execute(query).all()]


def _change(name: str, *, run_type: str, action: str, reason: str, by: str | None,
            catalog: Any) -> Activation:
    from lazysky.catalog.production import _reason, _who

    _type(run_type)
    why, who = _reason(reason), _who(by)
    with _catalog(catalog).engine().begin() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
            _LOCK_NAMESPACE, sa.func.hashtext(run_type))))
        _version(conn, name)  # refuses an unregistered version
        now = _actives(conn).get(run_type)
        if now == name:
            msg = f"workflow version {name!r} is already active for {run_type}"
            raise ParameterError(msg)
        row = conn.execute(workflow_activations.insert().values(
            run_type=run_type, version=name, previous=now, action=action, by=who,
            reason=why).returning(*workflow_activations.c)).one()
    logger.info("%s: %s %s (was %s)", run_type, action, name, now)
    return _as_activation(row)


def activate(name: str, *, run_type: str, reason: str, by: str | None = None,
             catalog: Any = None) -> Activation:
    """Make a registered version the active one of a processing type (recorded).

    Raises
    ------
    ParameterError
        An unregistered version, an unknown type, no reason, or already active.

    Examples
    --------
    >>> activate("base", run_type="prod", reason="first version")  # doctest: +SKIP
    """
    return _change(name, run_type=run_type, action="activate", reason=reason, by=by,
                   catalog=catalog)


def promote(candidate: str, *, run_type: str = "prod", reason: str, by: str | None = None,
            catalog: Any = None) -> Activation:
    """Promote a canary's candidate: active for ``run_type``'s new batches (recorded).

    The same as :func:`activate` but recorded as ``promote``; a batch whose canary names
    the version now active runs one run, no canary (docs/workflows.md).

    Examples
    --------
    >>> promote("psf-v2", reason="canary: 3 % more, same flux scale")  # doctest: +SKIP
    """
    return _change(candidate, run_type=run_type, action="promote", reason=reason, by=by,
                   catalog=catalog)


def rollback(*, run_type: str, reason: str, by: str | None = None,
             catalog: Any = None) -> Activation:
    """Restore the version active before the newest activation or promotion of a type.

    Activations form a stack: each rollback undoes the newest change not yet undone,
    so rolling back twice goes two versions back.

    Raises
    ------
    ParameterError
        No reason, an unknown type, or no earlier version to go back to.

    Examples
    --------
    >>> rollback(run_type="prod", reason="flux scale off")  # doctest: +SKIP
    """
    from lazysky.catalog.production import _reason, _who

    _type(run_type)
    why, who = _reason(reason), _who(by)
    with _catalog(catalog).engine().begin() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(
            _LOCK_NAMESPACE, sa.func.hashtext(run_type))))
        stack: list[Activation] = []
        for act in _history(conn, run_type):
            if act.action == "rollback":
                stack.pop()
            else:
                stack.append(act)
        if len(stack) < 2:
            msg = (f"no earlier workflow version of {run_type} to roll back to "
                   f"({'none is active' if not stack else f'{stack[-1].version} is the first'})")
            raise ParameterError(msg)
        undone, back = stack[-1], stack[-2]
        row = conn.execute(workflow_activations.insert().values(
            run_type=run_type, version=back.version, previous=undone.version,
            action="rollback", undoes=undone.activation_id, by=who, reason=why,
        ).returning(*workflow_activations.c)).one()
    logger.info("%s: rolled back %s to %s", run_type, undone.version, back.version)
    return _as_activation(row)


def active_version(run_type: str, *, catalog: Any = None) -> str | None:
    """The active version of a processing type (None: none was ever activated).

    Examples
    --------
    >>> active_version("prod")  # doctest: +SKIP
    'base'
    """
    _type(run_type)
    with _catalog(catalog).engine().connect() as conn:
        return _actives(conn).get(run_type)


def active_versions(*, catalog: Any = None) -> dict[str, str]:
    """The active version of every type that has one."""
    with _catalog(catalog).engine().connect() as conn:
        return _actives(conn)


def history(*, run_type: str | None = None, catalog: Any = None) -> list[Activation]:
    """Every activation, promotion and rollback (of a type), oldest first."""
    with _catalog(catalog).engine().connect() as conn:
        return _history(conn, run_type)


# --- what a run runs -----------------------------------------------------------------------
def resolve_run_config(config: RunConfig, *, catalog: Any = None) -> RunConfig:
    """The configuration a run executes: steps from its workflow version, resolved now.

    * ``workflow: NAME``: that version's steps (explicit ``steps`` must equal them);
    * no ``workflow`` and no ``steps``: the active version of the run's type, or the
      default steps when that type has none;
    * explicit ``steps``: those.

    The result names the version in ``workflow`` and in its description (what
    ``lazysky runs show`` prints), and always carries its steps.

    Raises
    ------
    ConfigError
        ``canary`` (only a batch submission splits a run), explicit steps that differ
        from the named version's.
    ParameterError
        An unknown version.

    Examples
    --------
    >>> resolve_run_config(cfg).workflow  # doctest: +SKIP
    'base'
    """
    if config.canary is not None:
        msg = ("canary: only a batch submission runs a canary (lazysky batch submit); "
               "remove canary to run this configuration with lazysky run")
        raise ConfigError(msg)
    explicit = "steps" in config.model_fields_set
    name = config.workflow
    if name is None and explicit:
        return config
    cat = _catalog(catalog)
    if name is None and config.run_id is not None:
        # a resumed run (a retry, a lost execution) keeps what it started with, even if
        # another version became active meanwhile: one run never mixes two versions
        recorded = _recorded(config.run_id, catalog=cat)
        if recorded is not None and recorded.get("steps") is not None:
            name = recorded.get("workflow")
            if name is None:
                return config.model_copy(update={
                    "steps": StepParameters.model_validate(recorded["steps"])})
    if name is None:
        name = active_version(config.type, catalog=cat)
        if name is None:  # no version for this type yet: the defaults, as before
            return config.model_copy(update={"steps": config.steps})
    version = get_version(name, catalog=cat)
    steps = version.parameters
    if explicit and config.workflow is not None and config.steps != steps:
        msg = (f"workflow: {name} fixes the steps; this configuration also gives other "
               "steps: remove steps (or register them as a new version)")
        raise ConfigError(msg)
    from lazysky import __version__

    if version.software_version != __version__:
        logger.warning("workflow version %s was registered with lazysky %s; running %s",
                       name, version.software_version, __version__)
    tag = f"[workflow {name}]"
    text = config.description if tag in config.description else \
        f"{config.description} {tag}".strip()
    return config.model_copy(update={"steps": steps, "workflow": name, "description": text})


def _recorded(run_id: str, *, catalog: Any) -> dict[str, Any] | None:
    """The configuration a registered run recorded (None: not registered yet)."""
    from lazysky.catalog.schema import runs

    with catalog.engine().connect() as conn:
        got = conn.execute(sa.select(runs.c.config).where(
            runs.c.run_id == run_id)).scalar_one_or_none()
    return dict(got) if got is not None else None


def check_config(config: RunConfig, *, catalog: Any = None) -> None:
    """Refuse, before queueing, a configuration naming an unknown version or a bad canary.

    Raises
    ------
    ParameterError
        An unknown workflow or canary version.
    ConfigError
        A canary beside ``science_share``, or a canary naming the workflow it runs.
    """
    cat = _catalog(catalog)
    if config.workflow is not None:
        get_version(config.workflow, catalog=cat)
    if config.canary is not None:
        _check_share(config.canary.share)
        get_version(config.canary.version, catalog=cat)
        if config.science_share is not None:
            msg = "canary: a configuration with science_share cannot be split again"
            raise ConfigError(msg)
        if config.canary.version == config.workflow:
            msg = (f"canary.version {config.canary.version} is the workflow this "
                   "submission runs already; name another candidate")
            raise ConfigError(msg)


def plan_runs(config: RunConfig, *, run_id: str | None = None, catalog: Any = None,
              execution_id: int | None = None) -> list[RunConfig]:
    """The run configurations one batch execution runs, resolved now: one, or two beside.

    Without a canary: the submission's run. With one: the submission's run on the
    science exposures of buckets ``[share, 100)`` and the candidate's run (type
    ``val``, id :func:`canary_run_id`) on ``[0, share)``; both with the whole reference.
    When the candidate is the version the submission would run anyway (it was promoted),
    one run. ``execution_id`` records the pair in ``canary_runs``.

    Examples
    --------
    >>> [c.workflow for c in plan_runs(cfg, run_id=rid)]  # doctest: +SKIP
    ['base', 'psf-v2']
    """
    cat = _catalog(catalog)
    canary = config.canary
    base = config.model_copy(update={"canary": None,
                                     **({"run_id": run_id} if run_id else {})})
    main = resolve_run_config(base, catalog=cat)
    if canary is None:
        return [main]
    share = _check_share(canary.share)
    if main.workflow == canary.version:
        logger.info("canary %s is the version this run takes: one run, no canary",
                    canary.version)
        return [main]
    rid = main.run_id
    if rid is None:
        from lazysky.runs import new_run_id

        rid = new_run_id(main.type)
        main = main.model_copy(update={"run_id": rid})
    main = main.model_copy(update={"science_share": (share, 100.0)})
    # the candidate: the submission's inputs, the candidate's steps, its own run
    data = config.model_dump(mode="json", exclude={"steps", "canary", "run_id"})
    candidate = resolve_run_config(RunConfig.model_validate({
        **data, "type": CANARY_RUN_TYPE, "run_id": canary_run_id(rid),
        "workflow": canary.version, "science_share": (0.0, share),
        "description": f"canary of {rid}: {canary.version} on {share:g} % of the "
                       "science exposures"}), catalog=cat)
    if execution_id is not None:
        with cat.engine().begin() as conn:
            conn.execute(pg_insert(canary_runs).values(
                execution_id=int(execution_id), run_id=rid, version=main.workflow,
                canary_run_id=candidate.run_id, canary_version=canary.version, share=share,
            ).on_conflict_do_nothing())
    return [main, candidate]


def in_share(exposure_id: str, share: tuple[float, float] | None) -> bool:
    """Whether an exposure's bucket is in ``[lo, hi)`` (always, when ``share`` is None)."""
    if share is None:
        return True
    bucket = canary_bucket(exposure_id)
    return share[0] <= bucket < share[1]


# --- comparing -----------------------------------------------------------------------------
def compare_versions(a: str, b: str, *, catalog: Any = None) -> dict[str, tuple[Any, Any]]:
    """The step parameters that differ between two versions (``step.param`` → (a, b)).

    Examples
    --------
    >>> compare_versions("base", "cr45")  # doctest: +SKIP
    {'calibrate.cosmic_sigclip': (4.5, 4.0)}
    """
    cat = _catalog(catalog)
    va, vb = get_version(a, catalog=cat), get_version(b, catalog=cat)

    def flat(steps: Mapping[str, Any]) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, p in steps.items() for k, v in dict(p).items()}

    fa, fb = flat(va.steps), flat(vb.steps)
    out = {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
    if va.software_version != vb.software_version:
        out["software_version"] = (va.software_version, vb.software_version)
    return out


@dataclass(frozen=True)
class RunComparison:
    """Catalog metrics of two runs on the tiles both finished (see :func:`compare_runs`)."""

    run_a: str
    run_b: str
    tiles: tuple[str, ...]
    per_tile: Mapping[str, Mapping[str, int]]
    coadd_a: int
    coadd_b: int
    matched: int
    matched_fraction: float
    flux_ratio_median: float
    offset_median_arcsec: float
    offset_p90_arcsec: float
    diff_a: int
    diff_b: int
    science_a: int
    science_b: int

    def __str__(self) -> str:
        def per(n: int, k: int) -> str:
            return f"{n} ({n / k:.1f} per science exposure)" if k else f"{n}"

        lines = [
            f"A          {self.run_a}",
            f"B          {self.run_b}",
            f"overlap    {len(self.tiles)} tile(s) finished by both",
            f"coadd      A {self.coadd_a}, B {self.coadd_b}; matched {self.matched} "
            f"({self.matched_fraction:.1%} of A) within 1 arcsec",
            f"flux       median B/A {self.flux_ratio_median:.4f} (aperture, matched)",
            f"astrometry offsets median {self.offset_median_arcsec:.3f}\", "
            f"p90 {self.offset_p90_arcsec:.3f}\"",
            f"difference A {per(self.diff_a, self.science_a)}, "
            f"B {per(self.diff_b, self.science_b)}",
            "tile       coadd A/B  diff A/B",
        ]
        for t, c in self.per_tile.items():
            lines.append(f"{t:<10} {c['coadd_a']:>4}/{c['coadd_b']:<4}  "
                         f"{c['diff_a']:>4}/{c['diff_b']:<4}")
        return "\n".join(lines)


def compare_runs(a: str, b: str, *, radius_arcsec: float = 1.0,
                 catalog: Any = None) -> RunComparison:
    """Compare two runs' catalogs on the tiles both finished (a canary and its base).

    Sources and difference sources per tile; the coadd sources of A matched to B's
    within ``radius_arcsec`` on the GiST index (:func:`lazysky.catalog.xmatch.crossmatch`):
    matched fraction, median aperture-flux ratio B/A, offsets (median, 90th percentile).
    A canary and its base stack the same reference, so their coadds should agree; their
    difference sources come from different exposures, hence per science exposure.

    Raises
    ------
    ParameterError
        A bad run id or radius.
    CatalogError
        An unknown run.

    Examples
    --------
    >>> print(compare_runs(base_run, canary_run))  # doctest: +SKIP
    """
    import numpy as np

    from lazysky.catalog.production import run_record
    from lazysky.catalog.schema import coadd_sources
    from lazysky.catalog.xmatch import crossmatch

    if not radius_arcsec > 0:
        msg = f"radius_arcsec must be > 0; got {radius_arcsec!r}"
        raise ParameterError(msg)
    cat = _catalog(catalog)
    rec_a, rec_b = run_record(a, catalog=cat), run_record(b, catalog=cat)
    counts: dict[str, dict[str, int]] = {}
    with cat.engine().connect() as conn:
        for run, side in ((a, "a"), (b, "b")):
            for stage, tile, rows in conn.execute(sa.select(
                    run_tiles.c.stage, run_tiles.c.tile_id, run_tiles.c.rows).where(
                    run_tiles.c.run_id == run)):
                key = {"detect-coadd": "coadd", "detect-diff": "diff"}.get(stage)
                if key:
                    counts.setdefault(tile, {}).setdefault(f"{key}_{side}", int(rows))
        tiles = tuple(sorted(t for t, c in counts.items() if len(c) == 4))
        from lazysky.catalog.schema import runs

        inputs = {r: conn.execute(sa.select(runs.c.inputs).where(runs.c.run_id == r))
                  .scalar_one() for r in (a, b)}
        c = coadd_sources.c
        src_a = conn.execute(sa.select(c.ra, c.dec, c.flux_aper).where(
            c.run_id == a, c.tile_id.in_(tiles))).all()
        # B's sources anywhere: the two runs' grids cover their own exposures, so the
        # same tile id may frame slightly different pixels; sources match on the sky
        src_b = {(t, n): f for t, n, f in conn.execute(sa.select(
            c.tile_id, c.number, c.flux_aper).where(c.run_id == b))}
    ratios: list[float] = []
    offsets: list[float] = []
    matched = 0
    if src_a and src_b:
        ra = np.array([r[0] for r in src_a])
        dec = np.array([r[1] for r in src_a])
        m = crossmatch(ra, dec, radius_arcsec / 3600.0, table="coadd", run=b, catalog=cat)
        seen: set[int] = set()
        for row in m:  # ordered by index, then distance: the first is the nearest
            i = int(row["index"])
            if i in seen:
                continue
            seen.add(i)
            offsets.append(float(row["distance"]))
            fa, fb = src_a[i][2], src_b.get((str(row["tile_id"]), int(row["number"])))
            if fa and fb is not None and fa > 0:
                ratios.append(float(fb) / float(fa))
        matched = len(seen)
    per_tile = {t: counts[t] for t in tiles}
    n_a = sum(v["coadd_a"] for v in per_tile.values())
    return RunComparison(
        run_a=a, run_b=b, tiles=tiles, per_tile=per_tile, coadd_a=n_a,
        coadd_b=sum(v["coadd_b"] for v in per_tile.values()), matched=matched,
        matched_fraction=matched / n_a if n_a else float("nan"),
        flux_ratio_median=float(np.median(ratios)) if ratios else float("nan"),
        offset_median_arcsec=float(np.median(offsets)) if offsets else float("nan"),
        offset_p90_arcsec=float(np.percentile(offsets, 90)) if offsets else float("nan"),
        diff_a=sum(v["diff_a"] for v in per_tile.values()),
        diff_b=sum(v["diff_b"] for v in per_tile.values()),
        science_a=_science_count(rec_a.config, inputs[a]),
        science_b=_science_count(rec_b.config, inputs[b]))


def _science_count(config: Mapping[str, Any], inputs: Mapping[str, Any]) -> int:
    """How many science exposures a run used (its inputs matching science, not reference)."""
    import fnmatch

    def hit(eid: str, key: str) -> bool:
        return any(fnmatch.fnmatchcase(eid, p) for p in config.get(key) or ())

    return sum(1 for e in inputs if hit(e, "science") and not hit(e, "reference"))


def canary_of(execution_id: int, *, catalog: Any = None) -> tuple[str, str] | None:
    """The (base run, candidate run) of a batch execution split by a canary, or None."""
    with _catalog(catalog).engine().connect() as conn:
        row = conn.execute(sa.select(canary_runs.c.run_id, canary_runs.c.canary_run_id)
                           .where(canary_runs.c.execution_id == int(execution_id))).first()
    return (str(row[0]), str(row[1])) if row is not None else None


def executions_with_canary(*, catalog: Any = None) -> list[dict[str, Any]]:
    """Every canary split recorded, newest first (execution, runs, versions, share)."""
    with _catalog(catalog).engine().connect() as conn:
        rows = conn.execute(sa.select(canary_runs).order_by(
            canary_runs.c.execution_id.desc())).mappings().all()
    return [dict(r) for r in rows]


#: Names for the top of ``lazysky`` (``lazysky.register_workflow`` …), beside runs' own
#: ``promote`` and ``rollback``.
register_workflow = register
activate_workflow = activate
promote_workflow = promote
rollback_workflow = rollback
list_workflows = list_versions
active_workflow = active_version

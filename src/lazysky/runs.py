"""Processing runs: ids, provenance and lineage.

Every processing has a run id ``{type}-{YYYYMMDD}-{uuid}``, where ``type`` is one of
``prod`` (production), ``exp`` (experiment), ``test``, ``val`` (validation) and ``repr``
(reprocessing). Products and catalog rows carry it, so production and experiments never
mix and every row has a lineage. A :class:`Run` records what the catalog stores about a
run: configuration, software version, inputs with checksums, parent run and status.

Examples
--------
>>> from lazysky.runs import new_run_id, parse_run_id
>>> rid = new_run_id("exp", date="2026-11-23")
>>> parse_run_id(rid).type
'exp'
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lazysky.errors import ParameterError

__all__ = [
    "RUN_STATUSES",
    "RUN_TYPES",
    "Run",
    "RunId",
    "RunStatus",
    "RunType",
    "new_run_id",
    "parse_run_id",
    "validate_run_id",
]

RunType = Literal["prod", "exp", "test", "val", "repr"]
RunStatus = Literal["running", "done", "done_with_errors", "failed"]
RUN_TYPES: tuple[str, ...] = get_args(RunType)
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)

#: The pattern of a run id (also used as a CHECK constraint in the catalog).
RUN_ID_PATTERN = (
    r"^(prod|exp|test|val|repr)-[0-9]{8}-"
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)


@dataclass(frozen=True)
class RunId:
    """A parsed run id: its type, its date and its UUID."""

    type: RunType
    date: dt.date
    uuid: uuid.UUID

    def __str__(self) -> str:
        return f"{self.type}-{self.date:%Y%m%d}-{self.uuid}"


def _check_type(run_type: str) -> RunType:
    if run_type not in RUN_TYPES:
        msg = f"run type must be one of {', '.join(RUN_TYPES)}; got {run_type!r}"
        raise ParameterError(msg)
    return run_type  # type: ignore[return-value]


def new_run_id(run_type: str, *, date: dt.date | str | None = None) -> str:
    """A fresh run id of the given type.

    Parameters
    ----------
    run_type
        ``prod``, ``exp``, ``test``, ``val`` or ``repr``.
    date
        The run's date (a :class:`datetime.date` or ``YYYY-MM-DD``); default today (UTC).

    Examples
    --------
    >>> new_run_id("test", date="2026-01-02").startswith("test-20260102-")
    True
    """
    kind = _check_type(run_type)
    if date is None:
        day = dt.datetime.now(dt.UTC).date()
    elif isinstance(date, str):
        try:
            day = dt.date.fromisoformat(date)
        except ValueError:
            msg = f"run date must be YYYY-MM-DD, got {date!r}"
            raise ParameterError(msg) from None
    else:
        day = date
    return str(RunId(kind, day, uuid.uuid4()))


def parse_run_id(run_id: str) -> RunId:
    """Split a run id into type, date and UUID, validating it.

    Raises
    ------
    ParameterError
        When ``run_id`` is not ``{type}-{YYYYMMDD}-{uuid}`` (the message says why).

    Examples
    --------
    >>> parse_run_id("prod-20261123-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f").date
    datetime.date(2026, 11, 23)
    """
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        msg = (
            f"not a run id: {run_id!r}; expected '{{type}}-{{YYYYMMDD}}-{{uuid}}' with type "
            f"in {', '.join(RUN_TYPES)}, e.g. 'exp-20261123-<uuid4>' (see lazysky.runs.new_run_id)"
        )
        raise ParameterError(msg)
    kind, day, rest = run_id.split("-", 2)
    try:
        date = dt.datetime.strptime(day, "%Y%m%d").date()
    except ValueError:
        msg = f"run id {run_id!r} has an impossible date {day!r}"
        raise ParameterError(msg) from None
    return RunId(_check_type(kind), date, uuid.UUID(rest))


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` unchanged if valid, else raise :class:`ParameterError`."""
    parse_run_id(run_id)
    return run_id


@dataclass(frozen=True)
class Run:
    """What the catalog records about a processing run.

    Parameters
    ----------
    run_id
        The run id (see :func:`new_run_id`).
    config
        The configuration the run used (JSON-serialisable).
    software_version
        The lazysky version (default: the installed one).
    inputs
        Input names mapped to their SHA-256 checksums.
    parent_run_id
        The run this one reprocesses, if any.
    description
        Free text.

    Examples
    --------
    >>> run = Run(new_run_id("test"), inputs={"e001.fits": "ab" * 32})
    >>> run.type
    'test'
    """

    run_id: str
    config: Mapping[str, Any] = field(default_factory=dict)
    software_version: str | None = None
    inputs: Mapping[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        if self.parent_run_id is not None:
            validate_run_id(self.parent_run_id)
            if self.parent_run_id == self.run_id:
                msg = f"run {self.run_id} cannot be its own parent"
                raise ParameterError(msg)
        for name, checksum in self.inputs.items():
            if not re.fullmatch(r"[0-9a-f]{64}", str(checksum)):
                msg = (
                    f"input {name!r} of run {self.run_id} needs a SHA-256 hex digest "
                    f"(64 lowercase hex digits), got {checksum!r}"
                )
                raise ParameterError(msg)

    @property
    def type(self) -> RunType:
        """The run type (``prod``, ``exp``, …)."""
        return parse_run_id(self.run_id).type

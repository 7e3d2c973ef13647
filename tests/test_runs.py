"""Run ids: format, parsing, validation; Run records."""

from __future__ import annotations

import datetime as dt
import pickle
import re

import pytest

from lazysky.errors import ParameterError
from lazysky.runs import RUN_TYPES, Run, new_run_id, parse_run_id, validate_run_id


@pytest.mark.parametrize("kind", RUN_TYPES)
def test_new_run_id_round_trips(kind: str) -> None:
    rid = new_run_id(kind, date="2026-11-23")
    assert re.fullmatch(rf"{kind}-20261123-[0-9a-f-]{{36}}", rid)
    parsed = parse_run_id(rid)
    assert (parsed.type, parsed.date) == (kind, dt.date(2026, 11, 23))
    assert str(parsed) == rid


def test_default_date_is_today_utc() -> None:
    rid = new_run_id("prod")
    assert parse_run_id(rid).date == dt.datetime.now(dt.UTC).date()


def test_ids_are_unique() -> None:
    assert len({new_run_id("exp") for _ in range(100)}) == 100


@pytest.mark.parametrize("bad", [
    "", "prod", "dev-20261123-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f",
    "prod-2026112-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f",
    "prod-20261323-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f",  # month 13
    "prod-20261123-6F1C1F8E-1D2B-4C55-9E43-2A9B3C1D0E7F",  # upper case
    "prod-20261123-6f1c1f8e-1d2b-4c55-9e43-2a9b3c1d0e7f' OR 1=1 --",
])
def test_bad_ids_are_refused_with_the_expected_form(bad: str) -> None:
    with pytest.raises(ParameterError, match="run id"):
        validate_run_id(bad)


def test_bad_type_lists_the_choices() -> None:
    with pytest.raises(ParameterError, match="prod, exp, test, val, repr"):
        new_run_id("dev")
    with pytest.raises(ParameterError, match="YYYY-MM-DD"):
        new_run_id("exp", date="23/11/2026")


def test_run_record_validates_parent_and_checksums() -> None:
    parent = new_run_id("prod")
    run = Run(new_run_id("repr"), parent_run_id=parent, inputs={"a.fits": "0" * 64})
    assert run.type == "repr"
    with pytest.raises(ParameterError, match="own parent"):
        Run(parent, parent_run_id=parent)
    with pytest.raises(ParameterError, match="SHA-256"):
        Run(new_run_id("exp"), inputs={"a.fits": "abc"})
    with pytest.raises(ParameterError, match="run id"):
        Run("nonsense")


def test_errors_pickle() -> None:
    with pytest.raises(ParameterError) as info:
        parse_run_id("x")
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value)
    assert isinstance(again, ValueError)

"""Fixtures for the Kubernetes tests: every overlay's objects."""

from __future__ import annotations

from typing import Any

import pytest

from lazysky.kube import build_manifests

OVERLAY_NAMES = [None, "dev", "prod"]


@pytest.fixture(params=OVERLAY_NAMES, ids=lambda o: o or "base")
def overlay(request: pytest.FixtureRequest) -> str | None:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def objects(overlay: str | None) -> list[dict[str, Any]]:
    return build_manifests(overlay=overlay)

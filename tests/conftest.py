"""Shared fixtures: a real S3 endpoint (moto server on 127.0.0.1), the embedded catalog.

The catalog is a real PostgreSQL + pgSphere that lazysky starts itself, in a fresh
directory under /tmp (reachable by the ``postgres`` user when the tests run as root),
stopped at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lazysky.catalog import Catalog
    from lazysky.runner import RunSummary

REAL_DATA = Path(
    os.environ.get(
        "LAZYSKY_REAL_DATA", Path(__file__).parents[1] / ".." / "shared" / "data" / "real"
    )
)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port): real HTTP, real S3 protocol."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> tuple[str, dict[str, Any]]:
    """A fresh bucket on the test S3 endpoint, and the fsspec options that reach it."""
    import uuid

    import s3fs

    opts: dict[str, Any] = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint},
    }
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**opts).mkdir(bucket)
    return bucket, opts


@pytest.fixture(scope="session")
def catalog_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    from lazysky.catalog import server as catalog_server

    path = Path(tempfile.mkdtemp(prefix="lazysky-test-catalog-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    catalog_server.stop(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def catalog(catalog_dir: Path) -> Catalog:
    """The opened test catalog (embedded server, pgSphere, schema)."""
    from lazysky.catalog import open_catalog
    from lazysky.config import load_settings

    return open_catalog(load_settings(catalog_dir=catalog_dir, catalog_dsn=None))


# --- a tiny survey and its clean run, shared by the batch and autoscaling tests ------------
@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny survey of tests/test_run_end_to_end.py (same SurveySpec), simulated once."""
    from test_run_end_to_end import SPEC

    from lazysky.simulator import simulate_survey

    root = tmp_path_factory.mktemp("tiny-survey")
    simulate_survey(SPEC, root)
    return root


@pytest.fixture(scope="session")
def tiny_cluster() -> Iterator[Any]:
    """A local cluster of two one-thread worker processes, started once a session.

    Reach it through ``tiny_client`` (a client per module, so no module leaves a default
    client behind for the next). Tests that kill or rescale workers make a cluster of
    their own.
    """
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tiny_client(tiny_cluster: Any) -> Iterator[Any]:
    """A client of the session's ``tiny_cluster`` (per module)."""
    from distributed import Client

    with Client(tiny_cluster) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_clean(tiny_survey: Path, tmp_path_factory: pytest.TempPathFactory,
               catalog: Catalog, tiny_cluster: Any) -> dict[str, Any]:
    """One clean run of the tiny survey (what other runs must equal), made once a session
    on ``tiny_cluster`` with its progress bars drawn: ``{"summary": RunSummary,
    "progress": what it printed}``.

    Shared: the end-to-end tests check its record and products, the dashboard tests its
    page, bars and metrics (the lazysky plugin of ``tiny_cluster``'s scheduler watched
    it), the batch, autoscaling and interactive tests compare their runs' rows to its
    rows (``tiny_clean_rows``). Nothing may change it: a test that needs to mutate a run
    makes its own.
    """
    import contextlib
    import io

    from distributed import Client
    from test_run_end_to_end import _config

    from lazysky.config import load_settings
    from lazysky.runner import run

    store = tmp_path_factory.mktemp("tiny-clean-store")
    out = io.StringIO()
    with Client(tiny_cluster) as client, contextlib.redirect_stdout(out):
        summary = run(_config(tiny_survey, store), settings=load_settings(
            catalog_dsn=catalog.dsn), client=client, catalog=catalog, show_progress=True)
    assert summary.status == "done", summary.errors
    return {"summary": summary, "progress": out.getvalue()}


@pytest.fixture(scope="session")
def tiny_clean_run(tiny_clean: dict[str, Any]) -> RunSummary:
    """The summary of the session's clean run of the tiny survey (``tiny_clean``)."""
    summary: RunSummary = tiny_clean["summary"]
    return summary


@pytest.fixture(scope="session")
def tiny_clean_rows(tiny_clean_run: RunSummary,
                    catalog: Catalog) -> dict[str, list[tuple[Any, ...]]]:
    """The catalog rows of the session's clean run of the tiny survey."""
    from test_run_end_to_end import _rows

    rows = _rows(catalog, tiny_clean_run.run_id)
    assert rows["coadd_sources"], "the clean run found no source"
    return rows

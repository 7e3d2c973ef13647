"""`lazysky catalog up|down|status|dsn` and `lazysky cone`."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from astropy.io.votable import parse_single_table

from lazysky.catalog import Catalog, write_sources
from lazysky.cli import main

pytestmark = pytest.mark.postgres

Sources = Callable[..., dict[str, np.ndarray]]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, catalog_dir: Path, catalog: Catalog) -> Path:
    import os

    for name in list(os.environ):
        if name.startswith("LAZYSKY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LAZYSKY_CATALOG_DIR", str(catalog_dir))
    return catalog_dir


@pytest.fixture(scope="module")
def cli_run(catalog: Catalog, sources: Sources) -> str:
    from lazysky.catalog import register_run
    from lazysky.runs import Run, new_run_id

    run = Run(new_run_id("val"))
    register_run(run, catalog=catalog)
    write_sources("coadd", run.run_id, "cli", sources(500, seed=5, ra_range=(30.0, 30.2),
                                                      dec_range=(-60.1, -59.9)),
                  catalog=catalog)
    return run.run_id


def test_status_and_dsn(env: Path, catalog: Catalog,
                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "status"]) == 0
    assert "running" in capsys.readouterr().out
    assert main(["catalog", "dsn"]) == 0
    assert capsys.readouterr().out.strip() == catalog.dsn


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "votable"])
def test_cone_formats(env: Path, cli_run: str, fmt: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    # '--' lets a sexagesimal negative Dec through argparse
    assert main(["cone", "--run", cli_run, "--format", fmt, "--columns", "ra,dec,snr",
                 "--", "02:00:24", "-60:00:00", "3arcmin"]) == 0
    out = capsys.readouterr().out
    if fmt == "json":
        rows = json.loads(out)
        assert rows
        assert set(rows[0]) == {"ra", "dec", "snr", "distance"}
        assert all(r["distance"] <= 180.0 for r in rows)
    elif fmt == "csv":
        assert out.splitlines()[0] == "ra,dec,snr,distance"
    elif fmt == "votable":
        table = parse_single_table(io.BytesIO(out.encode())).to_table()
        assert len(table) > 0
        assert table["ra"].unit == "deg"
    else:
        assert "distance" in out
        assert "arcsec" in out


@pytest.mark.parametrize(("args", "message"), [
    (["cone", "400", "0", "1"], "RA must lie in [0, 360)"),
    (["cone", "10", "0", "0"], "radius must be positive"),
    (["cone", "10", "nan", "1"], "Dec must be an angle"),
    (["cone", "10", "0", "1; DROP TABLE runs"], "radius must be an angle"),
    (["cone", "10", "0", "1", "--table", "runs"], "table must be one of"),
])
def test_cone_bad_input_is_a_message_not_a_traceback(
        env: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_up_status_down(monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(tempfile.mkdtemp(prefix="lazysky-cli-", dir="/tmp"))
    path.chmod(0o755)
    monkeypatch.setenv("LAZYSKY_CATALOG_DIR", str(path))
    monkeypatch.delenv("LAZYSKY_CATALOG_DSN", raising=False)
    try:
        assert main(["catalog", "up"]) == 0
        assert capsys.readouterr().out.startswith("postgresql://lazysky@/lazysky?host=")
        assert main(["catalog", "status"]) == 0
        assert main(["catalog", "down"]) == 0
        assert "stopped" in capsys.readouterr().out
        assert main(["catalog", "status"]) == 3
        assert "stopped" in capsys.readouterr().out
    finally:
        main(["catalog", "down"])
        shutil.rmtree(path, ignore_errors=True)

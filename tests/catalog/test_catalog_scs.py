"""The Simple Cone Search service, run as `lazysky serve`, queried with pyvo."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import psycopg
import pytest
import pyvo
from pyvo.dal import DALQueryError

from lazysky.catalog import Catalog, cone_search, write_sources
from lazysky.catalog.database import READER_ROLE

pytestmark = pytest.mark.postgres

Sources = Callable[..., dict[str, np.ndarray]]


def _serve(catalog_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAZYSKY_")}
    env["LAZYSKY_CATALOG_DIR"] = str(catalog_dir)  # the embedded test server
    proc = subprocess.Popen(
        [sys.executable, "-m", "lazysky", "-q", "serve", "--host", "127.0.0.1", "--port", "0",
         *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"lazysky serve did not start: {line!r} {err}")
    return proc, line.split()[-1]


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=10)


@pytest.fixture(scope="module")
def scs(catalog: Catalog, catalog_dir: Path, sources: Sources,
        finish_lazysky_run: Callable[..., None]) -> Iterator[dict[str, str]]:
    from lazysky.catalog import register_run
    from lazysky.runs import Run, new_run_id

    run = Run(new_run_id("prod"))
    register_run(run, catalog=catalog)
    write_sources("coadd", run.run_id, "scs-0",
                  sources(3000, seed=21, ra_range=(149.5, 150.5), dec_range=(1.5, 2.5)),
                  catalog=catalog)
    from lazysky.catalog.production import publish

    finish_lazysky_run(catalog, run.run_id, "scs-field", ["scs-0"])
    publish(run.run_id, catalog=catalog)
    proc, url = _serve(catalog_dir)
    yield {"url": url, "run": run.run_id}
    _stop(proc)


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, resp.read().decode()


def test_pyvo_search_equals_cone_search(scs: dict[str, str], catalog: Catalog) -> None:
    results = pyvo.dal.SCSService(scs["url"]).search(pos=(150.0, 2.0), radius=0.05)
    expected = cone_search(150.0, 2.0, 0.05, run=scs["run"], catalog=catalog)
    assert len(results) == len(expected) > 0
    got_ids = sorted(str(r.id) for r in results)
    want = sorted(f"{r['run_id']}/{r['tile_id']}/{r['number']}" for r in expected)
    assert got_ids == want
    rec = results[0]
    assert rec.pos.ra.deg == pytest.approx(float(results["ra"][0]))  # via POS_EQ_RA_MAIN
    ucds = {n: results.getdesc(n).ucd for n in results.fieldnames}
    assert ucds["id"] == "ID_MAIN"
    assert ucds["ra"] == "POS_EQ_RA_MAIN"
    assert ucds["dec"] == "POS_EQ_DEC_MAIN"


def test_difference_and_production_services(scs: dict[str, str]) -> None:
    base = scs["url"].split("/scs/")[0]
    diff = pyvo.dal.SCSService(base + "/scs/diff?").search(pos=(150.0, 2.0), radius=0.05)
    assert {"flux_psf", "sign", "ra", "dec", "id"} <= set(diff.fieldnames)
    prod = pyvo.dal.SCSService(base + "/scs/coadd_prod?").search(pos=(150.0, 2.0),
                                                                radius=0.05)
    assert len(prod) > 0  # the module's run is a published production run
    assert {str(r.id).split("/")[0] for r in prod} == {scs["run"]}


def test_verbosity_chooses_columns(scs: dict[str, str]) -> None:
    service = pyvo.dal.SCSService(scs["url"])
    few = service.search(pos=(150.0, 2.0), radius=0.02, verbosity=1)
    many = service.search(pos=(150.0, 2.0), radius=0.02, verbosity=3)
    assert set(few.fieldnames) == {"id", "run_id", "tile_id", "number", "ra", "dec", "distance"}
    assert {"theta", "a", "b"} <= set(many.fieldnames)


def test_sr_zero_is_a_metadata_query(scs: dict[str, str]) -> None:
    status, body = _get(scs["url"] + "RA=150&DEC=2&SR=0")
    assert status == 200
    assert 'name="Error"' not in body
    assert 'ucd="POS_EQ_RA_MAIN"' in body
    results = pyvo.dal.SCSService(scs["url"]).search(pos=(150.0, 2.0), radius=0)
    assert len(results) == 0
    assert "ra" in results.fieldnames


@pytest.mark.parametrize("query", [
    "RA=360&DEC=0&SR=0.1", "RA=-1&DEC=0&SR=0.1", "RA=10&DEC=90.01&SR=0.1",
    "RA=10&DEC=-95&SR=0.1", "RA=10&DEC=0&SR=-0.1", "RA=10&DEC=0&SR=5",
    "RA=NaN&DEC=0&SR=0.1", "RA=10&DEC=inf&SR=0.1", "RA=ten&DEC=0&SR=0.1",
    "RA=&DEC=0&SR=0.1", "DEC=0&SR=0.1", "RA=10&DEC=0", "RA=10&RA=11&DEC=0&SR=0.1",
    "RA=10&DEC=0&SR=0.1&VERB=9",
    "RA=" + quote("10; DROP TABLE runs; --") + "&DEC=0&SR=0.1",
    "RA=10&DEC=" + quote("0 OR 1=1") + "&SR=0.1",
    "RA=10&DEC=0&SR=" + quote("0.1)::scircle; DELETE FROM coadd_sources; --"),
    "RA=10&DEC=0&SR=0.1&VERB=" + quote("2' OR '1'='1"),
    "RA=10&DEC=0&SR=0.1&" + "&".join(f"X{i}=1" for i in range(60)),
])
def test_bad_input_gets_the_error_votable(scs: dict[str, str], catalog: Catalog,
                                          query: str) -> None:
    status, body = _get(scs["url"] + query)
    assert status == 200
    assert '<INFO ID="Error" name="Error" value="' in body
    assert "Traceback" not in body
    assert "internal error" not in body
    with psycopg.connect(catalog.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] > 0


def test_pyvo_raises_the_service_message(scs: dict[str, str]) -> None:
    with pytest.raises(DALQueryError, match=r"Dec must lie in \[-90, 90\]"):
        pyvo.dal.SCSService(scs["url"]).search(pos=(10.0, 0.0), radius=0.1,
                                                DEC=95)  # overrides pos
    with pytest.raises(DALQueryError, match="at most 1 deg"):
        pyvo.dal.SCSService(scs["url"]).search(pos=(10.0, 0.0), radius=3.0)


def test_root_links_to_the_scs_url(scs: dict[str, str]) -> None:
    root = scs["url"].split("/scs/")[0] + "/"
    status, body = _get(root)
    assert status == 200
    assert 'href="/scs/coadd?' in body
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(root + "nope?RA=1")
    assert info.value.code == 404
    assert 'name="Error"' in info.value.read().decode()
    info.value.close()


def test_service_role_is_read_only(catalog: Catalog, scs: dict[str, str]) -> None:
    assert catalog.server is not None
    with psycopg.connect(catalog.server.dsn(user=READER_ROLE)) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("10s",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM coadd_sources")


@pytest.mark.slow
def test_row_limit_marks_overflow(catalog_dir: Path, scs: dict[str, str]) -> None:
    proc, url = _serve(catalog_dir, "--max-rows", "5")
    try:
        results = pyvo.dal.SCSService(url).search(pos=(150.0, 2.0), radius=0.5)
        assert len(results) == 5
        assert results.votable.resources[0].infos[0].value == "OVERFLOW"
    finally:
        _stop(proc)


def test_statement_timeout_is_an_error_response(catalog: Catalog) -> None:
    from lazysky.catalog._errors import CatalogError
    from lazysky.catalog.scs import ServiceLimits, run_query

    limits = ServiceLimits(max_radius_deg=90.0, statement_timeout_ms=1)
    whole_sky = {"RA": ["0"], "DEC": ["0"], "SR": ["90"], "VERB": ["3"]}
    with pytest.raises(CatalogError, match="took too long"):  # cannot finish in 1 ms
        run_query(catalog, "coadd", whole_sky, limits)

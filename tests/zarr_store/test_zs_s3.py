"""S3 for real: a moto server on 127.0.0.1, and a fault-injecting proxy in front of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from zs_helpers import s3_options

from lazysky.errors import IncompleteExposureError
from lazysky.zarr_store import ingest, list_exposures, open_exposure, open_exposures
from lazysky.zarr_store._layout import parse_store

pytestmark = pytest.mark.s3


def _chunk_bytes_s3(url: str, opts: dict, eid: str) -> dict[str, bytes]:
    root = parse_store(url, storage_options=opts)
    fs = root.fs()
    base = root.path("raw", eid, "sci", "c")
    fs.invalidate_cache(base)
    return {p[len(base) + 1 :]: fs.cat_file(p) for p in fs.find(base)}


def _chunk_bytes_local(store: Path, eid: str) -> dict[str, bytes]:
    base = store / "raw" / eid / "sci" / "c"
    return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def test_ingest_list_open_compute_through_moto(make_fits, tmp_path, s3_endpoint, s3_bucket):
    opts = s3_options(s3_endpoint)
    url = f"s3://{s3_bucket}/survey"
    paths = [make_fits(f"s3e{k}", seed=k, mjd=60000.0 + k) for k in range(2)]
    # one source straight from the bucket too
    src_fs = parse_store(f"s3://{s3_bucket}", storage_options=opts).fs()
    src_fs.put_file(str(paths[1]), f"{s3_bucket}/incoming/{paths[1].name}")
    sources = [str(paths[0]), f"s3://{s3_bucket}/incoming/{paths[1].name}"]
    report = ingest(sources, url, tile_shape=(32, 64), storage_options=opts)
    assert report.ok, report.summary()
    assert list_exposures(url, storage_options=opts) == ["s3e0", "s3e1"]
    ds = open_exposures(url, storage_options=opts)
    assert ds is not None
    for k, path in enumerate(paths):
        with fits.open(path) as hdul:
            truth = np.stack([h.data for h in hdul[1:]])
        np.testing.assert_array_equal(ds.sci.isel(exposure=k).values, truth)
    again = ingest(sources, url, tile_shape=(32, 64), storage_options=opts)
    assert [r.status for r in again.results] == ["unchanged", "unchanged"]
    # the same bytes as a local ingest: compression is deterministic
    local = tmp_path / "local"
    assert ingest(paths[0], local, tile_shape=(32, 64)).ok
    assert _chunk_bytes_s3(url, opts, "s3e0") == _chunk_bytes_local(local, "s3e0")


@pytest.mark.slow
def test_faults_with_retries_give_byte_identical_ingest(make_fits, tmp_path, s3_bucket,
                                                        fault_proxy):
    proxy = fault_proxy(rate=0.12, seed=7, max_consecutive=1)
    opts = s3_options(proxy.endpoint, retries=4)
    url = f"s3://{s3_bucket}/faulty"
    path = make_fits("flaky", shape=(64, 96), detectors=2, seed=11)
    report = ingest(path, url, tile_shape=(32, 32), storage_options=opts)
    assert report.ok, report.summary()
    faults = sum(v for k, v in proxy.counts.items() if k != "ok")
    assert faults >= 4, proxy.counts  # the proxy really did get in the way
    assert min(proxy.counts[k] for k in ("503", "500", "drop", "drop_after")) > 0
    local = tmp_path / "local"
    assert ingest(path, local, tile_shape=(32, 32)).ok
    assert _chunk_bytes_s3(url, opts, "flaky") == _chunk_bytes_local(local, "flaky")
    with fits.open(path) as hdul:
        truth = np.stack([h.data for h in hdul[1:]])
    np.testing.assert_array_equal(open_exposure(url, "flaky", storage_options=opts).sci.values,
                                  truth)


def test_retries_exhausted_fail_loudly_and_nothing_complete(make_fits, s3_bucket,
                                                            s3_endpoint, fault_proxy):
    proxy = fault_proxy(rate=1.0, seed=1, only=r"^PUT .*/sci/c/", max_consecutive=1000)
    opts = s3_options(proxy.endpoint, retries=1)
    url = f"s3://{s3_bucket}/broken"
    path = make_fits("doomed", shape=(64, 64), detectors=2)
    report = ingest(path, url, tile_shape=(32, 32), storage_options=opts)
    assert not report.ok
    assert "doomed" in report.failed[0].error or path.name in report.failed[0].error
    assert proxy.counts["ok"] > 0  # template writes went through; chunk writes did not
    clean = s3_options(s3_endpoint)
    assert list_exposures(url, storage_options=clean) == []
    assert list_exposures(url, storage_options=clean, include_incomplete=True) == ["doomed"]
    with pytest.raises(IncompleteExposureError):
        open_exposure(url, "doomed", storage_options=clean)
    # and once the store behaves again, the same command finishes the job
    assert ingest(path, url, tile_shape=(32, 32), storage_options=clean).ok
    assert list_exposures(url, storage_options=clean) == ["doomed"]


def test_cli_ingest_to_s3_with_settings_from_environment(make_fits, s3_endpoint, s3_bucket,
                                                         monkeypatch, capsys):
    from lazysky.cli import main
    from lazysky.config import load_settings

    monkeypatch.delenv("LAZYSKY_CONFIG", raising=False)
    for key, value in {"ENDPOINT_URL": s3_endpoint, "KEY": "testing", "SECRET": "testing",
                       "REGION": "us-east-1", "RETRIES": "3"}.items():
        monkeypatch.setenv(f"LAZYSKY_S3__{key}", value)
    url = f"s3://{s3_bucket}/cli"
    path = make_fits("cli-s3")
    assert main(["ingest", str(path), "--store", url]) == 0
    assert "ingested 1" in capsys.readouterr().out
    settings = load_settings()
    assert list_exposures(url, settings=settings) == ["cli-s3"]
    ds = open_exposure(url, "cli-s3", settings=settings)
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(ds.sci[2].values, hdul[3].data)

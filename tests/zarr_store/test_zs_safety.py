"""Idempotency, refusal, bad input, corruption, atomicity (SIGKILL mid-ingest), the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from lazysky.cli import main
from lazysky.errors import IncompleteExposureError, StoreError
from lazysky.zarr_store import ingest, list_exposures, open_exposure


def _group_meta(store: Path, eid: str) -> Path:
    return store / "raw" / eid / "zarr.json"


def test_reingest_same_bytes_is_a_noop(make_fits, tmp_path):
    path, store = make_fits("idem"), tmp_path / "s"
    assert [r.status for r in ingest(path, store).results] == ["ingested"]
    meta = _group_meta(store, "idem")
    before = (meta.read_bytes(), meta.stat().st_mtime_ns)
    chunk = next((store / "raw/idem/sci/c").rglob("*/*/*"))
    chunk_ino = chunk.stat().st_ino
    again = ingest(path, store)
    assert [r.status for r in again.results] == ["unchanged"]
    assert (meta.read_bytes(), meta.stat().st_mtime_ns) == before
    assert chunk.stat().st_ino == chunk_ino  # not rewritten
    assert list_exposures(store) == ["idem"]


def test_different_file_under_existing_id_refused_unless_overwrite(make_fits, tmp_path):
    store = tmp_path / "s"
    first = make_fits("same-id", seed=1)
    second = make_fits("same-id", seed=2)
    assert ingest(first, store).ok
    report = ingest(second, store)
    assert not report.ok
    err = report.failed[0].error
    assert "same-id" in err
    assert "overwrite" in err
    assert second.name in err
    with fits.open(first) as hdul:
        np.testing.assert_array_equal(open_exposure(store, "same-id").sci[0].values, hdul[1].data)
    assert ingest(second, store, overwrite=True).ok
    with fits.open(second) as hdul:
        np.testing.assert_array_equal(open_exposure(store, "same-id").sci[0].values, hdul[1].data)


def test_duplicate_exposure_ids_in_one_batch(make_fits, tmp_path):
    a, b = make_fits("dup", seed=1), make_fits("dup", seed=2)
    report = ingest([a, b], tmp_path / "s")
    assert [r.status for r in report.results] == ["ingested", "failed"]
    assert a.name in report.failed[0].error


def _write_bad_files(tmp: Path, make_fits) -> dict[str, tuple[Path, list[str]]]:
    """Bad files and the words their error must contain (file name added by the test)."""
    bad: dict[str, tuple[Path, list[str]]] = {}
    good = make_fits("good-one")
    raw = good.read_bytes()
    p = tmp / "truncated.fits"
    p.write_bytes(raw[: len(raw) - 7000])
    bad["truncated"] = (p, ["truncated"])
    p = tmp / "notfits.fits"
    p.write_text("SIMPLE? no, this is a text file\n" * 200)
    bad["not FITS"] = (p, ["not a readable FITS file"])
    with fits.open(good) as hdul:
        # data byte flipped, CHECKSUM/DATASUM present: astropy itself opens it silently
        flipped = bytearray(raw)
        flipped[hdul.fileinfo(2)["datLoc"] + 1234] ^= 0x10
        p = tmp / "flipped.fits"
        p.write_bytes(bytes(flipped))
        bad["flipped byte"] = (p, ["HDU 2", "CCD02", "DATASUM", "corrupt"])
        hdus = [h.copy() for h in hdul]
    variants = {
        "missing EXTNAME": (lambda h: h[2].header.remove("EXTNAME"), ["HDU 2", "EXTNAME"]),
        "duplicate EXTNAME": (lambda h: h[3].header.set("EXTNAME", "CCD01"),
                              ["HDU 3", "duplicate", "CCD01"]),
        "wrong shape": (lambda h: h.__setitem__(2, fits.ImageHDU(
            np.zeros((10, 10), np.uint16), header=h[2].header)), ["HDU 2", "shape"]),
        "3-D image": (lambda h: h.__setitem__(3, fits.ImageHDU(
            np.zeros((2, 100, 140), np.uint16), name="CCD03")), ["HDU 3", "2-D"]),
        "bad DATASEC": (lambda h: h[1].header.set("DATASEC", "[1:999,1:100]"),
                        ["HDU 1", "DATASEC", "beyond"]),
        "GAIN not a number": (lambda h: h[1].header.set("GAIN", "high"),
                              ["HDU 1", "GAIN", "must be a number"]),
        "bad EXPID": (lambda h: h[0].header.set("EXPID", "no/slashes here"),
                      ["HDU 0", "EXPID"]),
    }
    for label, (mutate, words) in variants.items():
        hl = fits.HDUList([h.copy() for h in hdus])
        mutate(hl)
        p = tmp / (label.replace(" ", "_") + ".fits")
        hl.writeto(p, checksum=True)
        bad[label] = (p, words)
    return bad


def test_bad_files_never_sink_the_batch(make_fits, tmp_path):
    bad = _write_bad_files(tmp_path, make_fits)
    good = make_fits("fine-one", seed=5)
    sources = [p for p, _ in bad.values()] + [good]
    report = ingest(sources, tmp_path / "s")
    by_source = {Path(r.source).name: r for r in report.results}
    assert by_source[good.name].status == "ingested"
    for label, (path, words) in bad.items():
        r = by_source[path.name]
        assert r.status == "failed", label
        for word in [path.name, *words]:
            assert word in r.error, (label, r.error)
    assert list_exposures(tmp_path / "s") == ["fine-one"]
    assert not (tmp_path / "s" / "raw" / "good-one").exists()


def test_required_keywords(make_fits, tmp_path):
    path = make_fits("req1")
    report = ingest(path, tmp_path / "s", require=["INSTRUME", "AIRMASS"])
    assert "missing required keyword AIRMASS" in report.failed[0].error
    assert "HDU 0" in report.failed[0].error


def test_cli_reports_both_lists_and_exits_nonzero(make_fits, tmp_path, capsys):
    good = make_fits("cli-good")
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"\0" * 5000)
    store = tmp_path / "s"
    status = main(["ingest", str(good), str(junk), "--store", str(store), "--tile", "64,64"])
    out = capsys.readouterr().out
    assert status == 1
    assert "ingested 1, unchanged 0, failed 1" in out
    assert "cli-good" in out
    assert "junk.fits" in out
    assert main(["ingest", str(good), "--store", str(store)]) == 0
    assert "unchanged 1" in capsys.readouterr().out


_CHILD = textwrap.dedent("""
    import sys, threading, time
    import dask
    import lazysky.zarr_store._write as w
    original, done, lock = w.write_region, [], threading.Lock()
    def slow(*args, **kwargs):
        original(*args, **kwargs)
        with lock:
            done.append(1)
            if len(done) == int(sys.argv[3]):
                print("HALF", flush=True)
        if len(done) >= int(sys.argv[3]):
            time.sleep(120)
    w.write_region = slow
    from lazysky.zarr_store import ingest
    with dask.config.set(scheduler="threads", num_workers=2):
        ingest(sys.argv[1], sys.argv[2], tile_shape=(16, 16))
""")


@pytest.mark.slow
def test_sigkill_mid_ingest_then_ingest_again(make_fits, tmp_path):
    path = make_fits("killed", shape=(96, 64), detectors=4)
    store = tmp_path / "s"
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(store), "7"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        watchdog = threading.Timer(120, child.kill)  # never hang the suite
        watchdog.start()
        try:
            line = child.stdout.readline()  # type: ignore[union-attr]
        finally:
            watchdog.cancel()
            os.kill(child.pid, signal.SIGKILL)  # mid-ingest: 7 of 24 chunk rows written
            _, err = child.communicate()
    assert line.strip() == "HALF", err
    assert list_exposures(store) == []
    assert list_exposures(store, include_incomplete=True) == ["killed"]
    with pytest.raises(IncompleteExposureError, match=r"incomplete.*Re-run"):
        open_exposure(store, "killed")
    chunks = store / "raw/killed/sci/c"
    before = {p.relative_to(chunks): p.stat().st_ino for p in chunks.rglob("*") if p.is_file()}
    assert 0 < len(before) < 4 * 6 * 4
    # rows whose 4 chunks were all written must be kept (resumed), not rewritten
    full_rows = {(k.parts[0], k.parts[1]) for k in before
                 if all((Path(k.parts[0]) / k.parts[1] / str(j)) in before for j in range(4))}
    report = ingest(path, store, tile_shape=(16, 16))
    assert report.ok, report.summary()
    after = {p.relative_to(chunks): p.stat().st_ino for p in chunks.rglob("*") if p.is_file()}
    assert len(after) == 4 * 6 * 4  # every chunk, nothing extra (no .partial leftovers)
    kept = [k for k in before if (k.parts[0], k.parts[1]) in full_rows]
    assert kept
    assert all(after[k] == before[k] for k in kept)
    assert list_exposures(store) == ["killed"]
    ds = open_exposure(store, "killed")
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(ds.sci.values, np.stack([h.data for h in hdul[1:]]))


def test_open_refuses_incomplete_and_unknown(make_fits, tmp_path):
    store = tmp_path / "s"
    assert ingest(make_fits("half"), store).ok
    _group_meta(store, "half").unlink()  # as if the ingest died before its last write
    with pytest.raises(IncompleteExposureError, match=r"'half'.*incomplete"):
        open_exposure(store, "half")
    with pytest.raises(StoreError, match="no exposure 'nope'"):
        open_exposure(store, "nope")
    import xarray as xr
    with pytest.raises(Exception):  # noqa: B017, PT011 - plain zarr readers refuse it too
        xr.open_zarr(store / "raw" / "half", consolidated=False)

"""Small pieces: sources, sections, checksums, errors, parameters."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from astropy.io import fits

from lazysky.errors import (
    FitsCorruptError,
    FitsFormatError,
    IncompleteExposureError,
    ParameterError,
    StoreError,
)
from lazysky.zarr_store import expand_sources, ingest, open_exposures, parse_iraf_section
from lazysky.zarr_store._sums import ones_complement_sum


def test_sources_from_directories_and_globs(make_fits, tmp_path):
    a, b = make_fits("src-a"), make_fits("src-b", seed=1)
    (tmp_path / "notes.txt").write_text("not FITS")
    from_dir = [s.url for s in expand_sources(tmp_path)]
    assert from_dir == sorted([str(a), str(b)])
    assert [s.url for s in expand_sources(str(tmp_path / "src-a*.fits"))] == [str(a)]
    report = ingest(tmp_path, tmp_path / "store")
    assert sorted(r.exposure_id for r in report.ingested) == ["src-a", "src-b"]


def test_iraf_sections():
    assert parse_iraf_section("[1:2048,1:4096]") == (slice(0, 4096), slice(0, 2048))
    assert parse_iraf_section(" [ 2049:2080 , 1:10 ] ") == (slice(0, 10), slice(2048, 2080))
    with pytest.raises(FitsFormatError, match="not an IRAF section"):
        parse_iraf_section("1:10,1:10")
    with pytest.raises(FitsFormatError, match="x1 <= x2"):
        parse_iraf_section("[10:1,1:10]")
    with pytest.raises(FitsFormatError, match="beyond the image"):
        parse_iraf_section("[1:11,1:10]", shape=(10, 10))


def test_ones_complement_sum_matches_astropy(tmp_path):
    rng = np.random.default_rng(0)
    hdu = fits.ImageHDU(rng.integers(-(2**31), 2**31, size=(37, 53), dtype=np.int32))
    hdu.add_datasum()
    raw = hdu.data.astype(">i4").tobytes()  # the bytes as stored in the file
    raw += b"\0" * (-len(raw) % 2880)
    assert ones_complement_sum(raw) == int(hdu.header["DATASUM"])
    half = len(raw) // 2 // 4 * 4  # streaming in pieces gives the same sum
    assert ones_complement_sum(raw[half:], ones_complement_sum(raw[:half])) == int(
        hdu.header["DATASUM"])


@pytest.mark.parametrize("cls", [FitsCorruptError, StoreError, IncompleteExposureError])
def test_errors_pickle_and_inherit_builtins(cls):
    err = pickle.loads(pickle.dumps(cls("file.fits: HDU 2: broken")))
    assert type(err) is cls
    assert str(err) == "file.fits: HDU 2: broken"
    assert isinstance(err, ValueError | OSError)


def test_parameters_are_checked(make_fits, tmp_path):
    path = make_fits("params")
    with pytest.raises(ParameterError, match="tile_shape"):
        ingest(path, tmp_path / "s", tile_shape=(8, 8))
    with pytest.raises(ParameterError, match="compression_level"):
        ingest(path, tmp_path / "s", compression_level=12)
    with pytest.raises(ParameterError, match="store must"):
        ingest(path, "")


def test_open_exposures_refuses_mixed_instruments(make_fits, tmp_path):
    assert ingest(make_fits("wide", detectors=2), tmp_path / "s").ok
    assert ingest(make_fits("narrow", detectors=3), tmp_path / "s").ok
    with pytest.raises(ParameterError, match="differ in detectors or shape"):
        open_exposures(tmp_path / "s")
    with pytest.raises(ParameterError, match="SkyCoord"):
        open_exposures(tmp_path / "s", footprint=(150.0, 2.0))


def test_misaligned_region_writes_are_refused(tmp_path):
    import zarr

    from lazysky.zarr_store._write import write_region

    arr = zarr.create_array(tmp_path / "a", shape=(1, 40, 30), chunks=(1, 16, 30), dtype="i2")
    write_region(arr, 0, 16, np.ones((16, 30), "i2"), 16)  # a whole chunk row
    write_region(arr, 0, 32, np.ones((8, 30), "i2"), 16)  # the last, short one
    with pytest.raises(StoreError, match=r"misaligned.*multiple of the tile height"):
        write_region(arr, 0, 8, np.ones((16, 30), "i2"), 16)
    with pytest.raises(StoreError, match="misaligned"):
        write_region(arr, 0, 0, np.ones((16, 20), "i2"), 16)  # not full width


@pytest.mark.parametrize("cut", [100, 2880 * 3, 7000])
def test_truncation_caught_even_when_astropy_only_warns(make_fits, tmp_path, cut):
    import warnings

    from lazysky.zarr_store._fits import FitsSource, inspect_fits

    raw = make_fits("trunc").read_bytes()
    path = tmp_path / "cut.fits"
    path.write_bytes(raw[: len(raw) - cut])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in production: astropy's warning is not an error
        with pytest.raises(FitsCorruptError, match=r"cut.fits: truncated: its headers describe"):
            inspect_fits(FitsSource(str(path)))

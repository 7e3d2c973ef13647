"""Reading calibrated FITS for the coadd: lazily, one read task per detector, same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from conftest import assert_same, raise_if_dask_computes

from lazysky.errors import FitsFormatError
from lazysky.pipeline._mask import MaskBit
from lazysky.pipeline.fitsio import read_calibrated


def _calibrated_file(path: Path, *, with_var: bool = True) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(5)
    img = rng.normal(0.0, 3.0, (40, 56)).astype(np.float32)
    img[7, 9] = np.nan  # a non-finite pixel: NODATA
    var = np.full(img.shape, 9.0, np.float32)
    mask = np.zeros(img.shape, np.uint16)
    mask[3, 4] = int(MaskBit.CR)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cdelt = [-7e-5, 7e-5]
    w.wcs.crval = [10.0, 20.0]
    w.wcs.crpix = [20, 28]
    hdus: list[fits.hdu.base.ExtensionHDU] = [fits.ImageHDU(img, w.to_header(), name="CCD01")]
    if with_var:
        hdus += [fits.ImageHDU(var, name="CCD01_VAR"), fits.ImageHDU(mask, name="CCD01_MASK")]
    fits.HDUList([fits.PrimaryHDU(), *hdus]).writeto(path)
    return img, var, mask


def test_read_calibrated_is_lazy_and_reads_the_same_pixels(tmp_path: Path) -> None:
    img, var, _ = _calibrated_file(tmp_path / "a.cal.fits")
    with raise_if_dask_computes():
        (ds,) = read_calibrated(tmp_path / "a.cal.fits", tile_px=16)
    layers = [str(k) for k in ds.image.data.dask.layers]
    assert any(k.startswith("read-calibrated-a.cal.fits-CCD01-") for k in layers)
    assert ds.image.data.chunks[1][0] == 16  # tiles as asked
    got = ds.compute()
    expected = np.where(np.isfinite(img), img, 0)
    assert_same(got.image.values[0], expected)
    assert got.variance.values[0, 7, 9] == np.inf
    assert got.mask.values[0, 7, 9] == int(MaskBit.NODATA)
    assert got.mask.values[0, 3, 4] == int(MaskBit.CR)
    assert_same(got.variance.values[0][np.isfinite(img)], var[np.isfinite(img)])


def test_read_calibrated_without_variance_estimates_it_in_the_task(tmp_path: Path) -> None:
    _calibrated_file(tmp_path / "b.fits", with_var=False)
    (ds,) = read_calibrated(tmp_path / "b.fits")
    assert ds.attrs["variance_estimated"]
    v = ds.variance.values[0]
    finite = v[np.isfinite(v)]
    assert np.all(finite == finite[0])
    assert 4.0 < float(finite[0]) < 16.0  # the sky noise² of a σ = 3 image


@pytest.mark.parametrize("cut", [100, 2880 * 3 + 500])  # inside a header; inside the data
def test_read_calibrated_refuses_a_truncated_file_before_any_graph(
    tmp_path: Path, cut: int
) -> None:
    _calibrated_file(tmp_path / "c.fits")
    data = (tmp_path / "c.fits").read_bytes()
    (tmp_path / "cut.fits").write_bytes(data[: len(data) - cut])
    with pytest.raises(FitsFormatError, match=r"cut\.fits is not a readable FITS file"):
        read_calibrated(tmp_path / "cut.fits")


def test_read_calibrated_reads_scaled_and_other_types_through_astropy(tmp_path: Path) -> None:
    # plain float32 / 16-bit planes are read straight into native arrays; anything else
    # (here a scaled 16-bit image, a float64 variance, a 32-bit mask) through astropy:
    # both give what astropy gives
    img, var, mask = _calibrated_file(tmp_path / "plain.fits")
    w = fits.getheader(tmp_path / "plain.fits", "CCD01")
    scaled = fits.ImageHDU(np.round(np.nan_to_num(img) * 10).astype(np.int16), w, name="CCD01")
    scaled.header["BSCALE"], scaled.header["BZERO"] = 0.1, 5.0
    planes = [fits.ImageHDU(var.astype(np.float64), name="CCD01_VAR"),
              fits.ImageHDU(mask.astype(np.int32), name="CCD01_MASK")]  # fmt: skip
    fits.HDUList([fits.PrimaryHDU(), scaled, *planes]).writeto(tmp_path / "other.fits")
    (plain,) = read_calibrated(tmp_path / "plain.fits")
    (other,) = read_calibrated(tmp_path / "other.fits")
    with fits.open(tmp_path / "other.fits") as hdul:
        assert_same(other.image.values[0], np.asarray(hdul[1].data, dtype=np.float32))
    assert other.image.dtype == np.float32
    assert other.mask.dtype == np.uint16
    assert_same(other.mask.values[0], mask)  # the scaled image has no NaN: no NODATA
    assert_same(other.variance.values[0], var)
    assert_same(plain.mask.values[0][np.isfinite(img)], mask[np.isfinite(img)])


def test_read_calibrated_refuses_a_file_cut_after_the_graph_was_built(tmp_path: Path) -> None:
    _calibrated_file(tmp_path / "d.fits")
    (ds,) = read_calibrated(tmp_path / "d.fits")
    data = (tmp_path / "d.fits").read_bytes()
    (tmp_path / "d.fits").write_bytes(data[: len(data) - 2880 - 500])  # into the mask's data
    with pytest.raises(FitsFormatError, match=r"d\.fits is not a readable FITS file .*early"):
        ds.compute()


def test_read_calibrated_whole_detectors_as_one_chunk(tmp_path: Path) -> None:
    _calibrated_file(tmp_path / "e.fits")
    (tiled,) = read_calibrated(tmp_path / "e.fits", tile_px=16)
    (whole,) = read_calibrated(tmp_path / "e.fits", tile_px=None)
    assert whole.image.data.chunks == ((1,), (40,), (56,))
    assert whole.mask.data.numblocks == (1, 1, 1)
    for name in ("image", "variance", "mask"):
        assert_same(whole[name].values, tiled[name].values)


def test_read_calibrated_compressed_inputs_read_through_astropy(tmp_path: Path) -> None:
    # a gzip'd file and a tile-compressed image: their bytes on disk are not the pixels,
    # so they are read through astropy, not straight into arrays
    import gzip

    _calibrated_file(tmp_path / "p.fits")
    (tmp_path / "p.fits.gz").write_bytes(gzip.compress((tmp_path / "p.fits").read_bytes()))
    with fits.open(tmp_path / "p.fits") as hdul:
        tiles = fits.CompImageHDU(hdul[1].data, hdul[1].header, name="CCD01",
                                  compression_type="GZIP_1", quantize_level=0.0)  # fmt: skip
        fits.HDUList([fits.PrimaryHDU(), tiles, hdul[2].copy(), hdul[3].copy()]).writeto(
            tmp_path / "t.fits")
    (plain,) = read_calibrated(tmp_path / "p.fits")
    for name in ("p.fits.gz", "t.fits"):
        (ds,) = read_calibrated(tmp_path / name)
        for plane in ("image", "variance", "mask"):
            assert_same(ds[plane].values, plain[plane].values)

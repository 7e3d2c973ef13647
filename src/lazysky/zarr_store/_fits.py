"""Reading and validating FITS exposures: lazily, one row band at a time.

:func:`inspect_fits` reads the headers and streams the file once (SHA-256, truncation,
CHECKSUM/DATASUM) without holding more than one block in memory; :func:`iter_bands`
yields a detector's pixels as native-endian bands through ``ImageHDU.section``, so a
multi-GB file never sits whole in a worker. Both take a :class:`FitsSource`, which pickles.

Keywords
--------
Required: ``EXTNAME`` on every image extension of a multi-extension file (it is the
detector name; names must be unique), plus any primary keywords the caller lists in
``require``. Validated when present: ``EXPID`` (the exposure id; default: the file name
without ``.fits``/``.fit``/``.fz``/``.gz``), ``DATASEC``/``BIASSEC`` (IRAF sections inside
the image), and the numbers ``MJD-OBS``, ``EXPTIME``, ``RA``, ``DEC``, ``GAIN``,
``RDNOISE``, ``SATURATE`` (a string holding a number is accepted; ``RA``/``DEC`` may also
be sexagesimal strings). Every detector must be 2-D, with the same shape and dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits

from lazysky.errors import FitsCorruptError, FitsFormatError, LazySkyError
from lazysky.zarr_store._headers import header_to_cards, parse_iraf_section
from lazysky.zarr_store._layout import split_protocol, validate_exposure_id
from lazysky.zarr_store._sums import HduSpan, stream_verify

__all__ = ["DetectorInfo", "ExposureSource", "FitsSource", "inspect_fits", "iter_bands"]

logger = logging.getLogger(__name__)

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz", ".fz")
_IMAGE_HDUS = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)


@dataclass(frozen=True)
class FitsSource:
    """A FITS file to read: local path or fsspec URL, with its fsspec options."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_gzip(self) -> bool:
        return self.url.lower().endswith(".gz")

    def stem(self) -> str:
        name = self.name
        for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name

    @contextlib.contextmanager
    def open_binary(self) -> Iterator[Any]:
        """The raw bytes of the file, as a seekable binary file object."""
        from lazysky.zarr_store._layout import filesystem

        protocol, path = split_protocol(self.url)
        fs = filesystem(protocol, self.storage_options)
        with fs.open(path, "rb") as fobj:
            yield fobj

    @contextlib.contextmanager
    def open_hdul(self) -> Iterator[fits.HDUList]:
        """The file as a lazily loaded HDUList (headers on demand, no data read)."""
        protocol, path = split_protocol(self.url)
        # lazysky owns the file object, so it is closed even when astropy fails mid-open
        if protocol == "file":
            with open(path, "rb") as fobj, fits.open(fobj, lazy_load_hdus=True) as hdul:
                yield hdul
        else:
            with self.open_binary() as fobj, fits.open(fobj, lazy_load_hdus=True) as hdul:
                yield hdul


@dataclass(frozen=True)
class DetectorInfo:
    """One detector (image HDU) of an exposure."""

    name: str
    hdu_index: int
    cards: tuple[str, ...]


@dataclass(frozen=True)
class ExposureSource:
    """Everything ingest needs to know about a FITS exposure, from one pass over it."""

    source: FitsSource
    exposure_id: str
    sha256: str
    size: int
    shape: tuple[int, int]
    dtype: str
    primary_cards: tuple[str, ...]
    detectors: tuple[DetectorInfo, ...]
    checksums_verified: int


def _where(src: FitsSource, index: int, hdu: Any = None) -> str:
    extname = f" ({hdu.name})" if hdu is not None and str(getattr(hdu, "name", "")) else ""
    return f"{src.name}: HDU {index}{extname}: "


def _probe_dtype(hdu: Any) -> np.dtype[Any]:
    """The physical dtype astropy gives this HDU (BZERO/BSCALE applied), from one pixel."""
    return np.dtype(hdu.section[:1, :1].dtype).newbyteorder("=")


def _detector_name(hdu: Any, index: int, n_images: int, src: FitsSource) -> str:
    extname = str(hdu.header.get("EXTNAME", "")).strip()
    if index == 0:
        return extname or str(hdu.header.get("DETECTOR", "")).strip() or "PRIMARY"
    if not extname and n_images == 1:
        return str(hdu.header.get("DETECTOR", "")).strip() or f"HDU{index}"
    if not extname:
        msg = (
            f"{_where(src, index)}missing required keyword EXTNAME: every image extension "
            "of a multi-extension exposure must name its detector (EXTNAME = 'CCD01')"
        )
        raise FitsFormatError(msg)
    return extname


def _check_keywords(header: fits.Header, shape: tuple[int, int], where: str) -> None:
    from lazysky.zarr_store._headers import header_float

    for key in ("MJD-OBS", "EXPTIME", "GAIN", "RDNOISE", "SATURATE"):
        header_float(header, key, where=where)
    for key in ("RA", "DEC"):  # a number, or a sexagesimal string such as '16:41:42.3'
        if key in header and not isinstance(header[key], str):
            header_float(header, key, where=where)
    for key in ("DATASEC", "BIASSEC"):
        if key in header:
            parse_iraf_section(header[key], shape=shape, where=f"{where}keyword {key}: ")


def inspect_fits(
    src: FitsSource, *, require: tuple[str, ...] = (), verify: bool = True
) -> ExposureSource:
    """Read the headers of ``src``, check its structure and bytes; read no pixel array.

    With ``verify=False`` the bytes are not streamed (no SHA-256, size from the file
    system, CHECKSUM/DATASUM unchecked): for quick lazy opening of FITS files.

    Raises
    ------
    FitsFormatError
        Not FITS, or a missing/invalid keyword, wrong shape, duplicate detector name
        (the message names the file, HDU and keyword).
    FitsCorruptError
        Truncated, or CHECKSUM/DATASUM do not match the bytes.
    """
    try:
        with src.open_hdul() as hdul:
            hdus = list(hdul)
            spans = [HduSpan.from_fileinfo(hdul.fileinfo(i)) for i in range(len(hdus))]
            images: list[tuple[int, Any]] = [
                (i, h)
                for i, h in enumerate(hdus)
                if isinstance(h, _IMAGE_HDUS) and h.header.get("NAXIS", 0) > 0
            ]
            for i, h in enumerate(hdus):
                if not isinstance(h, _IMAGE_HDUS):
                    logger.debug("%sskipping a %s", _where(src, i, h), type(h).__name__)
            if not images:
                msg = f"{src.name}: no image HDU with data (HDUs: {[h.name for h in hdus]})"
                raise FitsFormatError(msg)
            primary = hdus[0].header
            for key in require:
                if key not in primary:
                    msg = f"{_where(src, 0)}missing required keyword {key}"
                    raise FitsFormatError(msg)
            raw_id = primary.get("EXPID")
            exposure_id = str(raw_id).strip() if raw_id not in (None, "") else src.stem()
            validate_exposure_id(exposure_id, where=f"{_where(src, 0)}keyword EXPID: ")
            detectors: list[DetectorInfo] = []
            shape: tuple[int, int] | None = None
            dtype: np.dtype[Any] | None = None
            seen: dict[str, int] = {}
            for i, hdu in images:
                where = _where(src, i, hdu)
                this_shape = tuple(int(n) for n in hdu.shape)
                if len(this_shape) != 2:
                    msg = f"{where}image of shape {this_shape}: expected a 2-D detector image"
                    raise FitsFormatError(msg)
                if shape is not None and this_shape != shape:
                    msg = (
                        f"{where}image of shape {this_shape}, but the first detector is "
                        f"{shape}: all detectors of an exposure must have the same shape"
                    )
                    raise FitsFormatError(msg)
                name = _detector_name(hdu, i, len(images), src)
                if name in seen:
                    msg = (
                        f"{where}duplicate extension name {name!r} (also HDU {seen[name]}): "
                        "detector names (EXTNAME) must be unique"
                    )
                    raise FitsFormatError(msg)
                seen[name] = i
                _check_keywords(hdu.header, this_shape, where)
                this_dtype = _probe_dtype(hdu)
                if dtype is not None and this_dtype != dtype:
                    msg = f"{where}dtype {this_dtype}, but the first detector is {dtype}"
                    raise FitsFormatError(msg)
                shape, dtype = this_shape, this_dtype
                detectors.append(DetectorInfo(name, i, tuple(header_to_cards(hdu.header))))
            primary_cards = tuple(header_to_cards(primary))
    except LazySkyError:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError, Warning) as exc:
        text = str(exc)
        kind = FitsCorruptError if "truncat" in text.lower() else FitsFormatError
        msg = f"{src.name}: not a readable FITS file ({type(exc).__name__}: {text})"
        raise kind(msg) from None
    if verify:
        sha, size, n_verified = stream_verify(src, spans)
    else:
        sha, size, n_verified = "", max(s.data_end for s in spans), 0
    return ExposureSource(
        source=src,
        exposure_id=exposure_id,
        sha256=sha,
        size=size,
        shape=(int(shape[0]), int(shape[1])) if shape else (0, 0),
        dtype=dtype.str if dtype is not None else "",
        primary_cards=primary_cards,
        detectors=tuple(detectors),
        checksums_verified=n_verified,
    )


def iter_bands(
    src: FitsSource, hdu_index: int, band_rows: int, *, starts: list[int] | None = None
) -> Iterator[tuple[int, np.ndarray[Any, Any]]]:
    """Yield ``(y0, band)`` for rows ``y0 : y0 + band_rows`` of one image HDU, in order.

    ``starts`` limits the bands to those first rows (default: every band).

    Each band is read with ``section`` (only those rows leave the file), converted once to
    native byte order with BZERO/BSCALE applied (uint16 stays uint16).
    """
    with src.open_hdul() as hdul:
        hdu = hdul[hdu_index]
        ny = int(hdu.shape[0])
        for y0 in range(0, ny, band_rows) if starts is None else sorted(starts):
            band = np.asarray(hdu.section[y0 : min(y0 + band_rows, ny), :])
            yield y0, band.astype(band.dtype.newbyteorder("="), copy=False)


def sha256_of(src: FitsSource, *, block_size: int = 8 << 20) -> str:
    """SHA-256 of the file's bytes, streamed."""
    digest = hashlib.sha256()
    with src.open_binary() as fobj:
        while chunk := fobj.read(block_size):
            digest.update(chunk)
    return digest.hexdigest()

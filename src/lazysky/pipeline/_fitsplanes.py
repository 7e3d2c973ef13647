"""FITS image planes in and out with one copy: the coadd's read and write of pixels.

FITS stores pixels big-endian. Reading a plane through astropy (``np.array(hdu.data,
dtype)``) allocates the big-endian array, then a native copy of it (and, for unsigned
16-bit planes, a third: ``BZERO = 32768`` is applied as a cast); on this pipeline's
4096 × 2048 frames every fresh page costs the kernel a zeroing, and these copies were a
large part of the read's CPU. :func:`read_native` reads a plain image HDU's bytes
straight into the array it returns and swaps them in place: one allocation, one pass.
Anything else (scaled or compressed data, other pixel types) returns None and the caller
reads it through astropy as before.

:func:`write_rows` is the other way: native rows converted to FITS's byte order a few at
a time into a small buffer and written with ``os.pwrite`` at their offsets, so a plane
reaches the file without a big-endian copy of it, and its pages are filled by the write
itself (a memory map of a new file has every page zeroed by the kernel first).
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

__all__ = ["read_native", "write_rows"]

_ROWS_PER_WRITE_BYTES = 1 << 20  # rows converted and written at once: ~1 MiB, in cache


def _native_kind(header: fits.Header) -> tuple[Any, int] | None:
    """``(unsigned dtype to read the bits into, xor to apply)`` of a plain plane, or None.

    Plain: an uncompressed 2-d image of float32 (no scaling) or 16-bit integers stored
    as such (``BZERO`` 0) or as unsigned (``BZERO`` 32768: the value is the stored bits
    with the sign bit flipped), without ``BLANK``.
    """
    if header.get("ZIMAGE") or int(header.get("NAXIS", 0)) != 2:
        return None
    bscale, bzero = header.get("BSCALE", 1), header.get("BZERO", 0)
    bitpix = header.get("BITPIX")
    if bitpix == -32 and bscale == 1 and bzero == 0:
        return np.uint32, 0
    if bitpix == 16 and bscale == 1 and bzero in (0, 32768) and "BLANK" not in header:
        return np.uint16, 0x8000 if bzero == 32768 else 0
    return None


def read_native(
    f: io.RawIOBase, hdul: fits.HDUList, index: int, dtype: Any
) -> NDArray[Any] | None:
    """HDU ``index`` of ``hdul`` (opened on the file ``f`` reads) as a native ``dtype`` array.

    ``dtype`` is what the caller wants: ``float32`` for a ``BITPIX = -32`` plane,
    ``uint16`` for a 16-bit one (stored signed with ``BZERO`` 32768, or signed: the same
    bits as astropy's values cast to ``uint16``). Returns None when the HDU is not such a
    plain plane (read it through astropy then). Raises ``OSError`` when the file holds
    fewer bytes than the header describes.
    """
    hdu = hdul[index]
    if type(hdu) not in (fits.PrimaryHDU, fits.ImageHDU):  # CompImageHDU is an ImageHDU
        return None
    header = hdu.header
    kind = _native_kind(header)
    if kind is None or np.dtype(kind[0]).itemsize != np.dtype(dtype).itemsize:
        return None
    bits, flip = kind
    if (np.dtype(dtype).kind == "f") != (bits == np.uint32):
        return None
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    out = np.empty(shape, dtype=bits)
    view = out.data.cast("B")
    f.seek(int(hdul.fileinfo(index)["datLoc"]))
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            msg = f"{getattr(f, 'name', 'file')}: HDU {index} ends {len(view) - done} bytes early"
            raise OSError(msg)
        done += n
    if sys.byteorder == "little":  # FITS is big-endian
        out.byteswap(inplace=True)
    if flip:
        out ^= np.asarray(flip, dtype=bits)
    return out.view(dtype)


def write_rows(fd: int, offset: int, blocks: list[NDArray[Any]]) -> None:
    """Write a band of whole rows, given as ``blocks`` side by side, big-endian at ``offset``.

    The blocks (native, same rows and dtype) make the full width of the plane; strips of
    ~1 MiB of whole rows are assembled in FITS byte order in one small buffer and written
    by one ``os.pwrite`` each. ``uint16`` goes as FITS stores it with ``BZERO = 32768``
    (``v ^ 0x8000``, big-endian).
    """
    dtype = blocks[0].dtype
    ny = blocks[0].shape[0]
    widths = [b.shape[1] for b in blocks]
    nx = sum(widths)
    row_bytes = nx * dtype.itemsize
    step = max(1, _ROWS_PER_WRITE_BYTES // max(row_bytes, 1))
    buf = np.empty((min(step, ny), nx), dtype=dtype.newbyteorder(">"))
    edges = np.cumsum([0, *widths])
    for r0 in range(0, ny, step):
        part = buf[: min(step, ny - r0)]
        for b, x0, x1 in zip(blocks, edges[:-1], edges[1:], strict=True):
            src, dst = b[r0 : r0 + len(part)], part[:, x0:x1]
            if dtype == np.uint16:
                np.bitwise_xor(src, np.uint16(0x8000), out=dst)
            else:
                dst[...] = src
        _pwrite_all(fd, part.data.cast("B"), offset + r0 * row_bytes)


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n

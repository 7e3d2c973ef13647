"""One streaming pass over a FITS file: SHA-256, size, truncation, CHECKSUM and DATASUM.

astropy opens a file with a flipped data byte silently and only *warns* about truncation
or a bad checksum, so ingest checks the bytes itself, one block at a time (memory stays
at one block whatever the file size). The FITS checksum is the 32-bit ones'-complement
sum of the big-endian 32-bit words: DATASUM is that sum over the data, and CHECKSUM is
chosen so that the sum over the whole HDU (header and data) is -0, i.e. 0xFFFFFFFF.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits

from lazysky.errors import FitsCorruptError

if TYPE_CHECKING:
    from lazysky.zarr_store._fits import FitsSource

__all__ = ["HduSpan", "ones_complement_sum", "stream_verify"]

BLOCK = 2880 * 2048  # a whole number of FITS blocks: every HDU boundary is word-aligned
_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class HduSpan:
    """Byte ranges of one HDU in the (decompressed) FITS stream."""

    header_start: int
    data_start: int
    data_end: int

    @classmethod
    def from_fileinfo(cls, info: dict[str, Any]) -> HduSpan:
        return cls(int(info["hdrLoc"]), int(info["datLoc"]), int(info["datLoc"] + info["datSpan"]))


def _fold(total: int) -> int:
    while total > _MASK:
        total = (total & _MASK) + (total >> 32)
    return total


def ones_complement_sum(buf: bytes | memoryview, start: int = 0) -> int:
    """Add the big-endian 32-bit words of ``buf`` to ``start`` (ones'-complement)."""
    if len(buf) % 4:  # only at the end of a truncated file
        buf = bytes(buf) + b"\0" * (4 - len(buf) % 4)
    words = np.frombuffer(buf, dtype=">u4")
    return _fold(start + int(words.sum(dtype=np.uint64)))


class _Accumulator:
    """Sums over header and data ranges of every HDU, fed block by block."""

    def __init__(self, spans: list[HduSpan]) -> None:
        self.spans = spans
        self.header_bytes: list[bytearray] = [bytearray() for _ in spans]
        self.header_sum = [0] * len(spans)
        self.data_sum = [0] * len(spans)
        self.offset = 0

    def feed(self, block: bytes) -> None:
        lo, hi = self.offset, self.offset + len(block)
        view = memoryview(block)
        for k, s in enumerate(self.spans):
            a, b = max(lo, s.header_start), min(hi, s.data_start)
            if a < b:
                part = view[a - lo : b - lo]
                self.header_bytes[k] += part
                self.header_sum[k] = ones_complement_sum(part, self.header_sum[k])
            a, b = max(lo, s.data_start), min(hi, s.data_end)
            if a < b:
                self.data_sum[k] = ones_complement_sum(view[a - lo : b - lo], self.data_sum[k])
        self.offset = hi


def _check(src: FitsSource, acc: _Accumulator) -> int:
    """Compare the sums with CHECKSUM/DATASUM; return how many HDUs carried one."""
    verified = 0
    for k, _span in enumerate(acc.spans):
        header = fits.Header.fromstring(bytes(acc.header_bytes[k]).decode("ascii", "replace"))
        where = f"{src.name}: HDU {k}"
        if header.get("EXTNAME"):
            where += f" ({header['EXTNAME']})"
        datasum, checksum = header.get("DATASUM"), header.get("CHECKSUM")
        if datasum is not None:
            verified += 1
            if str(datasum).strip().isdigit() and int(datasum) != acc.data_sum[k]:
                msg = (
                    f"{where}: DATASUM is {int(datasum)} but the data bytes sum to "
                    f"{acc.data_sum[k]}: the pixel data are corrupt; re-copy the file from "
                    "its source"
                )
                raise FitsCorruptError(msg)
        if checksum is not None:
            verified += datasum is None
            total = _fold(acc.header_sum[k] + acc.data_sum[k])
            if total != _MASK:
                msg = (
                    f"{where}: CHECKSUM does not match the HDU's bytes (the header or the "
                    "data are corrupt); re-copy the file from its source"
                )
                raise FitsCorruptError(msg)
    return verified


def stream_verify(src: FitsSource, spans: list[HduSpan]) -> tuple[str, int, int]:
    """Stream ``src`` once; return ``(sha256, size, n_hdus_checksummed)``.

    Raises
    ------
    FitsCorruptError
        The file is shorter than its headers say (truncated), or a CHECKSUM/DATASUM fails.
    """
    digest = hashlib.sha256()
    acc = _Accumulator(spans)
    size = 0
    with src.open_binary() as raw:
        if src.is_gzip:
            while chunk := raw.read(BLOCK):
                digest.update(chunk)
                size += len(chunk)
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                while block := unzipped.read(BLOCK):
                    acc.feed(block)
        else:
            while block := raw.read(BLOCK):
                digest.update(block)
                size += len(block)
                acc.feed(block)
    expected = max(s.data_end for s in spans)
    if acc.offset < expected:
        msg = (
            f"{src.name}: truncated: its headers describe {expected} bytes but the file has "
            f"only {acc.offset}; re-copy the file from its source"
        )
        raise FitsCorruptError(msg)
    return digest.hexdigest(), size, _check(src, acc)

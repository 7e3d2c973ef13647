"""Bit flags of the mask plane: what each bit of ``mask`` means.

A pixel's mask value is the bitwise OR of every flag that applies to it; ``0`` is a good
pixel. The bad-pixel mask (BPM) from the masters uses ``HOT`` and ``LOWRESP`` (with
``BAD`` set alongside either), and calibration adds the per-exposure flags.

Examples
--------
>>> from lazysky.pipeline import MaskBit
>>> int(MaskBit.BAD | MaskBit.CR)
5
>>> MaskBit.describe(5)
['BAD', 'CR']
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["MASK_DTYPE", "MaskBit"]

MASK_DTYPE = np.dtype(np.uint16)


class MaskBit(enum.IntFlag):
    """Flags of the ``mask`` plane (uint16).

    BAD
        A defective detector pixel from the bad-pixel mask (hot or low response);
        its value is unreliable in every exposure.
    SAT
        The raw value reached SATURATE (digital saturation or full well, including
        bleed trails): the charge there is a lower limit.
    CR
        Hit by a cosmic ray (L.A.Cosmic, :func:`lazysky.pipeline.flag_cosmic_rays`).
    EDGE
        Within ``edge_px`` of the detector's edge (optional; 0 disables it).
    NODATA
        No usable data: the flat field is ~0 or not finite there; ``image`` is 0 and
        ``variance`` is infinite.
    HOT
        Dark current above the hot-pixel threshold in the master dark (also BAD).
    LOWRESP
        Response below the low-response threshold relative to its neighbourhood in
        the master flat: dead pixels and columns (also BAD).
    """

    BAD = 1
    SAT = 2
    CR = 4
    EDGE = 8
    NODATA = 16
    HOT = 32
    LOWRESP = 64

    @classmethod
    def describe(cls, value: int) -> list[str]:
        """Names of the flags set in ``value``, lowest bit first."""
        return [str(f.name) for f in cls if int(value) & int(f)]

    @classmethod
    def doc(cls) -> dict[str, int]:
        """``{name: bit value}``, for the ``flag_*`` attributes of a mask variable."""
        return {str(f.name): int(f) for f in cls}

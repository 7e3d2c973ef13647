"""Sigma-clipped combination of a stack of frames, and the chunking that bounds its memory.

:func:`clipped_mean` is the numpy kernel (one block: all frames of one tile);
:func:`combine_frames` lifts it onto a dask stack ``(frame, detector, y, x)`` whose
blocks hold every frame of a tile, the tile chosen by :func:`combine_chunks` so that a
task's peak memory stays under ``max_block_bytes`` whatever the number of frames.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from numpy.typing import NDArray

from lazysky.errors import ParameterError

__all__ = ["WORK_BYTES_PER_VALUE", "clipped_mean", "combine_chunks", "combine_frames"]

# Peak bytes the kernel holds per input value (float32 frames): the input, a sorted
# copy, deviations, their sorted copy, index and boolean temporaries. Measured with
# tracemalloc in tests/pipeline/test_combine.py, with a margin.
WORK_BYTES_PER_VALUE = 40
MAD_TO_SIGMA = 1.4826


def _middle(sorted_values: NDArray[Any], count: NDArray[np.intp]) -> NDArray[np.float32]:
    """Median of the first ``count`` values along axis 0 of an ascending-sorted stack."""
    lo = np.maximum(count - 1, 0) // 2
    hi = count // 2
    take = np.take_along_axis
    a = take(sorted_values, lo[None], axis=0)[0]
    b = take(sorted_values, np.minimum(hi, sorted_values.shape[0] - 1)[None], axis=0)[0]
    return np.asarray(0.5 * (a + b), dtype=np.float32)


def clipped_mean(
    stack: NDArray[Any], *, sigma: float = 3.0, max_iters: int = 5
) -> NDArray[np.float32]:
    """Mean along axis 0 of the values within ``sigma`` robust σ of the median.

    Each iteration takes, per pixel, the median of the surviving values and their
    σ = 1.4826 × MAD (robust with the 3–10 frames of a calibration set, where a
    standard deviation could never reject an outlier from 3 values), and keeps the
    values within ``sigma`` σ of it; it stops when nothing changes. Non-finite values
    are ignored. A pixel with no finite value gives NaN. Pure numpy, any block shape.

    Examples
    --------
    >>> import numpy as np
    >>> stack = np.ones((5, 10, 14), dtype=np.float32)
    >>> stack[2, 3, 4] = 1000.0  # a cosmic ray in one frame
    >>> out = clipped_mean(stack)
    >>> out.shape, float(out[3, 4])
    ((10, 14), 1.0)
    """
    values = np.asarray(stack, dtype=np.float32)
    if values.ndim == 0:
        msg = "clipped_mean needs a stack with a frame axis first, got a scalar"
        raise ParameterError(msg)
    out_shape = values.shape[1:]
    if values.size == 0:  # dask's meta inference, or an empty block
        return np.full(out_shape, np.nan, dtype=np.float32)
    keep = np.isfinite(values)
    inf = np.float32(np.inf)
    for _ in range(max(int(max_iters), 0) + 1):
        count = keep.sum(axis=0)
        ordered = np.sort(np.where(keep, values, inf), axis=0)
        center = _middle(ordered, count)
        del ordered
        dev = np.where(keep, np.abs(values - center), inf)
        mad = _middle(np.sort(dev, axis=0), count)
        # a zero MAD (ties) keeps only the tied values: an outlier is always rejected
        limit = np.float32(sigma * MAD_TO_SIGMA) * mad
        new_keep = keep & (dev <= limit)
        del dev
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    count = keep.sum(axis=0)
    total = np.where(keep, values, np.float32(0)).sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean.astype(np.float32)


def combine_chunks(
    n_frames: int, shape: tuple[int, int], *, max_block_bytes: int
) -> tuple[int, int]:
    """Tile ``(rows, cols)`` for combining ``n_frames``: peak kernel memory ≤ ``max_block_bytes``.

    Whole rows are kept when they fit (contiguous reads); otherwise square-ish tiles.

    Examples
    --------
    >>> combine_chunks(10, (256, 256), max_block_bytes=64 * 2**20)
    (256, 256)
    >>> combine_chunks(100, (4096, 2048), max_block_bytes=64 * 2**20)
    (8, 2048)
    """
    if n_frames < 1:
        msg = f"need at least one frame to combine, got {n_frames}"
        raise ParameterError(msg)
    ny, nx = shape
    pixels = max_block_bytes // (n_frames * WORK_BYTES_PER_VALUE)
    if pixels < 1:
        msg = (
            f"max_block_bytes={max_block_bytes} cannot hold even one pixel of {n_frames} "
            f"frames ({n_frames * WORK_BYTES_PER_VALUE} bytes); raise it"
        )
        raise ParameterError(msg)
    if pixels >= nx:
        return min(ny, int(pixels // nx)), nx
    side = max(int(np.sqrt(pixels)), 1)
    return min(ny, side), min(nx, side)


def combine_frames(
    stack: da.Array,
    *,
    sigma: float,
    max_iters: int,
    max_block_bytes: int,
    name: str,
) -> da.Array:
    """Clipped mean of a lazy ``(frame, detector, y, x)`` stack along ``frame``.

    The stack is rechunked so a block holds every frame of one tile of one detector
    (the tile from :func:`combine_chunks`), then :func:`clipped_mean` runs per block.
    """
    n_frames, _, ny, nx = stack.shape
    ty, tx = combine_chunks(int(n_frames), (int(ny), int(nx)), max_block_bytes=max_block_bytes)
    blocks = stack.astype(np.float32).rechunk({0: -1, 1: 1, 2: ty, 3: tx})
    token = tokenize(blocks, sigma, max_iters)
    return da.map_blocks(
        clipped_mean,
        blocks,
        sigma=sigma,
        max_iters=max_iters,
        drop_axis=0,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        name=f"{name}-{token}",
    )

"""Sigma-clipped combination of a stack of frames, and the chunking that bounds its memory.

:func:`clipped_mean` is the numpy kernel (one block: all frames of one tile);
:func:`combine_frames` lifts it onto a dask stack ``(frame, detector, y, x)`` whose
blocks hold every frame of a tile, the tile chosen by :func:`combine_chunks` so that a
task's peak memory stays under ``max_block_bytes`` whatever the number of frames.
"""

from __future__ import annotations

import logging
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from numpy.typing import NDArray

from lazysky.errors import ParameterError

__all__ = [
    "WORK_BYTES_PER_VALUE",
    "clipped_mean",
    "clipped_mean_variance",
    "combine_chunks",
    "combine_frames",
    "fuse_reads",
    "split_reads",
]

try:  # dask's task spec (public since 2024.12, in a private module): fuse_reads needs it
    from dask._task_spec import GraphNode, Task, _execute_subgraph, convert_legacy_graph
except ImportError:  # pragma: no cover - another dask: combine without fusing its reads
    GraphNode = Task = _execute_subgraph = convert_legacy_graph = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

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
    if values.size == 0:  # dask's meta inference, or an empty block
        return np.full(values.shape[1:], np.nan, dtype=np.float32)
    keep = _clipped_keep(values, sigma=sigma, max_iters=max_iters)
    return _kept_mean(values, keep)


def _kept_mean(values: NDArray[Any], keep: NDArray[np.bool_]) -> NDArray[np.float32]:
    count = keep.sum(axis=0)
    total = np.where(keep, values, np.float32(0)).sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean.astype(np.float32)


def _clipped_keep(values: NDArray[np.float32], *, sigma: float, max_iters: int) -> NDArray[Any]:
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
    return keep


def clipped_mean_variance(
    stack: NDArray[Any], variance: NDArray[Any], *, sigma: float = 3.0, max_iters: int = 5
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """:func:`clipped_mean` and the variance of that mean, ``Σ var_kept / n_kept²``.

    ``variance`` is each frame's per-pixel variance: the shape of ``stack``, or one that
    broadcasts to it (e.g. ``(frames, 1, 1)``: one value per frame).

    Examples
    --------
    >>> import numpy as np
    >>> mean, var = clipped_mean_variance(np.ones((4, 10, 14)), np.full((4, 10, 14), 2.0))
    >>> float(mean[0, 0]), float(var[0, 0])
    (1.0, 0.5)
    """
    values = np.asarray(stack, dtype=np.float32)
    if values.size == 0:
        empty = np.full(values.shape[1:], np.nan, dtype=np.float32)
        return empty, empty.copy()
    keep = _clipped_keep(values, sigma=sigma, max_iters=max_iters)
    count = keep.sum(axis=0)
    var = np.where(keep, np.asarray(variance, dtype=np.float32), np.float32(0)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(count > 0, var / np.maximum(count, 1) ** 2, np.nan)
    return _kept_mean(values, keep), var.astype(np.float32)


def combine_chunks(
    n_frames: int,
    shape: tuple[int, int],
    *,
    max_block_bytes: int,
    bytes_per_value: int = WORK_BYTES_PER_VALUE,
) -> tuple[int, int]:
    """Tile ``(rows, cols)`` for combining ``n_frames``: peak kernel memory ≤ ``max_block_bytes``.

    ``shape`` is the frames' chunk (a store tile, or a whole detector). The chunk itself
    is used when it fits; otherwise it is cut into bands of whole rows, or failing that
    square-ish tiles, whose sides divide the chunk's so that no tile straddles two input
    chunks (the inputs of a combine block then come from one chunk per frame).

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
    pixels = max_block_bytes // (n_frames * bytes_per_value)
    if pixels < 1:
        msg = (
            f"max_block_bytes={max_block_bytes} cannot hold even one pixel of {n_frames} "
            f"frames ({n_frames * bytes_per_value} bytes); raise it"
        )
        raise ParameterError(msg)
    if pixels >= nx:
        return _divisor_at_most(ny, int(pixels // nx)), nx
    side = max(int(np.sqrt(pixels)), 1)
    return _divisor_at_most(ny, side), _divisor_at_most(nx, side)


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (at least 1)."""
    if limit >= n:
        return n
    return next(d for d in range(max(limit, 1), 0, -1) if n % d == 0)


_PACKED = np.dtype([("mean", np.float32), ("variance", np.float32)])


def _pair_block(
    values: NDArray[Any], variance: NDArray[Any], *scale: NDArray[Any], **options: Any
) -> NDArray[Any]:
    out = np.empty(values.shape[1:], dtype=_PACKED)
    if scale and values.size:  # each frame divided by its level here, in the block
        s = np.asarray(scale[0], dtype=np.float32)
        values = values / s
        variance = np.asarray(variance, dtype=np.float32) / (s * s)
    out["mean"], out["variance"] = clipped_mean_variance(values, variance, **options)
    return out


def split_reads(x: da.Array, chunks: tuple[int, ...], *, salt: str = "") -> da.Array:
    """``x`` in ``chunks``, read from its source in those pieces when it can be.

    A plain ``da.from_array``/``da.from_zarr`` array (one getter layer over one source
    array, as :func:`lazysky.zarr_store.open_exposure` makes) is opened again on that
    source with the new chunks, so a small block is a small read: nothing holds a whole
    source chunk to cut it up. A ``salt`` gives the reads other keys: a second, independent
    pass over the same source (nothing of the first is kept for it). Anything else is
    rechunked (each source chunk is then in memory until all its pieces are used).

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> split_reads(da.zeros((1, 64, 64), chunks=(1, 64, 64)), (1, 16, 64)).chunks[1]
    (16, 16, 16, 16)
    """
    layers = x.dask.layers
    original = layers.get(f"original-{x.name}")
    if len(layers) == 2 and original is not None and len(original) == 1:
        source = next(iter(original.values()))
        if getattr(source, "shape", None) == x.shape and getattr(source, "dtype", None) == x.dtype:
            name = f"{x.name}-split-{tokenize(x.name, chunks, *([salt] if salt else []))}"
            return da.from_array(source, chunks=chunks, name=name, meta=x._meta)
    return x.rechunk(chunks)


def combine_tile(stack: da.Array, *, with_variance: bool, max_block_bytes: int) -> tuple[int, int]:
    """The ``(rows, cols)`` tile :func:`combine_frames` uses for a ``(frame, det, y, x)`` stack."""
    ny, nx = stack.chunks[2][0], stack.chunks[3][0]  # the frames' tiles
    per_value = WORK_BYTES_PER_VALUE + (16 if with_variance else 0)
    return combine_chunks(int(stack.shape[0]), (int(ny), int(nx)),
                          max_block_bytes=max_block_bytes, bytes_per_value=per_value)  # fmt: skip


def combine_frames(
    stack: da.Array,
    variance: da.Array | None = None,
    *,
    sigma: float,
    max_iters: int,
    max_block_bytes: int,
    name: str,
    scale: da.Array | None = None,
) -> tuple[da.Array, da.Array | None]:
    """Clipped mean of a lazy ``(frame, detector, y, x)`` stack along ``frame``.

    The stack is rechunked so a block holds every frame of one tile of one detector
    (the tile from :func:`combine_chunks`, within the frames' own chunks), then
    :func:`clipped_mean` runs per block.
    With ``variance`` (per frame), the variance of the mean comes too (else None).
    ``variance`` may be ``(frame, detector, 1, 1)`` (one value per frame and detector):
    it is then broadcast inside each block, never materialised as full frames.
    ``scale`` (``(frame, detector, 1, 1)``, needs ``variance``) divides each frame, and its
    variance by the square, inside the block: a frame normalised by a frame-wide level
    (a flat) is then read only when its tile is combined, instead of waiting, scaled,
    in memory for the other frames' levels.
    """
    ty, tx = combine_tile(stack, with_variance=variance is not None,
                          max_block_bytes=max_block_bytes)  # fmt: skip
    blocks = stack.astype(np.float32).rechunk({0: -1, 1: 1, 2: ty, 3: tx})
    options = {"sigma": sigma, "max_iters": max_iters}
    if variance is None:
        token = tokenize(blocks, options)
        mean = da.map_blocks(
            clipped_mean, blocks, drop_axis=0, dtype=np.float32,
            meta=np.empty((0, 0, 0), dtype=np.float32), name=f"{name}-{token}", **options,
        )  # fmt: skip
        return mean, None
    if variance.shape[2:] == (1, 1):  # per frame and detector: broadcast in the kernel
        var = variance.astype(np.float32).rechunk({0: -1, 1: 1, 2: 1, 3: 1})
    else:
        var = variance.astype(np.float32).rechunk(blocks.chunks)
    extra = []
    if scale is not None:
        if scale.shape != (stack.shape[0], stack.shape[1], 1, 1):
            msg = f"scale must be (frame, detector, 1, 1) = {stack.shape[:2]}, got {scale.shape}"
            raise ParameterError(msg)
        extra = [scale.astype(np.float32).rechunk({0: -1, 1: 1, 2: 1, 3: 1})]
    token = tokenize(blocks, var, *extra, options)
    packed = da.map_blocks(
        _pair_block, blocks, var, *extra, drop_axis=0, dtype=_PACKED, chunks=blocks.chunks[1:],
        meta=np.empty((0, 0, 0), dtype=_PACKED), name=f"{name}-{token}", **options,
    )  # fmt: skip
    packed = fuse_reads(packed)
    return packed["mean"], packed["variance"]


def fuse_reads(x: da.Array) -> da.Array:
    """``x`` with each block's private inputs computed inside the block's own task.

    A task that only one block of ``x`` needs (directly or through other such tasks:
    a frame's tile read from its store, trimmed, overscan-subtracted, cast, stacked)
    becomes part of that block's task (:meth:`GraphNode.fuse`: one task running a small
    subgraph, which frees each intermediate once used). No separate read task then
    exists for a scheduler to start ahead of its combine block: a tile of every frame is
    read only by the task that combines it, so the reads in flight are those of the
    blocks being combined, whatever the number of frames. Tasks shared with anything
    else (the master bias's blocks, the flat's levels) stay separate. Keys are kept.

    Examples
    --------
    >>> import numpy as np, dask.array as da
    >>> x = (da.ones((4, 8), chunks=(2, 8)) + 1).sum(axis=1)
    >>> y = fuse_reads(x)
    >>> len(dict(y.__dask_graph__())), bool((y.compute() == 16).all())
    (2, True)
    """
    if convert_legacy_graph is None:  # pragma: no cover - (the four names go together)
        logger.warning("this dask has no dask._task_spec: combining without fusing reads "
                       "(peak memory then grows with the number of frames)")
        return x
    dsk = convert_legacy_graph(dict(x.__dask_graph__()))
    outputs = set(_flat_keys(x.__dask_keys__()))
    dependents: dict[Any, set[Any]] = {k: set() for k in dsk}
    for k, node in dsk.items():
        for d in node.dependencies:
            dependents.setdefault(d, set()).add(k)
    owner: dict[Any, Any] = {k: k for k in outputs}
    # keys in reverse topological order: a key's dependents are decided before it
    for k in reversed(_topological(dsk)):
        if k in outputs:
            continue
        owners = {owner.get(d) for d in dependents.get(k, ())}
        if len(owners) == 1 and None not in owners:
            owner[k] = owners.pop()
    members: dict[Any, list[GraphNode]] = {k: [] for k in outputs}
    for k, o in owner.items():
        if k not in outputs:
            members[o].append(dsk[k])
    for k in outputs:
        if members[k]:
            fused = GraphNode.fuse(*members[k], dsk[k], key=k)
            assert isinstance(fused, Task)  # several members: a Task running a subgraph
            dsk[k] = Task(k, _run_fused_block, *fused.args)
    # one materialized layer under the array's name, without the fused-in tasks (they
    # run inside their block's task); task keys, hence their names on the dashboard, are
    # kept. Not the original layers: graph_manipulation.bind/clone need every key a
    # layer declares to be in the graph, which a Blockwise layer whose tasks were fused
    # away breaks
    kept = {k: node for k, node in dsk.items() if k in outputs or k not in owner}
    graph = HighLevelGraph({x.name: kept}, {x.name: set()})
    return da.Array(graph, x.name, x.chunks, meta=x._meta)


def _run_fused_block(inner: dict[Any, Any], outkey: Any, inkeys: Any, *deps: Any) -> Any:
    """Run a block fused by :func:`fuse_reads`: dask's ``_execute_subgraph`` by another name.

    Under its own name, dask's array optimisation (``_optimize_slices``) would rewrite
    the subgraph *in place*, merging chains of slices on the assumption (true of the
    chains dask fuses itself) that each inner task feeds one other. Here a frame's read
    feeds both its DATASEC and its BIASSEC slices: merged, one of the two got the
    other's pixels (a master bias without its overscan removed), and the rewrite stayed
    in the graph for every later computation. A workaround for dask's assumption, pinned
    by ``test_fused_reads_keep_their_slices_when_computed_with_other_collections``.
    """
    return _execute_subgraph(inner, outkey, inkeys, *deps)


def _flat_keys(keys: Any) -> list[Any]:
    if isinstance(keys, list):
        return [k for sub in keys for k in _flat_keys(sub)]
    return [keys]


def _topological(dsk: dict[Any, GraphNode]) -> list[Any]:
    """The keys of ``dsk``, each after its dependencies (iterative depth-first)."""
    done: set[Any] = set()
    out: list[Any] = []
    for root in dsk:
        if root in done:
            continue
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            k, expanded = stack.pop()
            if expanded:
                out.append(k)
                continue
            if k in done:
                continue
            done.add(k)
            stack.append((k, True))
            stack.extend((d, False) for d in dsk[k].dependencies if d in dsk and d not in done)
    return out

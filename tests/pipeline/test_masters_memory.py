"""Masters: the combine's memory does not grow with the number of frames.

Memory is measured without timing anything: a dask callback adds up the bytes of the
results the synchronous scheduler holds after every task (its cache), so the number is
deterministic. Frames are Zarr-backed, as ``open_exposure`` gives them.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import assert_same
from dask._task_spec import convert_legacy_graph
from dask.callbacks import Callback

from lazysky.errors import ParameterError
from lazysky.pipeline import clipped_mean, combine_chunks, master_bias, master_flat
from lazysky.pipeline._combine import (
    WORK_BYTES_PER_VALUE,
    _run_fused_block,
    clipped_mean_variance,
    combine_frames,
    fuse_reads,
    split_reads,
)

SHAPE = (128, 96)  # DATASEC rows, cols
OVERSCAN = 8


def _frames(n: int, *, kind: str, seed: int = 0, level: float = 0.0) -> list[xr.DataArray]:
    """``n`` one-detector raw frames in an in-memory Zarr store, read lazily like a store."""
    rng = np.random.default_rng(seed)
    ny, nx = SHAPE
    out = []
    for i in range(n):
        raw = rng.normal(1000.0, 3.0, (1, ny, nx + OVERSCAN))
        raw[:, :, :nx] += level * (1 + 0.05 * rng.random())
        raw[0, rng.integers(ny), rng.integers(nx)] += 5000.0  # a cosmic ray
        arr = zarr.create_array(store={}, shape=raw.shape, chunks=(1, 64, 64), dtype="uint16")
        arr[:] = np.round(raw).astype(np.uint16)
        out.append(xr.DataArray(
            da.from_zarr(arr), dims=("detector", "y", "x"),
            coords={"detector": ["CCD01"], "gain": ("detector", [2.0]),
                    "rdnoise": ("detector", [5.0]), "saturate": ("detector", [65535.0]),
                    "datasec": ("detector", [f"[1:{nx},1:{ny}]"]),
                    "biassec": ("detector", [f"[{nx + 1}:{nx + OVERSCAN},1:{ny}]"]),
                    "exptime": 10.0, "imagetyp": kind, "exposure": f"{kind}{i}"}))  # fmt: skip
    return out


def _peak_held_bytes(x: da.Array) -> tuple[np.ndarray, int]:
    """Compute ``x`` with the sync scheduler; the most bytes of results held at once."""
    peak = [0]

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        held = sum(v.nbytes for v in state["cache"].values() if isinstance(v, np.ndarray))
        peak[0] = max(peak[0], held)

    with Callback(posttask=posttask), dask.config.set(scheduler="sync"):
        out = x.compute()
    return np.asarray(out), peak[0]


@pytest.mark.parametrize("n_frames", [64, 256, 1000])
def test_chunking_keeps_frames_times_block_under_the_budget(n_frames: int) -> None:
    budget = 16 * 2**20
    per_value = WORK_BYTES_PER_VALUE + 16
    ty, tx = combine_chunks(n_frames, (1024, 1024), max_block_bytes=budget,
                            bytes_per_value=per_value)  # fmt: skip
    assert n_frames * ty * tx * per_value <= budget
    assert 1024 % ty == 0
    assert 1024 % tx == 0
    # and the masters use that tile for every frame, whatever their own chunks
    frames = _frames(3, kind="bias")
    bias = master_bias(frames, max_block_bytes=3 * 40 * 96 * per_value)["bias"].data
    assert bias.chunks[1][0] * bias.chunks[2][0] * 3 * per_value <= 3 * 40 * 96 * per_value


def test_peak_memory_does_not_grow_with_the_number_of_frames() -> None:
    budget = 2**20
    peaks = {}
    for n in (4, 12, 36):
        frames = _frames(n, kind="bias", seed=n)
        out, peaks[n] = _peak_held_bytes(master_bias(frames, max_block_bytes=budget)["bias"].data)
        assert out.shape == (1, *SHAPE)
    output = SHAPE[0] * SHAPE[1] * 8  # mean + variance, float32
    for n, peak in peaks.items():
        # inputs of one combine block (≤ budget), the output, and a few small pieces
        assert peak <= budget + output, (n, peaks)
    # 9× the frames, about the same peak (the whole input of 36 frames is 0.9 MB raw)
    assert peaks[36] < 1.5 * peaks[4] + budget / 4, peaks


@pytest.mark.slow  # ~20 s: the probe sums the task cache after every task
def test_master_flat_peak_memory_does_not_grow_with_the_number_of_frames() -> None:
    # each flat frame is divided by its own mosaic level: the levels come from a first
    # pass and the division happens in the combine kernel, so nothing *needs* a scaled
    # frame to wait in memory for the other frames' levels; the master's own level is
    # taken from its combined blocks (held: output-sized), not from a recomputed combine
    # that would keep every frame's tiles for it
    budget = 2**20
    bias = xr.DataArray(np.zeros((1, *SHAPE), np.float32), dims=("detector", "y", "x"))
    peaks = {}
    for n in (4, 12, 36):
        frames = _frames(n, kind="flat", seed=n, level=20000.0)
        flat = master_flat(frames, bias=bias, max_block_bytes=budget)["flat"].data
        out, peaks[n] = _peak_held_bytes(flat)
        assert out.shape == (1, *SHAPE)
        assert float(np.mean(out)) == pytest.approx(1.0, abs=1e-3)
    frame = SHAPE[0] * SHAPE[1] * 4  # one float32 frame
    output = SHAPE[0] * SHAPE[1] * 8  # the combined mean + variance
    for n, peak in peaks.items():
        assert peak <= budget + 2 * output + 4 * frame, (n, peaks)
    # 9x the frames (36 float32 frames are 1.8 MB): about the same peak
    assert peaks[36] < 1.5 * peaks[4] + budget / 4, peaks


def test_scaled_combine_equals_combining_prescaled_frames() -> None:
    rng = np.random.default_rng(8)
    stack = rng.normal(1000.0, 10.0, (5, 1, 16, 24)).astype(np.float32)
    stack[1, 0, 3, 4] = 9000.0
    level = rng.uniform(900.0, 1100.0, (5, 1, 1, 1)).astype(np.float32)
    var = np.full_like(stack, 100.0)
    kw = {"sigma": 3.0, "max_iters": 5, "max_block_bytes": 2**20, "name": "t"}
    a_mean, a_var = combine_frames(da.from_array(stack), da.from_array(var),
                                   scale=da.from_array(level), **kw)  # fmt: skip
    b_mean, b_var = combine_frames(da.from_array(stack / level),
                                   da.from_array(var / level**2), **kw)  # fmt: skip
    assert a_var is not None
    assert b_var is not None
    np.testing.assert_allclose(a_mean.compute(), b_mean.compute(), rtol=1e-6)
    np.testing.assert_allclose(a_var.compute(), b_var.compute(), rtol=1e-5)
    with pytest.raises(ParameterError, match="scale must be"):
        combine_frames(da.from_array(stack), da.from_array(var),
                       scale=da.from_array(level[:3]), **kw)  # fmt: skip


def test_fused_reads_keep_their_slices_when_computed_with_other_collections() -> None:
    # a raw frame's read feeds two slices (DATASEC and BIASSEC), both fused into the
    # block; computed together with another collection that also needs the block (the
    # masters are written in one graph), dask's slice optimisation once merged the
    # slices in place: the data got the overscan's pixels, and kept them for every later
    # computation of the same graph
    raw = np.random.default_rng(5).normal(1000.0, 5.0, (2, 6, 10)).astype(np.float32)
    raw[:, :, :8] += 300.0  # the data section well above the overscan
    arr = zarr.create_array(store={}, shape=raw.shape, chunks=(1, 6, 10), dtype="float32")
    arr[:] = raw
    x = da.from_zarr(arr)
    adu = fuse_reads(x[:, :, :8] - x[:, :, 8:].mean(axis=2, keepdims=True))
    expect = raw[:, :, :8] - raw[:, :, 8:].mean(axis=2, keepdims=True)
    with dask.config.set(scheduler="sync"):
        alone, twice = dask.compute(adu, adu * 2)
        again = adu.compute()
    np.testing.assert_allclose(alone, expect, rtol=1e-6)
    np.testing.assert_allclose(twice, 2 * expect, rtol=1e-6)
    np.testing.assert_allclose(again, expect, rtol=1e-6)


def test_split_reads_reads_small_pieces_of_a_zarr_source() -> None:
    arr = zarr.create_array(store={}, shape=(2, 64, 48), chunks=(1, 64, 48), dtype="int32")
    arr[:] = np.arange(arr.size, dtype=np.int32).reshape(arr.shape)
    x = da.from_zarr(arr)
    small = split_reads(x, (1, 16, 24))
    assert small.chunks == ((1, 1), (16,) * 4, (24, 24))
    assert not any("rechunk" in str(k) for k in small.dask.layers)  # read, not cut up
    assert_same(small.compute(), arr[:])
    derived = split_reads(x + 1, (1, 16, 24))  # not a plain source: rechunked, same values
    assert any("rechunk" in str(k) for k in derived.dask.layers)
    assert_same(derived.compute(), arr[:] + 1)


def test_master_bias_from_zarr_equals_the_in_memory_clipped_mean() -> None:
    frames = _frames(7, kind="bias", seed=3)
    lazy = master_bias(frames, max_block_bytes=7 * 16 * 32 * 56)["bias"]
    assert lazy.data.chunks[1][0] < SHAPE[0]  # really chunked
    raws = np.stack([np.asarray(f.values, dtype=np.float32) for f in frames])
    nx = SHAPE[1]
    adus = raws[:, :, :, :nx] - np.median(raws[:, :, :, nx:], axis=-1, keepdims=True)
    assert_same(lazy.values, clipped_mean(adus))


def test_per_frame_variance_broadcasts_like_the_full_one() -> None:
    rng = np.random.default_rng(2)
    stack = rng.normal(10.0, 1.0, (6, 1, 20, 30)).astype(np.float32)
    stack[2, 0, 5, 5] = 100.0
    per_frame = rng.uniform(1.0, 2.0, (6, 1, 1, 1)).astype(np.float32)
    full = np.broadcast_to(per_frame, stack.shape)
    m1, v1 = clipped_mean_variance(stack, per_frame)
    m2, v2 = clipped_mean_variance(stack, full)
    assert_same(m1, m2)
    assert_same(v1, v2)
    lazy_m, lazy_v = combine_frames(da.from_array(stack, chunks=(1, 1, 10, 10)),
                                    da.from_array(per_frame), sigma=3.0, max_iters=5,
                                    max_block_bytes=2**20, name="t")  # fmt: skip
    assert lazy_v is not None
    assert_same(lazy_m.compute(), m2)
    assert_same(lazy_v.compute(), v2)


def test_flat_combine_tasks_read_their_own_tiles() -> None:
    # fuse_reads: a task only one combine block needs (a frame's tile read, trimmed,
    # overscan-subtracted, in electrons) runs inside that block's task, so no read can be
    # started ahead of its combine; tasks shared with anything else stay separate
    bias = xr.DataArray(np.zeros((1, *SHAPE), np.float32), dims=("detector", "y", "x"))
    frames = _frames(4, kind="flat", seed=4, level=20000.0)
    flat = master_flat(frames, bias=bias, max_block_bytes=2**17)
    graph = convert_legacy_graph(dict(flat["flat"].data.__dask_graph__()))
    combine = {k for k in graph if isinstance(k, tuple) and k[0].startswith("master-flat")}
    assert len(combine) > 1  # tiled: several combine blocks
    dependents: dict[Any, set[Any]] = {k: set() for k in graph}
    for k, node in graph.items():
        for d in node.dependencies:
            dependents[d].add(k)
    private = [k for k, ds in dependents.items() if len(ds) == 1 and ds <= combine]
    assert private == []
    # each combine task runs its frames' reads (a subgraph of several tasks per frame)
    assert all(graph[k].func is _run_fused_block for k in combine)
    assert min(len(graph[k].args[0]) for k in combine) > 4 * len(frames)
    out = flat.compute(scheduler="sync")
    assert float(np.mean(out["flat"].values)) == pytest.approx(1.0, abs=1e-3)

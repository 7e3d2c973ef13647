"""Masters: the clipped combine kernel, bounded chunking, laziness, and the truth."""

from __future__ import annotations

import tracemalloc

import dask
import numpy as np
import pytest
from conftest import INST, Survey, assert_same, raise_if_dask_computes

from lazysky.errors import ParameterError
from lazysky.pipeline import (
    MaskBit,
    bad_pixel_mask,
    bad_pixels,
    clipped_mean,
    combine_chunks,
    make_masters,
    master_bias,
    master_dark,
    master_flat,
    overscan_level,
)
from lazysky.pipeline._combine import WORK_BYTES_PER_VALUE
from lazysky.simulator import detector_model


def test_clipped_mean_rejects_outliers_on_a_small_block() -> None:
    rng = np.random.default_rng(0)
    stack = rng.normal(100.0, 1.0, (7, 10, 14)).astype(np.float32)
    stack[3, 2, 5] = 1e4  # a cosmic ray
    stack[1, 4, 4] = np.nan  # a missing value
    out = clipped_mean(stack)
    assert out.shape == (10, 14)
    assert out.dtype == np.float32
    assert abs(out[2, 5] - 100.0) < 2.0
    assert np.isfinite(out[4, 4])
    clean = np.delete(stack[:, 2, 5], 3)
    assert out[2, 5] == pytest.approx(clean.mean(), abs=1.0)


def test_clipped_mean_survives_empty_and_all_nan_blocks() -> None:
    assert clipped_mean(np.empty((0, 0, 0), dtype=np.float32)).shape == (0, 0)
    assert clipped_mean(np.empty((3, 0, 5))).shape == (0, 5)
    assert np.isnan(clipped_mean(np.full((3, 2, 2), np.nan))).all()


@pytest.mark.parametrize("n_frames", [3, 10, 40])
def test_kernel_peak_memory_stays_within_the_planned_budget(n_frames: int) -> None:
    budget = 8 * 2**20
    ty, tx = combine_chunks(n_frames, (4096, 2048), max_block_bytes=budget)
    stack = np.random.default_rng(1).normal(size=(n_frames, 1, ty, tx)).astype(np.float32)
    tracemalloc.start()
    clipped_mean(stack)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert stack.nbytes + peak <= budget
    assert stack.nbytes + peak <= WORK_BYTES_PER_VALUE * stack.size


def test_combine_tiles_shrink_as_frames_grow(survey: Survey) -> None:
    tiles = [combine_chunks(n, (4096, 2048), max_block_bytes=64 * 2**20) for n in (5, 50, 500)]
    areas = [ty * tx for ty, tx in tiles]
    assert areas[0] > areas[1] > areas[2]
    budget = 2**20
    for n in (2, 5):
        bias = master_bias(survey.frames("bias")[:n], max_block_bytes=budget)["bias"]
        ty, tx = bias.data.chunks[1][0], bias.data.chunks[2][0]
        assert n * ty * tx * (WORK_BYTES_PER_VALUE + 16) <= budget
    big = master_bias(survey.frames("bias")[:5], max_block_bytes=budget)["bias"].data.chunks
    small = master_bias(survey.frames("bias")[:2], max_block_bytes=budget)["bias"].data.chunks
    assert big[1][0] * big[2][0] < small[1][0] * small[2][0]


def test_master_bias_chunked_equals_in_memory(survey: Survey) -> None:
    frames = survey.frames("bias")
    lazy = master_bias(frames, max_block_bytes=2**20)["bias"].values  # many small blocks
    raws = [np.asarray(f.sci.values, dtype=np.float32) for f in frames]
    adus = [r[:, :, :256] - overscan_level(r[:, :, 256:]) for r in raws]
    whole = clipped_mean(np.stack(adus))
    assert_same(lazy, whole)


def test_make_masters_is_lazy_and_names_its_tasks(survey: Survey) -> None:
    with raise_if_dask_computes():
        m = make_masters(
            bias=survey.frames("bias"), dark=survey.frames("dark"), flat=survey.frames("flat-r")
        )
    # task names, as the dashboard shows them (the combine's fused graph is one layer)
    names = {str(k[0] if isinstance(k, tuple) else k).rsplit("-", 1)[0]
             for k in dict(m.flat.data.__dask_graph__())}
    assert {"master-bias", "master-dark", "master-flat"} <= names
    assert any(str(k).startswith("bad-pixel-mask") for k in m.bpm.data.dask.layers)
    assert m.flat.attrs["steps"][0]["step"] == "master_flat"
    assert len(m.flat.attrs["steps"][0]["inputs"]) == 10
    assert m.bpm.dtype == np.uint16
    assert {"bias_variance", "dark_variance", "flat_variance"} <= set(m.data_vars)


def test_master_flat_matches_the_true_flat(masters) -> None:  # type: ignore[no-untyped-def]
    for i in range(INST.n_detectors):
        truth = detector_model(INST, i).flat
        good = truth > 0.5
        resid = masters.flat.values[i][good] / truth[good] - 1
        assert np.sqrt(np.mean(resid**2)) < 0.005
        assert abs(np.mean(resid)) < 0.001  # normalised like the truth: mean 1 on the mosaic
        # the propagated variance of the master flat predicts its scatter about the truth
        predicted = np.mean(masters.flat_variance.values[i][good] / truth[good] ** 2)
        assert np.mean(resid**2) / predicted == pytest.approx(1.0, abs=0.15)


def test_master_dark_and_bias_match_the_truth(masters) -> None:  # type: ignore[no-untyped-def]
    for i in range(INST.n_detectors):
        model = detector_model(INST, i)
        cold = ~model.hot_pixels
        dark = masters.dark.values[i]
        assert np.median(dark[cold]) == pytest.approx(INST.dark_e_per_s, abs=0.005)
        np.testing.assert_allclose(dark[model.hot_pixels], model.dark_e_per_s[model.hot_pixels],
                                   rtol=0.1, atol=0.3)  # fmt: skip
        truth = model.bias_adu[:, :256] - np.median(model.bias_adu[:, 256:], axis=1)[:, None]
        # a per-row offset is the overscan's noise; the pattern within rows is the bias
        resid = masters.bias.values[i] - truth
        assert np.std(resid) < 2.0 * model.read_noise_e / model.gain / np.sqrt(5)


def test_bad_pixel_mask_finds_hot_pixels_and_dead_columns(masters) -> None:  # type: ignore[no-untyped-def]
    for i in range(INST.n_detectors):
        model = detector_model(INST, i)
        bpm = masters.bpm.values[i]
        hot = (bpm & MaskBit.HOT) > 0
        clearly_hot = model.dark_e_per_s > 2 * 0.5
        assert hot[clearly_hot].mean() >= 0.95
        assert (hot & ~model.hot_pixels).sum() <= 2  # false hot pixels
        dead = model.flat < 0.5 * np.median(model.flat)
        low = (bpm & MaskBit.LOWRESP) > 0
        for col in model.bad_columns:
            if dead[:, col].any():
                assert low[dead[:, col], col].all()
        assert (low & ~dead).sum() <= 5
        assert np.all((bpm > 0) == ((bpm & MaskBit.BAD) > 0))


def test_bad_pixel_mask_tiled_equals_whole(masters) -> None:  # type: ignore[no-untyped-def]
    tiled = bad_pixel_mask(dark=masters.dark.chunk({"y": 40, "x": 48}),
                           flat=masters.flat.chunk({"y": 40, "x": 48}))  # fmt: skip
    whole = bad_pixels(masters.dark.values, masters.flat.values)
    with dask.config.set(scheduler="sync"):
        assert_same(tiled.values, whole)


def test_masters_reject_bad_input(survey: Survey) -> None:
    with pytest.raises(ParameterError, match="non-empty sequence"):
        master_bias([])
    with pytest.raises(ParameterError, match="IMAGETYP 'flat'"):
        master_bias(survey.frames("flat-r")[:2])
    bias = master_bias(survey.frames("bias"))["bias"]
    frames = survey.frames("dark")
    with pytest.raises(ParameterError, match="frame 1"):
        master_dark([frames[0], frames[1].isel(detector=[0, 1])], bias=bias)
    with pytest.raises(ParameterError, match="sigma"):
        master_flat(survey.frames("flat-r")[:2], bias=bias, sigma=0)
    with pytest.raises(ParameterError, match="unknown option"):
        make_masters(bias=survey.frames("bias"), sigmaa=3)
    with pytest.raises(ParameterError, match="window_px"):
        bad_pixels(np.zeros((10, 14)), window_px=4)

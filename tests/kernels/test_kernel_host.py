"""The host side of the launchers: tables cached per list of tensors, no synchronization inside a
launcher, the problems of a call read once, and tensors split into int32-addressable row chunks."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from moeq_triton.kernels import amax as amax_module
from moeq_triton.kernels import (
    grouped_amax,
    grouped_amax_reference,
    grouped_row_amax,
    grouping,
    quantize_fp8,
    quantize_fp8_reference,
    quantize_nvfp4,
    quantize_nvfp4_reference,
)
from moeq_triton.kernels import nvfp4 as nvfp4_module
from tests.assertions import assert_bitwise_equal, assert_results_equal
from tests.device import TEST_DEVICE

KERNELS_DIR = Path(grouping.__file__).resolve().parent
SYNCING = ("item", "cpu", "tolist", "nonzero", "__bool__", "__int__", "__float__")


def small_weights(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    stacked = torch.randn(3, 5, 32, generator=gen).bfloat16()
    return [w.to(TEST_DEVICE) for w in (*stacked.unbind(0), torch.randn(4, 48, generator=gen).bfloat16())]


@pytest.fixture
def host_reads(monkeypatch):
    """Every call of a synchronizing tensor method (or torch.cuda.synchronize) made from kernels/ code,
    as (calling function, method)."""
    calls: list[tuple[str, str]] = []

    def recorder(name, original):
        def wrapped(*args, **kwargs):
            caller = inspect.currentframe().f_back
            if Path(caller.f_code.co_filename).resolve().parent == KERNELS_DIR:
                calls.append((caller.f_code.co_name, name))
            return original(*args, **kwargs)

        return wrapped

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, recorder(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", recorder("synchronize", torch.cuda.synchronize))
    return calls


def test_one_host_read_per_call_and_none_in_a_launcher(host_reads):
    """A launcher that reads a device value stalls the GPU queue; each public call may read its
    problems once, at the end (Problems.raise_first), and nowhere else."""
    weights = small_weights(0)
    amax = grouped_amax_reference(weights)
    calls = [
        lambda: grouped_amax(weights),
        lambda: grouped_row_amax(weights),
        lambda: quantize_nvfp4(weights),
        lambda: quantize_nvfp4(weights, amax),
        lambda: quantize_fp8(weights),
        lambda: quantize_fp8(weights, amax),
        lambda: quantize_fp8(weights, per_channel=True),
    ]
    for call in calls:
        host_reads.clear()
        call()
        assert host_reads == [("raise_first", "tolist")], host_reads


def test_table_is_built_once_per_list_of_tensors():
    """The second call with the same tensors reuses the device table; another list builds its own."""
    grouping.clear_table_cache()
    weights = small_weights(1)
    tables = len({grouping.tiles_for(m.TILES, TEST_DEVICE).rows for m in (amax_module, nvfp4_module)})
    before = grouping.table_cache_stats()
    quantize_nvfp4(weights)  # amax pass + NVFP4 pass: one table per tile height
    quantize_nvfp4(weights)
    after = grouping.table_cache_stats()
    assert after.get("miss", 0) - before.get("miss", 0) == tables
    assert after.get("hit", 0) - before.get("hit", 0) == 4 - tables
    quantize_nvfp4(small_weights(1))  # same shapes, other tensors: other pointers, new tables
    assert grouping.table_cache_stats()["miss"] - after.get("miss", 0) == tables


def test_tensors_beyond_int32_offsets_are_split_into_row_chunks(monkeypatch):
    """Offsets inside a table entry are int32; a tensor spanning more elements is split by rows on the
    host.  A tiny limit makes every tensor here split; results must not change by a bit."""
    monkeypatch.setattr(grouping, "MAX_ENTRY_ELEMENTS", 100)
    grouping.clear_table_cache()
    gen = torch.Generator().manual_seed(2)
    stacked = torch.randn(2, 70, 32, generator=gen).bfloat16()
    stacked = stacked.to(TEST_DEVICE)
    weights = [stacked[0], stacked[1, :, :16], torch.randn(33, 48, generator=gen).bfloat16().to(TEST_DEVICE)]
    groups = grouping.groups_for(weights, 4)
    assert len(groups[0].entries) > len(weights), "test lost its edge: nothing was split"
    amax = grouped_amax_reference(weights)
    assert_bitwise_equal(grouped_amax(weights), amax, "amax of split tensors")
    for got, w in zip(grouped_row_amax(weights), weights):
        assert_bitwise_equal(got, w.abs().amax(-1).float(), "row amax of split tensors")
    for i, (w, r) in enumerate(zip(weights, quantize_nvfp4(weights, amax))):
        assert_results_equal(r, quantize_nvfp4_reference(w, amax[i]), f"nvfp4 weights[{i}]")
    for i, (w, r) in enumerate(zip(weights, quantize_fp8(weights, amax))):
        assert_results_equal(r, quantize_fp8_reference(w, amax[i]), f"fp8 weights[{i}]")
    grouping.clear_table_cache()


def test_unaligned_views_take_the_plain_path():
    """A view whose base is not 16-byte aligned (or K, row stride not a multiple of 8 elements) must not
    get alignment facts; its group is launched with ALIGNED=False and still gives exact bytes."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(9, 40, generator=gen).bfloat16().to(TEST_DEVICE)
    weights = [base[:, 1:33], base[:, 8:24]]  # 2-byte offset: unaligned; K 32 and 16
    assert not grouping.groups_for(weights, 4)[0].aligned
    amax = grouped_amax_reference(weights)
    assert_bitwise_equal(grouped_amax(weights), amax, "amax of unaligned views")
    for i, (w, r) in enumerate(zip(weights, quantize_nvfp4(weights, amax))):
        assert_results_equal(r, quantize_nvfp4_reference(w, amax[i]), f"nvfp4 weights[{i}]")

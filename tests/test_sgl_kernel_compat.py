"""The CPU ``sgl_kernel`` shim (compat/sgl_kernel_cpu) against small torch references.

Skipped unless the installed ``sgl_kernel`` is the shim: a real kernel build has its
own tests and must not be exercised through these expectations.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

sgl_kernel = pytest.importorskip("sgl_kernel")
if not getattr(sgl_kernel, "IS_CPU_COMPAT_SHIM", False):
    pytest.skip("the installed sgl_kernel is not the CPU shim", allow_module_level=True)

from sgl_kernel import (  # noqa: E402
    assign_req_to_token_pool_cpu,
    copy_all_layer_kv_cache_cpu,
)

# Names sglang 0.5.23 imports from sgl_kernel at module import time on CPU.
SPECULATIVE_NAMES = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "verify_tree_greedy_cpu",
)


def _kv_buffers(num_layers: int, rows: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(num_layers * 1000 + rows)
    shape = (rows, 2, 8)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(2 * num_layers)]


def _pointer_table(buffers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``MHATokenToKVPool`` builds: base addresses and slot-row bytes."""
    data_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in buffers], dtype=torch.int64)
    return data_ptrs, strides


def _reference_move(buffer: torch.Tensor, tgt: list[int], src: list[int]) -> torch.Tensor:
    """Gather every source row, then scatter: the documented overlap-safe semantics."""
    expected = buffer.clone()
    staged = [buffer[s].clone() for s in src]
    for t, row in zip(tgt, staged, strict=True):
        expected[t] = row
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_copy_all_layer_kv_cache_matches_reference(
    dtype: torch.dtype, index_dtype: torch.dtype
) -> None:
    buffers = _kv_buffers(num_layers=3, rows=32, dtype=dtype)
    # A cycle (5->6->7->5) and a chain that reads a row another pair overwrites (9->3, 3->20).
    tgt = [6, 7, 5, 3, 20]
    src = [5, 6, 7, 9, 3]
    expected = [_reference_move(b, tgt, src) for b in buffers]
    data_ptrs, strides = _pointer_table(buffers)

    copy_all_layer_kv_cache_cpu(
        data_ptrs,
        strides,
        torch.tensor(tgt, dtype=index_dtype),
        torch.tensor(src, dtype=index_dtype),
    )

    for got, want in zip(buffers, expected, strict=True):
        assert torch.equal(got, want)


def test_copy_all_layer_kv_cache_buffers_of_different_row_sizes() -> None:
    small = torch.arange(40, dtype=torch.float32).view(10, 4)
    wide = torch.arange(90, dtype=torch.float64).view(10, 9)
    expected = [_reference_move(small, [0, 9], [9, 0]), _reference_move(wide, [0, 9], [9, 0])]
    data_ptrs, strides = _pointer_table([small, wide])

    copy_all_layer_kv_cache_cpu(data_ptrs, strides, torch.tensor([0, 9]), torch.tensor([9, 0]))

    assert torch.equal(small, expected[0])
    assert torch.equal(wide, expected[1])


def test_copy_all_layer_kv_cache_empty_and_invalid_inputs() -> None:
    buffers = _kv_buffers(num_layers=1, rows=4, dtype=torch.float32)
    before = [b.clone() for b in buffers]
    data_ptrs, strides = _pointer_table(buffers)
    empty = torch.empty(0, dtype=torch.int64)

    copy_all_layer_kv_cache_cpu(data_ptrs, strides, empty, empty)
    assert all(torch.equal(b, a) for b, a in zip(buffers, before, strict=True))

    one = torch.tensor([1])
    with pytest.raises(TypeError, match="uint64"):
        copy_all_layer_kv_cache_cpu(data_ptrs.to(torch.int64), strides, one, one)
    with pytest.raises(TypeError, match="share"):
        copy_all_layer_kv_cache_cpu(data_ptrs, strides, one, one.to(torch.int32))
    with pytest.raises(IndexError, match="non-negative"):
        copy_all_layer_kv_cache_cpu(data_ptrs, strides, torch.tensor([-1]), one)
    with pytest.raises(ValueError, match="invalid KV buffer"):
        copy_all_layer_kv_cache_cpu(torch.zeros(1, dtype=torch.uint64), strides[:1], one, one)


@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_assign_req_to_token_pool_matches_reference(offset_dtype: torch.dtype) -> None:
    pool_len, num_reqs = 32, 6
    req_pool_indices = torch.tensor([2, 4, 1, 5], dtype=torch.int64)
    start = torch.tensor([0, 3, 8, 30], dtype=offset_dtype)
    end = torch.tensor([6, 3, 15, 32], dtype=offset_dtype)  # the second request is empty
    total = int((end - start).sum())
    out_cache_loc = torch.randperm(4096, generator=torch.Generator().manual_seed(0))[:total]
    req_to_token = torch.full((num_reqs, pool_len), -1, dtype=torch.int32)
    expected = req_to_token.clone()
    offset = 0
    for i in range(len(req_pool_indices)):
        s, e = int(start[i]), int(end[i])
        expected[int(req_pool_indices[i]), s:e] = out_cache_loc[offset : offset + e - s].int()
        offset += e - s

    assign_req_to_token_pool_cpu(
        req_pool_indices, req_to_token, start, end, out_cache_loc, pool_len
    )

    assert torch.equal(req_to_token, expected)


def test_assign_req_to_token_pool_rejects_bad_inputs() -> None:
    table = torch.zeros((2, 8), dtype=torch.int32)
    idx = torch.tensor([0])
    with pytest.raises(TypeError, match="int32"):
        assign_req_to_token_pool_cpu(idx, table.long(), idx, idx + 1, torch.tensor([5]), 8)
    with pytest.raises(ValueError, match="slots"):
        assign_req_to_token_pool_cpu(idx, table, idx, idx + 3, torch.tensor([5]), 8)
    with pytest.raises(ValueError, match=r"\[\*, 4\]"):
        assign_req_to_token_pool_cpu(idx, table, idx, idx + 1, torch.tensor([5]), 4)


def _murmur3_x86_32(key: bytes) -> int:
    """Textbook MurmurHash3_x86_32 with seed 0, written over bytes."""
    mask = 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    h = 0
    for (k,) in struct.iter_unpack("<I", key):
        k = rotl((k * 0xCC9E2D51) & mask, 15) * 0x1B873593 & mask
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & mask
    h ^= len(key)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def test_murmur_hash32_matches_textbook_murmur3() -> None:
    seeds = torch.tensor([0, 42, 2**40 + 7, 2**63 + 5], dtype=torch.uint64)
    positions = torch.tensor([0, 1, 1000, 2**33 + 3], dtype=torch.int64)
    cols = torch.tensor([0, 1, 2, 255, 70000], dtype=torch.int64)

    hashed = torch.ops.sgl_kernel.murmur_hash32_cpu.default(seeds, positions, cols)

    assert hashed.dtype == torch.uint32 and hashed.shape == (4, 5)
    for i, (seed, pos) in enumerate(zip(seeds.tolist(), positions.tolist(), strict=True)):
        for j, col in enumerate(cols.tolist()):
            key = struct.pack("<QII", seed, pos & 0xFFFFFFFF, col & 0xFFFFFFFF)
            assert int(hashed[i, j]) == _murmur3_x86_32(key), (seed, pos, col)


@pytest.mark.parametrize("name", SPECULATIVE_NAMES)
def test_speculative_ops_refuse_to_run(name: str) -> None:
    with pytest.raises(NotImplementedError, match=name):
        getattr(sgl_kernel, name)(torch.zeros(1))


def test_speculative_submodule_stub() -> None:
    from sgl_kernel.speculative import reconstruct_indices_from_tree_mask

    with pytest.raises(NotImplementedError, match="reconstruct_indices_from_tree_mask"):
        reconstruct_indices_from_tree_mask()


def test_amx_probe_stays_negative() -> None:
    """SGLang enables its AMX kernels iff this op exists; the shim must never add it."""
    assert not hasattr(sgl_kernel, "convert_weight_packed")
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")


def test_warns_when_a_real_kernel_distribution_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sgl_kernel import _guard

    def fake_version(name: str) -> str:
        if name == "sglang-kernel":
            return "0.4.9"
        raise _guard.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_guard.metadata, "version", fake_version)
    with pytest.warns(RuntimeWarning, match="sglang-kernel==0.4.9"):
        _guard.warn_if_real_kernel_installed()

    monkeypatch.setattr(_guard.metadata, "version", lambda name: fake_version("other"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _guard.warn_if_real_kernel_installed()


# SGLang's own CPU call paths, in a fresh interpreter: SGLANG_USE_CPU_ENGINE must be
# set before sglang is first imported (``is_cpu()`` reads it at import time).
_SGLANG_PATHS_SCRIPT = textwrap.dedent(
    """
    import importlib
    import torch

    for module in (
        "sglang.kernels.ops.speculative.spec_tree",
        "sglang.kernels.ops.speculative.cache_locs",
        "sglang.kernels.ops.speculative.eagle",
        "sglang.kernels.ops.speculative.multi_layer_eagle",
        "sglang.kernels.ops.speculative.reconstruct_tree",
    ):
        importlib.import_module(module)

    from sglang.kernels.ops.sampling.murmur_hash import murmur_hash32
    from sglang.srt.mem_cache.allocation import assign_req_to_token_pool_func
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    # The pool's constructor already runs one warm-up copy through the shim.
    pool = MHATokenToKVPool(
        size=64, page_size=1, dtype=torch.float32, head_num=2, head_dim=8, layer_num=3,
        device="cpu", enable_memory_saver=False, enable_kv_cache_copy=True,
    )
    buffers = [*pool.k_buffer, *pool.v_buffer]
    for b in buffers:
        b.copy_(torch.randn_like(b))
    expected = [b.clone() for b in buffers]
    tgt, src = [5, 6, 7, 40], [6, 7, 5, 3]
    for e in expected:
        rows = [e[s].clone() for s in src]
        for t, row in zip(tgt, rows):
            e[t] = row
    pool.move_kv_cache(torch.tensor(tgt), torch.tensor(src))
    assert all(torch.equal(b, e) for b, e in zip(buffers, expected)), "move_kv_cache"

    req_to_token = torch.zeros((4, 16), dtype=torch.int32)
    assign_req_to_token_pool_func(
        torch.tensor([3, 1]), req_to_token, torch.tensor([2, 0]), torch.tensor([5, 2]),
        torch.tensor([11, 12, 13, 21, 22]), 2,
    )
    assert req_to_token[3, 2:5].tolist() == [11, 12, 13], req_to_token
    assert req_to_token[1, 0:2].tolist() == [21, 22], req_to_token
    assert int(req_to_token.count_nonzero()) == 5

    hashed = murmur_hash32(
        torch.tensor([7, 7], dtype=torch.uint64), torch.tensor([0, 1]), torch.arange(5)
    )
    assert hashed.shape == (2, 5) and hashed.dtype == torch.uint32
    assert not torch.equal(hashed[0], hashed[1])
    print("SGLANG-PATHS-OK")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang not installed")
def test_sglang_cpu_call_paths_use_the_shim() -> None:
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _SGLANG_PATHS_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "SGLANG-PATHS-OK" in result.stdout, (
        f"rc={result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    )

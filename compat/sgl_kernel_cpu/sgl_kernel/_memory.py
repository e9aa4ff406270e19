"""KV-cache and request-table ops of SGLang's CPU engine, in plain torch.

Semantics follow the Triton kernels they replace (``copy_all_layer_kv_cache_tiled``
in ``sglang/kernels/ops/kvcache/cache_move.py`` and ``assign_req_to_token_pool`` in
``sglang/srt/mem_cache/allocation.py``) and the dtype contracts of the C++ CPU ops
in sgl-kernel.
"""

import ctypes

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


def _require_cpu(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got device {tensor.device}")


def _rows_at(address: int, row_bytes: int, num_rows: int) -> torch.Tensor:
    """A ``[num_rows, row_bytes]`` uint8 view of memory owned by someone else.

    ctypes maps the raw address to a writable buffer and ``torch.frombuffer`` wraps it
    without copying; the returned tensor keeps the ctypes array alive, not the owner
    of the memory, so it must not outlive the call that made it.
    """
    buffer = (ctypes.c_uint8 * (row_bytes * num_rows)).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(num_rows, row_bytes)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """For every buffer ``b``: ``buf_b[tgt_loc[i], :] = buf_b[src_loc[i], :]``.

    ``data_ptrs`` (uint64) holds the base address of each KV buffer (K and V of every
    layer) and ``strides`` (int64) its slot-row size in bytes, which is also the copy
    width, exactly as ``MHATokenToKVPool.data_ptrs``/``data_strides``. Each buffer is
    gathered before it is scattered, so overlapping ``tgt_loc``/``src_loc`` are safe,
    like the Triton kernel. Bounds cannot be checked from a raw pointer: the caller
    guarantees that every buffer has more than ``max(tgt_loc, src_loc)`` rows
    (``move_kv_cache`` checks the locations against the pool size first).
    """
    _require_cpu(data_ptrs=data_ptrs, strides=strides, tgt_loc=tgt_loc, src_loc=src_loc)
    if data_ptrs.dtype != torch.uint64:
        raise TypeError(f"data_ptrs must be uint64, got {data_ptrs.dtype}")
    if strides.dtype != torch.int64:
        raise TypeError(f"strides must be int64, got {strides.dtype}")
    if tgt_loc.dtype != src_loc.dtype or tgt_loc.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"tgt_loc/src_loc must share an int32/int64 dtype, got {tgt_loc.dtype}/{src_loc.dtype}"
        )
    if strides.numel() != data_ptrs.numel():
        raise ValueError(f"{data_ptrs.numel()} data_ptrs but {strides.numel()} strides")
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError(f"{tgt_loc.numel()} tgt_loc but {src_loc.numel()} src_loc")
    if data_ptrs.numel() == 0 or tgt_loc.numel() == 0:
        return

    tgt = tgt_loc.reshape(-1).to(torch.int64)
    src = src_loc.reshape(-1).to(torch.int64)
    if int(torch.minimum(tgt.min(), src.min())) < 0:
        raise IndexError("tgt_loc/src_loc must be non-negative slot indices")
    num_rows = int(torch.maximum(tgt.max(), src.max())) + 1

    for address, row_bytes in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        if address == 0 or row_bytes <= 0:
            raise ValueError(f"invalid KV buffer (address {address:#x}, row bytes {row_bytes})")
        rows = _rows_at(address, row_bytes, num_rows)
        rows[tgt] = rows[src]  # advanced indexing gathers into a copy before scattering


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """``req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[seg_i]``.

    ``seg_i`` is request ``i``'s run in the packed ``out_cache_loc``: the runs follow
    each other in batch order, each ``end[i] - start[i]`` long. ``req_to_token`` is the
    int32 ``[num_reqs, pool_len]`` table of ``ReqToTokenPool``; ``out_cache_loc`` is
    int64, as the C++ op requires.
    """
    _require_cpu(
        req_pool_indices=req_pool_indices,
        req_to_token=req_to_token,
        start_offset=start_offset,
        end_offset=end_offset,
        out_cache_loc=out_cache_loc,
    )
    if req_to_token.dtype != torch.int32:
        raise TypeError(f"req_to_token must be int32, got {req_to_token.dtype}")
    if out_cache_loc.dtype != torch.int64:
        raise TypeError(f"out_cache_loc must be int64, got {out_cache_loc.dtype}")
    if start_offset.dtype != end_offset.dtype:
        raise TypeError(f"offset dtypes differ: {start_offset.dtype} vs {end_offset.dtype}")
    if req_to_token.dim() != 2 or req_to_token.shape[1] != pool_len:
        raise ValueError(f"req_to_token {tuple(req_to_token.shape)} is not [*, {pool_len}]")
    batch_size = req_pool_indices.numel()
    if start_offset.numel() != batch_size or end_offset.numel() != batch_size:
        raise ValueError("req_pool_indices, start_offset and end_offset differ in length")

    starts = start_offset.reshape(-1).to(torch.int64)
    lens = end_offset.reshape(-1).to(torch.int64) - starts
    if batch_size == 0:
        return
    if int(lens.min()) < 0:
        raise ValueError("end_offset must not be smaller than start_offset")
    total = int(lens.sum())
    if total == 0:
        return
    if out_cache_loc.numel() < total:
        raise ValueError(f"out_cache_loc has {out_cache_loc.numel()} slots, {total} needed")

    rows = req_pool_indices.reshape(-1).to(torch.int64).repeat_interleave(lens)
    run_starts = (torch.cumsum(lens, 0) - lens).repeat_interleave(lens)
    cols = starts.repeat_interleave(lens) + torch.arange(total) - run_starts
    req_to_token[rows, cols] = out_cache_loc.reshape(-1)[:total].to(torch.int32)

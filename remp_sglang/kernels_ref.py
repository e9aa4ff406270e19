"""Pure-torch reference for the KV-cache copy ops (gather/scatter/copy).

It defines the semantics the compiled kernels (csrc/) are tested against and is
the fallback when the extension is missing. Validation mirrors csrc/ops.cpp:
same checks, same order, same exception types and message text, so callers and
tests see one behaviour whichever implementation runs.

Pool layout (SGLang MHATokenToKVPool): per layer a K and a V tensor, each
contiguous [num_slots, num_heads, head_dim]. Packed buffers are contiguous
[2, layers, tokens, heads, head_dim] with index 0 = K and 1 = V.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor
TensorList = Sequence[Tensor]

__all__ = ["gather_kv", "scatter_kv", "copy_kv", "extension_available"]


def extension_available() -> bool:
    """The reference never uses the compiled extension."""
    return False


# --------------------------------------------------------------------------- validation


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_pool(op: str, k: TensorList, v: TensorList, kname: str, vname: str) -> Tensor:
    """Check a pool's layer lists; return the reference tensor (k[0])."""
    if len(k) == 0:
        raise ValueError(f"{op}: {kname} must be a non-empty list of tensors")
    if len(k) != len(v):
        raise ValueError(
            f"{op}: {kname} and {vname} must have the same length, got {len(k)} and {len(v)}"
        )
    ref = k[0]
    ref_label = f"{kname}[0]"
    for name, lst in ((kname, k), (vname, v)):
        for i, t in enumerate(lst):
            lab = f"{name}[{i}]"
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {lab} is not a tensor")
            if t.dim() != 3:
                raise ValueError(
                    f"{op}: {lab} must be 3-D [num_slots, num_heads, head_dim], "
                    f"got shape {_shape(t)}"
                )
            if t.dtype != ref.dtype:
                raise TypeError(
                    f"{op}: dtype mismatch: {lab} is {t.dtype} but {ref_label} is {ref.dtype}"
                )
            if t.device != ref.device:
                raise ValueError(
                    f"{op}: device mismatch: {lab} is on {t.device} but {ref_label} is on "
                    f"{ref.device}"
                )
            if t.shape != ref.shape:
                raise ValueError(
                    f"{op}: shape mismatch: {lab} has shape {_shape(t)} but {ref_label} has "
                    f"shape {_shape(ref)}"
                )
            if not t.is_contiguous():
                raise ValueError(f"{op}: {lab} must be contiguous")
    return ref


def _check_index(op: str, name: str, idx: Tensor, ref: Tensor, pool_name: str) -> None:
    if not isinstance(idx, Tensor):
        raise TypeError(f"{op}: {name} is not a tensor")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 or int64, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {_shape(idx)}")
    if idx.device != ref.device:
        raise ValueError(
            f"{op}: device mismatch: {name} is on {idx.device} but {pool_name}[0] is on "
            f"{ref.device}"
        )


def _check_range(
    op: str, what: str, begin: int, end: int, limit: int, pool_name: str, unit: str
) -> None:
    if not (0 <= begin < end <= limit):
        raise ValueError(
            f"{op}: {what} range [{begin}, {end}) is empty or out of bounds for {pool_name} "
            f"with {limit} {unit}"
        )


def _check_index_values(op: str, name: str, idx: Tensor, limit: int) -> None:
    if idx.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(idx))
    if lo < 0 or hi >= limit:
        raise IndexError(
            f"{op}: {name} out of range: values span [{lo}, {hi}] but the pool has "
            f"{limit} slots"
        )


def _check_tensor_like(op: str, name: str, t: Tensor, ref: Tensor) -> None:
    """dtype and device of out/packed against k_layers[0]."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} is not a tensor")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: dtype mismatch: {name} is {t.dtype} but k_layers[0] is {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(
            f"{op}: device mismatch: {name} is on {t.device} but k_layers[0] is on {ref.device}"
        )


def _check_no_overlap(op: str, ranges: list[tuple[int, int, bool, str]]) -> None:
    """Destinations may overlap neither sources nor each other."""
    ranges = sorted((r for r in ranges if r[1] > r[0]), key=lambda r: r[0])
    for i, (_b0, e0, dst0, name0) in enumerate(ranges):
        for b1, _e1, dst1, name1 in ranges[i + 1 :]:
            if b1 >= e0:
                break
            if not (dst0 or dst1):
                continue
            d, o = (name0, name1) if dst0 else (name1, name0)
            raise ValueError(
                f"{op}: {d} overlaps {o} in memory "
                "(destinations must not alias sources or each other)"
            )


def _mem(t: Tensor, is_dst: bool, name: str) -> tuple[int, int, bool, str]:
    b = t.data_ptr()
    return (b, b + t.numel() * t.element_size(), is_dst, name)


def _pool_ranges(
    k: TensorList, v: TensorList, kname: str, vname: str, begin: int, count: int, is_dst: bool
) -> list[tuple[int, int, bool, str]]:
    out = []
    for i in range(begin, begin + count):
        out.append(_mem(k[i], is_dst, f"{kname}[{i}]"))
        out.append(_mem(v[i], is_dst, f"{vname}[{i}]"))
    return out


# --------------------------------------------------------------------------- op bodies
# Same argument lists as the torch.ops.remp.* schemas (csrc/ops.cpp).


def gather_kv_op(
    k_layers: TensorList,
    v_layers: TensorList,
    slots: Tensor,
    layer_begin: int,
    layer_end: int,
    head_begin: int,
    head_end: int,
    out: Tensor,
) -> None:
    op = "gather_kv"
    ref = _check_pool(op, k_layers, v_layers, "k_layers", "v_layers")
    _check_index(op, "slots", slots, ref, "k_layers")
    _check_range(op, "layer", layer_begin, layer_end, len(k_layers), "k_layers", "layers")
    _check_range(op, "head", head_begin, head_end, ref.shape[1], "k_layers", "heads")
    n_layers, n_heads, n = layer_end - layer_begin, head_end - head_begin, slots.numel()
    _check_tensor_like(op, "out", out, ref)
    want = [2, n_layers, n, n_heads, ref.shape[2]]
    if list(out.shape) != want:
        raise ValueError(
            f"{op}: out must have shape {want} [2, layers, tokens, heads, head_dim], "
            f"got {_shape(out)}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous")
    _check_index_values(op, "slots", slots, ref.shape[0])
    ranges = _pool_ranges(k_layers, v_layers, "k_layers", "v_layers", layer_begin, n_layers, False)
    _check_no_overlap(op, [*ranges, _mem(out, True, "out")])
    if n == 0:
        return
    for kv, layers in enumerate((k_layers, v_layers)):
        for i in range(n_layers):
            src = layers[layer_begin + i][:, head_begin:head_end]
            out[kv, i].copy_(src.index_select(0, slots))


def scatter_kv_op(
    packed: Tensor,
    k_layers: TensorList,
    v_layers: TensorList,
    slots: Tensor,
    layer_begin: int,
    head_begin: int,
) -> None:
    op = "scatter_kv"
    ref = _check_pool(op, k_layers, v_layers, "k_layers", "v_layers")
    _check_index(op, "slots", slots, ref, "k_layers")
    _check_tensor_like(op, "packed", packed, ref)
    head_dim = ref.shape[2]
    if packed.dim() != 5 or packed.shape[0] != 2 or packed.shape[4] != head_dim:
        raise ValueError(
            f"{op}: packed must have shape [2, layers, tokens, heads, {head_dim}], "
            f"got {_shape(packed)}"
        )
    if not packed.is_contiguous():
        raise ValueError(f"{op}: packed must be contiguous")
    n_layers, n, n_heads = packed.shape[1], packed.shape[2], packed.shape[3]
    _check_range(
        op, "layer", layer_begin, layer_begin + n_layers, len(k_layers), "k_layers", "layers"
    )
    _check_range(op, "head", head_begin, head_begin + n_heads, ref.shape[1], "k_layers", "heads")
    if slots.numel() != n:
        raise ValueError(f"{op}: slots has {slots.numel()} entries but packed has {n} tokens")
    _check_index_values(op, "slots", slots, ref.shape[0])
    ranges = _pool_ranges(k_layers, v_layers, "k_layers", "v_layers", layer_begin, n_layers, True)
    _check_no_overlap(op, [*ranges, _mem(packed, False, "packed")])
    if n == 0:
        return
    idx = slots.long()
    for kv, layers in enumerate((k_layers, v_layers)):
        for i in range(n_layers):
            dst = layers[layer_begin + i].narrow(1, head_begin, n_heads)
            dst.index_copy_(0, idx, packed[kv, i])


def copy_kv_op(
    src_k: TensorList,
    src_v: TensorList,
    src_slots: Tensor,
    dst_k: TensorList,
    dst_v: TensorList,
    dst_slots: Tensor,
    src_layer_begin: int,
    dst_layer_begin: int,
    num_layers: int,
    src_head_begin: int,
    dst_head_begin: int,
    num_heads: int,
) -> None:
    op = "copy_kv"
    src = _check_pool(op, src_k, src_v, "src_k", "src_v")
    dst = _check_pool(op, dst_k, dst_v, "dst_k", "dst_v")
    if dst.dtype != src.dtype:
        raise TypeError(
            f"{op}: dtype mismatch: dst_k[0] is {dst.dtype} but src_k[0] is {src.dtype}"
        )
    if dst.device != src.device:
        raise ValueError(
            f"{op}: device mismatch: dst_k[0] is on {dst.device} but src_k[0] is on {src.device}"
        )
    if dst.shape[2] != src.shape[2]:
        raise ValueError(
            f"{op}: head_dim mismatch: src_k[0] has head_dim {src.shape[2]} but dst_k[0] has "
            f"head_dim {dst.shape[2]}"
        )
    _check_index(op, "src_slots", src_slots, src, "src_k")
    _check_index(op, "dst_slots", dst_slots, dst, "dst_k")
    if src_slots.numel() != dst_slots.numel():
        raise ValueError(
            f"{op}: src_slots has {src_slots.numel()} entries but dst_slots has "
            f"{dst_slots.numel()}"
        )
    _check_range(
        op, "layer", src_layer_begin, src_layer_begin + num_layers, len(src_k), "src_k", "layers"
    )
    _check_range(
        op, "layer", dst_layer_begin, dst_layer_begin + num_layers, len(dst_k), "dst_k", "layers"
    )
    _check_range(
        op, "head", src_head_begin, src_head_begin + num_heads, src.shape[1], "src_k", "heads"
    )
    _check_range(
        op, "head", dst_head_begin, dst_head_begin + num_heads, dst.shape[1], "dst_k", "heads"
    )
    _check_index_values(op, "src_slots", src_slots, src.shape[0])
    _check_index_values(op, "dst_slots", dst_slots, dst.shape[0])
    _check_no_overlap(
        op,
        _pool_ranges(src_k, src_v, "src_k", "src_v", src_layer_begin, num_layers, False)
        + _pool_ranges(dst_k, dst_v, "dst_k", "dst_v", dst_layer_begin, num_layers, True),
    )
    if src_slots.numel() == 0:
        return
    dst_idx = dst_slots.long()
    for s_layers, d_layers in ((src_k, dst_k), (src_v, dst_v)):
        for i in range(num_layers):
            rows = s_layers[src_layer_begin + i].narrow(1, src_head_begin, num_heads)
            rows = rows.index_select(0, src_slots)
            d = d_layers[dst_layer_begin + i].narrow(1, dst_head_begin, num_heads)
            d.index_copy_(0, dst_idx, rows)


# --------------------------------------------------------------------------- argument resolution
# Shared with kernels.py so both front ends turn the Python API into op arguments alike.


def _resolve_gather(
    k_layers: TensorList,
    slots: Tensor,
    layers: tuple[int, int] | None,
    heads: tuple[int, int] | None,
    out: Tensor | None,
) -> tuple[int, int, int, int, Tensor]:
    """Defaults (all layers, all heads) and the output buffer for gather_kv.

    When `out` is None it is allocated only if the request is well formed;
    otherwise a placeholder is passed so the op's own validation raises the
    precise error (never an allocation of a bogus size).
    """
    if len(k_layers) == 0:
        raise ValueError("gather_kv: k_layers must be a non-empty list of tensors")
    ref = k_layers[0]
    if not isinstance(ref, Tensor):
        raise TypeError("gather_kv: k_layers[0] is not a tensor")
    lb, le = layers if layers is not None else (0, len(k_layers))
    n_heads_pool = ref.shape[1] if ref.dim() == 3 else 0
    hb, he = heads if heads is not None else (0, n_heads_pool)
    lb, le, hb, he = int(lb), int(le), int(hb), int(he)
    if out is None:
        ok = (
            ref.dim() == 3
            and isinstance(slots, Tensor)
            and slots.dim() == 1
            and 0 <= lb < le <= len(k_layers)
            and 0 <= hb < he <= n_heads_pool
        )
        if ok:
            shape = (2, le - lb, slots.shape[0], he - hb, ref.shape[2])
            out = torch.empty(shape, dtype=ref.dtype, device=ref.device)
        else:
            out = torch.empty(0, dtype=ref.dtype, device=ref.device)
    return lb, le, hb, he, out


def _resolve_copy(
    src_k: TensorList,
    src_layers: tuple[int, int] | None,
    src_heads: tuple[int, int] | None,
) -> tuple[int, int, int, int]:
    """(src_layer_begin, num_layers, src_head_begin, num_heads) with defaults = everything."""
    if len(src_k) == 0:
        raise ValueError("copy_kv: src_k must be a non-empty list of tensors")
    ref = src_k[0]
    if not isinstance(ref, Tensor):
        raise TypeError("copy_kv: src_k[0] is not a tensor")
    lb, le = src_layers if src_layers is not None else (0, len(src_k))
    hb, he = src_heads if src_heads is not None else (0, ref.shape[1] if ref.dim() == 3 else 0)
    return int(lb), int(le) - int(lb), int(hb), int(he) - int(hb)


# --------------------------------------------------------------------------- public API


def gather_kv(
    k_layers: TensorList,
    v_layers: TensorList,
    slots: Tensor,
    layers: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Pack the rows `slots` of layers [l0, l1) and heads [h0, h1) into [2, L, n, h, D].

    Returns `out` (allocated when None). Repeated slots are allowed.
    """
    lb, le, hb, he, out = _resolve_gather(k_layers, slots, layers, heads, out)
    gather_kv_op(k_layers, v_layers, slots, lb, le, hb, he, out)
    return out


def scatter_kv(
    packed: Tensor,
    k_layers: TensorList,
    v_layers: TensorList,
    slots: Tensor,
    layer_begin: int = 0,
    head_begin: int = 0,
) -> None:
    """Write a packed [2, L, n, h, D] buffer into rows `slots` of layers/heads from the offsets.

    Duplicate destination slots are undefined behaviour (which write wins is unspecified).
    """
    scatter_kv_op(packed, k_layers, v_layers, slots, int(layer_begin), int(head_begin))


def copy_kv(
    src_k: TensorList,
    src_v: TensorList,
    src_slots: Tensor,
    dst_k: TensorList,
    dst_v: TensorList,
    dst_slots: Tensor,
    *,
    src_layers: tuple[int, int] | None = None,
    dst_layer_begin: int = 0,
    src_heads: tuple[int, int] | None = None,
    dst_head_begin: int = 0,
) -> None:
    """Copy rows src_slots[t] -> dst_slots[t] pool to pool (re-partition heads, compact slots).

    Source and destination must not share memory; duplicate dst_slots are undefined behaviour.
    """
    slb, nl, shb, nh = _resolve_copy(src_k, src_layers, src_heads)
    copy_kv_op(
        src_k, src_v, src_slots, dst_k, dst_v, dst_slots,
        slb, int(dst_layer_begin), nl, shb, int(dst_head_begin), nh,
    )

"""KV-cache copy kernels: gather / scatter / pool-to-pool copy for resharding.

Moving a KV cache between TP/PP layouts means copying, for every layer and
K/V, rows ``[slot, head slice]`` of SGLang's per-layer pools. Doing that with a
per-layer Python loop costs 2 x layers kernel launches (plus temporaries for
head slices); the compiled ops in ``remp_sglang._C`` do each transfer in ONE
launch over all layers, K and V. When the extension (or its CUDA part) is
missing these wrappers fall back to :mod:`remp_sglang.kernels_ref` and warn
once, so behaviour is identical, only slower.

Layout: per layer K and V tensors, contiguous ``[num_slots, num_heads,
head_dim]``; packed buffers are contiguous ``[2, layers, tokens, heads,
head_dim]`` (0 = K, 1 = V). Slot lists are int32/int64 1-D tensors on the
pools' device. Bad inputs raise ValueError / TypeError / IndexError with the
same message from both implementations.
"""

from __future__ import annotations

import warnings

import torch

from . import _ext
from . import kernels_ref as _ref
from .kernels_ref import Tensor, TensorList

__all__ = ["gather_kv", "scatter_kv", "copy_kv", "extension_available"]

_warned: set[str] = set()


def extension_available() -> bool:
    """True when the compiled kernels (at least the CPU ones) are loaded."""
    return _ext.available()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _use_extension(ref: object) -> bool:
    """Whether the compiled op can serve tensors on `ref`'s device (else warn once)."""
    if not _ext.available():
        _warn_once(
            "ext",
            "remp_sglang._C is not available "
            f"({_ext.load_error()}); using the slow pure-torch KV copy reference",
        )
        return False
    device = ref.device if isinstance(ref, torch.Tensor) else None
    if device is not None and device.type == "cuda" and not _ext.cuda_available():
        _warn_once(
            "cuda",
            "remp_sglang._C was built without CUDA kernels; "
            "using the slow pure-torch KV copy reference for CUDA tensors",
        )
        return False
    if device is not None and device.type not in ("cpu", "cuda"):
        _warn_once(
            f"dev:{device.type}",
            f"remp_sglang._C has no kernels for {device.type}; using the pure-torch reference",
        )
        return False
    return True


def gather_kv(
    k_layers: TensorList,
    v_layers: TensorList,
    slots: Tensor,
    layers: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Pack rows `slots` of layers [l0, l1) and heads [h0, h1) into `out` [2, L, n, h, D].

    Defaults: all layers, all heads, a freshly allocated `out`. `out` may be a
    view into a larger staging buffer (it must be contiguous). Repeated slots
    are fine. Returns `out`.
    """
    lb, le, hb, he, out = _ref._resolve_gather(k_layers, slots, layers, heads, out)
    if _use_extension(k_layers[0]):
        torch.ops.remp.gather_kv(list(k_layers), list(v_layers), slots, lb, le, hb, he, out)
    else:
        _ref.gather_kv_op(k_layers, v_layers, slots, lb, le, hb, he, out)
    return out


def scatter_kv(
    packed: Tensor,
    k_layers: TensorList,
    v_layers: TensorList,
    slots: Tensor,
    layer_begin: int = 0,
    head_begin: int = 0,
) -> None:
    """Inverse of gather: write packed [2, L, n, h, D] into rows `slots`, layers/heads from offsets.

    The destination pool may have other head and slot counts than the source
    of `packed`. Duplicate destination slots are undefined behaviour.
    """
    ref = k_layers[0] if len(k_layers) else packed
    if _use_extension(ref):
        torch.ops.remp.scatter_kv(
            packed, list(k_layers), list(v_layers), slots, int(layer_begin), int(head_begin)
        )
    else:
        _ref.scatter_kv_op(packed, k_layers, v_layers, slots, int(layer_begin), int(head_begin))


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
    """Pool-to-pool copy of rows src_slots[t] -> dst_slots[t] in one pass.

    Re-partitions heads (src_heads -> dst_head_begin) and compacts slots
    without a staging buffer. Defaults: all source layers and heads. Source and
    destination must not share memory; duplicate dst_slots are undefined.
    """
    slb, nl, shb, nh = _ref._resolve_copy(src_k, src_layers, src_heads)
    args = (slb, int(dst_layer_begin), nl, shb, int(dst_head_begin), nh)
    if _use_extension(src_k[0]):
        torch.ops.remp.copy_kv(
            list(src_k), list(src_v), src_slots, list(dst_k), list(dst_v), dst_slots, *args
        )
    else:
        _ref.copy_kv_op(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, *args)

"""``torch.ops.sgl_kernel.murmur_hash32_cpu``: seeded sampling on CPU.

``sglang/kernels/ops/sampling/murmur_hash.py`` calls this op for CPU tensors when a
request is sampled with a per-request seed (``--enable-deterministic-inference``).
The hash matches the Triton ``murmur_hash32_kernel`` bit for bit: MurmurHash3 over the
four 32-bit words (seed low, seed high, position, column), length 16.

All arithmetic runs in int64 on values below 2**32; 32-bit products are split into
16-bit halves so that no intermediate overflows.
"""

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, constant: int) -> torch.Tensor:
    low = a * (constant & 0xFFFF)
    high = ((a * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _mul32(k, 0xCC9E2D51)
    k = _rotl32(k, 15)
    k = _mul32(k, 0x1B873593)
    h = h ^ k
    h = _rotl32(h, 13)
    return (h * 5 + 0xE6546B64) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


@torch.library.custom_op("sgl_kernel::murmur_hash32_cpu", mutates_args=())
def murmur_hash32_cpu(
    seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor
) -> torch.Tensor:
    """Hash every (row, column) pair to a uint32: result shape ``[n, m]``."""
    seed64 = seed.reshape(-1).to(torch.uint64).view(torch.int64)
    seed_low = (seed64 & _MASK32).unsqueeze(1)
    seed_high = ((seed64 >> 32) & _MASK32).unsqueeze(1)
    pos = (positions.reshape(-1).to(torch.int64) & _MASK32).unsqueeze(1)
    col = (col_indices.reshape(-1).to(torch.int64) & _MASK32).unsqueeze(0)

    h = torch.zeros_like(seed_low)
    h = _mix(h, seed_low)
    h = _mix(h, seed_high)
    h = _mix(h, pos)
    h = _mix(h, col)  # broadcasts [n, 1] against [1, m]
    h = _fmix32(h ^ 16)
    return h.to(torch.uint32)


@murmur_hash32_cpu.register_fake
def _(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    return seed.new_empty((seed.shape[0], col_indices.shape[0]), dtype=torch.uint32)

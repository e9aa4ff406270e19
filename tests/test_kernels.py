"""KV-cache copy kernels: compiled ops vs an independent oracle and the reference.

Every check is bit-exact on random data. Destinations are poisoned first (NaN
for gather outputs, unrelated random data for pools) so a row that is not
written, or written where it should not be, fails the comparison. The CPU
variants always run; the CUDA variants run when a GPU is present.
"""

from __future__ import annotations

import math

import pytest
import torch

from remp_sglang import _ext, kernels, kernels_ref

HAS_CUDA = torch.cuda.is_available()
CUDA_COMPILED = _ext.available() and _ext.cuda_available()
EMULATED_SMS = 2  # small grid: many grid-stride iterations per thread

# "cpu-emulated-cuda" runs the CUDA kernel body on the host (same thread
# mapping, vector widths and table handling), so machines without a GPU still
# check the CUDA indexing logic bit for bit.
DEVICE_PARAMS = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
    ),
    pytest.param(
        "cpu-emulated-cuda",
        marks=pytest.mark.skipif(not CUDA_COMPILED, reason="CUDA kernels not compiled in"),
    ),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request: pytest.FixtureRequest):
    """Device for the test's tensors; the emulated variant switches the CPU back end."""
    if request.param != "cpu-emulated-cuda":
        yield request.param
        return
    prev = torch.ops.remp._set_cuda_emulation(EMULATED_SMS)
    try:
        yield "cpu"
    finally:
        torch.ops.remp._set_cuda_emulation(prev)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [8, 9, 12, 40, 72, 128, 256]
HEAD_COUNTS = [1, 2, 8, 32]
NUM_SLOTS = 14
NUM_LAYERS = 3
# Every head_dim x head count for bf16; fp32/fp16 cover every head_dim with 1
# and 8 heads plus the widest rows, to keep the file fast.
SHAPES = [
    pytest.param(dt, d, h, id=f"{str(dt)[6:]}-d{d}-h{h}")
    for dt in DTYPES
    for d in HEAD_DIMS
    for h in HEAD_COUNTS
    if dt == torch.bfloat16 or h in (1, 8) or (h == 32 and d == 256)
]


@pytest.fixture(autouse=True)
def _require_extension(request: pytest.FixtureRequest) -> None:
    """These tests are about the compiled kernels: fail (not skip) if they are missing."""
    assert _ext.available(), (
        f"remp_sglang._C is not built ({_ext.load_error()}); run "
        "`MAX_JOBS=2 python setup.py build_ext --inplace` or `pip install -e . "
        "--no-build-isolation`"
    )
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec is not None else None
    if device == "cuda" or (device is None and HAS_CUDA):
        assert _ext.cuda_available(), "a GPU is present but the CUDA kernels were not compiled in"


# --------------------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def make_pool(layers: int, slots: int, heads: int, dim: int, dtype, device, seed: int):
    g = _gen(seed)
    k = [rand((slots, heads, dim), dtype, device, g) for _ in range(layers)]
    v = [rand((slots, heads, dim), dtype, device, g) for _ in range(layers)]
    return k, v


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view so NaNs and signed zeros compare bit for bit."""
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype
    a, e = bits(actual.cpu()), bits(expected.cpu())
    if not torch.equal(a, e):
        bad = (a != e).nonzero()
        raise AssertionError(f"{bad.shape[0]} elements differ, first at {bad[0].tolist()}")


def assert_pools_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert_bits_equal(a, e)


def clone_all(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in ts]


def slot_list(kind: str, n: int, num_slots: int, idx_dtype, device, seed: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "empty":
        s = torch.empty(0, dtype=torch.long)
    elif kind == "contiguous":
        start = int(torch.randint(0, num_slots - n + 1, (1,), generator=g))
        s = torch.arange(start, start + n)
    elif kind == "runs":  # a few contiguous runs, like a radix-tree prefix split
        perm = torch.randperm(num_slots // 4, generator=g)[: math.ceil(n / 4)]
        s = torch.cat([torch.arange(4 * int(p), 4 * int(p) + 4) for p in perm])[:n]
    elif kind == "permutation":
        s = torch.randperm(num_slots, generator=g)[:n]
    elif kind == "repeated":
        s = torch.randint(0, num_slots, (n,), generator=g)
        s[: n // 2] = s[0]
    else:
        raise ValueError(kind)
    return s.to(idx_dtype).to(device)


# Independent oracles: advanced indexing, not the reference's index_select/index_copy_.


def oracle_gather(k, v, slots, lb, le, hb, he) -> torch.Tensor:
    idx = slots.long().cpu()
    out = [
        torch.stack([pool[layer].cpu()[idx][:, hb:he] for layer in range(lb, le)])
        for pool in (k, v)
    ]
    return torch.stack(out)


def oracle_scatter(packed, k, v, slots, lb, hb):
    k, v = clone_all([t.cpu() for t in k]), clone_all([t.cpu() for t in v])
    idx = slots.long().cpu()
    n_layers, _, n_heads = packed.shape[1:4]
    for kv, pool in enumerate((k, v)):
        for i in range(n_layers):
            pool[lb + i][idx, hb : hb + n_heads] = packed[kv, i].cpu()
    return k, v


def oracle_copy(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, slb, dlb, nl, shb, dhb, nh):
    dk, dv = clone_all([t.cpu() for t in dst_k]), clone_all([t.cpu() for t in dst_v])
    si, di = src_slots.long().cpu(), dst_slots.long().cpu()
    for s_pool, d_pool in ((src_k, dk), (src_v, dv)):
        for i in range(nl):
            rows = s_pool[slb + i].cpu()[si][:, shb : shb + nh]
            d_pool[dlb + i][di, dhb : dhb + nh] = rows
    return dk, dv


def run_gather(k, v, slots, layers=None, heads=None, out=None):
    """Compiled op and reference on the same request; both must match the oracle."""
    lb, le = layers or (0, len(k))
    hb, he = heads or (0, k[0].shape[1])
    src_before = clone_all(k + v)
    if out is None:
        shape = (2, le - lb, slots.numel(), he - hb, k[0].shape[2])
        out = torch.full(shape, math.nan, dtype=k[0].dtype, device=k[0].device)
    res = kernels.gather_kv(k, v, slots, layers, heads, out=out)
    assert res is out
    expected = oracle_gather(k, v, slots, lb, le, hb, he)
    assert_bits_equal(out, expected)
    assert_bits_equal(kernels_ref.gather_kv(k, v, slots, layers, heads), expected)
    assert_pools_equal(k + v, src_before)  # sources untouched
    return out


def run_scatter(packed, k, v, slots, lb=0, hb=0):
    exp_k, exp_v = oracle_scatter(packed, k, v, slots, lb, hb)
    ref_k, ref_v = clone_all(k), clone_all(v)
    packed_before = packed.clone()
    kernels.scatter_kv(packed, k, v, slots, lb, hb)
    assert_pools_equal(k, exp_k)  # written rows and untouched rows/heads/layers
    assert_pools_equal(v, exp_v)
    kernels_ref.scatter_kv(packed, ref_k, ref_v, slots, lb, hb)
    assert_pools_equal(ref_k, exp_k)
    assert_pools_equal(ref_v, exp_v)
    assert_bits_equal(packed, packed_before)


def run_copy(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, src_layers=None,
             dst_layer_begin=0, src_heads=None, dst_head_begin=0):
    slb, sle = src_layers or (0, len(src_k))
    shb, she = src_heads or (0, src_k[0].shape[1])
    exp_k, exp_v = oracle_copy(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, slb,
                               dst_layer_begin, sle - slb, shb, dst_head_begin, she - shb)
    ref_k, ref_v = clone_all(dst_k), clone_all(dst_v)
    src_before = clone_all(src_k + src_v)
    kw = dict(src_layers=src_layers, dst_layer_begin=dst_layer_begin, src_heads=src_heads,
              dst_head_begin=dst_head_begin)
    kernels.copy_kv(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, **kw)
    assert_pools_equal(dst_k, exp_k)
    assert_pools_equal(dst_v, exp_v)
    kernels_ref.copy_kv(src_k, src_v, src_slots, ref_k, ref_v, dst_slots, **kw)
    assert_pools_equal(ref_k, exp_k)
    assert_pools_equal(ref_v, exp_v)
    assert_pools_equal(src_k + src_v, src_before)


# --------------------------------------------------------------------------- shapes x dtypes


@pytest.mark.parametrize("dtype,head_dim,heads", SHAPES)
def test_gather_shapes(device, dtype, head_dim, heads):
    k, v = make_pool(NUM_LAYERS, NUM_SLOTS, heads, head_dim, dtype, device, seed=head_dim + heads)
    slots = slot_list("permutation", 9, NUM_SLOTS, torch.int64, device, seed=1)
    run_gather(k, v, slots)
    run_gather(k, v, slots, layers=(1, 3))
    if heads > 1:
        run_gather(k, v, slots, layers=(0, 2), heads=(heads // 2, heads))  # TP=2 rank 1
        run_gather(k, v, slots, layers=(2, 3), heads=(0, 1))


@pytest.mark.parametrize("dtype,head_dim,heads", SHAPES)
def test_scatter_shapes(device, dtype, head_dim, heads):
    # Destination pool: more layers and more slots than the data came from,
    # and twice the heads when possible (TP shrink: two ranks' halves merge).
    dst_heads = 2 * heads
    k, v = make_pool(NUM_LAYERS + 1, NUM_SLOTS + 5, dst_heads, head_dim, dtype, device, seed=7)
    g = _gen(heads)
    packed = rand((2, 2, 9, heads, head_dim), dtype, device, g)
    slots = slot_list("permutation", 9, NUM_SLOTS + 5, torch.int32, device, seed=2)
    run_scatter(packed, k, v, slots, lb=1, hb=heads)
    run_scatter(packed, k, v, slots, lb=0, hb=0)
    full = rand((2, NUM_LAYERS + 1, 9, dst_heads, head_dim), dtype, device, g)
    run_scatter(full, k, v, slots)


@pytest.mark.parametrize("dtype,head_dim,heads", SHAPES)
def test_copy_shapes(device, dtype, head_dim, heads):
    src_k, src_v = make_pool(NUM_LAYERS, NUM_SLOTS, heads, head_dim, dtype, device, seed=3)
    dst_heads = max(1, heads // 2)
    dst_k, dst_v = make_pool(NUM_LAYERS - 1, NUM_SLOTS - 4, dst_heads, head_dim, dtype, device, 4)
    src_slots = slot_list("permutation", 9, NUM_SLOTS, torch.int64, device, seed=5)
    dst_slots = slot_list("permutation", 9, NUM_SLOTS - 4, torch.int32, device, seed=6)
    # TP split: heads [h/2, h) of layers [1, 3) into a half-width pool's layers [0, 2).
    h0 = heads - dst_heads
    run_copy(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, src_layers=(1, 3),
             src_heads=(h0, heads))
    # Same head count on both sides with a destination head offset.
    if heads >= 2:
        run_copy(src_k, src_v, src_slots, dst_k, dst_v, dst_slots, src_layers=(0, 1),
                 dst_layer_begin=1, src_heads=(0, 1), dst_head_begin=dst_heads - 1)


# --------------------------------------------------------------------------- index patterns


PATTERNS = ["empty", "contiguous", "runs", "permutation", "repeated"]


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gather_index_patterns(device, pattern, idx_dtype):
    k, v = make_pool(4, 64, 4, 40, torch.bfloat16, device, seed=11)
    for n in (1, 13, 64) if pattern != "empty" else (0,):
        slots = slot_list(pattern, n, 64, idx_dtype, device, seed=n)
        out = run_gather(k, v, slots, layers=(1, 4), heads=(1, 3))
        assert out.shape == (2, 3, n, 2, 40)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p != "repeated"])
def test_scatter_and_copy_index_patterns(device, pattern, idx_dtype):
    k, v = make_pool(3, 64, 4, 72, torch.float16, device, seed=12)
    for n in (1, 13, 64) if pattern != "empty" else (0,):
        slots = slot_list(pattern, n, 64, idx_dtype, device, seed=n + 1)
        packed = rand((2, 3, n, 2, 72), torch.float16, device, _gen(n))
        run_scatter(packed, k, v, slots, lb=0, hb=2)
        dk, dv = make_pool(3, 64, 4, 72, torch.float16, device, seed=13)
        dst_slots = slot_list(pattern, n, 64, idx_dtype, device, seed=n + 2)
        run_copy(k, v, slots, dk, dv, dst_slots, src_heads=(0, 2), dst_head_begin=1)


def test_empty_slots_are_noops(device):
    k, v = make_pool(2, 8, 2, 16, torch.float32, device, seed=14)
    before = clone_all(k + v)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    out = kernels.gather_kv(k, v, empty)
    assert out.shape == (2, 2, 0, 2, 16)
    kernels.scatter_kv(torch.empty(2, 2, 0, 2, 16, device=device), k, v, empty)
    dk, dv = make_pool(2, 8, 2, 16, torch.float32, device, seed=15)
    dbefore = clone_all(dk + dv)
    kernels.copy_kv(k, v, empty, dk, dv, empty.int())
    assert_pools_equal(k + v, before)
    assert_pools_equal(dk + dv, dbefore)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("offset", [0, 1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_into_staging_view(device, dtype, offset):
    """`out` may sit anywhere in a flat staging buffer (unaligned too); the rest is untouched."""
    k, v = make_pool(3, 32, 8, 24, dtype, device, seed=16)
    slots = slot_list("permutation", 17, 32, torch.int64, device, seed=17)
    shape = (2, 2, 17, 4, 24)
    numel = math.prod(shape)
    staging = rand((offset + numel + 5,), dtype, device, _gen(18))
    before = staging.clone()
    out = staging[offset : offset + numel].view(shape)
    out.fill_(math.nan)
    run_gather(k, v, slots, layers=(1, 3), heads=(4, 8), out=out)
    assert_bits_equal(staging[:offset], before[:offset])
    assert_bits_equal(staging[offset + numel :], before[offset + numel :])


@pytest.mark.parametrize("offset", [0, 1, 2])
def test_pool_layers_at_odd_offsets(device, offset):
    """Layers carved from one flat buffer at element offsets that break 16-byte alignment."""
    slots_n, heads, dim, layers = 20, 3, 12, 3
    per = slots_n * heads * dim
    flat = rand((offset + 2 * layers * per,), torch.float16, device, _gen(19))
    views = [flat[offset + i * per : offset + (i + 1) * per].view(slots_n, heads, dim)
             for i in range(2 * layers)]
    k, v = views[:layers], views[layers:]
    slots = slot_list("permutation", 7, slots_n, torch.int32, device, seed=20)
    run_gather(k, v, slots, heads=(1, 3))
    packed = rand((2, layers, 7, 2, dim), torch.float16, device, _gen(21))
    run_scatter(packed, k, v, slots, hb=1)
    dk, dv = make_pool(layers, slots_n, heads, dim, torch.float16, device, seed=22)
    run_copy(k, v, slots, dk, dv, slots.flip(0), src_heads=(0, 2), dst_head_begin=1)


def test_many_layers(device):
    """More layers than fit in the CUDA kernel's by-value pointer table (uploads the table)."""
    k, v = make_pool(70, 6, 2, 8, torch.bfloat16, device, seed=23)
    slots = slot_list("permutation", 5, 6, torch.int64, device, seed=24)
    packed = run_gather(k, v, slots)
    dk, dv = make_pool(70, 6, 2, 8, torch.bfloat16, device, seed=25)
    run_scatter(packed, dk, dv, slots.flip(0))
    dk2, dv2 = make_pool(70, 6, 2, 8, torch.bfloat16, device, seed=26)
    run_copy(k, v, slots, dk2, dv2, slots)


def test_large_rows(device):
    """A 64 KiB row (128 heads x 256 dims x fp16) per slot."""
    k, v = make_pool(2, 5, 128, 256, torch.float16, device, seed=27)
    slots = slot_list("permutation", 4, 5, torch.int64, device, seed=28)
    packed = run_gather(k, v, slots)
    dk, dv = make_pool(2, 5, 128, 256, torch.float16, device, seed=29)
    run_scatter(packed, dk, dv, slots.flip(0))


@pytest.mark.parametrize(
    "heads,head_dim,dtype",
    [(8, 128, torch.bfloat16), (3, 40, torch.float16), (3, 9, torch.float16)],
    ids=["2KiB-rows", "240B-rows", "54B-rows"],
)
def test_large_transfers(device, heads, head_dim, dtype):
    """Transfers over 8 MiB: the CPU kernel switches to streaming stores when rows allow."""
    row = heads * head_dim * 2
    n = max(64, (9 << 20) // (2 * 4 * row))  # > 8 MiB written per op over 4 layers
    k, v = make_pool(4, n + 7, heads, head_dim, dtype, device, seed=60)
    slots = slot_list("permutation", n, n + 7, torch.int64, device, seed=61)
    packed = run_gather(k, v, slots)
    dk, dv = make_pool(4, n + 3, heads + 1, head_dim, dtype, device, seed=62)
    dst_slots = slot_list("permutation", n, n + 3, torch.int32, device, seed=63)
    run_scatter(packed, dk, dv, dst_slots, hb=1)
    ck, cv = make_pool(4, n + 3, heads, head_dim, dtype, device, seed=64)
    run_copy(dk, dv, dst_slots, ck, cv, dst_slots.flip(0), src_heads=(1, heads + 1))


def test_tp_reshard_round_trip(device):
    """TP=1 -> TP=2 -> TP=1: split heads into two half pools and merge them back."""
    k, v = make_pool(4, 40, 8, 64, torch.bfloat16, device, seed=30)
    slots = slot_list("permutation", 25, 40, torch.int64, device, seed=31)
    halves = []
    for rank in range(2):
        packed = kernels.gather_kv(k, v, slots, heads=(4 * rank, 4 * rank + 4))
        hk, hv = make_pool(4, 30, 4, 64, torch.bfloat16, device, seed=32 + rank)
        new_slots = torch.randperm(30, generator=_gen(rank))[:25].to(device)
        kernels.scatter_kv(packed, hk, hv, new_slots)
        halves.append((hk, hv, new_slots))
    merged_k, merged_v = make_pool(4, 50, 8, 64, torch.bfloat16, device, seed=34)
    merged_slots = torch.randperm(50, generator=_gen(35))[:25].to(device)
    for rank, (hk, hv, s) in enumerate(halves):
        kernels.copy_kv(hk, hv, s, merged_k, merged_v, merged_slots, dst_head_begin=4 * rank)
    again = kernels.gather_kv(merged_k, merged_v, merged_slots)
    assert_bits_equal(again, kernels_ref.gather_kv(k, v, slots))


# --------------------------------------------------------------------------- validation


def _error_cases(device: str):
    """name -> (function name, args, kwargs, exception type, message substring)."""
    f32, f16 = torch.float32, torch.float16
    k, v = make_pool(3, 16, 4, 8, f32, device, seed=40)
    slots = torch.tensor([3, 1, 7], device=device)
    out = torch.empty(2, 3, 3, 4, 8, device=device)
    packed = torch.randn(2, 2, 3, 4, 8, generator=_gen(41)).to(device)
    dk, dv = make_pool(3, 8, 2, 8, f32, device, seed=42)
    noncontig = torch.randn(16, 8, 4, generator=_gen(43)).to(device).transpose(1, 2)
    bad_dim = torch.randn(16, 4, 9).to(device)
    c: dict[str, tuple] = {}
    # gather
    c["g_empty"] = ("gather_kv", ([], [], slots), {}, ValueError, "k_layers must be a non-empty")
    c["g_len"] = ("gather_kv", (k, v[:2], slots), {}, ValueError, "must have the same length")
    c["g_ndim"] = ("gather_kv", ([k[0][0]] + k[1:], v, slots), {}, ValueError,
                   r"k_layers\[0\] must be 3-D")
    c["g_dtype"] = ("gather_kv", (k, [v[0], v[1].half(), v[2]], slots), {}, TypeError,
                    r"dtype mismatch: v_layers\[1\] is torch.float16")
    c["g_head_dim"] = ("gather_kv", (k, [v[0], v[1], bad_dim], slots), {}, ValueError,
                       r"shape mismatch: v_layers\[2\]")
    c["g_layer_shape"] = ("gather_kv", ([k[0], k[1], torch.randn(15, 4, 8).to(device)], v, slots),
                          {}, ValueError, r"shape mismatch: k_layers\[2\] has shape \[15, 4, 8\]")
    c["g_noncontig"] = ("gather_kv", (k, [v[0], noncontig, v[2]], slots), {}, ValueError,
                        r"v_layers\[1\] must be contiguous")
    c["g_layer_oob"] = ("gather_kv", (k, v, slots), {"layers": (1, 4)}, ValueError,
                        r"layer range \[1, 4\) is empty or out of bounds")
    c["g_layer_empty"] = ("gather_kv", (k, v, slots), {"layers": (2, 2)}, ValueError,
                          "layer range")
    c["g_layer_neg"] = ("gather_kv", (k, v, slots), {"layers": (-1, 2)}, ValueError, "layer range")
    c["g_head_oob"] = ("gather_kv", (k, v, slots), {"heads": (2, 5)}, ValueError,
                       r"head range \[2, 5\) is empty or out of bounds for k_layers with 4 heads")
    c["g_head_empty"] = ("gather_kv", (k, v, slots), {"heads": (3, 3)}, ValueError, "head range")
    c["g_idx_high"] = ("gather_kv", (k, v, torch.tensor([0, 16], device=device)), {}, IndexError,
                       r"slots out of range: values span \[0, 16\] but the pool has 16 slots")
    c["g_idx_neg"] = ("gather_kv", (k, v, torch.tensor([-1, 2], device=device, dtype=torch.int32)),
                      {}, IndexError, "slots out of range")
    c["g_idx_dtype"] = ("gather_kv", (k, v, slots.float()), {}, TypeError,
                        "slots must be int32 or int64, got torch.float32")
    c["g_idx_int16"] = ("gather_kv", (k, v, slots.short()), {}, TypeError, "int32 or int64")
    c["g_idx_2d"] = ("gather_kv", (k, v, slots.view(1, 3)), {}, ValueError, "slots must be 1-D")
    c["g_out_dtype"] = ("gather_kv", (k, v, slots), {"out": out.half()}, TypeError,
                        "dtype mismatch: out is torch.float16")
    c["g_out_shape"] = ("gather_kv", (k, v, slots), {"out": out[:, :2]}, ValueError,
                        r"out must have shape \[2, 3, 3, 4, 8\]")
    c["g_out_noncontig"] = ("gather_kv", (k, v, slots),
                            {"out": torch.empty(2, 3, 3, 8, 4, device=device).transpose(3, 4)},
                            ValueError, "out must be contiguous")
    c["g_out_alias"] = ("gather_kv", (k, v, slots, (0, 1), (0, 2)),
                        {"out": k[0].view(-1)[: 2 * 3 * 2 * 8].view(2, 1, 3, 2, 8)}, ValueError,
                        r"out overlaps k_layers\[0\]")
    # scatter
    c["s_packed_ndim"] = ("scatter_kv", (packed[0], k, v, slots), {}, ValueError,
                          r"packed must have shape \[2, layers, tokens, heads, 8\]")
    c["s_packed_dim"] = ("scatter_kv", (torch.randn(2, 2, 3, 4, 9).to(device), k, v, slots), {},
                         ValueError, "packed must have shape")
    c["s_packed_kv"] = ("scatter_kv", (torch.randn(3, 2, 3, 4, 8).to(device), k, v, slots), {},
                        ValueError, "packed must have shape")
    c["s_packed_dtype"] = ("scatter_kv", (packed.to(f16), k, v, slots), {}, TypeError,
                           "dtype mismatch: packed is torch.float16 but k_layers")
    c["s_packed_noncontig"] = ("scatter_kv", (packed.transpose(1, 2), k, v, slots), {},
                               ValueError, "packed must be contiguous")
    c["s_tokens"] = ("scatter_kv", (packed, k, v, slots[:2]), {}, ValueError,
                     "slots has 2 entries but packed has 3 tokens")
    c["s_layer_oob"] = ("scatter_kv", (packed, k, v, slots, 2), {}, ValueError,
                        r"layer range \[2, 4\)")
    c["s_layer_neg"] = ("scatter_kv", (packed, k, v, slots, -1), {}, ValueError, "layer range")
    c["s_head_oob"] = ("scatter_kv", (packed, k, v, slots, 0, 1), {}, ValueError,
                       r"head range \[1, 5\)")
    c["s_idx_high"] = ("scatter_kv", (packed, k, v, torch.tensor([1, 2, 99], device=device)), {},
                       IndexError, "values span")
    c["s_len"] = ("scatter_kv", (packed, k[:2], v, slots), {}, ValueError, "same length")
    c["s_kv_alias"] = ("scatter_kv", (packed, k, k, slots), {}, ValueError, "overlaps")
    c["s_packed_alias"] = ("scatter_kv",
                           (k[0].view(-1)[: 2 * 2 * 3 * 4 * 8].view(2, 2, 3, 4, 8), k, v, slots),
                           {}, ValueError, "overlaps")
    # copy
    c["c_dtype"] = ("copy_kv", (k, v, slots, [t.half() for t in dk], [t.half() for t in dv], slots),
                    {}, TypeError, "dtype mismatch: dst_k")
    c["c_head_dim"] = ("copy_kv", (k, v, slots, [torch.randn(8, 2, 4).to(device)] * 3,
                                   [torch.randn(8, 2, 4).to(device)] * 3, slots), {}, ValueError,
                       "head_dim mismatch: src_k")
    c["c_count"] = ("copy_kv", (k, v, slots, dk, dv, slots[:1]), {}, ValueError,
                    "src_slots has 3 entries but dst_slots has 1")
    c["c_heads"] = ("copy_kv", (k, v, slots, dk, dv, slots), {}, ValueError,
                    r"head range \[0, 4\) is empty or out of bounds for dst_k with 2 heads")
    c["c_src_layers"] = ("copy_kv", (k, v, slots, dk, dv, slots),
                         {"src_layers": (2, 4), "src_heads": (0, 2)}, ValueError,
                         r"layer range \[2, 4\) is empty or out of bounds for src_k")
    c["c_dst_layers"] = ("copy_kv", (k, v, slots, dk, dv, slots),
                         {"src_layers": (0, 2), "dst_layer_begin": 2, "src_heads": (0, 2)},
                         ValueError, r"layer range \[2, 4\) is empty or out of bounds for dst_k")
    c["c_dst_idx"] = ("copy_kv", (k, v, slots, dk, dv, torch.tensor([0, 1, 8], device=device)),
                      {"src_heads": (0, 2)}, IndexError,
                      r"dst_slots out of range: values span \[0, 8\] but the pool has 8 slots")
    c["c_src_idx_dtype"] = ("copy_kv", (k, v, slots.double(), dk, dv, slots), {}, TypeError,
                            "src_slots must be int32 or int64")
    c["c_same_pool"] = ("copy_kv", (k, v, slots, k, v, slots.flip(0)), {}, ValueError,
                        "overlaps")
    c["c_dst_len"] = ("copy_kv", (k, v, slots, dk, dv[:1], slots), {}, ValueError,
                      "dst_k and dst_v must have the same length")
    return c


ERROR_CASES = sorted(_error_cases("cpu"))


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_inputs_raise(device, case):
    fn, args, kwargs, exc, match = _error_cases(device)[case]
    with pytest.raises(exc, match=match) as ext_err:
        getattr(kernels, fn)(*args, **kwargs)
    with pytest.raises(exc, match=match) as ref_err:
        getattr(kernels_ref, fn)(*args, **kwargs)
    assert str(ref_err.value) in str(ext_err.value)  # same text from both implementations


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_device_mismatch_raises():
    k, v = make_pool(2, 8, 2, 8, torch.float16, "cuda", seed=50)
    cpu_slots = torch.tensor([1, 2])
    for mod in (kernels, kernels_ref):
        with pytest.raises(ValueError, match="device mismatch: slots is on cpu"):
            mod.gather_kv(k, v, cpu_slots)
        with pytest.raises(ValueError, match=r"device mismatch: v_layers\[1\] is on cpu"):
            mod.gather_kv(k, [v[0], v[1].cpu()], cpu_slots.cuda())
        with pytest.raises(ValueError, match="device mismatch: out is on cpu"):
            mod.gather_kv(k, v, cpu_slots.cuda(), out=torch.empty(2, 2, 2, 2, 8).half())
        dk, dv = make_pool(2, 8, 2, 8, torch.float16, "cpu", seed=51)
        with pytest.raises(ValueError, match="device mismatch: dst_k"):
            mod.copy_kv(k, v, cpu_slots.cuda(), dk, dv, cpu_slots)


@pytest.mark.skipif(not CUDA_COMPILED, reason="CUDA kernels not compiled in")
@pytest.mark.parametrize("sms", [1, 7, 132])
@pytest.mark.parametrize(
    "heads,head_dim,dtype,n",
    [
        (1, 8, torch.float16, 5),  # 16-byte rows: one lane per row
        (8, 128, torch.bfloat16, 3),  # few 2 KiB rows: lanes widen past a warp
        (8, 128, torch.bfloat16, 300),
        (32, 256, torch.float32, 40),  # 32 KiB rows
        (3, 9, torch.bfloat16, 77),  # 54-byte rows: 2-byte vectors
    ],
)
def test_emulated_cuda_launch_shapes(sms, heads, head_dim, dtype, n):
    """The CUDA body under grids of 1, 7 and 132 SMs (grid caps, lane widening, tails)."""
    prev = torch.ops.remp._set_cuda_emulation(sms)
    try:
        k, v = make_pool(3, n + 2, heads, head_dim, dtype, "cpu", seed=70)
        slots = slot_list("permutation", n, n + 2, torch.int64, "cpu", seed=71)
        packed = run_gather(k, v, slots)
        dk, dv = make_pool(3, n + 1, heads, head_dim, dtype, "cpu", seed=72)
        dst_slots = slot_list("permutation", n, n + 1, torch.int32, "cpu", seed=73)
        run_scatter(packed, dk, dv, dst_slots)
        if heads > 1:
            ck, cv = make_pool(2, n, heads - 1, head_dim, dtype, "cpu", seed=74)
            copy_dst = torch.randperm(n, generator=_gen(75))
            run_copy(dk, dv, dst_slots, ck, cv, copy_dst, src_layers=(1, 3), src_heads=(1, heads))
    finally:
        torch.ops.remp._set_cuda_emulation(prev)

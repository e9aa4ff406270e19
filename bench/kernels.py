"""Benchmark the fused KV-cache copy ops against a per-layer torch loop.

Shapes follow a Llama-3-8B-like KV pool: 32 layers, 8 KV heads, head_dim 128.
For each dtype, token count and slot order (random permutation / contiguous
runs of 32 slots) it times, in the same run:

  gather  all heads      fused gather_kv      vs  index_select(out=packed[kv, l]) per layer
  gather  head half      fused gather_kv      vs  packed[kv, l] = pool[l][slots, h0:h1]
  scatter all heads      fused scatter_kv     vs  pool[l].index_copy_(0, slots, packed[kv, l])
  scatter head half      fused scatter_kv     vs  pool[l][slots, h0:h1] = packed[kv, l]
  copy    head half      fused copy_kv        vs  dst[l].index_copy_(0, d, src[l][s, h0:h1])

"bytes" = bytes read + bytes written by the copy (2 x the packed size; index
reads ignored), for both columns. On CUDA the device-to-device copy bandwidth
of a large tensor copy_ (also read + written) is measured in the same run and
each fused result is reported as a fraction of it. GPU work is timed with CUDA
events; each entry is the median of several repeats after warm-up.

    python bench/kernels.py --quick --json bench/results/kernels-cpu.json
    python bench/kernels.py --device cuda --json bench/results/kernels-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remp_sglang import _ext, kernels  # noqa: E402

LAYERS, HEADS, HEAD_DIM, RUN = 32, 8, 128, 32


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "extension": _ext.build_info(),
        "device": str(device),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def timer(device: torch.device, repeats: int, warmup: int, budget_s: float):
    """measure(*fns) -> median ms of each; runs are interleaved (f, b, f, b, ...) so
    background load on a shared machine hits both columns alike. After 2 rounds,
    rounds stop once a case has used `budget_s` seconds."""

    def once(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def measure(*fns: Callable[[], None]) -> list[float]:
        for fn in fns:
            for _ in range(warmup):
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times: list[list[float]] = [[] for _ in fns]
        t0 = time.perf_counter()
        for r in range(repeats):
            if r >= 2 and time.perf_counter() - t0 > budget_s:
                break
            for i, fn in enumerate(fns):
                times[i].append(once(fn))
        return [statistics.median(t) for t in times]

    return measure


def make_slots(order: str, n: int, num_slots: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    if order == "random":
        s = torch.randperm(num_slots, generator=g)[:n]
    else:  # contiguous runs of RUN slots, runs in random order (radix-tree pages)
        runs = torch.randperm(num_slots // RUN, generator=g)[: (n + RUN - 1) // RUN]
        s = (runs[:, None] * RUN + torch.arange(RUN)[None, :]).reshape(-1)[:n]
    return s.to(device)


def make_pool(layers: int, slots: int, heads: int, dtype, device, seed: int):
    """Distinct non-zero contents per layer without paying randn for gigabytes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(slots, heads, HEAD_DIM, generator=g).to(dtype).to(device)
    k = [base + (i + 1) for i in range(layers)]
    v = [base - (i + 1) for i in range(layers)]
    return k, v


def copy_bandwidth(device: torch.device, measure) -> float:
    """Device-to-device tensor copy_ bandwidth in GB/s (read + written)."""
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    (ms,) = measure(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e9


def run(args: argparse.Namespace) -> dict:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if not kernels.extension_available():
        sys.exit(f"remp_sglang._C is not built: {_ext.load_error()}")
    if device.type == "cuda" and not _ext.cuda_available():
        sys.exit("remp_sglang._C was built without CUDA kernels")
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    elif device.type == "cuda":
        tokens = [1024, 4096, 16384] if args.quick else [1024, 4096, 16384, 65536]
    else:  # CPU: cap the pool so it fits this machine's memory and time budget
        tokens = [1024, 4096] if args.quick else [1024, 4096, 16384]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 9)
    measure = timer(device, repeats, warmup=1 if args.quick else 2,
                    budget_s=1.5 if args.quick else 30.0)
    info = machine_info(device)
    result = {
        "machine": info,
        "config": {
            "layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "tokens": tokens,
            "repeats": repeats, "quick": args.quick, "run_length": RUN,
            "bytes": "read + written (2 x packed bytes)",
        },
        "rows": [],
    }
    bw = copy_bandwidth(device, measure) if device.type == "cuda" else None
    result["copy_bandwidth_gbs"] = bw

    print(f"# remp KV copy kernels - {info.get('gpu', info['cpu'])} ({device}), "
          f"torch {info['torch']}, {info['torch_threads']} threads")
    print(f"# pool: {LAYERS} layers x {HEADS} kv heads x head_dim {HEAD_DIM}; "
          "bytes = read + written; median of "
          f"<= {repeats} interleaved runs after warm-up; baseline = per-layer torch loop")
    if bw is not None:
        print(f"# device copy_ bandwidth (read + written): {bw:.0f} GB/s")
    head = (f"{'op':<16} {'dtype':<9} {'tokens':>6} {'order':<7} {'MiB':>8} {'fused ms':>9} "
            f"{'base ms':>9} {'fused GB/s':>10} {'base GB/s':>9} {'speedup':>7}")
    if bw is not None:
        head += f" {'%copyBW':>7}"
    print(head)

    half = (HEADS // 2, HEADS)
    for di, dtype in enumerate(dtypes):
        # --quick on CPU: later dtypes get the smallest size, random order only.
        cpu_quick_extra = args.quick and device.type == "cpu" and di > 0
        sizes = tokens[:1] if cpu_quick_extra else tokens
        num_slots = max(sizes)
        k, v = make_pool(LAYERS, num_slots, HEADS, dtype, device, seed=0)
        dk, dv = make_pool(LAYERS, num_slots, HEADS // 2, dtype, device, seed=1)
        for n in sizes:
            for order in ("random",) if cpu_quick_extra else ("random", "runs"):
                slots = make_slots(order, n, num_slots, device, seed=n)
                dslots = make_slots(order, n, num_slots, device, seed=n + 1)
                full = torch.empty(2, LAYERS, n, HEADS, HEAD_DIM, dtype=dtype, device=device)
                halfp = torch.empty(2, LAYERS, n, HEADS // 2, HEAD_DIM, dtype=dtype, device=device)
                base_full, base_half = torch.empty_like(full), torch.empty_like(halfp)
                cases = _cases(k, v, dk, dv, slots, dslots, full, halfp, base_full, base_half,
                               half)
                for name, fused, baseline, packed, check in cases:
                    nbytes = 2 * packed.numel() * packed.element_size()
                    t_f, t_b = measure(fused, baseline)
                    check()
                    row = {
                        "op": name, "dtype": str(dtype).replace("torch.", ""), "tokens": n,
                        "order": order, "bytes": nbytes, "fused_ms": t_f, "baseline_ms": t_b,
                        "fused_gbs": nbytes / (t_f * 1e-3) / 1e9,
                        "baseline_gbs": nbytes / (t_b * 1e-3) / 1e9, "speedup": t_b / t_f,
                    }
                    if bw is not None:
                        row["fraction_of_copy_bw"] = row["fused_gbs"] / bw
                    result["rows"].append(row)
                    line = (f"{name:<16} {row['dtype']:<9} {n:>6} {order:<7} "
                            f"{nbytes / 2**20:>8.0f} {t_f:>9.3f} {t_b:>9.3f} "
                            f"{row['fused_gbs']:>10.1f} {row['baseline_gbs']:>9.1f} "
                            f"{row['speedup']:>6.2f}x")
                    if bw is not None:
                        line += f" {100 * row['fraction_of_copy_bw']:>6.1f}%"
                    print(line, flush=True)
                del full, halfp, base_full, base_half
        del k, v, dk, dv
    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg_at_end"] = list(os.getloadavg())
        start = " ".join(f"{x:.1f}" for x in info["loadavg_at_start"])
        end = " ".join(f"{x:.1f}" for x in result["machine"]["loadavg_at_end"])
        print(f"# load average (1/5/15 min): {start} at start, {end} at end")
    return result


def _cases(k, v, dk, dv, slots, dslots, full, halfp, base_full, base_half, half):
    """(name, fused fn, baseline fn, packed tensor for byte count, correctness check)."""
    h0, h1 = half
    pools = ((0, k), (1, v))

    def g_full():
        kernels.gather_kv(k, v, slots, out=full)

    def b_g_full():
        for kv, pool in pools:
            for layer in range(LAYERS):
                torch.index_select(pool[layer], 0, slots, out=base_full[kv, layer])

    def g_half():
        kernels.gather_kv(k, v, slots, heads=half, out=halfp)

    def b_g_half():
        for kv, pool in pools:
            for layer in range(LAYERS):
                base_half[kv, layer] = pool[layer][slots, h0:h1]

    def s_full():
        kernels.scatter_kv(full, k, v, slots)

    def b_s_full():
        for kv, pool in pools:
            for layer in range(LAYERS):
                pool[layer].index_copy_(0, slots, full[kv, layer])

    def s_half():
        kernels.scatter_kv(halfp, k, v, slots, head_begin=h0)

    def b_s_half():
        for kv, pool in pools:
            for layer in range(LAYERS):
                pool[layer][slots, h0:h1] = halfp[kv, layer]

    def c_half():
        kernels.copy_kv(k, v, slots, dk, dv, dslots, src_heads=half)

    def b_c_half():
        for (_, src), dst in zip(pools, (dk, dv), strict=True):
            for layer in range(LAYERS):
                dst[layer].index_copy_(0, dslots, src[layer][slots, h0:h1])

    def same(a, b):
        return lambda: _assert_same(a, b)

    def check_copy():
        ref = torch.empty_like(halfp)
        kernels.gather_kv(dk, dv, dslots, out=ref)
        _assert_same(ref, halfp)

    return [
        ("gather all-heads", g_full, b_g_full, full, same(full, base_full)),
        ("gather head-half", g_half, b_g_half, halfp, same(halfp, base_half)),
        # Scatters write back what the gathers read, so the pools keep their values.
        ("scatter all-heads", s_full, b_s_full, full, lambda: None),
        ("scatter head-half", s_half, b_s_half, halfp, lambda: None),
        ("copy head-half", c_half, b_c_half, halfp, check_copy),
    ]


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    if not torch.equal(a, b):
        raise SystemExit("fused result differs from the baseline")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer sizes/repeats (< 1 min on CPU)")
    p.add_argument("--json", type=Path, help="write the table and machine info here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--tokens", help="comma-separated token counts (overrides the defaults)")
    p.add_argument("--repeats", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    result = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()

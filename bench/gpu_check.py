"""The one-shot GPU check: everything one NVIDIA GPU can prove, in one command.

    python bench/gpu_check.py OUTDIR [--quick] [--no-build]

For a machine with one GPU, torch and nvcc, but no sglang and no network (the lent
device machine). In order, each step timed and recorded:

1. build: compiles ``remp_sglang._C`` in place with its CUDA kernels (REMP_CUDA=1);
2. kernels: gather / scatter / pool-to-pool copy on the GPU against the pure-torch
   reference on the same device, bit-exact (dtypes incl. fp8, head slices, layer
   ranges, odd slot patterns);
3. kernel benchmark: ``bench/kernels.py --device cuda`` (achieved bandwidth against a
   device-to-device copy of the same bytes, measured in the same run);
4. engine, world 1, CUDA pools: ``relayout`` in place (KV with slot compaction and
   weights together, old tensors released as they move), staging on the device; values
   checked, and the device's peak allocation during the call against the plan's bound
   (``pieces.bound``: the larger total, the largest pieces and one stage);
5. world 2 on the one GPU: NCCL refuses two ranks on one device, so the NCCL plane
   (``remp_sglang.comm``) is tried and the outcome reported, not assumed.

Writes ``OUTDIR/gpu_check.json`` and ``OUTDIR/gpu_check.txt``; exits non-zero if a
check that ran failed. Without a GPU it runs steps 2 and 4 on the CPU (the same code on
host tensors) and reports the CUDA steps as skipped, so CI proves the script starts.
Budget: under 8 minutes on an H100/H200 (the build is most of it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remp_sglang import _ext, kernels, kernels_ref  # noqa: E402
from remp_sglang.comm import Communicator  # noqa: E402
from remp_sglang.engine import KVPart, KVPool, SlotFlow, WeightPart, relayout  # noqa: E402
from remp_sglang.ports import free_port  # noqa: E402
from remp_sglang.topology import ModelShape, Topology  # noqa: E402
from remp_sglang.weights import DenseDecoder, dense_decoder_params, local_shape  # noqa: E402


def step_build(out: Path) -> dict:
    env = dict(os.environ, REMP_CUDA="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    (out / "build.log").write_text(proc.stdout[-20000:] + proc.stderr[-20000:])
    ok = proc.returncode == 0
    return {"ok": ok, "seconds": round(time.perf_counter() - t, 1),
            "error": None if ok else proc.stderr[-2000:]}


def _pools(layers: int, slots: int, heads: int, dim: int, dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)

    def make():
        if dtype == torch.uint8:
            return [torch.randint(0, 256, (slots, heads, dim), generator=g,
                                  dtype=dtype).to(device) for _ in range(layers)]
        return [torch.randn(slots, heads, dim, generator=g).to(dtype).to(device)
                for _ in range(layers)]

    return make(), make()


def step_kernels(device: torch.device, quick: bool) -> dict:
    """The compiled ops against the reference, on `device`, compared bit for bit."""
    # uint8: how SGLang stores an fp8 KV cache (what the engine moves)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.uint8]
    cases, failures = 0, []
    for dtype in dtypes:
        for heads, dim in ((8, 128), (2, 64), (1, 80)):
            k, v = _pools(6, 512, heads, dim, dtype, device, seed=heads * dim)
            g = torch.Generator().manual_seed(1)
            for pattern in ("random", "contiguous", "repeated") if not quick else ("random",):
                if pattern == "random":
                    slots = torch.randperm(512, generator=g)[:200]
                elif pattern == "contiguous":
                    slots = torch.arange(100, 300)
                else:
                    slots = torch.randint(0, 512, (200,), generator=g)
                slots = slots.to(device)
                for layers, hs in (((0, 6), (0, heads)), ((2, 5), (heads // 2, heads))):
                    if hs[0] == hs[1]:
                        continue
                    cases += 1
                    got = kernels.gather_kv(k, v, slots, layers, hs)
                    want = kernels_ref.gather_kv(k, v, slots, layers, hs)
                    if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                        failures.append(f"gather {dtype} {heads}x{dim} {pattern} {layers} {hs}")
                    if pattern == "repeated":
                        continue  # duplicate destinations are undefined for scatter/copy
                    dk, dv = _pools(6, 512, heads, dim, dtype, device, seed=7)
                    rk, rv = [t.clone() for t in dk], [t.clone() for t in dv]
                    kernels.scatter_kv(got, dk, dv, slots, layers[0], hs[0])
                    kernels_ref.scatter_kv(got, rk, rv, slots, layers[0], hs[0])
                    kernels.copy_kv(k, v, slots, dk, dv, slots.flip(0), src_layers=layers,
                                    dst_layer_begin=layers[0], src_heads=hs,
                                    dst_head_begin=hs[0])
                    kernels_ref.copy_kv(k, v, slots, rk, rv, slots.flip(0), src_layers=layers,
                                        dst_layer_begin=layers[0], src_heads=hs,
                                        dst_head_begin=hs[0])
                    if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                               for a, b in zip(dk + dv, rk + rv, strict=True)):
                        failures.append(f"scatter/copy {dtype} {heads}x{dim} {pattern}")
    compiled = _ext.cuda_available() if device.type == "cuda" else _ext.available()
    return {"ok": not failures and compiled, "cases": cases, "failures": failures[:20],
            "compiled_kernels": compiled, "build_info": _ext.build_info()}


def step_bench(out: Path, quick: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "kernels.py"), "--device", "cuda",
           "--json", str(out / "kernels.json")] + (["--quick"] if quick else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    (out / "kernels.txt").write_text(proc.stdout + proc.stderr[-5000:])
    return {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - t, 1)}


def step_engine(device: torch.device, quick: bool) -> dict:
    """World 1 on `device`: the engine's in-place relayout of KV and weights together
    (pools, staging and transfers there), slots compacted into a smaller pool; values
    checked, and the device's peak allocation during the call against the plan's bound."""
    shape = ModelShape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
    slots = 2048 if quick else 16384
    dtype, staging = torch.bfloat16, 64 << 20
    topo = Topology(1, 1, 1)
    comm = Communicator.gloo("127.0.0.1", free_port(), 0, 1, timeout_s=60)
    try:
        k, v = _pools(shape.num_layers, slots, shape.num_kv_heads, shape.head_dim, dtype,
                      device, seed=3)
        old = KVPool(k, v)
        live = torch.randperm(slots - 1, generator=torch.Generator().manual_seed(5))[
            : slots // 2] + 1
        new_slots = slots // 2 + 1  # smaller pool: every live slot is compacted
        model = DenseDecoder(ModelShape(4, 16, 4, 64), 1024, 2816, 8000)
        params = {s.name: torch.randn(local_shape(s, model, topo, 0)).to(dtype).to(device)
                  for s in dense_decoder_params(model)}
        want_kv = [t[live.to(device)].clone() for t in old.k + old.v]
        want_w = {n: t.clone() for n, t in params.items()}
        area = torch.empty(staging, dtype=torch.uint8, device=device)
        _sync(device)
        base = _reset_peak(device)
        t = time.perf_counter()
        res = relayout(comm, topo, topo,
                       KVPart(shape, dtype, old, [SlotFlow(0, 0, live)], new_slots),
                       WeightPart(model, dtype, params), device=device,
                       staging_bytes=staging, staging=area, release_old=True)
        _sync(device)
        seconds = time.perf_counter() - t
        peak = _peak(device) - base
        moved = res.new_slots.to(device)
        exact = all(torch.equal(a, b[moved])
                    for a, b in zip(want_kv, res.pool.k + res.pool.v, strict=True))
        weights_exact = all(torch.equal(want_w[n], res.params[n]) for n in want_w)
        released = all(t.numel() == 0 for t in old.k + old.v + list(params.values()))
        s = res.stats
        allowed = s.bound_bytes - s.held_bytes[0] - staging  # the area is in `base`
        return {"ok": exact and weights_exact and released
                and (device.type != "cuda" or peak <= allowed),
                "kv_exact": exact, "weights_exact": weights_exact, "old_released": released,
                "live_slots": len(live), "held_before_bytes": s.held_bytes[0],
                "held_after_bytes": s.held_bytes[1], "staging_bytes": staging,
                "seconds": round(seconds, 4), "counted_peak_bytes": s.peak_bytes,
                "bound_bytes": s.bound_bytes,
                "device_peak_above_start_bytes": peak if device.type == "cuda" else None,
                "allowed_above_start_bytes": allowed}
    finally:
        comm.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _nccl_rank(rank: int, port: int, results) -> None:
    try:
        comm = Communicator.gloo("127.0.0.1", port, rank, 2, timeout_s=30)
        comm.begin(1, time.time() + 30)
        send = torch.full((1 << 20,), rank + 1, dtype=torch.uint8, device="cuda:0")
        recv = torch.empty_like(send)
        comm.wait(comm.exchange({1 - rank: send}, {1 - rank: recv}, tag=comm.next_tag()))
        results.put((rank, f"ok: received {int(recv[0])}"))
    except BaseException as error:
        results.put((rank, f"{type(error).__name__}: {str(error)[:300]}"))
    os._exit(0)


def step_two_ranks_one_gpu() -> dict:
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        if p.is_alive():
            p.kill()
    got = dict(results.get() for _ in range(results.qsize())) if not results.empty() else {}
    return {"ok": None, "outcome": got or "no answer within 90 s"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true", help="fewer cases, smaller pools")
    parser.add_argument("--no-build", action="store_true", help="use the built extension")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    report: dict = {"torch": torch.__version__, "cuda": cuda,
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "steps": {}}
    steps = [
        ("build", lambda: step_build(args.out), cuda and not args.no_build),
        ("kernels", lambda: step_kernels(device, args.quick), True),
        ("kernel_bench", lambda: step_bench(args.out, args.quick), cuda),
        ("engine_world1", lambda: step_engine(device, args.quick), True),
        ("two_ranks_one_gpu", step_two_ranks_one_gpu, cuda),
    ]
    for name, run, wanted in steps:
        if not wanted:
            report["steps"][name] = {"ok": None, "skipped": "no GPU" if not cuda else "asked"}
            continue
        t = time.perf_counter()
        try:
            result = run()
        except Exception:
            result = {"ok": False, "error": traceback.format_exc()[-3000:]}
        result["wall_s"] = round(time.perf_counter() - t, 1)
        report["steps"][name] = result
        if name == "build" and result["ok"]:
            _ext._loaded = None  # load the freshly built extension
        print(f"{name}: {json.dumps(result)[:400]}", flush=True)
    report["device"] = str(device)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    lines = [f"gpu_check on {report['gpu'] or 'CPU only'} (torch {report['torch']})"]
    for name, result in report["steps"].items():
        state = {True: "ok", False: "FAILED", None: "skipped/reported"}[result.get("ok")]
        lines.append(f"{name:>18}: {state}  {json.dumps(result)[:300]}")
    (args.out / "gpu_check.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any(r.get("ok") is False for r in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

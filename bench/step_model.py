"""The step-time model (`remp_sglang/perf.py`) against this machine: measure, fit, report.

    python bench/step_model.py [--quick] [--json PATH]

One 2-rank server (`--dp-size 2 --remp --max-total-tokens 512`, tiny float32 Llama, CPU)
is reshaped live to DP 2, TP 2 and PP 2. At each layout it measures a decode period
(the median gap between streamed tokens while `n` requests decode together, after the
first tokens) for n = 1, 2, 4, 8, and a prefill's latency (time to the first token of
one request alone) for prompts of 64 to 448 tokens. The model's `Hardware` figures (host
cost per step, collective latency, FLOP rate, memory bandwidth) are fitted to all
layouts at once (one set of numbers for the machine, not one per layout), plus the
front end's fixed share of a first token. Printed: each measurement next to the fitted
model's value, the error per layout, and the figures (the `CPU_TINY` record of
`remp_sglang/sim/hardware.py` holds the last fit).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from remp_sglang.perf import Hardware, StepModel
from remp_sglang.testing import launch_sglang_server
from remp_sglang.testing.traffic import Job, run_job
from remp_sglang.tiny_model import make_tiny_model
from remp_sglang.topology import ModelShape, Topology
from remp_sglang.weights import DenseDecoder

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ((2, 1, 1), (1, 2, 1), (1, 1, 2))
PROMPT, OUTPUT = 32, 40
FITTED = ("step_overhead_s", "link_latency_s", "flops", "mem_bw")


def tiny_decoder() -> DenseDecoder:
    """The tiny Llama of `make_tiny_model` (float32), as the model sees it."""
    return DenseDecoder(ModelShape(4, 4, 2, 16, 4), 64, 128, 384, lm_head_on_every_stage=True)


def ids(n: int, seed: int) -> tuple[int, ...]:
    return tuple(5 + (seed * 37 + i * 11) % 250 for i in range(n))


def decode_period(url: str, model: str, n: int, seed: int) -> float:
    jobs = [Job("generate_stream", ids(PROMPT, seed + i), "", OUTPUT) for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(lambda job: run_job(url, job, model), jobs))
    gaps = [b - a for o in outcomes for a, b in zip(o.chunk_times[8:], o.chunk_times[9:],
                                                      strict=False)]
    if any(o.error for o in outcomes) or not gaps:
        raise RuntimeError(f"decode run failed: {[o.error for o in outcomes]}")
    return statistics.median(gaps)


def prefill_latency(url: str, model: str, tokens: int, seed: int) -> float:
    times = []
    for i in range(3):
        o = run_job(url, Job("generate_stream", ids(tokens, seed + i), "", 1), model)
        if o.error:
            raise RuntimeError(o.error)
        times.append(o.chunk_times[0] - o.t_start)
    return statistics.median(times)


def predict(sm: StepModel, row: dict, front_s: float) -> float:
    topo = Topology(row["tp"], row["pp"], 2, row["dp"])
    if row["kind"] == "decode":
        return sm.decode_period(topo, row["batch"], row["context"])
    return front_s + sm.prefill_latency(topo, row["tokens"])  # plus the front end


def fit(rows: list[dict], start: Hardware) -> tuple[Hardware, float]:
    """Least squares on log(predicted / measured), coordinate search in log space."""
    decoder = tiny_decoder()
    params = {k: getattr(start, k) for k in FITTED} | {"front_s": 0.003}

    def loss(p: dict) -> float:
        hw = replace(start, **{k: p[k] for k in FITTED})
        sm = StepModel(decoder, hw)
        return sum(math.log(max(predict(sm, r, p["front_s"]), 1e-9) / r["measured_s"]) ** 2
                   for r in rows)

    best = loss(params)
    step = 1.0
    while step > 0.01:
        improved = False
        for name in params:
            for factor in (math.exp(step), math.exp(-step)):
                trial = dict(params, **{name: params[name] * factor})
                value = loss(trial)
                if value < best:
                    params, best, improved = trial, value, True
        if not improved:
            step /= 2
    return replace(start, name="CPU-tiny (fitted)", **{k: params[k] for k in FITTED}), \
        params["front_s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "step_model")
    args = parser.parse_args()
    batches = (1, 4, 8) if args.quick else (1, 2, 4, 8)
    prompts = (64, 448) if args.quick else (64, 192, 320, 448)
    model_dir = make_tiny_model(args.out / "llama", "llama")
    rows = []
    with launch_sglang_server(model_dir, tp=1, dp=2, extra_args=("--remp",), log_dir=args.out,
                              max_total_tokens=512) as server:
        url, model = server.base_url, str(model_dir)
        print(f"server healthy after {server.startup_s:.1f}s", flush=True)
        for dp, tp, pp in LAYOUTS:
            server.post("/remp/reshape", {"dp": dp, "tp": tp, "pp": pp},
                        timeout=600).raise_for_status()
            decode_period(url, model, 2, 999)  # warm up this layout
            for n in batches:
                per_replica = max(1, n // dp)
                measured = decode_period(url, model, n, 10 * n)
                rows.append({"kind": "decode", "dp": dp, "tp": tp, "pp": pp,
                             "batch": per_replica, "measured_s": measured,
                             "context": per_replica * (PROMPT + OUTPUT / 2)})
            for tokens in prompts:
                server.flush_cache()
                rows.append({"kind": "prefill", "dp": dp, "tp": tp, "pp": pp,
                             "tokens": tokens,
                             "measured_s": prefill_latency(url, model, tokens, tokens)})
            print(f"  DP{dp} TP{tp} PP{pp} measured", flush=True)
            time.sleep(0.5)
    start = Hardware("cpu", flops=5e9, mem_bw=5e9, link_bw=1e9, link_latency_s=1e-3,
                     step_overhead_s=5e-3)
    hw, front_s = fit(rows, start)
    sm = StepModel(tiny_decoder(), hw)
    print("\n# step-time model vs measured (CPU, 2 cores, tiny Llama float32), one fit")
    print(f"{'layout':>12} {'kind':>8} {'n':>4} {'measured ms':>11} {'model ms':>9} "
          f"{'error':>7}")
    per_layout: dict[str, list[float]] = {}
    for r in rows:
        r["model_s"] = predict(sm, r, front_s)
        r["error"] = r["model_s"] / r["measured_s"] - 1
        name = f"DP{r['dp']}xTP{r['tp']}xPP{r['pp']}"
        per_layout.setdefault(name, []).append(abs(r["error"]))
        n = r.get("batch", r.get("tokens"))
        print(f"{name:>12} {r['kind']:>8} {n:>4} {1e3 * r['measured_s']:>11.2f} "
              f"{1e3 * r['model_s']:>9.2f} {100 * r['error']:>+6.0f}%")
    print("\nper layout: median |error| / max |error|")
    for name, errs in per_layout.items():
        print(f"  {name:>12}: {100 * statistics.median(errs):.0f}% / {100 * max(errs):.0f}%")
    print(f"fitted: {json.dumps({k: getattr(hw, k) for k in FITTED})}, front end "
          f"{1e3 * front_s:.2f} ms per first token")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        decoder = tiny_decoder()
        args.json.write_text(json.dumps({"rows": rows, "hardware": asdict(hw),
                                         "front_s": front_s,
                                         "model": {**asdict(decoder.shape), **{
                                             k: v for k, v in asdict(decoder).items()
                                             if k != "shape"}}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

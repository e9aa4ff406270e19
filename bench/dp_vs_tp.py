"""Why switch layouts: the same loads against DP 2, TP 2 and PP 2 on one live server.

    python bench/dp_vs_tp.py [--quick] [--json PATH]

One 2-rank server (`--dp-size 2 --tp 1 --remp --max-total-tokens 512`, tiny float32
Llama, CPU) serves a short load (many short streaming requests, concurrency 8: the
replicas' ground) and a long load (prompts of 600-720 tokens, one at a time: more than
one replica's 512 KV slots, within a merged instance's), reshaping between them live.
Printed per (load, layout): requests, refused or failed, throughput (generated
tokens/s), TTFT and TPOT (p50, p90), and the layout's KV capacity per replica. Outputs
served by several layouts are checked equal (greedy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from remp_sglang.sim.metrics import pct
from remp_sglang.testing import launch_sglang_server
from remp_sglang.testing.traffic import Job, Outcome, run_job
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ((2, 1, 1), (1, 2, 1), (1, 1, 2))  # (dp, tp, pp)


def ids(n: int, seed: int) -> tuple[int, ...]:
    return tuple(5 + (seed * 31 + i * 7) % 250 for i in range(n))


def loads(quick: bool) -> dict[str, tuple[list[Job], int]]:
    short = [Job("generate_stream", ids(16 + (i * 7) % 24, i), "", 24)
             for i in range(16 if quick else 48)]
    long = [Job("generate_stream", ids(600 + 40 * i, 100 + i), "", 8)
            for i in range(2 if quick else 4)]
    return {"short": (short, 8), "long": (long, 1)}


def run(url: str, jobs: list[Job], concurrency: int, model: str) -> tuple[list[Outcome], float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda job: run_job(url, job, model), jobs))
    return outcomes, time.perf_counter() - start


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.error is None and o.chunk_times]
    if not ok:
        return {"requests": len(outcomes), "failed": len(outcomes), "throughput_tok_s": 0.0,
                "ttft_p50_s": float("nan"), "ttft_p90_s": float("nan"),
                "tpot_p50_s": float("nan"), "tpot_p90_s": float("nan"), "wall_s": wall,
                "error": outcomes[0].error if outcomes else None}
    tokens = sum(len(o.output) for o in ok)
    ttft = [o.chunk_times[0] - o.t_start for o in ok]
    tpot = [(o.t_end - o.chunk_times[0]) / (len(o.output) - 1) for o in ok
            if len(o.output) > 1]
    return {"requests": len(outcomes), "failed": len(outcomes) - len(ok),
            "throughput_tok_s": tokens / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p90_s": pct(ttft, 0.9), "tpot_p50_s": statistics.median(tpot),
            "tpot_p90_s": pct(tpot, 0.9), "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "dp_vs_tp")
    args = parser.parse_args()
    model_dir = make_tiny_model(args.out / "llama", "llama")
    rows, outputs = [], {}
    with launch_sglang_server(model_dir, tp=1, dp=2, extra_args=("--remp",), log_dir=args.out,
                              max_total_tokens=512) as server:
        url, model = server.base_url, str(model_dir)
        print(f"server --remp --dp-size 2 healthy after {server.startup_s:.1f}s; "
              f"log {server.log_path}", flush=True)
        for name, (jobs, concurrency) in loads(args.quick).items():
            run(url, jobs[:2], 2, model)  # warm the prompts' first-time costs
            for dp, tp, pp in LAYOUTS:
                response = server.post("/remp/reshape", {"dp": dp, "tp": tp, "pp": pp},
                                       timeout=600)
                response.raise_for_status()
                server.flush_cache()  # every layout computes every prompt afresh
                capacity = server.get("/remp/topology").json()["kv_capacity_tokens"]
                outcomes, wall = run(url, jobs, concurrency, model)
                row = {"load": name, "layout": f"DP{dp}xTP{tp}xPP{pp}",
                       "concurrency": concurrency, "kv_capacity_per_replica": capacity,
                       **summarize(outcomes, wall)}
                rows.append(row)
                for o in outcomes:
                    if o.error is None:
                        outputs.setdefault(o.job, set()).add(tuple(o.output))
                print(f"  {name:5} {row['layout']:12} {row['throughput_tok_s']:8.1f} tok/s",
                      flush=True)
    same = all(len(v) == 1 for v in outputs.values())
    print("\n# loads on one 2-rank server, reshaped live (CPU, 2 cores, tiny Llama float32)")
    print(f"{'load':>5} {'layout':>12} {'reqs':>4} {'fail':>4} {'tok/s':>7} {'TTFT p50':>8} "
          f"{'TTFT p90':>8} {'TPOT p50':>8} {'TPOT p90':>8} {'KV/replica':>10}")
    for r in rows:
        print(f"{r['load']:>5} {r['layout']:>12} {r['requests']:>4} {r['failed']:>4} "
              f"{r['throughput_tok_s']:>7.1f} {r['ttft_p50_s']:>8.3f} {r['ttft_p90_s']:>8.3f} "
              f"{r['tpot_p50_s']:>8.4f} {r['tpot_p90_s']:>8.4f} "
              f"{r['kv_capacity_per_replica']:>10}")
    for load in ("short", "long"):
        per = {r["layout"]: r for r in rows if r["load"] == load}
        dp2, tp2 = per["DP2xTP1xPP1"], per["DP1xTP2xPP1"]
        if dp2["throughput_tok_s"] and tp2["throughput_tok_s"]:
            ratio = dp2["throughput_tok_s"] / tp2["throughput_tok_s"]
            print(f"{load}: DP2/TP2 throughput {ratio:.2f}x, "
                  f"TTFT p50 TP2/DP2 {tp2['ttft_p50_s'] / dp2['ttft_p50_s']:.2f}x")
        else:
            print(f"{load}: served by {[k for k, r in per.items() if not r['failed']]}; "
                  f"DP2 refused {dp2['failed']}/{dp2['requests']}: {dp2.get('error')}")
    print(f"outputs equal across layouts: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "outputs_equal": same}, indent=1))
    # only the replicas may refuse the long prompts (one replica's KV cannot hold them)
    failed = sum(r["failed"] for r in rows if r["layout"] != "DP2xTP1xPP1" or r["load"] != "long")
    return 0 if same and not failed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Reshape vs restart, counting the cache a restart loses.

    python bench/reshape_vs_restart.py [--quick] [--json PATH]

One run on this machine (CPU, tiny float32 Llama, 2 ranks). A ``--remp`` server at TP 2
holds a set of long prompts in its radix cache. For each switch it reshapes and then
serves every cached prompt again (they hit the cache); the alternative is to stop the
server and launch a stock one at the new layout, whose cache is empty: the same prompts
are prefilled from scratch. Printed per switch:

- reshape: downtime, request wait, and "ready" = request wait + the time to serve every
  cached prompt once more (first token each, served one after the other);
- restart: launch to healthy, then the first cached prompt's first token ("first"), and
  every cached prompt served once ("ready");
- ratios of restart to reshape for both.

On this tiny model a prefill costs milliseconds, so the launch dominates the restart;
on a real model recomputing tens of thousands of cached tokens adds seconds more.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from remp_sglang.testing import SGLangServer, launch_sglang_server
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SWITCHES = ((1, 1), (1, 2), (2, 1), (1, 1), (2, 1))
CAPACITY_TP2 = 8192  # tokens at TP 2; the same per-rank KV memory holds 4096 at TP 1


def cached_prompts(n: int, length: int) -> list[list[int]]:
    return [[5 + (k * 37 + i * 11) % 240 for i in range(length)] for k in range(n)]


def serve_all(server: SGLangServer, prompts: list[list[int]]) -> tuple[float, float, int]:
    """(first prompt's first token, all prompts served, cached tokens seen), seconds from
    now; one token each, one after the other."""
    start = time.perf_counter()
    first, cached = None, 0
    for prompt in prompts:
        out = server.generate(prompt, 1)
        cached += out["meta_info"]["cached_tokens"]
        first = first if first is not None else time.perf_counter() - start
    return first, time.perf_counter() - start, cached


def restart(model_dir: Path, tp: int, pp: int, prompts: list[list[int]], log_dir: Path) -> dict:
    """A stock server at (tp, pp): launch to healthy, then the lost prefixes recomputed."""
    start = time.perf_counter()
    with launch_sglang_server(model_dir, tp=tp, pp=pp, log_dir=log_dir,
                              max_total_tokens=CAPACITY_TP2 * tp * pp // 2) as server:
        healthy = time.perf_counter() - start
        first, ready, cached = serve_all(server, prompts)
    return {"launch_s": healthy, "first_token_s": healthy + first, "ready_s": healthy + ready,
            "cached_tokens_hit": cached}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two switches (default five)")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--length", type=int, default=600)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "reshape_vs_restart")
    args = parser.parse_args()
    switches = SWITCHES[:2] if args.quick else SWITCHES
    model_dir = make_tiny_model(args.out / "llama", "llama")
    prompts = cached_prompts(args.prompts, args.length)

    rows = []
    with launch_sglang_server(model_dir, tp=2, extra_args=("--remp",), log_dir=args.out,
                              max_total_tokens=CAPACITY_TP2) as server:
        print(f"server --remp tp=2 healthy after {server.startup_s:.1f}s")
        serve_all(server, prompts)  # the cache to keep
        old = (2, 1)
        for tp, pp in switches:
            report = server.post("/remp/reshape", {"tp": tp, "pp": pp}, timeout=600).json()
            first, ready, cached = serve_all(server, prompts)
            rows.append({"old": old, "new": (tp, pp), "downtime_s": report["downtime_s"],
                         "request_wait_s": report["request_wait_s"],
                         "first_token_s": report["request_wait_s"] + first,
                         "ready_s": report["request_wait_s"] + ready,
                         "cached_tokens_hit": cached,
                         "cached_tokens_carried": report["cached_tokens_after"]})
            old = (tp, pp)
    restarts = {layout: restart(model_dir, *layout, prompts, args.out)
                for layout in dict.fromkeys(r["new"] for r in rows)}
    for row in rows:
        row["restart"] = restarts[row["new"]]

    total = args.prompts * args.length
    print(f"\n# reshape vs restart, {args.prompts} cached prompts x {args.length} tokens "
          f"({total} tokens); CPU, 2 ranks, tiny Llama (float32); one run")
    print(f"{'switch':>10} {'downtime':>9} {'wait':>7} {'ready':>7} {'hit':>6} | "
          f"{'launch':>7} {'first':>7} {'ready':>7} {'hit':>5} | {'first x':>8} {'ready x':>8}")
    for r in rows:
        s = r["restart"]
        switch = f"{r['old'][0]}x{r['old'][1]}->{r['new'][0]}x{r['new'][1]}"
        print(f"{switch:>10} {r['downtime_s']:>9.3f} {r['request_wait_s']:>7.3f} "
              f"{r['ready_s']:>7.3f} {r['cached_tokens_hit']:>6} | {s['launch_s']:>7.1f} "
              f"{s['first_token_s']:>7.1f} {s['ready_s']:>7.1f} {s['cached_tokens_hit']:>5} | "
              f"{s['first_token_s'] / r['first_token_s']:>7.0f}x "
              f"{s['ready_s'] / r['ready_s']:>7.0f}x")
    print("(seconds; reshape 'ready' = call + every cached prompt served again; restart "
          "'first'/'ready' = launch + the first / every cached prompt recomputed)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"prompts": args.prompts, "length": args.length,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

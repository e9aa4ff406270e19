"""remp-sglang end to end: a live SGLang server reshaped across layouts, vs restarting it.

    python scripts/demo.py [--arch llama] [--layouts 1x1,1x2,2x1] [--no-replicas]
                           [--no-restarts]

Generates a tiny random-weight model (``.artifacts/demo/<arch>``, byte-identical every
run), starts a real ``sglang.launch_server --remp`` on CPU at TP 2, sends traffic (so
the radix cache holds prefixes), then reshapes it through ``POST /remp/reshape`` across
the layouts WHILE streaming clients generate (nothing is drained: their requests move
with the switch). After each switch it checks that the streamed outputs equal an
undisturbed run's, and that a repeated prompt still hits the cache and gives the same
greedy tokens. A second server, launched as two data-parallel replicas
(``--dp-size 2``), merges them into one TP 2 instance and splits them back, the same
way. For each layout it also times a full restart (a fresh server at that
layout, launch to first token) in the same run, and prints one table: downtime, the
API call's wait and the largest gap between two tokens a streaming client saw across the
pause, next to the restart.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from remp_sglang.testing import SGLangServer, launch_sglang_server
from remp_sglang.testing.traffic import Background, Job, run_concurrently
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Hello, world! How are you today? I am a prompt that wants to be cached.",
    "def main(): return sum(range(10))  # a line of code as a prompt",
)
NEW_TOKENS = 12


def traffic(server: SGLangServer) -> tuple[list[list[int]], int]:
    """Every prompt once; returns the outputs and the first prompt's cached tokens."""
    outputs = [server.generate(p, NEW_TOKENS) for p in PROMPTS]
    return [o["output_ids"] for o in outputs], outputs[0]["meta_info"]["cached_tokens"]


def restart_time(model_dir: Path, layout: tuple[int, int, int], log_dir: Path) -> float:
    """Launch-to-healthy of a fresh stock server at (dp, tp, pp): a restart's floor."""
    dp, tp, pp = layout
    started = time.perf_counter()
    with launch_sglang_server(model_dir, tp=tp, pp=pp, dp=dp, log_dir=log_dir) as server:
        server.generate(PROMPTS[0], 1)
        return time.perf_counter() - started


def name(layout: dict) -> str:
    """TPxPP, with the replicas in front when there are several: 2x1, dp2:1x1."""
    base = f"{layout['tp']}x{layout['pp']}"
    return base if layout.get("dp", 1) == 1 else f"dp{layout['dp']}:{base}"


def reshape_live(model_dir: Path, out: Path, launch: tuple[int, int, int],
                 layouts: list[tuple[int, int, int]]) -> list[dict]:
    """Launch at `launch` (dp, tp, pp) with --remp and reshape through `layouts` while
    two streams decode; one row per switch."""
    dp, tp, pp = launch
    rows = []
    with launch_sglang_server(model_dir, tp=tp, pp=pp, dp=dp, extra_args=("--remp",),
                              log_dir=out) as server:
        print(f"server --remp {name({'dp': dp, 'tp': tp, 'pp': pp})} healthy after "
              f"{server.startup_s:.1f}s; log {server.log_path}")
        reference, _ = traffic(server)
        _, cached = traffic(server)
        print(f"traffic sent; a repeated prompt has {cached} tokens cached")
        streams = [Job("generate_stream", tuple(range(10 + i, 30 + i)), "", 150)
                   for i in range(2)]
        undisturbed = [o.output for o in run_concurrently(server.base_url, streams, "")]
        for dp, tp, pp in layouts:
            clients = Background(server.base_url, streams, "")
            time.sleep(0.5)  # the streams are decoding when the reshape comes
            response = server.post("/remp/reshape", {"dp": dp, "tp": tp, "pp": pp},
                                   timeout=600)
            response.raise_for_status()
            report = response.json()
            streamed = clients.wait()
            # the largest gap between two consecutive tokens that holds the pause (its
            # instants on the server's clock, which the clients share)
            clock = report.get("clock", {})
            around = [g for o in streamed if "resumed" in clock
                      for g in [o.gap_around(clock["boundary"], clock["resumed"], tokens=True)]
                      if g]
            report["client_gap_s"] = max((b - a for a, b in around), default=0.0)
            report["streams_ok"] = [o.output for o in streamed] == undisturbed
            outputs, cached_after = traffic(server)
            topo = server.get("/remp/topology").json()
            assert (topo["dp"], topo["tp"], topo["pp"]) == (dp, tp, pp), topo
            rows.append({**report, "same_output": outputs == reference and report["streams_ok"],
                         "repeat_cached": cached_after})
            print(f"reshaped {name(report['old'])} -> {name(report['new'])} with "
                  f"{report['requests_carried']} streams running: downtime "
                  f"{report['downtime_s']:.3f}s, largest client gap {report['client_gap_s']:.3f}s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    parser.add_argument("--layouts", default="1x1,1x2,2x1,1x1,2x1",
                        help="TPxPP layouts to reshape through, in order (launch: 2x1)")
    parser.add_argument("--no-replicas", action="store_true",
                        help="skip the second server (2 replicas merged into TP 2 and split)")
    parser.add_argument("--no-restarts", action="store_true", help="skip the restart timings")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "demo")
    args = parser.parse_args()
    layouts = [(1, *(int(x) for x in item.split("x"))) for item in args.layouts.split(",")]

    model_dir = make_tiny_model(args.out / args.arch, args.arch)
    print(f"model: {model_dir}")
    rows = reshape_live(model_dir, args.out, (1, 2, 1), layouts)
    if not args.no_replicas:
        rows += reshape_live(model_dir, args.out, (2, 1, 1), [(1, 2, 1), (2, 1, 1)])
    restarts: dict[tuple[int, int, int], float] = {}
    if not args.no_restarts:
        for r in rows:
            layout = (r["new"]["dp"], r["new"]["tp"], r["new"]["pp"])
            if layout not in restarts:
                restarts[layout] = restart_time(model_dir, layout, args.out)
                print(f"restart at {name(r['new'])}: {restarts[layout]:.1f}s")

    print("\n# live reshape under streaming load vs full restart (same run; restart = launch "
          "to first token)")
    print(f"{'switch':>16} {'downtime s':>10} {'wait s':>7} {'client gap s':>12} "
          f"{'carried':>7} {'restart s':>9} {'speedup':>8} {'pre-copied':>10} "
          f"{'KV in pause':>11} {'weights in pause':>16} {'cached before':>13} {'after':>6} "
          f"{'same out':>8}")
    for r in rows:
        restart = restarts.get((r["new"]["dp"], r["new"]["tp"], r["new"]["pp"]))
        switch = f"{name(r['old'])}->{name(r['new'])}"
        speed = f"{restart / r['downtime_s']:.0f}x" if restart else "-"
        pre = r.get("precopy") or {}  # bytes given the joining ranks while serving
        early = pre.get("kv_bytes", 0) + pre.get("weight_bytes", 0) if pre.get("used") else 0
        print(f"{switch:>16} {r['downtime_s']:>10.3f} {r['request_wait_s']:>7.3f} "
              f"{r['client_gap_s']:>12.3f} {r['requests_carried']:>7} "
              f"{restart or float('nan'):>9.1f} {speed:>8} "
              f"{early:>10} {r['kv_bytes_moved']:>11} {r['weight_bytes_moved']:>16} "
              f"{r['cached_tokens_before']:>13} {r['cached_tokens_after']:>6} "
              f"{'yes' if r['same_output'] else 'NO':>8}")


if __name__ == "__main__":
    main()

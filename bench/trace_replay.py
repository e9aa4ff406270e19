"""Real request traces against every fixed layout and `--remp-policy auto`.

    python bench/trace_replay.py [--quick] [--repeats N] [--json PATH] [--plot PATH.png]

Windows of ../shared/traces (Azure LLM 2023 conversation and code: arrival times and
token counts; Mooncake conversation: also its prefix-block hashes, so repeated prefixes
really repeat and hit the radix cache) are replayed against a 2-rank server
(`--dp-size 2 --remp --max-total-tokens 512`, tiny float32 Llama, CPU): DP 2 (two
replicas of 512 KV slots each: prompts up to 506 tokens), TP 2 and PP 2 (one instance of
1024 slots: up to 1018), and auto (starts at DP 2, reshapes by itself).

Scaling to the tiny model and this machine: token counts divided by `token_div` (8 for
Azure conversation, 12 for Azure code, 48 for Mooncake; prompts capped at 960 tokens,
outputs at 48, so that every request fits the merged pool), arrival times compressed
by `time_div` (1.5, 3 and 1: the same requests offered that many times faster). A
Mooncake block of 512 tokens becomes 10 tokens, each block hash always the same ids.
Windows are those where the share of long prompts (over one replica's 506 tokens)
shifts most between their halves (`sim.traces.shift_windows`). A fourth window is
bimodal: the Azure conversation window's requests with the arrivals of its long prompts
gathered into its middle third (`sim.traces.gather_long`: short only, a burst of long
contexts among short ones, short only again), offered 3x faster, so that both halves
of the mix saturate the server (`--windows bimodal` runs it alone). Its 51 long prompts
take the merged layout longer than the window lasts; a fifth window, `burst`, keeps
every fourth of them (13), a burst the merged layout can finish inside the window, so
that the short phase after it can be served split again.

Every configuration runs the same server code: a fixed layout is the policy with that
one candidate (it never switches, and SGLang refuses what the layout cannot hold, as
without remp); auto has every layout. The best fixed layout is named twice when they
differ: the best of those that serve every request, and the best by tokens/s (DP 2
refuses the long prompts and finishes sooner on the rest). Per (window, configuration):
requests completed and refused or failed, throughput (output tokens/s over the
replay), TTFT and TPOT p50 and p99, prefix cache hit rate, reshapes. The plot:
throughput, queue and KV usage over time, one line per configuration, reshapes marked.
With `--repeats N` every configuration runs N times, in rounds (each round runs every
configuration once, so that the machine's drift reaches all alike); the table gives
each metric's median and the range of tokens/s, and compares the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from remp_sglang.sim import traces as T
from remp_sglang.sim.metrics import pct
from remp_sglang.testing import launch_sglang_server
from remp_sglang.testing.traffic import Job, Outcome, run_job
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXED = {"DP2": (2, 1, 1), "TP2": (1, 2, 1), "PP2": (1, 1, 2)}
LONG = 507  # prompts a DP 2 replica cannot hold
BIMODAL_TIME_DIV = 3.0
#: (trace, token_div, time_div, window length in trace seconds, gathered long prompts:
#: None, or (label, keep every keep-th))
TRACES = (("azure_conv", 8, 1.5, 60, None), ("mooncake", 48, 1.0, 60, None),
          ("azure_code", 12, 3.0, 120, None),
          ("azure_conv", 8, BIMODAL_TIME_DIV, 60, ("bimodal", 1)),
          ("azure_conv", 8, BIMODAL_TIME_DIV, 60, ("burst", 4)))
#: Knobs scaled to this machine: a switch pauses 0.05-0.1 s here, so two seconds of
#: dwell is twenty pauses and a long prompt is held at most half a second before it
#: forces a merge (the defaults are for GPUs, whose switches take longer).
POLICY = {"interval_s": 0.5, "window_s": 4.0, "horizon_s": 20.0, "min_dwell_s": 2.0,
          "max_hold_s": 0.5, "confirm": 2, "default_downtime_s": 0.3}


def prompt_ids(r: T.TraceRequest, index: int, block_tokens: int) -> tuple[int, ...]:
    """Token ids of a replayed prompt: the request's blocks (the same hash, the same
    ids), then ids unique to it."""
    out: list[int] = []
    for h in r.blocks:
        out += [5 + (h * 131 + j * 17) % 250 for j in range(block_tokens)]
    out += [5 + ((index + 1) * 7919 + j * 31) % 250 for j in range(r.prompt)]
    return tuple(out[:r.prompt])


def windows(quick: bool) -> list[tuple[str, list[T.TraceRequest], int, dict]]:
    out = []
    for name, token_div, time_div, length, gather in TRACES[:2] if quick else TRACES:
        length = length // 2 if quick else length
        reqs = T.scale(T.load(name), token_div, 1.0, max_prompt=960, max_output=48)
        start = T.shift_windows(reqs, length, LONG, 1)[0]
        chosen = T.scale(T.window(reqs, start, length), 1.0, time_div)
        if gather:
            chosen = T.gather_long(chosen, LONG, keep=gather[1])
        info = {"trace": name, "start_s": start, "trace_seconds": length,
                "token_div": token_div, "time_div": time_div, "requests": len(chosen),
                "long_share": round(T.long_share(chosen, LONG), 3),
                "block_tokens": 512 // token_div, "gathered": gather}
        label = f"{name}@{start:.0f}s" + (f"/{gather[0]}" if gather else "")
        out.append((label, chosen, 512 // token_div, info))
    return out


def replay(url: str, model: str, reqs: list[T.TraceRequest],
           block_tokens: int) -> tuple[list[Outcome], float]:
    jobs = [Job("generate_stream", prompt_ids(r, i, block_tokens), "", r.output)
            for i, r in enumerate(reqs)]
    start = time.perf_counter()

    def send(i: int) -> Outcome:
        delay = reqs[i].t - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        return run_job(url, jobs[i], model, timeout_s=900)

    with ThreadPoolExecutor(256) as pool:
        outcomes = list(pool.map(send, range(len(jobs))))
    return outcomes, time.perf_counter() - start


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.error is None and o.chunk_times]
    tokens = sum(len(o.output) for o in ok)
    ttft = [o.chunk_times[0] - o.t_start for o in ok]
    tpot = [(o.t_end - o.chunk_times[0]) / (len(o.output) - 1) for o in ok if len(o.output) > 1]
    prompt = sum(len(o.job.prompt_ids) for o in ok)
    cached = sum(o.cached_tokens or 0 for o in ok)
    return {"requests": len(outcomes), "completed": len(ok), "failed": len(outcomes) - len(ok),
            "throughput_tok_s": tokens / wall, "wall_s": wall,
            "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"),
            "ttft_p99_s": pct(ttft, 0.99),
            "tpot_p50_s": statistics.median(tpot) if tpot else float("nan"),
            "tpot_p99_s": pct(tpot, 0.99), "hit_rate": cached / prompt if prompt else 0.0,
            "errors": sorted({(o.error or "")[:120] for o in outcomes if o.error})[:3]}


def run_config(name: str, layouts: list[tuple[int, int, int]], wins: list, out: Path,
               model_dir: Path) -> list[dict]:
    settings = dict(POLICY, candidates=[list(x) for x in layouts])
    args = ("--remp", "--remp-policy", "auto", "--remp-policy-config", json.dumps(settings))
    rows = []
    with launch_sglang_server(model_dir, tp=1, dp=2, extra_args=args, log_dir=out / name,
                              max_total_tokens=512) as server:
        url, model = server.base_url, str(model_dir)
        start = FIXED[name] if name in FIXED else FIXED["DP2"]
        print(f"[{name}] server healthy after {server.startup_s:.1f}s", flush=True)
        for label, reqs, block_tokens, info in wins:
            server.post("/remp/policy", {"paused": True}).raise_for_status()
            dp, tp, pp = start
            server.post("/remp/reshape", {"dp": dp, "tp": tp, "pp": pp},
                        timeout=600).raise_for_status()
            server.flush_cache()
            run_job(url, Job("generate", (5, 6, 7, 8), "", 2), model)  # warm
            before = server.get("/remp/policy").json()
            switches0 = len(before.get("switches", []))
            series0 = server.get("/remp/policy?series=1").json().get("series") or [{"t": 0}]
            t0 = series0[-1]["t"]
            server.post("/remp/policy", {"paused": False}).raise_for_status()
            outcomes, wall = replay(url, model, reqs, block_tokens)
            time.sleep(1.0)  # the last sample
            after = server.get("/remp/policy?series=1").json()
            server.post("/remp/policy", {"paused": True}).raise_for_status()
            switches = after.get("switches", [])[switches0:]
            series = [dict(s, t=round(s["t"] - t0, 3)) for s in after.get("series", [])
                      if s["t"] > t0]
            row = {"window": label, "config": name, **summarize(outcomes, wall),
                   "reshapes": len([s for s in switches if s.get("error") is None]),
                   "switches": switches, "series": series, "window_info": info}
            rows.append(row)
            print(f"[{name}] {label}: {row['completed']}/{row['requests']} done, "
                  f"{row['throughput_tok_s']:.1f} tok/s, TTFT p99 {row['ttft_p99_s']:.2f}s, "
                  f"reshapes {row['reshapes']}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["window"] for r in rows))
    fig, axes = plt.subplots(3, len(labels), figsize=(6 * len(labels), 9), squeeze=False)
    colors = {"DP2": "tab:blue", "TP2": "tab:orange", "PP2": "tab:green", "auto": "black"}
    for col, label in enumerate(labels):
        for r in (r for r in rows if r["window"] == label):
            s = r["series"]
            t = [x["t"] for x in s]
            dt = [max(b - a, 1e-3) for a, b in zip([0.0] + t[:-1], t, strict=True)]
            c = colors.get(r["config"], "gray")
            axes[0][col].plot(t, [x["generated"] / d for x, d in zip(s, dt, strict=True)],
                              color=c, label=r["config"], lw=1)
            axes[1][col].plot(t, [x["waiting"] for x in s], color=c, lw=1)
            axes[2][col].plot(t, [x["kv_used"] / max(x["kv_capacity"], 1) for x in s],
                              color=c, lw=1)
            for x in s:
                if "reshape" in x:
                    for ax in axes[:, col]:
                        ax.axvline(x["t"], color=c, ls=":", lw=0.8)
        axes[0][col].set_title(label)
        axes[0][col].set_ylabel("output tokens/s")
        axes[1][col].set_ylabel("queued requests")
        axes[2][col].set_ylabel("KV used / capacity")
        axes[2][col].set_xlabel("seconds (dotted: auto's reshapes)")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


MEDIANS = ("throughput_tok_s", "wall_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
           "tpot_p99_s", "hit_rate", "reshapes")


def aggregate(runs: list[dict]) -> dict:
    """One (window, configuration) over its repeated runs: the median of each metric
    (this machine is shared: one run's tokens/s varies by up to a fifth), the fewest
    completed and most failed (a layout serves every request only if it did each time),
    the tokens/s range, and the run of median tokens/s for its switches and series."""
    by_tput = sorted(runs, key=lambda r: r["throughput_tok_s"])
    mid = by_tput[(len(runs) - 1) // 2]
    return {**mid, **{k: statistics.median(r[k] for r in runs) for k in MEDIANS},
            "completed": min(r["completed"] for r in runs),
            "failed": max(r["failed"] for r in runs), "runs": len(runs),
            "tput_min": by_tput[0]["throughput_tok_s"],
            "tput_max": by_tput[-1]["throughput_tok_s"]}


def report(rows: list[dict]) -> list[str]:
    runs = max(r.get("runs", 1) for r in rows)
    lines = ["# trace replay on one 2-rank CPU server (tiny Llama float32): fixed layouts "
             "vs --remp-policy auto"
             + (f"; {runs} runs of each, configurations interleaved; medians (tok/s range "
                "min-max), fewest done and most failed" if runs > 1 else ""),
             f"{'window':>26} {'config':>6} {'done':>9} {'fail':>4} {'tok/s':>7} "
             f"{'range':>13} {'TTFT p50':>8} {'TTFT p99':>8} {'TPOT p50':>8} "
             f"{'TPOT p99':>8} {'hit':>5} {'reshapes':>8}"]
    for r in rows:
        spread = f"{r.get('tput_min', r['throughput_tok_s']):.1f}-" \
                 f"{r.get('tput_max', r['throughput_tok_s']):.1f}"
        lines.append(f"{r['window']:>26} {r['config']:>6} {r['completed']:>4}/{r['requests']:<4} "
                     f"{r['failed']:>4} {r['throughput_tok_s']:>7.1f} {spread:>13} "
                     f"{r['ttft_p50_s']:>8.2f} {r['ttft_p99_s']:>8.2f} {r['tpot_p50_s']:>8.3f} "
                     f"{r['tpot_p99_s']:>8.3f} {r['hit_rate']:>5.2f} {r['reshapes']:>8g}")
    lines.append("")
    for label in dict.fromkeys(r["window"] for r in rows):
        per = {r["config"]: r for r in rows if r["window"] == label}
        fixed = {k: v for k, v in per.items() if k in FIXED}
        auto = per.get("auto")
        if not auto or not fixed:
            continue
        worst_ttft = max(v["ttft_p99_s"] for v in fixed.values())
        # A layout that refuses some requests finishes sooner on what is left: it is
        # compared too, but the best fixed layout is the best that serves them all.
        serving = {k: v for k, v in fixed.items() if v["failed"] == 0} or fixed
        bests = {max(serving, key=lambda k: serving[k]["throughput_tok_s"]):
                 "best fixed serving every request"}
        bests.setdefault(max(fixed, key=lambda k: fixed[k]["throughput_tok_s"]), "best fixed")
        for best, kind in bests.items():
            ratio = auto["throughput_tok_s"] / max(fixed[best]["throughput_tok_s"], 1e-9)
            refused = f", which failed {fixed[best]['failed']} of {fixed[best]['requests']}" \
                if fixed[best]["failed"] else ""
            lines.append(
                f"{label}: auto {auto['throughput_tok_s']:.1f} tok/s vs {kind} {best} "
                f"{fixed[best]['throughput_tok_s']:.1f}{refused} ({ratio:.2f}x); auto TTFT "
                f"p99 {auto['ttft_p99_s']:.2f}s vs worst fixed {worst_ttft:.2f}s; "
                f"reshapes {auto['reshapes']:g}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--configs", default="DP2,TP2,PP2,auto")
    parser.add_argument("--windows", default=None,
                        help="comma-separated substrings: only the windows whose label has "
                             "one (=LABEL: that label exactly)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every configuration; the table gives medians")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "trace_replay")
    args = parser.parse_args()
    wins = windows(args.quick)
    if args.windows:
        keys = args.windows.split(",")
        wins = [w for w in wins if any(w[0] == k[1:] if k.startswith("=") else k in w[0]
                                       for k in keys)]
    for label, reqs, _, info in wins:
        print(f"window {label}: {len(reqs)} requests over {reqs[-1].t:.0f}s, "
              f"long share {info['long_share']}", flush=True)
    model_dir = make_tiny_model(args.out / "llama", "llama")
    names = args.configs.split(",")
    for name in names:
        if name not in FIXED and name != "auto":
            parser.error(f"unknown config {name}: {[*FIXED, 'auto']}")
    runs: list[dict] = []
    for round_ in range(args.repeats):  # every configuration once per round
        for name in names:
            layouts = [FIXED[name]] if name in FIXED else list(FIXED.values())
            runs += [dict(r, round=round_) for r in
                     run_config(name, layouts, wins, args.out, model_dir)]
    keys = list(dict.fromkeys((r["window"], r["config"]) for r in runs))
    keys.sort(key=lambda k: names.index(k[1]))
    rows = [aggregate([r for r in runs if (r["window"], r["config"]) == k]) for k in keys]
    lines = report(rows)
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        each = [{k: v for k, v in r.items() if k != "series"} for r in runs]
        args.json.write_text(json.dumps({"rows": rows, "runs": each, "policy": POLICY},
                                        indent=1))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

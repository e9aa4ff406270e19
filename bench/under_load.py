"""Reshapes under load: concurrent clients keep sending while the server switches layouts.

    python bench/under_load.py [--quick] [--reshapes N] [--clients N] [--json PATH]

A real ``sglang.launch_server --remp`` (tiny float32 Llama, 2 ranks, CPU) serves clients
that loop over requests through every API (`/generate`, and through the `openai` client
`/v1/completions` and `/v1/chat/completions`, streaming and not; greedy, ignore_eos),
while the server reshapes repeatedly across the layouts 2 ranks allow (TP1, TP2, TP1xPP2).
Each output is compared with an undisturbed run of the same request. Printed per
reshape: downtime (the schedulers' pause), request wait (the API call), the largest gap
any streaming client saw during it, requests that straddled it; overall: requests sent /
completed / failed / equal to the reference, the decode step (median streaming gap), the
prefix-cache hits of a probe prompt after every reshape, and each process's resident
memory before and after. "max gap" is the largest chunk gap overlapping the call, "gap
from" when it began, relative to the call; "pause gap" is the largest gap between two
consecutive tokens (`Outcome.token_gaps`: a chunk that brought one token) that holds the
pause itself (on the server's clock, from the reply's `clock`), split into "lead" (the
stream's last token to the boundary) and "tail" (the new layout's first step starting to
the stream's next token arriving); "text gap" is the same over every chunk, also those
that brought several tokens at once (the chat route sends no chunk while a token's text
is held back, and the front end coalesces outputs it could not send one by one);
"step after" is the median gap between consecutive tokens in the second after it (the
new layout's decode step as clients see it) and "p90 after" their 90th percentile;
"1st step" is the new layout's first step (the carried requests' decode) up to its tokens
being sent; "pp hold" the wait for launched micro-batches when the old layout has PP;
"decoded" the carried requests that continued as a decode batch (no re-prefill).
Full mode (50 reshapes) is the soak; ``--quick`` runs 6.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

from remp_sglang.testing import launch_sglang_server
from remp_sglang.testing.traffic import KINDS, Outcome, make_jobs, run_concurrently, run_job
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
CYCLE = ((1, 1), (2, 1), (1, 2), (1, 1), (1, 2), (2, 1))
TEXTS = ("Tell me a story about a fox.", "List three colours", "def main():",
         "The weather today is", "Once upon a time", "Q: what is 2+2? A:")


def ids(n: int, seed: int) -> list[int]:
    return [5 + (seed * 31 + i * 7) % 250 for i in range(n)]


def rss_mib(pid: int) -> list[int]:
    procs = sorted(psutil.Process(pid).children(recursive=True), key=lambda p: p.pid)
    return [p.memory_info().rss >> 20 for p in procs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 reshapes (default 50)")
    parser.add_argument("--reshapes", type=int, default=None)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "under_load")
    args = parser.parse_args()
    reshapes = args.reshapes or (6 if args.quick else 50)

    model_dir = make_tiny_model(args.out / "llama", "llama")
    jobs = make_jobs([ids(8 + 13 * i, i) for i in range(12)], TEXTS, (40, 90, 60, 140), KINDS)
    with launch_sglang_server(model_dir, tp=2, extra_args=("--remp",), log_dir=args.out,
                              max_total_tokens=4096) as server:
        url, model = server.base_url, str(model_dir)
        print(f"server --remp tp=2 healthy after {server.startup_s:.1f}s; log {server.log_path}")
        reference = {o.job: o.output for o in run_concurrently(url, jobs, model)}
        probe = ids(100, 999)
        server.generate(probe, 1)
        for tp, pp in CYCLE:  # every layout once, unloaded: first-time costs are not measured
            server.post("/remp/reshape", {"tp": tp, "pp": pp}, timeout=600).raise_for_status()
        server.post("/remp/reshape", {"tp": 2, "pp": 1}, timeout=600).raise_for_status()
        rss_before = rss_mib(server.pid)

        outcomes: list[Outcome] = []
        stop = threading.Event()
        lock = threading.Lock()

        def client(k: int) -> None:
            i = k
            while not stop.is_set():
                out = run_job(url, jobs[i % len(jobs)], model)
                with lock:
                    outcomes.append(out)
                i += args.clients

        threads = [threading.Thread(target=client, args=(k,), daemon=True)
                   for k in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        rows = []
        for n in range(reshapes):
            tp, pp = CYCLE[n % len(CYCLE)]
            start = time.perf_counter()
            response = server.post("/remp/reshape", {"tp": tp, "pp": pp}, timeout=600)
            end = time.perf_counter()
            report = response.json()
            # The probe's prefill would delay the decodes like any new request does
            # without a reshape: it is sent once the streams have resumed.
            time.sleep(0.5)
            probe_hit = server.generate(probe, 1)["meta_info"]["cached_tokens"]
            rows.append({"n": n, "status": response.status_code, "start": start, "end": end,
                         "probe_cached": probe_hit, **report})
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(600)
        hits = server.generate(probe, 1)["meta_info"]["cached_tokens"]
        rss_after = rss_mib(server.pid)

    streamed = [o for o in outcomes if o.job.streaming and o.error is None]
    decode_step = statistics.median(b - a for o in streamed for a, b in o.token_gaps())
    print(f"\n# {reshapes} reshapes under load: {args.clients} clients, CPU, 2 ranks, tiny "
          f"Llama (float32); decode step (median streaming gap) {decode_step * 1e3:.1f} ms")
    print(f"{'#':>3} {'switch':>9} {'status':>6} {'downtime s':>10} {'wait s':>7} "
          f"{'wait-down':>9} {'max gap s':>9} {'gap-down':>8} {'pause gap':>9} "
          f"{'lead':>6} {'tail':>6} {'text gap':>8} {'step after':>10} {'p90 after':>9} "
          f"{'gap from':>8} {'1st step':>8} {'pp hold':>7} {'straddling':>10} "
          f"{'carried':>7} {'decoded':>7} {'probe hit':>9}")
    for r in rows:
        gaps = [o.gap_window(r["start"], r["end"]) for o in streamed
                if o.straddles(r["start"], r["end"])]
        r["max_gap_s"], r["gap_from_s"] = max(gaps, default=(0.0, 0.0))
        clock = r.get("clock", {})
        around = [g for o in streamed if "resumed" in clock
                  for g in [o.gap_around(clock["boundary"], clock["resumed"], tokens=True)]
                  if g]
        a, b = max(around, key=lambda g: g[1] - g[0], default=(0.0, 0.0))
        r["pause_gap_s"] = b - a
        r["pause_gap_lead_s"] = clock["boundary"] - a if around else 0.0
        r["pause_gap_tail_s"] = b - clock["resumed"] if around else 0.0
        text = [g for o in streamed if "resumed" in clock
                for g in [o.gap_around(clock["boundary"], clock["resumed"])] if g]
        r["text_gap_s"] = max((b - a for a, b in text), default=0.0)
        after = sorted(b - a for o in streamed for a, b in o.token_gaps()
                       if r["end"] + 0.1 < a and b < r["end"] + 1.0)
        r["step_after_s"] = statistics.median(after) if after else float("nan")
        r["p90_after_s"] = after[int(0.9 * (len(after) - 1))] if after else float("nan")
        r["straddling"] = sum(o.straddles(r["start"], r["end"]) for o in outcomes)
        old, new = r.get("old", {}), r.get("new", {})
        switch = f"{old.get('tp')}x{old.get('pp')}->{new.get('tp')}x{new.get('pp')}"
        down, wait = r.get("downtime_s", 0.0), r.get("request_wait_s", 0.0)
        print(f"{r['n']:>3} {switch:>9} {r['status']:>6} {down:>10.3f} {wait:>7.3f} "
              f"{wait - down:>9.3f} {r['max_gap_s']:>9.3f} "
              f"{(r['max_gap_s'] - down) if gaps else float('nan'):>8.3f} "
              f"{r['pause_gap_s']:>9.3f} {r['pause_gap_lead_s']:>6.3f} "
              f"{r['pause_gap_tail_s']:>6.3f} {r['text_gap_s']:>8.3f} {r['step_after_s']:>10.3f} "
              f"{r['p90_after_s']:>9.3f} {r['gap_from_s']:>+8.3f} "
              f"{r.get('first_step_s', 0.0):>8.3f} {r.get('pipeline_hold_s', 0.0):>7.3f} "
              f"{r['straddling']:>10} {r.get('requests_carried', 0):>7} "
              f"{r.get('requests_resumed_decoding', 0):>7} {r['probe_cached']:>9}")
    failed = [o for o in outcomes if o.error is not None]
    equal = sum(o.error is None and o.output == reference[o.job] for o in outcomes)
    ok = [r for r in rows if r["status"] == 200]
    summary = {
        "reshapes": reshapes, "reshapes_ok": len(ok), "clients": args.clients,
        "requests_sent": len(outcomes), "completed": len(outcomes) - len(failed),
        "failed": len(failed), "equal_to_reference": equal,
        "decode_step_s": decode_step,
        "downtime_s_p50": statistics.median(r["downtime_s"] for r in ok),
        "downtime_s_max": max(r["downtime_s"] for r in ok),
        "wait_minus_downtime_s_max": max(r["request_wait_s"] - r["downtime_s"] for r in ok),
        "gap_minus_downtime_s_max": max((r["max_gap_s"] - r["downtime_s"] for r in ok
                                         if r["max_gap_s"]), default=None),
        "gap_within_downtime_plus_one_step": sum(
            r["max_gap_s"] - r["downtime_s"] <= r["step_after_s"] for r in ok if r["max_gap_s"]),
        "pause_gap_minus_downtime_s_max": max((r["pause_gap_s"] - r["downtime_s"] for r in ok
                                               if r["pause_gap_s"]), default=None),
        "pause_gap_within_downtime_plus_one_step": sum(
            r["pause_gap_s"] - r["downtime_s"] <= r["step_after_s"] for r in ok
            if r["pause_gap_s"]),
        "pause_gap_within_downtime_plus_one_p90_step": sum(
            r["pause_gap_s"] - r["downtime_s"] <= r["p90_after_s"] for r in ok
            if r["pause_gap_s"]),
        "pause_gap_excess_s_max": max((r["pause_gap_s"] - r["downtime_s"] - r["step_after_s"]
                                       for r in ok if r["pause_gap_s"]), default=None),
        "reshapes_with_a_straddling_stream": sum(1 for r in ok if r["max_gap_s"]),
        "reshapes_with_a_stream_across_the_pause": sum(1 for r in ok if r["pause_gap_s"]),
        "probe_full_hits": sum(r["probe_cached"] >= len(probe) - 1 for r in rows),
        "probe_cached_tokens_end": hits, "rss_mib_before": rss_before, "rss_mib_after": rss_after,
    }
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    for o in failed[:5]:
        print("failed:", o.job.kind, o.error)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "reshapes": [
            {k: v for k, v in r.items() if k not in ("start", "end")} for r in rows]},
            indent=1))
    return 0 if not failed and equal == len(outcomes) and len(ok) == reshapes else 1


if __name__ == "__main__":
    sys.exit(main())

"""Each rank's memory around live reshapes, against its steady state and the bound.

    python bench/reshape_memory.py [--quick] [--json PATH]

A real ``sglang.launch_server --remp`` (2 ranks, CPU) serves a random-weight float32
Llama large enough that weights and KV dominate each scheduler process (about 500 MB of
weights, a 131k-token pool: 1.3 GB of weights and KV per rank), with 12k tokens cached. Around
every reshape each scheduler's resident high-water mark is reset (``/proc/PID/clear_refs``)
and read back (``VmHWM``): the table gives, per rank, the resident memory before and
after and the high-water mark during the switch, its excess over the larger of before
and after, and what the reshape itself counted for its weights and pool: before, after,
its peak (staging included) and the plan's bound; "both" is what holding the old and
new weights and pool side by side (the sequence before the in-place move) would take.
A first pass through every layout is not measured (first-time costs of each layout).

glibc's allocator is told to map every allocation above 64 KiB on its own
(``MALLOC_MMAP_THRESHOLD_``), so a released tensor leaves the resident set at once, as
it leaves the device on a GPU; otherwise its pages may stay in the heap and the
resident set would not show what the process holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psutil

from remp_sglang.testing import launch_sglang_server
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
CYCLE = ((1, 1), (1, 2), (2, 1), (1, 2), (1, 1), (2, 1))
MIB = 1 << 20


def schedulers(pid: int) -> list[psutil.Process]:
    procs = [p for p in psutil.Process(pid).children(recursive=True)
             if "scheduler" in " ".join(p.cmdline()) or "scheduler" in p.name()]
    return sorted(procs, key=lambda p: p.name())


def status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one pass (default two)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "reshape_memory")
    args = parser.parse_args()

    model_dir = make_tiny_model(args.out / "llama", "llama", layers=8, heads=16, kv_heads=4,
                                hidden=1024, intermediate=2816, vocab=16384,
                                max_position=4096)
    rows = []
    with launch_sglang_server(model_dir, tp=2, extra_args=("--remp",), log_dir=args.out,
                              max_total_tokens=131072,
                              env={"MALLOC_MMAP_THRESHOLD_": "65536"}) as server:
        print(f"server --remp tp=2 healthy after {server.startup_s:.1f}s; log {server.log_path}")
        for (tp, pp) in CYCLE:  # every layout once: first-time costs are not measured
            server.post("/remp/reshape", {"tp": tp, "pp": pp}, timeout=600).raise_for_status()
        for i in range(12):  # 12 prompts of 1000 tokens stay cached
            server.generate([5 + (i * 131 + j * 7) % 16000 for j in range(1000)], 1)
        procs = schedulers(server.pid)
        passes = 1 if args.quick else 2
        for n, (tp, pp) in enumerate(CYCLE * passes):
            before = [status(p.pid, "VmRSS") for p in procs]
            for p in procs:
                reset_peak(p.pid)
            response = server.post("/remp/reshape", {"tp": tp, "pp": pp}, timeout=600)
            report = response.json()
            peak = [status(p.pid, "VmHWM") for p in procs]
            after = [status(p.pid, "VmRSS") for p in procs]
            rows.append({"n": n, "status": response.status_code, "old": report.get("old"),
                         "new": report.get("new"), "rss_before": before, "rss_after": after,
                         "rss_peak": peak, "memory": report.get("memory"),
                         "cached_tokens": report.get("cached_tokens_after"),
                         "downtime_s": report.get("downtime_s")})

    print("\n# reshape memory per rank (MiB), CPU, 2 ranks, float32 Llama 8x1024, 12k "
          "tokens cached")
    print(f"{'#':>3} {'switch':>9} {'rank':>4} {'rss before':>10} {'after':>7} "
          f"{'peak':>7} {'excess':>7} | {'held before':>11} {'after':>7} {'peak':>7} "
          f"{'bound':>7} {'both':>7}")
    worst = 0.0
    for r in rows:
        old, new, mem = r["old"] or {}, r["new"] or {}, r["memory"] or {}
        switch = f"{old.get('tp')}x{old.get('pp')}->{new.get('tp')}x{new.get('pp')}"
        for k in range(len(r["rss_before"])):
            excess = r["rss_peak"][k] - max(r["rss_before"][k], r["rss_after"][k])
            worst = max(worst, excess / MIB)
            held = [mem.get(f, [0] * 2)[k] for f in
                    ("before_bytes", "after_bytes", "peak_bytes", "bound_bytes")]
            print(f"{r['n']:>3} {switch:>9} {k:>4} {r['rss_before'][k] / MIB:>10.0f} "
                  f"{r['rss_after'][k] / MIB:>7.0f} {r['rss_peak'][k] / MIB:>7.0f} "
                  f"{excess / MIB:>7.0f} | {held[0] / MIB:>11.0f} {held[1] / MIB:>7.0f} "
                  f"{held[2] / MIB:>7.0f} {held[3] / MIB:>7.0f} "
                  f"{(held[0] + held[1]) / MIB:>7.0f}")
    summary = {"reshapes": len(rows), "ok": sum(r["status"] == 200 for r in rows),
               "worst_rss_excess_mib": round(worst, 1),
               "staging_mib": ((rows[0]["memory"] or {}).get("staging_bytes", 0) // MIB
                               if rows else None)}
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "reshapes": rows}, indent=1))
    return 0 if summary["ok"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

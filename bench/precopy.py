"""Downtime of a grow (TP 1 -> 2) with pre-copy against plain stop-and-copy, as the cached
KV grows.

    python bench/precopy.py [--quick] [--json PATH]

A real ``sglang.launch_server --remp`` (2 ranks, CPU) serves a random-weight float32
Llama whose token takes 64 KiB of KV at TP 1 (8 layers, 16 KV heads of 64), launched at
TP 2 and started on TP 1. For each size of cached KV (10 MB to 1 GB on rank 0, which holds
all of it at TP 1), more prompts are cached, then, with one client streaming short
requests throughout (so slots are written between the copy and the pause):
TP 1 -> 2 with pre-copy, back to TP 1, TP 1 -> 2 without, back to TP 1 (a shrink keeps
the cache, so each size builds on the last). Printed per size: the downtime of both grows
(the pause, from the last step on TP 1 to the first on TP 2), what pre-copy moved while
serving and how long it took, what its pause still moved (the slots allocated since),
what rank 0, which serves in both layouts, copied within itself in the pause (its
half of the heads and of the weights, into its new tensors: that memory is not free
while TP 1 serves, so pre-copy leaves it to the pause), and the pause's transfer phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from remp_sglang.testing import launch_sglang_server
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
ROW = 2 * 8 * 16 * 64 * 4  # KV bytes of one token at TP 1: K and V, 8 layers, 16 heads
PROMPT = 2000  # tokens per cached prompt
SIZES_MB = (10, 100, 300, 1000)


def prompt(k: int, n: int) -> list[int]:
    return [5 + (k * 131 + j * 7) % 16000 for j in range(n)]


class Client(threading.Thread):
    """One streaming client: short requests back to back until stopped."""

    def __init__(self, server) -> None:
        super().__init__(daemon=True)
        self.server, self.stop, self.done, self.errors = server, threading.Event(), 0, 0

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            k += 1
            try:
                self.server.generate(prompt(100_000 + k, 24), 24)
                self.done += 1
            except Exception:
                self.errors += 1


def grow(server, precopy: bool) -> dict:
    response = server.post("/remp/reshape", {"tp": 2, "pp": 1, "precopy": precopy},
                           timeout=600)
    response.raise_for_status()
    back = server.post("/remp/reshape", {"tp": 1, "pp": 1}, timeout=600)
    back.raise_for_status()
    return response.json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 MB only")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "precopy")
    args = parser.parse_args()
    sizes = SIZES_MB[:2] if args.quick else SIZES_MB

    model_dir = make_tiny_model(args.out / "llama", "llama", layers=8, heads=16, kv_heads=16,
                                hidden=1024, intermediate=2816, vocab=16384,
                                max_position=4096)
    rows, cached = [], 0
    with launch_sglang_server(model_dir, tp=2, log_dir=args.out, max_total_tokens=48000,
                              extra_args=("--remp", "--remp-initial-tp", "1",
                                          "--remp-reshape-timeout", "600")) as server:
        print(f"server --remp (TP 1 of 2 ranks) healthy after {server.startup_s:.1f}s; "
              f"log {server.log_path}")
        grow(server, True)  # first-time costs of both layouts are not measured
        grow(server, False)
        k = 0
        for size in sizes:
            while cached * ROW < size * MB:
                n = min(PROMPT, max(16, -(-(size * MB - cached * ROW) // ROW)))
                server.generate(prompt(k, n), 1)
                cached, k = cached + n, k + 1
            client = Client(server)
            client.start()
            time.sleep(0.5)
            pre, plain = grow(server, True), grow(server, False)
            client.stop.set()
            client.join()
            rows.append({"cached_mb": round(cached * ROW / MB, 1), "precopy": pre,
                         "plain": plain, "client_requests": client.done,
                         "client_errors": client.errors})
            p = pre["precopy"]
            print(f"{size} MB cached: pre-copy downtime {pre['downtime_s']:.3f} s "
                  f"(copied {p.get('kv_bytes', 0) / MB:.0f} MB KV in {p.get('seconds', 0):.2f}"
                  f" s), stop-and-copy {plain['downtime_s']:.3f} s", flush=True)

    print("\n# TP 1 -> 2 downtime (s) by cached KV, CPU, 2 ranks, float32 Llama 8x1024, "
          "one streaming client")
    print(f"{'cached MB':>9} | {'pre-copy':>8} {'copied MB':>9} {'copy s':>6} "
          f"{'dirty':>5} {'pause MB':>8} {'kept MB':>7} {'xfer s':>6} | {'stop+copy':>9} "
          f"{'moved MB':>8} {'xfer s':>6} | {'ratio':>5}")
    for r in rows:
        pre, plain, p = r["precopy"], r["plain"], r["precopy"]["precopy"]
        print(f"{r['cached_mb']:>9.1f} | {pre['downtime_s']:>8.3f} "
              f"{(p.get('kv_bytes', 0) + p.get('weight_bytes', 0)) / MB:>9.0f} "
              f"{p.get('seconds', 0):>6.2f} {p.get('dirty_slots', 0):>5} "
              f"{(pre['kv_bytes_moved'] + pre['weight_bytes_moved']) / MB:>8.1f} "
              f"{(pre['kv_bytes_kept'] + pre['weight_bytes_kept']) / MB:>7.0f} "
              f"{pre['phases']['transfer_s']:>6.3f} | {plain['downtime_s']:>9.3f} "
              f"{(plain['kv_bytes_moved'] + plain['weight_bytes_moved']) / MB:>8.0f} "
              f"{plain['phases']['transfer_s']:>6.3f} | "
              f"{plain['downtime_s'] / pre['downtime_s']:>5.1f}")
    first = rows[0]["precopy"]["downtime_s"]
    summary = {
        "precopy_used": all(r["precopy"]["precopy"]["used"] for r in rows),
        "precopy_downtime_vs_smallest": round(max(r["precopy"]["downtime_s"]
                                                  for r in rows) / first, 2),
        "stop_and_copy_growth": round(rows[-1]["plain"]["downtime_s"]
                                      / rows[0]["plain"]["downtime_s"], 2),
        "client_errors": sum(r["client_errors"] for r in rows),
    }
    print("\n" + "\n".join(f"{k}: {v}" for k, v in summary.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0 if summary["precopy_used"] and not summary["client_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Does cache-aware dispatch pay? Round-robin against `--remp-cache-aware` on replicas.

    python bench/dispatch.py [--quick] [--json PATH]

Two 2-replica servers (`--dp-size 2 --remp`, tiny float32 Llama, CPU), one with SGLang's
round-robin dispatch and one with `--remp-cache-aware`, serve the same prefix-heavy load:
documents shared by several questions each (as in the Mooncake conversation trace):
all the documents (2048 tokens) do not fit one replica's KV (1536 slots), half of them
do, which is where the choice of replica matters. Printed per dispatch: prefix-cache hit rate
(cached / prompt tokens), requests per second, latency p50/p90, and how the documents
spread over the replicas.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from remp_sglang.testing import launch_sglang_server
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC_TOKENS, QUESTION_TOKENS, CAPACITY = 256, 16, 1536


def workload(docs: int, questions: int) -> list[tuple[int, list[int]]]:
    """(document, prompt) pairs, shuffled with a fixed seed."""
    out = []
    for d in range(docs):
        doc = [5 + (d * 97 + i * 13) % 250 for i in range(DOC_TOKENS)]
        for q in range(questions):
            out.append((d, doc + [5 + (d * 7 + q * 31 + i) % 250 for i in range(QUESTION_TOKENS)]))
    random.Random(0).shuffle(out)
    return out


def ask(url: str, prompt: list[int]) -> dict:
    start = time.perf_counter()
    response = requests.post(url + "/generate", json={
        "input_ids": prompt, "sampling_params": {"max_new_tokens": 4, "temperature": 0.0,
                                                 "ignore_eos": True}}, timeout=600)
    response.raise_for_status()
    meta = response.json()["meta_info"]
    return {"latency_s": time.perf_counter() - start, "cached": meta["cached_tokens"],
            "prompt": len(prompt), "replica": meta.get("dp_rank")}


def run(model_dir: Path, out: Path, cache_aware: bool, load: list) -> dict:
    extra = ("--remp", "--remp-cache-aware") if cache_aware else ("--remp",)
    with launch_sglang_server(model_dir, tp=1, dp=2, extra_args=extra, log_dir=out,
                              max_total_tokens=CAPACITY) as server:
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda item: ask(server.base_url, item[1]), load))
        wall = time.perf_counter() - start
    spread: dict[int, set] = {}
    for (doc, _), r in zip(load, results, strict=True):
        spread.setdefault(doc, set()).add(r["replica"])
    latency = sorted(r["latency_s"] for r in results)
    return {"dispatch": "cache-aware" if cache_aware else "round-robin",
            "requests": len(results),
            "hit_rate": sum(r["cached"] for r in results) / sum(r["prompt"] for r in results),
            "requests_per_s": len(results) / wall,
            "latency_p50_s": statistics.median(latency),
            "latency_p90_s": latency[int(0.9 * (len(latency) - 1))],
            "docs_on_one_replica": sum(len(s) == 1 for s in spread.values()),
            "docs": len(spread)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "dispatch")
    args = parser.parse_args()
    model_dir = make_tiny_model(args.out / "llama", "llama")
    load = workload(8, 4 if args.quick else 8)
    rows = [run(model_dir, args.out, aware, load) for aware in (False, True)]
    print(f"\n# {len(load)} requests: 8 documents of {DOC_TOKENS} tokens x questions of "
          f"{QUESTION_TOKENS}, concurrency 4, 2 replicas of {CAPACITY} KV slots each (CPU)")
    print(f"{'dispatch':>12} {'hit rate':>8} {'req/s':>6} {'lat p50':>8} {'lat p90':>8} "
          f"{'docs on one replica':>19}")
    for r in rows:
        print(f"{r['dispatch']:>12} {r['hit_rate']:>8.2f} {r['requests_per_s']:>6.2f} "
              f"{r['latency_p50_s']:>8.3f} {r['latency_p90_s']:>8.3f} "
              f"{r['docs_on_one_replica']:>10}/{r['docs']}")
    rr, ca = rows
    print(f"cache-aware vs round-robin: hit rate {ca['hit_rate']:.2f} vs {rr['hit_rate']:.2f}, "
          f"throughput {ca['requests_per_s'] / rr['requests_per_s']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

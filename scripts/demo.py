"""Serve a generated tiny model with a real SGLang server on CPU and query it.

    python scripts/demo.py [--tp 2] [--pp 1] [--arch llama] [--max-new-tokens 16]

Writes the model to ``.artifacts/demo/<arch>`` (regenerated, byte-identical, every
run), starts ``sglang.launch_server`` through ``remp_sglang.testing``, sends a few
prompts (each twice: the second answer comes from the prefix cache), prints the
completions and timings, and shuts the server down. The greedy model is random, so
the completions are gibberish; what matters is that they are deterministic.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from remp_sglang.testing import SGLangServer, launch_sglang_server
from remp_sglang.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("The quick brown fox", "Hello, world! How are you today?")


def query(server: SGLangServer, prompt: str, max_new_tokens: int) -> None:
    """Send one prompt and print its completion, latency and prefix-cache use."""
    started = time.perf_counter()
    response = server.generate(prompt, max_new_tokens)
    elapsed = time.perf_counter() - started
    meta = response["meta_info"]
    print(
        f"  {prompt!r} -> {response['text']!r}\n"
        f"    ids {response['output_ids']}\n"
        f"    {elapsed:.2f}s, {meta['completion_tokens'] / elapsed:.1f} tok/s, "
        f"{meta['cached_tokens']}/{meta['prompt_tokens']} prompt tokens cached"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".artifacts" / "demo")
    args = parser.parse_args()

    model_dir = make_tiny_model(args.out / args.arch, args.arch)
    print(f"model: {model_dir}")
    started = time.perf_counter()
    with launch_sglang_server(model_dir, tp=args.tp, pp=args.pp, log_dir=args.out) as server:
        print(f"server tp={args.tp} pp={args.pp} healthy after {server.startup_s:.1f}s")
        print(f"log: {server.log_path}")
        for prompt in PROMPTS:
            for _ in range(2):
                query(server, prompt, args.max_new_tokens)
        stopping = time.perf_counter()
    print(f"shut down in {time.perf_counter() - stopping:.1f}s")
    print(f"total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()

"""Real request traces, read as arrival times and token counts, for simulation and replay.

The files live in `../shared/traces/` beside the checkout (`REMP_TRACE_DIR` overrides):

- `azure_llm_2023_conv.csv`, `azure_llm_2023_code.csv` (TIMESTAMP, ContextTokens,
  GeneratedTokens): the Azure LLM inference trace 2023 (Azure/AzurePublicDataset,
  `data/`), an hour of requests to LLM inference services in Azure on 2023-11-16,
  described in Patel et al., "Splitwise: Efficient generative LLM inference using phase
  splitting", ISCA 2024. License: CC-BY 4.0 (attribute that paper when results built on
  it are published).
- `mooncake_conversation_trace.jsonl` (timestamp in ms, input_length, output_length,
  hash_ids of 512-token prefix blocks): about an hour of Kimi's online conversation
  traffic, kvcache-ai/Mooncake `FAST25-release/traces/conversation_trace.jsonl`,
  described in Qin et al., "Mooncake: Trading More Storage for Less Computation",
  FAST 2025. License: Apache-2.0 (the repository's LICENSE-APACHE); keep this
  attribution with any copy.

No prompt content is included: only arrival times, token counts and (Mooncake) prefix
block hashes. Pure Python.
"""

from __future__ import annotations

import csv
import json
import math
import os
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

TRACES = {
    "azure_conv": "azure_llm_2023_conv.csv",
    "azure_code": "azure_llm_2023_code.csv",
    "mooncake": "mooncake_conversation_trace.jsonl",
}
BLOCK_TOKENS = 512  # Mooncake's prefix block


@dataclass(frozen=True)
class TraceRequest:
    """One request: when it arrives and how many tokens it reads and writes."""

    t: float  # arrival, seconds from the start of the window
    prompt: int  # prompt tokens
    output: int  # generated tokens
    blocks: tuple[int, ...] = ()  # prefix-block hashes (Mooncake), each `block_tokens` tokens


def trace_dir() -> Path:
    """`../shared/traces` beside the checkout, unless `REMP_TRACE_DIR` names another."""
    env = os.environ.get("REMP_TRACE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def _azure_seconds(stamp: str) -> float:
    """'2023-11-16 18:17:03.9799600' -> seconds (7 fractional digits: datetime takes 6)."""
    whole, _, frac = stamp.strip().partition(".")
    dt = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    return (dt - datetime(1970, 1, 1)).total_seconds() + (float("0." + frac) if frac else 0.0)


def _read_azure(path: Path) -> list[TraceRequest]:
    with path.open(newline="") as f:
        return [TraceRequest(_azure_seconds(row["TIMESTAMP"]), int(row["ContextTokens"]),
                             int(row["GeneratedTokens"])) for row in csv.DictReader(f)]


def _read_mooncake(path: Path) -> list[TraceRequest]:
    out = []
    with path.open() as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.append(TraceRequest(row["timestamp"] / 1000.0, int(row["input_length"]),
                                        int(row["output_length"]),
                                        tuple(int(h) for h in row.get("hash_ids", ()))))
    return out


def load(name: str, directory: Path | None = None) -> list[TraceRequest]:
    """The whole trace `name` (a key of TRACES), sorted by arrival, t from its first."""
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; known: {sorted(TRACES)}")
    path = (directory or trace_dir()) / TRACES[name]
    reqs = _read_mooncake(path) if path.suffix == ".jsonl" else _read_azure(path)
    reqs.sort(key=lambda r: r.t)
    t0 = reqs[0].t if reqs else 0.0
    return [replace(r, t=r.t - t0) for r in reqs]


def window(reqs: Sequence[TraceRequest], start_s: float,
           duration_s: float) -> list[TraceRequest]:
    """The requests arriving in [start_s, start_s + duration_s), t re-based to start_s."""
    return [replace(r, t=r.t - start_s) for r in reqs if start_s <= r.t < start_s + duration_s]


def scale(reqs: Sequence[TraceRequest], token_div: float, time_div: float,
          max_prompt: int | None = None, max_output: int | None = None,
          block_tokens: int = BLOCK_TOKENS) -> list[TraceRequest]:
    """Shrink a trace for a smaller model or a faster replay: prompt and output divided by
    `token_div` (rounded, at least 1) then capped at `max_prompt` / `max_output`; arrival
    times divided by `time_div` (`time_div` 2 offers the same requests twice as fast).
    Blocks are kept, a block now standing for `block_tokens / token_div` tokens; a prompt
    cut by `max_prompt` keeps only the blocks that still start inside it."""
    if token_div <= 0 or time_div <= 0:
        raise ValueError(f"token_div and time_div must be > 0, got {token_div}, {time_div}")
    per_block = block_tokens / token_div
    out = []
    for r in reqs:
        prompt = max(1, round(r.prompt / token_div))
        output = max(1, round(r.output / token_div))
        blocks = r.blocks
        if max_prompt is not None and prompt > max_prompt:
            prompt = max_prompt
            blocks = blocks[:math.ceil(prompt / per_block)]
        if max_output is not None:
            output = min(output, max_output)
        out.append(TraceRequest(r.t / time_div, prompt, output, blocks))
    return out


def long_share(reqs: Sequence[TraceRequest], long_prompt: int) -> float:
    """The share of `reqs` with prompts of at least `long_prompt` tokens (0 when empty)."""
    return sum(r.prompt >= long_prompt for r in reqs) / len(reqs) if reqs else 0.0


def shift_windows(reqs: Sequence[TraceRequest], duration_s: float, long_prompt: int,
                  count: int) -> list[float]:
    """Start times of up to `count` windows of `duration_s` (not overlapping, on a grid of
    a quarter window) where the share of prompts >= `long_prompt` changes most between
    the first and second half: where the request mix shifts, which is when a layout
    switch can pay. Best first. Halves with fewer than 5 requests are skipped."""
    if not reqs:
        return []
    reqs = sorted(reqs, key=lambda r: r.t)
    half = duration_s / 2
    times = [r.t for r in reqs]
    scored = []
    start = 0.0
    while start + duration_s <= times[-1] + 1e-9:
        a, b, c = (bisect_left(times, start + x) for x in (0.0, half, duration_s))
        first, second = reqs[a:b], reqs[b:c]
        if len(first) >= 5 and len(second) >= 5:
            shift = abs(long_share(second, long_prompt) - long_share(first, long_prompt))
            scored.append((-shift, start))
        start += duration_s / 4
    picked: list[float] = []
    for _, s in sorted(scored):
        if all(abs(s - p) >= duration_s for p in picked):
            picked.append(s)
        if len(picked) == count:
            break
    return picked


def gather_long(reqs: Sequence[TraceRequest], long_prompt: int, begin: float = 1 / 3,
                end: float = 2 / 3, keep: int = 1) -> list[TraceRequest]:
    """The same requests with the arrivals of the long ones (prompt >= `long_prompt`)
    spread evenly over [begin, end) of the window, by arrival order, the short ones where
    they were: a bimodal mix (short only, a burst of long contexts among short ones,
    short only again) made of a real window's requests. `keep`: only every keep-th long
    one by arrival stays (a burst the merged layout can finish inside the window)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not reqs:
        return []
    reqs = sorted(reqs, key=lambda r: r.t)
    span = reqs[-1].t
    longs = [r for r in reqs if r.prompt >= long_prompt][::keep]
    a, b = begin * span, end * span
    moved = [replace(r, t=a + (b - a) * i / len(longs)) for i, r in enumerate(longs)]
    return sorted([r for r in reqs if r.prompt < long_prompt] + moved, key=lambda r: r.t)

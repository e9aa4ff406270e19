"""The load statistics the automatic policy watches, kept by each replica's head
scheduler, and the requests it holds for a wider layout.

Counters are since the previous read (`snapshot` resets them): the launcher polls every
replica's head once per policy interval and sums the replies into one
`remp_sglang.policy.LoadSample`. Held requests: with `--remp-policy auto`, a prompt
longer than the current layout admits but within what the widest candidate admits is
queued instead of refused (SGLang's length check is wrapped), and left out of prefill
batches (`without_held`) until a reshape makes room, or refused by the launcher after
`hold_timeout_s`. It travels across a reshape with the rest of the queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

#: Queued requests reported per replica (the policy needs a sample of lengths, not all).
MAX_REPORTED = 256
#: Arrivals kept between two polls (the arrival rate counts them all up to this).
MAX_ARRIVALS = 4096


@dataclass
class LoadCounters:
    """One scheduler process's counters since the last read, and what it may hold."""

    arrived: list[tuple[int, int]] = field(default_factory=list)  # (prompt, max_new)
    generated: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evicted: int = 0
    refused: int = 0
    hold_up_to: int = 0  # prompts shorter than this are held, not refused (0: hold none)
    held_since: dict[str, float] = field(default_factory=dict)  # rid -> first held

    def reset(self) -> None:
        self.arrived, self.generated, self.prompt_tokens = [], 0, 0
        self.cached_tokens, self.evicted, self.refused = 0, 0, 0


COUNTERS = LoadCounters()


def around_validate_input_length(original: Any, req: Any, max_req_input_len: int,
                                 allow_auto_truncate: bool) -> str | None:
    """SGLang's prompt-length check, once per request on every rank: count the arrival;
    hold (accept for now) a prompt a wider candidate layout would admit."""
    n = len(req.origin_input_ids)
    if len(COUNTERS.arrived) < MAX_ARRIVALS:  # the length asked for, before SGLang clips it
        asked = getattr(req, "_remp_max_new", None)  # None: no limit given, SGLang's
        COUNTERS.arrived.append((n, int(asked or req.sampling_params.max_new_tokens or 0)))
    error = original(req, max_req_input_len, allow_auto_truncate)
    if error is not None and n < COUNTERS.hold_up_to:
        # SGLang clipped max_new_tokens to this layout's length limit; the wider layout
        # clips it again when the request stops being held (`without_held`).
        req.sampling_params.max_new_tokens = getattr(req, "_remp_max_new",
                                                     req.sampling_params.max_new_tokens)
        return None
    if error is not None:
        COUNTERS.refused += 1
    return error


def around_init_req_max_new_tokens(original: Any, scheduler: Any, req: Any) -> Any:
    """Keep the max_new_tokens the client asked for (SGLang clips it to the layout)."""
    req._remp_max_new = req.sampling_params.max_new_tokens
    return original(scheduler, req)


def is_held(scheduler: Any, req: Any) -> bool:
    return len(req.origin_input_ids) >= scheduler.max_req_input_len


def without_held(scheduler: Any) -> list:
    """Take held requests out of the waiting queue (put them back with `restore`) so the
    prefill never starts one the layout cannot hold. Every rank of a replica decides
    alike (the same queue, lengths and limits; nothing here depends on time): the
    launcher refuses a request held too long, through SGLang's abort."""
    if not COUNTERS.hold_up_to:
        return []
    held, now = [], time.monotonic()
    for req in list(scheduler.waiting_queue):
        if not is_held(scheduler, req) or req.finished():
            COUNTERS.held_since.pop(req.rid, None)
            # a held request kept the length it asked for: clip it as SGLang does, now
            # that a layout holds it (a copy rebuilt on a joining rank has it too)
            bound = max(0, scheduler.max_req_len - len(req.origin_input_ids) - 1)
            if (req.sampling_params.max_new_tokens or 0) > bound:
                req.sampling_params.max_new_tokens = bound
            continue
        COUNTERS.held_since.setdefault(req.rid, now)
        held.append(req)
    if held:
        ids = {id(r) for r in held}
        scheduler.waiting_queue[:] = [r for r in scheduler.waiting_queue if id(r) not in ids]
    return held


def restore(scheduler: Any, held: list) -> None:
    if held:
        scheduler.waiting_queue[:0] = held


def count_batch(batch: Any) -> None:
    """After a batch's result is processed: tokens generated, and the prompt and cached
    tokens of requests that finished."""
    if batch is None:
        return
    mode = batch.forward_mode
    if not (mode.is_decode() or mode.is_extend()):
        return
    for req in batch.reqs:
        if mode.is_decode() or not getattr(req, "is_chunked", 0):
            COUNTERS.generated += 1
        if req.finished():
            COUNTERS.prompt_tokens += len(req.origin_input_ids)
            COUNTERS.cached_tokens += int(getattr(req, "cached_tokens", 0) or 0)


def wrap_evict(tree: Any) -> None:
    """Count what the tree evicts (the tree's class depends on the launch options, so
    the live instance's method is wrapped; the tree is kept across reshapes)."""
    if getattr(tree, "_remp_counted", False):
        return
    original = tree.evict

    def evict(params: Any) -> Any:
        result = original(params)
        COUNTERS.evicted += int(getattr(result, "num_tokens_evicted", 0) or 0)
        return result

    tree.evict, tree._remp_counted = evict, True


def snapshot(scheduler: Any, layout: tuple[int, int, int]) -> dict:
    """This replica's statistics since the last read (plain JSON), then reset."""
    alloc, tree = scheduler.token_to_kv_pool_allocator, scheduler.tree_cache
    capacity = int(scheduler.max_total_num_tokens)
    used = capacity - int(alloc.available_size()) - int(tree.evictable_size())
    waiting, held, now = [], [], time.monotonic()
    for req in scheduler.waiting_queue:
        item = (len(req.origin_input_ids), int(req.sampling_params.max_new_tokens or 0))
        (held if COUNTERS.hold_up_to and is_held(scheduler, req) else waiting).append(item)
    waits = {r.rid: round(now - COUNTERS.held_since[r.rid], 3)
             for r in scheduler.waiting_queue if r.rid in COUNTERS.held_since}
    data = {"layout": list(layout), "arrived": COUNTERS.arrived,
            "waiting": waiting[:MAX_REPORTED], "held": held[:MAX_REPORTED],
            "held_wait_s": max(waits.values(), default=0.0),
            "held_rids": sorted(waits.items(), key=lambda x: -x[1])[:MAX_REPORTED],
            "running": len(scheduler.running_batch.reqs),
            "longest_running": max((len(r.origin_input_ids) for r in
                                    scheduler.running_batch.reqs), default=0),
            "kv_used": max(0, used),
            "kv_capacity": capacity, "max_input": int(scheduler.max_req_input_len),
            "generated": COUNTERS.generated, "prompt_tokens": COUNTERS.prompt_tokens,
            "cached_tokens": COUNTERS.cached_tokens, "evicted": COUNTERS.evicted,
            "refused": COUNTERS.refused}
    COUNTERS.reset()
    return data

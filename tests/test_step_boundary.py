"""`make_room`: the capacity rule of a reshape with requests in flight (no server)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from remp_sglang.engine import CapacityError  # noqa: E402
from remp_sglang.integration.step_boundary import make_room  # noqa: E402


class Tree:
    def __init__(self, evictable: int, alloc) -> None:
        self.evictable, self.alloc, self.asked = evictable, alloc, []

    def evictable_size(self) -> int:
        return self.evictable

    def evict(self, params) -> None:  # SGLang evicts whole nodes: possibly more than asked
        self.asked.append(params.num_tokens)
        self.alloc.free += params.num_tokens + 3


class Alloc:
    def __init__(self, size: int, free: int) -> None:
        self.size, self.free = size, free

    def available_size(self) -> int:
        return self.free


def req(prompt: int, max_new: int, generated: int = 0):
    return SimpleNamespace(rid=f"r{prompt}", origin_input_ids=[1] * prompt,
                           output_ids=[2] * generated,
                           sampling_params=SimpleNamespace(max_new_tokens=max_new))


def scheduler(size: int, free: int, evictable: int, queued=()):
    alloc = Alloc(size, free)
    return SimpleNamespace(token_to_kv_pool_allocator=alloc, tree_cache=Tree(evictable, alloc),
                           waiting_queue=list(queued), grammar_manager=None)


def test_fits_without_eviction():
    sched = scheduler(size=2048, free=1500, evictable=400)  # 548 live
    assert make_room(sched, [req(10, 20)], capacity=1024) == 0
    assert sched.tree_cache.asked == []


def test_evicts_exactly_the_shortfall_and_reports_what_was_freed():
    sched = scheduler(size=2048, free=848, evictable=900)  # 1200 live
    running = [req(10, 20), req(30, 40)]
    freed = make_room(sched, running, capacity=1024)
    assert sched.tree_cache.asked == [1200 + 2 - 1024]
    assert freed == 1200 + 2 - 1024 + 3


def test_refused_when_unreferenced_prefixes_do_not_suffice():
    sched = scheduler(size=2048, free=848, evictable=100)  # 1200 live, 1100 referenced
    with pytest.raises(CapacityError, match="do not fit"):
        make_room(sched, [req(10, 20)], capacity=1024)
    assert sched.tree_cache.asked == []  # nothing evicted on refusal


@pytest.mark.parametrize("where", ["running", "queued"])
def test_refused_when_a_request_could_never_complete(where):
    big = req(700, 400)
    sched = scheduler(size=2048, free=2000, evictable=0,
                      queued=[big] if where == "queued" else [])
    with pytest.raises(CapacityError, match="may grow to 1100 tokens"):
        make_room(sched, [big] if where == "running" else [], capacity=1024)


def test_a_split_counts_only_the_running_requests_dealt_to_the_busiest_replica():
    """1 -> 2 replicas of 512 slots: three running requests pin 700 slots (400, 200 and
    100, dealt 400 + 100 to one replica, 200 to the other), 100 more are cached. Every
    replica takes the cache; the busiest also 500 + 2 slots: 602, so 90 cached tokens
    go. Copying the whole tree to each replica (ways 1) needed 803: refused."""
    running = [req(390, 40, generated=10), req(190, 40, generated=10), req(95, 40, 5)]
    sched = scheduler(size=2048, free=2048 - 800, evictable=100)
    assert make_room(sched, running, capacity=512, ways=2) == 90 + 3
    assert sched.tree_cache.asked == [90]
    sched = scheduler(size=2048, free=2048 - 800, evictable=100)
    with pytest.raises(CapacityError, match="need 703"):
        make_room(sched, running, capacity=512)

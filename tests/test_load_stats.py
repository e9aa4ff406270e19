"""The scheduler-side order the automatic policy sets (`integration.load_stats`, on
stand-in objects: no server)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from remp_sglang.integration import load_stats


def req(rid: str, prompt: int, max_new: int = 8, generated: int = 0) -> SimpleNamespace:
    return SimpleNamespace(rid=rid, origin_input_ids=[1] * prompt, output_ids=[2] * generated,
                           sampling_params=SimpleNamespace(max_new_tokens=max_new))


def policy(available: int, evictable: int = 0) -> SimpleNamespace:
    alloc = SimpleNamespace(available_size=lambda: available)
    return SimpleNamespace(tree_cache=SimpleNamespace(token_to_kv_pool_allocator=alloc,
                                                      evictable_size=lambda: evictable))


@pytest.fixture
def counters(monkeypatch):
    fresh = load_stats.LoadCounters()
    monkeypatch.setattr(load_stats, "COUNTERS", fresh)
    return fresh


def sglang_order(policy, queue, *args, **kwargs):
    """Stands in for SGLang's sort (here: shortest prompt first), to show it is kept
    within each part."""
    queue.sort(key=lambda r: len(r.origin_input_ids))
    return "sorted"


def order(queue: list, pol: SimpleNamespace, running=()) -> list[str]:
    batch = SimpleNamespace(reqs=list(running))
    assert load_stats.around_calc_priority(sglang_order, pol, queue, batch,
                                           processed_tokens=0) == "sorted"
    return [r.rid for r in queue]


def test_prompts_only_a_merged_layout_holds_go_first_in_sglangs_order(counters):
    counters.wide_from = 506
    queue = [req("a", 900), req("b", 40), req("c", 600), req("d", 10), req("e", 506)]
    assert order(queue, policy(4096)) == ["e", "c", "a", "d", "b"]


def test_a_long_prompt_the_free_kv_cannot_hold_does_not_block_the_short_ones(counters):
    """Free: 900 + 100 evictable - 392 the running request may still generate = 608.
    `e` (514) fits; `c` (608) would not after it, so it keeps its place behind the
    short ones, which SGLang still admits; the next round moves it up if it fits."""
    counters.wide_from = 506
    queue = [req("a", 900), req("b", 40), req("c", 600), req("d", 10), req("e", 506)]
    running = [req("r", 100, max_new=400, generated=8)]
    assert order(queue, policy(900, 100), running) == ["e", "d", "b", "c", "a"]
    assert order(queue, policy(100), running) == ["d", "b", "e", "c", "a"]  # none fits


def test_without_a_threshold_sglangs_order_stays(counters):
    queue = [req("a", 900), req("b", 40)]
    load_stats.around_calc_priority(lambda p, q, *a, **k: None, policy(4096), queue)
    assert [r.rid for r in queue] == ["a", "b"]  # fixed layouts and manual reshapes

"""The scheduler-side order the automatic policy sets (`integration.load_stats`, on
stand-in objects: no server)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from remp_sglang.integration import load_stats


def req(rid: str, prompt: int) -> SimpleNamespace:
    return SimpleNamespace(rid=rid, origin_input_ids=[1] * prompt)


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


def test_prompts_only_a_merged_layout_holds_go_first_in_sglangs_order(counters):
    counters.wide_from = 506
    queue = [req("a", 900), req("b", 40), req("c", 600), req("d", 10), req("e", 506)]
    assert load_stats.around_calc_priority(sglang_order, None, queue, None,
                                           processed_tokens=0) == "sorted"
    assert [r.rid for r in queue] == ["e", "c", "a", "d", "b"]


def test_without_a_threshold_sglangs_order_stays(counters):
    queue = [req("a", 900), req("b", 40)]
    load_stats.around_calc_priority(lambda p, q, *a, **k: None, None, queue)
    assert [r.rid for r in queue] == ["a", "b"]  # fixed layouts and manual reshapes

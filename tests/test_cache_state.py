"""The scheduler-side cache export and its remap through a compaction (no SGLang needed)."""

from __future__ import annotations

from remp_sglang.integration.cache_state import CachedPath, CacheState


def test_remap_moves_slots_and_rebuilds_the_free_list():
    state = CacheState(
        paths=[CachedPath([1, 2, 3], [5, 9, 12], None, None),
               CachedPath([1, 2, 7], [5, 9, 3], "lora-a", None)],
        free_pages=[1, 2, 4], release_pages=[6], free_request_slots=[3, 1],
    )
    assert state.cached_tokens == 4  # slots 5 and 9 shared by both paths count once
    moved = state.remap({12: 1, 9: 2}, new_size=6)
    assert [p.slots for p in moved.paths] == [[5, 2, 1], [5, 2, 3]]
    assert moved.paths[1].extra_key == "lora-a" and moved.paths[1].tokens == [1, 2, 7]
    assert moved.free_pages == [4, 6] and moved.release_pages == []
    assert moved.free_request_slots == [3, 1]
    assert moved.cached_tokens == state.cached_tokens

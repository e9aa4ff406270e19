"""The scheduler-side cache export: a node table moved with array operations, remapped
through a compaction, and rebuilt into SGLang's own tree (in-process, no server)."""

from __future__ import annotations

from array import array

import numpy as np
import torch

from remp_sglang.integration.cache_state import (
    CacheState,
    decode_state,
    encode_state,
    export_state,
    import_state,
    standalone_tree,
)


def a(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_remap_moves_slots_and_rebuilds_the_free_list():
    # [1, 2] -> {3 | 7}: two leaves sharing the slots of their common prefix
    state = CacheState(parents=a(-1, 0, 0), lengths=a(2, 1, 1), tokens=a(1, 2, 3, 7),
                       slots=a(5, 9, 12, 3), leaf_order=a(1, 2), node_keys=a(0, 0, 0),
                       keys=[("lora-a", None)], free_pages=a(1, 2, 4), release_pages=a(6),
                       free_request_slots=[3, 1])
    assert state.cached_tokens == 4  # slots 5 and 9 shared by both paths count once
    moved = state.remap(a(12, 9), a(1, 2), new_size=6)
    assert [(t.tolist(), s.tolist(), k) for t, s, k in moved.leaf_paths()] == [
        ([1, 2, 3], [5, 2, 1], ("lora-a", None)), ([1, 2, 7], [5, 2, 3], ("lora-a", None))]
    assert moved.free_pages.tolist() == [4, 6] and moved.release_pages.tolist() == []
    assert moved.free_request_slots == [3, 1]
    assert moved.cached_tokens == state.cached_tokens


def _insert(sched, tokens: list[int], extra_key: str | None = None) -> None:
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(array("q", tokens), extra_key=extra_key)
    slots = sched.token_to_kv_pool_allocator.alloc(len(tokens))
    sched.tree_cache.insert(InsertParams(key=key, value=slots))  # frees the duplicates


def _paths(state: CacheState) -> list:
    return sorted((t.tolist(), s.tolist(), k) for t, s, k in state.leaf_paths())


def test_export_import_round_trip_through_sglangs_tree():
    src = standalone_tree(4096)
    system = list(range(100, 160))
    for turn in range(6):  # a conversation: each turn extends the one before
        _insert(src, system + list(range(1000, 1000 + 40 * (turn + 1))))
    _insert(src, system + [7, 8, 9])  # a branch off the shared system prompt
    _insert(src, [1, 2, 3, 4], extra_key="lora-b")  # another namespace
    state = export_state(src)
    assert state.cached_tokens == int(src.tree_cache.evictable_size())
    back = decode_state(encode_state(state), pool_size=4096)
    dst = standalone_tree(4096)
    import_state(dst, back, pool_size=4096)
    again = export_state(dst)
    assert _paths(again) == _paths(state)
    assert np.array_equal(again.live_slots, state.live_slots)
    assert torch.equal(dst.token_to_kv_pool_allocator.free_pages,
                       src.token_to_kv_pool_allocator.free_pages)
    assert int(dst.tree_cache.evictable_size()) == state.cached_tokens

"""The scheduler-side cache export: a node table moved with array operations, remapped
through a compaction, and rebuilt into SGLang's own tree (in-process, no server)."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
import torch

from remp_sglang.engine import CapacityError
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


def _record(rid: str):
    from remp_sglang.integration.step_boundary import RequestRecord

    return RequestRecord(rid=rid, recv=b"", output_ids=[], max_new_tokens=4,
                         logprob_start_len=-1, retraction_count=0, retracted=False)


def test_merging_replicas_unions_their_trees_and_queues():
    """DP 2 -> 1: a prefix both replicas cached is kept once (the first's copy, the
    second's slots stay behind); every other path and every request is carried."""
    from remp_sglang.integration.replicas import place
    from remp_sglang.topology import Topology

    system = list(range(100, 130))
    one, two = standalone_tree(256), standalone_tree(256)
    _insert(one, system + [1, 2, 3])
    _insert(two, [9, 9])  # replica 2's own slots start where replica 1's did
    _insert(two, system + [1, 2, 3])  # the same prompt, cached by both
    _insert(two, system + [4, 5])
    states = [export_state(one), export_state(two)]
    states[0].requests, states[0].decoding = [_record("a")], ["a"]
    states[1].requests, states[1].decoding = [_record("b"), _record("c")], ["b"]
    old, new = Topology(1, 1, 2, dp=2), Topology(2, 1, 2)
    (merged,), flows = place(states, old, new, capacity=100)
    want = {tuple(system + [1, 2, 3]), tuple(system + [4, 5]), (9, 9)}
    assert {tuple(t.tolist()) for t, _, _ in merged.leaf_paths()} == want
    assert merged.cached_tokens == 33 + 2 + 2  # the shared 33 tokens once
    assert [r.rid for r in merged.requests] == ["a", "b", "c"]
    assert merged.decoding == ["a", "b"]
    assert [(f.src_replica, f.dst_replica, f.src_slots.numel()) for f in flows] == [
        (0, 0, 33), (1, 0, 4)]
    moved = torch.cat([f.dst_slots for f in flows])
    assert sorted(moved.tolist()) == list(range(1, 38))  # dense, each slot once
    assert np.array_equal(np.sort(merged.live_slots), np.arange(1, 38))
    # what replica 2 sends is its own suffix [4, 5] and [9, 9], not the shared prefix
    paths = {tuple(t.tolist()): s.tolist() for t, s, _ in states[1].leaf_paths()}
    assert set(flows[1].src_slots.tolist()) == set(paths[(9, 9)]) | set(
        paths[tuple(system + [4, 5])][-2:])
    with pytest.raises(CapacityError, match="merged replica holds 30"):
        place(states, old, new, capacity=30)


def test_a_split_sends_each_requests_kv_where_it_runs_and_the_cache_everywhere():
    """DP 1 -> 2: requests are dealt in queue order (a, c to replica 0; b to 1). The
    shared system prompt and the unreferenced cached path go to both; a's own suffix
    only to replica 0, b's only to 1 (a running request's KV was copied to every
    replica before, so a split needed all of it to fit one)."""
    from remp_sglang.integration.replicas import place
    from remp_sglang.topology import Topology

    system = list(range(100, 130))
    paths = {"a": system + list(range(1, 41)), "b": system + list(range(50, 90)),
             "c": [7, 7, 7], "cached": [200, 201, 202, 203]}
    src = standalone_tree(256)
    for name in ("cached", "a", "b"):
        _insert(src, paths[name])
    state = export_state(src)
    state.requests = [_record(r) for r in "abc"]
    state.decoding = ["a", "b"]
    tokens = {"a": paths["a"] + [5], "b": paths["b"][:-10], "c": paths["c"]}  # b: in part
    old, new = Topology(2, 1, 2), Topology(1, 1, 2, dp=2)
    new_states, flows = place([state], old, new, 100, tokens_of=lambda r: tokens[r.rid])
    want = [{tuple(paths["a"]), tuple(paths["cached"])},
            {tuple(paths["b"]), tuple(paths["cached"])}]
    for b, new_state in enumerate(new_states):
        assert {tuple(t.tolist()) for t, _, _ in new_state.leaf_paths()} == want[b]
        assert np.array_equal(np.sort(new_state.live_slots), np.arange(1, 75))
        assert (flows[b].src_replica, flows[b].dst_replica) == (0, b)
        by_path = {tuple(t.tolist()): s.tolist() for t, s, _ in state.leaf_paths()}
        mine = set(by_path[tuple(paths["a" if b == 0 else "b"])]) | set(
            by_path[tuple(paths["cached"])])
        assert set(flows[b].src_slots.tolist()) == mine  # the old slots each one needs
    assert [[r.rid for r in s.requests] for s in new_states] == [["a", "c"], ["b"]]
    assert [s.decoding for s in new_states] == [["a"], ["b"]]
    # 74 slots and a running request each fit 75; the whole tree (114) would not
    place([state], old, new, 75, tokens_of=lambda r: tokens[r.rid])
    with pytest.raises(CapacityError, match="new replica 0 holds 74"):
        place([state], old, new, 74, tokens_of=lambda r: tokens[r.rid])

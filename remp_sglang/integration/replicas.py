"""What each new replica holds after a reshape that changes the number of replicas.

Every old replica exports its cache state (tree, queued requests); from those, every rank
derives the same placement: which old replicas feed each new replica, its tree and queue,
and the slot flows the engine moves (`SlotFlow`).

- Merge (fewer replicas): a new replica takes the union of its sources' trees (a prefix
  cached by several is kept once, the first source's copy; the others' slots are not
  moved) and their queues, one after the other. Slots are renumbered densely.
- Split (more replicas): the source's requests are dealt out in queue order, and each
  new replica takes its source's tree less the paths only the requests dealt to other
  replicas use (the KV of a running request goes where it runs; cached prefixes no
  request uses are copied to every replica, so a repeated prompt hits wherever the
  dispatcher sends it); slots renumbered densely.
- Same count: replica r feeds replica r.

Pure apart from building the union in SGLang's own radix tree (`standalone_tree`), so
that a merged tree is exactly what SGLang's insert makes of the sources' paths.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from remp_sglang.engine import CapacityError, SlotFlow, remap_slots
from remp_sglang.topology import Topology, replica_sources

from .cache_state import CacheState, export_state, standalone_tree


def room_share(old: Topology, new: Topology, capacity: int) -> int:
    """KV slots an old replica may bring so that every new replica fits `capacity`: a
    merge divides it among the replicas merged."""
    group = max((len(s) for s in replica_sources(old, new)), default=1)
    return capacity // group


def split_ways(old: Topology, new: Topology) -> int:
    """How many new replicas an old replica's requests are dealt over (1 unless split)."""
    feeds = replica_sources(old, new)
    return max((sum(1 for srcs in feeds if srcs == [a]) for a in range(old.dp)), default=1) \
        or 1


def place(states: list[CacheState], old: Topology, new: Topology, capacity: int,
          tokens_of: Callable[[Any], Sequence[int]] | None = None,
          ) -> tuple[list[CacheState], list[SlotFlow]]:
    """Each new replica's state (its slots in its own pool of `capacity` usable slots) and
    the flows that fill the new pools. CapacityError if a new replica's tree and running
    requests do not fit. `tokens_of(record)`: a queued request's tokens (default: its
    input and output ids, `step_boundary.record_tokens`)."""
    if len(states) != old.dp:
        raise ValueError(f"expected {old.dp} replica states, got {len(states)}")
    out: list[CacheState] = []
    flows: list[SlotFlow] = []
    feeds = replica_sources(old, new)
    split = new.dp > old.dp
    dealt = _deal(states, feeds) if split else None
    if tokens_of is None:
        from .step_boundary import record_tokens as tokens_of
    memo: dict[str, Sequence[int]] = {}  # each record decoded once, not once per replica

    def tokens(record: Any) -> Sequence[int]:
        if record.rid not in memo:
            memo[record.rid] = tokens_of(record)
        return memo[record.rid]

    for b, srcs in enumerate(feeds):
        if len(srcs) == 1:
            state = states[srcs[0]]
            if dealt is not None:
                rids = {r.rid for r in dealt[b]}
                others = [r for c, srcs_c in enumerate(feeds) if c != b and srcs_c == srcs
                          for r in dealt[c]]
                state = replace(_without(state, dealt[b], others, tokens),
                                requests=dealt[b],
                                decoding=[r for r in state.decoding if r in rids])
            live = torch.from_numpy(state.live_slots)
            if len(live) + len(state.decoding) > capacity:
                raise CapacityError(
                    f"new replica {b} holds {capacity} KV slots; its cached prefixes "
                    f"need {len(live)} and {len(state.decoding)} running requests one each")
            dst = remap_slots(live, capacity + 1)
            out.append(state.remap(live.numpy(), dst.numpy(), capacity))
            flows.append(SlotFlow(srcs[0], b, live, dst))
        else:
            merged, merged_flows = _union([states[a] for a in srcs], srcs, b, capacity)
            out.append(merged)
            flows.extend(merged_flows)
    return out, flows


def _deal(states: list[CacheState], feeds: list[list[int]]) -> list[list]:
    """A split: each source's requests dealt out, in queue order, over the new replicas
    it feeds (running requests first, as they are at the head of the queue)."""
    out: list[list] = [[] for _ in feeds]
    for a, state in enumerate(states):
        targets = [b for b, srcs in enumerate(feeds) if srcs == [a]]
        for i, record in enumerate(state.requests):
            out[targets[i % len(targets)]].append(record)
    return out


def _without(state: CacheState, mine: list, others: list,
             tokens_of: Callable[[Any], Sequence[int]]) -> CacheState:
    """`state`'s tree less the nodes that only requests in `others` use (and what hangs
    below them): the tree a new replica serving `mine` takes in a split. A node a
    request of `mine` uses, or that no request uses, is kept. Array operations on the
    node table (the import re-inserts every leaf path, so edges need not be merged)."""
    if not others or not len(state.parents):
        return state
    theirs = _used_nodes(state, others, tokens_of) - _used_nodes(state, mine, tokens_of)
    if not theirs:
        return state
    parents = state.parents
    keep = np.ones(len(parents), dtype=bool)
    keep[list(theirs)] = False
    for node in np.flatnonzero(parents >= 0).tolist():  # parents come before children
        keep[node] &= keep[parents[node]]
    index = np.cumsum(keep) - 1  # old node -> new node, where kept
    sub_parents = parents[keep]
    sub_parents = np.where(sub_parents >= 0, index[np.maximum(sub_parents, 0)], -1)
    on_token = np.repeat(keep, state.lengths)
    has_child = np.zeros(len(sub_parents), dtype=bool)
    has_child[sub_parents[sub_parents >= 0]] = True
    leaves = index[state.leaf_order[keep[state.leaf_order]]]
    # nodes whose children all went are leaves now: least recently used first
    bare = np.setdiff1d(np.flatnonzero(~has_child), leaves)
    return replace(state, parents=sub_parents, lengths=state.lengths[keep],
                   tokens=state.tokens[on_token], slots=state.slots[on_token],
                   leaf_order=np.concatenate([bare, leaves]).astype(np.int64),
                   node_keys=state.node_keys[keep])


def _used_nodes(state: CacheState, records: list,
                tokens_of: Callable[[Any], Sequence[int]]) -> set[int]:
    """The nodes on the paths the requests' tokens match in the tree (the last one
    possibly in part): the KV they would reuse."""
    starts = np.concatenate(([0], np.cumsum(state.lengths)))
    children: dict[tuple[int, int], list[int]] = {}
    for node, parent in enumerate(state.parents.tolist()):
        children.setdefault((parent, int(state.tokens[starts[node]])), []).append(node)
    used: set[int] = set()
    for record in records:
        seq = np.asarray(tokens_of(record), dtype=np.int64)
        node, pos = -1, 0
        while pos < len(seq):
            nxt = None
            for child in children.get((node, int(seq[pos])), ()):
                edge = state.tokens[starts[child]:starts[child + 1]]
                n = min(len(edge), len(seq) - pos)
                if n and np.array_equal(edge[:n], seq[pos:pos + n]):
                    nxt = child
                    break
                used.add(child)  # its first tokens match (the key): used in part, stop
            if nxt is None:
                break
            used.add(nxt)
            pos += int(state.lengths[nxt])
            node = nxt
    return used


def _union(states: list[CacheState], replicas: list[int], b: int,
           capacity: int) -> tuple[CacheState, list[SlotFlow]]:
    """The union of several replicas' trees in one pool: each source's slot `s` is `s +
    i * stride` while the union is built, then the surviving slots are numbered 1.."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    stride = 1 + max((int(s.slots.max(initial=0)) for s in states), default=0)
    holder = standalone_tree(stride * len(states))
    tree = holder.tree_cache
    for i, state in enumerate(states):
        for tokens, slots, (extra_key, cache_salt) in state.leaf_paths():
            key = RadixKey(array("q", tokens.tobytes()), extra_key=extra_key,
                           cache_salt=cache_salt)
            tree.insert(InsertParams(key=key, value=torch.from_numpy(slots + i * stride)))
    union = export_state(holder)
    live = union.live_slots
    running = sum(len(s.decoding) for s in states)
    if len(live) + running > capacity:
        raise CapacityError(
            f"the merged replica holds {capacity} KV slots; its sources' cached prefixes "
            f"need {len(live)} and {running} running requests one each")
    new_slots = np.arange(1, len(live) + 1, dtype=np.int64)
    merged = union.remap(live, new_slots, capacity)
    merged = replace(merged, free_request_slots=list(states[0].free_request_slots),
                     requests=[r for s in states for r in s.requests],
                     decoding=[r for s in states for r in s.decoding],
                     engine_paused=any(s.engine_paused for s in states),
                     new_token_ratio=max(s.new_token_ratio for s in states))
    flows = []
    for i, a in enumerate(replicas):
        mine = (live // stride) == i
        flows.append(SlotFlow(a, b, torch.from_numpy(live[mine] % stride),
                              torch.from_numpy(new_slots[mine])))
    return merged, flows

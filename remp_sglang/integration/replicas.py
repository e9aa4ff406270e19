"""What each new replica holds after a reshape that changes the number of replicas.

Every old replica exports its cache state (tree, queued requests); from those, every rank
derives the same placement: which old replicas feed each new replica, its tree and queue,
and the slot flows the engine moves (`SlotFlow`).

- Merge (fewer replicas): a new replica takes the union of its sources' trees (a prefix
  cached by several is kept once, the first source's copy; the others' slots are not
  moved) and their queues, one after the other. Slots are renumbered densely.
- Split (more replicas): each new replica takes a copy of its source's whole tree (so a
  repeated prompt hits wherever the dispatcher sends it), with the slot numbers it had
  where they fit; the source's requests are dealt out in queue order.
- Same count: replica r feeds replica r.

Pure apart from building the union in SGLang's own radix tree (`standalone_tree`), so
that a merged tree is exactly what SGLang's insert makes of the sources' paths.
"""

from __future__ import annotations

from array import array
from dataclasses import replace

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


def place(states: list[CacheState], old: Topology, new: Topology,
          capacity: int) -> tuple[list[CacheState], list[SlotFlow]]:
    """Each new replica's state (its slots in its own pool of `capacity` usable slots) and
    the flows that fill the new pools. CapacityError if a merged tree does not fit."""
    if len(states) != old.dp:
        raise ValueError(f"expected {old.dp} replica states, got {len(states)}")
    out: list[CacheState] = []
    flows: list[SlotFlow] = []
    feeds = replica_sources(old, new)
    split = new.dp > old.dp
    dealt = _deal(states, feeds) if split else None
    for b, srcs in enumerate(feeds):
        if len(srcs) == 1:
            state = states[srcs[0]]
            live = torch.from_numpy(state.live_slots)
            dst = remap_slots(live, capacity + 1)
            new_state = state.remap(live.numpy(), dst.numpy(), capacity)
            if dealt is not None:
                requests = dealt[b]
                rids = {r.rid for r in requests}
                new_state = replace(new_state, requests=requests,
                                    decoding=[r for r in state.decoding if r in rids])
            out.append(new_state)
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

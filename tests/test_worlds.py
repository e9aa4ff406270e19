"""Which SGLang worlds a launch prepares, and in what order (pure parts of `worlds`)."""

from __future__ import annotations

import pytest

from remp_sglang.integration.worlds import members, world_key, world_keys
from remp_sglang.topology import ModelShape, layouts

SHAPE = ModelShape(num_layers=4, num_heads=8, num_kv_heads=8, head_dim=16)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("replicas", [False, True])
def test_every_active_rank_of_every_layout_has_a_prepared_world(world, replicas):
    topos = layouts(world, SHAPE, replicas=replicas)
    keys = world_keys(topos)
    assert keys == sorted(set(keys))  # one order on every rank, each world once
    for topo in topos:
        for rank in range(world):
            if not topo.is_active(rank):
                continue
            key = world_key(topo, rank)
            assert key in keys
            # the world is exactly the rank's replica: the ranks SGLang's world spans
            assert members(key) == topo.replica_ranks(topo.replica(rank))
            assert rank in members(key)


def test_layouts_share_worlds():
    """TP1 with a parked rank and the first replica of DP2 are one world; so 2 ranks
    with replicas need 4 worlds for 4 layouts, not 5."""
    topos = layouts(2, SHAPE, replicas=True)
    assert sorted((t.dp, t.tp, t.pp) for t in topos) == [
        (1, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 1)]
    assert world_keys(topos) == [(1, 1, 0), (1, 1, 1), (1, 2, 0), (2, 1, 0)]


def test_building_in_key_order_cannot_deadlock():
    """Each rank builds the worlds it belongs to in the global order: simulate the
    rendezvous (a world completes when all its members reach it) and check it ends."""
    topos = layouts(8, SHAPE, replicas=True)
    keys = world_keys(topos)
    todo = {r: [k for k in keys if r in members(k)] for r in range(8)}
    while any(todo.values()):
        ready = [k for k in keys if all(todo[r] and todo[r][0] == k for r in members(k))]
        assert ready, "no world can complete: the build order deadlocks"
        for key in ready:
            for r in members(key):
                todo[r].pop(0)

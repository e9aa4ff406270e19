"""The engine between layouts with data-parallel replicas, on real gloo worlds of 2 and 4
processes: every transition among the layouts that use all the ranks (DP, TP, PP and
their mixes), KV and weights bit-exact against single-process references.

Each old replica has its own KV (its own contents and slot numbers). A merge gathers
every old replica's tokens into the new replica, a split hands every new replica what
it is given (here, every old replica's tokens: a prefix kept by several replicas), and
all of it moves in one exchange.
"""

from __future__ import annotations

import itertools
import traceback

import pytest
import torch
from test_engine import MODEL, OLD_SLOTS, SHAPES, full_pool, run_world, shard_weights

from remp_sglang.comm import Communicator, MigrationError
from remp_sglang.engine import KVPool, SlotFlow, migrate_kv_flows, reshard_weights
from remp_sglang.planner import plan_kv
from remp_sglang.predict import predict_transfer
from remp_sglang.topology import ModelShape, Topology, layouts

pytestmark = pytest.mark.slow

LIVE = 12  # live slots per old replica


def replica_pools(shape: ModelShape, dp: int):
    """Each replica's full (unsharded) pool, different contents per replica."""
    return [full_pool(shape, seed=100 + r) for r in range(dp)]


def shard(full, topo: Topology, rank: int, shape: ModelShape) -> KVPool | None:
    if not topo.is_active(rank):
        return None
    k, v = full[topo.replica(rank)]
    layers = topo.layer_range(rank, shape.num_layers)
    heads = topo.kv_head_range(rank, shape.num_kv_heads)
    return KVPool([k[i][:, heads.start:heads.stop].clone() for i in layers],
                  [v[i][:, heads.start:heads.stop].clone() for i in layers])


def every_pair_flows(old: Topology, new: Topology, live: list[torch.Tensor]) -> list[SlotFlow]:
    """Every old replica's live slots into every new replica, packed from slot 1."""
    flows = []
    for b in range(new.dp):
        nxt = 1
        for a in range(old.dp):
            n = live[a].numel()
            flows.append(SlotFlow(a, b, live[a], torch.arange(nxt, nxt + n)))
            nxt += n
    return flows


def check(pool: KVPool | None, full, flows, new: Topology, rank: int, shape: ModelShape):
    if not new.is_active(rank):
        assert pool is None
        return
    layers = new.layer_range(rank, shape.num_layers)
    heads = new.kv_head_range(rank, shape.num_kv_heads)
    mine = [f for f in flows if f.dst_replica == new.replica(rank)]
    assert mine
    for f in mine:
        k, v = full[f.src_replica]
        for j, layer in enumerate(layers):
            for got, src in ((pool.k[j], k[layer]), (pool.v[j], v[layer])):
                want = src[f.src_slots][:, heads.start:heads.stop]
                assert torch.equal(got[f.dst_slots], want), (new, rank, layer, f.src_replica)


def _kv_world(rank: int, world: int, port: int, errors) -> None:
    try:
        comm = Communicator.gloo("127.0.0.1", port, rank, world, timeout_s=30)
        for shape in SHAPES.values():
            candidates = [t for t in layouts(world, shape, replicas=True)
                          if t.num_active == world]
            assert any(t.dp > 1 for t in candidates)
            for old, new in itertools.product(candidates, repeat=2):
                full = replica_pools(shape, old.dp)
                g = torch.Generator().manual_seed(old.dp * 10 + new.dp)
                live = [torch.randperm(OLD_SLOTS - 1, generator=g)[:LIVE] + 1
                        for _ in range(old.dp)]
                old_pool = shard(full, old, rank, shape)
                snapshot = [t.clone() for t in old_pool.k + old_pool.v]
                flows = every_pair_flows(old, new, live)
                for staging in (1 << 20, 4096):
                    res = migrate_kv_flows(comm, old, new, shape, old_pool, flows, OLD_SLOTS,
                                           dtype=torch.float32, staging_bytes=staging)
                    check(res.pool, full, flows, new, rank, shape)
                    pairs = [(f.src_replica, f.dst_replica) for f in flows]
                    pred = predict_transfer(old, new, MODEL, shape, [LIVE] * len(flows), pairs)
                    assert res.stats.bytes_sent == pred.kv_sent[rank], (old, new)
                    assert res.stats.bytes_received == pred.kv_received[rank], (old, new)
                    assert res.stats.staging_bytes <= staging
                assert all(torch.equal(a, b)
                           for a, b in zip(snapshot, old_pool.k + old_pool.v, strict=True))
        # a flow into slots another flow of the same replica took: refused everywhere
        shape = SHAPES["gqa"]
        old, new = Topology(1, 1, world, world), Topology(world, 1, world)
        full = replica_pools(shape, old.dp)
        clash = [SlotFlow(a, 0, torch.arange(1, 5), torch.arange(1, 5)) for a in range(old.dp)]
        with pytest.raises(MigrationError, match="two tokens land in one slot"):
            migrate_kv_flows(comm, old, new, shape, shard(full, old, rank, shape), clash,
                             OLD_SLOTS, dtype=torch.float32)
        comm.close()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


@pytest.mark.parametrize("world", [2, 4])
def test_kv_between_replicas_all_transitions(world):
    run_world(_kv_world, world)


def _weights_world(rank: int, world: int, port: int, errors) -> None:
    try:
        comm = Communicator.gloo("127.0.0.1", port, rank, world, timeout_s=30)
        from test_engine import full_weights

        full = full_weights()
        candidates = [t for t in layouts(world, MODEL.shape, replicas=True)
                      if t.num_active == world]
        for old, new in itertools.product(candidates, repeat=2):
            res = reshard_weights(comm, old, new, MODEL, shard_weights(full, old, rank),
                                  dtype=torch.float32, staging_bytes=1 << 20)
            want = shard_weights(full, new, rank)
            assert res.params.keys() == want.keys(), (old, new, rank)
            for key in want:
                assert torch.equal(res.params[key], want[key]), (old, new, rank, key)
            if old == new:  # every rank already holds its shards
                assert res.stats.bytes_sent == res.stats.bytes_received == 0
        comm.close()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


@pytest.mark.parametrize("world", [2, 4])
def test_weights_between_replicas_all_transitions(world):
    run_world(_weights_world, world)


def test_merge_plan_takes_each_replica_from_its_own_ranks():
    shape = SHAPES["mha"]
    old, new = Topology(1, 1, 2, dp=2), Topology(2, 1, 2)  # DP2 -> TP2
    plan = plan_kv(old, new, shape, [(0, 0), (1, 0)])
    for m in plan.moves:
        assert old.replica(m.src) == plan.flows[m.flow][0]
    # each new rank keeps its half of its own old replica's heads and receives the other
    # replica's half: one head range each way per flow
    assert {(m.src, m.dst, m.flow) for m in plan.moves} == {
        (0, 0, 0), (0, 1, 0), (1, 0, 1), (1, 1, 1)}
    assert plan.bytes_sent(0, [10, 20]) == plan.bytes_per_token(plan.sends(0)) * 10
    with pytest.raises(ValueError, match="flows"):
        plan_kv(old, new, shape)
    with pytest.raises(ValueError, match="outside"):
        plan_kv(old, new, shape, [(2, 0)])


def test_split_plan_feeds_every_replica():
    shape = SHAPES["gqa"]
    old, new = Topology(2, 1, 2), Topology(1, 1, 2, dp=2)  # TP2 -> DP2
    plan = plan_kv(old, new, shape, [(0, 0), (0, 1)])
    per_token = shape.kv_bytes_per_token_per_layer_head * shape.num_layers
    # each new rank needs all 2 heads: keeps 1, receives 1
    for r in range(2):
        assert plan.bytes_received(r, 1) == per_token
        assert plan.bytes_sent(r, 1) == per_token

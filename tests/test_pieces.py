"""Replacing a reshape's pieces in place: the order, the schedule and each rank's memory.

Pure: over every pair of layouts of 1-8 ranks (replicas too), both a nearly empty and a
nearly full cache, and two staging sizes, the most any rank holds while the engine
replaces its pieces stays within `pieces.bound`. Engine: on gloo worlds of 2 and 4
processes, `relayout(release_old=True)` gives bit-exact KV and weights, releases every
old tensor, and its own byte accounting equals the plan's replay.
"""

from __future__ import annotations

import itertools
import traceback

import pytest
import torch
from test_engine import MODEL, OLD_SLOTS, SHAPES, full_pool, run_world, shard_pool, shard_weights

from remp_sglang.comm import Communicator
from remp_sglang.engine import KVPart, SlotFlow, WeightPart, relayout
from remp_sglang.exchange import schedule_rounds
from remp_sglang.memory import kv_capacity, launch_budgets
from remp_sglang.pieces import (
    Piece,
    bound,
    kv_pieces,
    order_pieces,
    peak_bytes,
    totals,
    transfers,
    uses,
    weight_pieces,
)
from remp_sglang.planner import plan_kv
from remp_sglang.topology import ModelShape, Topology, layouts, replica_sources
from remp_sglang.weights import DenseDecoder, plan_weights

KV = ModelShape(num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, dtype_bytes=2)
LLAMA = DenseDecoder(KV, hidden_size=512, intermediate_size=1408, vocab_size=4000)


def flows_of(old: Topology, new: Topology) -> list[tuple[int, int]]:
    return [(a, b) for b, sources in enumerate(replica_sources(old, new)) for a in sources]


def peaks(old: Topology, new: Topology, live: int, half: int, rows: tuple[int, int]):
    pieces = kv_pieces(old, new, KV, [rows[0]] * old.world_size, rows[1]) + weight_pieces(
        old, new, LLAMA)
    order = order_pieces(pieces)
    pairs = flows_of(old, new)
    plan = transfers(pieces, order, half, plan_kv(old, new, KV, pairs), [live] * len(pairs),
                     plan_weights(old, new, LLAMA))
    rounds = schedule_rounds(plan, half, [p.new for p in pieces])
    for r in range(old.world_size):
        use = uses(order, [[(t.piece, r in (t.src, t.dst)) for t in rd] for rd in rounds],
                   len(pieces))
        yield r, pieces, peak_bytes(pieces, order, use, r)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_no_rank_holds_more_than_the_bound(world):
    tops = layouts(world, KV, replicas=True)
    budgets = launch_budgets(LLAMA, KV, Topology(world, 1, world), 4096, KV.dtype_bytes)
    checked = 0
    for old, new in itertools.product(tops, tops):
        try:
            rows = tuple(kv_capacity(budgets, LLAMA, KV, t, KV.dtype_bytes) + 1
                         for t in (old, new))
        except ValueError:  # a layout whose weights alone exceed a rank's budget
            continue
        for fraction, half in itertools.product((0.05, 0.9), (1 << 16, 1 << 20)):
            live = int(min(rows) * fraction)
            for r, pieces, peak in peaks(old, new, live, half, rows):
                assert peak <= bound(pieces, r, half), (old, new, r, fraction, half)
                checked += 1
    assert checked > 0


def test_a_pipeline_swap_alternates_pieces():
    """TP2 -> PP2 on 2 ranks: each layer grows on one rank and shrinks on the other. The
    order alternates them, so a rank's memory stays within its total plus two layers;
    in layer order the rank keeping the first layers would gain half its pool first."""
    old, new = Topology(2, 1, 2), Topology(1, 2, 2)
    pieces = kv_pieces(old, new, KV, [1000, 1000], 1000)
    layer = max(max(p.new) for p in pieces)
    start = totals(pieces, 2)[0][0]

    def peak(order: list[int]) -> int:
        return peak_bytes(pieces, order, uses(order, [[(i, True)] for i in order], 8), 0)

    assert peak(order_pieces(pieces)) <= start + 2 * layer
    assert peak(list(range(8))) >= start + 2.5 * layer


def test_peak_replays_open_and_close():
    """Two pieces in two rounds: the second opens before the first closes (two rounds
    are in flight), so the peak holds both new tensors and the first old one."""
    pieces = [Piece("a", (10,), (4,)), Piece("b", (10,), (4,))]
    use = uses([0, 1], [[(0, True)], [(1, True)]], 2)
    assert peak_bytes(pieces, [0, 1], use, 0) == 20 + 4 + 4
    assert peak_bytes(pieces, [0, 1], use, 0, release=False) == 28


# ---------------------------------------------------------------------------------------
# the engine, releasing as it goes
def _in_place_world(rank: int, world: int, port: int, errors) -> None:
    try:
        comm = Communicator.gloo("127.0.0.1", port, rank, world, timeout_s=30)
        shape = SHAPES["gqa"]
        full_k, full_v = full_pool(shape, seed=3)
        from test_engine import full_weights

        full = full_weights()
        live = torch.arange(1, 21)
        for old, new in itertools.product(layouts(world, shape), repeat=2):
            if old == new:
                continue
            pool = shard_pool(full_k, full_v, old, rank, shape)
            params = shard_weights(full, old, rank)
            kept = list(params.values()) + (pool.k + pool.v if pool else [])
            res = relayout(comm, old, new,
                           KVPart(shape, torch.float32, pool, [SlotFlow(0, 0, live)],
                                  OLD_SLOTS),
                           WeightPart(MODEL, torch.float32, params),
                           staging_bytes=1 << 14, release_old=True)
            assert all(t.numel() == 0 for t in kept), (old, new, rank)  # released
            want = shard_weights(full, new, rank)
            assert res.params.keys() == want.keys()
            for key in want:
                assert torch.equal(res.params[key], want[key]), (old, new, rank, key)
            if new.is_active(rank):
                layers = new.layer_range(rank, shape.num_layers)
                heads = new.kv_head_range(rank, shape.num_kv_heads)
                for j, layer in enumerate(layers):
                    for got, src in ((res.pool.k[j], full_k), (res.pool.v[j], full_v)):
                        assert torch.equal(got[res.new_slots],
                                           src[layer][live][:, heads.start:heads.stop])
            s = res.stats
            assert s.peak_bytes == s.predicted_peak_bytes, (old, new, rank)
            assert s.held_bytes[1] == sum(t.numel() * 4 for t in res.params.values()) + (
                sum(t.numel() * 4 for t in res.pool.k + res.pool.v) if res.pool else 0)
        comm.close()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_relayout_in_place_is_exact_and_releases_the_old(world):
    run_world(_in_place_world, world)

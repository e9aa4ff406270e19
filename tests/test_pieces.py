"""Replacing a reshape's pieces in place: the order, the schedule and each rank's memory.

Pure: over every pair of layouts of 1-8 ranks (replicas too) and two stage budgets,
the most any rank holds while the engine replaces its pieces stays within
`pieces.bound`. Engine: on gloo worlds of 2 and 4 processes, `relayout(release_old=True)`
gives bit-exact KV and weights, releases every old tensor, and its own byte accounting
equals the plan's replay; a rank failing at any point of the transfer leaves every
rank able to `restore` its old weights and live KV, bit-exact, in the same objects.
"""

from __future__ import annotations

import itertools
import traceback

import pytest
import torch
from test_engine import MODEL, OLD_SLOTS, SHAPES, full_pool, run_world, shard_pool, shard_weights

from remp_sglang.comm import Communicator
from remp_sglang.engine import KVPart, SlotFlow, WeightPart, relayout
from remp_sglang.memory import kv_capacity, launch_budgets
from remp_sglang.pieces import (
    Piece,
    bound,
    kv_pieces,
    order_pieces,
    peak_bytes,
    stages,
    totals,
    weight_pieces,
)
from remp_sglang.topology import ModelShape, Topology, layouts
from remp_sglang.weights import DenseDecoder

KV = ModelShape(num_layers=8, num_heads=8, num_kv_heads=8, head_dim=64, dtype_bytes=2)
LLAMA = DenseDecoder(KV, hidden_size=512, intermediate_size=1408, vocab_size=4000)


def peaks(old: Topology, new: Topology, budget: int, rows: tuple[int, int]):
    pieces = kv_pieces(old, new, KV, [rows[0]] * old.world_size, rows[1]) + weight_pieces(
        old, new, LLAMA)
    cut = stages(pieces, order_pieces(pieces), budget)
    for r in range(old.world_size):
        yield r, pieces, peak_bytes(pieces, cut, r)


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
        for budget in (1 << 16, 1 << 22):
            for r, pieces, peak in peaks(old, new, budget, rows):
                assert peak <= bound(pieces, r, budget), (old, new, r, budget)
                checked += 1
    assert checked > 0


def test_a_pipeline_swap_alternates_pieces():
    """TP2 -> PP2 on 2 ranks: each layer grows on one rank and shrinks on the other. The
    order alternates them, so a rank's memory stays within its total plus one new layer;
    in layer order the rank keeping the first layers would gain two and a half first."""
    old, new = Topology(2, 1, 2), Topology(1, 2, 2)
    pieces = kv_pieces(old, new, KV, [1000, 1000], 1000)
    layer = max(max(p.new) for p in pieces)
    start = totals(pieces, 2)[0][0]

    def peak(order: list[int]) -> int:
        return peak_bytes(pieces, [[i] for i in order], 0)

    assert peak(order_pieces(pieces)) <= start + layer
    assert peak(list(range(8))) >= start + 2.5 * layer


def test_stages_and_their_peak():
    """Three pieces, a budget of two new tensors: two stages. A stage allocates all its
    new tensors before its old ones go."""
    pieces = [Piece(n, (10,), (4,)) for n in "abc"]
    cut = stages(pieces, [0, 1, 2], budget=8)
    assert cut == [[0, 1], [2]]
    assert peak_bytes(pieces, cut, 0) == 30 + 8
    assert peak_bytes(pieces, cut, 0, release=False) == 30 + 12


# ---------------------------------------------------------------------------------------
# the engine, releasing as it goes
def move(comm, old, new, pool, params, live, staging, fault=None):
    """The gqa shape's KV (one flow of `live` slots) and MODEL's weights, in place."""
    return relayout(comm, old, new,
                    KVPart(SHAPES["gqa"], torch.float32, pool, [SlotFlow(0, 0, live)],
                           OLD_SLOTS),
                    WeightPart(MODEL, torch.float32, params), staging_bytes=staging,
                    release_old=True, fault=fault)


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
            pool, params = shard_pool(full_k, full_v, old, rank, shape), shard_weights(
                full, old, rank)
            kept = list(params.values()) + (pool.k + pool.v if pool else [])
            res = move(comm, old, new, pool, params, live, 1 << 14)
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
            assert s.peak_bytes == s.predicted_peak_bytes <= s.bound_bytes, (old, new, rank)
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


def _restore_world(rank: int, world: int, port: int, errors) -> None:
    """A rank fails at its n-th pack of an in-place relayout (or the relayout succeeds and
    is undone, as a rollback after teardown does); `restore` gives every rank its old
    weights and live KV back, bit-exact, in the same objects."""
    try:
        from test_engine import full_weights

        from remp_sglang.comm import MigrationError
        from remp_sglang.engine import RelayoutFailed, restore

        comm = Communicator.gloo("127.0.0.1", port, rank, world, timeout_s=30)
        shape = SHAPES["gqa"]
        full_k, full_v = full_pool(shape, seed=5)
        full = full_weights()
        live = torch.arange(1, 21)
        cases = [(old, new) for old, new in itertools.product(layouts(world, shape), repeat=2)
                 if old != new]
        for (old, new), nth in itertools.product(cases, (1, 4, 40)):
            pool = shard_pool(full_k, full_v, old, rank, shape)
            params = shard_weights(full, old, rank)
            saved = ({k: t.clone() for k, t in params.items()},
                     [t.clone() for t in pool.k + pool.v] if pool else [])
            objects = (dict(params), list(pool.k + pool.v) if pool else [])
            packs = [0]

            def fault(step: str, r: int, packs=packs, nth=nth) -> None:
                if step == "gather" and r == world - 1:
                    packs[0] += 1
                    if packs[0] == nth:
                        raise RuntimeError("injected")

            try:  # a relayout that did not fail (fewer than nth packs) is undone whole
                restore(comm, move(comm, old, new, pool, params, live, 1 << 12, fault),
                        staging_bytes=1 << 12)
            except RelayoutFailed as failed:
                restore(comm, failed, staging_bytes=1 << 12)
            except MigrationError as exc:
                raise AssertionError("an in-place relayout must fail with its state") from exc
            for key, t in objects[0].items():
                assert t is params[key] and torch.equal(t, saved[0][key]), (old, new, key)
            for t, want in zip(objects[1], saved[1], strict=True):
                # the live slots (the rest of a pool holds nothing)
                assert torch.equal(t[live], want[live]), (old, new, nth)
        comm.close()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_a_failed_in_place_relayout_is_restored(world):
    run_world(_restore_world, world)


@pytest.mark.parametrize(("old", "new"), [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 2), (1, 1)),
                                          ((1, 1), (1, 2))])
def test_frees_come_before_growth(old, new):
    """A 500 MB float32 Llama (bench/reshape_memory.py's) with a 64k-token pool at TP 2:
    on every switch of 2 ranks the order releases before it grows, so no rank holds more
    than its larger total plus the largest new piece and one stage (64 MiB). Ordering by
    the cheapest next piece alone ran TP 2 -> 1 through every weight first: +207 MiB."""
    kv = ModelShape(num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64, dtype_bytes=4)
    model = DenseDecoder(kv, hidden_size=1024, intermediate_size=2816, vocab_size=16384)
    old, new = Topology(*old, 2), Topology(*new, 2)
    rows = [65537 if t.tp * t.pp == 2 else 17666 for t in (old, new)]
    pieces = kv_pieces(old, new, kv, [rows[0]] * 2, rows[1]) + weight_pieces(old, new, model)
    budget = 64 << 20
    cut = stages(pieces, order_pieces(pieces), budget)
    start, end = totals(pieces, 2)
    big_new = max(max(p.new) for p in pieces)
    for r in range(2):
        assert peak_bytes(pieces, cut, r) <= max(start[r], end[r]) + big_new + budget, r

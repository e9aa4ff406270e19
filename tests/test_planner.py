"""Exhaustive checks of the reshape planner over every layout pair of worlds 1..8."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from remp_sglang.planner import KVPlan, Segment, cover, plan_kv
from remp_sglang.topology import (
    ModelShape,
    Topology,
    layouts,
    pp_layer_range,
    tp_kv_head_range,
)
from remp_sglang.weights import (
    DenseDecoder,
    dense_decoder_params,
    layout,
    local_segments,
    local_shape,
    owns,
    plan_weights,
)

SHAPES = {
    "mha": ModelShape(num_layers=6, num_heads=8, num_kv_heads=8, head_dim=16),
    "gqa": ModelShape(num_layers=5, num_heads=8, num_kv_heads=2, head_dim=16),
    "mqa_odd_layers": ModelShape(num_layers=7, num_heads=4, num_kv_heads=1, head_dim=8),
    "gqa4_3layers": ModelShape(num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8),
}


def all_pairs():
    for name, shape in SHAPES.items():
        for world in range(1, 9):
            for old, new in itertools.product(layouts(world, shape), repeat=2):
                yield name, shape, old, new


# -- topology facts ---------------------------------------------------------------------
def test_pp_layer_ranges_match_sglang_rule():
    # sglang get_pp_indices: extra layers go to the LAST stages.
    assert [pp_layer_range(5, r, 2) for r in range(2)] == [range(0, 2), range(2, 5)]
    assert [pp_layer_range(7, r, 3) for r in range(3)] == [range(0, 2), range(2, 4), range(4, 7)]
    assert [pp_layer_range(8, r, 3) for r in range(3)] == [range(0, 2), range(2, 5), range(5, 8)]
    for layers in range(1, 12):
        for pp in range(1, layers + 1):
            ranges = [pp_layer_range(layers, r, pp) for r in range(pp)]
            assert [x for r in ranges for x in r] == list(range(layers))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_pp_layer_partition_env(monkeypatch):
    monkeypatch.setenv("SGLANG_PP_LAYER_PARTITION", "1,4")
    assert [pp_layer_range(5, r, 2) for r in range(2)] == [range(0, 1), range(1, 5)]
    assert pp_layer_range(5, 0, 1) == range(0, 5)  # ignored at pp 1, as in sglang


def test_kv_heads_replicated_over_consecutive_ranks():
    assert [tp_kv_head_range(2, t, 4) for t in range(4)] == [range(0, 1)] * 2 + [range(1, 2)] * 2
    assert [tp_kv_head_range(8, t, 2) for t in range(2)] == [range(0, 4), range(4, 8)]


def test_rank_numbering_and_parking():
    topo = Topology(tp=2, pp=2, world_size=6)
    assert [topo.coords(r) for r in topo.active_ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert list(topo.parked_ranks) == [4, 5]
    with pytest.raises(ValueError, match="parked"):
        topo.coords(4)
    with pytest.raises(ValueError, match="exceeds"):
        Topology(4, 2, 6)


def test_model_constraints_named():
    shape = SHAPES["gqa"]
    with pytest.raises(ValueError, match="attention heads"):
        Topology(3, 1, 4).check_model(shape)
    with pytest.raises(ValueError, match="layers"):
        Topology(1, 6, 8).check_model(shape)
    with pytest.raises(ValueError, match="KV heads"):
        Topology(4, 1, 4).check_model(ModelShape(2, 12, 6, 8))


def test_cover_splits_and_rejects_gaps():
    held = {0: [Segment(0, 4)], 1: [Segment(4, 8)], 2: [Segment(0, 8)]}
    assert cover(Segment(2, 6), held) == [(2, 4, (0, 2)), (4, 6, (1, 2))]
    with pytest.raises(ValueError, match="no old rank"):
        cover(Segment(0, 9), held)


# -- KV plan ------------------------------------------------------------------------------
def check_kv_plan(plan: KVPlan) -> None:
    old, new, shape = plan.old, plan.new, plan.shape
    L, K = shape.num_layers, shape.num_kv_heads
    got: Counter = Counter()
    for m in plan.moves:
        assert new.is_active(m.dst) and old.is_active(m.src)
        assert len(m.layers) > 0 and len(m.heads) > 0
        src_layers, src_heads = old.layer_range(m.src, L), old.kv_head_range(m.src, K)
        dst_layers, dst_heads = new.layer_range(m.dst, L), new.kv_head_range(m.dst, K)
        for layer, head in itertools.product(m.layers, m.heads):
            assert layer in src_layers and head in src_heads, "sent by a rank that lacks it"
            assert layer in dst_layers and head in dst_heads, "delivered where not needed"
            got[(m.dst, layer, head)] += 1
    want = {
        (d, layer, head)
        for d in new.active_ranks
        for layer in new.layer_range(d, L)
        for head in new.kv_head_range(d, K)
    }
    assert set(got) == want, "missing slices"
    assert all(c == 1 for c in got.values()), "a slice arrives twice"


@pytest.mark.parametrize("name", list(SHAPES))
def test_kv_plan_exhaustive(name):
    shape = SHAPES[name]
    count = 0
    for world in range(1, 9):
        for old, new in itertools.product(layouts(world, shape), repeat=2):
            plan = plan_kv(old, new, shape)
            check_kv_plan(plan)
            if old == new:
                assert all(m.is_local for m in plan.moves)
                assert plan.total_bytes_moved(tokens=1000) == 0
                assert plan.lower_bound_s(1000, 1e9) == 0.0
            count += 1
    assert count > 200


def check_flow_plan(plan: KVPlan) -> None:
    """Per flow: every slice of every rank of its new replica arrives exactly once, from a
    rank of its old replica that holds it."""
    old, new, shape = plan.old, plan.new, plan.shape
    L, K = shape.num_layers, shape.num_kv_heads
    for f, (a, b) in enumerate(plan.flows):
        got: Counter = Counter()
        for m in (m for m in plan.moves if m.flow == f):
            assert old.replica(m.src) == a and new.replica(m.dst) == b
            for layer, head in itertools.product(m.layers, m.heads):
                assert layer in old.layer_range(m.src, L) and head in old.kv_head_range(m.src, K)
                got[(m.dst, layer, head)] += 1
        want = {(d, layer, head) for d in new.replica_ranks(b)
                for layer in new.layer_range(d, L) for head in new.kv_head_range(d, K)}
        assert set(got) == want and all(c == 1 for c in got.values()), (old, new, a, b)


@pytest.mark.parametrize("name", list(SHAPES))
def test_kv_plan_between_replicas_exhaustive(name):
    shape = SHAPES[name]
    count = 0
    for world in range(1, 9):
        full = [t for t in layouts(world, shape, replicas=True) if t.num_active == world]
        for old, new in itertools.product(full, repeat=2):
            flows = list(itertools.product(range(old.dp), range(new.dp)))
            plan = plan_kv(old, new, shape, flows)
            check_flow_plan(plan)
            if old == new:  # a replica's own tokens stay on its own ranks
                same = [f for f, (a, b) in enumerate(plan.flows) if a == b]
                assert all(m.is_local for m in plan.moves if m.flow in same)
            count += 1
    assert count > 100


def test_kv_plan_spreads_replicated_sends():
    shape = ModelShape(num_layers=8, num_heads=8, num_kv_heads=2, head_dim=16)
    plan = plan_kv(Topology(4, 1, 4), Topology(1, 1, 4), shape)
    # rank 0 keeps head 0; head 1 is held by ranks 2 and 3, which share the sends.
    assert {m.heads for m in plan.keeps(0)} == {range(0, 1)}
    per_token = {r: plan.bytes_sent(r, 1) for r in range(4)}
    assert per_token[1] == 0 and per_token[2] == per_token[3] > 0


def test_kv_plan_bytes_and_lower_bound():
    shape = ModelShape(num_layers=4, num_heads=4, num_kv_heads=4, head_dim=8, dtype_bytes=2)
    plan = plan_kv(Topology(2, 1, 2), Topology(1, 1, 2), shape)  # rank 1's heads 2,3 -> rank 0
    per_layer_head = 2 * 8 * 2  # K+V, head_dim, bf16
    assert plan.bytes_sent(1, tokens=10) == 4 * 2 * per_layer_head * 10
    assert plan.bytes_received(0, tokens=10) == plan.bytes_sent(1, tokens=10)
    assert plan.bytes_sent(0, tokens=10) == 0
    assert plan.lower_bound_s(10, bandwidth_bytes_per_s=1280.0) == pytest.approx(2.0)


def test_pp_switch_moves_layers_not_heads():
    shape = SHAPES["mha"]
    plan = plan_kv(Topology(1, 2, 2), Topology(1, 1, 2), shape)
    assert [(m.src, m.dst, m.layers, m.heads) for m in plan.moves] == [
        (0, 0, range(0, 3), range(0, 8)),
        (1, 0, range(3, 6), range(0, 8)),
    ]


# -- weights ----------------------------------------------------------------------------
MODELS = {
    "gqa": DenseDecoder(SHAPES["gqa"], hidden_size=32, intermediate_size=48, vocab_size=100),
    "mqa_bias": DenseDecoder(
        SHAPES["mqa_odd_layers"], hidden_size=16, intermediate_size=24, vocab_size=70,
        qkv_bias=True,
    ),
}


def full_weights(model: DenseDecoder, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn(s.shape, generator=g) for s in dense_decoder_params(model)}


def shard(model: DenseDecoder, full: dict[str, torch.Tensor], topo: Topology, rank: int):
    """What SGLang's weight loaders put on `rank`: slices of the full tensors, zero padded."""
    out = {}
    for spec in dense_decoder_params(model):
        if not owns(spec, model, topo, rank):
            continue
        local = torch.zeros(local_shape(spec, model, topo, rank))
        for seg in local_segments(spec, model, topo, rank):
            local.narrow(spec.dim, seg.local, seg.length).copy_(
                full[spec.name].narrow(spec.dim, seg.start, seg.length)
            )
        out[spec.name] = local
    return out


def test_weight_shards_match_sglang_qkv_layout():
    model = MODELS["gqa"]  # 8 heads, 2 KV heads, head_dim 16
    specs = {s.name: s for s in dense_decoder_params(model)}
    spec = specs["model.layers.0.self_attn.qkv_proj.weight"]
    segs = local_segments(spec, model, Topology(4, 1, 4), rank=3)
    # q heads 6,7; the one KV head (1) shared by ranks 2 and 3, for k then v.
    assert segs == [Segment(96, 128, 0), Segment(144, 160, 32), Segment(176, 192, 48)]
    vocab = next(s for s in dense_decoder_params(model) if s.name == "lm_head.weight")
    assert local_shape(vocab, model, Topology(2, 1, 2), 1) == (64, 32)  # 100 -> 128 padded
    assert local_segments(vocab, model, Topology(2, 1, 2), 1) == [Segment(64, 100)]


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_plan_reconstructs_every_shard(name):
    """Applying the plan to old shards gives exactly the new shards sliced from the full."""
    model = MODELS[name]
    full = full_weights(model)
    for world in (1, 2, 3, 4, 6, 8):
        topos = layouts(world, model.shape)
        shards = {(t, r): shard(model, full, t, r) for t in topos for r in t.active_ranks}
        for old, new in itertools.product(topos, repeat=2):
            plan = plan_weights(old, new, model)
            specs = {s.name: s for s in dense_decoder_params(model)}
            rebuilt = {
                r: {
                    s.name: torch.zeros(local_shape(s, model, new, r))
                    for s in specs.values()
                    if owns(s, model, new, r)
                }
                for r in new.active_ranks
            }
            for m in plan.moves:
                dim = specs[m.name].dim
                src = shards[(old, m.src)][m.name].narrow(dim, m.src_local, m.length)
                rebuilt[m.dst][m.name].narrow(dim, m.dst_local, m.length).copy_(src)
            for r in new.active_ranks:
                want = shards[(new, r)]
                assert rebuilt[r].keys() == want.keys()
                for key, tensor in want.items():
                    assert torch.equal(rebuilt[r][key], tensor), (old, new, r, key)
            if old == new:
                assert all(m.is_local for m in plan.moves)


def test_weight_plan_balances_replicated_sources():
    model = MODELS["gqa"]
    plan = plan_weights(Topology(1, 1, 4), Topology(4, 1, 4), DenseDecoder(
        model.shape, model.hidden_size, model.intermediate_size, model.vocab_size))
    # norms are replicated; new ranks 1..3 need them from rank 0 (the only old holder),
    # but where several old ranks hold a slice the least-loaded one sends.
    assert plan.bytes_sent(0) > 0 and plan.bytes_received(0) == 0
    plan2 = plan_weights(Topology(4, 1, 4), Topology(1, 1, 4), model)
    sent = [plan2.bytes_sent(r) for r in range(4)]
    assert all(s > 0 for s in sent[1:]) and sent[0] == 0


def test_layout_only_lists_owners():
    model = MODELS["gqa"]
    lay = layout(model, Topology(1, 2, 2))
    assert set(lay["model.embed_tokens.weight"]) == {0}
    assert set(lay["lm_head.weight"]) == {1}
    assert set(lay["model.layers.4.mlp.down_proj.weight"]) == {1}  # 5 layers: 2 + 3

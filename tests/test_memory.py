"""The per-rank memory budget: a layout's KV capacity is what each rank reserved at
launch (weights + pool) leaves after that layout's weights (exhaustive over layouts)."""

from __future__ import annotations

import math

import pytest

from remp_sglang.memory import (
    kv_capacity,
    kv_slot_bytes,
    launch_budgets,
    replica_token_cap,
    weight_bytes,
)
from remp_sglang.topology import ModelShape, Topology, layouts
from remp_sglang.weights import DenseDecoder, dense_decoder_params

MODELS = {
    "mha": DenseDecoder(ModelShape(4, 4, 4, 8, dtype_bytes=4), 32, 48, 100),
    "gqa": DenseDecoder(ModelShape(6, 8, 2, 16, dtype_bytes=2), 128, 256, 1000,
                        lm_head_on_every_stage=True),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_rank_holds_the_whole_model(name):
    model = MODELS[name]
    full = sum(math.prod(s.shape) for s in dense_decoder_params(model)) * 4
    assert weight_bytes(model, Topology(1, 1, 2), 0, 4) >= full  # vocab padded to 64
    assert weight_bytes(model, Topology(1, 1, 2), 1, 4) == 0  # parked


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_capacity_fits_every_rank_and_is_the_most_that_does(name, world):
    model = MODELS[name]
    kv, wb = model.shape, 2
    for launch in [t for t in layouts(world, kv, replicas=True) if t.num_active == world]:
        for slots in (64, 1000):
            budgets = launch_budgets(model, kv, launch, slots, wb)
            assert kv_capacity(budgets, model, kv, launch, wb) == slots  # launch round trip
            for topo in layouts(world, kv, replicas=True):
                try:
                    cap = kv_capacity(budgets, model, kv, topo, wb)
                except ValueError as error:  # weights alone over some rank's budget
                    assert "reserved at launch" in str(error)
                    assert any(weight_bytes(model, topo, r, wb) >= budgets[r]
                               for r in topo.active_ranks)
                    continue
                use = {r: weight_bytes(model, topo, r, wb) + cap * kv_slot_bytes(kv, topo, r)
                       for r in topo.active_ranks}
                assert all(use[r] <= budgets[r] for r in use), (launch, topo)
                assert any(use[r] + kv_slot_bytes(kv, topo, r) > budgets[r] for r in use)
                assert kv_capacity(budgets, model, kv, topo, wb, token_cap=10) == min(cap, 10)


def test_each_replica_holds_as_many_tokens_as_one_instance_of_its_shape():
    """A replica's ranks have the same weights as a lone instance of its (tp, pp): DP 2
    x TP 1 holds per replica what TP 1 holds."""
    model, kv = MODELS["mha"], MODELS["mha"].shape
    budgets = launch_budgets(model, kv, Topology(2, 1, 2), 1000, 4)
    assert kv_capacity(budgets, model, kv, Topology(1, 1, 2, dp=2), 4) == \
        kv_capacity(budgets, model, kv, Topology(1, 1, 2), 4)


def test_the_token_cap_is_per_launch_replica():
    """--max-total-tokens caps a launch replica's pool: merging two replicas into one
    wider instance doubles what it may hold; a narrower layout keeps the cap."""
    dp2, tp2 = Topology(1, 1, 2, dp=2), Topology(2, 1, 2)
    assert replica_token_cap(512, dp2, tp2) == 1024
    assert replica_token_cap(512, dp2, Topology(1, 2, 2)) == 1024
    assert replica_token_cap(512, dp2, dp2) == 512
    assert replica_token_cap(512, tp2, Topology(1, 1, 2)) == 512  # never below the cap
    assert replica_token_cap(None, dp2, tp2) is None
    assert replica_token_cap(100, Topology(1, 1, 4, dp=4), Topology(4, 1, 4)) == 400


def test_fewer_ranks_hold_fewer_tokens_than_the_kv_bytes_alone_would():
    """TP 2 -> 1 doubles each slot's bytes AND the rank's weights: the old rule
    (launch KV bytes / new slot size) would overrun the budget by the added weights."""
    model, kv = MODELS["mha"], MODELS["mha"].shape
    launch, tp1 = Topology(2, 1, 2), Topology(1, 1, 2)
    budgets = launch_budgets(model, kv, launch, 1000, 4)
    kv_only = 1000 * kv_slot_bytes(kv, launch, 0) // kv_slot_bytes(kv, tp1, 0)
    cap = kv_capacity(budgets, model, kv, tp1, 4)
    added = weight_bytes(model, tp1, 0, 4) - weight_bytes(model, launch, 0, 4)
    assert cap == kv_only - -(-added // kv_slot_bytes(kv, tp1, 0))


def test_weights_over_the_budget_are_refused_by_rank():
    model, kv = MODELS["gqa"], MODELS["gqa"].shape
    budgets = launch_budgets(model, kv, Topology(4, 1, 4), 1, 2)
    with pytest.raises(ValueError, match="rank 0 would hold"):
        kv_capacity(budgets, model, kv, Topology(1, 1, 4), 2)


def test_the_server_refuses_a_layout_whose_weights_do_not_fit():
    """The scheduler's capacity check turns the rule's refusal into a CapacityError,
    which the reshape answers with 409 before anything moves (the plan reports it)."""
    import torch

    from remp_sglang.engine import CapacityError
    from remp_sglang.integration.reshape import RempRuntime

    model = MODELS["mha"]
    launch = Topology(2, 1, 2)
    rt = RempRuntime(launch_rank=0, topology=launch, ctrl=None, store=None, decoder=model,
                     pool_size=100, budgets=launch_budgets(model, model.shape, launch, 100, 4),
                     token_cap=None, dtype=torch.float32, kv_dtype=torch.float32,
                     kv_store_dtype=torch.float32, launch_overlap=True,
                     launch_cpus=[{0}, {1}], reshape_timeout_s=60)
    assert rt.capacity_for(launch) == 100
    with pytest.raises(CapacityError, match="rank 0 would hold"):
        rt.capacity_for(Topology(1, 1, 2))


def test_a_rebuilt_model_allocates_no_parameters_of_its_own():
    """Under `weights_from_memory` every parameter a model build creates is on the meta
    device (no second weight set beside the re-sharded one); adoption makes it the
    engine's tensor in place: same object, class and attributes, no copy."""
    import torch

    from remp_sglang.integration.model_state import adopt, weights_from_memory

    class Loaded(torch.nn.Parameter):  # like SGLang's parameter classes
        def __new__(cls, data, **kwargs):
            return super().__new__(cls, data=data, requires_grad=False)

        def __init__(self, data, weight_loader=None):
            self.weight_loader = weight_loader

    shards = {"proj.weight": torch.randn(64, 32), "proj.bias": torch.randn(64)}
    with weights_from_memory(shards):
        model = torch.nn.Module()
        model.proj = torch.nn.Linear(32, 64)
        model.proj.weight = Loaded(torch.empty(64, 32), weight_loader="loader")
        assert all(p.device.type == "meta" for p in model.parameters())
        kept = model.proj.weight
        for name, param in model.named_parameters():
            adopt(param, shards[name])
    assert torch.nn.Parameter(torch.zeros(1)).device.type == "cpu"  # patch undone
    assert model.proj.weight is kept and type(kept) is Loaded
    assert kept.weight_loader == "loader"
    assert all(p.data_ptr() == shards[n].data_ptr() for n, p in model.named_parameters())
    out = model.proj(torch.ones(1, 32))
    assert torch.allclose(out, torch.ones(1, 32) @ shards["proj.weight"].T + shards["proj.bias"])

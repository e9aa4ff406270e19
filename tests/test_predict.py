"""The downtime model behind /remp/plan and each reshape's `predicted` field."""

from __future__ import annotations

import pytest

from remp_sglang.predict import DowntimeModel, predict_transfer
from remp_sglang.topology import ModelShape, Topology
from remp_sglang.weights import DenseDecoder

SHAPE = ModelShape(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype_bytes=4)
MODEL = DenseDecoder(SHAPE, hidden_size=64, intermediate_size=128, vocab_size=256)


def test_nothing_is_guessed_before_a_reshape_is_measured() -> None:
    model = DowntimeModel()
    assert model.predict(1 << 20) is None
    model.observe(max_rank_bytes=1_000_000, transfer_s=0.01, downtime_s=0.2)
    assert model.fixed_s == pytest.approx(0.19)
    assert model.bandwidth == pytest.approx(1e8)
    assert model.predict(2_000_000) == pytest.approx(0.19 + 0.02)
    assert model.errors == []


def test_the_model_converges_and_keeps_its_errors() -> None:
    model = DowntimeModel()
    for _ in range(30):  # a machine with 50 ms fixed cost and 1 GB/s
        model.observe(10_000_000, 0.01, 0.06)
    assert model.predict(10_000_000) == pytest.approx(0.06, rel=1e-6)
    assert model.predict(0) == pytest.approx(0.05, rel=1e-6)
    assert len(model.errors) == 20 and max(abs(e) for e in model.errors) < 1e-9
    assert model.to_json()["reshapes_observed"] == 30


def test_transfer_prediction_sums_and_floor() -> None:
    old, new = Topology(2, 1, 2), Topology(1, 1, 2)
    pred = predict_transfer(old, new, MODEL, SHAPE, tokens=100)
    # TP 2 -> 1: rank 1 sends its KV head for every layer and its weight shards to rank 0
    per_token = SHAPE.num_layers * 1 * SHAPE.head_dim * 2 * SHAPE.dtype_bytes
    assert pred.kv_sent == (0, 100 * per_token) and pred.kv_received == (100 * per_token, 0)
    assert pred.weights_sent[0] == 0 and pred.weights_sent[1] > 0
    assert pred.max_rank_bytes == pred.kv_bytes + pred.weight_bytes
    assert predict_transfer(old, old, MODEL, SHAPE, 100).max_rank_bytes == 0
    assert pred.to_json()["per_rank"][1]["kv_sent"] == 100 * per_token


def test_a_pause_after_pre_copy_counts_only_moves_to_ranks_that_did_not_join() -> None:
    # TP 2 -> 4 on 4 ranks: ranks 2 and 3 join (pre-copied); 0 and 1 still swap heads
    old, new = Topology(2, 1, 4), Topology(4, 1, 4)
    full = predict_transfer(old, new, MODEL, SHAPE, 100)
    pause = predict_transfer(old, new, MODEL, SHAPE, 100, received=[0, 1])
    assert predict_transfer(old, new, MODEL, SHAPE, 100, received=range(4)) == full
    assert pause.kv_received[2:] == (0, 0) and pause.weights_received[2:] == (0, 0)
    assert pause.kv_received[:2] == full.kv_received[:2]
    assert 0 < pause.max_rank_bytes < full.max_rank_bytes
    grow = predict_transfer(Topology(1, 1, 2), Topology(2, 1, 2), MODEL, SHAPE, 100,
                            received=[0])
    assert grow.max_rank_bytes == 0  # TP 1 -> 2: everything goes to the joining rank

"""The pure parts of reshape safety: launch checks, input checks, plain-data messages,
reply routing, the fault hook and the KV pool's dtype."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import torch

from remp_sglang.integration.cache_state import CacheState, decode_state, encode_state
from remp_sglang.integration.config import (
    ENV_ANY_VERSION,
    UNSUPPORTED_OPTIONS,
    check_launch_options,
    check_sglang_version,
)
from remp_sglang.integration.faults import Fault, parse
from remp_sglang.integration.reshape import ReshapeOrder, kv_dtypes
from remp_sglang.integration.step_boundary import RequestRecord


def test_every_unsupported_launch_option_is_named() -> None:
    supported = {name: value for name, value, _ in UNSUPPORTED_OPTIONS}
    check_launch_options(SimpleNamespace(**supported))  # the defaults pass
    check_launch_options(SimpleNamespace())  # and so does an Engine given none of them
    bad = {"speculative_algorithm": "EAGLE", "enable_dp_attention": True, "attn_dp_size": 2,
           "attn_cp_size": 2, "dcp_size": 2, "nnodes": 2, "enable_lora": True,
           "lora_paths": ["a=b"], "ep_size": 2, "enable_two_batch_overlap": True,
           "enable_single_batch_overlap": True, "disaggregation_mode": "prefill",
           "enable_hierarchical_cache": True, "enable_pdmux": True, "page_size": 16,
           "startup_weight_load_mode": "overlap", "enable_symm_mem": True,
           "enable_torch_symm_mem": True}
    assert set(bad) == set(supported)
    for name, value in bad.items():
        flag = "--" + name.replace("_", "-")
        with pytest.raises(ValueError, match=flag):
            check_launch_options(SimpleNamespace(**{**supported, name: value}))


def test_only_the_pinned_sglang_version_unless_overridden() -> None:
    check_sglang_version("0.5.23", {})
    with pytest.raises(RuntimeError, match="written for SGLang 0.5.23, found 0.5.24"):
        check_sglang_version("0.5.24", {})
    check_sglang_version("0.5.24", {ENV_ANY_VERSION: "1"})


def test_orders_are_plain_validated_data() -> None:
    order = ReshapeOrder(3, 2, 1, time.time() + 5)
    data = msgspec.json.encode(order)
    assert b'"tp":2' in data and msgspec.json.decode(data, type=ReshapeOrder) == order
    order.validate(world_size=2, epoch=3)
    ReshapeOrder(3, 1, 1, time.time(), dp=2).validate(2, 3)
    for bad, reason in (((4, 2, 1), "epoch"), ((3, 0, 1), "fit"), ((3, 1, 0), "fit")):
        with pytest.raises(ValueError, match=reason):
            ReshapeOrder(*bad, time.time()).validate(world_size=2, epoch=3)
    with pytest.raises(ValueError, match="fit"):
        ReshapeOrder(3, 2, 1, time.time(), dp=2).validate(2, 3)
    with pytest.raises(msgspec.ValidationError):  # a type confusion never reaches a rank
        msgspec.json.decode(b'{"epoch":"x","tp":1,"pp":1,"deadline":0}', type=ReshapeOrder)


def _state(**fields) -> CacheState:
    def a(*v):
        return np.array(v, dtype=np.int64)

    base = dict(parents=a(-1, 0), lengths=a(2, 1), tokens=a(1, 2, 3), slots=a(4, 5, 6),
                leaf_order=a(1), node_keys=a(0, 0), keys=[(None, "salt")], free_pages=a(1, 2),
                release_pages=a(), free_request_slots=[0, 1])
    return CacheState(**{**base, **fields})


def test_cache_state_round_trip_and_rejections() -> None:
    record = RequestRecord("r1", b"\x00\x01msgpack", [7, 8], 16, -1, 0, True)
    state = _state(requests=[record], engine_paused=True)
    data = encode_state(state)
    assert b"pickle" not in data and data.startswith(b"{")
    back = decode_state(data, pool_size=10)
    assert encode_state(back) == data and back.requests == [record] and back.engine_paused
    assert [(t.tolist(), s.tolist(), k) for t, s, k in back.leaf_paths()] == \
        [([1, 2, 3], [4, 5, 6], (None, "salt"))]
    with pytest.raises(ValueError, match="outside the pool"):
        decode_state(data, pool_size=5)
    with pytest.raises(ValueError, match="malformed"):
        decode_state(data.replace(b'"parents":"', b'"parents":7,"x":"'), pool_size=10)
    for bad, reason in (
        (dict(lengths=np.array([2, 2])), "do not add up"),
        (dict(slots=np.array([4, 5])), "differ in length"),
        (dict(parents=np.array([1, -1])), "come before"),
        (dict(leaf_order=np.array([0])), "not a leaf"),
        (dict(node_keys=np.array([0, 3])), "key index"),
    ):
        with pytest.raises(ValueError, match=reason):
            decode_state(encode_state(_state(**bad)), pool_size=10)


def test_kv_pool_logical_dtype_is_kept_for_fp8() -> None:
    fp8 = SimpleNamespace(k_buffer=[torch.empty(2, dtype=torch.uint8)],
                          dtype=torch.float8_e4m3fn)
    assert kv_dtypes(fp8) == (torch.float8_e4m3fn, torch.uint8)
    plain = SimpleNamespace(k_buffer=[torch.empty(2, dtype=torch.float32)], dtype=torch.float32)
    assert kv_dtypes(plain) == (torch.float32, torch.float32)


def test_fault_specs() -> None:
    assert parse("model:0:raise, transfer:1:freeze:3") == [Fault("model", 0, "raise"),
                                                             Fault("transfer", 1, "freeze", 3.0)]
    assert parse("") == []
    for bad in ("model:0", "nowhere:0:raise", "model:0:explode"):
        with pytest.raises(ValueError, match="REMP_FAULT_INJECT"):
            parse(bad)


def test_a_late_reply_never_reaches_the_next_caller() -> None:
    from remp_sglang.integration import routes

    routes._main_view.clear()
    routes._main_view.update(dp=1, tp=2, pp=1)
    sent = []
    router = routes.ReplyRouter(sent.append)

    def reply(nonce, error=None):
        return SimpleNamespace(nonce=nonce, error=error, report_json='{"new": {"tp": 1, "pp": 1}}')

    async def scenario():
        first = SimpleNamespace(nonce="a")
        with pytest.raises(asyncio.TimeoutError):
            await router.call(first, timeout=0.05)
        second = asyncio.ensure_future(router.call(SimpleNamespace(nonce="b"), timeout=5))
        await asyncio.sleep(0.01)
        router.handle_recv(reply("a"))  # the first reshape's late reply
        await asyncio.sleep(0.01)
        assert not second.done()
        router.handle_recv(reply("b", error="refused"))
        return await second

    got = asyncio.run(scenario())
    assert got.nonce == "b" and got.error == "refused"
    assert [r.nonce for r in sent] == ["a", "b"]
    # the late success still updates the launcher's view: it reports what serves
    assert routes._main_view["tp"] == 1 and routes._main_view["pp"] == 1

"""The new layout's first step: its tokens stream before queued requests are taken in,
and the reshape's reply follows them (scheduler hooks on stand-in objects, no server)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from remp_sglang.integration import scheduler_hooks as hooks  # noqa: E402


def runtime(pp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(flush_first=True, ingest_skipped=False, reply=None,
                           topology=SimpleNamespace(pp=pp))


def scheduler(rt: SimpleNamespace, overlap: bool = True) -> SimpleNamespace:
    sent: list = []
    return SimpleNamespace(_remp=rt, enable_overlap=overlap, last_batch=None, sent=sent,
                           send_control_output=lambda out, req: sent.append(out))


def ingest(sched: SimpleNamespace) -> str:
    return hooks.around_ingest_requests(lambda s: "received", sched)


def test_queued_requests_wait_one_iteration_after_the_first_batch_once():
    sched = scheduler(runtime())
    assert ingest(sched) == "received"  # the loop's first iteration: nothing launched yet
    sched.last_batch = "first batch"
    assert ingest(sched) == []  # its tokens stream before the queue is read
    assert ingest(sched) == "received"  # once only (a pause request is not held up)


@pytest.mark.parametrize("overlap, pp", [(False, 1), (True, 2)])
def test_other_loops_always_take_requests_in(overlap, pp):
    """The normal loop streams each batch at once (and never clears `flush_first`): a
    skip there could repeat forever; PP relays requests between stages."""
    sched = scheduler(runtime(pp), overlap=overlap)
    sched.last_batch = "first batch"
    assert all(ingest(sched) == "received" for _ in range(3))


def pending_reply(rt: SimpleNamespace, first_out: bool) -> None:
    clock = {"first_step_out": 1.0} if first_out else {}
    rt.reply = ({"clock": clock}, SimpleNamespace(nonce="n"), 0.0)


def batch(decode: bool) -> SimpleNamespace:
    return SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: decode))


def run(sched: SimpleNamespace, b: SimpleNamespace) -> list:
    """Runs `b`; returns how many replies had gone when the batch ran, and after."""
    seen = []
    hooks.around_run_batch(lambda s, _: seen.append(len(s.sent)), sched, b)
    return seen + [len(sched.sent)]


def test_the_reply_follows_a_second_decode_batch():
    rt = runtime()
    sched = scheduler(rt)
    pending_reply(rt, first_out=False)
    assert run(sched, batch(decode=True)) == [0, 0]  # the first batch: tokens not out yet
    pending_reply(rt, first_out=True)
    assert run(sched, batch(decode=True)) == [0, 1]  # after the second decode batch
    assert json.loads(sched.sent[0].report_json)["clock"]["first_step_out"] == 1.0
    assert rt.reply is None
    assert run(sched, batch(decode=True)) == [1, 1]  # once


def test_the_reply_goes_before_a_prefill():
    rt = runtime()
    sched = scheduler(rt)
    pending_reply(rt, first_out=True)
    assert run(sched, batch(decode=False)) == [1, 1]  # the caller does not wait for it

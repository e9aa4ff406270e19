"""A reshape that fails at any step, on any rank, in any way, leaves the server serving.

One 2-rank server launched with the test-only fault hook (``REMP_FAULT_INJECT=@file``:
the file names the step, rank and kind for the next reshape), a short reshape timeout
and stall bound. For every step of the sequence and every kind of failure (an
exception, a rank that stops answering, a rank that overruns the deadline) a reshape
runs with streaming requests in flight; then:

- the caller gets a JSON error naming the step (500), and whether the old world was
  rebuilt after teardown (`rolled_back`);
- every rank serves the old layout (a frozen rank the coordinator could not watch may
  instead recover in time: then the new layout serves on every rank);
- the requests in flight finish with outputs equal to an undisturbed run, and the
  prefix cache still hits.
"""

from __future__ import annotations

import time

import pytest
from remp_checks import model_and_fault_file, reshape, topology

from remp_sglang.integration.faults import STEPS
from remp_sglang.testing.traffic import Background, Job, run_concurrently

pytestmark = pytest.mark.slow

TIMEOUT_S, STALL_S = 8, 2
AFTER_TEARDOWN = ("teardown", "world", "model", "cache_import", "rebind")
# (step, rank that fails) on TP 2 -> 1: rank 1 leaves (it sends its shards and KV),
# rank 0 alone builds the new world.
LEAVING = [("prepare", 1), ("transfer", 1), ("teardown", 1), ("world", 0),
           ("model", 0), ("cache_import", 0), ("rebind", 1)]
# On TP 1 -> 2 the joining rank 1 builds the new world.
JOINING = [("world", 1), ("model", 1), ("cache_import", 1)]
PROMPT = [5 + (i * 13) % 200 for i in range(48)]


@pytest.fixture(scope="module")
def faulty(tiny_llama_dir, sglang_server_factory, tmp_path_factory):
    model_dir, spec = model_and_fault_file(tiny_llama_dir, tmp_path_factory.mktemp("faults"))
    server = sglang_server_factory(
        model_dir, tp=2,
        extra_args=("--remp", "--remp-reshape-timeout", str(TIMEOUT_S),
                    "--remp-stall-timeout", str(STALL_S)),
        env={"REMP_FAULT_INJECT": f"@{spec}"})
    jobs = [Job("generate_stream", tuple(PROMPT), "", 60),
            Job("completions_stream", (), "Once upon a time", 40)]
    reference = run_concurrently(server.base_url, jobs, str(model_dir))
    assert all(o.error is None for o in reference)
    yield server, spec, jobs, reference, str(model_dir)
    server.shutdown()


def failing_reshape(server, spec, jobs, reference, model, tp, pp, step, rank, kind):
    old = {k: topology(server)[k] for k in ("dp", "tp", "pp")}
    traffic = Background(server.base_url, jobs, model, stagger_s=0.05)
    time.sleep(0.4)
    # A freeze of 3 s outlasts the stall bound and ends well within the deadline.
    spec.write_text(f"{step}:{rank}:{kind}" + (":3" if kind == "freeze" else ""))
    try:
        response = server.post("/remp/reshape", {"tp": tp, "pp": pp}, timeout=4 * TIMEOUT_S + 90)
    finally:
        spec.write_text("")
    outcomes = traffic.wait(300)
    for got, want in zip(outcomes, reference, strict=True):
        assert got.error is None, (step, kind, got.error)
        assert got.output == want.output, (step, kind)
    body = response.json()
    layout = {k: topology(server)[k] for k in ("dp", "tp", "pp")}
    assert server.generate_ids(PROMPT, 4) == reference[0].output[:4]
    return response.status_code, body, old, layout


def check_failed(status, body, old, layout, step, kind):
    assert status == 500, body
    # A failing rank names its step in its vote; a silent one cannot, and the reply
    # names where rank zero was.
    assert body["step"] == step if kind == "raise" else body["step"] in STEPS, body
    assert body["rolled_back"] == (step in AFTER_TEARDOWN), body
    assert layout == old, body
    assert body["old"] == old


@pytest.mark.parametrize("kind", ["raise", "timeout", "freeze"])
@pytest.mark.parametrize(("step", "rank"), LEAVING)
def test_fault_on_shrink(faulty, step, rank, kind):
    server, spec, jobs, reference, model = faulty
    if topology(server)["tp"] != 2:
        reshape(server, 2, 1)
    status, body, old, layout = failing_reshape(server, spec, jobs, reference, model, 1, 1,
                                                step, rank, kind)
    if kind == "freeze" and rank == 0:
        # Nobody can tell a frozen rank zero from a slow one (it is the coordinator):
        # it wakes within the deadline and the reshape goes through, on every rank.
        assert (status, layout) == (200, {"dp": 1, "tp": 1, "pp": 1}), body
        return
    check_failed(status, body, old, layout, step, kind)
    assert ("stopped answering" in body["error"]) == (kind == "freeze"), body
    if kind == "timeout":
        assert "timed out" in body["error"].lower() or "deadline" in body["error"], body


@pytest.mark.parametrize(("step", "rank"), JOINING)
def test_fault_on_a_joining_rank(faulty, step, rank):
    server, spec, jobs, reference, model = faulty
    if topology(server)["tp"] != 1:
        reshape(server, 1, 1)
    status, body, old, layout = failing_reshape(server, spec, jobs, reference, model, 2, 1,
                                                step, rank, "raise")
    check_failed(status, body, old, layout, step, "raise")


@pytest.mark.parametrize("start", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_failures_after_the_checkpoint_under_arriving_requests(faulty, start):
    """A preparation that fails after the running requests were checkpointed (they wait
    at the head of the queue, their KV in the tree), again and again while short
    requests arrive, so that some failures come right after a prefill step: that batch
    must not also rejoin the running requests (it did: its requests ran twice and their
    rows leaked, and every later reshape was refused). Nothing lost, then a reshape
    goes through."""
    server, spec, _, _, model = faulty
    if (topology(server)["tp"], topology(server)["pp"]) != start:
        reshape(server, *start)
    shorts = [Job("generate", tuple(5 + (s * 31 + i * 7) % 250 for i in range(20)), "", 6)
              for s in range(60)]
    reference = run_concurrently(server.base_url, shorts, model)
    server.flush_cache()
    side = Background(server.base_url, shorts, model, stagger_s=0.03)
    spec.write_text("prepare:1:raise")
    try:
        for _ in range(10):
            failed = server.post("/remp/reshape", {"tp": 1, "pp": 1}, timeout=4 * TIMEOUT_S)
            assert failed.status_code == 500 and failed.json()["step"] == "prepare", failed.text
            time.sleep(0.1)
    finally:
        spec.write_text("")
    for got, want in zip(side.wait(300), reference, strict=True):
        assert got.error is None and got.output == want.output, got.error
    time.sleep(1.0)  # idle: SGLang's invariant checks run
    assert topology(server)["state"] == "serving"
    assert reshape(server, 1, 1)["new"] == {"dp": 1, "tp": 1, "pp": 1}


def test_reshapes_work_after_every_fault(faulty):
    """The plane renewed after the aborts, every rank in step: a full cycle with the
    cache carried, and a repeated prompt still hitting after it."""
    server, spec, jobs, reference, model = faulty
    server.generate_ids(PROMPT, 2)
    for tp, pp in ((2, 1), (1, 2), (1, 1), (2, 1)):
        if {k: topology(server)[k] for k in ("tp", "pp")} != {"tp": tp, "pp": pp}:
            report = reshape(server, tp, pp)
            assert report["new"] == {"dp": 1, "tp": tp, "pp": pp}
    out = server.generate(PROMPT, max_new_tokens=2)
    assert out["meta_info"]["cached_tokens"] >= len(PROMPT) - 1
    outcomes = run_concurrently(server.base_url, jobs, model)
    assert [o.output for o in outcomes] == [o.output for o in reference]


def test_a_slow_but_live_rank_is_waited_for(faulty):
    """A model build that takes 2.5 stall bounds (a GPU capturing CUDA graphs) while its
    heartbeat goes on: the other ranks wait for it and the reshape goes through."""
    server, spec, jobs, reference, model = faulty
    if topology(server)["tp"] != 2:
        reshape(server, 2, 1)
    status, body, old, layout = failing_reshape(server, spec, jobs, reference, model, 1, 1,
                                                "model", 0, f"delay:{2.5 * STALL_S}")
    assert (status, layout) == (200, {"dp": 1, "tp": 1, "pp": 1}), body
    assert body["phases"]["model_s"] >= 2.5 * STALL_S

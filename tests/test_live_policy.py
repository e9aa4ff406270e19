"""`--remp-policy auto` on a real server: it holds a prompt the replicas cannot hold,
merges them to serve it, splits back under short load, refuses what no layout holds,
can be paused, and shows every decision at GET /remp/policy.

One 2-rank server launched as two replicas (`--dp-size 2 --remp --max-total-tokens
512`, tiny Llama, float32): a replica holds 506-token prompts, a merged instance 1018.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from remp_checks import topology

from remp_sglang.testing.traffic import Job, run_job

pytestmark = pytest.mark.slow

SETTINGS = {"interval_s": 0.5, "window_s": 3.0, "horizon_s": 20.0, "min_dwell_s": 3.0,
            "max_hold_s": 0.5, "confirm": 2, "hold_timeout_s": 30.0}


def ids(n: int, seed: int) -> list[int]:
    return [5 + (seed * 31 + i * 7) % 250 for i in range(n)]


@pytest.fixture(scope="module")
def auto(tiny_llama_dir, sglang_server_factory, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("policy") / "llama"
    shutil.copytree(tiny_llama_dir, model_dir)
    server = sglang_server_factory(
        model_dir, tp=1, dp=2, max_total_tokens=512,
        extra_args=("--remp", "--remp-policy", "auto", "--remp-policy-config",
                    json.dumps(SETTINGS)))
    yield server, str(model_dir)
    server.shutdown()


def policy(server) -> dict:
    response = server.get("/remp/policy")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(server, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = policy(server)
        if predicate(state):
            return state
        time.sleep(0.3)
    raise AssertionError(f"policy never got there: {json.dumps(policy(server))[:2000]}")


def layout(server) -> tuple[int, int, int]:
    topo = topology(server)
    return topo["dp"], topo["tp"], topo["pp"]


def test_policy_lists_candidates_and_decides(auto):
    server, _ = auto
    state = wait_for(server, lambda s: s.get("candidates") and s.get("decisions"))
    caps = {tuple(c["layout"]): c["kv_capacity_per_replica"] for c in state["candidates"]}
    assert caps == {(2, 1, 1): 512, (1, 2, 1): 1024, (1, 1, 2): 1024}
    assert state["current"] == [2, 1, 1] and not state["paused"]
    assert state["decisions"][-1]["reason"]  # every decision says why


def test_long_prompt_is_held_then_served_after_a_merge(auto):
    """600 tokens do not fit a replica: instead of refusing it, the policy merges the
    replicas and the request completes, at its full length. Two more, sent at once, are
    held by both replicas (one each) and asked for more tokens than a merged instance
    allows after 990 prompt tokens (34; the front end admits up to the 1024-token
    context): SGLang's own limit applies once they are served (1023 - 990 - 1 = 32), on
    every rank of the merged instance alike."""
    server, model = auto
    assert layout(server) == (2, 1, 1)
    before = len(policy(server)["switches"])
    jobs = [Job("generate", tuple(ids(990, 10 + i)), "", 34) for i in range(2)]
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(run_job, server.base_url, j, model) for j in jobs]
        out = server.generate(ids(600, 1), 8)
        capped = [f.result() for f in pending]
    assert [o.error for o in capped] == [None, None]
    assert [len(o.output) for o in capped] == [32, 32]
    assert len(out["output_ids"]) == 8
    state = policy(server)
    switch = state["switches"][before]
    assert switch["old"] == [2, 1, 1] and switch["error"] is None
    assert switch["new"] in ([1, 1, 2], [1, 2, 1]) and switch["downtime_s"] > 0
    assert layout(server) == tuple(switch["new"])
    reasons = [d["reason"] for d in state["decisions"]]
    assert any("held request" in r for r in reasons)
    # the same prompt served again by a merged instance gives the same tokens
    assert server.generate(ids(600, 1), 8)["output_ids"] == out["output_ids"]


def test_short_load_splits_back_to_replicas(auto):
    """Many short requests at once: replicas serve them faster, so the policy splits
    (a split the live KV does not fit yet is refused, 409, and tried again after the
    dwell time); nothing fails meanwhile."""
    server, model = auto
    if layout(server) == (2, 1, 1):
        server.generate(ids(600, 2), 4)  # merge first
    assert layout(server) != (2, 1, 1)
    before = len(policy(server)["switches"])
    done = threading.Event()

    def load() -> list:
        outcomes, i = [], 0
        with ThreadPoolExecutor(12) as pool:
            while not done.is_set() and i < 3000:
                jobs = [Job("generate_stream", tuple(ids(20 + k % 16, 100 + i + k)), "", 24)
                        for k in range(24)]
                outcomes += pool.map(lambda j: run_job(server.base_url, j, model), jobs)
                i += 24
        return outcomes

    with ThreadPoolExecutor(1) as runner:
        future = runner.submit(load)
        try:
            state = wait_for(server, lambda s: any(
                x["new"] == [2, 1, 1] and x["error"] is None for x in s["switches"][before:]),
                timeout=90)
        finally:
            done.set()
        outcomes = future.result()
    assert outcomes and all(o.error is None for o in outcomes), \
        [o.error for o in outcomes if o.error][:3]
    back = next(x for x in state["switches"][before:] if x["error"] is None)
    assert back["new"] == [2, 1, 1]
    assert back["predicted_after"] > back["predicted_before"]
    assert layout(server) == (2, 1, 1)


def test_prompt_longer_than_any_layout_is_refused_at_once(auto):
    server, _ = auto
    before = policy(server)
    t = time.monotonic()
    response = server.post("/generate", {"input_ids": ids(1019, 3),
                                         "sampling_params": {"max_new_tokens": 2}})
    assert time.monotonic() - t < 10
    body = response.json() if response.headers.get("content-type", "").startswith(
        "application/json") else {}
    refused = response.status_code == 400 or \
        (body.get("meta_info") or {}).get("finish_reason", {}).get("type") == "abort"
    assert refused, response.text
    time.sleep(2 * SETTINGS["interval_s"] + 0.5)
    assert len(policy(server)["switches"]) == len(before["switches"])


def test_pause_and_resume(auto):
    server, _ = auto
    assert server.post("/remp/policy", {"paused": "yes"}).status_code == 400
    assert server.post("/remp/policy", {"paused": True, "x": 1}).status_code == 400
    assert server.post("/remp/policy", {"paused": True}).json() == {"paused": True}
    time.sleep(2 * SETTINGS["interval_s"] + 0.2)
    state = policy(server)
    assert state["paused"] and state["decisions"][-1]["reason"] == "paused"
    assert server.post("/remp/policy", {"paused": False}).json() == {"paused": False}
    wait_for(server, lambda s: s["decisions"][-1]["reason"] != "paused", timeout=10)

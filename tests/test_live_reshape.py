"""Live TP/PP reshapes of a real SGLang server launched with --remp on 2 ranks.

One server per model for the whole module. After every switch: the greedy output of
several prompts equals transformers' on the same weights (float32), a repeated prompt
hits the prefix cache at least as much as before, every cached KV row is bit-identical
(a layout-free digest, re-gathered across ranks, through a test hook), and everything
that reports the layout follows it. The checkpoint's weight files are deleted once the
server is up, so every reshape proves that weights move between ranks, not from disk.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from remp_checks import (
    NEW_TOKENS,
    check_greedy,
    digest,
    reshape,
    same_rows,
    topology,
    transformers_greedy,
)

pytestmark = pytest.mark.slow

# TP 2 -> 1 -> 2; TP1 PP2 <-> TP2 PP1; PP 1 <-> 2 (TP1 PP1 <-> TP1 PP2).
SEQUENCE = [(1, 1), (2, 1), (1, 2), (2, 1), (1, 2), (1, 1), (2, 1)]


def copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def drop_weights(model_dir: Path) -> None:
    files = list(model_dir.glob("*.safetensors"))
    assert files
    for f in files:
        f.unlink()


@pytest.fixture(scope="module")
def llama(tiny_llama_dir, sglang_server_factory, tmp_path_factory):
    model_dir = copy_model(tiny_llama_dir, tmp_path_factory.mktemp("remp") / "llama")
    reference = transformers_greedy(model_dir)
    # 2048 KV slots at TP 2: see CAPACITY for what each layout holds.
    server = sglang_server_factory(model_dir, tp=2, extra_args=("--remp",),
                                   env={"REMP_DEBUG_ROUTES": "1"}, max_total_tokens=2048)
    drop_weights(model_dir)
    yield server, reference
    server.shutdown()


def test_invalid_reshapes_are_rejected_and_serving_goes_on(llama):
    server, reference = llama
    cases = [
        ({"tp": "2"}, "integer"),
        ({"tp": True}, "integer"),
        ({"tp": 0}, ">= 1"),
        ({"tp": 2, "pp": 2}, "exceeds the 2 ranks"),
        ({"tp": 1, "pp": 1, "dp": 2}, "launch with --dp-size"),
        ({"tp": 1, "replicas": 2}, "unknown fields"),
        ([1, 2], "JSON object"),
    ]
    for body, reason in cases:
        response = server.post("/remp/reshape", body, timeout=60)
        assert response.status_code == 400, (body, response.text)
        assert reason in response.json()["error"], (body, response.json())
    same = server.post("/remp/reshape", {"tp": 2, "pp": 1}, timeout=60).json()
    assert same["unchanged"] and same["downtime_s"] == 0 and same["kv_bytes_moved"] == 0
    bad_json = server._session.post(server.base_url + "/remp/reshape", data="{not json",
                                    headers={"Content-Type": "application/json"}, timeout=60)
    assert bad_json.status_code == 400
    assert topology(server)["tp"] == 2
    check_greedy(server, reference)


def test_switch_sequence_keeps_cache_and_output(llama):
    server, reference = llama
    prompts, _ = reference
    check_greedy(server, reference)  # fills the radix cache
    launch_cpus, launch_threads = topology(server)["cpus"], topology(server)["threads"]
    for tp, pp in SEQUENCE:
        cached_before = server.generate(prompts[0], NEW_TOKENS)["meta_info"]["cached_tokens"]
        before = digest(server)
        old = topology(server)
        report = reshape(server, tp, pp)

        assert report["old"] == {"dp": 1, "tp": old["tp"], "pp": old["pp"]}
        assert report["new"] == {"dp": 1, "tp": tp, "pp": pp}
        assert report["cached_tokens_after"] == report["cached_tokens_before"] > 0
        # a grow moves the joining rank's weights before the pause (`precopy`)
        assert report["weight_bytes_moved"] + report["precopy"].get("weight_bytes", 0) > 0
        assert report["downtime_s"] > 0 and "transfer_s" in report["phases"]
        assert report["transport"] == "gloo"  # CPU pools move through gloo, on the host
        # the model was made before the pause (at launch, or kept when last left)
        assert report["model_skeleton"] is True, report["phases"]
        # In place: no rank ever held its old and new weights and pool side by side.
        mem = report["memory"]
        for rank, (a, b, peak, cap) in enumerate(zip(
                mem["before_bytes"], mem["after_bytes"], mem["peak_bytes"],
                mem["bound_bytes"], strict=True)):
            assert max(a, b) <= peak <= cap, (rank, mem)
            assert a == 0 or b == 0 or peak - mem["staging_bytes"] < a + b, (rank, mem)
        switch = f"{old['tp']}x{old['pp']}->{tp}x{pp}"
        after = digest(server)
        # every active rank holds one model: the one it replaced was freed
        assert before.pop("model_runners") == after.pop("model_runners") == ["1"], switch
        assert before.pop("skeleton_param_bytes") == after.pop("skeleton_param_bytes") == \
            ["0"], switch
        assert same_rows(before, after), f"KV rows changed in {switch}"

        topo = topology(server)
        assert (topo["tp"], topo["pp"], topo["state"]) == (tp, pp, "serving")
        assert topo["kv_capacity_tokens"] == report["kv_capacity_tokens"] == CAPACITY[(tp, pp)]
        assert topo["active_ranks"] == list(range(tp * pp))
        info = server.server_info()
        assert (info["tp_size"], info["pp_size"]) == (tp, pp)
        # An active rank may run on the cores of the ranks parked beside it; its OpenMP
        # team keeps its launch size (growing it stalls the next steps).
        assert topo["threads"] == launch_threads
        if tp * pp == 1:
            assert set(topo["cpus"]) > set(launch_cpus)
        else:
            assert topo["cpus"] == launch_cpus

        response = server.generate(prompts[0], NEW_TOKENS)
        assert response["meta_info"]["cached_tokens"] >= cached_before
        check_greedy(server, reference)


# Each rank's launch budget is its weights (395,520 B at TP 2) plus 2048 slots of 512 B
# (one KV head of 4 layers, float32). TP 1 holds 788,736 B of weights and 1,024 B per
# slot: (395,520 + 2048 x 512 - 788,736) / 1024 = 640 slots. TP1 PP2: rank 0 holds the
# embedding and an lm_head (492,544 B), 512 B per slot: 1858.
CAPACITY = {(2, 1): 2048, (1, 2): 1858, (1, 1): 640}


def test_plan_is_a_dry_run_that_predicts_the_reshape(llama):
    """POST /remp/plan changes nothing and predicts the bytes the reshape then moves,
    exactly (the same planner), and a downtime once a reshape has been measured."""
    server, reference = llama
    check_greedy(server, reference)
    for n, (tp, pp) in enumerate(((1, 1), (2, 1), (1, 2), (2, 1))):
        before, topo = digest(server), topology(server)
        response = server.post("/remp/plan", {"tp": tp, "pp": pp}, timeout=120)
        assert response.status_code == 200, response.text
        planned = response.json()
        assert planned["new"] == {"dp": 1, "tp": tp, "pp": pp} and not planned["refused"], planned
        assert planned["old"] == {"dp": 1, "tp": topo["tp"], "pp": topo["pp"]}
        assert planned["kv_capacity_tokens"] == CAPACITY[(tp, pp)]
        assert planned["cached_tokens_evicted"] == 0
        assert len(planned["per_rank"]) == 2 and planned["max_rank_bytes"] > 0
        if n:
            assert planned["predicted_downtime_s"] > 0, planned
        assert digest(server) == before
        assert topology(server)["kv_capacity_tokens"] == topo["kv_capacity_tokens"]
        response = server.post("/remp/reshape", {"tp": tp, "pp": pp, "precopy": False},
                               timeout=600)  # the plan's bytes are stop-and-copy's
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["predicted"]["kv_bytes"] == report["kv_bytes_moved"] == planned["kv_bytes"]
        assert report["predicted"]["weight_bytes"] == report["weight_bytes_moved"] \
            == planned["weight_bytes"]
        assert report["max_rank_bytes"] == planned["max_rank_bytes"]
    for body, status in (({"tp": 3}, 400), ({"tp": 1, "pp": 3}, 400)):
        assert server.post("/remp/plan", body, timeout=60).status_code == status
    check_greedy(server, reference)


def test_capacity_and_prompt_limits_follow_the_layout(llama):
    server, reference = llama
    if topology(server)["tp"] != 2:
        reshape(server, 2, 1)
    long_prompt = [5 + (i % 300) for i in range(700)]
    assert len(server.generate(long_prompt, 1)["output_ids"]) == 1  # fits TP 2's slots
    for (tp, pp), capacity in ((1, 1), 640), ((2, 1), 2048), ((1, 1), 640):
        # Cached KV beyond the new capacity is evicted (LRU), never refused.
        report = reshape(server, tp, pp)
        assert report["kv_capacity_tokens"] == capacity
        assert report["cached_tokens_after"] <= capacity
        assert topology(server)["kv_capacity_tokens"] == capacity
        info = server.server_info()
        assert info["max_total_num_tokens"] == capacity
        assert info["max_req_input_len"] == report["max_req_input_len"] < capacity
        response = server.post("/generate", {"input_ids": long_prompt,
                                             "sampling_params": {"max_new_tokens": 1}})
        if capacity < len(long_prompt):  # SGLang's own length check, against the new limit
            assert "exceeds the maximum allowed length" in response.text, response.text
        else:
            assert response.status_code == 200, response.text
        assert len(server.generate(long_prompt[:300], 1)["output_ids"]) == 1
        check_greedy(server, reference)
    assert report["cached_tokens_evicted"] > 0


# Long enough (seconds on 2 cores) that it is still running when the reshape comes.
LONG_TOKENS = 300


def test_reshape_does_not_wait_for_running_requests_and_a_second_gets_409(llama):
    server, reference = llama
    prompts, outputs = reference
    start_tp = topology(server)["tp"]
    target = (1, 1) if start_tp == 2 else (2, 1)
    undisturbed = server.generate_ids(prompts[1], LONG_TOKENS)
    results: dict[str, object] = {}

    def long_generation() -> None:
        t = time.perf_counter()
        results["long"] = server.generate_ids(prompts[1], LONG_TOKENS)
        results["long_s"] = time.perf_counter() - t

    def first_reshape() -> None:
        results["reshape"] = server.post("/remp/reshape", {"tp": target[0], "pp": target[1]},
                                         timeout=600)

    threads = [threading.Thread(target=long_generation)]
    threads[0].start()
    time.sleep(0.5)
    threads.append(threading.Thread(target=first_reshape))
    threads.append(threading.Thread(target=lambda: results.update(
        second=server.post("/remp/reshape", {"tp": target[0], "pp": target[1]}, timeout=600))))
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=600)
    codes = sorted([results["reshape"].status_code, results["second"].status_code])
    assert codes == [200, 409], (results["reshape"].text, results["second"].text)
    report = next(r for r in (results["reshape"], results["second"])
                  if r.status_code == 200).json()
    assert report["requests_carried"] == 1  # the long generation moved, it did not drain
    assert report["request_wait_s"] < results["long_s"]
    assert results["long"] == undisturbed
    for ids, want in zip(prompts, outputs, strict=True):
        assert server.generate_ids(ids, NEW_TOKENS) == want
    assert topology(server)["tp"] == target[0]


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2_dir, sglang_server_factory, tmp_path_factory, llama):
    llama[0].shutdown()  # one server at a time on 2 cores
    model_dir = copy_model(tiny_qwen2_dir, tmp_path_factory.mktemp("remp") / "qwen2")
    reference = transformers_greedy(model_dir)
    server = sglang_server_factory(model_dir, tp=2, extra_args=("--remp", "--remp-initial-tp",
                                                                 "1"))
    drop_weights(model_dir)
    yield server, reference
    server.shutdown()


def test_qwen2_starts_small_and_reshapes(qwen2):
    """Qwen2 (QKV bias, lm_head on the last stage only), launched on 2 ranks at TP 1.

    Compared with transformers: these tiny Qwen2 models match it at TP 1 and TP 2 through
    stock SGLang here (the design note's TP 2 mismatch did not reproduce), so this is the
    stricter comparison.
    """
    server, reference = qwen2
    topo = topology(server)
    assert (topo["tp"], topo["pp"], topo["active_ranks"]) == (1, 1, [0])
    check_greedy(server, reference)
    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        report = reshape(server, tp, pp)
        assert report["cached_tokens_after"] == report["cached_tokens_before"] > 0
        check_greedy(server, reference)

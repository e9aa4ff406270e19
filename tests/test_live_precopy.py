"""Pre-copy on a live server (`remp_sglang/integration/precopy.py`): TP 1 -> 2 copies the
weights and the cached KV to the joining rank while TP 1 serves; the pause moves only the
slots allocated since. One 2-rank server for the module (tiny Llama, float32, greedy),
launched at TP 2 and started on TP 1, with the test-only fault hook (an empty spec
injects nothing)."""

from __future__ import annotations

import time

import pytest
from remp_checks import digest, model_and_fault_file, reshape, same_rows, topology

from remp_sglang.testing.traffic import KINDS, Background, make_jobs, run_concurrently

pytestmark = pytest.mark.slow

ROW_TP2 = 512  # KV bytes of one token on one rank at TP 2 (half the heads, every layer)
TEXTS = ("Tell me a story about a fox.", "List three colours", "def main():",
         "The weather today is")


def ids(n: int, seed: int) -> list[int]:
    return [5 + (seed * 37 + i * 11) % 250 for i in range(n)]


@pytest.fixture(scope="module")
def served(tiny_llama_dir, sglang_server_factory, tmp_path_factory):
    model_dir, spec = model_and_fault_file(tiny_llama_dir, tmp_path_factory.mktemp("pre"))
    server = sglang_server_factory(
        model_dir, tp=2, extra_args=("--remp", "--remp-initial-tp", "1"),
        max_total_tokens=4096,
        env={"REMP_FAULT_INJECT": f"@{spec}", "REMP_DEBUG_ROUTES": "1"})
    yield server, spec, str(model_dir)
    server.shutdown()


def to(server, tp: int, pp: int, **body) -> dict:
    response = server.post("/remp/reshape", {"tp": tp, "pp": pp, **body}, timeout=600)
    assert response.status_code == 200, response.text + server.log_tail(80)
    return response.json()


def at_tp1(server) -> None:
    """TP 1 with an empty cache."""
    if topology(server)["tp"] != 1:
        reshape(server, 1, 1)
    server.flush_cache()


def fill(server, n: int, seed: int) -> list[list[int]]:
    """Cache `n` prompts of 200 tokens (prefixes the reshape must keep)."""
    prompts = [ids(200, seed + i) for i in range(n)]
    for prompt in prompts:
        server.generate(prompt, 1)
    return prompts


def test_grow_under_load_copies_before_the_pause(served):
    server, _, model = served
    at_tp1(server)
    jobs = make_jobs([ids(n, 50 + n) for n in (10, 40, 90, 25)], TEXTS, (80, 50, 120, 60),
                     KINDS)
    reference = run_concurrently(server.base_url, jobs, model)
    server.flush_cache()
    prompts = fill(server, 6, seed=1)
    continued = [server.generate(p, 8)["output_ids"] for p in prompts]  # at TP 1
    traffic = Background(server.base_url, jobs, model, stagger_s=0.05)
    time.sleep(0.4)
    report = to(server, 2, 1)
    outcomes = traffic.wait()
    for got, want in zip(outcomes, reference, strict=True):
        assert got.error is None and got.output == want.output, (got.job.kind, got.error)
    pre = report["precopy"]
    assert pre["used"] is True, report
    # the joining rank received its weights and the cached rows before the pause ...
    assert pre["weight_bytes"] > 0 and pre["bytes_received"][0] == 0
    assert pre["snapshot_slots"] >= 6 * 199
    assert pre["kv_bytes"] == pre["snapshot_slots"] * ROW_TP2  # each row's half, once
    # ... so the pause moved no weights to it, and only the rows written since
    assert report["weight_bytes_moved"] == 0, report
    assert report["kv_bytes_moved"] < pre["kv_bytes"] / 4, report
    assert 0 < pre["dirty_slots"] < report["live_kv_slots"], report
    # the prefixes still hit, and what they continue into is what TP 1 produced
    for prompt, want in zip(prompts, continued, strict=True):
        out = server.generate(prompt, 8)
        assert out["meta_info"]["cached_tokens"] >= 199
        assert out["output_ids"] == want


def test_idle_grow_copies_every_cached_row_bit_exact(served):
    server, _, _ = served
    at_tp1(server)
    fill(server, 6, seed=10)
    before = digest(server)
    planned = server.post("/remp/plan", {"tp": 2, "pp": 1}, timeout=120).json()
    assert planned["precopy"]["possible"] is True and planned["precopy"]["reason"] is None
    report = to(server, 2, 1)
    pre = report["precopy"]
    assert pre["used"] is True and pre["snapshot_slots"] == report["live_kv_slots"]
    assert report["kv_bytes_moved"] == pre["dirty_slots"] * ROW_TP2  # nothing ran: ~0
    # both phases together move what the plan predicts for stop-and-copy
    assert pre["kv_bytes"] + report["kv_bytes_moved"] == planned["kv_bytes"]
    assert pre["weight_bytes"] + report["weight_bytes_moved"] == planned["weight_bytes"]
    assert report["max_rank_bytes"] < planned["max_rank_bytes"]
    # the plan's pause: nothing to the joining rank; the report's adds the dirty rows
    assert planned["precopy"]["max_rank_bytes"] == 0
    assert report["max_rank_bytes"] == report["kv_bytes_moved"]
    assert same_rows(before, digest(server))
    shrink = server.post("/remp/plan", {"tp": 1, "pp": 1}, timeout=120).json()
    assert shrink["precopy"]["possible"] is False


def test_stop_and_copy_when_asked_and_when_nothing_joins(served):
    server, _, _ = served
    at_tp1(server)
    fill(server, 6, seed=20)
    plain = to(server, 2, 1, precopy=False)
    assert plain["precopy"] == {"used": False, "reason": "not asked for"}
    assert plain["weight_bytes_moved"] > 0 and plain["kv_bytes_moved"] >= 6 * 199 * ROW_TP2
    shrink = reshape(server, 1, 1)  # every rank that stays already serves
    assert shrink["precopy"]["used"] is False
    assert "no parked rank joins" in shrink["precopy"]["reason"]


def test_bad_precopy_value_is_refused_and_the_server_serves_on(served):
    server, _, _ = served
    response = server.post("/remp/reshape", {"tp": 2, "pp": 1, "precopy": "yes"}, timeout=60)
    assert response.status_code == 400, response.text
    assert "precopy must be true or false" in response.json()["error"]
    assert topology(server)["state"] == "serving"
    assert len(server.generate(ids(12, 3), 4)["output_ids"]) == 4


def test_failed_precopy_falls_back_to_stop_and_copy(served):
    server, spec, model = served
    at_tp1(server)
    prompts = fill(server, 4, seed=40)
    before = digest(server)
    spec.write_text("precopy:1:raise")  # the joining rank fails its copy
    try:
        report = to(server, 2, 1)
    finally:
        spec.write_text("")
    assert report["precopy"]["used"] is False
    assert "injected fault" in report["precopy"]["error"]
    assert report["weight_bytes_moved"] > 0  # everything moved in the pause
    assert same_rows(before, digest(server))
    assert server.generate(prompts[0], 1)["meta_info"]["cached_tokens"] >= 199

"""`--remp-cache-aware` on a 2-replica server: questions about one document go to the
replica that cached it (round-robin would alternate), and after a merge and a split the
index still points at replicas that hold the prefix (every replica, after the copy)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

DOC = [5 + (i * 13) % 250 for i in range(128)]


def ask(server, suffix: int) -> dict:
    meta = server.generate(DOC + [7 + suffix] * 8, 2)["meta_info"]
    return {"replica": meta.get("dp_rank"), "cached": meta["cached_tokens"]}


def test_questions_follow_their_document(tiny_llama_dir, sglang_server_factory):
    server = sglang_server_factory(tiny_llama_dir, tp=1, dp=2,
                                   extra_args=("--remp", "--remp-cache-aware"))
    first = ask(server, 0)
    later = [ask(server, s) for s in range(1, 7)]
    assert {r["replica"] for r in later} == {first["replica"]}  # round-robin alternates
    assert all(r["cached"] >= len(DOC) for r in later)
    for body in ({"dp": 1, "tp": 2}, {"dp": 2, "tp": 1}):
        response = server.post("/remp/reshape", body, timeout=600)
        assert response.status_code == 200, response.text
    after = [ask(server, s) for s in range(7, 11)]
    assert all(r["cached"] >= len(DOC) for r in after), after
    server.shutdown()


def test_load_aware_dispatch_never_feeds_a_merged_replica(tiny_llama_dir,
                                                           sglang_server_factory):
    """SGLang's `total_requests` method picks the least loaded of ALL launch replicas;
    after a merge, replica 1's first rank serves inside replica 0 and reads no requests
    of its own: every request must still go to replica 0 (and come back)."""
    server = sglang_server_factory(tiny_llama_dir, tp=1, dp=2, extra_args=(
        "--remp", "--load-balance-method", "total_requests"))
    response = server.post("/remp/reshape", {"dp": 1, "tp": 2}, timeout=600)
    assert response.status_code == 200, response.text
    for i in range(6):  # a request sent to the merged-away replica would never come back
        out = server.post("/generate", {"input_ids": DOC[:20] + [i], "sampling_params": {
            "max_new_tokens": 2, "temperature": 0.0, "ignore_eos": True}}, timeout=120)
        assert out.status_code == 200, out.text
        assert out.json()["meta_info"].get("dp_rank") in (0, None)
    server.shutdown()

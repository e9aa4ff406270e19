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

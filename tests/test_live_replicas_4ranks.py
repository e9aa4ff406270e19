"""Replicas on 4 launched ranks: DP 4 -> DP 2 x TP 2 -> TP 4 -> DP 2 x PP 2 -> DP 4, and
back the other way, live. GQA model (8 query heads, 4 KV heads: TP 4 splits the KV heads
on CPU too). After every switch: transformers' greedy output from every replica, and a
repeated prompt hits the prefix cache wherever the data-parallel controller sends it.
"""

from __future__ import annotations

import pytest
from remp_checks import check_greedy, topology, transformers_greedy

from remp_sglang.tiny_model import make_tiny_model

pytestmark = pytest.mark.slow

FORWARD = [(2, 2, 1), (1, 4, 1), (2, 1, 2), (4, 1, 1)]  # (dp, tp, pp) from DP 4
BACK = [(2, 1, 2), (1, 4, 1), (2, 2, 1), (4, 1, 1)]


@pytest.fixture(scope="module")
def replicas4(sglang_server_factory, tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("gqa8x4-dp"), "llama", heads=8,
                                kv_heads=4)
    reference = transformers_greedy(model_dir)
    server = sglang_server_factory(model_dir, tp=1, dp=4, extra_args=("--remp",))
    yield server, reference
    server.shutdown()


def test_every_mix_of_replicas_and_widths(replicas4):
    server, reference = replicas4
    prompts, _ = reference
    for _ in range(4):  # round robin, 3 prompts over 4 replicas: each computes each once
        check_greedy(server, reference)
    for dp, tp, pp in FORWARD + BACK:
        response = server.post("/remp/reshape", {"dp": dp, "tp": tp, "pp": pp}, timeout=600)
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["new"] == {"dp": dp, "tp": tp, "pp": pp}
        topo = topology(server)
        assert (topo["dp"], topo["tp"], topo["pp"]) == (dp, tp, pp)
        # before anything runs here: each replica already holds every cached prompt
        hits = [server.generate(ids, 2)["meta_info"]["cached_tokens"]
                for ids in prompts for _ in range(dp)]
        assert all(h >= len(ids) - 1 for h, ids in zip(
            hits, [ids for ids in prompts for _ in range(dp)], strict=True)), hits
        for _ in range(dp):  # round robin: each replica answers each prompt once
            check_greedy(server, reference)

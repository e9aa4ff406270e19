"""Live reshapes on 4 launched ranks: TP 4 -> 2, TP 2 x PP 2, back to TP 4, and TP 1.

GQA model: 8 query heads, 4 KV heads. On GPU, TP above the KV-head count replicates KV
heads; on CPU, SGLang 0.5.23 pads heads instead (`adjust_config_with_unaligned_cpu_tp`),
so a 4-rank CPU server cannot show replication: remp refuses such layouts on CPU, and
replicated sources are covered by the engine's gloo tests (test_engine.py) instead.
Same checks as the 2-rank module: transformers' greedy output, the prefix cache kept,
and bit-identical KV rows.
"""

from __future__ import annotations

import pytest
from remp_checks import (
    check_greedy,
    digest,
    reshape,
    same_rows,
    topology,
    transformers_greedy,
)

from remp_sglang.tiny_model import make_tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server4(sglang_server_factory, tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("gqa8x4"), "llama", heads=8,
                                kv_heads=4)
    reference = transformers_greedy(model_dir)
    server = sglang_server_factory(model_dir, tp=4, extra_args=("--remp",),
                                   env={"REMP_DEBUG_ROUTES": "1"})
    yield server, reference
    server.shutdown()


def test_tp4_to_tp2_and_tp2pp2(server4):
    server, reference = server4
    check_greedy(server, reference)
    response = server.post("/remp/reshape", {"tp": 3, "pp": 1}, timeout=60)
    assert response.status_code == 400 and "attention heads" in response.json()["error"]
    for tp, pp in ((2, 1), (2, 2), (4, 1), (1, 1)):
        before = digest(server)
        report = reshape(server, tp, pp)
        assert report["cached_tokens_after"] == report["cached_tokens_before"] > 0
        assert same_rows(before, digest(server))
        topo = topology(server)
        assert (topo["tp"], topo["pp"], topo["active_ranks"]) == (tp, pp, list(range(tp * pp)))
        check_greedy(server, reference)

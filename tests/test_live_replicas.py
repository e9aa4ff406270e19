"""Data-parallel replicas merged into one wider instance and split back, live.

One 2-rank server launched as two replicas (`--dp-size 2 --tp 1 --remp`, tiny Llama,
float32, greedy), fed by SGLang's own data-parallel controller. Reshapes go DP 2 -> TP 2
-> DP 2 -> PP 2 -> DP 2: every output equals an undisturbed run's, cached prompts still
hit wherever the dispatcher sends them, and requests in flight straddle merges and
splits with exact outputs.
"""

from __future__ import annotations

import shutil
import time

import pytest
from remp_checks import topology

from remp_sglang.testing.traffic import KINDS, Background, make_jobs, run_concurrently

pytestmark = pytest.mark.slow

CYCLE = [(1, 2, 1), (2, 1, 1), (1, 1, 2), (2, 1, 1)]  # (dp, tp, pp)
TEXTS = ("Tell me a story about a fox.", "List three colours", "def main():",
         "The weather today is", "Once upon a time", "Q: what is 2+2? A:")


def ids(n: int, seed: int) -> list[int]:
    return [5 + (seed * 31 + i * 7) % 250 for i in range(n)]


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir, sglang_server_factory, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("replicas") / "llama"
    shutil.copytree(tiny_llama_dir, model_dir)
    server = sglang_server_factory(model_dir, tp=1, dp=2, extra_args=("--remp",),
                                   max_total_tokens=2048)
    yield server, str(model_dir)
    server.shutdown()


def to(server, dp: int, tp: int, pp: int) -> dict:
    response = server.post("/remp/reshape", {"dp": dp, "tp": tp, "pp": pp}, timeout=600)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["new"] == {"dp": dp, "tp": tp, "pp": pp}
    return report


def test_merge_and_split_keep_outputs_and_cache(replicas):
    server, _ = replicas
    assert topology(server)["dp"] == 2 and server.server_info()["dp_size"] == 2
    prompts = [ids(24 + i, i) for i in range(4)]
    want = [server.generate(p, 8)["output_ids"] for p in prompts]
    seen_replicas = set()
    for dp, tp, pp in CYCLE:
        report = to(server, dp, tp, pp)
        assert report["cached_tokens_after"] >= 24  # a merge keeps the union, a split copies
        assert report["model_skeleton"] is True  # each replica's world's model, made before
        topo = topology(server)
        assert (topo["dp"], topo["tp"], topo["pp"]) == (dp, tp, pp)
        assert server.server_info()["dp_size"] == dp
        for prompt, expected in zip(prompts, want, strict=True):
            out = server.generate(prompt, 8)
            assert out["output_ids"] == expected, (dp, tp, pp)
            # every replica holds every cached prompt: a repeat hits wherever it lands
            assert out["meta_info"]["cached_tokens"] >= len(prompt) - 1, (dp, tp, pp)
            seen_replicas.add(out["meta_info"].get("dp_rank"))
    assert seen_replicas >= {0, 1}  # both replicas served after the splits


def test_requests_straddle_merges_and_splits(replicas):
    server, model = replicas
    if topology(server)["dp"] != 2:
        to(server, 2, 1, 1)
    lengths = (60, 30, 50, 80, 40, 70)
    jobs = make_jobs([ids(n, 40 + s) for s, n in enumerate((8, 30, 60, 16, 44, 12))], TEXTS,
                     lengths, KINDS)
    reference = run_concurrently(server.base_url, jobs, model)
    assert all(o.error is None for o in reference), [o.error for o in reference]
    traffic = Background(server.base_url, jobs, model, stagger_s=0.05)
    time.sleep(0.5)
    carried = []
    for dp, tp, pp in CYCLE:
        report = to(server, dp, tp, pp)
        carried.append(report["requests_carried"])
        time.sleep(0.3)
    outcomes = traffic.wait()
    for got, expected in zip(outcomes, reference, strict=True):
        assert got.error is None, (got.job.kind, got.error)
        assert got.output == expected.output, (got.job.kind, got.output, expected.output)
    print("requests carried per switch", carried)
    assert sum(carried) > 0


def test_layouts_the_replicas_cannot_take_are_refused(replicas):
    server, _ = replicas
    before = topology(server)
    for body, reason in (({"dp": 2, "tp": 2}, "exceeds the 2 ranks"),
                         ({"dp": 0}, ">= 1"), ({"dp": "2"}, "integer")):
        response = server.post("/remp/reshape", body, timeout=60)
        assert response.status_code == 400 and reason in response.json()["error"], body
    after = topology(server)
    assert (after["dp"], after["tp"], after["pp"]) == (before["dp"], before["tp"], before["pp"])


def test_a_split_deals_out_running_requests_no_single_replica_holds(replicas):
    """Three running requests pin about 2,300 KV slots, more than one replica's 2,048:
    a split sends each one's KV to the replica that goes on with it and outputs stay
    exact (copying all of it to every replica, as splits did, was refused with 409)."""
    server, model = replicas
    to(server, 1, 2, 1)
    jobs = make_jobs([ids(700, 90 + s) for s in range(3)], TEXTS, (150,), ("generate_stream",))
    reference = run_concurrently(server.base_url, jobs, model)
    assert all(o.error is None for o in reference), [o.error for o in reference]
    traffic = Background(server.base_url, jobs, model)
    time.sleep(0.8)  # all three prefilled (their prompts are cached) and decoding
    report = to(server, 2, 1, 1)
    outcomes = traffic.wait()
    assert report["requests_carried"] == 3 and report["requests_decoding"] == 3, report
    for got, expected in zip(outcomes, reference, strict=True):
        assert got.error is None, got.error
        assert got.output == expected.output

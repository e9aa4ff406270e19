"""The automatic policy's pure decision and the step-time model, on synthetic load
sequences (no server): bursts of long prompts, a return to short ones, noise that must
not trigger a switch, a request no layout holds, dwell and hysteresis, pausing."""

from __future__ import annotations

import itertools

import pytest

from remp_sglang.perf import Hardware, StepModel
from remp_sglang.policy import (
    Candidate,
    LoadSample,
    Policy,
    PolicyConfig,
    Req,
    decide,
    estimate_demand,
    goodput,
)
from remp_sglang.topology import ModelShape, Topology
from remp_sglang.weights import DenseDecoder

TINY = DenseDecoder(ModelShape(4, 4, 2, 16, 4), 64, 128, 384, lm_head_on_every_stage=True)
# Overhead-dominated, as the CPU ranks are: a replica's step costs about the same at any
# batch, collectives and hand-offs cost milliseconds.
CPU = Hardware("cpu-like", flops=5e9, mem_bw=5e9, link_bw=1e9, link_latency_s=0.004,
               step_overhead_s=0.01)
MODEL = StepModel(TINY, CPU)
DP2, TP2, PP2 = (2, 1, 1), (1, 2, 1), (1, 1, 2)
CANDIDATES = [Candidate(Topology(1, 1, 2, 2), 512, 506),
              Candidate(Topology(2, 1, 2, 1), 1024, 1018),
              Candidate(Topology(1, 2, 2, 1), 1024, 1018)]
FAST = PolicyConfig(interval_s=1, window_s=6, min_dwell_s=10, confirm=2, max_hold_s=3)


def short(n: int, seed: int = 0) -> tuple[Req, ...]:
    return tuple(Req(16 + (seed + i * 7) % 24, 24) for i in range(n))


def long(n: int) -> tuple[Req, ...]:
    return tuple(Req(600 + 40 * (i % 3), 8) for i in range(n))


class Server:
    """Drives a `Policy` one second at a time, switching when it says so."""

    def __init__(self, start: tuple[int, int, int], config: PolicyConfig = FAST) -> None:
        self.policy = Policy(CANDIDATES, MODEL, config, current=start)
        self.t = 0.0
        self.layouts = [start]

    def tick(self, arrived=(), waiting=(), held=(), held_wait_s=0.0, generated=0):
        self.t += 1.0
        self.policy.observe(LoadSample(self.t, self.policy.current, arrived=arrived,
                                       waiting=waiting, held=held, held_wait_s=held_wait_s,
                                       running=len(waiting), generated=generated))
        decision = self.policy.decide()
        if decision.switch:
            self.policy.switched(decision, downtime_s=0.25)
            self.layouts.append(decision.target)
        return decision


def test_step_model_orders_layouts_as_the_cpu_measured():
    """Short, saturating decode: replicas beat pipeline stages beat tensor parallelism
    (bench/results/dp_vs_tp-cpu.txt: 342 / 193 / 132 tokens/s)."""
    rate = {}
    for c in CANDIDATES:
        batch = 4 if c.topo.dp == 2 else 8  # 8 requests in flight
        rate[c.layout] = c.topo.dp * batch / MODEL.decode_period(c.topo, batch, batch * 60)
    assert rate[DP2] > rate[PP2] > rate[TP2]
    # periods grow with the batch and the context; prefills with their length
    topo = Topology(1, 1, 2, 2)
    assert MODEL.decode_period(topo, 8, 800) >= MODEL.decode_period(topo, 1, 100) > 0
    assert MODEL.prefill_time(topo, 600) > MODEL.prefill_time(topo, 60) > 0
    assert MODEL.prefill_time(topo, 600, cached=0) > MODEL.prefill_time(topo, 60, cached=540)


def test_compute_bound_step_model_splits_work_over_tp():
    gpu = StepModel(TINY, Hardware("gpu-like", 1e9, 1e15, 1e15, 0.0, 0.0))
    one, two = Topology(1, 1, 2), Topology(2, 1, 2)
    assert gpu.prefill_time(two, 512) == pytest.approx(gpu.prefill_time(one, 512) / 2, rel=0.01)


def test_goodput_leaves_out_what_a_layout_cannot_hold():
    demand = estimate_demand([LoadSample(0, DP2), LoadSample(5, DP2, arrived=long(5))], 1018)
    dp2, tp2 = CANDIDATES[0], CANDIDATES[1]
    assert goodput(dp2, demand, MODEL, 30)[0] == 0.0
    assert goodput(tp2, demand, MODEL, 30)[0] > 0.0


def test_a_burst_of_long_prompts_merges_and_short_load_splits_back():
    server = Server(DP2)
    for _ in range(12):  # saturating short load: replicas stay
        assert not server.tick(arrived=short(20), waiting=short(30), generated=300).switch
    waited = 0.0
    for _ in range(8):  # long prompts arrive; DP2 must hold them
        waited += 1.0
        server.tick(arrived=long(2), held=long(4), held_wait_s=waited)
        if server.policy.current != DP2:
            break
    assert server.policy.current in (PP2, TP2)
    reason = server.policy.decisions[-1].reason
    assert "held request" in reason or "predicts" in reason
    for _ in range(40):  # back to saturating short load: split again
        server.tick(arrived=short(40), waiting=short(60), generated=400)
    assert server.policy.current == DP2
    assert server.layouts[0] == DP2 and server.layouts[-1] == DP2 and len(server.layouts) == 3
    # the switch back waited for the dwell time and the confirmations
    back = server.policy.switches[-1]
    assert back.t - server.policy.switches[0].t >= FAST.min_dwell_s


def test_forced_switch_picks_the_fastest_layout_that_holds_them():
    server = Server(DP2)
    decision = server.tick(arrived=long(1), held=long(1), held_wait_s=5.0)
    assert decision.switch and decision.target == PP2  # PP 2 prefills faster than TP 2 here
    assert "held" in decision.reason


def test_noise_does_not_trigger_a_switch():
    """Short load whose rate swings by a factor two every second: from the replicas it
    never moves; from a wider layout it moves once, to the replicas (they answer the
    requests in flight sooner), and never back."""
    for start in (DP2, PP2, TP2):
        server = Server(start)
        for i in range(120):
            n = 3 if i % 2 else 6  # light load: every layout serves it
            server.tick(arrived=short(n, i), waiting=short(1, i), generated=24 * n)
        want = [start] if start == DP2 else [start, DP2]
        assert server.layouts == want, server.policy.decisions[-1].reason


def test_alternating_bursts_never_flap_faster_than_the_dwell():
    server = Server(DP2)
    for i in range(120):
        if (i // 4) % 2:
            server.tick(arrived=long(2), held=long(3), held_wait_s=4.0)
        else:
            server.tick(arrived=short(40), waiting=short(60), generated=400)
    times = [s.t for s in server.policy.switches]
    assert times, "some switch was expected"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= FAST.max_hold_s for g in gaps)
    # a switch back to the replicas needs the dwell time after the previous one
    for prev, cur in itertools.pairwise(server.policy.switches):
        if cur.new == DP2:
            assert cur.t - prev.t >= FAST.min_dwell_s


def test_a_request_longer_than_any_layout_is_refused_not_chased():
    server = Server(DP2)
    for _ in range(20):
        decision = server.tick(arrived=(Req(5000, 8),), held=(), generated=0)
    assert server.layouts == [DP2]
    assert "longer than any layout" in decision.reason
    assert decision.demand["unservable"] >= 1


def test_a_paused_policy_decides_nothing():
    server = Server(DP2)
    server.policy.paused = True
    for _ in range(10):
        decision = server.tick(arrived=long(2), held=long(3), held_wait_s=10.0)
        assert not decision.switch and decision.reason == "paused"
    server.policy.paused = False
    assert server.tick(arrived=long(2), held=long(3), held_wait_s=10.0).switch


def test_the_pause_must_pay_for_itself():
    """A small predicted gain over the horizon does not pay a long pause."""
    samples = [LoadSample(0, DP2), LoadSample(6, PP2, arrived=short(240), waiting=short(60),
                                                  generated=2800)]
    cheap = decide(samples, PP2, CANDIDATES, MODEL, lambda a, b: 0.2, FAST, 100.0, (DP2, 5))
    dear = decide(samples, PP2, CANDIDATES, MODEL, lambda a, b: 1e4, FAST, 100.0, (DP2, 5))
    assert cheap.switch and cheap.target == DP2
    assert not dear.switch and "does not pay" in dear.reason


def test_switch_records_predicted_and_observed_goodput():
    server = Server(PP2)
    for _ in range(30):
        server.tick(arrived=short(40), waiting=short(60), generated=250)
    assert server.policy.current == DP2
    (switch,) = server.policy.switches
    assert switch.predicted_after > switch.predicted_before > 0
    assert switch.observed_before == pytest.approx(250, rel=0.01)
    assert switch.observed_after == pytest.approx(250, rel=0.01)
    data = server.policy.to_json()
    assert data["switches"][0]["new"] == list(DP2) and data["decisions"]


@pytest.mark.parametrize("bad", [{"interval_s": 0}, {"confirm": 0}, {"min_gain": -1},
                                 {"nope": 1}, {"candidates": [[1, 2]]},
                                 {"hardware": "fast"}])
def test_policy_config_rejects_bad_settings(bad):
    with pytest.raises((ValueError, TypeError)):
        PolicyConfig.from_dict(bad)


def test_policy_config_reads_candidates():
    config = PolicyConfig.from_dict({"candidates": [[2, 1, 1], [1, 2, 1]], "confirm": 3})
    assert config.candidates == (DP2, TP2) and config.confirm == 3


def test_gain_never_picks_a_layout_that_cannot_hold_the_queue():
    """Saturating short load would favour the replicas, but a 600-token prompt is
    queued: splitting would only hold it and force a merge back."""
    server = Server(PP2)
    for _ in range(20):
        decision = server.tick(arrived=short(40), waiting=short(60) + long(1), generated=250)
    assert server.layouts == [PP2]
    assert "left out" in decision.reason


def test_dwell_counts_from_the_end_of_the_pause():
    server = Server(PP2)
    for _ in range(3):
        server.tick(arrived=short(40), waiting=short(60), generated=250)
    (switch,) = server.policy.switches
    assert server.policy.last_switch_t == pytest.approx(switch.t + 0.25)


@pytest.mark.parametrize("pinned, splits", [(700, True), (1100, False)])
def test_no_split_while_running_requests_pin_more_kv_than_the_replicas_hold(pinned, splits):
    """A split deals the running requests out: 700 pinned slots fit two replicas of
    512, 1100 do not."""
    server = Server(PP2)
    for _ in range(10):
        server.policy.observe(LoadSample(server.t + 1, PP2, arrived=short(40),
                                         waiting=short(60), running=4, kv_used=pinned,
                                         generated=250))
        server.t += 1
        decision = server.policy.decide()
        if decision.switch:
            break
    assert decision.switch == splits
    assert decision.target == DP2 if splits else "pinned KV" in decision.reason


def test_the_pause_comes_from_the_servers_prediction_first():
    policy = Policy(CANDIDATES, MODEL, FAST, current=DP2)
    assert policy.downtime(DP2, PP2) == FAST.default_downtime_s
    policy.measured[(TP2, DP2)] = 0.4
    assert policy.downtime(DP2, PP2) == 0.4  # the mean of what was measured
    policy.measured[(DP2, PP2)] = 0.3
    assert policy.downtime(DP2, PP2) == 0.3
    policy.planned[(DP2, PP2)] = 0.2
    assert policy.downtime(DP2, PP2) == 0.2
    assert policy.to_json()["predicted_downtime_s"] == {"1,1,2": 0.2}


def test_a_held_request_waits_only_while_others_queue():
    busy = Server(DP2)
    decision = busy.tick(arrived=long(1) + short(30), waiting=short(40), held=long(1),
                         held_wait_s=0.2, generated=300)
    assert not decision.switch  # the replicas keep serving the queue for max_hold_s
    idle = Server(DP2)
    decision = idle.tick(arrived=long(1), held=long(1), held_wait_s=0.2)
    assert decision.switch and "nothing else queued" in decision.reason


def test_long_prompts_that_keep_coming_hold_the_merged_layout_until_they_stop():
    """A long prompt every 3 s among saturating short load: a split would be reversed by
    the next one (merge at the dwell's pace), so the merged layout stays; once they stop,
    it splits as soon as the last one is a dwell time old."""
    server = Server(PP2)
    for i in range(60):
        arrived = short(20, i) + (long(1) if i % 3 == 0 else ())
        held = long(1) if server.policy.current == DP2 and i % 3 == 0 else ()
        server.tick(arrived=arrived, waiting=short(30, i), held=held,
                    held_wait_s=5.0 if held else 0.0, generated=300)
    assert server.layouts == [PP2], server.policy.decisions[-1].reason
    reasons = [d.reason for d in server.policy.decisions]
    assert any("would be left within" in r for r in reasons[-10:])
    last_long = server.t - 2  # i = 57
    for i in range(30):
        server.tick(arrived=short(20, i), waiting=short(30, i), generated=300)
    assert server.layouts == [PP2, DP2]
    split = server.policy.switches[-1].t
    assert last_long + FAST.min_dwell_s <= split <= last_long + FAST.min_dwell_s + 3


def test_expected_stay_of_a_split():
    from remp_sglang.policy import expected_stay

    history = [(float(t), 700 if t % 4 == 1 else 30) for t in range(20)]  # longs 1..17
    assert expected_stay(history, 20.0, 506, 1018, 30.0) == (4.0, 5)  # 20 s / 5 longs
    assert expected_stay(history, 40.0, 506, 1018, 30.0) == (23.0, 5)  # 23 s since the last
    assert expected_stay(history, 20.0, 1018, 1018, 30.0) == (30.0, 0)  # holds them all
    refused = [(1.0, 5000), (2.0, 30)]  # prompts no layout holds do not count
    assert expected_stay(refused, 3.0, 506, 1018, 30.0) == (30.0, 0)
    assert expected_stay((), 3.0, 506, 1018, 30.0) == (30.0, 0)

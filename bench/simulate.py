"""Simulated 8x H100 serving Llama-3-70B on real traces: every fixed layout against `auto`.

    python bench/simulate.py [--quick] [--json PATH] [--steps PATH]

For each trace window (picked with `traces.shift_windows` where the share of long prompts
changes most between its halves), one row per candidate layout (dp x tp x pp = 8, weights
fit in 0.9 x 80 GB) held fixed, and rows for `auto`: the server's own policy
(`remp_sglang.policy.Policy`) switching live from TP 8, with a switch's fixed cost
assumed at 2 s, and again at ReMP's reported 6.5 s. Then auto's switches with their
predicted pauses beside ReMP's 6-7 s for 70B, and the model checks: (a) the pause model
fitted on this CPU's measured reshapes (bench/results/under_load-cpu.json), (b) the
step model (the same `perf.StepModel`, CPU figures) against the decode periods a live
CPU server measured at each layout (`--steps`, default bench/results/step_model-cpu.json
from `bench/step_model.py`). All numbers are simulated: see the list of what the
simulator does not model at the end of the output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import remp_sglang.sim as sim
from remp_sglang.perf import Hardware
from remp_sglang.policy import PolicyConfig
from remp_sglang.sim import hardware, traces, validate
from remp_sglang.sim.cluster import Cluster
from remp_sglang.sim.layouts import candidates
from remp_sglang.sim.metrics import RunResult
from remp_sglang.sim.models import LLAMA3_70B
from remp_sglang.sim.switch import SwitchCost
from remp_sglang.topology import ModelShape
from remp_sglang.weights import DenseDecoder

REPO_ROOT = Path(__file__).resolve().parent.parent
UNDER_LOAD = REPO_ROOT / "bench" / "results" / "under_load-cpu.json"
STEPS = REPO_ROOT / "bench" / "results" / "step_model-cpu.json"
WORLD, HW, MODEL, START = 8, hardware.H100_SXM, LLAMA3_70B, (1, 8, 1)
REMP_S = sum(hardware.REMP_70B_SWITCH_S) / 2


@dataclass(frozen=True)
class Scenario:
    """A trace window: `duration_s` simulated seconds of `trace` at `time_div` x its
    real arrival rate (real token counts), where the share of prompts >= `long_prompt`
    shifts most."""

    trace: str
    long_prompt: int
    duration_s: float
    time_div: float


SCENARIOS = (
    # Mooncake's real rate (~3.4 req/s of ~12k-token prompts) is far beyond one 8-GPU
    # node: replayed at 0.4x. Prompts up to ~126k: DP 4's replicas hold < 40k.
    Scenario("mooncake", 32000, 600.0, 0.4),
    # Azure's real rates leave 8 H100 mostly idle: replayed 2.5x faster.
    Scenario("azure_conv", 2000, 600.0, 2.5),
    Scenario("azure_code", 4000, 600.0, 2.5),
)


def requests(sc: Scenario, duration_s: float) -> tuple[float, list[traces.TraceRequest]]:
    full = traces.load(sc.trace)
    span = duration_s * sc.time_div  # trace seconds that fill the simulated window
    start = traces.shift_windows(full, span, sc.long_prompt, 1)[0]
    return start, traces.scale(traces.window(full, start, span), 1, sc.time_div)


def autos(cands: list, longest: int) -> list[tuple[str, PolicyConfig, SwitchCost]]:
    """auto at the assumed fixed cost and at ReMP's; and, when some candidate cannot hold
    the window's longest prompt, auto limited to those that can (marked *)."""
    out = []
    for fixed_s in (hardware.GPU_SWITCH_FIXED_S, REMP_S):
        out.append((f"auto@{fixed_s:g}s", PolicyConfig(default_downtime_s=fixed_s),
                    SwitchCost(fixed_s, HW.link_bw)))
    holding = tuple(c.layout for c in cands if c.max_input > longest)
    if len(holding) < len(cands):
        fixed_s = hardware.GPU_SWITCH_FIXED_S
        out.append((f"auto@{fixed_s:g}s*", PolicyConfig(default_downtime_s=fixed_s,
                                                         candidates=holding),
                    SwitchCost(fixed_s, HW.link_bw)))
    return out


def run_scenario(sc: Scenario, duration_s: float) -> dict:
    start, reqs = requests(sc, duration_s)
    runs: list[tuple[RunResult, Cluster]] = []
    cands = candidates(MODEL, HW, WORLD)
    for c in cands:
        cluster = Cluster(MODEL, HW, WORLD, c.layout)
        runs.append((cluster.run(reqs, duration_s, name=fmt(c.layout)), cluster))
    for name, config, cost in autos(cands, max((r.prompt for r in reqs), default=0)):
        cluster = Cluster(MODEL, HW, WORLD, START, auto=True, policy_config=config, cost=cost)
        runs.append((cluster.run(reqs, duration_s, name=name), cluster))
    half = len(reqs) // 2
    return {
        "trace": sc.trace, "window_start_s": start, "time_div": sc.time_div,
        "duration_s": duration_s, "requests": len(reqs), "long_prompt": sc.long_prompt,
        "long_share_halves": [round(traces.long_share(reqs[:half], sc.long_prompt), 3),
                              round(traces.long_share(reqs[half:], sc.long_prompt), 3)],
        "mean_prompt": round(sum(r.prompt for r in reqs) / max(1, len(reqs))),
        "max_prompt": max((r.prompt for r in reqs), default=0),
        "mean_output": round(sum(r.output for r in reqs) / max(1, len(reqs))),
        "runs": [{**r.to_json(), "kv_capacity_per_replica": cl.by_layout[r.start].capacity
                  if not cl.policy else None} for r, cl in runs],
    }


def fmt(layout) -> str:
    dp, tp, pp = layout
    return f"dp{dp} tp{tp} pp{pp}"


def num(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_scenario(s: dict) -> None:
    print(f"\n## {s['trace']}: window at {s['window_start_s']:.0f}s of the trace, "
          f"{s['duration_s']:.0f} simulated s at {s['time_div']}x its rate, {s['requests']} "
          f"requests (prompt mean {s['mean_prompt']}, max {s['max_prompt']}; output mean "
          f"{s['mean_output']}); share of prompts >= {s['long_prompt']}: "
          f"{s['long_share_halves'][0]:.2f} -> {s['long_share_halves'][1]:.2f}")
    print(f"{'layout':>14} {'KV/replica':>10} {'tok/s':>7} {'TTFT p50':>8} {'p99':>7} "
          f"{'TPOT p50':>8} {'p99':>7} {'done':>5} {'refused':>7} {'left':>5} "
          f"{'reshapes':>8} {'paused s':>8}")
    for r in s["runs"]:
        cap = r["kv_capacity_per_replica"]
        print(f"{r['name']:>14} {cap if cap else '-':>10} {r['throughput_tok_s']:>7.0f} "
              f"{num(r['ttft_s']['p50']):>8} {num(r['ttft_s']['p99']):>7} "
              f"{num(r['tpot_s']['p50'], 3):>8} {num(r['tpot_s']['p99'], 3):>7} "
              f"{r['completed']:>5} {r['refused']:>7} {r['in_system']:>5} "
              f"{r['reshapes']:>8} {r['paused_s']:>8.1f}")
    if any(r["name"].endswith("*") for r in s["runs"]):
        print("  * auto limited to the layouts that hold the window's longest prompt "
              "(PolicyConfig.candidates)")


def print_switches(scenarios: list[dict]) -> None:
    print(f"\n## auto's switches (predicted pause = fixed + busiest rank's bytes / "
          f"{HW.link_bw / 1e9:.0f} GB/s; ReMP reports {hardware.REMP_70B_SWITCH_S[0]:g}-"
          f"{hardware.REMP_70B_SWITCH_S[1]:g} s for 70B on 8x H100)")
    print(f"{'trace':>10} {'run':>9} {'t s':>6} {'old -> new':>24} {'pause s':>7} "
          f"{'/ReMP':>6} {'KV GB':>6} {'wt GB':>6} {'rank GB':>7} {'retract':>7}  why")
    for s in scenarios:
        for r in s["runs"]:
            for w in r["switches"]:
                print(f"{s['trace']:>10} {r['name']:>9} {w['t']:>6.1f} "
                      f"{fmt(w['old']) + ' -> ' + fmt(w['new']):>24} {w['downtime_s']:>7.2f} "
                      f"{w['downtime_s'] / REMP_S:>5.2f}x {w['kv_bytes'] / 1e9:>6.1f} "
                      f"{w['weight_bytes'] / 1e9:>6.1f} {w['max_rank_bytes'] / 1e9:>7.1f} "
                      f"{w['retracted']:>7}  {w['reason'][:70]}")


def print_switch_check(check: dict) -> None:
    print("\n## model check (a): pause = fixed + max_rank_bytes / bandwidth, on "
          f"{check['reshapes']} measured CPU reshapes ({UNDER_LOAD.name})")
    for label in ("holdout", "all"):
        c = check[label]
        print(f"  {label:>8}: fit on {c['fitted_on']}, test on {c['tested_on']}: fixed "
              f"{c['fixed_s']:.3f} s, bandwidth {c['bandwidth_bytes_s'] / 1e6:.1f} MB/s; "
              f"|pred - measured| / measured median {c['median']:.1%}, max {c['max']:.1%}")
    o = check["server_online_model"]
    print(f"  the server's own online model (recorded per reshape): median {o['median']:.1%}, "
          f"max {o['max']:.1%} over {o['n']}")
    print("  (CPU reshapes move 0.5-1 MB; their pauses are the fixed part, so this checks "
          "the fixed cost and the method, not a GPU's bandwidth)")


def step_check(path: Path) -> dict | None:
    """(b) The step model's decode periods against those measured on this machine's live
    server at each layout (`bench/step_model.py` writes the file: its rows, the model
    and the figures it fitted, which are `hardware.CPU_TINY`)."""
    print("\n## model check (b): the step model against measured CPU decode periods "
          f"({path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path})")
    if not path.exists():
        print("  no measured step times (run bench/step_model.py --json PATH)")
        return None
    data = json.loads(path.read_text())
    hw = Hardware(**data["hardware"])
    m = data["model"]
    shape = ModelShape(*(m[k] for k in ("num_layers", "num_heads", "num_kv_heads",
                                        "head_dim", "dtype_bytes")))
    model = DenseDecoder(shape, m["hidden_size"], m["intermediate_size"], m["vocab_size"],
                         lm_head_on_every_stage=m.get("lm_head_on_every_stage", False))
    rows = [validate.MeasuredStep((r["dp"], r["tp"], r["pp"]), r["batch"], r["context"],
                                  r["measured_s"])
            for r in data["rows"] if r["kind"] == "decode"]
    errors = validate.step_model_errors(rows, hw, model)
    for layout, e in errors.items():
        print(f"  {fmt(layout):>14}: n {e['n']}, median {e['median']:.1%}, max {e['max']:.1%}, "
              f"predicted/measured {e['ratio']:.2f}")
    print("  (prefill latencies in the same file: bench/results/step_model-cpu.txt)")
    return {"hardware": asdict(hw), "errors": {",".join(map(str, k)): v
                                               for k, v in errors.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="150 s windows, two traces")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--steps", type=Path, default=STEPS,
                        help="measured step times (bench/step_model.py --json)")
    args = parser.parse_args()
    began = time.process_time()
    scenarios = SCENARIOS[::2] if args.quick else SCENARIOS
    print(f"# {MODEL.name} on {WORLD}x {HW.name} (simulated): flops {HW.flops / 1e12:.0f} "
          f"TFLOP/s sustained ({hardware.SUSTAINED_FLOPS:.0%} of nominal), HBM "
          f"{HW.mem_bw / 1e12:.1f} TB/s, NVLink {HW.link_bw / 1e9:.0f} GB/s (measured), "
          f"{HW.memory_bytes / 2**30:.1f} GiB x {hardware.MEM_FRACTION_STATIC} per GPU; "
          f"auto starts at {fmt(START)}")
    print("(tok/s: output tokens generated inside the window / its length; TTFT, TPOT in s "
          "over the completed requests; left: queued or running at the window's end)")
    results = []
    for sc in scenarios:
        results.append(run_scenario(sc, 150.0 if args.quick else sc.duration_s))
        print_scenario(results[-1])
    print_switches(results)
    check = validate.switch_cost_check(validate.measured_reshapes(UNDER_LOAD))
    print_switch_check(check)
    steps = step_check(args.steps)
    limits = sim.NOT_MODELLED
    print("\n## what the simulator does NOT model (every number above is simulated)\n"
          + limits)
    cpu = time.process_time() - began
    print(f"\n(simulated in {cpu:.1f} s of CPU)")
    if args.json:
        args.json.write_text(json.dumps({
            "model": MODEL.name, "world": WORLD, "hardware": asdict(HW), "start": START,
            "switch_fixed_s": [hardware.GPU_SWITCH_FIXED_S, REMP_S],
            "scenarios": results, "switch_model_check": check, "step_model_check": steps,
            "not_modelled": limits, "cpu_s": round(cpu, 1)}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Checks of the simulator's two models against measurements from this project's runs.

(a) The switch's pause, `fixed + max_rank_bytes / bandwidth` (`switch.SwitchCost`),
    fitted on measured reshapes (`bench/results/under_load-cpu.json`): the bandwidth is
    the busiest rank's bytes over the transfer phase (transfer_s), the fixed part
    the median of downtime - transfer (the same split as `predict.DowntimeModel`, but
    batch, not an exponential average). A least-squares fit of downtime on bytes would
    not do: the CPU reshapes move 0.5-1 MB each, their pauses vary with teardown and
    rebuild, not bytes, and the slope comes out as noise.
(b) The per-step model: `step_model_errors` compares `StepModel.decode_period` with
    decode periods measured on a live server (`bench/step_model.py` writes them; its
    rows are (layout, batch, context, step_s)).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from remp_sglang.perf import Hardware, StepModel
from remp_sglang.topology import Topology
from remp_sglang.weights import DenseDecoder

from .switch import SwitchCost

Layout = tuple[int, int, int]  # (dp, tp, pp)


@dataclass(frozen=True)
class MeasuredReshape:
    """One reshape a server made: its bytes, its transfer phases' time and its pause."""

    old: Layout
    new: Layout
    max_rank_bytes: int
    transfer_s: float
    downtime_s: float
    predicted_s: float | None = None  # the server's own DowntimeModel at the time


def _layout(d: dict) -> Layout:
    return (int(d.get("dp", 1)), int(d["tp"]), int(d["pp"]))


def measured_reshapes(path: Path) -> list[MeasuredReshape]:
    """The successful reshapes of a bench result with a "reshapes" list, in run order."""
    out = []
    for r in json.loads(Path(path).read_text())["reshapes"]:
        if r.get("status", 200) != 200 or "phases" not in r:
            continue
        phases = r["phases"]
        out.append(MeasuredReshape(
            _layout(r["old"]), _layout(r["new"]), int(r["max_rank_bytes"]),
            float(phases.get("transfer_s", phases.get("weights_s", 0.0)
                                       + phases.get("kv_s", 0.0))),  # (earlier runs)
            float(r["downtime_s"]), (r.get("predicted") or {}).get("predicted_downtime_s")))
    return out


def fit_switch_cost(rows: Sequence[MeasuredReshape]) -> SwitchCost:
    """fixed = median(downtime - transfer); bandwidth = sum of bytes / sum of transfer time."""
    if not rows:
        raise ValueError("no reshapes to fit")
    moved = sum(r.transfer_s for r in rows)
    bandwidth = sum(r.max_rank_bytes for r in rows) / moved if moved > 0 else float("inf")
    return SwitchCost(statistics.median(r.downtime_s - r.transfer_s for r in rows), bandwidth)


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    """|predicted - measured| / measured, pairwise."""
    return [abs(p - m) / m for p, m in zip(predicted, measured, strict=True)]


def error_summary(errors: Sequence[float]) -> dict[str, float]:
    if not errors:
        return {"n": 0, "median": float("nan"), "max": float("nan")}
    return {"n": len(errors), "median": statistics.median(errors), "max": max(errors)}


def switch_cost_check(rows: Sequence[MeasuredReshape]) -> dict:
    """Fit on the first half of the reshapes, test on the second; also in-sample on all,
    and the server's own online model (recorded with each reshape) for comparison."""
    half = len(rows) // 2
    train, test = rows[:half], rows[half:]
    out: dict = {"reshapes": len(rows)}
    for label, fit_on, test_on in (("holdout", train, test), ("all", rows, rows)):
        cost = fit_switch_cost(fit_on)
        errs = relative_errors([cost.downtime(r.max_rank_bytes) for r in test_on],
                               [r.downtime_s for r in test_on])
        out[label] = {"fitted_on": len(fit_on), "tested_on": len(test_on),
                      "fixed_s": cost.fixed_s, "bandwidth_bytes_s": cost.bandwidth,
                      **error_summary(errs)}
    online = [r for r in rows if r.predicted_s is not None]
    out["server_online_model"] = error_summary(relative_errors(
        [r.predicted_s for r in online], [r.downtime_s for r in online]))  # type: ignore[misc]
    return out


# -- (b) the per-step model --------------------------------------------------------------
@dataclass(frozen=True)
class MeasuredStep:
    """A measured decode period: every running request of one replica gained one token."""

    layout: Layout  # (dp, tp, pp)
    batch: int
    context: float  # cached tokens of the batch, all requests together
    step_s: float


def step_model_errors(rows: Sequence[MeasuredStep], hw: Hardware,
                      model: DenseDecoder) -> dict[Layout, dict[str, float]]:
    """The per-step model check: per layout, how far `StepModel(model, hw)`'s
    decode period is from the measured one (n, median and max relative error, and the
    median ratio predicted / measured, which says which way it is off)."""
    step = StepModel(model, hw)
    by_layout: dict[Layout, list[tuple[float, float]]] = {}
    for r in rows:
        dp, tp, pp = r.layout
        pred = step.decode_period(Topology(tp, pp, dp * tp * pp, dp), r.batch, r.context)
        by_layout.setdefault(r.layout, []).append((pred, r.step_s))
    out = {}
    for layout, pairs in sorted(by_layout.items()):
        errs = relative_errors([p for p, _ in pairs], [m for _, m in pairs])
        out[layout] = {**error_summary(errs),
                       "ratio": statistics.median(p / m for p, m in pairs)}
    return out

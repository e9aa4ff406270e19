"""Prometheus metrics of reshapes, on SGLang's own /metrics (with --enable-metrics).

SGLang serves /metrics from prometheus_client's multi-process collector over the
directory it sets up at launch; metrics made in the launcher process after that appear
there. They are made on the first HTTP request (`ensure`), never before SGLang has
chosen the directory (prometheus_client picks its storage when first imported).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("sglang.srt.remp")
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class RempMetrics:
    started: Any
    outcomes: Any  # by outcome: succeeded, failed, rolled_back, unknown
    last_downtime: Any
    downtime_total: Any
    phase_seconds: Any  # histogram by phase
    bytes_moved: Any  # by kind: kv, weights
    tp: Any
    pp: Any
    parked: Any


_metrics: RempMetrics | None = None
_checked = False
_layout = {"tp": 0, "pp": 0, "parked": 0}  # kept before the metrics exist


def set_layout(tp: int, pp: int, parked: int) -> None:
    _layout.update(tp=tp, pp=pp, parked=parked)
    if _metrics is not None:
        _metrics.tp.set(tp)
        _metrics.pp.set(pp)
        _metrics.parked.set(parked)


def ensure() -> RempMetrics | None:
    """The metrics, made once if this server runs with --enable-metrics."""
    global _metrics, _checked
    if _checked:
        return _metrics
    from sglang.srt.entrypoints.http_server import get_global_state

    state = get_global_state()
    if state is None or state.tokenizer_manager is None:
        return None
    _checked = True
    if not getattr(state.tokenizer_manager.server_args, "enable_metrics", False):
        return None
    from prometheus_client import Counter, Gauge, Histogram

    _metrics = RempMetrics(
        started=Counter("remp_reshapes_started", "Reshapes started"),
        outcomes=Counter("remp_reshapes", "Reshapes ended, by outcome", ["outcome"]),
        last_downtime=Gauge("remp_reshape_last_downtime_seconds",
                            "Downtime of the last successful reshape",
                            multiprocess_mode="mostrecent"),
        downtime_total=Counter("remp_reshape_downtime_seconds",
                               "Downtime of every successful reshape, summed"),
        phase_seconds=Histogram("remp_reshape_phase_seconds", "Duration of reshape phases",
                                ["phase"], buckets=PHASE_BUCKETS),
        bytes_moved=Counter("remp_reshape_bytes_moved", "Bytes moved between ranks by "
                            "reshapes", ["kind"]),
        tp=Gauge("remp_tp_size", "Current tensor-parallel degree",
                 multiprocess_mode="mostrecent"),
        pp=Gauge("remp_pp_size", "Current pipeline-parallel degree",
                 multiprocess_mode="mostrecent"),
        parked=Gauge("remp_parked_ranks", "Launched ranks outside the current layout",
                     multiprocess_mode="mostrecent"),
    )
    for outcome in ("succeeded", "failed", "rolled_back", "unknown"):
        _metrics.outcomes.labels(outcome=outcome)
    set_layout(**_layout)
    return _metrics


def started() -> None:
    m = ensure()
    if m is not None:
        m.started.inc()


def finished(report: dict | None, outcome: str) -> None:
    """Record a reshape's end; `report` is rank zero's reply (None when none came)."""
    m = ensure()
    if m is None:
        return
    m.outcomes.labels(outcome=outcome).inc()
    if outcome != "succeeded" or report is None:
        return
    m.last_downtime.set(report.get("downtime_s", 0.0))
    m.downtime_total.inc(report.get("downtime_s", 0.0))
    for phase, seconds in report.get("phases", {}).items():
        m.phase_seconds.labels(phase=phase.removesuffix("_s")).observe(seconds)
    m.bytes_moved.labels(kind="kv").inc(report.get("kv_bytes_moved", 0))
    m.bytes_moved.labels(kind="weights").inc(report.get("weight_bytes_moved", 0))

"""What a simulated run reports: throughput, latency percentiles, refusals, switches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .replica import Job

Layout = tuple[int, int, int]


def _round(x: float, digits: int) -> float | None:
    return None if math.isnan(x) else round(x, digits)  # JSON has no NaN


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank; NaN when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class SwitchRecord:
    """One switch the simulator made: when, between which layouts, what it moved and the
    pause it cost."""

    t: float
    old: Layout
    new: Layout
    downtime_s: float
    kv_bytes: int
    weight_bytes: int
    max_rank_bytes: int
    live_tokens: int
    retracted: int  # running requests the new replicas could not hold (back to the queue)
    reason: str


@dataclass
class RunResult:
    """A run's outcome over its window of `duration_s` seconds."""

    name: str
    start: Layout
    duration_s: float
    arrived: int = 0
    completed: int = 0
    refused: int = 0
    in_system: int = 0  # queued or running at the end
    generated: int = 0  # output tokens generated inside the window
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft: list[float] = field(default_factory=list, repr=False)
    tpot: list[float] = field(default_factory=list, repr=False)
    switches: list[SwitchRecord] = field(default_factory=list)
    paused_s: float = 0.0

    @property
    def throughput(self) -> float:
        """Output tokens per second over the window."""
        return self.generated / self.duration_s if self.duration_s > 0 else 0.0

    def record(self, job: Job) -> None:
        """A completed request's latencies (TPOT over its tokens after the first)."""
        self.completed += 1
        if job.first_token is not None:
            self.ttft.append(job.first_token - job.arrival)
            if job.output > 1 and job.finished is not None:
                self.tpot.append((job.finished - job.first_token) / (job.output - 1))

    def to_json(self) -> dict:
        return {
            "name": self.name, "start": list(self.start), "duration_s": self.duration_s,
            "arrived": self.arrived, "completed": self.completed, "refused": self.refused,
            "in_system": self.in_system, "generated_tokens": self.generated,
            "throughput_tok_s": round(self.throughput, 1),
            "prefix_hit_rate": round(self.cached_tokens / self.prompt_tokens, 3)
            if self.prompt_tokens else 0.0,
            "ttft_s": {"p50": _round(pct(self.ttft, 0.5), 4),
                       "p99": _round(pct(self.ttft, 0.99), 4)},
            "tpot_s": {"p50": _round(pct(self.tpot, 0.5), 5),
                       "p99": _round(pct(self.tpot, 0.99), 5)},
            "reshapes": len(self.switches), "paused_s": round(self.paused_s, 3),
            "switches": [{**asdict(s), "old": list(s.old), "new": list(s.new),
                          "t": round(s.t, 3), "downtime_s": round(s.downtime_s, 4)}
                         for s in self.switches],
        }

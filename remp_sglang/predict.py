"""What a reshape will move and how long it will pause: the planner's bytes and a
downtime model calibrated on the reshapes this server has made.

Pure (no SGLang): the `/remp/plan` dry run and every reshape's reply use the same
functions, so the model's error is visible next to each measured value.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from remp_sglang.planner import Tokens, plan_kv, restrict
from remp_sglang.topology import ModelShape, Topology
from remp_sglang.weights import DenseDecoder, plan_weights


@dataclass(frozen=True)
class TransferPrediction:
    """Bytes each launched rank sends and receives (KV for `tokens` live slots, weights)."""

    kv_sent: tuple[int, ...]
    kv_received: tuple[int, ...]
    weights_sent: tuple[int, ...]
    weights_received: tuple[int, ...]

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_sent)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights_sent)

    @property
    def max_rank_bytes(self) -> int:
        """The busiest rank's traffic, max(sent, received) (duplex links): the floor's
        numerator."""
        return max((max(self.kv_sent[r] + self.weights_sent[r],
                        self.kv_received[r] + self.weights_received[r])
                    for r in range(len(self.kv_sent))), default=0)

    def to_json(self) -> dict:
        return {"kv_bytes": self.kv_bytes, "weight_bytes": self.weight_bytes,
                "max_rank_bytes": self.max_rank_bytes,
                "per_rank": [{"rank": r, "kv_sent": self.kv_sent[r],
                              "kv_received": self.kv_received[r],
                              "weights_sent": self.weights_sent[r],
                              "weights_received": self.weights_received[r]}
                             for r in range(len(self.kv_sent))]}


def predict_transfer(old: Topology, new: Topology, model: DenseDecoder,
                     kv_shape: ModelShape, tokens: Tokens,
                     flows: Sequence[tuple[int, int]] | None = None,
                     received: Collection[int] | None = None) -> TransferPrediction:
    """The bytes of a switch from `old` to `new` with `tokens` live KV slots (per flow,
    with replicas: see `plan_kv`). `received`: only moves to these ranks count (a pause
    after a pre-copy: the ranks that did not join)."""
    kv = plan_kv(old, new, kv_shape, flows)
    weights = plan_weights(old, new, model)
    if received is not None:
        kv, weights = restrict(kv, weights, lambda dst, flow: dst in received)
    ranks = range(old.world_size)
    return TransferPrediction(
        kv_sent=tuple(kv.bytes_sent(r, tokens) for r in ranks),
        kv_received=tuple(kv.bytes_received(r, tokens) for r in ranks),
        weights_sent=tuple(weights.bytes_sent(r) for r in ranks),
        weights_received=tuple(weights.bytes_received(r) for r in ranks),
    )


@dataclass
class DowntimeModel:
    """downtime = fixed + max_rank_bytes / bandwidth, both learned from measured reshapes
    (exponential average; `None` until the first one: nothing is guessed).

    `fixed` is everything but the transfers (teardown, world and model build, cache
    import); `bandwidth` is the busiest rank's bytes over the transfer phases' time."""

    alpha: float = 0.3
    fixed_s: float | None = None
    bandwidth: float | None = None  # bytes per second
    observed: int = 0
    errors: list[float] = field(default_factory=list)  # predicted - measured, recent

    def predict(self, max_rank_bytes: int) -> float | None:
        if self.fixed_s is None:
            return None
        transfer = max_rank_bytes / self.bandwidth if self.bandwidth else 0.0
        return self.fixed_s + transfer

    def observe(self, max_rank_bytes: int, transfer_s: float, downtime_s: float) -> None:
        predicted = self.predict(max_rank_bytes)
        if predicted is not None:
            self.errors = (self.errors + [predicted - downtime_s])[-20:]
        fixed = max(0.0, downtime_s - transfer_s)
        self.fixed_s = fixed if self.fixed_s is None else \
            (1 - self.alpha) * self.fixed_s + self.alpha * fixed
        if max_rank_bytes > 0 and transfer_s > 0:
            bandwidth = max_rank_bytes / transfer_s
            self.bandwidth = bandwidth if self.bandwidth is None else \
                (1 - self.alpha) * self.bandwidth + self.alpha * bandwidth
        self.observed += 1

    def to_json(self) -> dict:
        return {"fixed_s": self.fixed_s, "bandwidth_bytes_per_s": self.bandwidth,
                "reshapes_observed": self.observed,
                "recent_errors_s": [round(e, 4) for e in self.errors]}

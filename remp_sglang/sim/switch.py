"""What a simulated switch moves and how long it pauses the cluster.

Bytes are the planner's (`predict.predict_transfer`: KV of the live slots of every old
replica along the replica flows the server uses, and the weight re-shard); the pause is
`predict.DowntimeModel`'s form, `fixed_s + max_rank_bytes / bandwidth`, with every rank
moving at once over its own link. `fixed_s` stands for everything that is not a transfer
(teardown, groups, model rebuild, cache import).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from remp_sglang.predict import TransferPrediction, predict_transfer
from remp_sglang.topology import Topology, replica_sources
from remp_sglang.weights import DenseDecoder


@dataclass(frozen=True)
class SwitchCost:
    """downtime = fixed_s + max_rank_bytes / bandwidth (bytes/s one rank moves)."""

    fixed_s: float
    bandwidth: float

    def downtime(self, max_rank_bytes: int) -> float:
        return self.fixed_s + max_rank_bytes / self.bandwidth


def flows(old: Topology, new: Topology) -> list[tuple[int, int]]:
    """(old replica, new replica) pairs whose KV moves, as the server's dry run names them."""
    return [(a, b) for b, srcs in enumerate(replica_sources(old, new)) for a in srcs]


def predict(old: Topology, new: Topology, model: DenseDecoder, live_tokens: Sequence[int],
            capacity: int | None = None) -> TransferPrediction:
    """The planner's bytes of switching `old` -> `new` with `live_tokens[a]` live KV slots
    on old replica `a`. A split copies a replica's whole cache to each new replica it
    feeds, so its tokens move once per flow; with `capacity` (slots of a new replica), a
    flow carries at most its share of the new pool (`capacity` over the replicas merged
    into it, `integration.replicas.room_share`): the rest is dropped, not moved."""
    feeds = replica_sources(old, new)
    pairs = flows(old, new)
    tokens = []
    for a, b in pairs:
        share = capacity // len(feeds[b]) if capacity is not None else live_tokens[a]
        tokens.append(int(min(live_tokens[a], share)))
    return predict_transfer(old, new, model, model.shape, tokens, pairs)

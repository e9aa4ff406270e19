"""One memory budget per rank, the same at every layout.

SGLang sizes a rank's KV pool at launch from what is left after that rank's weights
(`--mem-fraction-static`), then caps it by `--max-total-tokens`. A reshape changes how
many weight bytes each rank holds (TP 2 -> 1 doubles them), so a layout's KV capacity is
what the launch reserved on the rank (its weights plus its pool) leaves after the new
layout's weights there, in the new layout's slot size. This module is that rule: pure
arithmetic over the model description, so the server, the plan dry run and the tests
share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .topology import ModelShape, Topology
from .weights import DenseDecoder, dense_decoder_params, local_shape, owns


def weight_bytes(model: DenseDecoder, topo: Topology, rank: int, dtype_bytes: int) -> int:
    """Bytes of the parameters `rank` holds under `topo` (0 when it is parked)."""
    return sum(math.prod(local_shape(spec, model, topo, rank)) * dtype_bytes
               for spec in dense_decoder_params(model) if owns(spec, model, topo, rank))


def kv_slot_bytes(kv: ModelShape, topo: Topology, rank: int) -> int:
    """Bytes one KV slot (token) takes on `rank` under `topo`: its layers x its heads
    (0 when it is parked)."""
    if not topo.is_active(rank):
        return 0
    return (len(topo.layer_range(rank, kv.num_layers))
            * len(topo.kv_head_range(rank, kv.num_kv_heads))
            * kv.kv_bytes_per_token_per_layer_head)


def launch_budgets(model: DenseDecoder, kv: ModelShape, launch: Topology, slots: int,
                   dtype_bytes: int) -> list[int]:
    """What SGLang reserved on each launched rank: its weights and its `slots`-slot pool."""
    return [weight_bytes(model, launch, r, dtype_bytes) + slots * kv_slot_bytes(kv, launch, r)
            for r in range(launch.world_size)]


def kv_capacity(budgets: Sequence[int], model: DenseDecoder, kv: ModelShape, topo: Topology,
                dtype_bytes: int, token_cap: int | None = None) -> int:
    """KV slots of `topo` (per replica): the fewest any active rank's budget holds after
    its weights (every rank of a layout has the same slot count), capped by `token_cap`. Raises
    ValueError, naming the rank, if a rank's weights alone exceed its budget."""
    slots = []
    for r in topo.active_ranks:
        left = budgets[r] - weight_bytes(model, topo, r, dtype_bytes)
        if left <= 0:
            raise ValueError(
                f"layout dp={topo.dp} tp={topo.tp} pp={topo.pp}: rank {r} would hold "
                f"{budgets[r] - left} B of weights, more than the {budgets[r]} B it "
                "reserved at launch")
        slots.append(left // kv_slot_bytes(kv, topo, r))
    capacity = min(slots)
    return min(capacity, token_cap) if token_cap else capacity


def replica_token_cap(token_cap: int | None, launch: Topology, topo: Topology) -> int | None:
    """`--max-total-tokens` caps the pool of one launch replica; a replica made of the
    ranks of k launch replicas (a merge) may hold k times as many. Never below the cap."""
    if not token_cap:
        return token_cap
    return token_cap * max(1, topo.replica_size // launch.replica_size)


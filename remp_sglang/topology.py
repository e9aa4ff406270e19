"""Parallel topologies and the SGLang 0.5.23 placement rules they imply.

Every placement fact (which world rank is which (pp, tp) pair, which layers a pipeline
stage owns, which KV heads and query heads a tensor-parallel rank owns) lives here and
nowhere else, so the planner, the engine and the SGLang integration cannot disagree.
Pure Python: no torch, no sglang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PP_PARTITION_ENV = "SGLANG_PP_LAYER_PARTITION"


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a dense decoder that placement and byte counts depend on."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def kv_bytes_per_token_per_layer_head(self) -> int:
        """K and V bytes of one token, one layer, one KV head."""
        return 2 * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class Topology:
    """A (dp, tp, pp) layout over a world of launched ranks: `dp` replicas, each a
    (tp, pp) instance; ranks beyond dp*tp*pp are parked.

    Rank = replica * tp*pp + tp * pp_rank + tp_rank: inside a replica, as SGLang numbers
    its schedulers; replicas side by side, as its data-parallel controller places them.
    """

    tp: int
    pp: int
    world_size: int
    dp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.dp < 1:
            raise ValueError(f"dp, tp and pp must be >= 1, got dp={self.dp} tp={self.tp} "
                             f"pp={self.pp}")
        if self.num_active > self.world_size:
            raise ValueError(
                f"dp*tp*pp = {self.num_active} exceeds the {self.world_size} ranks available"
            )

    @property
    def replica_size(self) -> int:
        """Ranks of one replica (tp*pp)."""
        return self.tp * self.pp

    @property
    def num_active(self) -> int:
        return self.dp * self.replica_size

    @property
    def active_ranks(self) -> range:
        return range(self.num_active)

    @property
    def parked_ranks(self) -> range:
        return range(self.num_active, self.world_size)

    def is_active(self, rank: int) -> bool:
        return 0 <= rank < self.num_active

    def rank(self, pp_rank: int, tp_rank: int, replica: int = 0) -> int:
        if not (0 <= pp_rank < self.pp and 0 <= tp_rank < self.tp and 0 <= replica < self.dp):
            raise ValueError(f"(replica={replica}, pp_rank={pp_rank}, tp_rank={tp_rank}) "
                             f"outside {self}")
        return replica * self.replica_size + self.tp * pp_rank + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(pp_rank, tp_rank) of an active rank inside its replica."""
        if not self.is_active(rank):
            raise ValueError(f"rank {rank} is parked in {self}")
        return divmod(rank % self.replica_size, self.tp)

    def replica(self, rank: int) -> int:
        """The replica an active rank serves."""
        if not self.is_active(rank):
            raise ValueError(f"rank {rank} is parked in {self}")
        return rank // self.replica_size

    def replica_ranks(self, replica: int) -> range:
        if not 0 <= replica < self.dp:
            raise ValueError(f"replica {replica} outside 0..{self.dp - 1}")
        return range(replica * self.replica_size, (replica + 1) * self.replica_size)

    def layout(self) -> dict[str, int]:
        """{"dp", "tp", "pp"}: how replies and routes name a layout."""
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp}

    @property
    def heads(self) -> list[int]:
        """Each replica's first rank (the one SGLang feeds requests to)."""
        return [r * self.replica_size for r in range(self.dp)]

    def check_model(self, shape: ModelShape) -> None:
        """Raise ValueError naming the constraint SGLang would reject this layout for."""
        if shape.num_heads % self.tp:
            raise ValueError(f"tp={self.tp} must divide the {shape.num_heads} attention heads")
        kv, tp = shape.num_kv_heads, self.tp
        if (tp >= kv and tp % kv) or (tp < kv and kv % tp):
            raise ValueError(
                f"tp={tp} and the {kv} KV heads must divide one another (SGLang's QKV split)"
            )
        if self.pp > shape.num_layers:
            raise ValueError(f"pp={self.pp} exceeds the {shape.num_layers} layers")

    # -- placement: layers (PP dimension) ---------------------------------------------
    def layer_range(self, rank: int, num_layers: int) -> range:
        """Global layer ids held by an active rank (SGLang's get_pp_indices)."""
        pp_rank, _ = self.coords(rank)
        return pp_layer_range(num_layers, pp_rank, self.pp)

    def stage_of_layer(self, layer: int, num_layers: int) -> int:
        for pp_rank in range(self.pp):
            if layer in pp_layer_range(num_layers, pp_rank, self.pp):
                return pp_rank
        raise ValueError(f"layer {layer} outside 0..{num_layers - 1}")

    # -- placement: heads (TP dimension) ----------------------------------------------
    def kv_head_range(self, rank: int, num_kv_heads: int) -> range:
        _, tp_rank = self.coords(rank)
        return tp_kv_head_range(num_kv_heads, tp_rank, self.tp)

    def q_head_range(self, rank: int, num_heads: int) -> range:
        _, tp_rank = self.coords(rank)
        per = num_heads // self.tp
        return range(tp_rank * per, (tp_rank + 1) * per)


def pp_layer_range(num_layers: int, pp_rank: int, pp: int) -> range:
    """Layers of stage `pp_rank`: even split, extra layers to the LAST stages.

    Mirrors sglang.srt.distributed.utils.get_pp_indices, including the
    SGLANG_PP_LAYER_PARTITION override (ignored when pp == 1).
    """
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank} outside 0..{pp - 1}")
    spec = os.environ.get(PP_PARTITION_ENV) if pp > 1 else None
    if spec:
        sizes = [int(x) for x in spec.split(",")]
        if len(sizes) != pp or sum(sizes) != num_layers:
            raise ValueError(f"{PP_PARTITION_ENV}={spec!r} does not split {num_layers} into {pp}")
        start = sum(sizes[:pp_rank])
        return range(start, start + sizes[pp_rank])
    base, extra = divmod(num_layers, pp)
    plain = pp - extra  # stages without an extra layer come first
    if pp_rank < plain:
        start = pp_rank * base
        return range(start, start + base)
    start = pp_rank * (base + 1) - plain
    return range(start, start + base + 1)


def kv_head_replicas(num_kv_heads: int, tp: int) -> int:
    """How many consecutive TP ranks hold the same KV head (1 unless tp > KV heads)."""
    return tp // num_kv_heads if tp >= num_kv_heads else 1


def tp_kv_head_range(num_kv_heads: int, tp_rank: int, tp: int) -> range:
    """KV heads of TP rank `tp_rank`, as QKVParallelLinear and MHATokenToKVPool place them."""
    if tp >= num_kv_heads:
        head = tp_rank // kv_head_replicas(num_kv_heads, tp)
        return range(head, head + 1)
    per = num_kv_heads // tp
    return range(tp_rank * per, (tp_rank + 1) * per)


def replica_sources(old: Topology, new: Topology) -> list[list[int]]:
    """Per replica of `new`, the replicas of `old` that feed it: a merge groups
    consecutive replicas, a split feeds several new replicas from one old one."""
    if new.dp <= old.dp:
        return [[a for a in range(old.dp) if a * new.dp // old.dp == b] for b in range(new.dp)]
    return [[b * old.dp // new.dp] for b in range(new.dp)]


def layouts(world_size: int, shape: ModelShape, replicas: bool = False) -> list[Topology]:
    """Every (tp, pp) layout of at most `world_size` ranks that can run `shape`, by tp
    then pp (the candidates of a reshape, a plan or a policy); with `replicas`, also
    every layout of dp >= 2 replicas that uses all the ranks, by dp."""
    out = []
    for dp in range(1, world_size + 1 if replicas else 2):
        for tp in range(1, world_size // dp + 1):
            for pp in range(1, world_size // (dp * tp) + 1):
                if dp > 1 and dp * tp * pp != world_size:
                    continue
                topo = Topology(tp, pp, world_size, dp)
                try:
                    topo.check_model(shape)
                except ValueError:
                    continue
                out.append(topo)
    return out

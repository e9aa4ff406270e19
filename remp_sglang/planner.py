"""Reshape planning: which slices of KV cache and weights move between which ranks.

Pure functions over `Topology` (no torch, no sglang), so they can be tested exhaustively.
Both the KV plan and the weight plan rest on one primitive, `cover`: given the intervals
(along one tensor dimension) that each old rank holds and the interval a new rank needs,
split the need into pieces and name the old ranks holding each whole piece. A rank that
already holds a piece keeps it in place; otherwise one holder sends it, and where several
hold it (GQA replication, replicated parameters) the sends are spread across them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .topology import ModelShape, Topology


# ---------------------------------------------------------------------------------------
# intervals
@dataclass(frozen=True)
class Segment:
    """A rank holds full[start:stop] (along one dimension) at local offset `local`."""

    start: int
    stop: int
    local: int = 0

    def __post_init__(self) -> None:
        if self.stop < self.start:
            raise ValueError(f"empty-negative segment {self}")

    @property
    def length(self) -> int:
        return self.stop - self.start

    def local_of(self, index: int) -> int:
        return self.local + index - self.start


def cover(
    need: Segment, held: Mapping[int, Sequence[Segment]]
) -> list[tuple[int, int, tuple[int, ...]]]:
    """Split `need` into maximal pieces (start, stop, holders) with a fixed holder set.

    Raises ValueError if some index of `need` is held by nobody.
    """
    cuts = {need.start, need.stop}
    for segs in held.values():
        for s in segs:
            for c in (s.start, s.stop):
                if need.start < c < need.stop:
                    cuts.add(c)
    points = sorted(cuts)
    pieces: list[tuple[int, int, tuple[int, ...]]] = []
    for a, b in zip(points, points[1:], strict=False):
        holders = tuple(
            sorted(r for r, segs in held.items() if any(s.start <= a and b <= s.stop for s in segs))
        )
        if not holders:
            raise ValueError(f"no old rank holds [{a}, {b}) of {need}")
        if pieces and pieces[-1][1] == a and pieces[-1][2] == holders:
            pieces[-1] = (pieces[-1][0], b, holders)
        else:
            pieces.append((a, b, holders))
    return pieces


def _segment_at(segs: Sequence[Segment], start: int, stop: int) -> Segment:
    for s in segs:
        if s.start <= start and stop <= s.stop:
            return s
    raise ValueError(f"[{start}, {stop}) not inside any of {segs}")


# ---------------------------------------------------------------------------------------
# KV cache
@dataclass(frozen=True)
class KVMove:
    """K and V of global `layers` x global KV `heads`, for every token of `flow`, src -> dst.

    src == dst means the rank keeps the slice (a local copy into its new pool). A flow is
    one (old replica -> new replica) pair of the plan: its tokens are that old replica's
    slots going to that new replica's pool.
    """

    src: int
    dst: int
    layers: range
    heads: range
    flow: int = 0

    @property
    def is_local(self) -> bool:
        return self.src == self.dst

    def elements_per_token(self, shape: ModelShape) -> int:
        return 2 * len(self.layers) * len(self.heads) * shape.head_dim


Tokens = int | Sequence[int]  # tokens moved: the same for every flow, or per flow


@dataclass(frozen=True)
class KVPlan:
    old: Topology
    new: Topology
    shape: ModelShape
    moves: tuple[KVMove, ...]
    flows: tuple[tuple[int, int], ...] = ((0, 0),)  # (old replica, new replica) per flow

    def sends(self, rank: int) -> list[KVMove]:
        return [m for m in self.moves if m.src == rank and not m.is_local]

    def recvs(self, rank: int) -> list[KVMove]:
        return [m for m in self.moves if m.dst == rank and not m.is_local]

    def keeps(self, rank: int) -> list[KVMove]:
        return [m for m in self.moves if m.src == rank and m.is_local]

    def bytes_per_token(self, moves: Iterable[KVMove]) -> int:
        return sum(m.elements_per_token(self.shape) for m in moves) * self.shape.dtype_bytes

    def _bytes(self, moves: Iterable[KVMove], tokens: Tokens) -> int:
        per_flow = [tokens] * len(self.flows) if isinstance(tokens, int) else list(tokens)
        return sum(self.bytes_per_token([m]) * per_flow[m.flow] for m in moves)

    def bytes_sent(self, rank: int, tokens: Tokens) -> int:
        return self._bytes(self.sends(rank), tokens)

    def bytes_received(self, rank: int, tokens: Tokens) -> int:
        return self._bytes(self.recvs(rank), tokens)

    def total_bytes_moved(self, tokens: Tokens) -> int:
        return sum(self.bytes_sent(r, tokens) for r in range(self.old.world_size))

    def max_rank_bytes(self, tokens: Tokens) -> int:
        """The busiest rank's traffic: max over ranks of max(sent, received) (duplex links)."""
        return max(
            (max(self.bytes_sent(r, tokens), self.bytes_received(r, tokens))
             for r in range(self.old.world_size)),
            default=0,
        )

    def lower_bound_s(self, tokens: Tokens, bandwidth_bytes_per_s: float) -> float:
        """Transfer time floor when every rank moves at once over its own link."""
        return self.max_rank_bytes(tokens) / bandwidth_bytes_per_s

    def local_layer(self, topo: Topology, rank: int, layer: int) -> int:
        return layer - topo.layer_range(rank, self.shape.num_layers).start

    def local_head(self, topo: Topology, rank: int, head: int) -> int:
        return head - topo.kv_head_range(rank, self.shape.num_kv_heads).start


def _split_even(run: range, parts: int) -> list[range]:
    base, extra = divmod(len(run), parts)
    out, start = [], run.start
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def plan_kv(old: Topology, new: Topology, shape: ModelShape,
            flows: Sequence[tuple[int, int]] | None = None) -> KVPlan:
    """Plan the two-dimensional KV migration (layers for PP, KV-head ranges for TP).

    For each new rank, its layers are cut at the old stage boundaries and its heads at the
    old TP boundaries; each (layer run, head piece) comes from a rank that held it. With
    several holders (replicated KV heads) the layer run is split evenly among them, in a
    rotation that differs per destination so no holder carries every destination's share.

    With replicas (dp > 1), each replica has its own tokens: `flows` names the
    (old replica, new replica) pairs whose tokens move (a merge has one per old replica
    into the new one, a split one per new replica); each is planned as above between the
    two replicas' ranks. Without replicas the one flow is (0, 0).
    """
    if old.world_size != new.world_size:
        raise ValueError(f"world sizes differ: {old.world_size} vs {new.world_size}")
    if flows is None:
        if old.dp > 1 or new.dp > 1:
            raise ValueError("flows: name the (old replica, new replica) pairs whose KV moves")
        flows = ((0, 0),)
    flows = tuple((int(a), int(b)) for a, b in flows)
    for a, b in flows:
        if not (0 <= a < old.dp and 0 <= b < new.dp):
            raise ValueError(f"flows: ({a}, {b}) outside {old.dp} old and {new.dp} new replicas")
    old.check_model(shape)
    new.check_model(shape)
    L, K = shape.num_layers, shape.num_kv_heads
    moves: list[KVMove] = []
    for f, (a, b) in enumerate(flows):
        for dst in new.replica_ranks(b):
            need_layers = new.layer_range(dst, L)
            need_heads = new.kv_head_range(dst, K)
            for stage in range(old.pp):
                run = _intersect(need_layers, _stage_layers(old, stage, L))
                if not run:
                    continue
                held = {
                    old.rank(stage, t, a):
                        [Segment(*_bounds(old.kv_head_range(old.rank(stage, t, a), K)))]
                    for t in range(old.tp)
                }
                for lo, hi, holders in cover(Segment(need_heads.start, need_heads.stop), held):
                    if dst in holders:
                        moves.append(KVMove(dst, dst, run, range(lo, hi), f))
                        continue
                    shift = dst % len(holders)
                    rotated = holders[shift:] + holders[:shift]
                    for src, part in zip(rotated, _split_even(run, len(holders)), strict=True):
                        if part:
                            moves.append(KVMove(src, dst, part, range(lo, hi), f))
    return KVPlan(old, new, shape, tuple(moves), flows)


def _stage_layers(topo: Topology, stage: int, num_layers: int) -> range:
    return topo.layer_range(topo.rank(stage, 0), num_layers)


def _bounds(r: range) -> tuple[int, int]:
    return r.start, r.stop


def _intersect(a: range, b: range) -> range:
    return range(max(a.start, b.start), max(max(a.start, b.start), min(a.stop, b.stop)))


# ---------------------------------------------------------------------------------------
# generic sharded tensors (weights)
@dataclass(frozen=True)
class TensorMove:
    """full[start:stop] along the shard dim of tensor `name`, src -> dst (local offsets)."""

    name: str
    src: int
    dst: int
    start: int
    stop: int
    src_local: int
    dst_local: int

    @property
    def is_local(self) -> bool:
        return self.src == self.dst

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass
class TensorPlan:
    """Moves for a set of sharded tensors; `row_bytes[name]` = bytes of one index."""

    moves: list[TensorMove] = field(default_factory=list)
    row_bytes: dict[str, int] = field(default_factory=dict)

    def bytes_sent(self, rank: int) -> int:
        return sum(m.length * self.row_bytes[m.name] for m in self.moves
                   if m.src == rank and not m.is_local)

    def bytes_received(self, rank: int) -> int:
        return sum(m.length * self.row_bytes[m.name] for m in self.moves
                   if m.dst == rank and not m.is_local)


def plan_tensors(
    old_layout: Mapping[str, Mapping[int, Sequence[Segment]]],
    new_layout: Mapping[str, Mapping[int, Sequence[Segment]]],
    row_bytes: Mapping[str, int],
) -> TensorPlan:
    """Plan moves so every new (rank, tensor) segment is filled from an old holder.

    `*_layout[name][rank]` lists the segments of `name` that rank holds. Among several
    holders the one that has sent the fewest bytes so far is chosen (ties: lowest rank).
    """
    plan = TensorPlan(row_bytes=dict(row_bytes))
    load: dict[int, int] = defaultdict(int)
    for name in sorted(new_layout):
        held = old_layout.get(name, {})
        for dst in sorted(new_layout[name]):
            for seg in new_layout[name][dst]:
                if seg.length == 0:
                    continue
                for a, b, holders in cover(seg, held):
                    src = dst if dst in holders else min(holders, key=lambda r: (load[r], r))
                    if src != dst:
                        load[src] += (b - a) * row_bytes[name]
                    src_seg = _segment_at(held[src], a, b)
                    plan.moves.append(
                        TensorMove(name, src, dst, a, b, src_seg.local_of(a), seg.local_of(a))
                    )
    return plan


def restrict(kv_plan: KVPlan | None, w_plan: TensorPlan | None,
             keep: Callable[[int, int], bool]) -> tuple[KVPlan | None, TensorPlan | None]:
    """The plans less the moves whose (destination, flow) `keep` rejects (weight moves
    have flow -1): a pre-copy's receivers, the pause after it."""
    if kv_plan is not None:
        kv_plan = replace(kv_plan, moves=tuple(m for m in kv_plan.moves
                                               if keep(m.dst, m.flow)))
    if w_plan is not None:
        w_plan = replace(w_plan, moves=[m for m in w_plan.moves if keep(m.dst, -1)])
    return kv_plan, w_plan

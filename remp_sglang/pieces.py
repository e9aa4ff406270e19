"""The order in which a reshape replaces its pieces, and each rank's memory while it does.

A reshape replaces *pieces*: each layer's KV (K and V, one allocation as SGLang makes
it) and each weight tensor. On a rank, a piece holds `old` bytes under the old layout
and `new` bytes under the new one (0 where the rank has none). Pieces go in *stages*:
every rank allocates the new tensors of a stage's pieces (copying the slices it keeps),
the stage's data moves in one exchange, every rank confirms it landed (an agreement),
and only then are the stage's old tensors released. So at any moment a rank holds the
old pieces of the stages still to come and the new ones of the stages done, plus one
stage: never a second pool or a second weight set. And a failure leaves every released
piece complete on its new holders, so the old layout can be rebuilt from them.

Pure functions (no torch): `order_pieces` picks the order, `stages` cuts it, and
`peak_bytes` replays a rank's memory so the engine's own accounting can be checked
against it and `bound` tested over every pair of layouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .planner import KVMove, KVPlan, TensorMove, TensorPlan
from .topology import ModelShape, Topology
from .weights import DenseDecoder, ParamSpec, dense_decoder_params, local_shape, owns

ALIGN = 16  # each transfer's bytes are padded to this inside a message (`exchange.ALIGN`)


@dataclass(frozen=True)
class Piece:
    name: str  # "kv.<layer>" or SGLang's parameter name
    old: tuple[int, ...]  # bytes per launched rank under the old layout
    new: tuple[int, ...]  # ... and under the new one
    layer: int = -1  # a KV piece's layer

    def delta(self, rank: int) -> int:
        return self.new[rank] - self.old[rank]


def kv_pieces(old: Topology, new: Topology, kv: ModelShape, old_rows: Sequence[int],
              new_rows: int) -> list[Piece]:
    """One piece per layer: its K and V on each rank (`old_rows[r]` slots on rank r under
    the old layout, `new_rows` under the new one)."""
    world = old.world_size
    return [Piece(f"kv.{layer}",
                  tuple(_kv_bytes(old, r, layer, kv, old_rows[r]) for r in range(world)),
                  tuple(_kv_bytes(new, r, layer, kv, new_rows) for r in range(world)), layer)
            for layer in range(kv.num_layers)]


def weight_pieces(old: Topology, new: Topology, model: DenseDecoder) -> list[Piece]:
    """One piece per parameter (SGLang's names, `weights.dense_decoder_params`' order)."""
    return [Piece(spec.name, *(tuple(_param_bytes(spec, model, topo, r)
                                     for r in range(old.world_size)) for topo in (old, new)))
            for spec in dense_decoder_params(model)]


def _kv_bytes(topo: Topology, rank: int, layer: int, shape: ModelShape, rows: int) -> int:
    if not topo.is_active(rank) or layer not in topo.layer_range(rank, shape.num_layers):
        return 0
    heads = len(topo.kv_head_range(rank, shape.num_kv_heads))
    return 2 * rows * heads * shape.head_dim * shape.dtype_bytes


def _param_bytes(spec: ParamSpec, model: DenseDecoder, topo: Topology, rank: int) -> int:
    if not owns(spec, model, topo, rank):
        return 0
    return math.prod(local_shape(spec, model, topo, rank)) * model.shape.dtype_bytes


@dataclass(frozen=True)
class Transfer:
    """One message part: `nbytes` of piece `piece` from `src` to `dst`. KV: tokens
    [a, b) of flow `flow` of `move`, at layer `layer`; weights: rows [a, b) of `move`."""

    piece: int
    src: int
    dst: int
    nbytes: int
    move: KVMove | TensorMove
    a: int
    b: int
    flow: int = -1
    layer: int = -1


def transfers(pieces: Sequence[Piece], order: Sequence[int], half_bytes: int,
              kv_plan: KVPlan | None = None, tokens: Sequence[int] = (),
              w_plan: TensorPlan | None = None) -> list[Transfer]:
    """Every rank's transfers, in the pieces' order (every rank derives the same list).
    KV moves are cut into token chunks and weight moves into row chunks so that one
    chunk of every move of a rank fits `half_bytes` (half the staging area)."""
    kv_moves = [m for m in kv_plan.moves if not m.is_local] if kv_plan else []
    w_moves: dict[str, list[TensorMove]] = {}
    for m in w_plan.moves if w_plan else []:
        if not m.is_local:
            w_moves.setdefault(m.name, []).append(m)
    chunk = 1
    if kv_moves:
        world = kv_plan.old.world_size
        per_token = [sum(kv_plan.bytes_per_token([m]) // len(m.layers) for m in kv_moves
                         if r in (m.src, m.dst)) for r in range(world)]
        chunk = max(1, (half_bytes - ALIGN * len(kv_moves)) // max(per_token))
    out: list[Transfer] = []
    for i in order:
        piece = pieces[i]
        if piece.layer >= 0:
            for m in kv_moves:
                if piece.layer not in m.layers:
                    continue
                per_token = kv_plan.bytes_per_token([m]) // len(m.layers)
                n = tokens[m.flow]
                out += [Transfer(i, m.src, m.dst, per_token * (min(n, a + chunk) - a), m, a,
                                 min(n, a + chunk), m.flow, piece.layer)
                        for a in range(0, n, chunk)]
            continue
        row = w_plan.row_bytes[piece.name] if piece.name in w_moves else 0
        step = (half_bytes - ALIGN) // row if row else 0
        if row and step < 1:
            raise ValueError(f"staging too small for one row of {piece.name} ({row} B)")
        for m in w_moves.get(piece.name, []):
            out += [Transfer(i, m.src, m.dst, (min(m.length, a + step) - a) * row, m, a,
                             min(m.length, a + step)) for a in range(0, m.length, step)]
    return out


def totals(pieces: Sequence[Piece], world: int) -> tuple[list[int], list[int]]:
    """(old, new) bytes per rank over all pieces."""
    return ([sum(p.old[r] for p in pieces) for r in range(world)],
            [sum(p.new[r] for p in pieces) for r in range(world)])


def order_pieces(pieces: Sequence[Piece]) -> list[int]:
    """Indices of `pieces` in the order to replace them.

    Pieces that shrink on every rank come first, those that grow on every rank last,
    and the mixed ones between. Within each class, greedy: next comes the piece that
    keeps the worst rank lowest above its cap (the larger of its old and new totals)
    while it is open (its new tensor beside its old one); ties go to the piece that
    leaves the worst rank lowest once it is closed, then the least above the caps over
    all ranks, then the one that frees most. Pieces with
    the same bytes on every rank (the same tensor of layers with the same placement)
    are interchangeable, so only the first of each group is a candidate:
    O(pieces x groups x ranks).
    """
    if not pieces:
        return []
    world = len(pieces[0].old)
    old, new = totals(pieces, world)
    cap = [max(a, b) for a, b in zip(old, new, strict=True)]
    held = list(old)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pieces):
        groups.setdefault((p.old, p.new), []).append(i)
    queues = [list(reversed(g)) for g in groups.values()]  # pop() yields the first
    order: list[int] = []
    while len(order) < len(pieces):
        best, best_key = -1, None
        for q, queue in enumerate(queues):
            if not queue:
                continue
            p = pieces[queue[-1]]
            after = [held[r] + p.delta(r) - cap[r] for r in range(world)]
            deltas = [p.delta(r) for r in range(world)]
            kind = 0 if max(deltas) <= 0 else 2 if min(deltas) >= 0 else 1
            key = (kind, max(held[r] + p.new[r] - cap[r] for r in range(world)), max(after),
                   sum(a for a in after if a > 0), sum(after), queue[-1])
            if best_key is None or key < best_key:
                best, best_key = q, key
        i = queues[best].pop()
        order.append(i)
        for r in range(world):
            held[r] += pieces[i].delta(r)
    return order


def stages(pieces: Sequence[Piece], order: Sequence[int], budget: int) -> list[list[int]]:
    """`order` cut into consecutive stages: a stage ends before a piece whose new tensor
    would take some rank's allocations in the stage past `budget` (a larger piece
    makes a stage of its own)."""
    out: list[list[int]] = []
    opened: list[int] = []
    for i in order:
        p = pieces[i]
        if not out or any(o and o + n > budget for o, n in zip(opened, p.new, strict=True)):
            out.append([])
            opened = [0] * len(p.new)
        out[-1].append(i)
        opened = [o + n for o, n in zip(opened, p.new, strict=True)]
    return out


def peak_bytes(pieces: Sequence[Piece], cut: Sequence[Sequence[int]], rank: int,
               release: bool = True) -> int:
    """The most this rank holds at once: before a stage moves, the old pieces of the
    stages to come and the new ones of the stages done and of this one (only the
    pieces in `cut` take part; without `release` no old piece goes before the end)."""
    held = sum(pieces[i].old[rank] for stage in cut for i in stage)
    peak = held
    for stage in cut:
        held += sum(pieces[i].new[rank] for i in stage)
        peak = max(peak, held)
        if release:
            held -= sum(pieces[i].old[rank] for i in stage)
    return peak


def bound(pieces: Sequence[Piece], rank: int, budget: int) -> int:
    """What a rank may hold at most while its pieces are replaced in stages of `budget`
    (staging apart): the larger of its old and new totals, plus the largest old and new
    pieces (the order cannot always release before it must allocate), plus one stage."""
    if not pieces:
        return 0
    old, new = totals(pieces, len(pieces[0].old))
    big_old = max(max(p.old) for p in pieces)
    big_new = max(max(p.new) for p in pieces)
    return max(old[rank], new[rank]) + big_old + big_new + max(budget, big_new)

"""Bounded-memory, double-buffered point-to-point exchange of packed items.

An item is "src packs `nbytes` into a staging view; dst unpacks them". Every rank builds
the same item list in the same order, so every rank derives the same rounds and the same
message layout without talking: per round and rank, sends plus receives fit in half the
staging budget, and each (src, dst) pair exchanges one packed message per round. Round
i+1 is packed while round i is on the wire, which is why the budget is split in two
halves; the caller's local copies (`local`) run there too.

A *direct* side sends from, or receives into, its own tensors (a run of consecutive
slots holding all of a rank's heads, a weight slice of whole rows): no pack or unpack,
no staging. An item with a direct side travels as its own `parts` messages (K and V),
the other side staging it as usual; both sides know which items are direct (it depends
only on slots and layouts), so they post the same messages in the same order: per pair
and round, the packed message, then each such item's parts in item order (one tag per
round: gloo and NCCL match a pair's messages of one tag in order).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .comm import Communicator

ALIGN = 16  # byte alignment of each item inside a message (16-byte vector copies)


@dataclass(frozen=True)
class Item:
    src: int
    dst: int
    nbytes: int
    pack: Callable[[torch.Tensor], None]  # called on src with a uint8 view of nbytes
    unpack: Callable[[torch.Tensor], None]  # called on dst with a uint8 view of nbytes
    piece: int = -1  # the tensor it belongs to (`pieces.py`), for the caller's accounts
    parts: int = 0  # 0: inside its pair's packed message; k: its own k equal messages
    src_direct: bool = False  # src sends `views()`, no packing (needs parts)
    dst_direct: bool = False  # dst receives into `views()`, then calls `landed()`
    views: Callable[[], list[torch.Tensor]] | None = None  # this rank's direct side
    landed: Callable[[], None] | None = None

    @property
    def padded(self) -> int:
        return -(-self.nbytes // ALIGN) * ALIGN


@dataclass
class ExchangeStats:
    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_direct: int = 0  # sent or received here without staging (a direct side)
    staging_bytes: int = 0  # staging actually allocated on this rank
    seconds: float = 0.0


def schedule_rounds(items: Sequence[Item], round_bytes: int) -> list[list[Item]]:
    """Greedy, order-preserving split so no rank moves more than round_bytes per round
    (a direct side counts as staging too: it bounds how much one round puts in flight)."""
    rounds: list[list[Item]] = []
    load: dict[int, int] = defaultdict(int)
    for item in items:
        if item.padded > round_bytes:
            raise ValueError(
                f"staging_bytes too small: an item of {item.nbytes} B exceeds the "
                f"{round_bytes} B half-budget"
            )
        if item.parts and item.nbytes % item.parts or (
                (item.src_direct or item.dst_direct) and not item.parts):
            raise ValueError(f"an item of {item.nbytes} B cannot travel in {item.parts} parts")
        if not rounds or load[item.src] + item.padded > round_bytes or (
            load[item.dst] + item.padded > round_bytes
        ):
            rounds.append([])
            load.clear()
        rounds[-1].append(item)
        load[item.src] += item.padded
        load[item.dst] += item.padded
    return rounds


@dataclass
class _Round:
    """One round as this rank sees it: where its staged items sit in a staging half and
    the messages it posts, per peer in the order its peer posts the matching ones."""

    items: list[Item]
    placed: list[tuple[Item, int, bool]]  # staged items: (item, offset, outgoing)
    sends: dict[int, list[tuple[int, int] | Item]]  # peer -> staging ranges or direct items
    recvs: dict[int, list[tuple[int, int] | Item]]
    half: int  # staging bytes this rank needs in the round


def _layout(items: Sequence[Item], rank: int) -> _Round:
    """Offsets of this rank's staged items inside one staging half, and its messages."""
    out_items: dict[int, list[Item]] = defaultdict(list)
    in_items: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        if it.src == rank:
            out_items[it.dst].append(it)
        elif it.dst == rank:
            in_items[it.src].append(it)
    placed, offset = [], 0
    messages: tuple[dict, dict] = ({}, {})
    for outgoing, grouped, table in ((True, out_items, messages[0]),
                                     (False, in_items, messages[1])):
        for peer in sorted(grouped):
            msgs: list[tuple[int, int] | Item] = []
            packed = [it for it in grouped[peer] if not it.parts]
            if packed:
                start = offset
                for it in packed:
                    placed.append((it, offset, outgoing))
                    offset += it.padded
                msgs.append((start, offset))
            for it in grouped[peer]:
                if not it.parts:
                    continue
                if it.src_direct if outgoing else it.dst_direct:
                    msgs.append(it)
                    continue
                placed.append((it, offset, outgoing))
                size = it.nbytes // it.parts
                msgs += [(offset + k * size, offset + (k + 1) * size) for k in range(it.parts)]
                offset += it.padded
            table[peer] = msgs
    return _Round(list(items), placed, messages[0], messages[1], offset)


def run_exchange(
    comm: Communicator,
    items: Sequence[Item],
    staging_bytes: int,
    device: torch.device,
    staging: torch.Tensor | None = None,
    local: Sequence[Callable[[], None]] = (),
) -> ExchangeStats:
    """Move every item; raises on the first failure or when a round exceeds the timeout.

    `staging` (uint8, at least staging_bytes) is reused if given: a server keeps one so
    no reshape pays for fresh pages; otherwise the halves are allocated as needed.
    `local` (copies this rank makes between its own tensors) run spread over the rounds,
    while messages are on the wire, so a receiving peer never waits for them.
    """
    stats = ExchangeStats()
    rounds = schedule_rounds(items, staging_bytes // 2)
    stats.rounds = len(rounds)
    layouts = [_layout(r, comm.rank) for r in rounds]
    half = max((lay.half for lay in layouts), default=0)
    if staging is not None and half:
        if staging.dtype != torch.uint8 or staging.numel() < 2 * half:
            raise ValueError(f"staging must be uint8 with >= {2 * half} bytes")
        halves = [staging[:half], staging[half : 2 * half]]
    elif half:
        halves = [torch.empty(half, dtype=torch.uint8, device=device) for _ in range(2)]
    else:
        halves = []
    stats.staging_bytes = 2 * half
    start = time.perf_counter()
    todo = list(local)
    per_round = -(-len(todo) // max(1, len(layouts)))
    pending: tuple[list, _Round, torch.Tensor] | None = None
    for i, lay in enumerate(layouts):
        buf = halves[i % 2] if halves else torch.empty(0, dtype=torch.uint8)
        for it, off, outgoing in lay.placed:
            if outgoing:
                it.pack(buf[off : off + it.nbytes])
        for it in lay.items:
            if it.src == comm.rank:
                stats.bytes_sent += it.nbytes
                stats.bytes_direct += it.nbytes if it.src_direct else 0
        works = comm.exchange(_tensors(lay.sends, buf), _tensors(lay.recvs, buf),
                              tag=comm.next_tag())
        for copy in todo[:per_round]:
            copy()
        del todo[:per_round]
        if pending is not None:
            _finish(comm, pending, stats)
        pending = (works, lay, buf)
    for copy in todo:
        copy()
    if pending is not None:
        _finish(comm, pending, stats)
    stats.seconds = time.perf_counter() - start
    return stats


def _tensors(messages: dict[int, list], buf: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """Each peer's messages as tensors: staging ranges, or a direct item's own views."""
    out: dict[int, list[torch.Tensor]] = {}
    for peer, msgs in messages.items():
        out[peer] = []
        for m in msgs:
            if isinstance(m, Item):
                views = m.views()
                if len(views) != m.parts or sum(v.numel() for v in views) != m.nbytes:
                    raise ValueError(f"direct views of {m.nbytes} B in {m.parts} parts "
                                     f"do not match: {[v.numel() for v in views]}")
                out[peer] += views
            else:
                out[peer].append(buf[m[0] : m[1]])
    return out


def _finish(comm: Communicator, pending, stats: ExchangeStats) -> None:
    """Wait for one round (bounded by the communicator's timeout) and unpack it."""
    works, lay, buf = pending
    comm.wait(works, time.monotonic() + comm.timeout_s)
    for it, off, outgoing in lay.placed:
        if not outgoing:
            it.unpack(buf[off : off + it.nbytes])
    for it in lay.items:
        if it.dst == comm.rank:
            stats.bytes_received += it.nbytes
            if it.dst_direct:
                stats.bytes_direct += it.nbytes
                if it.landed is not None:
                    it.landed()

"""Bounded-memory, double-buffered point-to-point exchange of packed items.

An item is "src packs `nbytes` into a staging view; dst unpacks them". Every rank builds
the same item list in the same order, so every rank derives the same rounds and the same
message layout without talking: per round and rank, sends plus receives fit in half the
staging budget, and each (src, dst) pair exchanges one message per round. Round i+1 is
packed while round i is on the wire, which is why the budget is split in two halves.
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

    @property
    def padded(self) -> int:
        return -(-self.nbytes // ALIGN) * ALIGN


@dataclass
class ExchangeStats:
    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    staging_bytes: int = 0  # staging actually allocated on this rank
    seconds: float = 0.0


def schedule_rounds(items: Sequence[Item], round_bytes: int) -> list[list[Item]]:
    """Greedy, order-preserving split so no rank moves more than round_bytes per round."""
    rounds: list[list[Item]] = []
    load: dict[int, int] = defaultdict(int)
    for item in items:
        if item.padded > round_bytes:
            raise ValueError(
                f"staging_bytes too small: an item of {item.nbytes} B exceeds the "
                f"{round_bytes} B half-budget"
            )
        if not rounds or load[item.src] + item.padded > round_bytes or (
            load[item.dst] + item.padded > round_bytes
        ):
            rounds.append([])
            load.clear()
        rounds[-1].append(item)
        load[item.src] += item.padded
        load[item.dst] += item.padded
    return rounds


def _layout(items: Sequence[Item], rank: int) -> tuple[dict, dict, list, int]:
    """Offsets of this rank's outgoing and incoming messages inside one staging half."""
    out_items: dict[int, list[Item]] = defaultdict(list)
    in_items: dict[int, list[Item]] = defaultdict(list)
    for it in items:
        if it.src == rank:
            out_items[it.dst].append(it)
        elif it.dst == rank:
            in_items[it.src].append(it)
    sends, recvs, placed, offset = {}, {}, [], 0
    for table, grouped in ((sends, out_items), (recvs, in_items)):
        for peer in sorted(grouped):
            start = offset
            for it in grouped[peer]:
                placed.append((it, offset, table is sends))
                offset += it.padded
            table[peer] = (start, offset)
    return sends, recvs, placed, offset


def run_exchange(
    comm: Communicator,
    items: Sequence[Item],
    staging_bytes: int,
    device: torch.device,
    staging: torch.Tensor | None = None,
) -> ExchangeStats:
    """Move every item; raises on the first failure or when a round exceeds the timeout.

    `staging` (uint8, at least staging_bytes) is reused if given: a server keeps one so
    no reshape pays for fresh pages; otherwise the halves are allocated as needed.
    """
    stats = ExchangeStats()
    rounds = schedule_rounds(items, staging_bytes // 2)
    stats.rounds = len(rounds)
    layouts = [_layout(r, comm.rank) for r in rounds]
    half = max((lay[3] for lay in layouts), default=0)
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
    pending: tuple[list, list, torch.Tensor] | None = None
    for i, (sends, recvs, placed, _) in enumerate(layouts):
        buf = halves[i % 2] if halves else torch.empty(0, dtype=torch.uint8)
        for it, off, outgoing in placed:
            if outgoing:
                it.pack(buf[off : off + it.nbytes])
                stats.bytes_sent += it.nbytes
        works = comm.exchange(
            {p: buf[a:b] for p, (a, b) in sends.items()},
            {p: buf[a:b] for p, (a, b) in recvs.items()},
            tag=comm.next_tag(),
        )
        if pending is not None:
            _finish(comm, pending, stats)
        pending = (works, placed, buf)
    if pending is not None:
        _finish(comm, pending, stats)
    stats.seconds = time.perf_counter() - start
    return stats


def _finish(comm: Communicator, pending, stats: ExchangeStats) -> None:
    """Wait for one round (bounded by the communicator's timeout) and unpack it."""
    works, placed, buf = pending
    comm.wait(works, time.monotonic() + comm.timeout_s)
    for it, off, outgoing in placed:
        if not outgoing:
            it.unpack(buf[off : off + it.nbytes])
            stats.bytes_received += it.nbytes

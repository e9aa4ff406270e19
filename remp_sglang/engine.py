"""The distributed reshape engine: KV cache and weight shards to a new topology.

Runs on every launched rank with the same arguments (apart from the rank's own tensors):
plan (pure, identical everywhere) -> validate and agree -> per stage of pieces
(`pieces.py`: each layer's KV, each weight tensor, in an order that keeps every rank near
the larger of its old and new totals): allocate the stage's new tensors, one
point-to-point exchange in bounded rounds for KV and weights together, confirm, and,
with `release_old`, release the stage's old tensors in place (SGLang's own references
see them go) -> agree. Nothing is written to an old tensor; without `release_old` a
failure anywhere (every rank raises `MigrationError`) leaves the caller free to keep
serving on the old topology; with it, `restore` moves the released pieces back.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import kernels
from .comm import Communicator, MigrationError
from .exchange import Item, run_exchange
from .pieces import (
    Piece,
    Transfer,
    bound,
    kv_pieces,
    order_pieces,
    peak_bytes,
    stages,
    transfers,
    weight_pieces,
)
from .planner import KVPlan, plan_kv, restrict
from .topology import ModelShape, Topology
from .weights import (
    DenseDecoder,
    ParamSpec,
    dense_decoder_params,
    local_shape,
    owns,
    plan_weights,
)

DEFAULT_STAGING_BYTES = 64 << 20
# An item smaller than this is packed even where a side could send or receive it as it
# lies: a message of its own costs more than copying it (about 0.1 ms on loopback).
DIRECT_MIN_BYTES = 256 << 10

# Test hook: called as fault(step, rank) at each step; raising there simulates a failure.
FaultHook = Callable[[str, int], None]


@dataclass
class KVPool:
    """One rank's KV cache: per local layer, K and V of shape [slots, heads, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def num_slots(self) -> int:
        return max((t.shape[0] for t in self.k), default=0)  # layers may be placeholders

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class MigrationStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_direct: int = 0  # of those, sent from or received into the pools themselves
    bytes_kept: int = 0  # copied locally from the old into the new pool
    rounds: int = 0
    staging_bytes: int = 0
    peak_bytes: int = 0  # most held at once on this rank: open pieces + staging
    predicted_peak_bytes: int = 0  # the same, replayed from the plan (`pieces.peak_bytes`)
    bound_bytes: int = 0  # what it may reach (`pieces.bound`) + staging
    held_bytes: tuple[int, int] = (0, 0)  # this rank's pieces before and after
    lower_bound_bytes: int = 0  # the busiest rank's max(sent, received), from the plan
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class KVMigration:
    pool: KVPool | None  # None on a rank parked in the new topology
    new_slots: torch.Tensor  # new slot index of each live slot (the first flow's)
    compacted: bool  # a flow without destination slots had some moved
    stats: MigrationStats


class CapacityError(ValueError):
    """The live KV slots do not fit the new pool (raised before anything moves)."""


def remap_slots(live_slots: torch.Tensor, new_num_slots: int, reserved: int = 1) -> torch.Tensor:
    """New index of each live slot: unchanged when it fits, else moved to a free slot
    (the lowest free ones, in the order of the old slots: a run of old slots stays a run,
    which the engine moves without packing).

    Slots below `reserved` are never handed out (SGLang keeps slot 0 as padding).
    Raises ValueError when the live slots cannot fit.
    """
    live = live_slots.to(torch.int64).cpu()
    usable = new_num_slots - reserved
    if live.numel() > usable:
        raise CapacityError(
            f"{live.numel()} live KV slots do not fit the new pool's {usable} usable slots"
        )
    if live.unique().numel() != live.numel():
        raise ValueError("live_slots contains duplicates")
    fits = live < new_num_slots
    if bool(fits.all()):
        return live
    taken = torch.zeros(new_num_slots, dtype=torch.bool)
    taken[:reserved] = True
    taken[live[fits]] = True
    free = (~taken).nonzero().flatten()
    out = live.clone()
    moved = (~fits).nonzero().flatten()
    out[moved[torch.argsort(live[moved])]] = free[: moved.numel()]
    return out


def _check_pool(pool: KVPool | None, topo: Topology, rank: int, shape: ModelShape,
                name: str, layers: Collection[int] | None = None) -> None:
    """`pool` holds this rank's layers and heads under `topo` (`layers`: only these
    global layers need to be there; the others may be empty placeholders)."""
    if not topo.is_active(rank):
        if pool is not None and pool.k:
            raise ValueError(f"{name}: rank {rank} is parked in {topo} but holds a KV pool")
        return
    if pool is None:
        raise ValueError(f"{name}: rank {rank} is active in {topo} but has no KV pool")
    held = topo.layer_range(rank, shape.num_layers)
    heads = len(topo.kv_head_range(rank, shape.num_kv_heads))
    if len(pool.k) != len(held) or len(pool.v) != len(held):
        raise ValueError(f"{name}: expected {len(held)} layers of K and V on rank {rank}, "
                         f"got {len(pool.k)} and {len(pool.v)}")
    for j, layer in enumerate(held):
        if layers is not None and layer not in layers:
            continue
        for t in (pool.k[j], pool.v[j]):
            if tuple(t.shape[1:]) != (heads, shape.head_dim) or not t.is_contiguous():
                raise ValueError(f"{name}: rank {rank} buffers must be contiguous [slots, "
                                 f"{heads}, {shape.head_dim}], got {list(t.shape)}")


@dataclass(frozen=True)
class SlotFlow:
    """The tokens one old replica hands one new replica: its slot `src_slots[i]` becomes
    the new replica's slot `dst_slots[i]` (the same on every rank). Without `dst_slots`
    each slot keeps its index where it fits and the rest are compacted (`remap_slots`)."""

    src_replica: int
    dst_replica: int
    src_slots: torch.Tensor
    dst_slots: torch.Tensor | None = None


def _check_flows(flows: Sequence[SlotFlow], old: Topology, new: Topology, rank: int,
                 old_pool: KVPool | None, new_num_slots: int, reserved: int) -> None:
    """Every flow maps slots of its old replica's pool to distinct usable slots of its
    new replica's pool (ValueError naming the flow otherwise)."""
    taken: dict[int, list[torch.Tensor]] = {}
    for i, f in enumerate(flows):
        src, dst = f.src_slots, f.dst_slots
        if src.shape != dst.shape or src.dim() != 1:
            raise ValueError(f"flows[{i}]: src_slots and dst_slots must be equal 1-D lists")
        if dst.numel() and (int(dst.min()) < reserved or int(dst.max()) >= new_num_slots):
            raise ValueError(f"flows[{i}]: destination slots must lie in "
                             f"{reserved}..{new_num_slots - 1}")
        if (old_pool is not None and old_pool.num_slots and old.is_active(rank)
                and old.replica(rank) == f.src_replica and _max(src) >= old_pool.num_slots):
            raise ValueError(f"flows[{i}]: live slot {_max(src)} outside the old pool's "
                             f"{old_pool.num_slots} slots")
        taken.setdefault(f.dst_replica, []).append(dst.to(torch.int64).cpu())
    for replica, parts in taken.items():
        every = torch.cat(parts)
        if every.unique().numel() != every.numel():
            raise ValueError(f"flows: two tokens land in one slot of new replica {replica}")


def _max(t: torch.Tensor) -> int:
    return int(t.max()) if t.numel() else -1


def migrate_kv(comm: Communicator, old: Topology, new: Topology, shape: ModelShape,
               old_pool: KVPool | None, live_slots: torch.Tensor, new_num_slots: int,
               **options: Any) -> KVMigration:
    """Give this rank its KV pool for `new`, holding the old values of every live slot
    (one replica on each side; `migrate_kv_flows` moves KV between replicas and takes
    the same keyword `options`).

    `live_slots` (identical on every rank, as SGLang's replicated allocator makes it)
    are the slots to keep; they keep their index unless the new pool is too small, then
    they are compacted and `new_slots` says where each went.
    """
    live = live_slots.to(torch.int64).cpu()
    return migrate_kv_flows(comm, old, new, shape, old_pool, [SlotFlow(0, 0, live)],
                            new_num_slots, **options)


def migrate_kv_flows(
    comm: Communicator,
    old: Topology,
    new: Topology,
    shape: ModelShape,
    old_pool: KVPool | None,
    flows: Sequence[SlotFlow],
    new_num_slots: int,
    *,
    dtype: torch.dtype,
    reserved_slots: int = 1,
    **options: Any,
) -> KVMigration:
    """Give this rank its KV pool for `new` (`new_num_slots` slots in every replica),
    filled by `flows`: a merge of replicas has one flow per old replica into the new one
    (their slots renumbered apart), a split one per new replica (a prefix several new
    replicas keep is in each of their flows). All flows move in one exchange.

    `options` are `relayout`'s (device, staging, release_old, fault)."""
    res = relayout(comm, old, new, kv=KVPart(shape, dtype, old_pool, flows, new_num_slots,
                                             reserved_slots), **options)
    return KVMigration(res.pool, res.new_slots, res.compacted, res.stats)


@dataclass
class WeightReshard:
    params: dict[str, torch.Tensor]  # this rank's parameters for the new topology
    stats: MigrationStats


def reshard_weights(comm: Communicator, old: Topology, new: Topology, model: DenseDecoder,
                    old_params: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                    **options: Any) -> WeightReshard:
    """This rank's parameters for `new`, moved from the ranks holding them (no checkpoint).

    `old_params` maps SGLang parameter names to this rank's local shards under `old`
    (empty on a parked rank). `options` are `relayout`'s."""
    res = relayout(comm, old, new, weights=WeightPart(model, dtype, old_params), **options)
    return WeightReshard(res.params, res.stats)


# ---------------------------------------------------------------------------------------
# one exchange for KV and weights, piece by piece
@dataclass
class KVPart:
    shape: ModelShape  # the model's KV geometry, with the cache's element size
    dtype: torch.dtype  # the cache's storage dtype
    old_pool: KVPool | None
    flows: Sequence[SlotFlow]
    new_num_slots: int
    reserved_slots: int = 1


@dataclass
class WeightPart:
    model: DenseDecoder
    dtype: torch.dtype
    old_params: Mapping[str, torch.Tensor]


@dataclass
class Relayout:
    params: dict[str, torch.Tensor]  # this rank's parameters for the new topology
    pool: KVPool | None  # its KV pool (None when parked, or without a KV part)
    new_slots: torch.Tensor  # new slot index of each live slot (the first flow's)
    compacted: bool  # a flow without destination slots had some moved
    stats: MigrationStats
    bytes_sent: dict[str, int] = field(default_factory=dict)  # per part: "kv", "weights"
    bytes_kept: dict[str, int] = field(default_factory=dict)  # copied locally, per part
    run: Any = field(default=None, repr=False)  # this rank's side, for `restore`


def release(*tensors: torch.Tensor) -> None:
    """Free tensors' memory in place: the same objects (held by SGLang's pool lists and
    modules too) become empty, so their storage goes though they are still referenced.
    A view's base goes with it (SGLang's K and V halves of one layer share one)."""
    with torch.no_grad():
        for t in tensors:
            base = t._base
            t.set_()
            if base is not None:
                base.set_()


def relayout(
    comm: Communicator,
    old: Topology,
    new: Topology,
    kv: KVPart | None = None,
    weights: WeightPart | None = None,
    *,
    device: torch.device | str = "cpu",
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    staging: torch.Tensor | None = None,
    release_old: bool = False,
    fault: FaultHook | None = None,
    only: Collection[str] | None = None,
    stage_bytes: int | None = None,
    direct_min_bytes: int = DIRECT_MIN_BYTES,
    receivers: Collection[int] | None = None,
    pre: PreCopy | None = None,
    dirty: Sequence[torch.Tensor] = (),
) -> Relayout:
    """This rank's KV pool and weights for `new`, in one exchange.

    `staging`, a uint8 buffer of `staging_bytes` kept by the caller, avoids allocating
    staging per call. With `release_old`, each old layer's KV and each old weight tensor
    is released as soon as its data has left this rank (the caller then cannot serve
    the old layout from them again; if the transfer fails, `RelayoutFailed` carries
    what `restore` needs); `stats.peak_bytes` is the most the pieces and the staging
    held at once on this rank; `stats.seconds`: "open" (allocating new tensors and
    copying what a rank keeps), "exchange" (the rounds: pack, send, receive, unpack)
    and "transfer" (all of it, agreements included). Pieces move in stages
    (`pieces.stages`) that allocate at most `stage_bytes` (default: `staging_bytes`)
    on a rank, or one larger piece, before the stage's old tensors are released.
    `only`: the names of the pieces to move (`restore`); the others are neither read
    nor made. Items of at least `direct_min_bytes` with a side holding whole rows move
    without packing on that side (`exchange`).

    `receivers`: only these ranks receive (the others send and allocate nothing;
    `precopy`). `pre`: what `precopy` already gave the joining ranks; they reuse its
    tensors and receive only the weights it lacks (none) and the live slots it did not
    copy or that were written since (`dirty`: per old replica, the slots allocated after
    its snapshot).
    """
    rank, stats, t0 = comm.rank, MigrationStats(), time.perf_counter()
    device = torch.device(device)
    kv_plan, w_plan, flows, remapped = None, None, [], []
    error: BaseException | None = None
    try:
        if kv is not None:
            kv_plan = plan_kv(old, new, kv.shape,
                              [(f.src_replica, f.dst_replica) for f in kv.flows])
            _check_pool(kv.old_pool, old, rank, kv.shape, "old_pool", None if only is None
                        else [i for i in range(kv.shape.num_layers) if f"kv.{i}" in only])
            remapped = [f.dst_slots is None for f in kv.flows]
            flows = [f if f.dst_slots is not None else replace(
                f, dst_slots=remap_slots(f.src_slots, kv.new_num_slots, kv.reserved_slots))
                for f in kv.flows]
            _check_flows(flows, old, new, rank, kv.old_pool, kv.new_num_slots,
                         kv.reserved_slots)
        if weights is not None:
            w_plan = plan_weights(old, new, weights.model)
            _check_params(weights, old, rank, only)
        if pre is not None:
            flows, kv_plan, w_plan = _after_precopy(pre, rank, old, new, kv, flows, kv_plan,
                                                    w_plan, dirty)
        elif receivers is not None:
            kv_plan, w_plan = restrict(kv_plan, w_plan, lambda dst, flow: dst in receivers)
        if fault:
            fault("plan", rank)
    except Exception as exc:  # agreed on below: every rank raises
        error = exc
    old_rows = kv.old_pool.num_slots if kv and kv.old_pool and kv.old_pool.k else 0
    rows = comm.agree(error, "reshape planning", info=old_rows)
    stats.seconds["plan"] = time.perf_counter() - t0

    run = _Run(rank, old, new, kv, weights, kv_plan, w_plan, flows, rows, device,
               release_old, fault, only, direct_min_bytes, receivers, pre)
    cut = stages(run.pieces, run.order, stage_bytes or staging_bytes)
    tokens = [f.src_slots.numel() for f in flows]
    t1 = time.perf_counter()
    stats.seconds["open"] = stats.seconds["exchange"] = 0.0
    error = None
    for stage in cut:
        try:
            t2 = time.perf_counter()
            for i in stage:
                run.open(i)
            stats.seconds["open"] += time.perf_counter() - t2
            items = [run.item(t) for t in transfers(run.pieces, stage, staging_bytes // 2,
                                                    kv_plan, tokens, w_plan)]
            run.expect(items)
            local, run.local = run.local, []
            ex = run_exchange(comm, items, staging_bytes, device, staging, local)
            stats.seconds["exchange"] += ex.seconds
            stats.rounds += ex.rounds
            stats.staging_bytes = max(stats.staging_bytes, ex.staging_bytes)
            stats.bytes_sent += ex.bytes_sent
            stats.bytes_received += ex.bytes_received
            stats.bytes_direct += ex.bytes_direct
        except Exception as exc:  # straight to the vote: peers waiting on this rank see it
            error = exc
            break
        try:  # every rank has all of the stage before any old tensor goes
            comm.confirm("reshape transfer")
        except MigrationError as exc:
            error = exc
            break
        for i in stage:
            run.close(i)
    try:
        comm.agree(error, "reshape transfer")
    except MigrationError as exc:
        if not release_old:
            raise
        failed = RelayoutFailed(str(exc))
        failed.failed_step, failed.run = exc.failed_step, run
        raise failed from exc
    stats.seconds["transfer"] = time.perf_counter() - t1
    stats.predicted_peak_bytes = peak_bytes(run.pieces, cut, rank, release_old) + \
        stats.staging_bytes
    stats.bound_bytes = bound([run.pieces[i] for i in run.order], rank,
                              stage_bytes or staging_bytes) + stats.staging_bytes
    stats.bytes_kept = sum(run.kept.values())
    stats.peak_bytes = run.peak + stats.staging_bytes
    stats.held_bytes = (run.start, run.held)
    stats.lower_bound_bytes = run.busiest_bytes()
    stats.seconds["total"] = time.perf_counter() - t0
    new_slots = flows[0].dst_slots.cpu() if flows else torch.empty(0, dtype=torch.int64)
    compacted = any(r and not torch.equal(f.dst_slots.cpu(), f.src_slots.to(torch.int64).cpu())
                    for r, f in zip(remapped, flows[:len(remapped)], strict=True))
    pool = run.new_pool if kv is not None and new.is_active(rank) else None
    return Relayout(run.new_params, pool, new_slots, compacted, stats, dict(run.sent),
                    dict(run.kept), run)


@dataclass
class PreCopy:
    """What `precopy` moved while the old layout still served: the joining ranks' new
    weights, whole, and the KV rows of a snapshot of slots, in their new tensors. A later
    `relayout(..., pre=)` between the same layouts moves only the rest."""

    old: Topology
    new: Topology
    ranks: frozenset[int]  # the joining ranks: parked in `old`, active in `new`
    flows: list[SlotFlow]  # the snapshot's rows as copied (destination slots set)
    pool: KVPool | None  # this rank's new pool (joining ranks only)
    params: dict[str, torch.Tensor]  # this rank's new weights (joining ranks only)
    stats: MigrationStats
    bytes_sent: dict[str, int]  # per part, summed over this rank's sends


def joining(old: Topology, new: Topology) -> frozenset[int]:
    """Ranks parked in `old` and active in `new`: their whole budget is free while the
    old layout serves, so they can receive before the pause."""
    return frozenset(r for r in new.active_ranks if not old.is_active(r))


def precopy(comm: Communicator, old: Topology, new: Topology, kv: KVPart,
            weights: WeightPart, **options: Any) -> PreCopy:
    """Give the joining ranks their new weights and the KV rows of `kv.flows` (a snapshot
    of slots whose rows no longer change while they stay allocated) while the old layout
    serves: senders only read their tensors, and allocate nothing but staging; nothing
    old is released. Every launched rank calls it alike (ValueError everywhere if no
    rank joins). `options` are `relayout`'s."""
    ranks = joining(old, new)
    if not ranks:
        raise ValueError(f"no rank joins from {old} to {new}: nothing to pre-copy")
    res = relayout(comm, old, new, kv, weights, receivers=ranks,
                   **{**options, "release_old": False})
    mine = comm.rank in ranks
    return PreCopy(old, new, ranks, list(res.run.flows), res.pool if mine else None,
                   res.params if mine else {}, res.stats, dict(res.bytes_sent))


def _after_precopy(pre: PreCopy, rank: int, old: Topology, new: Topology, kv: KVPart | None,
                   flows: list[SlotFlow], kv_plan: KVPlan | None, w_plan: Any,
                   dirty: Sequence[torch.Tensor]) -> tuple[list[SlotFlow], KVPlan | None, Any]:
    """Flows and plans of a pause after `pre`: ranks that did not join move as without
    it; the joining ranks receive no weights and, per flow, only the pairs `pre` did not
    copy to the same slot or whose slot was written since (`dirty`). Those pairs travel
    as extra flows (index + len(flows)) that only the joining ranks receive."""
    if (pre.old, pre.new) != (old, new):
        raise ValueError(f"pre: copied for {pre.old} -> {pre.new}, not this reshape")
    if rank in pre.ranks and kv is not None and pre.pool is not None and \
            pre.pool.num_slots != kv.new_num_slots:
        raise ValueError(f"pre: its pool has {pre.pool.num_slots} slots, the reshape's "
                         f"{kv.new_num_slots}")
    n = len(flows)
    rest = [_rest(f, pre.flows, dirty[f.src_replica] if f.src_replica < len(dirty)
                  else torch.empty(0, dtype=torch.int64)) for f in flows]
    if kv_plan is not None:
        kv_plan = plan_kv(kv_plan.old, kv_plan.new, kv_plan.shape,
                          [(f.src_replica, f.dst_replica) for f in flows + rest])
    kv_plan, w_plan = restrict(
        kv_plan, w_plan, lambda dst, flow: (dst in pre.ranks) == (flow >= n))
    return flows + rest, kv_plan, w_plan


def _rest(flow: SlotFlow, copied: Sequence[SlotFlow], dirty: torch.Tensor) -> SlotFlow:
    """The pairs of `flow` that `copied` lacks: not copied to the same new slot, or
    written since (`dirty`). Array operations over a table of slots, no loop per slot."""
    src, dst = flow.src_slots.to(torch.int64).cpu(), flow.dst_slots.to(torch.int64).cpu()
    same = [c for c in copied if (c.src_replica, c.dst_replica) ==
            (flow.src_replica, flow.dst_replica)]
    size = max([_max(src)] + [_max(c.src_slots) for c in same]) + 1
    table = torch.full((size,), -1, dtype=torch.int64)
    for c in same:
        table[c.src_slots.to(torch.int64).cpu()] = c.dst_slots.to(torch.int64).cpu()
    clean = table[src] == dst
    marks = dirty.to(torch.int64).cpu()
    marks = marks[marks < size]
    if marks.numel():
        written = torch.zeros(size, dtype=torch.bool)
        written[marks] = True
        clean &= ~written[src]
    return SlotFlow(flow.src_replica, flow.dst_replica, src[~clean], dst[~clean])


class RelayoutFailed(MigrationError):
    """A transfer with `release_old` failed: `run` is this rank's side of it (what it
    released, what landed here), for `restore`."""

    run: Any = None


def restore(comm: Communicator, moved: Relayout | RelayoutFailed, *,
            device: torch.device | str = "cpu", staging_bytes: int = DEFAULT_STAGING_BYTES,
            staging: torch.Tensor | None = None) -> None:
    """Undo an in-place relayout, done or failed, on every rank alike: each piece some
    rank released is rebuilt under the old layout from the new tensors that received it
    (a reverse relayout of just those pieces) and put back into the SAME tensor objects,
    so SGLang's modules and pool hold their data again. Raises `MigrationError` if a
    released piece is not complete on its new holders (stages make that impossible
    while every rank lives). Waits for every rank until the deadline, however silent."""
    comm.patient = True  # a rank that stopped answering may be back before the deadline
    try:
        _restore(comm, moved.run, device, staging_bytes, staging)
    finally:
        comm.patient = False


def _restore(comm: Communicator, run: _Run, device: torch.device | str, staging_bytes: int,
             staging: torch.Tensor | None) -> None:
    comm.resync()
    states = comm.agree(None, "restore: what moved", info={
        "released": sorted(run.pieces[i].name for i in run.released),
        "complete": sorted(run.pieces[i].name for i in run.complete())})
    index = {p.name: i for i, p in enumerate(run.pieces)}
    back = {name for state in states for name in state["released"]}
    lost = sorted(name for name in back for r, state in enumerate(states)
                  if run.pieces[index[name]].new[r] and name not in state["complete"])
    if lost:
        raise MigrationError(f"restore: {lost[:3]} were released before every rank had "
                             "received them")
    for name in back:  # a rank that kept its old copy gets it back like the others
        i = index[name]
        if i not in run.released and run.pieces[i].old[run.rank]:
            run.close(i)
    rev = relayout(
        comm, run.new, run.old,
        KVPart(run.kv.shape, run.kv.dtype, run.new_pool, _reversed(run.flows),
               max(run.old_rows), run.kv.reserved_slots) if run.kv else None,
        WeightPart(run.weights.model, run.weights.dtype, run.new_params)
        if run.weights else None,
        device=device, staging_bytes=staging_bytes, staging=staging, release_old=True,
        only=back)
    run.put_back(back, rev)


def _reversed(flows: Sequence[SlotFlow]) -> list[SlotFlow]:
    """Flows from the new replicas back to the old: each old slot from one source (a
    split gave several new replicas the same tokens; the first one returns them)."""
    seen: dict[int, torch.Tensor] = {}
    out = []
    for f in flows:
        back_to, back_from = f.src_slots.to(torch.int64), f.dst_slots.to(torch.int64)
        prev = seen.get(f.src_replica)
        if prev is not None:
            keep = ~torch.isin(back_to, prev)
            back_to, back_from = back_to[keep], back_from[keep]
            seen[f.src_replica] = torch.cat([prev, back_to])
        else:
            seen[f.src_replica] = back_to
        out.append(SlotFlow(f.dst_replica, f.src_replica, back_from, back_to))
    return out


def _check_params(part: WeightPart, old: Topology, rank: int,
                  only: Collection[str] | None) -> None:
    model, dtype = part.model, part.dtype
    for spec in dense_decoder_params(model):
        if owns(spec, model, old, rank) and (only is None or spec.name in only):
            want = local_shape(spec, model, old, rank)
            have = part.old_params.get(spec.name)
            if have is None or tuple(have.shape) != want or have.dtype != dtype:
                got = None if have is None else (list(have.shape), have.dtype)
                raise ValueError(f"old_params[{spec.name!r}] on rank {rank}: expected {want} "
                                 f"{dtype}, got {got}")
    if dtype.itemsize != model.shape.dtype_bytes:
        raise ValueError(f"dtype {dtype} disagrees with model.shape.dtype_bytes="
                         f"{model.shape.dtype_bytes}")


class _Run:
    """One rank's side of a relayout: its pieces, their items, and what it holds."""

    def __init__(self, rank: int, old: Topology, new: Topology, kv: KVPart | None,
                 weights: WeightPart | None, kv_plan: KVPlan | None, w_plan: Any,
                 flows: list[SlotFlow], old_rows: list[int], device: torch.device,
                 release_old: bool, fault: FaultHook | None,
                 only: Collection[str] | None = None,
                 direct_min_bytes: int = DIRECT_MIN_BYTES,
                 receivers: Collection[int] | None = None,
                 pre: PreCopy | None = None) -> None:
        self.rank, self.old, self.new, self.kv, self.weights = rank, old, new, kv, weights
        # Whether this rank makes its new tensors here (not: it only sends, `precopy`),
        # and the pre-copied ones it takes instead (the pause after `precopy`).
        self.makes = receivers is None or rank in receivers
        self.pre = pre if pre is not None and rank in pre.ranks else None
        self.direct_min_bytes = direct_min_bytes
        self.kv_plan, self.w_plan, self.device = kv_plan, w_plan, device
        self.release_old, self.fault = release_old, fault
        # Each flow's pairs in the order of their old slots: runs of consecutive slots
        # then travel without packing (`_kv_item`). `runs` counts, per flow and side,
        # the breaks in consecutiveness up to each position (on host copies: every rank
        # decides the same, without a device sync per item).
        self.slots, self.runs = [], []
        for f in flows:
            src, dst = f.src_slots.to(torch.int64).cpu(), f.dst_slots.to(torch.int64).cpu()
            order = torch.argsort(src)
            src, dst = src[order], dst[order]
            self.runs.append((src, dst, _breaks(src), _breaks(dst)))
            self.slots.append((src.to(device), dst.to(device)))
        self.local: list[Callable[[], None]] = []  # copies within this rank, to run
        self.pieces: list[Piece] = []
        if kv is not None:
            s = kv.shape
            self.pieces += kv_pieces(old, new, s, old_rows, kv.new_num_slots)
            layers = len(new.layer_range(rank, s.num_layers)) if new.is_active(rank) else 0
            self.new_pool = KVPool(
                [torch.empty(0, dtype=kv.dtype, device=device)] * layers,
                [torch.empty(0, dtype=kv.dtype, device=device)] * layers)
        self.new_params: dict[str, torch.Tensor] = {}
        self.specs: dict[str, ParamSpec] = {}
        if weights is not None:
            self.pieces += weight_pieces(old, new, weights.model)
            self.specs = {spec.name: spec for spec in dense_decoder_params(weights.model)}
        self.flows, self.old_rows = flows, old_rows
        self.order = [i for i in _order(tuple(self.pieces))
                      if only is None or self.pieces[i].name in only]
        self.start = self.held = self.peak = sum(self.pieces[i].old[rank] for i in self.order)
        self.opened: set[int] = set()
        self.released: set[int] = set()  # pieces whose old tensor this rank let go
        self.incoming: dict[int, int] = {}  # items still to land per opened piece
        self.sent: dict[str, int] = {"kv": 0, "weights": 0}
        self.kept: dict[str, int] = {"kv": 0, "weights": 0}

    # ------------------------------------------------------------------ open and close
    def expect(self, items: list[Item]) -> None:
        """Count the items that will land here, per piece (`complete`)."""
        for it in items:
            if it.dst == self.rank:
                self.incoming[it.piece] = self.incoming.get(it.piece, 0) + 1

    def landed(self, i: int) -> None:
        self.incoming[i] -= 1

    def complete(self) -> set[int]:
        """Pieces whose new tensor on this rank holds all its data (or that it lacks)."""
        return {i for i in self.order if not self.pieces[i].new[self.rank]
                or (i in self.opened and not self.incoming.get(i))}

    def open(self, i: int) -> None:
        """Allocate piece i's new tensor here and copy the slices this rank keeps."""
        self.opened.add(i)
        if not self.makes:
            return
        piece = self.pieces[i]
        if piece.layer >= 0:
            self._open_kv(piece.layer)
        else:
            self._open_param(self.specs[piece.name])
        self.held += self.pieces[i].new[self.rank]
        self.peak = max(self.peak, self.held)

    def put_back(self, names: Collection[str], rev: Relayout) -> None:
        """The restored tensors into the old objects (`restore`)."""
        with torch.no_grad():
            for i in self.order:
                piece = self.pieces[i]
                if piece.name not in names or not piece.old[self.rank]:
                    continue
                if piece.layer >= 0:
                    j = self._local_layer(self.old, piece.layer)
                    self.kv.old_pool.k[j].set_(rev.pool.k[j])
                    self.kv.old_pool.v[j].set_(rev.pool.v[j])
                else:
                    self.weights.old_params[piece.name].set_(rev.params[piece.name])

    def close(self, i: int) -> None:
        """Release piece i's old tensor here (with `release_old`)."""
        if not self.release_old:
            return
        piece = self.pieces[i]
        if piece.old[self.rank]:
            if piece.layer >= 0:
                j = self._local_layer(self.old, piece.layer)
                release(self.kv.old_pool.k[j], self.kv.old_pool.v[j])
            else:
                release(self.weights.old_params[piece.name])
            self.released.add(i)
        self.held -= piece.old[self.rank]

    def _open_kv(self, layer: int) -> None:
        if not self.new.is_active(self.rank) or layer not in self.new.layer_range(
                self.rank, self.kv.shape.num_layers):
            return
        j = self._local_layer(self.new, layer)
        pool, s = self.new_pool, self.kv.shape
        heads = len(self.new.kv_head_range(self.rank, s.num_kv_heads))
        if self.pre is not None:  # made and partly filled before the pause
            pool.k[j], pool.v[j] = self.pre.pool.k[j], self.pre.pool.v[j]
        else:
            # One allocation for K and V, as SGLang makes it. Slots no token holds are
            # never read, so only the reserved ones (padding) are zeroed: writing the
            # whole layer first would double the bytes written (and, on CPU, fault every
            # page in).
            both = torch.empty(2, self.kv.new_num_slots, heads, s.head_dim,
                               dtype=self.kv.dtype, device=self.device)
            both[:, :self.kv.reserved_slots].zero_()
            pool.k[j], pool.v[j] = both[0], both[1]
        plan, old_pool = self.kv_plan, self.kv.old_pool
        for m in plan.keeps(self.rank):
            if layer not in m.layers:
                continue

            def keep(m=m) -> None:
                src_slots, dst_slots = self.slots[m.flow]
                i = self._local_layer(self.old, layer)
                kernels.copy_kv(
                    [old_pool.k[i]], [old_pool.v[i]], src_slots, [pool.k[j]], [pool.v[j]],
                    dst_slots, src_layers=(0, 1),
                    src_heads=self._heads(plan.old, m.heads),
                    dst_head_begin=plan.local_head(plan.new, self.rank, m.heads.start))
                self.kept["kv"] += \
                    plan.bytes_per_token([m]) // len(m.layers) * src_slots.numel()

            self.local.append(keep)

    def _open_param(self, spec: ParamSpec) -> None:
        model, rank = self.weights.model, self.rank
        if not owns(spec, model, self.new, rank):
            return
        if self.pre is not None:  # moved whole before the pause
            self.new_params[spec.name] = self.pre.params[spec.name]
            return
        t = torch.empty(local_shape(spec, model, self.new, rank), dtype=self.weights.dtype,
                        device=self.device)
        self.new_params[spec.name] = t
        # Only what receives no data is zeroed (the vocabulary's padding rows): writing
        # the whole tensor first would double the bytes written.
        filled = sorted((m.dst_local, m.dst_local + m.length) for m in self.w_plan.moves
                        if m.name == spec.name and m.dst == rank)
        end = 0
        for a, b in [*filled, (t.shape[spec.dim], t.shape[spec.dim])]:
            if a > end:
                t.narrow(spec.dim, end, a - end).zero_()
            end = max(end, b)
        for m in self.w_plan.moves:
            if m.name == spec.name and m.is_local and m.dst == rank:

                def keep(m=m) -> None:
                    t.narrow(spec.dim, m.dst_local, m.length).copy_(
                        self.weights.old_params[m.name].narrow(spec.dim, m.src_local,
                                                               m.length))
                    self.kept["weights"] += m.length * self.w_plan.row_bytes[m.name]

                self.local.append(keep)

    def _local_layer(self, topo: Topology, layer: int) -> int:
        return layer - topo.layer_range(self.rank, self.kv.shape.num_layers).start

    def _heads(self, topo: Topology, heads: range) -> tuple[int, int]:
        h = heads.start - topo.kv_head_range(self.rank, self.kv.shape.num_kv_heads).start
        return h, h + len(heads)

    # ------------------------------------------------------------------------- items
    def item(self, t: Transfer) -> Item:
        """`t` as an exchange item: the packing and unpacking this rank does for it."""
        if t.layer >= 0:
            return self._kv_item(t)
        return self._weight_item(t)

    def _kv_item(self, t: Transfer) -> Item:
        s, m = self.kv.shape, t.move
        src_slots, dst_slots = self.slots[t.flow]
        src, dst = src_slots[t.a:t.b], dst_slots[t.a:t.b]
        dims = (2, 1, t.b - t.a, len(m.heads), s.head_dim)
        host_src, host_dst, src_breaks, dst_breaks = self.runs[t.flow]
        heads = self.kv.shape.num_kv_heads
        # direct: one run of slots holding every head of that side's pool (rows whole)
        src_direct = _run(src_breaks, t.a, t.b) and \
            m.heads == self.old.kv_head_range(t.src, heads)
        dst_direct = _run(dst_breaks, t.a, t.b) and \
            m.heads == self.new.kv_head_range(t.dst, heads)

        def pack(view: torch.Tensor) -> None:
            if self.fault:
                self.fault("gather", self.rank)
            j, pool = self._local_layer(self.old, t.layer), self.kv.old_pool
            kernels.gather_kv([pool.k[j]], [pool.v[j]], src, layers=(0, 1),
                              heads=self._heads(self.old, m.heads),
                              out=view.view(pool.k[j].dtype).view(dims))
            self.sent["kv"] += t.nbytes

        def unpack(view: torch.Tensor) -> None:
            j, pool = self._local_layer(self.new, t.layer), self.new_pool
            kernels.scatter_kv(view.view(pool.k[j].dtype).view(dims), [pool.k[j]],
                               [pool.v[j]], dst,
                               head_begin=self.kv_plan.local_head(self.new, self.rank,
                                                                  m.heads.start))
            self.landed(t.piece)

        def views() -> list[torch.Tensor]:
            if self.rank == t.src:
                if self.fault:
                    self.fault("gather", self.rank)
                self.sent["kv"] += t.nbytes
                topo, pool, first = self.old, self.kv.old_pool, host_src[t.a]
            else:
                topo, pool, first = self.new, self.new_pool, host_dst[t.a]
            j, n = self._local_layer(topo, t.layer), t.b - t.a
            return [_bytes(x[j].narrow(0, int(first), n)) for x in (pool.k, pool.v)]

        direct = (src_direct or dst_direct) and t.nbytes >= self.direct_min_bytes
        return Item(t.src, t.dst, t.nbytes, pack, unpack, t.piece, parts=2 if direct else 0,
                    src_direct=direct and src_direct, dst_direct=direct and dst_direct,
                    views=views if direct else None, landed=lambda: self.landed(t.piece))

    def _weight_item(self, t: Transfer) -> Item:
        m, spec = t.move, self.specs[t.move.name]
        dim, model = spec.dim, self.weights.model
        # direct: a slice of whole rows (every dimension before the cut has size 1)
        src_direct = math.prod(local_shape(spec, model, self.old, t.src)[:dim]) == 1
        dst_direct = math.prod(local_shape(spec, model, self.new, t.dst)[:dim]) == 1

        def source() -> torch.Tensor:
            return self.weights.old_params[m.name].narrow(dim, m.src_local + t.a, t.b - t.a)

        def target() -> torch.Tensor:
            return self.new_params[m.name].narrow(dim, m.dst_local + t.a, t.b - t.a)

        def pack(view: torch.Tensor) -> None:
            if self.fault:
                self.fault("gather", self.rank)
            src = source()
            view.view(src.dtype).view(src.shape).copy_(src)
            self.sent["weights"] += t.nbytes

        def unpack(view: torch.Tensor) -> None:
            dst = target()
            dst.copy_(view.view(dst.dtype).view(dst.shape))
            self.landed(t.piece)

        def views() -> list[torch.Tensor]:
            if self.rank == t.src:
                if self.fault:
                    self.fault("gather", self.rank)
                self.sent["weights"] += t.nbytes
                return [_bytes(source())]
            return [_bytes(target())]

        direct = (src_direct or dst_direct) and t.nbytes >= self.direct_min_bytes
        return Item(t.src, t.dst, t.nbytes, pack, unpack, t.piece, parts=1 if direct else 0,
                    src_direct=direct and src_direct, dst_direct=direct and dst_direct,
                    views=views if direct else None, landed=lambda: self.landed(t.piece))

    def busiest_bytes(self) -> int:
        """The busiest rank's max(sent, received) over both parts, from the plans."""
        tokens = [f[0].numel() for f in self.slots]
        best = 0
        for r in range(self.old.world_size):
            sent = recv = 0
            if self.kv_plan is not None:
                sent += self.kv_plan.bytes_sent(r, tokens)
                recv += self.kv_plan.bytes_received(r, tokens)
            if self.w_plan is not None:
                sent += self.w_plan.bytes_sent(r)
                recv += self.w_plan.bytes_received(r)
            best = max(best, sent, recv)
        return best


def _breaks(slots: torch.Tensor) -> torch.Tensor:
    """breaks[i]: how many of slots[1..i] do not follow their predecessor by one."""
    out = torch.zeros(slots.numel(), dtype=torch.int64)
    if slots.numel() > 1:
        out[1:] = torch.cumsum(slots[1:] - slots[:-1] != 1, 0)
    return out


def _run(breaks: torch.Tensor, a: int, b: int) -> bool:
    """Whether positions a..b-1 hold consecutive slots."""
    return b > a and int(breaks[b - 1]) == int(breaks[a])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as flat bytes (a view: raises if it is not one)."""
    return t.view(-1).view(torch.uint8)


@functools.lru_cache(maxsize=64)
def _order(pieces: tuple[Piece, ...]) -> list[int]:
    return order_pieces(pieces)


__all__ = [
    "CapacityError", "KVMigration", "KVPart", "KVPool", "MigrationStats", "PreCopy",
    "Relayout", "RelayoutFailed", "WeightPart", "WeightReshard", "joining", "migrate_kv",
    "migrate_kv_flows", "precopy", "release", "relayout", "remap_slots", "reshard_weights",
    "restore",
]

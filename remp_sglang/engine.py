"""The distributed reshape engine: KV cache and weight shards to a new topology.

Runs on every launched rank with the same arguments (apart from the rank's own tensors):
plan (pure, identical everywhere) -> validate and agree -> gather -> point-to-point
exchange in bounded rounds -> scatter -> agree. Nothing is written to the old pool or the
old weights, so a failure anywhere (every rank raises `MigrationError`) leaves the caller
free to keep serving on the old topology.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import kernels
from .comm import Communicator
from .exchange import ExchangeStats, Item, run_exchange
from .planner import KVMove, KVPlan, TensorPlan, plan_kv
from .topology import ModelShape, Topology
from .weights import DenseDecoder, dense_decoder_params, local_shape, owns, plan_weights

DEFAULT_STAGING_BYTES = 64 << 20

# Test hook: called as fault(step, rank) at each step; raising there simulates a failure.
FaultHook = Callable[[str, int], None]


@dataclass
class KVPool:
    """One rank's KV cache: per local layer, K and V of shape [slots, heads, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, layers: int, slots: int, heads: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str = "cpu") -> KVPool:
        def make() -> list[torch.Tensor]:
            return [torch.zeros(slots, heads, head_dim, dtype=dtype, device=device)
                    for _ in range(layers)]
        return cls(make(), make())

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class MigrationStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_kept: int = 0  # copied locally from the old into the new pool
    rounds: int = 0
    staging_bytes: int = 0
    peak_bytes: int = 0  # old pool + new pool + staging on this rank
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
    """New index of each live slot: unchanged when it fits, else moved to a free slot.

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
    out[~fits] = free[: int((~fits).sum())]
    return out


def _check_pool(pool: KVPool | None, topo: Topology, rank: int, shape: ModelShape,
                name: str) -> None:
    if not topo.is_active(rank):
        if pool is not None and pool.k:
            raise ValueError(f"{name}: rank {rank} is parked in {topo} but holds a KV pool")
        return
    if pool is None:
        raise ValueError(f"{name}: rank {rank} is active in {topo} but has no KV pool")
    layers = len(topo.layer_range(rank, shape.num_layers))
    heads = len(topo.kv_head_range(rank, shape.num_kv_heads))
    if len(pool.k) != layers or len(pool.v) != layers:
        raise ValueError(f"{name}: expected {layers} layers of K and V on rank {rank}, "
                         f"got {len(pool.k)} and {len(pool.v)}")
    for t in pool.k + pool.v:
        if tuple(t.shape[1:]) != (heads, shape.head_dim):
            raise ValueError(f"{name}: rank {rank} buffers must be [slots, {heads}, "
                             f"{shape.head_dim}], got {list(t.shape)}")


@dataclass(frozen=True)
class SlotFlow:
    """The tokens one old replica hands one new replica: its slot `src_slots[i]` becomes
    the new replica's slot `dst_slots[i]` (the same on every rank). Without `dst_slots`
    each slot keeps its index where it fits and the rest are compacted (`remap_slots`)."""

    src_replica: int
    dst_replica: int
    src_slots: torch.Tensor
    dst_slots: torch.Tensor | None = None


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
    device: torch.device | str = "cpu",
    new_pool: KVPool | None = None,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    staging: torch.Tensor | None = None,
    reserved_slots: int = 1,
    fault: FaultHook | None = None,
) -> KVMigration:
    """Give this rank its KV pool for `new` (`new_num_slots` slots in every replica),
    filled by `flows`: a merge of replicas has one flow per old replica into the new one
    (their slots renumbered apart), a split one per new replica (a prefix several new
    replicas keep is in each of their flows). All flows move in one exchange.

    `new_pool`, if given, is filled instead of allocating one (e.g. a pool SGLang built).
    `staging`, a uint8 buffer of `staging_bytes` kept by the caller, avoids allocating
    staging per call. Nothing is written to `old_pool`."""
    rank, stats, t0 = comm.rank, MigrationStats(), time.perf_counter()
    device = torch.device(device)
    plan: KVPlan | None = None
    error: BaseException | None = None
    remapped = [f.dst_slots is None for f in flows]
    try:
        plan = plan_kv(old, new, shape, [(f.src_replica, f.dst_replica) for f in flows])
        _check_pool(old_pool, old, rank, shape, "old_pool")
        flows = [f if f.dst_slots is not None else replace(
            f, dst_slots=remap_slots(f.src_slots, new_num_slots, reserved_slots)) for f in flows]
        _check_flows(flows, old, new, rank, old_pool, new_num_slots, reserved_slots)
        if new.is_active(rank):
            if new_pool is None:
                new_pool = KVPool.empty(
                    len(new.layer_range(rank, shape.num_layers)), new_num_slots,
                    len(new.kv_head_range(rank, shape.num_kv_heads)), shape.head_dim,
                    dtype, device)
            _check_pool(new_pool, new, rank, shape, "new_pool")
            if new_pool.num_slots != new_num_slots:
                raise ValueError(f"new_pool has {new_pool.num_slots} slots, "
                                 f"new_num_slots says {new_num_slots}")
        else:
            new_pool = None
        if fault:
            fault("plan", rank)
    except Exception as exc:  # agreed on below: every rank raises
        error = exc
    comm.agree(error, "KV migration planning")
    assert plan is not None
    stats.seconds["plan"] = time.perf_counter() - t0

    slots = [(f.src_slots.to(device=device, dtype=torch.int64),
              f.dst_slots.to(device=device, dtype=torch.int64)) for f in flows]
    error = None
    try:
        t1 = time.perf_counter()
        stats.bytes_kept = _copy_kept(plan, rank, old_pool, new_pool, slots)
        stats.seconds["local_copy"] = time.perf_counter() - t1
        items = _kv_items(plan, rank, old_pool, new_pool, slots, staging_bytes, fault)
        ex = run_exchange(comm, items, staging_bytes, device, staging)
        _merge(stats, ex)
        stats.seconds["transfer"] = ex.seconds
    except Exception as exc:
        error = exc
    comm.agree(error, "KV migration transfer")
    stats.lower_bound_bytes = plan.max_rank_bytes([f.src_slots.numel() for f in flows])
    old_bytes = old_pool.nbytes if old_pool is not None else 0
    stats.peak_bytes = old_bytes + (new_pool.nbytes if new_pool else 0) + stats.staging_bytes
    stats.seconds["total"] = time.perf_counter() - t0
    new_slots = flows[0].dst_slots.cpu() if flows else torch.empty(0, dtype=torch.int64)
    compacted = any(r and not torch.equal(f.dst_slots.cpu(), f.src_slots.to(torch.int64).cpu())
                    for r, f in zip(remapped, flows, strict=True))
    return KVMigration(new_pool, new_slots, compacted, stats)


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
        if (old_pool is not None and old_pool.k and old.is_active(rank)
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


def _copy_kept(plan: KVPlan, rank: int, old_pool: KVPool | None, new_pool: KVPool | None,
               slots: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Slices this rank holds in both layouts go old pool -> new pool in one pass each."""
    kept = 0
    for m in plan.keeps(rank):
        assert old_pool is not None and new_pool is not None
        src_slots, dst_slots = slots[m.flow]
        sl = plan.local_layer(plan.old, rank, m.layers.start)
        sh = plan.local_head(plan.old, rank, m.heads.start)
        kernels.copy_kv(
            old_pool.k, old_pool.v, src_slots, new_pool.k, new_pool.v, dst_slots,
            src_layers=(sl, sl + len(m.layers)),
            dst_layer_begin=plan.local_layer(plan.new, rank, m.layers.start),
            src_heads=(sh, sh + len(m.heads)),
            dst_head_begin=plan.local_head(plan.new, rank, m.heads.start),
        )
        kept += plan.bytes_per_token([m]) * src_slots.numel()
    return kept


def _kv_items(plan: KVPlan, rank: int, old_pool: KVPool | None, new_pool: KVPool | None,
              slots: Sequence[tuple[torch.Tensor, torch.Tensor]], staging_bytes: int,
              fault: FaultHook | None) -> list[Item]:
    """Token chunks sized so one chunk of every rank's moves fits half the staging."""
    moves = [m for m in plan.moves if not m.is_local]
    if not moves:
        return []
    es = plan.shape.dtype_bytes
    busiest = max(
        plan.bytes_per_token(plan.sends(r)) + plan.bytes_per_token(plan.recvs(r))
        for r in range(plan.old.world_size)
    )
    chunk = max(1, (staging_bytes // 2 - 16 * len(moves)) // busiest)
    items = []
    for flow, (src_slots, dst_slots) in enumerate(slots):
        n = src_slots.numel()
        for t0 in range(0, n, chunk):
            t1 = min(n, t0 + chunk)
            for m in (m for m in moves if m.flow == flow):
                items.append(_kv_item(plan, rank, m, old_pool, new_pool, src_slots[t0:t1],
                                      dst_slots[t0:t1], es, fault))
    return items


def _kv_item(plan: KVPlan, rank: int, m: KVMove, old_pool: KVPool | None,
             new_pool: KVPool | None, src: torch.Tensor, dst: torch.Tensor, es: int,
             fault: FaultHook | None) -> Item:
    shape = plan.shape
    dims = (2, len(m.layers), src.numel(), len(m.heads), shape.head_dim)
    nbytes = 2 * len(m.layers) * src.numel() * len(m.heads) * shape.head_dim * es

    def pack(view: torch.Tensor) -> None:
        if fault:
            fault("gather", rank)
        sl = plan.local_layer(plan.old, rank, m.layers.start)
        sh = plan.local_head(plan.old, rank, m.heads.start)
        kernels.gather_kv(old_pool.k, old_pool.v, src, layers=(sl, sl + len(m.layers)),
                          heads=(sh, sh + len(m.heads)),
                          out=view.view(old_pool.k[0].dtype).view(dims))

    def unpack(view: torch.Tensor) -> None:
        packed = view.view(new_pool.k[0].dtype).view(dims)
        kernels.scatter_kv(packed, new_pool.k, new_pool.v, dst,
                           layer_begin=plan.local_layer(plan.new, rank, m.layers.start),
                           head_begin=plan.local_head(plan.new, rank, m.heads.start))

    return Item(m.src, m.dst, nbytes, pack, unpack)


def _merge(stats: MigrationStats, ex: ExchangeStats) -> None:
    stats.bytes_sent += ex.bytes_sent
    stats.bytes_received += ex.bytes_received
    stats.rounds += ex.rounds
    stats.staging_bytes = max(stats.staging_bytes, ex.staging_bytes)


# ---------------------------------------------------------------------------------------
# weights
@dataclass
class WeightReshard:
    params: dict[str, torch.Tensor]  # this rank's parameters for the new topology
    plan: TensorPlan
    stats: MigrationStats


def reshard_weights(
    comm: Communicator,
    old: Topology,
    new: Topology,
    model: DenseDecoder,
    old_params: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    staging_bytes: int = DEFAULT_STAGING_BYTES,
    staging: torch.Tensor | None = None,
    fault: FaultHook | None = None,
) -> WeightReshard:
    """This rank's parameters for `new`, moved from the ranks holding them (no checkpoint).

    `old_params` maps SGLang parameter names to this rank's local shards under `old`
    (empty on a parked rank). New tensors are allocated; the old ones are only read.
    """
    rank, stats, t0 = comm.rank, MigrationStats(), time.perf_counter()
    specs = {s.name: s for s in dense_decoder_params(model)}
    plan: TensorPlan | None = None
    new_params: dict[str, torch.Tensor] = {}
    error: BaseException | None = None
    try:
        plan = plan_weights(old, new, model)
        for name, spec in specs.items():
            if owns(spec, model, old, rank):
                want = local_shape(spec, model, old, rank)
                have = old_params.get(name)
                if have is None or tuple(have.shape) != want or have.dtype != dtype:
                    got = None if have is None else (list(have.shape), have.dtype)
                    raise ValueError(f"old_params[{name!r}] on rank {rank}: expected {want} "
                                     f"{dtype}, got {got}")
        if dtype.itemsize != model.shape.dtype_bytes:
            raise ValueError(f"dtype {dtype} disagrees with model.shape.dtype_bytes="
                             f"{model.shape.dtype_bytes}")
        for name, spec in specs.items():
            if owns(spec, model, new, rank):
                new_params[name] = torch.zeros(local_shape(spec, model, new, rank),
                                               dtype=dtype, device=device)
        if fault:
            fault("plan", rank)
    except Exception as exc:
        error = exc
    comm.agree(error, "weight re-sharding planning")
    assert plan is not None
    error = None
    try:
        items = []
        half = staging_bytes // 2 - 16
        for m in plan.moves:
            dim = specs[m.name].dim
            row = plan.row_bytes[m.name]
            if m.is_local:
                if m.dst == rank:
                    new_params[m.name].narrow(dim, m.dst_local, m.length).copy_(
                        old_params[m.name].narrow(dim, m.src_local, m.length))
                    stats.bytes_kept += m.length * row
                continue
            step = half // row
            if step < 1:
                raise ValueError(f"staging_bytes={staging_bytes} too small for one row of "
                                 f"{m.name} ({row} B)")
            for a in range(0, m.length, step):
                items.append(_weight_item(m, dim, a, min(m.length, a + step), row,
                                          old_params, new_params, rank, fault))
        ex = run_exchange(comm, items, staging_bytes, torch.device(device), staging)
        _merge(stats, ex)
        stats.seconds["transfer"] = ex.seconds
    except Exception as exc:
        error = exc
    comm.agree(error, "weight re-sharding transfer")
    stats.lower_bound_bytes = max(
        (max(plan.bytes_sent(r), plan.bytes_received(r)) for r in range(old.world_size)),
        default=0)
    stats.peak_bytes = (sum(t.numel() * t.element_size() for t in old_params.values())
                        + sum(t.numel() * t.element_size() for t in new_params.values())
                        + stats.staging_bytes)
    stats.seconds["total"] = time.perf_counter() - t0
    return WeightReshard(new_params, plan, stats)


def _weight_item(m, dim: int, a: int, b: int, row: int, old_params, new_params, rank: int,
                 fault: FaultHook | None) -> Item:
    def pack(view: torch.Tensor) -> None:
        if fault:
            fault("gather", rank)
        src = old_params[m.name].narrow(dim, m.src_local + a, b - a)
        view.view(src.dtype).view(src.shape).copy_(src)

    def unpack(view: torch.Tensor) -> None:
        dst = new_params[m.name].narrow(dim, m.dst_local + a, b - a)
        dst.copy_(view.view(dst.dtype).view(dst.shape))

    return Item(m.src, m.dst, (b - a) * row, pack, unpack)


__all__ = [
    "CapacityError", "KVMigration", "KVPool", "MigrationStats", "WeightReshard", "migrate_kv",
    "remap_slots", "reshard_weights",
]

"""The live reshape, executed in every scheduler process (active, parked, joining, leaving).

Sequence on each launched rank, all at the same point (the step boundary on active
ranks, see `step_boundary`; the park loop on parked ones):

1. requests in flight: old-active ranks evict unreferenced prefixes if the new layout
   holds fewer slots, checkpoint every running request's KV into the radix tree and
   re-queue it; rank zero exports tree, free lists and queued requests.
2-3. weights and KV: the engine moves both in one exchange, piece by piece (each
   weight, each layer's KV), in place: a new piece is allocated as its data arrives and
   the old one released once every rank has it, so no rank holds a second weight set or
   pool (`remp_sglang/pieces.py`); SGLang's `MHATokenToKVPool` is then made around the
   new per-layer tensors. Steps 1-3 run before the old world is torn down; a failure
   there is agreed on by every rank, the released pieces are moved back into the old
   tensors (`engine.restore`) and the old layout serves on, with the requests resuming
   from its queue.
4. old-active ranks drop their model worker and park their SGLang world; new-active
   ranks resume theirs (every world was built at launch, `worlds`) and build a model
   worker fed from the re-sharded weights.
5. new-active ranks attach the new pool, rebuild the tree and free lists from the export
   (joining ranks also the queued requests), refresh what the scheduler caches, rebind
   threads; leaving ranks drop their requests and park.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import numpy as np
import torch

from remp_sglang.comm import Communicator, MigrationError, transport_for
from remp_sglang.engine import (
    CapacityError,
    KVPart,
    KVPool,
    RelayoutFailed,
    WeightPart,
    joining,
    relayout,
    restore,
)
from remp_sglang.memory import kv_capacity, replica_token_cap
from remp_sglang.predict import DowntimeModel, predict_transfer
from remp_sglang.topology import ModelShape, Topology, replica_sources
from remp_sglang.weights import DenseDecoder

from .cache_state import (
    CacheState,
    decode_state,
    encode_state,
    export_state,
    import_state,
    live_slots,
)
from .faults import fault_point
from .model_state import expected_shapes, local_params, pool_from_memory, weights_from_memory
from .precopy import unsupported as precopy_unsupported
from .replicas import place, room_share, split_ways
from .skeletons import Skeletons
from .step_boundary import (
    CarryRefused,
    check_joinable,
    checkpoint_requests,
    clear_requests,
    commit_pp_sends,
    decoding_rids,
    export_requests,
    kv_requests,
    make_room,
    rebuild_queue,
    room_needed,
)
from .worlds import Worlds, enter, world_key

logger = logging.getLogger("sglang.srt.remp")

STAGING_BYTES = int(os.environ.get("REMP_STAGING_MIB", "64")) << 20
PARK_POLL_S = 0.02


class RempLoopRestart(Exception):  # noqa: N818 (control flow, not an error)
    """Raised out of the event loop after a reshape so the supervisor re-enters it."""


@dataclass(frozen=True)
class ReshapeOrder:
    epoch: int
    tp: int
    pp: int
    deadline: float  # wall clock: every rank gives up (and rolls back) by then
    dp: int = 1
    precopy: bool = False  # first copy to the joining ranks while serving (`precopy`)

    def validate(self, world_size: int, epoch: int) -> None:
        """Checked on receipt by every rank (parked ones read it from the store)."""
        if self.epoch != epoch:
            raise ValueError(f"order for epoch {self.epoch}, expected {epoch}")
        if not (1 <= self.tp and 1 <= self.pp and 1 <= self.dp
                and self.dp * self.tp * self.pp <= world_size):
            raise ValueError(f"order dp={self.dp} tp={self.tp} pp={self.pp} does not fit "
                             f"{world_size} ranks")


@dataclass
class RempRuntime:
    """What a scheduler process keeps across reshapes (lives as long as the process)."""

    launch_rank: int
    topology: Topology
    ctrl: Communicator
    store: Any
    decoder: DenseDecoder
    pool_size: int  # KV slots now (SGLang's max_total_num_tokens)
    budgets: list[int]  # per launched rank: the weights and KV pool SGLang reserved at launch
    token_cap: int | None  # --max-total-tokens, if set
    dtype: torch.dtype  # parameters (identical on every rank, captured at start-up)
    kv_dtype: torch.dtype  # the pool's logical dtype (what attention reads)
    kv_store_dtype: torch.dtype  # its buffers' dtype (fp8 pools store uint8): bytes moved
    launch_overlap: bool  # the overlap scheduler as launched (PP layouts turn it off)
    launch_cpus: list[set[int]]  # cores of each launch rank
    reshape_timeout_s: float  # bound of a reshape, and again of its rollback
    launch: Topology | None = None  # the layout as launched (its dp > 1: SGLang's data-
    # parallel controller feeds the replicas; None: the first topology)
    epoch: int = 0
    state: str = "serving"
    pending: tuple[ReshapeOrder, Any] | None = None
    order_at: float = 0.0  # when the pending order reached this rank
    hold: int = 0  # PP: loop iterations held so far for launched micro-batches
    pp_retract: bool = False  # PP: a pause_generation(retract) waiting for quiescence
    settled_last: Any = None  # overlap: a batch whose result a failed reshape processed
    deferred: Any = None  # rank zero: a reshape's reply, sent at the new layout's first step
    reply: Any = None  # rank zero: that reply, sent once the first step's tokens are out
    flush_first: bool = False  # overlap: the loop's first batch streams before the second runs
    ingest_skipped: bool = False  # ... and before new requests are taken in (once)
    resume: set[str] | None = None  # carried requests that continue as a decode batch
    decode_first: bool = False  # the new layout's first step decodes before any prefill
    downtime_model: DowntimeModel = field(default_factory=DowntimeModel)  # rank zero
    runners: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # leak checks
    staging: torch.Tensor | None = None
    launch_channels: Any = None  # this process's IPC channels as launched
    worlds: Worlds = field(default_factory=Worlds)  # SGLang's worlds, built at launch
    skeletons: Skeletons = field(default_factory=Skeletons)  # models made before the pause
    precopy: Any = None  # a pre-copy running or done for the pending order (`precopy`)

    def capacity_for(self, topo: Topology) -> int:
        """KV slots of `topo` under each rank's launch budget (`remp_sglang.memory`):
        CapacityError if its weights alone would not fit some rank."""
        try:
            return kv_capacity(self.budgets, self.decoder,
                               kv_shape_of(self.decoder.shape, self.kv_store_dtype), topo,
                               self.dtype.itemsize,
                               replica_token_cap(self.token_cap,
                                                 self.launch or self.topology, topo))
        except ValueError as error:
            raise CapacityError(str(error)) from error

    def staging_buffer(self, device: torch.device) -> torch.Tensor:
        """The bounded staging area, on the pools' device (packing and the transfer
        never leave it: NCCL there, gloo on CPU)."""
        if self.staging is None or self.staging.device != device:
            self.staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, device=device)
        return self.staging


def order_key(epoch: int) -> str:
    return f"remp/order/{epoch}"


def go_key(epoch: int) -> str:
    """Posted by rank zero when a pre-copied reshape's pause begins."""
    return f"remp/go/{epoch}"


def publish_order(rt: RempRuntime, order: ReshapeOrder) -> None:
    """Rank zero makes the order visible to parked ranks (they poll the store)."""
    rt.store.set(order_key(order.epoch), msgspec.json.encode(order))


def wait_for_order(rt: RempRuntime) -> ReshapeOrder:
    """Park: hold nothing, join no collective, poll for the next order; exit with the
    parent. The order is plain JSON, type- and range-checked before anything acts on it."""
    key, parent = order_key(rt.epoch + 1), os.getppid()
    while True:
        if os.getppid() != parent:
            raise SystemExit("remp: parent process gone while parked")
        if not rt.store.check([key]):
            time.sleep(PARK_POLL_S)
            continue
        try:
            order = msgspec.json.decode(rt.store.get(key), type=ReshapeOrder)
            order.validate(rt.topology.world_size, rt.epoch + 1)
        except (msgspec.DecodeError, ValueError) as error:
            logger.error("remp: ignored a malformed order under %s: %s", key, error)
            rt.store.delete_key(key)
            continue
        if order.deadline > time.time():
            return order
        time.sleep(PARK_POLL_S)  # given up by the others: the next order replaces it


def wait_for_go(rt: RempRuntime, order: ReshapeOrder) -> bool:
    """Parked ranks after a pre-copy: until the pause begins (True) or the order's
    deadline passes (False: the others gave it up)."""
    key, parent = go_key(order.epoch), os.getppid()
    while not rt.store.check([key]):
        if os.getppid() != parent:
            raise SystemExit("remp: parent process gone while parked")
        if time.time() > order.deadline:
            return False
        time.sleep(PARK_POLL_S)
    return True


# ---------------------------------------------------------------------------------------
class ReshapeFailed(MigrationError):
    """A reshape that failed at `step`; `rolled_back`: the old world was rebuilt after
    teardown (the old layout serves either way)."""

    def __init__(self, step: str, cause: BaseException, rolled_back: bool) -> None:
        verb = "rolled back to the old layout" if rolled_back else "old layout kept"
        super().__init__(f"reshape failed at step {step!r}, {verb}: {cause}")
        self.step, self.rolled_back = step, rolled_back
        self.__cause__ = cause


def execute(sched: Any, rt: RempRuntime, order: ReshapeOrder,
            t_boundary: float | None = None) -> dict:
    """Run one reshape on this rank; returns rank zero's report (partial elsewhere).

    `t_boundary`: when this rank finished its last step on the old layout (downtime
    runs from there; rank zero's caller ends it at the new layout's first step).
    Raises `ReshapeFailed` on every rank alike when any rank fails any step; the old
    layout then serves with its cache and requests.
    """
    rt.ctrl.begin(order.epoch, order.deadline)
    rt.state = "reshaping"
    if rt.launch_rank == 0:  # every rank is past the previous reshape's order
        rt.store.delete_key(order_key(order.epoch - 1))
        rt.store.delete_key(go_key(order.epoch - 1))
    try:
        return _execute(sched, rt, order, t_boundary)
    except ReshapeFailed as failed:
        rt.ctrl.dirty = True  # transfers may have been given up: a fresh group next time
        rt.staging = None  # ...and a given-up receive may still land in the old area
        raise failed
    finally:
        rt.ctrl.end()
        rt.epoch, rt.state = order.epoch, "serving"


def _execute(sched: Any, rt: RempRuntime, order: ReshapeOrder,
             t_boundary: float | None) -> dict:
    old = rt.topology
    new = Topology(order.tp, order.pp, old.world_size, order.dp)
    rank, t0 = rt.launch_rank, time.perf_counter()
    t_boundary = t0 if t_boundary is None else t_boundary
    was_active, now_active = old.is_active(rank), new.is_active(rank)
    times: dict[str, float] = {}
    device = torch.device(device_of(sched))
    step = "prepare"

    fired: set[str] = set()

    def fault(at: str) -> None:  # once per step (transfers reach it per item)
        if at not in fired:
            fired.add(at)
            fault_point(rt.ctrl, rank, at)

    # A pre-copy for this order (`precopy`): its copy, and the slots allocated since.
    pre, dirty, pre_report = None, torch.empty(0, dtype=torch.int64), None
    if rt.precopy is not None:
        state, rt.precopy = rt.precopy, None
        if state.order == order:
            pre, dirty = state.finish()
            pre_report = state.report
        else:
            state.finish()

    # What /remp/plan would answer, made before anything changes (rank zero reports it
    # next to the measured values; informational, never a reason to fail).
    predicted = None
    if rank == 0:
        try:
            predicted = plan(sched, rt, new)
        except Exception:
            logger.warning("remp: no prediction for reshape %d", order.epoch, exc_info=True)

    # 1-3: everything that can fail runs while the old world still serves.
    old_params, old_pool, old_pool_obj, new_pool_obj, left = {}, None, None, None, None
    skeleton_used = False
    encoded: bytes | None = None
    new_size = 0
    error: BaseException | None = None
    carried, evicted, chunked = 0, 0, False
    try:
        new.check_model(rt.decoder.shape)
        if now_active and world_key(new, rank) not in rt.worlds.worlds:
            raise ValueError(f"no world was prepared at launch for {new.layout()}")
        new_size = rt.capacity_for(new)
        if was_active:  # every rank of a replica alike: their replicated state stays equal
            reqs = kv_requests(sched)
            if any(not old.is_active(r) for r in new.active_ranks) or old.dp != new.dp:
                check_joinable(sched, reqs, across_replicas=old.dp != new.dp)
            chunked = any(r is sched.chunked_req for r in reqs)
            evicted = make_room(sched, reqs, room_share(old, new, new_size), new_size,
                                split_ways(old, new))
            checkpoint_requests(sched, reqs)
            carried = len(reqs)
        if was_active and rank in old.heads:
            exported = export_state(sched)
            exported.requests = export_requests(sched)
            exported.decoding = decoding_rids(sched, reqs)
            exported.engine_paused = bool(getattr(sched, "_engine_paused", False))
            exported.new_token_ratio = float(sched.new_token_ratio_tracker.current)
            if not torch.equal(torch.from_numpy(exported.live_slots), live_slots(sched)):
                raise MigrationError("KV slots are held outside the radix tree after the "
                                     "running requests were checkpointed")
            encoded = encode_state(exported)
        if was_active:
            runner = sched.tp_worker.model_runner
            left = runner.model  # its world's skeleton once this reshape commits
            old_params = local_params(runner.model, rt.decoder, old, rank)
            old_pool_obj = runner.token_to_kv_pool
            old_pool = KVPool(list(old_pool_obj.k_buffer), list(old_pool_obj.v_buffer))
        fault(step)
    except Exception as exc:
        error = exc
    try:
        ready = rt.ctrl.agree(error, "reshape preparation", info=pre is not None)
        if pre is not None and not all(ready):  # the pause moves all, on every rank alike
            pre = None
        if pre is not None:  # rank zero's dirty slots (the parked ranks have none)
            dirty = torch.from_numpy(np.frombuffer(rt.ctrl.broadcast_bytes(
                dirty.numpy().tobytes() if rank == 0 else None), dtype=np.int64).copy())
        # Every rank learns every old replica's export (from its head), and derives the
        # same placement: each new replica's tree and queue, and the slot flows.
        states = [decode_state(rt.ctrl.broadcast_bytes(encoded if rank == head else None,
                                                        root=head), rt.pool_size)
                  for head in old.heads]
        new_states, flows = place(states, old, new, new_size)
        times["prepare_s"] = time.perf_counter() - t0
    except Exception as exc:  # agreed on (or bounded by the deadline on every rank)
        raise ReshapeFailed(step, exc, rolled_back=False) from exc

    step, t = "transfer", time.perf_counter()
    kv_shape = kv_shape_of(rt.decoder.shape, rt.kv_store_dtype)
    try:
        moved = relayout(rt.ctrl, old, new,
                         KVPart(kv_shape, rt.kv_store_dtype, old_pool, flows, new_size + 1),
                         WeightPart(rt.decoder, rt.dtype, old_params),
                         device=device, staging_bytes=STAGING_BYTES,
                         staging=rt.staging_buffer(device), release_old=True,
                         fault=lambda at, r: fault(step) if at == "gather" else None,
                         pre=pre, dirty=[dirty])
        times["transfer_s"] = time.perf_counter() - t
    except RelayoutFailed as failed:  # every rank alike: the released pieces come back
        _restore(rt, failed, device, old_pool_obj)
        raise ReshapeFailed(step, failed, rolled_back=False) from failed
    except Exception as exc:  # agreed on (or bounded by the deadline on every rank)
        raise ReshapeFailed(step, exc, rolled_back=False) from exc
    del old_pool
    own = states[old.replica(rank)] if was_active else None  # what a rollback rebuilds
    undo = (moved, device, old_pool_obj)  # what a rollback moves back
    mine = new_states[new.replica(rank)] if now_active else None

    # 4-5: the old world is parked and the new one resumed. A failure anywhere here is
    # agreed on, the weights and KV move back into the old tensors, and every rank
    # serves the old world again with its replica's export (`_rollback`).
    error = None
    try:
        if now_active:  # SGLang's pool around the moved tensors (a failure rolls back)
            new_pool_obj = _new_pool(rt, new, rank, device, new_size, moved.pool)
        step, t = "teardown", time.perf_counter()
        fault(step)
        if was_active:
            times.update(_teardown(sched, rt))
        times["teardown_s"] = time.perf_counter() - t
        if now_active:
            step = "world"
            fault(step)
    except Exception as exc:
        error = exc
    _agree_or_roll_back(sched, rt, error, "old world parked", step, old, new, order, own,
                        old_params, undo)
    error = None
    try:
        if now_active:
            t = time.perf_counter()
            enter(sched, rt.worlds, world_key(new, rank))
            times["world_s"] = time.perf_counter() - t
            step, t = "model", time.perf_counter()
            fault(step)
            skeleton = rt.skeletons.take(world_key(new, rank))
            skeleton_used = skeleton is not None
            _build_worker(sched, moved.params, new_pool_obj, new_size, skeleton)
            del skeleton
            times["model_s"] = time.perf_counter() - t
            step, t = "cache_import", time.perf_counter()
            fault(step)
            import_state(sched, mine, new_size)
            _refresh_scheduler(sched, rt, new)
            rebuild_queue(sched, mine.requests)
            if not was_active:
                sched._engine_paused = mine.engine_paused
            # Admission depends on this estimate: every rank of the new world takes rank
            # zero's, so the carried requests are re-admitted as they were running (a
            # reset to the conservative start value held some back for seconds).
            sched.new_token_ratio_tracker.current = mine.new_token_ratio
            times["cache_state_s"] = time.perf_counter() - t
        step = "rebind"
        fault(step)
        rebind_threads(rt, new)
    except Exception as exc:
        error = exc
    mem = moved.stats
    sent = [moved.bytes_sent["kv"], moved.bytes_sent["weights"], mem.peak_bytes,
            *mem.held_bytes, mem.bound_bytes]
    infos = _agree_or_roll_back(sched, rt, error, "new layout", step, old, new, order, own,
                                old_params, undo, info=sent)

    # Committed: the old layout's tensors were released as the new ones landed.
    kept = dict(moved.bytes_kept)
    del moved, undo, old_params, old_pool_obj
    if left is not None:  # the next reshape into the old world adopts into it
        rt.skeletons.keep(world_key(old, rank), left,
                          expected_shapes(rt.decoder, old, rank), rt.dtype)
        del left
    if was_active and not now_active:
        clear_requests(sched)
    rt.topology, rt.pool_size = new, new_size
    rt.resume = set(mine.decoding) if now_active else None
    times["total_s"] = time.perf_counter() - t0
    downtime = time.perf_counter() - t_boundary
    live = sum(f.src_slots.numel() for f in flows)
    pairs = [(f.src_replica, f.dst_replica) for f in flows]
    report = {
        "old": old.layout(), "new": new.layout(),
        "kv_bytes_moved": sum(i[0] for i in infos),
        "weight_bytes_moved": sum(i[1] for i in infos),
        # copied within rank zero from its old tensors to its new ones (its re-lay)
        "kv_bytes_kept": kept["kv"], "weight_bytes_kept": kept["weights"],
        "live_kv_slots": live,
        "transport": transport_for(device),
        "kv_capacity_tokens": new_size,
        "kv_slots_compacted": any(not torch.equal(f.src_slots, f.dst_slots) for f in flows),
        "max_req_input_len": getattr(sched, "max_req_input_len", None),
        "cached_tokens_before": sum(s.cached_tokens for s in states),
        "cached_tokens_after": export_state(sched).cached_tokens if now_active and rank == 0
        else None,
        "requests_carried": carried, "chunked_prefill_carried": chunked,
        "requests_decoding": sum(len(s.decoding) for s in states),
        "requests_resumed_decoding": 0,
        "cached_tokens_evicted": evicted,
        "queued_requests": sum(len(s.requests) for s in states),
        # Per launched rank: what its weights and pool took before and after, and the
        # most they took at once during the move (staging included), as counted.
        "memory": {"before_bytes": [i[3] for i in infos], "after_bytes": [i[4] for i in infos],
                   "peak_bytes": [i[2] for i in infos],
                   "bound_bytes": [i[5] for i in infos], "staging_bytes": STAGING_BYTES},
        # the pause's busiest rank (after a pre-copy, less than the plan's)
        "max_rank_bytes": mem.lower_bound_bytes if pre is not None else predict_transfer(
            old, new, rt.decoder, kv_shape, [f.src_slots.numel() for f in flows],
            pairs).max_rank_bytes,
        "predicted": predicted and {k: predicted[k] for k in PREDICTED},
        # What moved to the joining ranks before the pause (`precopy`); the bytes above
        # moved in the pause.
        "precopy": pre_report and {**pre_report, "used": pre is not None,
                                   "dirty_slots": int(dirty.numel())},
        "downtime_s": round(downtime, 4),
        "phases": {k: round(v, 4) for k, v in times.items()},
        # rank zero's model was made before the pause (`skeletons`), not in `model_s`
        "model_skeleton": skeleton_used,
    }
    for phase, seconds in report["phases"].items():
        logger.info("remp: reshape %d phase %s %.4f s (rank %d)", order.epoch, phase, seconds,
                    rank)
    logger.info("remp: reshape %d %s -> %s done on rank %d: downtime %.4f s, moved %d B KV "
                "and %d B weights", order.epoch, old.layout(), new.layout(), rank,
                downtime, report["kv_bytes_moved"], report["weight_bytes_moved"])
    return report


PREDICTED = ("kv_bytes", "weight_bytes", "cached_tokens_evicted", "kv_capacity_tokens",
             "predicted_downtime_s")


def plan(sched: Any, rt: RempRuntime, new: Topology) -> dict:
    """A reshape's dry run from the live state: what it would move (planner bytes per
    rank), evict and refuse, the capacity after, and the downtime model's prediction.
    Changes nothing."""
    old = rt.topology
    size = 0
    alloc = sched.token_to_kv_pool_allocator
    live = int(alloc.size) - int(alloc.available_size())
    reqs = kv_requests(sched)
    refused, evict = None, 0
    try:
        new.check_model(rt.decoder.shape)
        size = rt.capacity_for(new)
        if any(not old.is_active(r) for r in new.active_ranks) or old.dp != new.dp:
            check_joinable(sched, reqs, across_replicas=old.dp != new.dp)
        evict = max(0, room_needed(sched, reqs, room_share(old, new, size), size,
                                   split_ways(old, new)))
    except (CapacityError, CarryRefused, ValueError) as error:
        refused = str(error)
    kv_shape = kv_shape_of(rt.decoder.shape, rt.kv_store_dtype)
    # With replicas, this rank sees its own replica: every flow is predicted at its size.
    pairs = [(a, b) for b, srcs in enumerate(replica_sources(old, new)) for a in srcs]
    transfer = predict_transfer(old, new, rt.decoder, kv_shape,
                                [max(0, live - evict)] * len(pairs), pairs)
    why_not = precopy_unsupported(old, new)
    pre = {"possible": why_not is None, "reason": why_not}
    if why_not is None:  # the pause moves nothing to the joining ranks (none written since)
        stay = [r for r in range(old.world_size) if r not in joining(old, new)]
        pause = predict_transfer(old, new, rt.decoder, kv_shape, max(0, live - evict),
                                 received=stay)
        pre.update(max_rank_bytes=pause.max_rank_bytes,
                   predicted_downtime_s=rt.downtime_model.predict(pause.max_rank_bytes))
    return {"old": old.layout(), "new": new.layout(),
            "refused": refused is not None, "reason": refused,
            # bytes and downtime below are stop-and-copy's; with pre-copy the joining
            # ranks' share moves before the pause: `precopy` predicts that pause
            "precopy": pre,
            "kv_capacity_tokens": size, "live_kv_slots": live, "requests_carried": len(reqs),
            "cached_tokens_evicted": evict, **transfer.to_json(),
            "predicted_downtime_s": rt.downtime_model.predict(transfer.max_rank_bytes),
            "downtime_model": rt.downtime_model.to_json()}


def _agree_or_roll_back(sched: Any, rt: RempRuntime, error: BaseException | None, what: str,
                        step: str, old: Topology, new: Topology, order: ReshapeOrder,
                        state: CacheState | None, old_params: dict, undo: tuple,
                        info: Any = None) -> list:
    """Agree on a step past teardown; on abort, roll back and raise `ReshapeFailed`."""
    try:
        return rt.ctrl.agree(error, what, info=info, where=step)
    except MigrationError as exc:
        _rollback(sched, rt, old, new, order, state, old_params, undo)
        raise ReshapeFailed(exc.failed_step or step, exc, rolled_back=True) from exc


def _rollback(sched: Any, rt: RempRuntime, old: Topology, new: Topology, order: ReshapeOrder,
              state: CacheState | None, old_params: dict, undo: tuple) -> None:
    """Serve the old layout again after a failure past teardown: every rank drops the
    worker it built and parks the new world; the weights and KV move back into the old
    tensors (`_restore`); old-active ranks resume the old world and rebuild a worker
    from them and their replica's export; joining ranks drop the requests they adopted.
    Waits for every rank (a frozen one too) until the reshape timeout."""
    rank = rt.launch_rank
    moved, device, old_pool_obj = undo
    rt.ctrl.deadline = time.time() + rt.reshape_timeout_s
    error: BaseException | None = None
    try:
        if new.is_active(rank) or old.is_active(rank):
            _teardown(sched, rt, quiet=True)
    except Exception as exc:
        logger.exception("remp: rollback failed on rank %d", rank)
        error = exc
    try:  # every rank takes part, whatever happened above
        _restore(rt, moved, device, old_pool_obj)
        if error is None and old.is_active(rank):
            enter(sched, rt.worlds, world_key(old, rank))
            _build_worker(sched, old_params, old_pool_obj, rt.pool_size)
            import_state(sched, state, rt.pool_size)
            _refresh_scheduler(sched, rt, old)
            rebuild_queue(sched, state.requests)  # its own replica's queue again
            sched.new_token_ratio_tracker.current = state.new_token_ratio
        elif error is None and new.is_active(rank):
            clear_requests(sched)
        if error is None:
            rebind_threads(rt, old)
    except Exception as exc:
        logger.exception("remp: rollback failed on rank %d", rank)
        error = error or exc
    rt.ctrl.agree(error, "rollback", patient=True)
    logger.warning("remp: reshape %d rolled back to %s on rank %d", order.epoch,
                   old.layout(), rank)


def _restore(rt: RempRuntime, moved: Any, device: torch.device, old_pool_obj: Any) -> None:
    """Every rank alike: the old weights and live KV go back into the SAME tensor objects
    the old model and pool hold (`engine.restore`), through a fresh staging area (a
    receive given up by a failed transfer may still land in the kept one)."""
    rt.ctrl.deadline = time.time() + rt.reshape_timeout_s
    restore(rt.ctrl, moved, device=device, staging_bytes=STAGING_BYTES)
    if old_pool_obj is not None:  # the buffers' storage moved: kernels read pointers
        old_pool_obj._init_data_ptrs_and_strides()


def kv_dtypes(pool: Any) -> tuple[torch.dtype, torch.dtype]:
    """(logical, storage) dtype of SGLang's KV pool: a new pool is made with the logical
    one (an fp8 pool given its uint8 storage dtype would be read as integers); bytes are
    moved in the storage one."""
    store = pool.k_buffer[0].dtype
    return getattr(pool, "dtype", store), store


def kv_shape_of(shape: ModelShape, kv_dtype: torch.dtype) -> ModelShape:
    """The model's shape with the KV cache's element size (the cache may differ in dtype)."""
    return replace(shape, dtype_bytes=kv_dtype.itemsize)


def _new_pool(rt: RempRuntime, topo: Topology, rank: int, device: torch.device,
              size: int, kv: KVPool) -> Any:
    """SGLang's pool for `rank` under `topo`: `size` slots, its heads and layers, around
    the per-layer tensors the engine filled (`pool_from_memory`: no allocation)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    shape = rt.decoder.shape
    layers = topo.layer_range(rank, shape.num_layers)
    with pool_from_memory(kv):
        return MHATokenToKVPool(
            size, page_size=1, dtype=rt.kv_dtype,
            head_num=len(topo.kv_head_range(rank, shape.num_kv_heads)),
            head_dim=shape.head_dim, layer_num=len(layers), device=str(device),
            enable_memory_saver=False, start_layer=layers.start, end_layer=layers.stop,
        )


def device_of(sched: Any) -> str:
    from sglang.srt.runtime_context import get_device

    return "cpu" if sched.server_args.device == "cpu" else f"cuda:{get_device().gpu_id}"


def _teardown(sched: Any, rt: RempRuntime, quiet: bool = False) -> dict[str, float]:
    """Drop the old worker and pool, then park the SGLang world (kept for a later reshape
    or a rollback: `worlds`). `quiet`: a rollback's clean-up (nothing in flight to
    commit)."""
    if not quiet:
        commit_pp_sends(sched)
    sched.token_to_kv_pool_allocator._kvcache = None
    worker = getattr(sched, "tp_worker", None)
    if worker is not None:
        # Break the old worker's and runner's links: the start-up objects sit in GC's
        # permanent generation here (frozen), where the cycles through the old model
        # (runner <-> attention backends, graph runners) would never be collected.
        # Reference counting frees them now (the old weights were released in place as
        # they moved; their objects stay, empty, for a rollback to refill).
        runner = getattr(worker, "model_runner", None)
        if runner is not None and torch.cuda.is_available():
            _release_cuda_graphs(runner)
        for obj in (runner, worker):
            if obj is not None:
                vars(obj).clear()
        del runner
    del worker
    inquirer = getattr(sched, "load_inquirer", None)
    if inquirer is not None:  # it holds the worker: the old model would never be freed
        sched.load_inquirer = replace(inquirer, tp_worker=None)
    for name in ("tp_worker", "model_worker", "weight_updater", "dp_attn_adapter",
                 "batch_result_processor", "future_map"):
        if hasattr(sched, name):
            setattr(sched, name, None)
    t0 = time.perf_counter()
    gc.collect()
    t1 = time.perf_counter()
    rt.worlds.park()
    times = {"teardown_gc_s": t1 - t0, "teardown_groups_s": time.perf_counter() - t1}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return times


def _release_cuda_graphs(runner: Any) -> None:
    """The old model's CUDA graphs and their memory pool go before the new ones are
    captured (SGLang's own elastic re-capture does the same). GPU only; untested here."""
    from sglang.srt.model_executor.model_runner_components.cuda_graph_setup import (
        drop_elastic_cuda_graph_state,
    )

    eager = getattr(runner, "eager_runner", None)
    drop_elastic_cuda_graph_state(
        decode_runner=getattr(runner, "decode_cuda_graph_runner", None), eager_runner=eager)


def _build_worker(sched: Any, params: dict, pool: Any, pool_size: int,
                  skeleton: torch.nn.Module | None = None) -> None:
    """SGLang's worker for the live world around the moved weights and pool; its model
    is `skeleton` (made before the pause) when there is one, else constructed here."""
    from sglang.srt.managers.tp_worker import TpModelWorker
    from sglang.srt.runtime_context import get_device

    with weights_from_memory(params, tokenizer=getattr(sched, "tokenizer", None),
                             model=skeleton):
        worker = TpModelWorker(server_args=sched.server_args, gpu_id=get_device().gpu_id,
                               nccl_port=sched.nccl_port)
    runner = worker.model_runner
    alloc = sched.token_to_kv_pool_allocator
    runner.req_to_token_pool = sched.req_to_token_pool
    runner.token_to_kv_pool_allocator = alloc
    runner.token_to_kv_pool = pool
    alloc._kvcache = pool
    runner.max_total_num_tokens = pool_size
    runner.max_running_requests = sched.max_running_requests
    runner._unified_memory_pool = None
    runner.init_kv_cache_configurator()
    runner._init_post_memory_pool_components()
    worker.init_attention_backends()
    worker.init_cuda_graphs()  # also sets the eager runners the forward path expects
    sched.tp_worker = sched.model_worker = worker
    sched._remp.runners.add(runner)


def _refresh_scheduler(sched: Any, rt: RempRuntime, topo: Topology) -> None:
    """Re-point what the scheduler cached from the old world and worker (notes, E11).
    Only a replica's head talks to the front end: a launch head that now serves inside
    another replica sends nothing (SGLang gives such ranks senders that drop)."""
    from sglang.srt.layers.dp_attention import get_dp_tp_group
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    info = sched.tp_worker.get_worker_info()  # the capacity and limits of the new pool
    sched.max_total_num_tokens, sched.max_req_len, sched.max_req_input_len = (
        info[0], info[4], info[5])
    sched.forward_stream = sched.tp_worker.model_runner.forward_stream
    sched.tp_size = par.tp_size
    sched.tp_group, sched.pp_group, sched.world_group = par.tp_group, par.pp_group, par.world_group
    sched.tp_cpu_group = sched.tp_group.cpu_group
    sched.attn_tp_group = par.attn_tp_group
    sched.attn_tp_cpu_group = sched.attn_tp_group.cpu_group
    sched.attn_cp_group = par.attn_cp_group
    sched.attn_cp_cpu_group = sched.attn_cp_group.cpu_group
    sched.dp_tp_group = get_dp_tp_group()
    sched.dp_tp_cpu_group = sched.dp_tp_group.cpu_group
    sched.pad_input_ids_func = sched.tp_worker.get_pad_input_ids_func()
    tree = sched.tree_cache
    for attr, value in (("tp_group", sched.dp_tp_cpu_group),
                        ("attn_tp_group", sched.attn_tp_cpu_group),
                        ("attn_cp_group", sched.attn_cp_cpu_group),
                        ("pp_group", par.pp_group.cpu_group), ("pp_rank", par.pp_rank),
                        ("pp_size", par.pp_size), ("tp_world_size", par.tp_size)):
        if hasattr(tree, attr):
            setattr(tree, attr, value)
    grammar = getattr(sched, "grammar_manager", None)
    if grammar is not None:  # kept (its queue and compiled grammars); its groups are new
        grammar.grammar_sync_group = sched.dp_tp_cpu_group
        grammar.grammar_sync_size = sched.dp_tp_group.world_size
        grammar.grammar_sync_entry = sched.dp_tp_group.first_rank
        grammar.is_grammar_sync_entry = sched.dp_tp_group.is_first_rank
        grammar.pp_rank, grammar.pp_size = par.pp_rank, par.pp_size
        grammar.pp_group = sched.pp_group
        grammar.grammar_pp_sync_work_list = []
    _set_role(sched, rt, rt.launch_rank in topo.heads)
    sched.init_overlap()
    sched.init_weight_updater()
    sched.init_profiler()
    sched.init_request_dispatcher()
    sched.init_dp_attn_adapter()
    sched.init_batch_result_processor()
    sched.init_rank_consensus_checker()
    sched.init_pool_stats_observer()  # both account tokens against the pool size
    sched.init_invariant_checker()
    if getattr(sched, "load_inquirer", None) is not None:  # (its init also resets pause
        sched.load_inquirer = replace(  # and prefill accounting: only re-point it)
            sched.load_inquirer, tp_worker=sched.tp_worker,
            pool_stats_observer=sched.pool_stats_observer,
            max_total_num_tokens=sched.max_total_num_tokens * getattr(
                sched, "kv_shard_widening", 1))
    sched.running_batch = ScheduleBatch(reqs=[], batch_is_full=False)
    sched.last_batch = None
    sched.result_queue = deque()
    sched.cur_batch_for_debug = None


def _set_role(sched: Any, rt: RempRuntime, head: bool) -> None:
    from sglang.srt.managers.scheduler_components.output_sender import SenderWrapper

    if rt.launch_channels is None:
        rt.launch_channels = sched.ipc_channels
    channels = rt.launch_channels
    if not head:
        channels = replace(channels, send_to_tokenizer=SenderWrapper(None),
                           send_to_detokenizer=SenderWrapper(None))
    sched.ipc_channels = channels
    sched.init_output_streamer()


def cpus_for(launch_cpus: list[set[int]], topo: Topology, rank: int) -> set[int]:
    """An active rank takes its own cores plus those of parked launch ranks r + k*N."""
    n = topo.num_active
    return set().union(*(launch_cpus[r] for r in range(rank, len(launch_cpus), n)))


def rebind_threads(rt: RempRuntime, topo: Topology) -> None:
    """Active ranks may run on the cores of the ranks parked beside them; parked ones
    sleep and hold none.

    The OpenMP team keeps its launch size: growing it at runtime (1 -> 2 threads when a
    rank takes a parked neighbour's core) made the steps after a switch up to 50x slower
    for about a second on CPU (measured with bench/under_load.py; not with the team
    size fixed, nor with OMP_WAIT_POLICY=PASSIVE), a stall every streaming client saw.
    """
    if not topo.is_active(rt.launch_rank):
        return
    cpus = cpus_for(rt.launch_cpus, topo, rt.launch_rank)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def launch_cpus(world: int) -> list[set[int]]:
    """Cores of each launch rank: SGLANG_CPU_OMP_THREADS_BIND if set, else an even split."""
    spec = os.environ.get("SGLANG_CPU_OMP_THREADS_BIND")
    if spec:
        out = []
        for entry in spec.split("|")[:world]:
            cores: set[int] = set()
            for part in entry.split(","):
                lo, _, hi = part.partition("-")
                cores.update(range(int(lo), int(hi or lo) + 1))
            out.append(cores)
        if len(out) == world:
            return out
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // world)
    return [set(cores[(r * per) % len(cores):(r * per) % len(cores) + per]) for r in range(world)]

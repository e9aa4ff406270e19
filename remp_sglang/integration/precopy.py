"""Pre-copy: the joining ranks receive their weights and the cached KV while the old
layout still serves, so the pause moves only what was written since.

A reshape in which ranks parked in the old layout become active (TP 1 -> 2, PP 1 -> 2,
TP 2 -> 4...) runs in two orders from the launcher (`routes.run_reshape`):

1. `precopy`: every old-active rank, in the same loop iteration (SGLang's control path),
   takes a snapshot of its allocated slots (identical on every rank of the replicated
   scheduler), starts recording every slot its allocator hands out from then on (the
   dirty slots), and sends from a helper thread while its loop keeps serving; parked ranks
   run the same `engine.precopy` in their park loop (the joining ones receive into their
   new tensors, from their free budget: they hold nothing else). Rank zero answers once
   its thread is done (the copy ends in an agreement, so every rank is done).
2. the reshape itself (`reshape.execute`), with `pre`: the engine moves to the joining
   ranks only the live slots the snapshot lacked or that were allocated since, and no
   weights; the ranks active in both layouts move as without pre-copy.

A failed or abandoned pre-copy (every rank learns the same through its agreement) only
means the pause moves everything. Limits: one replica in both layouts and no pipeline
stages in the old one (the stages of a pipeline take the order in different iterations,
so their snapshots would differ).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from remp_sglang.engine import KVPart, KVPool, PreCopy, SlotFlow, WeightPart, joining, precopy
from remp_sglang.topology import Topology

from .cache_state import live_slots
from .faults import fault_point
from .model_state import local_params

logger = logging.getLogger("sglang.srt.remp")


def unsupported(old: Topology, new: Topology) -> str | None:
    """Why pre-copy cannot serve this reshape (None: it can). The launcher and every
    rank decide alike from the layouts."""
    if old.dp != 1 or new.dp != 1:
        return "pre-copy needs one replica in both layouts"
    if old.pp != 1:
        return "pre-copy needs an old layout without pipeline stages"
    if not joining(old, new):
        return "no parked rank joins: the ranks that serve have no free memory to fill"
    return None


@dataclass
class Precopying:
    """One rank's pre-copy for one order, from its start to the pause that uses it."""

    order: Any  # the ReshapeOrder it serves
    old: Topology
    new: Topology
    started: float = field(default_factory=time.perf_counter)
    result: PreCopy | None = None
    error: BaseException | None = None
    report: dict = field(default_factory=dict)  # rank zero: every rank's bytes
    dirty: list[torch.Tensor] = field(default_factory=list)  # slots allocated since
    thread: threading.Thread | None = None
    request: Any = None  # rank zero: the launcher's order, answered once the copy is done
    replied: bool = False
    _alloc: Any = None  # the allocator whose `alloc` is wrapped

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def expired(self) -> bool:
        return time.time() > self.order.deadline

    def finish(self) -> tuple[PreCopy | None, torch.Tensor]:
        """At the pause: the copy (None if it failed) and every slot allocated since the
        snapshot, sorted (this rank's; parked ranks have none)."""
        if self.thread is not None:
            self.thread.join()
        self.unhook()
        dirty = torch.cat(self.dirty).to("cpu", torch.int64).unique() if self.dirty else \
            torch.empty(0, dtype=torch.int64)
        return (self.result if self.error is None else None), dirty

    def unhook(self) -> None:
        if self._alloc is not None:
            del self._alloc.alloc  # the class's method again
            self._alloc = None

    def _hook(self, alloc: Any) -> None:
        """Record every slot `alloc` hands out from now on (SGLang allocates KV slots only
        through `alloc` at page size 1, which remp requires)."""
        original, dirty = alloc.alloc, self.dirty

        def recording(need_size: int) -> Any:
            out = original(need_size)
            if out is not None:  # kept where it lies: no device sync per allocation
                dirty.append(out)
            return out

        alloc.alloc, self._alloc = recording, alloc


def start(sched: Any, rt: Any, order: Any, old: Topology, new: Topology,
          device: torch.device, request: Any = None) -> Precopying:
    """Old-active ranks, inside the loop iteration that received the order: snapshot,
    start recording allocations, and copy from a helper thread while serving goes on.
    A failure here still starts the thread, which votes it down at once on every rank."""
    state = Precopying(order, old, new, request=request)
    snapshot, pool, params, error = None, None, {}, None
    try:
        snapshot = live_slots(sched)
        # Slots of a batch launched but maybe not yet computed (the overlap scheduler on
        # a GPU) are written after the snapshot: they count as dirty.
        for batch in (getattr(sched, "last_batch", None), getattr(sched, "cur_batch", None)):
            loc = getattr(batch, "out_cache_loc", None)
            if loc is not None:
                state.dirty.append(loc.clone())  # the batch may reuse it
        state._hook(sched.token_to_kv_pool_allocator)
        runner = sched.tp_worker.model_runner
        params = local_params(runner.model, rt.decoder, old, rt.launch_rank)
        pool = KVPool(list(runner.token_to_kv_pool.k_buffer),
                      list(runner.token_to_kv_pool.v_buffer))
        if device.type == "cuda":  # rows written before the snapshot are there for the copy
            torch.cuda.current_stream(device).synchronize()
    except Exception as exc:
        error = exc
    state.thread = threading.Thread(target=_copy, name="remp-precopy", daemon=True,
                                    args=(rt, state, snapshot, pool, params, device, error))
    state.thread.start()
    return state


def run_parked(rt: Any, order: Any, old: Topology, new: Topology,
               device: torch.device) -> Precopying:
    """Parked ranks: the same copy, in the park loop (the joining ones receive)."""
    state = Precopying(order, old, new)
    _copy(rt, state, None, None, {}, device, None)
    return state


def _copy(rt: Any, state: Precopying, snapshot: torch.Tensor | None, pool: KVPool | None,
          params: dict, device: torch.device, error: BaseException | None) -> None:
    from .reshape import STAGING_BYTES, kv_shape_of

    order, comm, rank = state.order, rt.ctrl, rt.launch_rank
    comm.begin(order.epoch, order.deadline, phase="pre")
    try:
        if error is None:
            try:
                fault_point(comm, rank, "precopy")
            except Exception as exc:
                error = exc
        comm.agree(error, "pre-copy start")
        size = rt.capacity_for(state.new)
        # rank zero's snapshot for all: the parked ranks have none
        data = comm.broadcast_bytes(snapshot.numpy().tobytes() if rank == 0 else None)
        slots = torch.from_numpy(np.frombuffer(data, dtype=np.int64).copy())[:size]
        cuda = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(cuda) if cuda is not None else nullcontext():
            state.result = precopy(
                comm, state.old, state.new,
                KVPart(kv_shape_of(rt.decoder.shape, rt.kv_store_dtype), rt.kv_store_dtype,
                       pool, [SlotFlow(0, 0, slots)], size + 1),
                WeightPart(rt.decoder, rt.dtype, params), device=device,
                staging_bytes=STAGING_BYTES, staging=rt.staging_buffer(device))
            if cuda is not None:
                cuda.synchronize()
        stats = state.result.stats
        seconds = time.perf_counter() - state.started
        infos = comm.agree(None, "pre-copy report", info=[
            state.result.bytes_sent["kv"], state.result.bytes_sent["weights"],
            stats.bytes_received])
        state.report = {
            "used": True, "snapshot_slots": int(slots.numel()),
            "kv_bytes": sum(i[0] for i in infos), "weight_bytes": sum(i[1] for i in infos),
            "bytes_received": [i[2] for i in infos], "seconds": round(seconds, 4)}
    except Exception as exc:  # every rank alike (the copy's agreements): the pause moves all
        logger.warning("remp: pre-copy for reshape %d failed: %s", order.epoch, exc)
        state.error, state.result = exc, None
        state.report = {"used": False, "error": str(exc)}
        comm.dirty = True  # a given-up transfer: a fresh group for the pause
        rt.staging = None
    finally:
        comm.end()


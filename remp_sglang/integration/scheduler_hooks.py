"""Hooks installed in every scheduler process under --remp.

- `after_scheduler_init`: builds the process's `RempRuntime` (control plane over every
  launched rank, model description, KV slot count) while every launched rank is active,
  and the SGLang world of every layout a reshape may take (`worlds`).
- `around_dispatch_event_loop`: a supervisor that applies the start-up layout, re-enters
  the right loop (PP or not) after each reshape, and parks ranks outside the layout.
- `after_init_request_dispatcher`: routes the topology and reshape messages.
- `around_get_next_batch_to_run`: runs a pending reshape at the step boundary, which every
  rank of the world reaches in the same loop iteration (the order arrives through the
  same broadcast/relay as requests); with PP it first holds new micro-batches until the
  launched ones are processed. `around_paused_state` does the same while SGLang's
  generation is paused (the loop then skips scheduling).
- `around_is_disable_overlap_for_batch`, `after_process_batch_result`: the new layout's
  first batch streams its tokens before the second runs, and the reshape is answered
  once they are out.
- `around_should_defer_prefill`: that first batch decodes the carried requests before
  any prefill (they have waited longest; SGLang defers prefills the same way).
Handlers never raise into the event loop: errors become replies.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import torch

from remp_sglang.comm import Communicator, MigrationError
from remp_sglang.engine import CapacityError
from remp_sglang.memory import launch_budgets
from remp_sglang.topology import Topology

from ..ports import free_ports
from . import load_stats, precopy
from .cache_state import kv_digest
from .config import config_from_env
from .layouts import allowed_layouts
from .model_state import decoder_of
from .reshape import (
    RempLoopRestart,
    RempRuntime,
    ReshapeFailed,
    ReshapeOrder,
    device_of,
    execute,
    go_key,
    kv_dtypes,
    kv_shape_of,
    launch_cpus,
    plan,
    publish_order,
    rebind_threads,
    wait_for_go,
    wait_for_order,
)
from .skeletons import build_all
from .step_boundary import (
    CarryRefused,
    checkpoint_requests,
    kv_requests,
    pp_hold_steps,
    resume_decoding,
    settle_overlap,
)
from .worlds import prepare, world_key, world_keys

logger = logging.getLogger("sglang.srt.remp")


def runtime(scheduler: Any) -> RempRuntime | None:
    return getattr(scheduler, "_remp", None)


def after_scheduler_init(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    from sglang.srt.runtime_context import get_parallel

    config = config_from_env()
    par = get_parallel()
    # Replicas side by side, as SGLang's data-parallel controller places them.
    replica = (par.dp_rank or 0) if config.launch_dp > 1 else 0
    rank = replica * par.tp_size * par.pp_size + par.tp_size * par.pp_rank + par.tp_rank
    world = config.launch_world_size
    # Every wait of the plane is bounded by the reshape timeout (and a rollback by as
    # much again); heartbeats end waits for a lost peer sooner.
    ctrl = Communicator.private(config.plane_path, rank, world, config.reshape_timeout_s,
                                config.stall_timeout_s)
    pool = scheduler.tp_worker.model_runner.token_to_kv_pool
    dtype = next(scheduler.tp_worker.model_runner.model.parameters()).dtype
    try:
        hf = scheduler.model_config.hf_config
        if getattr(hf, "original_total_num_kv_heads", hf.num_key_value_heads) != \
                hf.num_key_value_heads:
            raise ValueError("SGLang padded the KV heads for this launch layout (CPU, tp not "
                             "dividing the KV heads); launch at a layout that divides them")
        decoder = decoder_of(hf, dtype)
    except ValueError as error:
        decoder = None
        logger.warning("remp: reshapes disabled for this model: %s", error)
    launch = Topology(config.launch_tp, config.launch_pp, world, config.launch_dp)
    kv_dtype, kv_store_dtype = kv_dtypes(pool)
    budgets: list[int] = []
    if decoder is not None:
        budgets = launch_budgets(decoder, kv_shape_of(decoder.shape, kv_store_dtype), launch,
                                 int(scheduler.max_total_num_tokens),
                                 dtype.itemsize)
    scheduler._remp = RempRuntime(
        launch_rank=rank,
        topology=launch,
        ctrl=ctrl,
        store=ctrl.store,
        decoder=decoder,
        pool_size=int(scheduler.max_total_num_tokens),
        budgets=budgets,
        token_cap=scheduler.server_args.max_total_tokens,
        dtype=dtype,
        kv_dtype=kv_dtype,
        kv_store_dtype=kv_store_dtype,
        launch_overlap=bool(scheduler.enable_overlap),
        launch_cpus=launch_cpus(world),
        reshape_timeout_s=config.reshape_timeout_s,
        launch=launch,
    )
    scheduler._remp.runners.add(scheduler.tp_worker.model_runner)
    load_stats.wrap_evict(scheduler.tree_cache)
    if decoder is not None:
        _prepare_worlds(scheduler, scheduler._remp, config)
    if config.policy == "auto" and decoder is not None:
        _hold_for_wider_layouts(scheduler, scheduler._remp, config)
    if world > 1:
        _prewarm_vocab_mask(scheduler.device)
    return None


def _prepare_worlds(scheduler: Any, rt: RempRuntime, config: Any) -> None:
    """Build now, on every rank in one order, the SGLang world of each replica of each
    layout a reshape may ask for: a reshape then only parks one and resumes another."""
    topos = allowed_layouts(config, scheduler.model_config.hf_config,
                            cpu=scheduler.device == "cpu")
    keys = world_keys(topos)
    mine = None
    if rt.launch_rank == 0:
        taken = {int(scheduler.server_args.port), int(scheduler.nccl_port)}
        mine = json.dumps(free_ports(len(keys), taken)).encode()
    ports = json.loads(rt.ctrl.broadcast_bytes(mine, root=0))
    live = world_key(rt.topology, rt.launch_rank)
    rt.worlds.adopt(live, scheduler.nccl_port)
    seconds = prepare(scheduler, rt.worlds, rt.launch_rank, live, keys, ports)
    logger.info("remp: %d worlds prepared for %d layouts in %.2f s (rank %d)",
                len(rt.worlds.worlds), len(topos), seconds, rt.launch_rank)
    seconds = build_all(scheduler, rt.worlds, rt.skeletons, rt.launch_rank, live,
                        device_of(scheduler))
    logger.info("remp: %d model skeletons made in %.2f s (rank %d)",
                len(rt.skeletons.models), seconds, rt.launch_rank)


def _hold_for_wider_layouts(scheduler: Any, rt: RempRuntime, config: Any) -> None:
    """Under the automatic policy, a prompt that some candidate layout admits is held
    rather than refused: the policy reshapes to a layout that serves it."""
    from .layouts import max_input_of, policy_candidates

    longest = 0
    for topo in policy_candidates(config, scheduler.model_config.hf_config,
                                  cpu=scheduler.device == "cpu"):
        try:
            capacity = rt.capacity_for(topo)
        except CapacityError:
            continue
        longest = max(longest, max_input_of(scheduler.model_config.context_len, capacity))
    load_stats.COUNTERS.hold_up_to = longest


def _prewarm_vocab_mask(device: Any) -> None:
    """SGLang's vocab-parallel embedding masks its input through a torch.compile'd
    function that runs only when tp > 1, specialised on the shard's bounds: compiled at
    the first step of such a layout, it stalled that step by 1.5 s on CPU. Compiled here
    instead, for any bounds (after a second call dynamo makes them symbolic)."""
    from sglang.srt.layers.vocab_parallel_embedding import get_masked_input_and_mask

    tokens = torch.arange(8, device=device)
    get_masked_input_and_mask(tokens, 0, 4, 0, 4, 4)
    get_masked_input_and_mask(tokens, 4, 8, 0, 8, 8)


def around_dispatch_event_loop(original: Any, scheduler: Any) -> Any:
    rt = runtime(scheduler)
    if rt is None:
        return original(scheduler)
    config = config_from_env()
    tp, pp = config.initial_layout
    if (tp, pp) != (rt.topology.tp, rt.topology.pp):  # start-up: a failure here is fatal
        execute(scheduler, rt, ReshapeOrder(rt.epoch + 1, tp, pp,
                                            time.time() + config.reshape_timeout_s,
                                            rt.topology.dp))
    rebind_threads(rt, rt.topology)
    while True:
        if not rt.topology.is_active(rt.launch_rank):
            order = wait_for_order(rt)
            if order.precopy:  # receive (if joining) now; reshape once the pause begins
                topo = rt.topology
                state = precopy.run_parked(
                    rt, order, topo, Topology(order.tp, order.pp, topo.world_size, order.dp),
                    torch.device(device_of(scheduler)))
                if not wait_for_go(rt, order):
                    continue  # given up (the deadline passed): the copy is dropped
                rt.precopy = state
            _run(scheduler, rt, order, recv_req=None)
            continue
        rt.flush_first, rt.ingest_skipped = True, False
        try:
            return original(scheduler)
        except RempLoopRestart:
            continue


def after_init_request_dispatcher(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Add the REMP request types to the scheduler's dispatcher (re-run after a rebuild)."""
    from sglang.utils import TypeBasedDispatcher

    from .messages import (
        RempKVDigestReqInput,
        RempLoadReqInput,
        RempPlanReqInput,
        RempReshapeReqInput,
        RempTopologyReqInput,
    )

    scheduler._request_dispatcher += TypeBasedDispatcher([
        (RempTopologyReqInput, lambda req: handle_topology(scheduler, req)),
        (RempPlanReqInput, lambda req: handle_plan(scheduler, req)),
        (RempLoadReqInput, lambda req: handle_load(scheduler, req)),
        (RempReshapeReqInput, lambda req: handle_reshape(scheduler, req)),
        (RempKVDigestReqInput, lambda req: handle_kv_digest(scheduler, req)),
    ])
    return None


def handle_kv_digest(scheduler: Any, request: Any) -> Any:
    """Each active rank posts its digest to the store; the HTTP route merges them.

    Never waits here: with PP, later stages only receive the request after rank zero's
    handler has returned.
    """
    from .messages import RempKVDigestReqOutput

    rt = runtime(scheduler)
    topo, rank, shape = rt.topology, rt.launch_rank, rt.decoder.shape
    try:
        mine = kv_digest(scheduler, topo.layer_range(rank, shape.num_layers),
                         topo.kv_head_range(rank, shape.num_kv_heads))
        mine["model_runners"] = str(_live_runners(rt))
        # skeletons hold no parameter memory (every parameter on meta)
        mine["skeleton_param_bytes"] = str(sum(
            t.numel() * t.element_size() for m in rt.skeletons.models.values()
            for t in m.parameters() if t.device.type != "meta"))
        rt.store.set(f"remp-dbg/{request.nonce}/{rank}", json.dumps(mine))
        return RempKVDigestReqOutput(ranks=list(topo.active_ranks))
    except Exception as error:
        logger.exception("remp: kv digest failed")
        return RempKVDigestReqOutput(error=f"{type(error).__name__}: {error}")


def _live_runners(rt: RempRuntime) -> int:
    """Model runners of this process still alive after a collection (the launch one and
    every rebuilt one are registered weakly): one, unless a replaced model leaks."""
    import gc

    gc.collect()
    return len(rt.runners)


def handle_topology(scheduler: Any, request: Any) -> Any:
    from .messages import RempTopologyReqOutput

    config = config_from_env()
    rt = runtime(scheduler)
    try:
        topo = rt.topology
        return RempTopologyReqOutput(
            tp=topo.tp, pp=topo.pp, dp=topo.dp, world_size=topo.world_size,
            active_ranks=list(topo.active_ranks), state=rt.state,
            kv_capacity_tokens=int(scheduler.max_total_num_tokens),
            launch_tp=config.launch_tp, launch_pp=config.launch_pp, launch_dp=config.launch_dp,
            launch_world_size=config.launch_world_size,
            initial_tp=config.initial_tp, initial_pp=config.initial_pp,
            threads=torch.get_num_threads(), cpus=sorted(os.sched_getaffinity(0)),
            process_groups=_process_groups(), python_threads=threading.active_count(),
        )
    except Exception as error:  # report instead of killing the scheduler
        logger.exception("remp: topology request failed")
        return RempTopologyReqOutput(state="error", error=f"{type(error).__name__}: {error}")


def _process_groups() -> int:
    import torch.distributed as dist

    return len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0


def handle_plan(scheduler: Any, request: Any) -> Any:
    """The dry run of a reshape to (tp, pp), from this rank's live state."""
    from .messages import RempPlanReqOutput

    rt = runtime(scheduler)
    try:
        if rt.decoder is None:
            raise ValueError("reshapes are disabled for this model (see log)")
        report = plan(scheduler, rt, Topology(request.tp, request.pp, rt.topology.world_size,
                                              request.dp))
        return RempPlanReqOutput(report_json=json.dumps(report))
    except Exception as error:  # report instead of killing the scheduler
        logger.exception("remp: plan request failed")
        return RempPlanReqOutput(error=f"{type(error).__name__}: {error}")


def handle_load(scheduler: Any, request: Any) -> Any:
    """This replica's load statistics since the last poll (the automatic policy's)."""
    from .messages import RempLoadReqOutput

    rt = runtime(scheduler)
    try:
        topo = rt.topology
        return RempLoadReqOutput(stats_json=json.dumps(
            load_stats.snapshot(scheduler, (topo.dp, topo.tp, topo.pp))))
    except Exception as error:  # report instead of killing the scheduler
        logger.exception("remp: load request failed")
        return RempLoadReqOutput(error=f"{type(error).__name__}: {error}")


def handle_reshape(scheduler: Any, request: Any) -> Any:
    """Every active rank records the order; it runs at the next step boundary. A
    `precopy` order starts the copy to the joining ranks at once (rank zero answers when
    it is done); the `after_precopy` order that follows is the reshape that uses it."""
    from .messages import RempReshapeReqOutput

    rt = runtime(scheduler)
    if rt.decoder is None:
        return RempReshapeReqOutput(error="reshapes are disabled for this model (see log)",
                                    status=400, nonce=request.nonce)
    _drop_expired(rt)
    state = rt.precopy
    after = request.phase == "after_precopy"
    if rt.pending is not None or (state is not None and not after):
        return RempReshapeReqOutput(error="a reshape is already pending", status=409,
                                    nonce=request.nonce)
    order = ReshapeOrder(rt.epoch + 1, request.tp, request.pp, request.deadline, request.dp,
                         precopy=request.phase == "precopy")
    try:
        order.validate(rt.topology.world_size, rt.epoch + 1)
        new = Topology(order.tp, order.pp, rt.topology.world_size, order.dp)
        why = precopy.unsupported(rt.topology, new) if order.precopy else None
        if why:
            raise ValueError(why)
    except ValueError as error:
        return RempReshapeReqOutput(error=str(error), status=400, nonce=request.nonce)
    if after and state is not None:
        if (state.order.tp, state.order.pp, state.order.dp) != (order.tp, order.pp, order.dp):
            return RempReshapeReqOutput(error="the pre-copy was made for another layout",
                                        status=409, nonce=request.nonce)
        order = state.order
    if rt.launch_rank == 0:
        if state is None:  # parked ranks read the order (a plain one after a lost copy)
            publish_order(rt, order)
        if after:  # parked ranks that copied wait for this
            rt.store.set(go_key(order.epoch), b"1")
    if order.precopy and not after:  # copy while serving
        rt.precopy = precopy.start(scheduler, rt, order, rt.topology, new,
                                   torch.device(device_of(scheduler)), request)
        return None
    rt.pending, rt.order_at, rt.hold = (order, request), time.perf_counter(), 0
    return None


def _precopy_poll(scheduler: Any, rt: RempRuntime) -> None:
    """Rank zero answers a finished pre-copy; every rank drops one whose order expired
    (the launcher never sent its reshape)."""
    from .messages import RempReshapeReqOutput

    state = rt.precopy
    if state is None or not state.done():
        return
    if rt.launch_rank == 0 and not state.replied and state.request is not None:
        state.replied = True
        scheduler.send_control_output(RempReshapeReqOutput(
            report_json=json.dumps(state.report), nonce=state.request.nonce), state.request)
    _drop_expired(rt)


def _drop_expired(rt: RempRuntime) -> None:
    """A pre-copy whose order's deadline passed with no reshape pending is given up."""
    state = rt.precopy
    if state is not None and state.expired() and rt.pending is None:
        state.finish()
        rt.precopy = None


def around_get_next_batch_to_run(original: Any, scheduler: Any, running_batch: Any,
                                 last_batch: Any) -> Any:
    rt = runtime(scheduler)
    if rt is None:
        return original(scheduler, running_batch, last_batch)
    if rt.precopy is not None:
        _precopy_poll(scheduler, rt)
    if rt.deferred is not None:  # the first step on the new layout starts here
        _first_step(rt)
    if rt.resume is not None:  # requests that were decoding continue as a decode batch
        rids, rt.resume = rt.resume, None
        batch = resume_decoding(scheduler, rids) if rids else None
        if rt.reply is not None:
            rt.reply[0]["requests_resumed_decoding"] = len(batch.reqs) if batch else 0
        if batch is not None:
            if running_batch.is_empty():
                running_batch = batch
            else:
                running_batch.merge_batch(batch)
            rt.decode_first = True
    plan = _next_batch(original, scheduler, rt, running_batch, last_batch)
    if rt.reply is not None and plan.batch_to_run is None:  # nothing to run: answer now
        _send_reply(scheduler, rt)
    return plan


def _next_batch(original: Any, scheduler: Any, rt: RempRuntime, running_batch: Any,
                last_batch: Any) -> Any:
    if rt.settled_last is not None:  # a batch settled for a reshape that did not happen
        last_batch, rt.settled_last = rt.settled_last, None
    if rt.pending is None and rt.topology.pp > 1 and rt.pp_retract:
        return _pp_retract(scheduler, rt, running_batch)
    if rt.pending is None:
        held = load_stats.without_held(scheduler)  # a wider layout will serve these
        try:
            return original(scheduler, running_batch, last_batch)
        finally:
            load_stats.restore(scheduler, held)
    if rt.topology.pp > 1 and rt.hold < pp_hold_steps(scheduler):
        # Launched micro-batches finish on every stage; nothing new is scheduled.
        from sglang.srt.managers.schedule_batch import NextBatchPlan

        rt.hold += 1
        return NextBatchPlan(batch_to_run=None, running_batch=running_batch)
    _step_boundary(scheduler, rt)  # raises RempLoopRestart once the layout changed
    # The reshape failed: the old layout schedules on. The last batch (a prefill joins
    # the running requests only here) is the one the boundary settled, else the
    # scheduler's: the loop's argument unless the requests were checkpointed (then they
    # wait in the queue, and the batch must not rejoin: they would run twice). Dropping
    # a batch that was not checkpointed lost its requests and leaked their rows.
    settled, rt.settled_last = rt.settled_last, None
    last_batch = settled if settled is not None else scheduler.last_batch
    return original(scheduler, scheduler.running_batch, last_batch)


def around_is_disable_overlap_for_batch(original: Any, scheduler: Any, batch: Any,
                                        last_batch: Any = None) -> Any:
    """The overlap loop streams a batch's tokens only after the next batch has run. For
    the first batch on a new layout that would add a whole step to the pause every
    streaming client sees; its result is processed before the second batch runs."""
    rt = runtime(scheduler)
    if rt is not None and rt.flush_first and last_batch is not None:
        rt.flush_first = False
        return True
    return original(scheduler, batch, last_batch=last_batch)


def around_ingest_requests(original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """The overlap loop takes in new requests before it streams the previous batch's
    tokens. Between the new layout's first batch and its tokens that would add the
    requests queued during the pause (received, broadcast to the other ranks, queued: a
    few ms on CPU) to the pause every streaming client sees; they are taken one step
    later, once (a pause request among them is not held up). Every rank skips alike
    (the same flags, the same batch)."""
    rt = runtime(scheduler)
    if rt is not None and rt.flush_first and not rt.ingest_skipped and \
            scheduler.enable_overlap and scheduler.last_batch is not None and \
            rt.topology.pp == 1:
        rt.ingest_skipped = True
        return []
    return original(scheduler, *args, **kwargs)


def around_should_defer_prefill(original: Any, scheduler: Any, running_batch: Any) -> Any:
    """The carried requests' decode runs before any prefill on the new layout."""
    rt = runtime(scheduler)
    if rt is not None and rt.decode_first:
        rt.decode_first = False
        return True
    return original(scheduler, running_batch)


def around_pause_generation(original: Any, scheduler: Any, recv_req: Any) -> Any:
    """With PP, SGLang retracts the current micro-batch's requests at once, while the
    stages still hold different results in flight (a later stage processes a result one
    loop iteration after the first): the stages' requests then differ by a token and the
    next prefill desynchronises them. Here the retract waits for the same quiescent
    point as a reshape (`_pp_retract`), on every stage alike."""
    rt = runtime(scheduler)
    if rt is None or rt.topology.pp == 1 or recv_req.mode != "retract":
        return original(scheduler, recv_req)
    scheduler._engine_paused = True
    if scheduler._pause_started_at is None:
        scheduler._pause_started_at = time.monotonic()
    rt.pp_retract, rt.hold = True, 0
    return None


def _pp_retract(scheduler: Any, rt: RempRuntime, running_batch: Any) -> Any:
    """PP: a pending retract runs once every launched micro-batch is processed on every
    stage, keeping the requests' KV in the tree (no recompute when they resume). As in
    SGLang's PP loop, the pause flag itself does not stop scheduling."""
    from sglang.srt.managers.schedule_batch import NextBatchPlan

    if rt.hold < pp_hold_steps(scheduler):
        rt.hold += 1
    else:
        checkpoint_requests(scheduler, kv_requests(scheduler))
        rt.pp_retract, rt.hold = False, 0
        running_batch = scheduler.running_batch
    return NextBatchPlan(batch_to_run=None, running_batch=running_batch)


def around_on_idle(original: Any, scheduler: Any) -> Any:
    """While a reshape or a PP retract holds scheduling, the scheduler is not idle: a
    prefill batch processed during the hold is merged into the running batch only at the
    next real scheduling step, and SGLang's idle checks would count its rows as leaked."""
    rt = runtime(scheduler)
    if rt is not None and (rt.pending is not None or rt.pp_retract):
        return None
    return original(scheduler)


def around_paused_state(original: Any, scheduler: Any) -> Any:
    """While generation is paused the loop never schedules: reshape from here."""
    rt = runtime(scheduler)
    if rt is not None and rt.precopy is not None:
        _precopy_poll(scheduler, rt)
    if rt is not None and rt.deferred is not None:
        _first_step(rt)
        _send_reply(scheduler, rt)
    if rt is not None and rt.pending is not None and rt.topology.pp == 1:
        _step_boundary(scheduler, rt)
    return original(scheduler)


def _step_boundary(scheduler: Any, rt: RempRuntime) -> None:
    """Run the pending order here. On success the loop restarts on the new layout; on
    failure the old layout serves on. The overlap loop pops the last batch's result
    when `last_batch` is set: once settled here, the batch is handed to the next
    scheduling step through `rt.settled_last` instead (it still merges into the running
    batch there)."""
    order, request = rt.pending
    # The boundary checkpoints every request, which also serves a pending PP retract.
    rt.pending, rt.hold, rt.pp_retract = None, 0, False
    settled = settle_overlap(scheduler)
    if _run(scheduler, rt, order, request, t_order=rt.order_at):
        raise RempLoopRestart
    if settled and scheduler.last_batch is not None:
        rt.settled_last, scheduler.last_batch = scheduler.last_batch, None


def _run(scheduler: Any, rt: RempRuntime, order: ReshapeOrder, recv_req: Any,
         t_order: float | None = None) -> bool:
    """Execute an order; True if the loop must restart (the layout changed, or the old
    world was rebuilt by a rollback). Rank zero answers the HTTP request."""
    from .messages import RempReshapeReqOutput

    nonce = getattr(recv_req, "nonce", "")
    try:
        t_boundary = time.perf_counter()
        report = execute(scheduler, rt, order, t_boundary)
        # Instants on the host's monotonic clock (`time.perf_counter`), to line the pause
        # up with clients' and logs' timestamps.
        report["clock"] = {"order": t_order if t_order is not None else t_boundary}
        if t_order is not None:  # PP: the hold for launched micro-batches (requests run)
            report["pipeline_hold_s"] = round(t_boundary - t_order, 4)
        if recv_req is not None and rt.launch_rank == 0:
            # The downtime ends when the new layout's first step starts (`_first_step`), so
            # it covers everything up to it, the loop's restart included.
            rt.deferred = (report, recv_req, t_boundary, time.perf_counter())
            return True
        out = RempReshapeReqOutput(report_json=json.dumps(report), nonce=nonce)
        restart = True
    except ReshapeFailed as failed:  # every rank alike; the old layout serves
        logger.warning("remp: %s", failed)
        refused = _caused_by(failed, CapacityError) or _caused_by(failed, CarryRefused)
        out = RempReshapeReqOutput(
            error=str(failed), status=409 if refused else 500, nonce=nonce,
            report_json=json.dumps({"step": failed.step, "rolled_back": failed.rolled_back}))
        restart = failed.rolled_back
    except MigrationError as error:  # the rollback itself failed: nothing more to try here
        logger.critical("remp: reshape %d could not roll back: %s", order.epoch, error)
        out = RempReshapeReqOutput(error=f"reshape failed and could not roll back: {error}",
                                   status=500, nonce=nonce,
                                   report_json=json.dumps({"step": "rollback"}))
        restart = True
    if recv_req is not None and rt.launch_rank == 0:
        scheduler.send_control_output(out, recv_req)
    return restart


def _first_step(rt: RempRuntime) -> None:
    """The new layout's first step starts: the downtime ends here. The reply waits for
    that step's tokens and goes with the next batch (`around_run_batch`): the
    front end answers the reshape on the event loop that also streams, and the answer
    (which reaches it without the detokenizer's hop) would otherwise hold up the first
    tokens after the pause."""
    report, recv_req, t_boundary, t_done = rt.deferred
    rt.deferred = None
    now = time.perf_counter()
    report["downtime_s"] = round(now - t_boundary, 4)
    report["clock"]["boundary"], report["clock"]["resumed"] = t_boundary, now
    report["phases"]["restart_s"] = round(now - t_done, 4)
    phases = report["phases"]
    rt.downtime_model.observe(report["max_rank_bytes"], phases["transfer_s"],
                              report["downtime_s"])
    rt.reply = (report, recv_req, now)


def _first_out(rt: RempRuntime) -> None:
    """`first_step_s`: the new layout's first step, up to its tokens being sent (a
    streaming client's pause is about `downtime_s` plus this)."""
    report, _, t_first = rt.reply
    if "first_step_out" not in report["clock"]:
        now = time.perf_counter()
        report["first_step_s"] = round(now - t_first, 4)
        report["clock"]["first_step_out"] = now


def _send_reply(scheduler: Any, rt: RempRuntime) -> None:
    from .messages import RempReshapeReqOutput

    _first_out(rt)
    report, recv_req, _ = rt.reply
    rt.reply = None
    out = RempReshapeReqOutput(report_json=json.dumps(report), nonce=recv_req.nonce)
    scheduler.send_control_output(out, recv_req)


def after_process_batch_result(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """The first batch on a new layout has streamed its tokens: time it."""
    rt = runtime(scheduler)
    if rt is not None:
        load_stats.count_batch(args[0] if args else kwargs.get("batch"))
    if rt is not None and rt.reply is not None:
        _first_out(rt)
    return None


def around_run_batch(original: Any, scheduler: Any, batch: Any, *args: Any,
                     **kwargs: Any) -> Any:
    """The batch after the first tokens on a new layout: the reshape is answered once a
    decode batch has run (the front end streams those tokens first), or before a prefill
    (the requests queued during the pause: the caller need not wait for them)."""
    rt = runtime(scheduler)
    ready = rt is not None and rt.reply is not None and \
        "first_step_out" in rt.reply[0]["clock"]
    if ready and not batch.forward_mode.is_decode():
        _send_reply(scheduler, rt)
        ready = False
    result = original(scheduler, batch, *args, **kwargs)
    if ready:
        _send_reply(scheduler, rt)
    return result


def _caused_by(error: BaseException, kind: type) -> bool:
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__
    return False

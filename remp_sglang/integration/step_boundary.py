"""The step boundary of a live reshape: requests in flight stop on the old layout and
continue on the new one, with nothing drained, retried or lost.

Between two steps SGLang holds requests in the running batch (decoding), the last
prefill batch and a half-done chunked prefill (all with KV), and in the waiting and
grammar queues (no KV). At the boundary every rank of the old world, in the same loop
iteration (the order reaches them through SGLang's own broadcast and PP relay):

1. settles what is in flight: the overlap scheduler's pending result; with PP, the
   micro-batches already launched (`hold`: nothing new is scheduled until every stage
   has processed them, a fixed number of loop iterations, the same on every stage);
2. makes room when the new layout holds fewer KV slots than are live: SGLang's own LRU
   eviction of unreferenced prefixes (running requests hold tree locks, so their KV is
   never evicted); if that cannot suffice the reshape is refused before anything moves;
3. checkpoints the KV of every request that holds some into the radix tree (SGLang's
   `release_kv_cache(checkpoint=True)`) and re-queues the request at the head of the
   waiting queue as a retracted request (SGLang's own retract path). All live KV is then
   in the tree, which the reshape carries.

On the new layout, the requests that were decoding continue as a decode batch
(`resume_decoding`, the way SGLang's PD-decode server admits requests whose KV arrived
from elsewhere): each re-matches its KV in the imported tree, takes a row that points at
those slots, and its last token is relayed as the next input. The first step decodes
them before any prefill; it is the step they would have run next, so their streams only
pause (retraction is internal to the scheduler; nothing is re-sent). A request that
cannot resume so (a half-done chunked prefill, a prefix cut short for logprobs, no free
row) stays at the head of the queue and extends by what it lacks, as SGLang resumes a
retracted request.

Ranks that join the new world (parked before) receive rank zero's queues as plain
records (SGLang's own msgpack encoding of the original request plus its progress) and
rebuild the same requests, so every rank of the new world schedules identically. If the
reshape fails before the new layout serves, the requests are already back in the old
layout's queue and resume through the same path.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass
from typing import Any

import torch

from remp_sglang.engine import CapacityError

logger = logging.getLogger("sglang.srt.remp")


class CarryRefused(RuntimeError):
    """A request in flight that this reshape cannot carry (answered with 409)."""


@dataclass
class RequestRecord:
    """A queued request as plain data: what a joining rank needs to rebuild it."""

    rid: str
    recv: bytes  # SGLang's msgpack encoding of the TokenizedGenerateReqInput
    output_ids: list[int]
    max_new_tokens: int | None
    logprob_start_len: int
    retraction_count: int
    retracted: bool
    # what the replica head has streamed (a head that takes the request over goes on
    # from there: nothing is sent twice)
    send_token_offset: int = 0
    send_decode_id_offset: int = 0
    decoded_text: str = ""


def after_create_generation_req(req: Any, scheduler: Any, recv_req: Any, *args: Any,
                                **kwargs: Any) -> Any:
    """Keep each request's original input, so a joining rank can rebuild it."""
    req._remp_recv = recv_req
    return req


# ----------------------------------------------------------------------------- settle


def pp_hold_steps(scheduler: Any) -> int:
    """Loop iterations after which every stage has processed every launched micro-batch
    (a result reaches the first stage within one loop round, the last within two)."""
    return 2 * scheduler.pp_loop_size


def settle_overlap(scheduler: Any) -> bool:
    """Process the overlap scheduler's pending result (its tokens reach the clients);
    True if there was one."""
    queue = getattr(scheduler, "result_queue", None)
    settled = False
    while scheduler.enable_overlap and queue:
        batch, result = queue.popleft()
        scheduler.process_batch_result(batch, result)
        settled = True
    return settled


def _is_pp(scheduler: Any) -> bool:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().pp_size > 1


def kv_requests(scheduler: Any) -> list[Any]:
    """Unfinished requests holding KV: running, last prefill, chunked (each once)."""
    if _is_pp(scheduler):
        running, last = list(scheduler.running_mbs), list(scheduler.last_mbs)
    else:
        running, last = [scheduler.running_batch], [scheduler.last_batch]
    # A prefill batch is merged into the running batch only at the next scheduling step.
    batches = running + [b for b in last if b is not None and b.forward_mode.is_extend()
                         and all(b is not r for r in running)]
    out: list[Any] = []
    seen: set[int] = set()
    for req in [r for b in batches for r in b.reqs] + [scheduler.chunked_req]:
        if req is not None and id(req) not in seen and not req.finished() \
                and req.kv.holds_kv:
            seen.add(id(req))
            out.append(req)
    return out


# ----------------------------------------------------------------------------- room


def make_room(scheduler: Any, reqs: list[Any], capacity: int,
              replica_capacity: int | None = None, ways: int = 1) -> int:
    """Evict unreferenced cached prefixes (SGLang's LRU) until the live KV plus one new
    slot per carried request fits `capacity` (this replica's share of the new replica's
    slots; in a split over `ways` replicas, each takes the cached prefixes and the KV of
    the requests dealt to it); CapacityError (nothing evicted) if even evicting every
    unreferenced prefix would not, or if a carried or queued request could never
    complete in a new replica (`replica_capacity` slots, default `capacity`). Returns
    the tokens evicted."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    need = room_needed(scheduler, reqs, capacity, replica_capacity, ways)
    if need <= 0:
        return 0
    alloc = scheduler.token_to_kv_pool_allocator
    before = alloc.available_size()
    scheduler.tree_cache.evict(EvictParams(num_tokens=need))
    return int(alloc.available_size() - before)


def room_needed(scheduler: Any, reqs: list[Any], capacity: int,
                replica_capacity: int | None = None, ways: int = 1) -> int:
    """Cached tokens `make_room` must evict for `capacity` (<= 0: none); CapacityError
    if it could not. Changes nothing (the dry run of /remp/plan uses it too)."""
    whole = replica_capacity or capacity
    for req in list(reqs) + _queued(scheduler):
        longest = len(req.origin_input_ids) + (req.sampling_params.max_new_tokens or 0)
        if longest > whole:
            raise CapacityError(
                f"request {req.rid} may grow to {longest} tokens (prompt + max_new_tokens), "
                f"more than the {whole} KV slots of a replica of the new layout")
    alloc, tree = scheduler.token_to_kv_pool_allocator, scheduler.tree_cache
    live = int(alloc.size) - int(alloc.available_size())
    evictable = int(tree.evictable_size())
    # the busiest new replica's share of the KV the running requests pin (a split deals
    # them in queue order, the carried ones first, as `replicas.place`)
    pinned = live - evictable
    share = pinned + len(reqs)
    if ways > 1 and reqs:
        share = max(min(pinned, sum(len(r.origin_input_ids) + len(r.output_ids)
                                    for r in reqs[b::ways])) + len(reqs[b::ways])
                    for b in range(ways))
    need = evictable + share - capacity
    if need > evictable:
        raise CapacityError(
            f"the new layout holds {capacity} KV slots per replica; {live} are live, of "
            f"which only {evictable} are unreferenced cached prefixes, and the "
            f"{len(reqs)} running requests need {share} (their KV and a slot each"
            f"{f', dealt over {ways} replicas' if ways > 1 else ''}): "
            f"{need - evictable} slots do not fit")
    return need


# ----------------------------------------------------------------------------- carry


def checkpoint_requests(scheduler: Any, reqs: list[Any]) -> None:
    """KV of `reqs` into the tree; the requests to the head of the waiting queue."""
    from sglang.srt.mem_cache.common import release_kv_cache

    for req in reqs:
        release_kv_cache(req, scheduler.tree_cache, checkpoint=True)
        req.reset_for_retract()
    carried = {id(r) for r in reqs}
    rest = [r for r in scheduler.waiting_queue if id(r) not in carried]
    for req in reqs:
        scheduler._add_request_to_queue(req, is_retracted=True)
    queued = [r for r in scheduler.waiting_queue if id(r) in carried]
    scheduler.waiting_queue = queued + rest
    _clear_batches(scheduler)


def _clear_batches(scheduler: Any) -> None:
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    scheduler.running_batch = ScheduleBatch(reqs=[], batch_is_full=False)
    scheduler.last_batch = None
    scheduler.chunked_req = None
    scheduler.cur_batch_for_debug = None
    if _is_pp(scheduler) and hasattr(scheduler, "mbs"):  # the PP loop re-creates them
        n = len(scheduler.mbs)
        scheduler.mbs, scheduler.last_mbs = [None] * n, [None] * n
        scheduler.running_mbs = [ScheduleBatch(reqs=[], batch_is_full=False)
                                 for _ in range(n)]


def decoding_rids(scheduler: Any, reqs: list[Any]) -> list[str]:
    """Of the requests carried, those that were decoding (prefill complete)."""
    return [r.rid for r in reqs if len(r.output_ids) > 0 and r is not scheduler.chunked_req]


def resume_decoding(scheduler: Any, rids: set[str]) -> Any | None:
    """The first step on a new layout: the carried requests in `rids` leave the waiting
    queue as a decode batch over their KV in the tree (None if none can)."""
    from sglang.srt.managers.overlap_utils import RelayPayload
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    pool, tree = scheduler.req_to_token_pool, scheduler.tree_cache
    room = min(pool.available_size(), get_parallel().pp_max_micro_batch_size)
    ready, rest = [], []
    for req in scheduler.waiting_queue:
        if req.rid in rids and len(ready) < room and _rebind(req, tree, pool):
            ready.append(req)
        else:
            rest.append(req)
    if not ready:
        return None
    scheduler.waiting_queue = rest
    batch = ScheduleBatch.init_new(ready, pool, scheduler.token_to_kv_pool_allocator, tree,
                                   scheduler.model_config, scheduler.enable_overlap,
                                   scheduler.spec_algorithm)
    device = batch.device
    rows = [r.kv.req_pool_idx for r in ready]
    seq_lens = [r.kv.kv_committed_len for r in ready]
    batch.req_pool_indices_cpu = torch.tensor(rows, dtype=torch.int64)
    batch.req_pool_indices = batch.req_pool_indices_cpu.to(device)
    batch.seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int64)
    batch.seq_lens = batch.seq_lens_cpu.to(device)
    batch.orig_seq_lens = batch.seq_lens_cpu.to(device, torch.int32)
    batch.seq_lens_sum = sum(seq_lens)
    if batch.return_logprob:
        batch.top_logprobs_nums = [r.logprob.top_logprobs_num for r in ready]
        batch.token_ids_logprobs = [r.logprob.token_ids_logprob for r in ready]
    batch.sampling_info = SamplingBatchInfo.from_schedule_batch(
        batch, scheduler.model_config.vocab_size)
    # The next input is each request's last token, relayed like any decode step's.
    last = torch.tensor([r.output_ids[-1] for r in ready], dtype=torch.int64, device=device)
    scheduler.future_map.stash(batch.req_pool_indices, RelayPayload(bonus_tokens=last))
    batch.input_ids = None
    return batch


def _rebind(req: Any, tree: Any, pool: Any) -> bool:
    """Give a carried decoding request a row over its KV in the tree (locked there), as
    if its prefill had just run; False (nothing taken) if the tree lacks some of it."""
    if req.finished() or len(req.output_ids) == 0:
        return False
    seq_len = len(req.origin_input_ids) + len(req.output_ids) - 1
    req.init_next_round_input(tree)
    if req.prefix_len != seq_len or pool.alloc([req]) is None:
        return False
    req.lock = tree.lock(req.last_node)
    slots = tree.prefix_device_indices(req)
    pool.write((req.kv.req_pool_idx, slice(0, seq_len)), slots.to(pool.req_to_token.dtype))
    req.kv.kv_allocated_len = req.kv.kv_committed_len = req.extend_end = seq_len
    req.is_retracted = False
    return True


def commit_pp_sends(scheduler: Any) -> None:
    """Wait for the PP stage's asynchronous sends before its world goes away."""
    for name in ("send_req_work", "send_proxy_work", "send_output_work"):
        work = getattr(scheduler, name, None)
        if work:
            scheduler._pp_commit_comm_work(work)


def clear_requests(scheduler: Any) -> None:
    """A rank leaving the layout keeps no request state (it is stale when it rejoins)."""
    scheduler.waiting_queue = []
    grammar = getattr(scheduler, "grammar_manager", None)
    if grammar is not None and hasattr(grammar, "grammar_queue"):
        grammar.grammar_queue.clear()
    _clear_batches(scheduler)


# ----------------------------------------------------------------------------- joiners


def _constrained(req: Any) -> bool:
    params = req.sampling_params
    return any(getattr(params, name, None) for name in ("json_schema", "regex", "ebnf"))


def check_joinable(scheduler: Any, reqs: list[Any], across_replicas: bool = False) -> None:
    """Before ranks join: a constrained-decoding request that has generated tokens would
    reach them with a fresh grammar state (its matcher is not replayed), and the ranks
    would sample differently. Across replicas, a request another head takes over would
    also lose the logprobs it has gathered. Refused (nothing moves) until they are
    carried."""
    for req in list(reqs) + _queued(scheduler):
        if _constrained(req) and len(req.output_ids) > 0:
            raise CarryRefused(
                f"request {req.rid} is generating under a grammar (json_schema/regex/ebnf); "
                "its state cannot move to joining ranks yet: retry once it has finished")
        if across_replicas and req.return_logprob and len(req.output_ids) > 0:
            raise CarryRefused(
                f"request {req.rid} is returning logprobs; they cannot move to another "
                "replica yet: retry once it has finished")



def _queued(scheduler: Any) -> list[Any]:
    grammar = getattr(scheduler, "grammar_manager", None)
    pending = list(getattr(grammar, "grammar_queue", []) or [])
    return list(scheduler.waiting_queue) + pending


def export_requests(scheduler: Any) -> list[RequestRecord]:
    """Rank zero's queued requests, in queue order, as plain records.

    The request's timing record is the one field SGLang carries pickled; it is dropped
    (a joining rank starts its own), so a record is plain msgpack data.
    """
    import msgspec
    from sglang.srt.managers.io_struct import msgpack_encode

    out = []
    for req in _queued(scheduler):
        recv = getattr(req, "_remp_recv", None)
        if recv is None:
            raise ValueError(f"request {req.rid}: its original input was not kept")
        out.append(RequestRecord(
            rid=req.rid, recv=msgpack_encode(msgspec.structs.replace(recv, time_stats=None)),
            output_ids=list(req.output_ids),
            max_new_tokens=req.sampling_params.max_new_tokens,
            logprob_start_len=int(req.logprob_start_len),
            retraction_count=int(req.retraction_count), retracted=bool(req.is_retracted),
            send_token_offset=int(req.send_token_offset),
            send_decode_id_offset=int(req.send_decode_id_offset),
            decoded_text=str(req.decoded_text or "")))
    return out


def record_tokens(record: RequestRecord) -> list[int]:
    """A queued request's tokens, its input then what it generated: the prefix whose KV
    it reuses from the tree (a split sends that KV where the request goes)."""
    from sglang.srt.managers.io_struct import msgpack_decode

    return list(msgpack_decode(record.recv).input_ids) + list(record.output_ids)


def rebuild_queue(scheduler: Any, records: list[RequestRecord]) -> None:
    """This rank's queued requests become `records`, in their order: requests it holds
    stay (the same objects, in the queue they were in), the others are rebuilt from
    their records (SGLang's own `handle_generate_request` on the original input, then
    the progress); requests not listed leave this rank. Every rank of a replica ends
    with the same queue."""
    from sglang.srt.managers.io_struct import msgpack_decode

    grammar = getattr(scheduler, "grammar_manager", None)
    pending = getattr(grammar, "grammar_queue", None)
    waiting = {r.rid: r for r in scheduler.waiting_queue}
    compiling = {r.rid: r for r in (pending or [])}
    clear_requests(scheduler)
    for rec in records:
        req = waiting.get(rec.rid)
        if req is not None:
            scheduler.waiting_queue.append(req)
        elif rec.rid in compiling:
            pending.append(compiling[rec.rid])
        else:
            scheduler.handle_generate_request(msgpack_decode(rec.recv))
            req = next((r for r in reversed(_queued(scheduler)) if r.rid == rec.rid), None)
            if req is None:
                raise ValueError(f"request {rec.rid} was not re-created on this rank")
            req.output_ids = array("q", rec.output_ids)
            req.sampling_params.max_new_tokens = rec.max_new_tokens
            req.logprob_start_len = rec.logprob_start_len
            req.retraction_count = rec.retraction_count
            req.is_retracted = req.retracted_stain = rec.retracted
        req = req or compiling[rec.rid]
        req.send_token_offset = rec.send_token_offset
        req.send_decode_id_offset = rec.send_decode_id_offset
        req.decoded_text = rec.decoded_text
    got = sorted(r.rid for r in _queued(scheduler))
    if got != sorted(rec.rid for rec in records):
        raise ValueError("the rebuilt queue differs from the replica's")

"""Hooks in SGLang's data-parallel controller (launched with --dp-size > 1): requests
go only to the replicas of the live layout.

The controller feeds each launch replica's first rank through its own socket. After a
reshape, a layout's replicas start at some of those ranks; the others serve inside a
wider replica and must receive nothing directly (they no longer read their socket). The
launcher names the launch replicas to feed (`RempReplicasReq`, before a reshape the ones
that head both layouts, after it the new layout's) and sends each reshape order to the
heads of the layout it leaves.
"""

from __future__ import annotations

import logging
from typing import Any

from remp_sglang.affinity import PrefixIndex, block_hashes, choose

logger = logging.getLogger("sglang.srt.remp")

_fed: list[int] | None = None  # the launch replicas fed now (None: SGLang's own choice)
_index = PrefixIndex()  # with --remp-cache-aware: which prompt blocks each replica was sent


def after_controller_init(result: Any, controller: Any, *args: Any, **kwargs: Any) -> None:
    from sglang.utils import TypeBasedDispatcher

    from .messages import RempReplicasReq, RempReshapeReqInput

    controller._request_dispatcher += TypeBasedDispatcher([
        (RempReplicasReq, lambda req: feed(controller, req.workers)),
        (RempReshapeReqInput, lambda req: _send(controller, req.heads, req)),
    ])
    return None


def feed(controller: Any, workers: list[int]) -> None:
    """Round-robin, load-aware dispatch and control broadcasts reach `workers` only."""
    global _fed
    n = len(controller.workers)
    if not workers or any(not 0 <= w < n for w in workers):
        logger.error("remp: ignored a replica set %s (launch replicas 0..%d)", workers, n - 1)
        return
    _fed = sorted(workers)
    _index.reshaped(_fed)
    controller._active_workers = list(_fed)
    controller._active_count_cache = len(_fed)
    controller.status = [i in _fed for i in range(n)]


def _send(controller: Any, workers: list[int], obj: Any) -> None:
    from sglang.srt.managers.io_struct import sock_send

    for i in workers:
        if 0 <= i < len(controller.workers) and controller.workers[i] is not None:
            sock_send(controller.workers[i], obj)


def around_budget_dispatch(original: Any, budget: Any, method: Any,
                           estimated_tokens: int = 0) -> Any:
    """SGLang's load-aware methods pick among every launch replica; here, among the fed."""
    from sglang.srt.managers.data_parallel_controller import LoadBalanceMethod

    if _fed is None:
        return original(budget, method, estimated_tokens)
    if method == LoadBalanceMethod.TOTAL_REQUESTS:
        target = min(_fed, key=lambda i: budget.total_requests[i])
    elif method == LoadBalanceMethod.TOTAL_TOKENS:
        target = min(_fed, key=lambda i: (budget.total_tokens[i], budget.total_requests[i]))
    else:
        return None
    budget.total_requests[target] += 1
    budget.total_tokens[target] += estimated_tokens
    return target


def around_dispatch(original: Any, controller: Any, req: Any) -> Any:
    """--remp-cache-aware: the replica most likely to cache the prompt's longest prefix,
    unless it is much busier than the least busy one; then the least busy (requests
    routed to a replica by the caller keep their route)."""
    from sglang.srt.managers.io_struct import sock_send

    ids = getattr(req, "input_ids", None)
    if getattr(req, "routed_dp_rank", None) is not None or not ids:
        return original(controller, req)
    fed = _fed if _fed is not None else [i for i, w in enumerate(controller.workers) if w]
    controller.refresh_load_budget()
    budget = controller.dp_budget
    load = {r: budget.total_requests[r] for r in fed}
    hashes = block_hashes(ids)
    target = choose(_index, fed, hashes, load)
    if target is None:
        target = min(fed, key=lambda r: (load[r], (r - controller.round_robin_counter) % len(fed)))
        controller.round_robin_counter += 1
    budget.total_requests[target] += 1
    _index.record(target, hashes)
    sock_send(controller.workers[target], req)
    return None

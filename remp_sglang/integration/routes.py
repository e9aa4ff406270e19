"""The HTTP side of remp_sglang, in the launcher process: the /remp routes, the offline
Engine's reshape call, and the gate that keeps health checks answering during a reshape.

Rank zero of the schedulers answers through SGLang's own control path (tokenizer
manager -> ZMQ -> rank zero, broadcast to the other ranks -> handler ->
``send_control_output``). Reshape replies carry the caller's nonce: a reply nobody waits
for any more (its caller timed out) is never handed to another caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any

from remp_sglang.integration import metrics, policy_loop
from remp_sglang.integration.config import RempConfig, config_from_env
from remp_sglang.integration.layouts import validate_layout
from remp_sglang.integration.precopy import unsupported as precopy_unsupported
from remp_sglang.topology import Topology

try:  # FastAPI resolves the route's annotations from this module's globals
    from fastapi import Request
except ImportError:  # pragma: no cover - only SGLang processes serve the routes
    Request = Any

ROUTE_TOPOLOGY = "/remp/topology"
ROUTE_RESHAPE = "/remp/reshape"
ROUTE_PLAN = "/remp/plan"
ROUTE_POLICY = "/remp/policy"
#: Test hook (only with REMP_DEBUG_ROUTES=1): a layout-free digest of the cached KV rows.
ROUTE_KV_DIGEST = "/remp/debug/kv_digest"
ENV_DEBUG_ROUTES = "REMP_DEBUG_ROUTES"
#: How long the topology route waits for scheduler rank zero (it answers between batches).
TOPOLOGY_TIMEOUT_S = 120.0

logger = logging.getLogger("sglang.srt.remp")

# The launcher's view of the layout: answers GET /remp/topology while the schedulers are
# busy reshaping, and overlays /server_info. Updated from each reshape's reply.
_main_view: dict[str, Any] = {}
HEALTH_PATHS = ("/health", "/health_generate")


def install(config: RempConfig) -> None:
    """Add the routes (with SGLang's auth levels) and the health gate to SGLang's app,
    before the server starts."""
    from sglang.srt.entrypoints import http_server
    from sglang.srt.utils.auth import AuthLevel

    tp, pp = config.initial_layout
    _main_view.update(dp=config.launch_dp, tp=tp, pp=pp, state="serving", lock=None,
                      reshapes=0, router=None)
    metrics.set_layout(tp, pp, config.launch_world_size - tp * pp)
    # As SGLang's own control endpoints: the admin key when one is set, else the API key.
    _reshape_route._auth_level = AuthLevel.ADMIN_OPTIONAL
    _kv_digest_route._auth_level = AuthLevel.ADMIN_OPTIONAL
    _policy_set_route._auth_level = AuthLevel.ADMIN_OPTIONAL
    app = http_server.app
    app.add_api_route(ROUTE_TOPOLOGY, _topology_route, methods=["GET"], name="remp_topology")
    app.add_api_route(ROUTE_RESHAPE, _reshape_route, methods=["POST"], name="remp_reshape")
    app.add_api_route(ROUTE_PLAN, _plan_route, methods=["POST"], name="remp_plan")
    app.add_api_route(ROUTE_POLICY, _policy_route, methods=["GET"], name="remp_policy")
    app.add_api_route(ROUTE_POLICY, _policy_set_route, methods=["POST"],
                      name="remp_policy_set")
    if os.environ.get(ENV_DEBUG_ROUTES) == "1":
        app.add_api_route(ROUTE_KV_DIGEST, _kv_digest_route, methods=["GET"],
                          name="remp_kv_digest")
    app.add_middleware(HealthGate)


def after_build_server_info(result: dict, server_args: Any, scheduler_info: Any) -> dict:
    """/server_info reports the live layout, not the launch flags."""
    if _main_view:
        result["tp_size"], result["pp_size"] = _main_view["tp"], _main_view["pp"]
        result["dp_size"] = _main_view["dp"]
    return result


class HealthGate:
    """Keeps /health and /health_generate answering 200 through a reshape.

    SGLang's check sends a one-token generation and gives it a fixed time (20 s); the
    schedulers answer nothing while they reshape. The gate lets a check in only when no
    reshape runs, and runs again a check that failed because a reshape started under
    it. It also creates the remp metrics on the first request (by then SGLang has set up
    Prometheus' multi-process directory) and starts the automatic policy, if on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in HEALTH_PATHS:
            if scope["type"] == "http":
                metrics.ensure()
                _start_policy()
            return await self.app(scope, receive, send)
        messages: list[dict] = []

        async def keep(message: dict) -> None:
            messages.append(message)

        _start_policy()
        for _attempt in range(2):
            await _reshape_settled()
            started = _main_view.get("reshapes", 0)
            messages.clear()
            await self.app(scope, receive, keep)
            status = messages[0].get("status") if messages else 200
            if status != 503 or _main_view.get("reshapes", 0) == started and \
                    _main_view.get("state") != "reshaping":
                break
        for message in messages:
            await send(message)


def _start_policy() -> None:
    """Start the automatic policy's loop (once; a no-op under the manual policy)."""
    if _main_view.get("policy_started"):
        return
    _main_view["policy_started"] = True
    loop = policy_loop.loop_for(config_from_env() or RempConfig())
    if loop is not None:
        loop.start()


async def _policy_route(request: Request) -> Any:
    """GET /remp/policy (`?series=1` adds the sampled load over time)."""
    from fastapi.responses import JSONResponse

    loop = policy_loop.loop_for(config_from_env() or RempConfig())
    if loop is None:
        return JSONResponse({"policy": "manual"})
    return JSONResponse(loop.to_json(series=request.query_params.get("series") == "1"))


async def _policy_set_route(request: Request) -> Any:
    """POST /remp/policy {"paused": true|false}: pause or resume the automatic policy."""
    from fastapi.responses import JSONResponse

    loop = policy_loop.loop_for(config_from_env() or RempConfig())
    if loop is None:
        return JSONResponse({"error": "the policy is manual (launch with --remp-policy "
                                      "auto)"}, status_code=400)
    try:
        body = await request.json()
    except ValueError as error:
        return JSONResponse({"error": f"invalid JSON body: {error}"}, status_code=400)
    if not isinstance(body, dict) or set(body) != {"paused"} or \
            not isinstance(body["paused"], bool):
        return JSONResponse({"error": 'body must be {"paused": true} or {"paused": false}'},
                            status_code=400)
    loop.set_paused(body["paused"])
    return JSONResponse({"paused": loop.paused})


async def _reshape_settled() -> None:
    """Until no reshape runs (bounded by a reshape and its rollback)."""
    config = config_from_env() or RempConfig()
    deadline = time.monotonic() + 2 * config.reshape_timeout_s + 60
    while _main_view.get("state") == "reshaping" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _communicator(tokenizer_manager: Any, reply_type: type) -> Any:
    """A FanOutCommunicator for one reply type, wired into the tokenizer manager once."""
    attr = f"_remp_comm_{reply_type.__name__}"
    communicator = getattr(tokenizer_manager, attr, None)
    if communicator is None:
        from sglang.srt.managers.communicator import FanOutCommunicator
        from sglang.srt.runtime_context import get_parallel
        from sglang.utils import TypeBasedDispatcher

        # One reply per replica of the live layout (SGLang's data-parallel controller
        # sends a control request to each replica's head).
        communicator = FanOutCommunicator(
            tokenizer_manager._dispatch_to_scheduler,
            _main_view.get("dp", get_parallel().num_dp_ranks), "queueing"
        )
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher(
            [(reply_type, communicator.handle_recv)]
        )
        setattr(tokenizer_manager, attr, communicator)
    return communicator


class ReplyRouter:
    """Reshape requests and their replies, matched by nonce (SGLang's FanOutCommunicator
    matches by arrival order, so a late reply would reach the next caller). A reply
    whose caller gave up is logged and, if it reports a new layout, still updates the
    launcher's view: the layout reported is always the one serving."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._waiting: dict[str, asyncio.Future] = {}

    async def call(self, request: Any, timeout: float) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting[request.nonce] = future
        try:
            self._send(request)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(request.nonce, None)

    def handle_recv(self, reply: Any) -> None:
        future = self._waiting.get(reply.nonce)
        if future is not None and not future.done():
            future.set_result(reply)
            return
        logger.warning("remp: a reshape reply arrived after its caller gave up: %s",
                       reply.error or "succeeded")
        if reply.error is None:
            new = json.loads(reply.report_json).get("new")
            if new:
                _main_view.update(dp=new.get("dp", 1), tp=new["tp"], pp=new["pp"])
                config = config_from_env() or RempConfig()
                metrics.set_layout(new["tp"], new["pp"], config.launch_world_size
                                   - new.get("dp", 1) * new["tp"] * new["pp"])


def _router(tokenizer_manager: Any) -> ReplyRouter:
    router = _main_view.get("router")
    if router is None:
        from sglang.utils import TypeBasedDispatcher

        from remp_sglang.integration.messages import RempReshapeReqOutput

        router = ReplyRouter(tokenizer_manager._dispatch_to_scheduler)
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher(
            [(RempReshapeReqOutput, router.handle_recv)])
        _main_view["router"] = router
    return router


def _reply_to_dict(reply: Any) -> dict[str, Any]:
    import msgspec

    data = msgspec.structs.asdict(reply)
    for key in ("rid", "http_worker_ipc"):
        data.pop(key, None)
    if data.get("error") is None:
        data.pop("error", None)
    return data


def _tokenizer_manager() -> Any:
    from sglang.srt.entrypoints.http_server import get_global_state

    state = get_global_state()
    if state is None or state.tokenizer_manager is None:
        return None
    state.tokenizer_manager.auto_create_handle_loop()
    return state.tokenizer_manager


async def _topology_route() -> Any:
    from fastapi.responses import JSONResponse

    from remp_sglang.integration.messages import RempTopologyReqInput, RempTopologyReqOutput

    if _main_view.get("state") == "reshaping":  # the schedulers are busy: answer from here
        config = config_from_env() or RempConfig()
        dp, tp, pp = _main_view["dp"], _main_view["tp"], _main_view["pp"]
        return JSONResponse({
            "dp": dp, "tp": tp, "pp": pp, "state": "reshaping",
            "world_size": config.launch_world_size,
            "active_ranks": list(range(dp * tp * pp)),
            "kv_capacity_tokens": _main_view.get("kv_capacity_tokens", 0),
        })
    tokenizer_manager = _tokenizer_manager()
    if tokenizer_manager is None:
        return JSONResponse({"error": "server is not ready"}, status_code=503)
    communicator = _communicator(tokenizer_manager, RempTopologyReqOutput)
    try:
        replies = await asyncio.wait_for(
            communicator(RempTopologyReqInput()), timeout=TOPOLOGY_TIMEOUT_S
        )
    except asyncio.TimeoutError:
        return JSONResponse(
            {"error": f"no topology reply from the scheduler in {TOPOLOGY_TIMEOUT_S:.0f}s"},
            status_code=504,
        )
    data = _reply_to_dict(replies[0])
    _main_view["kv_capacity_tokens"] = data.get("kv_capacity_tokens", 0)
    return JSONResponse(data, status_code=500 if "error" in data else 200)


async def _kv_digest_route() -> Any:
    from fastapi.responses import JSONResponse

    from remp_sglang.integration.messages import RempKVDigestReqInput, RempKVDigestReqOutput

    tokenizer_manager = _tokenizer_manager()
    if tokenizer_manager is None:
        return JSONResponse({"error": "server is not ready"}, status_code=503)
    nonce = uuid.uuid4().hex
    replies = await asyncio.wait_for(
        _communicator(tokenizer_manager, RempKVDigestReqOutput)(
            RempKVDigestReqInput(nonce=nonce)
        ),
        timeout=TOPOLOGY_TIMEOUT_S,
    )
    if replies[0].error:
        return JSONResponse({"error": replies[0].error}, status_code=500)
    merged = await asyncio.to_thread(_collect_digests, nonce, replies[0].ranks)
    return JSONResponse(merged)


def _collect_digests(nonce: str, ranks: list[int]) -> dict[str, list[str]]:
    """Per (layer, head), the distinct digests of its holders (replicas of a KV head are
    computed independently on each TP rank and may differ in the last bits)."""
    import datetime

    import torch.distributed as dist

    config = config_from_env()
    store = dist.FileStore(config.plane_path, -1)
    store.set_timeout(datetime.timedelta(seconds=TOPOLOGY_TIMEOUT_S))
    merged: dict[str, set[str]] = {}
    for rank in ranks:
        for key, value in json.loads(store.get(f"remp-dbg/{nonce}/{rank}")).items():
            merged.setdefault(key, set()).add(value)
    return {key: sorted(values) for key, values in sorted(merged.items())}


def _publish_limits(tokenizer_manager: Any, report: dict[str, Any]) -> None:
    """The pool size follows the layout: so do the limits the launcher took at start-up
    (prompt length checks, /server_info)."""
    from sglang.srt.entrypoints.http_server import get_global_state

    capacity, max_input = report.get("kv_capacity_tokens"), report.get("max_req_input_len")
    if capacity is None or max_input is None:
        return
    tokenizer_manager.max_req_input_len = max_input
    _main_view["kv_capacity_tokens"] = capacity
    state = get_global_state()
    if state is not None and isinstance(getattr(state, "scheduler_info", None), dict):
        state.scheduler_info.update(max_total_num_tokens=capacity, max_req_input_len=max_input)


async def _plan_route(request: Request) -> Any:
    """POST /remp/plan: what a reshape to the body's layout would move, evict, refuse
    and cost; nothing changes (a normal read, like /remp/topology)."""
    from fastapi.responses import JSONResponse

    from remp_sglang.integration.messages import RempPlanReqInput, RempPlanReqOutput

    tokenizer_manager, body = await _control_request(request)
    if tokenizer_manager is None:
        return body  # the error response
    try:
        new = _requested_layout(tokenizer_manager, body)
    except ValueError as error:
        return JSONResponse({"error": str(error)}, status_code=400)
    if _main_view.get("state") == "reshaping":
        return JSONResponse({"error": "a reshape is running"}, status_code=409)
    try:
        replies = await asyncio.wait_for(
            _communicator(tokenizer_manager, RempPlanReqOutput)(
                RempPlanReqInput(dp=new.dp, tp=new.tp, pp=new.pp)),
            timeout=TOPOLOGY_TIMEOUT_S)
    except asyncio.TimeoutError:
        return JSONResponse({"error": "no plan reply from the scheduler"}, status_code=504)
    if replies[0].error:
        return JSONResponse({"error": replies[0].error}, status_code=500)
    return JSONResponse(json.loads(replies[0].report_json))


async def _control_request(request: Request) -> tuple[Any, Any]:
    """(tokenizer manager, JSON body), or (None, the error response)."""
    from fastapi.responses import JSONResponse

    tokenizer_manager = _tokenizer_manager()
    if tokenizer_manager is None:
        return None, JSONResponse({"error": "server is not ready"}, status_code=503)
    try:
        return tokenizer_manager, await request.json()
    except ValueError as error:
        return None, JSONResponse({"error": f"invalid JSON body: {error}"}, status_code=400)


def _requested_layout(tokenizer_manager: Any, body: Any) -> Topology:
    """The layout asked for, fields left out kept; ValueError with the reason."""
    return validate_layout(body, config_from_env() or RempConfig(),
                           tokenizer_manager.model_config.hf_config,
                           cpu=tokenizer_manager.server_args.device == "cpu",
                           current=_current())


def _current() -> tuple[int, int, int]:
    return _main_view["dp"], _main_view["tp"], _main_view["pp"]


def _workers(topo: Topology, config: RempConfig) -> list[int]:
    """The data-parallel controller's workers (launch replicas) that head `topo`'s
    replicas."""
    return [head // (config.launch_world_size // config.launch_dp) for head in topo.heads]


def _feed(tokenizer_manager: Any, workers: list[int]) -> None:
    """Requests (and control requests) go to these launch replicas only, and each control
    request expects a reply from each."""
    from remp_sglang.integration.messages import RempReplicasReq

    tokenizer_manager._dispatch_to_scheduler(RempReplicasReq(workers=workers))
    tokenizer_manager.update_control_communicator_fan_out(len(workers))
    tokenizer_manager.elastic_worker_count = len(workers)
    for name, value in vars(tokenizer_manager).items():
        if name.startswith("_remp_comm_"):
            value.set_fan_out(len(workers))



async def _reshape_route(request: Request) -> Any:
    from fastapi.responses import JSONResponse

    tokenizer_manager, body = await _control_request(request)
    if tokenizer_manager is None:
        return body  # the error response
    status, payload = await run_reshape(tokenizer_manager, body)
    return JSONResponse(payload, status_code=status)


async def run_reshape(tokenizer_manager: Any, body: Any) -> tuple[int, dict[str, Any]]:
    """Validate, reshape, report: (HTTP status, JSON body). Shared by the HTTP route and
    the offline Engine API (`remp_sglang.integration.engine_api`).

    Nothing is drained: the schedulers stop at their next step boundary with every
    request kept (`step_boundary`). `downtime_s` (the schedulers' pause, from the last
    step on the old layout to the first on the new one) comes from rank zero;
    `request_wait_s` is this call's own time, from receipt to the reply. Every rank
    gives up by the order's deadline and rolls back, so the reply (success or the
    failed step) comes before this call's own, longer, bound.
    """
    import msgspec

    from remp_sglang.integration.messages import RempReshapeReqInput

    t_request = time.perf_counter()
    config = config_from_env() or RempConfig()
    current = Topology(_main_view["tp"], _main_view["pp"], config.launch_world_size,
                       _main_view["dp"])
    want_precopy = True
    if isinstance(body, dict) and "precopy" in body:
        body = dict(body)
        want_precopy = body.pop("precopy")
        if not isinstance(want_precopy, bool):
            return 400, {"error": f"precopy must be true or false, got {want_precopy!r}"}
    try:
        new = _requested_layout(tokenizer_manager, body)
    except ValueError as error:
        return 400, {"error": str(error)}
    why_not = precopy_unsupported(current, new) if want_precopy else "not asked for"
    if _main_view["lock"] is None:
        _main_view["lock"] = asyncio.Lock()
    lock: asyncio.Lock = _main_view["lock"]
    if lock.locked():
        return 409, {"error": "a reshape is already running"}
    old = current.layout()
    if current == new:  # nothing to move, nothing to rebuild
        return 200, {"old": old, "new": old, "unchanged": True, "downtime_s": 0.0,
                     "request_wait_s": 0.0, "kv_bytes_moved": 0, "weight_bytes_moved": 0}
    replicas = config.launch_dp > 1
    async with lock:
        _main_view["state"] = "reshaping"
        _main_view["reshapes"] += 1
        metrics.started()
        request = RempReshapeReqInput(
            dp=new.dp, tp=new.tp, pp=new.pp, heads=_workers(current, config),
            deadline=time.time() + config.reshape_timeout_s, nonce=uuid.uuid4().hex)
        if replicas:  # meanwhile, only replicas that head both layouts take requests
            _feed(tokenizer_manager, sorted(set(_workers(current, config))
                                            & set(_workers(new, config))))
        pre_reply = None
        try:  # the schedulers answer by the deadline, or after a rollback of as long
            reply = None
            if why_not is None:  # first the copy while serving, then the reshape
                reply = pre_reply = await _router(tokenizer_manager).call(
                    msgspec.structs.replace(request, nonce=uuid.uuid4().hex,
                                            phase="precopy"),
                    timeout=2 * config.reshape_timeout_s + 60)
                request = msgspec.structs.replace(request, phase="after_precopy")
            if reply is None or reply.error is None:  # (an error: refused, nothing began)
                reply = await _router(tokenizer_manager).call(
                    request, timeout=2 * config.reshape_timeout_s + 60)
        except asyncio.TimeoutError:
            metrics.finished(None, "unknown")
            return 504, {"error": "no reply from the schedulers within the reshape and "
                                  "rollback timeouts; see the server log", "old": old}
        finally:
            _main_view["state"] = "serving"
        if reply.error is None:
            _main_view.update(dp=new.dp, tp=new.tp, pp=new.pp)
        if replicas:
            _feed(tokenizer_manager, _workers(new if reply.error is None else current, config))
    report = json.loads(reply.report_json)
    if reply.error is not None:
        metrics.finished(report, "rolled_back" if report.get("rolled_back") else "failed")
        return reply.status, {"error": reply.error, "old": old, **report}
    _publish_limits(tokenizer_manager, report)
    if report.get("precopy") is None:  # none asked for, possible, or left to the pause
        report["precopy"] = {"used": False, "reason": why_not} if pre_reply is None else \
            {**json.loads(pre_reply.report_json), "used": False,
             "reason": "the reshape did not find the copy"}
    report.update(old=old, new=new.layout(),
                  request_wait_s=round(time.perf_counter() - t_request, 4))
    metrics.finished(report, "succeeded")
    metrics.set_layout(new.tp, new.pp, config.launch_world_size - new.num_active)
    return 200, report

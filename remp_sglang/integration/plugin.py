"""The ``sglang.srt.plugins`` entry point of remp_sglang.

Declared in ``pyproject.toml`` as::

    [project.entry-points."sglang.srt.plugins"]
    remp = "remp_sglang.integration.plugin:register"

SGLang's ``load_plugins()`` calls :func:`register` in every process it starts (the
launcher/HTTP process, each scheduler, the detokenizer). What it does there:

* Every process: AFTER hooks on ``ServerArgs.add_cli_args`` (adds ``--remp``,
  ``--remp-initial-tp``, ``--remp-initial-pp``) and ``ServerArgs.from_cli_args``. Only the
  launcher ever runs these two methods. Without ``--remp`` nothing else happens anywhere.
* Launcher with ``--remp``: the ``from_cli_args`` hook validates the flags, stores them on
  the record (``server_args._remp_config``, a bookkeeping attribute that pickles into the
  scheduler processes) and in the environment variable ``REMP_SGLANG_CONFIG`` (inherited
  by the spawned processes), registers the REMP message types with SGLang's msgpack
  decoder and adds the HTTP routes (``GET /remp/topology``) to SGLang's FastAPI app.
* Spawned processes with ``REMP_SGLANG_CONFIG`` set: register the message types and, in
  scheduler processes, add the REMP request handlers to ``Scheduler._request_dispatcher``.

``GET /remp/topology`` is answered by scheduler rank zero through SGLang's own control
path (tokenizer manager -> ZMQ -> rank zero, broadcast to the TP ranks -> handler ->
``send_control_output`` -> ``FanOutCommunicator``), not from values cached in the HTTP
process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from remp_sglang.integration.cache_state import TREE_CORE_ENV

try:  # FastAPI resolves the route's annotations from this module's globals
    from fastapi import Request
except ImportError:  # pragma: no cover - only SGLang processes serve the routes
    Request = Any

#: Environment variable that carries the REMP configuration to SGLang's subprocesses.
ENV_CONFIG = "REMP_SGLANG_CONFIG"
ROUTE_TOPOLOGY = "/remp/topology"
ROUTE_RESHAPE = "/remp/reshape"
#: Test hook (only with REMP_DEBUG_ROUTES=1): a layout-free digest of the cached KV rows.
ROUTE_KV_DIGEST = "/remp/debug/kv_digest"
ENV_DEBUG_ROUTES = "REMP_DEBUG_ROUTES"
#: How long a reshape may take end to end before the route gives up.
RESHAPE_TIMEOUT_S = 900.0
#: How long the topology route waits for scheduler rank zero (it answers between batches).
TOPOLOGY_TIMEOUT_S = 120.0

# Named under "sglang." so that SGLang's logging configuration shows it in the server log.
logger = logging.getLogger("sglang.srt.remp")

_SCHEDULER_MODULE = "sglang.srt.managers.scheduler"


@dataclass(frozen=True)
class RempConfig:
    """What ``--remp*`` asked for, plus the launch layout (every rank the server may use)."""

    launch_tp: int = 1
    launch_pp: int = 1
    initial_tp: int | None = None
    initial_pp: int | None = None
    ctrl_port: int = 0  # the control/migration plane over every launched rank
    initial_dist_port: int = 0  # world rendezvous for the start-up reshape, if any

    @property
    def initial_layout(self) -> tuple[int, int]:
        return (self.initial_tp or self.launch_tp, self.initial_pp or self.launch_pp)

    @property
    def launch_world_size(self) -> int:
        return self.launch_tp * self.launch_pp

    def validate(self) -> None:
        if self.launch_tp < 1 or self.launch_pp < 1:
            raise ValueError(f"invalid launch layout tp={self.launch_tp} pp={self.launch_pp}")
        for name in ("initial_tp", "initial_pp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--remp-{name.replace('_', '-')} must be >= 1, got {value}")
        tp = self.initial_tp or self.launch_tp
        pp = self.initial_pp or self.launch_pp
        if tp * pp > self.launch_world_size:
            raise ValueError(
                f"--remp initial layout tp={tp} pp={pp} needs {tp * pp} ranks, but the server "
                f"is launched with {self.launch_world_size} (--tp {self.launch_tp} "
                f"--pp-size {self.launch_pp}); launch at the largest layout you will use"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RempConfig:
        data = json.loads(text)
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_from_env(environ: Mapping[str, str] | None = None) -> RempConfig | None:
    """The configuration the launcher exported, or None when ``--remp`` is off."""
    text = (os.environ if environ is None else environ).get(ENV_CONFIG)
    if not text:
        return None
    try:
        return RempConfig.from_json(text)
    except (ValueError, TypeError) as error:
        raise ValueError(f"malformed {ENV_CONFIG}={text!r}: {error}") from error


# ----------------------------------------------------------------------------- entry point

_registered_cli_hooks = False
_enabled_main = False
_enabled_subprocess = False


def register() -> None:
    """Entry point run by SGLang's ``load_plugins()`` in every SGLang process."""
    global _registered_cli_hooks
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if not _registered_cli_hooks:
        HookRegistry.register(
            "sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER
        )
        HookRegistry.register(
            "sglang.srt.server_args.ServerArgs.from_cli_args",
            _after_from_cli_args,
            HookType.AFTER,
        )
        _registered_cli_hooks = True

    # SGLang starts its schedulers and detokenizer with multiprocessing; the launcher
    # itself has no multiprocessing parent and turns REMP on from its command line.
    if multiprocessing.parent_process() is not None:
        config = config_from_env()
        if config is not None:
            _enable_subprocess(config)


# ----------------------------------------------------------------------------- CLI (launcher)


def _after_add_cli_args(result: Any, parser: Any) -> None:
    if "--remp" in getattr(parser, "_option_string_actions", {}):
        return None  # the same parser seen twice
    group = parser.add_argument_group("remp_sglang (runtime TP/PP reshaping)")
    group.add_argument(
        "--remp",
        action="store_true",
        help="Enable remp_sglang: runtime TP/PP reshaping that keeps the KV and prefix cache. "
        "Launch with --tp/--pp-size covering every rank the server may use.",
    )
    group.add_argument(
        "--remp-initial-tp",
        type=int,
        default=None,
        help="With --remp: the TP degree to serve with first (default: --tp).",
    )
    group.add_argument(
        "--remp-initial-pp",
        type=int,
        default=None,
        help="With --remp: the PP degree to serve with first (default: --pp-size).",
    )
    return None


def _after_from_cli_args(result: Any, cls: Any, namespace: Any) -> None:
    """Carry ``--remp*`` (dropped by ``from_cli_args``) into the record and environment."""
    if not getattr(namespace, "remp", False):
        if (
            getattr(namespace, "remp_initial_tp", None) is not None
            or getattr(namespace, "remp_initial_pp", None) is not None
        ):
            raise ValueError("--remp-initial-tp/--remp-initial-pp need --remp")
        os.environ.pop(ENV_CONFIG, None)
        return None
    config = activate(
        launch_tp=int(getattr(namespace, "tp_size", 1) or 1),
        launch_pp=int(getattr(namespace, "pp_size", 1) or 1),
        initial_tp=getattr(namespace, "remp_initial_tp", None),
        initial_pp=getattr(namespace, "remp_initial_pp", None),
        dp_size=int(getattr(namespace, "dp_size", 1) or 1),
        tokenizer_workers=int(getattr(namespace, "tokenizer_worker_num", 1) or 1),
    )
    # A bookkeeping attribute (underscore, not a field): writable on the sealed record and
    # pickled into every scheduler process by ServerArgs.__reduce__.
    result._remp_config = asdict(config)
    return None


def activate(
    launch_tp: int, launch_pp: int, initial_tp: int | None = None,
    initial_pp: int | None = None, dp_size: int = 1, tokenizer_workers: int = 1,
) -> RempConfig:
    """Turn remp on in this (launcher) process, before SGLang spawns its schedulers."""
    config = RempConfig(launch_tp=launch_tp, launch_pp=launch_pp, initial_tp=initial_tp,
                        initial_pp=initial_pp, ctrl_port=free_port(),
                        initial_dist_port=free_port())
    config.validate()
    if dp_size != 1:
        raise ValueError(f"--remp supports --dp-size 1 only, got {dp_size}")
    if tokenizer_workers != 1:
        raise ValueError(f"--remp supports --tokenizer-worker-num 1 only, got {tokenizer_workers}")
    os.environ[ENV_CONFIG] = config.to_json()  # inherited by the spawned processes
    # Rank zero exports the radix tree at each reshape; only the Python core allows it.
    os.environ[TREE_CORE_ENV] = "python"
    enable_main_process(config)
    return config


# ----------------------------------------------------------------------------- launcher side

# The launcher's view of the layout: answers GET /remp/topology while the schedulers are
# busy reshaping, and overlays /server_info. Updated from each reshape's reply.
_main_view: dict[str, Any] = {}


def enable_main_process(config: RempConfig) -> None:
    global _enabled_main
    if _enabled_main:
        return
    from sglang.srt.entrypoints import http_server
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from remp_sglang.integration.messages import register_message_types

    register_message_types()
    tp, pp = config.initial_layout
    _main_view.update(tp=tp, pp=pp, state="serving", lock=None)
    http_server.app.add_api_route(
        ROUTE_TOPOLOGY, _topology_route, methods=["GET"], name="remp_topology"
    )
    http_server.app.add_api_route(
        ROUTE_RESHAPE, _reshape_route, methods=["POST"], name="remp_reshape"
    )
    if os.environ.get(ENV_DEBUG_ROUTES) == "1":
        http_server.app.add_api_route(
            ROUTE_KV_DIGEST, _kv_digest_route, methods=["GET"], name="remp_kv_digest"
        )
    HookRegistry.register(
        "sglang.srt.utils.common.build_server_info", _after_build_server_info, HookType.AFTER
    )
    HookRegistry.apply_hooks()
    _enabled_main = True
    logger.info("remp_sglang enabled: %s", config)


def _after_build_server_info(result: dict, server_args: Any, scheduler_info: Any) -> dict:
    """/server_info reports the live layout, not the launch flags."""
    if _main_view:
        result["tp_size"], result["pp_size"] = _main_view["tp"], _main_view["pp"]
    return result


def _communicator(tokenizer_manager: Any, reply_type: type) -> Any:
    """A FanOutCommunicator for one reply type, wired into the tokenizer manager once."""
    attr = f"_remp_comm_{reply_type.__name__}"
    communicator = getattr(tokenizer_manager, attr, None)
    if communicator is None:
        from sglang.srt.managers.communicator import FanOutCommunicator
        from sglang.srt.runtime_context import get_parallel
        from sglang.utils import TypeBasedDispatcher

        communicator = FanOutCommunicator(
            tokenizer_manager._dispatch_to_scheduler, get_parallel().num_dp_ranks, "queueing"
        )
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher(
            [(reply_type, communicator.handle_recv)]
        )
        setattr(tokenizer_manager, attr, communicator)
    return communicator


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
        return JSONResponse({
            "tp": _main_view["tp"], "pp": _main_view["pp"], "state": "reshaping",
            "world_size": config.launch_world_size,
            "active_ranks": list(range(_main_view["tp"] * _main_view["pp"])),
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
    import uuid

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
    store = dist.TCPStore("127.0.0.1", config.ctrl_port, is_master=False,
                          timeout=datetime.timedelta(seconds=TOPOLOGY_TIMEOUT_S))
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


def validate_layout(
    body: Any, config: RempConfig, hf_config: Any, cpu: bool = False
) -> tuple[int, int]:
    """(tp, pp) from a reshape request, or ValueError with the reason (-> HTTP 400).

    On CPU, SGLang pads KV (and query) heads when tp does not divide the KV heads rather
    than replicating them as on GPU; remp moves only unpadded layouts there.
    """
    from remp_sglang.topology import Topology

    if not isinstance(body, dict):
        raise ValueError('body must be a JSON object like {"tp": 2, "pp": 1}')
    unknown = sorted(set(body) - {"tp", "pp"})
    if unknown:
        raise ValueError(f"unknown fields {unknown}; expected tp and pp")
    values = []
    for name in ("tp", "pp"):
        value = body.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        values.append(value)
    tp, pp = values
    topo = Topology(tp, pp, config.launch_world_size) if tp * pp <= config.launch_world_size \
        else None
    if topo is None:
        raise ValueError(f"tp*pp = {tp * pp} exceeds the {config.launch_world_size} ranks this "
                         f"server was launched with")
    from remp_sglang.integration.model_state import decoder_of

    shape = decoder_of(hf_config, torch_dtype_of(hf_config)).shape
    topo.check_model(shape)
    if cpu and shape.num_kv_heads % tp:
        raise ValueError(f"on CPU, tp={tp} must divide the {shape.num_kv_heads} KV heads "
                         "(SGLang pads heads there instead of replicating them)")
    return tp, pp


def torch_dtype_of(hf_config: Any) -> Any:
    import torch

    return getattr(hf_config, "torch_dtype", None) or torch.float32


async def _reshape_route(request: Request) -> Any:
    from fastapi.responses import JSONResponse

    tokenizer_manager = _tokenizer_manager()
    if tokenizer_manager is None:
        return JSONResponse({"error": "server is not ready"}, status_code=503)
    try:
        body = await request.json()
    except ValueError as error:
        return JSONResponse({"error": f"invalid JSON body: {error}"}, status_code=400)
    status, payload = await run_reshape(tokenizer_manager, body)
    return JSONResponse(payload, status_code=status)


async def run_reshape(tokenizer_manager: Any, body: Any) -> tuple[int, dict[str, Any]]:
    """Validate, reshape, report: (HTTP status, JSON body). Shared by the HTTP route and
    the offline Engine API (`remp_sglang.integration.engine_api`).

    Nothing is drained: the schedulers stop at their next step boundary with every
    request kept (`step_boundary`). `downtime_s` (the schedulers' pause, from the last
    step on the old layout to the first on the new one) comes from rank zero;
    `request_wait_s` is this call's own time, from receipt to the reply.
    """
    import time

    from remp_sglang.integration.messages import RempReshapeReqInput, RempReshapeReqOutput

    t_request = time.perf_counter()
    config = config_from_env() or RempConfig()
    try:
        tp, pp = validate_layout(body, config, tokenizer_manager.model_config.hf_config,
                                 cpu=tokenizer_manager.server_args.device == "cpu")
    except ValueError as error:
        return 400, {"error": str(error)}
    if _main_view["lock"] is None:
        _main_view["lock"] = asyncio.Lock()
    lock: asyncio.Lock = _main_view["lock"]
    if lock.locked():
        return 409, {"error": "a reshape is already running"}
    current = {"tp": _main_view["tp"], "pp": _main_view["pp"]}
    if current == {"tp": tp, "pp": pp}:  # nothing to move, nothing to rebuild
        return 200, {"old": current, "new": current, "unchanged": True, "downtime_s": 0.0,
                     "request_wait_s": 0.0, "kv_bytes_moved": 0, "weight_bytes_moved": 0}
    async with lock:
        old = dict(current)
        _main_view["state"] = "reshaping"
        try:
            replies = await asyncio.wait_for(
                _communicator(tokenizer_manager, RempReshapeReqOutput)(
                    RempReshapeReqInput(tp=tp, pp=pp, dist_port=free_port())
                ),
                timeout=RESHAPE_TIMEOUT_S,
            )
        except asyncio.TimeoutError:
            return 504, {"error": "reshape timed out"}
        finally:
            _main_view["state"] = "serving"
        reply = replies[0]
        if reply.error is None:
            _main_view.update(tp=tp, pp=pp)
    if reply.error is not None:
        return reply.status, {"error": reply.error, "old": old}
    report = json.loads(reply.report_json)
    _publish_limits(tokenizer_manager, report)
    report.update(old=old, new={"tp": tp, "pp": pp},
                  request_wait_s=round(time.perf_counter() - t_request, 4))
    return 200, report


# ----------------------------------------------------------------------------- subprocesses


def _enable_subprocess(config: RempConfig) -> None:
    global _enabled_subprocess
    if _enabled_subprocess:
        return
    from remp_sglang.integration.messages import register_message_types

    register_message_types()
    # Scheduler processes import the scheduler module before load_plugins() runs (their
    # entry function lives there); elsewhere (detokenizer) there is no scheduler to hook,
    # and resolving the hook target would import it for nothing.
    if _SCHEDULER_MODULE in sys.modules:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from remp_sglang.integration import scheduler_hooks as hooks
        from remp_sglang.integration.model_state import around_load_weights_only
        from remp_sglang.integration.step_boundary import after_create_generation_req

        for target, fn, kind in (
            ("Scheduler.init_request_dispatcher", hooks.after_init_request_dispatcher,
             HookType.AFTER),
            ("Scheduler.__init__", hooks.after_scheduler_init, HookType.AFTER),
            ("Scheduler.get_next_batch_to_run", hooks.around_get_next_batch_to_run,
             HookType.AROUND),
            ("Scheduler._record_scheduler_state_for_paused_engine", hooks.around_paused_state,
             HookType.AROUND),
            ("Scheduler._create_generation_req", after_create_generation_req,
             HookType.AFTER),
            ("Scheduler.pause_generation", hooks.around_pause_generation, HookType.AROUND),
            ("Scheduler.on_idle", hooks.around_on_idle, HookType.AROUND),
            ("dispatch_event_loop", hooks.around_dispatch_event_loop, HookType.AROUND),
        ):
            HookRegistry.register(f"{_SCHEDULER_MODULE}.{target}", fn, kind)
        HookRegistry.register(
            "sglang.srt.model_loader.loader.DefaultModelLoader.load_weights_only",
            around_load_weights_only,
            HookType.AROUND,
        )
    _enabled_subprocess = True

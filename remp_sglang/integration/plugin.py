"""The ``sglang.srt.plugins`` entry point of remp_sglang.

Declared in ``pyproject.toml`` as::

    [project.entry-points."sglang.srt.plugins"]
    remp = "remp_sglang.integration.plugin:register"

SGLang's ``load_plugins()`` calls :func:`register` in every process it starts (the
launcher/HTTP process, each scheduler, the detokenizer). What it does there:

* Every process: AFTER hooks on ``ServerArgs.add_cli_args`` (adds the ``--remp*`` flags,
  see `config`) and ``ServerArgs.from_cli_args``. Only the
  launcher ever runs these two methods. Without ``--remp`` nothing else happens anywhere.
* Launcher with ``--remp``: the ``from_cli_args`` hook refuses unsupported launch options
  and SGLang versions, validates the flags, stores them on
  the record (``server_args._remp_config``, a bookkeeping attribute that pickles into the
  scheduler processes) and in the environment variable ``REMP_SGLANG_CONFIG`` (inherited
  by the spawned processes), registers the REMP message types with SGLang's msgpack
  decoder and adds the HTTP routes and the health gate (`routes`) to SGLang's FastAPI app.
* Spawned processes with ``REMP_SGLANG_CONFIG`` set: register the message types; in
  scheduler processes, add the REMP hooks (`scheduler_hooks`); in the data-parallel
  controller (``--dp-size`` > 1), feed only the live layout's replicas (`dp_controller`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from dataclasses import asdict
from typing import Any

from remp_sglang.integration.cache_state import TREE_CORE_ENV
from remp_sglang.integration.config import (
    ENV_CONFIG,
    RESHAPE_TIMEOUT_S,
    STALL_TIMEOUT_S,
    RempConfig,
    _after_add_cli_args,
    check_launch_options,
    check_sglang_version,
    config_from_env,
    policy_settings,
    private_plane_path,
)

# Named under "sglang." so that SGLang's logging configuration shows it in the server log.
logger = logging.getLogger("sglang.srt.remp")

_SCHEDULER_MODULE = "sglang.srt.managers.scheduler"
_DPC_MODULE = "sglang.srt.managers.data_parallel_controller"

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


# ----------------------------------------------------------------------------- launcher

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
    check_launch_options(result)
    config = activate(
        launch_tp=int(getattr(namespace, "tp_size", 1) or 1),
        launch_pp=int(getattr(namespace, "pp_size", 1) or 1),
        initial_tp=getattr(namespace, "remp_initial_tp", None),
        initial_pp=getattr(namespace, "remp_initial_pp", None),
        dp_size=int(getattr(namespace, "dp_size", 1) or 1),
        tokenizer_workers=int(getattr(namespace, "tokenizer_worker_num", 1) or 1),
        reshape_timeout_s=float(getattr(namespace, "remp_reshape_timeout", RESHAPE_TIMEOUT_S)),
        stall_timeout_s=float(getattr(namespace, "remp_stall_timeout", STALL_TIMEOUT_S)),
        cache_aware=bool(getattr(namespace, "remp_cache_aware", False)),
        policy=getattr(namespace, "remp_policy", "manual") or "manual",
        policy_settings=policy_settings(getattr(namespace, "remp_policy_config", None)),
    )
    # A bookkeeping attribute (underscore, not a field): writable on the sealed record and
    # pickled into every scheduler process by ServerArgs.__reduce__.
    result._remp_config = asdict(config)
    return None


def activate(
    launch_tp: int, launch_pp: int, initial_tp: int | None = None,
    initial_pp: int | None = None, dp_size: int = 1, tokenizer_workers: int = 1,
    reshape_timeout_s: float = RESHAPE_TIMEOUT_S, stall_timeout_s: float = STALL_TIMEOUT_S,
    cache_aware: bool = False, policy: str = "manual", policy_settings: dict | None = None,
) -> RempConfig:
    """Turn remp on in this (launcher) process, before SGLang spawns its schedulers."""
    check_sglang_version()
    config = RempConfig(launch_tp=launch_tp, launch_pp=launch_pp, launch_dp=dp_size,
                        initial_tp=initial_tp,
                        initial_pp=initial_pp, plane_path=private_plane_path(),
                        reshape_timeout_s=reshape_timeout_s,
                        stall_timeout_s=stall_timeout_s, cache_aware=cache_aware,
                        policy=policy, policy_settings=dict(policy_settings or {}))
    config.validate()
    if tokenizer_workers != 1:
        raise ValueError(f"--remp supports --tokenizer-worker-num 1 only, got {tokenizer_workers}")
    os.environ[ENV_CONFIG] = config.to_json()  # inherited by the spawned processes
    # Rank zero exports the radix tree at each reshape; only the Python core allows it.
    os.environ[TREE_CORE_ENV] = "python"
    enable_main_process(config)
    return config


def enable_main_process(config: RempConfig) -> None:
    global _enabled_main
    if _enabled_main:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from remp_sglang.integration import routes
    from remp_sglang.integration.messages import register_message_types

    register_message_types()
    routes.install(config)
    HookRegistry.register(
        "sglang.srt.utils.common.build_server_info", routes.after_build_server_info,
        HookType.AFTER
    )
    HookRegistry.apply_hooks()
    _enabled_main = True
    logger.info("remp_sglang enabled: %s", config)


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
    if _DPC_MODULE in sys.modules and config.launch_dp > 1:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from remp_sglang.integration import dp_controller

        HookRegistry.register(f"{_DPC_MODULE}.DataParallelController.__init__",
                              dp_controller.after_controller_init, HookType.AFTER)
        HookRegistry.register(f"{_DPC_MODULE}.DPBudget.dispatch",
                              dp_controller.around_budget_dispatch, HookType.AROUND)
        if config.cache_aware:
            for method in ("round_robin_scheduler", "total_requests_scheduler",
                           "total_tokens_scheduler"):
                HookRegistry.register(f"{_DPC_MODULE}.DataParallelController.{method}",
                                      dp_controller.around_dispatch, HookType.AROUND)
    if _SCHEDULER_MODULE in sys.modules:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from remp_sglang.integration import load_stats
        from remp_sglang.integration import scheduler_hooks as hooks
        from remp_sglang.integration.model_state import (
            around_broadcast_pyobj,
            around_dist_barrier_after_load,
            around_get_tokenizer,
            around_initialize_model,
            around_load_weights_only,
            around_measure_pre_model_load_memory,
        )
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
            ("Scheduler.process_batch_result", hooks.after_process_batch_result,
             HookType.AFTER),
            ("Scheduler.run_batch", hooks.around_run_batch, HookType.AROUND),
            ("Scheduler.is_disable_overlap_for_batch",
             hooks.around_is_disable_overlap_for_batch, HookType.AROUND),
            ("Scheduler._should_defer_prefill", hooks.around_should_defer_prefill,
             HookType.AROUND),
            ("Scheduler.ingest_requests", hooks.around_ingest_requests, HookType.AROUND),
            ("dispatch_event_loop", hooks.around_dispatch_event_loop, HookType.AROUND),
            ("validate_input_length", load_stats.around_validate_input_length,
             HookType.AROUND),
            ("Scheduler.init_req_max_new_tokens", load_stats.around_init_req_max_new_tokens,
             HookType.AROUND),
        ):
            HookRegistry.register(f"{_SCHEDULER_MODULE}.{target}", fn, kind)
        HookRegistry.register(
            "sglang.srt.model_loader.loader.DefaultModelLoader.load_weights_only",
            around_load_weights_only,
            HookType.AROUND,
        )
        HookRegistry.register("sglang.srt.model_loader.loader._initialize_model",
                              around_initialize_model, HookType.AROUND)
        HookRegistry.register(
            "sglang.srt.distributed.bootstrap.measure_pre_model_load_memory",
            around_measure_pre_model_load_memory,
            HookType.AROUND,
        )
        HookRegistry.register(
            "sglang.srt.model_executor.model_runner.dist_barrier_after_load",
            around_dist_barrier_after_load,
            HookType.AROUND,
        )
        for name, fn in (("broadcast_pyobj", around_broadcast_pyobj),
                         ("get_tokenizer", around_get_tokenizer)):
            HookRegistry.register(f"sglang.srt.managers.tp_worker.{name}", fn, HookType.AROUND)
    _enabled_subprocess = True

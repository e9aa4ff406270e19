"""Reshapes from Python, on SGLang's offline `sglang.Engine`.

    from remp_sglang.integration.engine_api import launch_engine, reshape
    engine = launch_engine(model_path=..., tp_size=2, remp_initial_tp=1)
    report = reshape(engine, tp=2, pp=1)

An Engine takes no CLI flags, so `--remp` cannot reach it through SGLang's argument
parsing; `launch_engine` turns remp on in this process (as the CLI hook would) before
the Engine spawns its schedulers. `reshape` runs the same code as `POST /remp/reshape`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from remp_sglang.integration.config import check_launch_options
from remp_sglang.integration.plugin import activate
from remp_sglang.integration.routes import run_reshape


def launch_engine(
    *, remp_initial_tp: int | None = None, remp_initial_pp: int | None = None, **kwargs: Any
) -> Any:
    """An `sglang.Engine(**kwargs)` with remp on; launch it at the largest layout needed."""
    import sglang
    from sglang.srt.plugins import load_plugins

    load_plugins()
    check_launch_options(SimpleNamespace(**kwargs))
    activate(
        launch_tp=int(kwargs.get("tp_size", 1)), launch_pp=int(kwargs.get("pp_size", 1)),
        initial_tp=remp_initial_tp, initial_pp=remp_initial_pp,
        dp_size=int(kwargs.get("dp_size", 1)),
    )
    return sglang.Engine(**kwargs)


def reshape(engine: Any, tp: int, pp: int = 1) -> dict[str, Any]:
    """Switch the engine to (tp, pp); returns the report. ValueError on a bad layout,
    RuntimeError when the reshape was refused or failed (the old layout keeps serving
    unless the report says otherwise)."""
    status, payload = engine.loop.run_until_complete(
        run_reshape(engine.tokenizer_manager, {"tp": tp, "pp": pp})
    )
    if status == 400:
        raise ValueError(payload["error"])
    if status != 200:
        raise RuntimeError(f"reshape failed ({status}): {payload['error']}")
    return payload

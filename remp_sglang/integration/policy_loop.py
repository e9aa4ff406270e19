"""`--remp-policy auto` in the launcher: polls every replica's head for its load, feeds
the pure policy (`remp_sglang.policy`) and orders the reshapes it decides, through the
same `run_reshape` as POST /remp/reshape. `GET /remp/policy` shows its state and
decisions; `POST /remp/policy {"paused": true|false}` pauses and resumes it.

It runs as a task on the HTTP server's event loop, started by the first HTTP request
(the launcher's own readiness check is one), and skips its turn while a reshape runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import asdict, replace
from typing import Any

from remp_sglang.integration.config import RempConfig
from remp_sglang.perf import Hardware, StepModel
from remp_sglang.policy import Candidate, Decision, LoadSample, Policy, PolicyConfig, Req

logger = logging.getLogger("sglang.srt.remp")

#: Samples kept for `GET /remp/policy?series=1` (the benchmark's plots).
SERIES = 3600
#: How often the switches' predicted pauses are refreshed from the schedulers' dry runs.
PLAN_EVERY_S = 10.0


class PolicyLoop:
    """The policy, its sampler and its record, in the launcher process."""

    def __init__(self, config: RempConfig) -> None:
        self.config = config
        self.settings = PolicyConfig.from_dict(config.policy_settings)
        self.policy: Policy | None = None  # built once the schedulers answer
        self.series: deque = deque(maxlen=SERIES)
        self.paused = False
        self.task: asyncio.Task | None = None
        self.error: str | None = None
        self.t0 = time.monotonic()
        self._last_reason = ""
        self._refused: set[str] = set()  # held requests already refused
        self._planned_at = float("-inf")

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        from remp_sglang.integration import routes

        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                tm = routes._tokenizer_manager()
                if tm is None or routes._main_view.get("state") == "reshaping":
                    continue
                if self.policy is None:
                    self.policy = await self._build(tm)
                    self.policy.paused = self.paused
                sample = await self._sample(tm)
                if sample is None:
                    continue
                self.policy.observe(sample)
                await self._plan(tm, sample.t)
                decision = self.policy.decide()
                self._log(decision)
                if decision.switch:
                    await self._act(tm, decision)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the policy never takes the server down
                self.error = f"{type(error).__name__}: {error}"
                logger.exception("remp policy: evaluation failed")

    async def _plan(self, tm: Any, t: float) -> None:
        """The server's predicted pause of a switch to each candidate (the planner's
        bytes over the measured bandwidth plus the measured fixed cost), from rank zero's
        dry run; none before the first reshape has been measured."""
        if t - self._planned_at < PLAN_EVERY_S:
            return
        from remp_sglang.integration import routes
        from remp_sglang.integration.messages import RempPlanReqInput, RempPlanReqOutput

        self._planned_at = t
        current = self.policy.current
        self.policy.planned.clear()
        for c in self.policy.candidates:
            if c.layout == current:
                continue
            replies = await asyncio.wait_for(
                routes._communicator(tm, RempPlanReqOutput)(
                    RempPlanReqInput(dp=c.topo.dp, tp=c.topo.tp, pp=c.topo.pp)),
                timeout=routes.TOPOLOGY_TIMEOUT_S)
            if replies[0].error:
                continue
            predicted = json.loads(replies[0].report_json).get("predicted_downtime_s")
            if predicted is not None:
                self.policy.planned[(current, c.layout)] = float(predicted)

    async def _build(self, tm: Any) -> Policy:
        """Candidates with their capacities (the schedulers' dry runs), the step model."""
        from remp_sglang.integration import routes
        from remp_sglang.integration.layouts import (
            max_input_of,
            policy_candidates,
            torch_dtype_of,
        )
        from remp_sglang.integration.messages import RempPlanReqInput, RempPlanReqOutput
        from remp_sglang.integration.model_state import decoder_of

        hf = tm.model_config.hf_config
        cpu = tm.server_args.device == "cpu"
        candidates = []
        for topo in policy_candidates(self.config, hf, cpu):
            replies = await asyncio.wait_for(
                routes._communicator(tm, RempPlanReqOutput)(
                    RempPlanReqInput(dp=topo.dp, tp=topo.tp, pp=topo.pp)),
                timeout=routes.TOPOLOGY_TIMEOUT_S)
            if replies[0].error:
                logger.warning("remp policy: %s left out: %s", topo.layout(), replies[0].error)
                continue
            capacity = json.loads(replies[0].report_json)["kv_capacity_tokens"]
            candidates.append(Candidate(topo, capacity, max_input_of(tm.context_len, capacity),
                                        tm.server_args.max_running_requests or 256))
        if not candidates:
            raise RuntimeError("no candidate layout")
        model = StepModel(decoder_of(hf, torch_dtype_of(hf)), self.hardware(cpu))
        current = routes._current()
        logger.info("remp policy: auto over %s",
                    [f"dp{c.topo.dp} tp{c.topo.tp} pp{c.topo.pp} kv={c.capacity}"
                     for c in candidates])
        return Policy(candidates, model, self.settings, current=current)

    def hardware(self, cpu: bool) -> Hardware:
        from remp_sglang.sim.hardware import CPU_TINY, H100_SXM

        base = CPU_TINY if cpu else H100_SXM  # GPU: untested, see the README
        return replace(base, **(self.settings.hardware or {}))

    async def _sample(self, tm: Any) -> LoadSample | None:
        from remp_sglang.integration import routes
        from remp_sglang.integration.messages import RempLoadReqInput, RempLoadReqOutput

        replies = await asyncio.wait_for(
            routes._communicator(tm, RempLoadReqOutput)(RempLoadReqInput()),
            timeout=routes.TOPOLOGY_TIMEOUT_S)
        parts = [json.loads(r.stats_json) for r in replies if r.error is None]
        if not parts or routes._main_view.get("state") == "reshaping":
            return None
        t = time.monotonic() - self.t0

        def reqs(name: str) -> tuple[Req, ...]:
            return tuple(Req(p, o) for part in parts for p, o in part[name])

        total = {"longest_running": max(p["longest_running"] for p in parts)}
        total |= {k: sum(p[k] for p in parts) for k in (
            "running", "kv_used", "kv_capacity", "generated", "prompt_tokens",
            "cached_tokens", "evicted", "refused")}
        self._refuse_held_too_long(tm, parts)
        sample = LoadSample(t, routes._current(), arrived=reqs("arrived"),
                            waiting=reqs("waiting"), held=reqs("held"),
                            held_wait_s=max(p["held_wait_s"] for p in parts), **total)
        self.series.append({"t": round(t, 3), "layout": list(sample.layout),
                            "waiting": len(sample.waiting) + len(sample.held),
                            "running": sample.running, "kv_used": sample.kv_used,
                            "kv_capacity": sample.kv_capacity, "generated": sample.generated,
                            "arrived": len(sample.arrived)})
        return sample

    def _refuse_held_too_long(self, tm: Any, parts: list[dict]) -> None:
        """A held request no reshape has served within `hold_timeout_s` is refused with
        the reason (SGLang's abort, so every rank drops it at the same point)."""
        from sglang.srt.managers.io_struct import AbortReq

        limit = self.settings.hold_timeout_s
        for part in parts:
            for rid, wait in part.get("held_rids", []):
                if wait > limit and rid not in self._refused:
                    self._refused.add(rid)
                    message = (f"the prompt is longer than this layout (dp={part['layout'][0]}"
                               f" tp={part['layout'][1]} pp={part['layout'][2]}) admits "
                               f"({part['max_input']} tokens) and no reshape to a wider one "
                               f"came within {limit:.0f}s")
                    logger.warning("remp policy: refusing held request %s: %s", rid, message)
                    tm._dispatch_to_scheduler(AbortReq(rid=rid, abort_message=message))

    async def _act(self, tm: Any, decision: Decision) -> None:
        from remp_sglang.integration.routes import run_reshape

        dp, tp, pp = decision.target
        logger.info("remp policy: reshaping to dp=%d tp=%d pp=%d: %s", dp, tp, pp,
                    decision.reason)
        status, payload = await run_reshape(tm, {"dp": dp, "tp": tp, "pp": pp})
        error = None if status == 200 else f"{status}: {payload.get('error')}"
        if error:
            logger.warning("remp policy: reshape to %s failed: %s", decision.target, error)
        self.policy.switched(decision, payload.get("downtime_s") if error is None else None,
                             error)
        self._planned_at = float("-inf")  # the new layout's switches, at the next turn
        if self.series:
            self.series[-1]["reshape"] = {"to": list(decision.target), "error": error,
                                          "downtime_s": payload.get("downtime_s")}

    def _log(self, decision: Decision) -> None:
        reason = decision.reason.split(" ")[0] if not decision.switch else decision.reason
        level = logging.INFO if reason != self._last_reason else logging.DEBUG
        self._last_reason = reason
        logger.log(level, "remp policy: %s -> %s%s: %s | %s", decision.current,
                   decision.target, " (switch)" if decision.switch else "", decision.reason,
                   json.dumps({"demand": decision.demand, "predicted": decision.predicted}))

    def set_paused(self, paused: bool) -> None:
        """Pause or resume; a resumed policy starts a fresh window (what it saw before
        the pause says little about now) and keeps what it measured of switches."""
        self.paused = paused
        if self.policy is not None:
            self.policy.paused = paused
            if not paused:
                self.policy.samples.clear()
                self.policy.streak = ((0, 0, 0), 0)

    def to_json(self, series: bool = False) -> dict:
        data: dict[str, Any] = {"policy": "auto", "paused": self.paused, "error": self.error,
                                "settings": asdict(self.settings)}
        if self.policy is not None:
            data.update(self.policy.to_json())
        else:
            data["state"] = "starting"
        if series:
            data["series"] = list(self.series)
        return data


_loop: PolicyLoop | None = None


def loop_for(config: RempConfig) -> PolicyLoop | None:
    """The launcher's policy loop (None under the manual policy), made on first use."""
    global _loop
    if config.policy != "auto":
        return None
    if _loop is None:
        _loop = PolicyLoop(config)
    return _loop

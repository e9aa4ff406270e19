"""The event loop: N devices serving a trace at a (dp, tp, pp) layout, fixed or `auto`.

Deterministic and event-driven: the clock jumps to the next arrival, policy tick, end
of a replica's iteration, or end of a pause. Arrivals go to the least loaded replica
(queued + running requests; the lowest index on ties). A prompt no layout in reach can
hold is refused at once: for a fixed run that is its own layout (a plain server), for
`auto` every candidate; `auto` holds a prompt another candidate can hold, and refuses it
after `hold_timeout_s` held (the server's `load_stats` rules, checked every tick).

`auto` runs the very `remp_sglang.policy.Policy` the server runs, with the same
`StepModel` the replicas advance by: every `interval_s` of simulated time it observes a
`LoadSample` built from the replicas' state and counters, then decides. On a switch the
replicas finish the iteration in flight, then ALL pause for the predicted downtime
(`switch.predict` bytes over the link plus `SwitchCost.fixed_s`); queues, running
requests (with their progress: the server moves their KV) and prefix caches go to the
new replicas as the server places them (a merge concatenates, a split deals requests
out and copies the cache); a running request the new replica cannot hold goes back to
the front of its queue and is prefilled again, and cached blocks beyond its free KV are
dropped (the KV moved is capped the same way). `policy.switched` gets the pause.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from remp_sglang.perf import Hardware, StepModel
from remp_sglang.policy import Candidate, Decision, LoadSample, Policy, PolicyConfig, Req
from remp_sglang.topology import replica_sources

from . import layouts, switch
from .metrics import Layout, RunResult, SwitchRecord
from .models import SimModel
from .replica import Counters, Job, Replica
from .switch import SwitchCost
from .traces import TraceRequest

INF = float("inf")


@dataclass(frozen=True)
class StepLog:
    """One replica iteration (kept when `Cluster.log_steps` is set, for tests)."""

    start: float
    end: float
    replica: int
    layout: Layout
    kind: str


class Cluster:
    """A simulated server of `world` devices of `hw` serving `model`, from layout `start`.

    `auto`: run the policy (`policy_config`; its `candidates` short-list the layouts);
    `cost`: a switch's pause (default: no fixed cost, the link's bandwidth);
    `block_tokens`: tokens one trace prefix block stands for (512 / the trace's
    token_div); `candidates`: override the memory rule's (`layouts.candidates`);
    `log_steps`: keep every iteration in `steps`; `hold_timeout_s`: the server's
    `LoadCounters.hold_timeout_s`. One `run` per Cluster; its result stays in `result`.
    """

    def __init__(self, model: SimModel, hw: Hardware, world: int, start: Layout,
                 auto: bool = False, policy_config: PolicyConfig | None = None,
                 cost: SwitchCost | None = None, block_tokens: int = 512,
                 candidates: Sequence[Candidate] | None = None,
                 log_steps: bool = False, hold_timeout_s: float = 60.0) -> None:
        self.model, self.hw = model, hw
        self.step_model = StepModel(model.decoder, hw)
        self.candidates = list(candidates or layouts.candidates(model, hw, world))
        allowed = policy_config.candidates if auto and policy_config else ()
        if allowed:  # the operator's short list (`PolicyConfig.candidates`)
            self.candidates = [c for c in self.candidates if c.layout in allowed]
        self.by_layout = {c.layout: c for c in self.candidates}
        if start not in self.by_layout:
            raise ValueError(f"layout {start} is not a candidate: {sorted(self.by_layout)}")
        self.cost = cost or SwitchCost(0.0, hw.link_bw)
        self.block_tokens = block_tokens
        self.hold_timeout_s = hold_timeout_s
        self.policy = Policy(self.candidates, self.step_model,
                             policy_config or PolicyConfig(), current=start) if auto else None
        held = self.candidates if auto else [self.by_layout[start]]
        self.refuse_at = max(c.max_input for c in held)
        self.replicas = self._build(self.by_layout[start])
        self.paused_until = 0.0
        self.pending: Decision | None = None
        self.steps: list[StepLog] | None = [] if log_steps else None
        self.result = RunResult("", start, 0.0)  # run() replaces it: one run per Cluster
        self._arrived: list[Job] = []
        self._refused = 0
        self._interval = Counters()

    @property
    def layout(self) -> Layout:
        return self.replicas[0].spec.layout

    def _build(self, spec: Candidate) -> list[Replica]:
        return [Replica(spec, self.step_model, self.block_tokens) for _ in range(spec.topo.dp)]

    # -- the loop ---------------------------------------------------------------------
    def run(self, trace: Sequence[TraceRequest], duration_s: float,
            name: str = "") -> RunResult:
        """Serve the requests of `trace` arriving before `duration_s`; stop there."""
        jobs = [Job(i, r.t, r.prompt, max(1, r.output), r.blocks)
                for i, r in enumerate(sorted(trace, key=lambda r: r.t)) if r.t < duration_s]
        self.result = res = RunResult(name or ("auto" if self.policy else str(self.layout)),
                                      self.layout, duration_s)
        interval = self.policy.config.interval_s if self.policy else INF
        tick, i, t = (0.0 if self.policy else INF), 0, 0.0
        while True:
            for rep in self.replicas:
                if rep.step is not None and rep.busy_until <= t:
                    for job in rep.finish():
                        res.record(job)
            while i < len(jobs) and jobs[i].arrival <= t:
                self._dispatch(jobs[i], t)
                i += 1
            if tick <= t:
                self._tick(t)
                tick += interval
            if self.pending is not None and all(r.step is None for r in self.replicas):
                self._switch(t, duration_s)
            if t >= duration_s:
                break
            arrival = jobs[i].arrival if i < len(jobs) else INF
            horizon = min(arrival, tick, duration_s)
            if self.pending is None and t >= self.paused_until:
                for n, rep in enumerate(self.replicas):
                    if rep.step is None and rep.start(t, horizon) and self.steps is not None:
                        self.steps.append(StepLog(t, rep.busy_until, n, self.layout,
                                                  rep.step[0]))
            busy = [r.busy_until for r in self.replicas if r.step is not None]
            t = min([horizon, *busy] + ([self.paused_until] if self.paused_until > t else []))
        self._harvest()
        res.arrived = len(jobs)
        res.in_system = sum(r.load for r in self.replicas)
        return res

    def _dispatch(self, job: Job, t: float) -> None:
        self._arrived.append(job)  # counted before the length check, as the server does
        if job.prompt >= self.refuse_at:
            self._refuse()
            return
        rep = min(self.replicas, key=lambda r: r.load)
        rep.queue.append(job)
        if not rep.holds(job):
            job.held_since = t

    def _refuse(self) -> None:
        self._refused += 1
        self.result.refused += 1

    def _expire_held(self, t: float) -> None:
        """Refuse the requests held longer than `hold_timeout_s`."""
        for rep in self.replicas:
            late = [j for j in rep.queue if j.held_since is not None
                    and t - j.held_since > self.hold_timeout_s]
            for job in late:
                rep.queue.remove(job)
                self._refuse()

    def _harvest(self) -> None:
        """Move the replicas' counters into the interval's and the run's totals."""
        for rep in self.replicas:
            c = rep.counters
            for acc in (self._interval, self.result):
                acc.generated += c.generated
                acc.prompt_tokens += c.prompt_tokens
                acc.cached_tokens += c.cached_tokens
            self._interval.evicted += c.evicted
            rep.counters = Counters()

    # -- the policy -------------------------------------------------------------------
    def sample(self, t: float) -> LoadSample:
        """The replicas' statistics now, counters since the previous sample (resets them)."""
        self._harvest()
        queued = [(rep, j) for rep in self.replicas for j in rep.queue]
        held = [j for rep, j in queued if not rep.holds(j)]
        c, self._interval = self._interval, Counters()
        arrived, self._arrived = self._arrived, []
        refused, self._refused = self._refused, 0
        return LoadSample(
            t=t, layout=self.layout,
            arrived=tuple(Req(j.prompt, j.output) for j in arrived),
            waiting=tuple(Req(j.prompt, j.output) for rep, j in queued if rep.holds(j)),
            held=tuple(Req(j.prompt, j.output) for j in held),
            held_wait_s=max((t - j.held_since for j in held if j.held_since is not None),
                            default=0.0),
            running=sum(len(r.running) for r in self.replicas),
            longest_running=max((j.prompt for r in self.replicas for j in r.running),
                                default=0),
            kv_used=sum(j.context for r in self.replicas for j in r.running),
            kv_capacity=sum(r.spec.capacity for r in self.replicas),
            generated=c.generated, prompt_tokens=c.prompt_tokens,
            cached_tokens=c.cached_tokens, evicted=c.evicted, refused=refused)

    def _tick(self, t: float) -> None:
        if self.policy is None or self.pending is not None or t < self.paused_until:
            return  # a paused server reports nothing; its counters carry on
        self._expire_held(t)
        self.policy.observe(self.sample(t))
        decision = self.policy.decide()
        if decision.switch:
            self.pending = decision

    # -- a switch ---------------------------------------------------------------------
    def _switch(self, t: float, end: float) -> None:
        decision, self.pending = self.pending, None
        assert decision is not None and self.policy is not None
        old, new = self.replicas[0].spec, self.by_layout[decision.target]
        live = [r.live_tokens for r in self.replicas]
        moved = switch.predict(old.topo, new.topo, self.model.decoder, live, new.capacity)
        downtime = self.cost.downtime(moved.max_rank_bytes)
        self._harvest()
        self.replicas, retracted = self._place(new, t)
        self.paused_until = t + downtime
        self.policy.switched(decision, downtime)
        self.result.switches.append(SwitchRecord(
            t, old.layout, new.layout, downtime, moved.kv_bytes, moved.weight_bytes,
            moved.max_rank_bytes, sum(live), retracted, decision.reason))
        self.result.paused_s += max(0.0, min(downtime, end - t))

    def _place(self, spec: Candidate, t: float) -> tuple[list[Replica], int]:
        """The new replicas' queues, running requests and caches (see the module doc)."""
        old = self.replicas
        new = self._build(spec)
        feeds = replica_sources(old[0].spec.topo, spec.topo)
        if len(new) > len(old):  # split: deal each source's requests, copy its cache
            for a, src in enumerate(old):
                targets = [new[b] for b, f in enumerate(feeds) if f == [a]]
                for n, job in enumerate(src.running):
                    targets[n % len(targets)].running.append(job)
                for n, job in enumerate(src.queue, start=len(src.running)):
                    targets[n % len(targets)].queue.append(job)
                for rep in targets:
                    rep.cache.update(src.cache)
        else:  # merge (or the same count): concatenate, sources in order
            for b, srcs in enumerate(feeds):
                for a in srcs:
                    new[b].running.extend(old[a].running)
                    new[b].queue.extend(old[a].queue)
                    new[b].cache.update(old[a].cache)
        retracted = 0
        for rep in new:
            back: list[Job] = []
            while rep.running and (rep.reserved > spec.capacity or
                                   any(not rep.holds(j) for j in rep.running)):
                worst = max(rep.running, key=lambda j: (not rep.holds(j), j.arrival))
                rep.running.remove(worst)
                back.append(worst)
            rep.queue = deque(sorted(back, key=lambda j: j.arrival) + list(rep.queue))
            retracted += len(back)
            for job in rep.queue:  # held from now, or no longer
                if rep.holds(job):
                    job.held_since = None
                elif job.held_since is None:
                    job.held_since = t
            rep.trim_cache()
            rep.counters = Counters()  # evictions of a switch are not the new layout's
        return new, retracted

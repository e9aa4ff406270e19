"""The automatic policy: which (dp, tp, pp) layout to serve with, from the load the
schedulers report.

Pure (no torch, no sglang): the server (`integration/policy_loop.py`) and the simulator
(`remp_sglang/sim/`) feed it `LoadSample`s and act on its `Decision`s, so both run the
same code. The rule:

- Demand over the last `window_s`: arrival rate, the prompt and output lengths of the
  requests that arrived (or, when none did, of those queued), the queue, the prefix hit
  rate. A prompt no candidate can hold is left out (it is refused anyway) and counted.
- Each candidate's goodput (output tokens/s it would complete): requests its replicas
  cannot hold produce nothing; the rest are served up to the layout's service rate,
  `dp / mean(prefill occupancy + output x decode period / batch)`, the batch being what
  its KV capacity holds of the mean request (`perf.StepModel`). Offered: the arrival
  rate plus `queued / horizon_s`, or, when more is in flight, what the requests in
  flight would complete there (Little's law: clients that wait for each answer send
  the next sooner on a faster layout).
- Only a layout that holds every request running or queued, and whose replicas hold
  the KV the running requests pin (a split deals them out: their share each), may be
  switched to for gain (one that cannot would be refused or forced back at once: as
  Amoeba, split only once the long requests are served).
- Switch when the best candidate's gain over `horizon_s` exceeds what the pause costs
  (`downtime x goodput now`, plus re-prefilling KV the target cannot keep) and beats the
  current layout by `min_gain`, in `confirm` decisions in a row, and at least
  `min_dwell_s` after the end of the last switch (hysteresis: it never flaps faster
  than that).
- A split is reversed by the next request its replicas cannot hold (the held-request
  rule below merges again). Prompt lengths that arrived over the last `horizon_s` say
  when that comes: the expected stay is the larger of their mean interval and the time
  since the last one (a burst that has ended). A split whose stay is shorter than
  `min_dwell_s`, or whose gain over that stay does not pay for the pause there and
  back, is not made: long prompts that keep arriving among short ones would otherwise
  make the layout flap at the dwell's pace.
- A request held because the current layout cannot hold it forces the best layout that
  serves it once it has waited `max_hold_s`, or at once when no other request is
  waiting.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from .perf import StepModel
from .topology import Topology

Layout = tuple[int, int, int]  # (dp, tp, pp)


@dataclass(frozen=True)
class Req:
    """A request as the policy sees it: its prompt and output lengths in tokens."""

    prompt: int
    output: int


@dataclass(frozen=True)
class Candidate:
    """A layout the policy may choose, with what each of its replicas holds."""

    topo: Topology
    capacity: int  # KV slots per replica
    max_input: int  # longest prompt a replica admits
    max_running: int = 256  # requests a replica decodes at once

    @property
    def layout(self) -> Layout:
        return (self.topo.dp, self.topo.tp, self.topo.pp)


@dataclass(frozen=True)
class LoadSample:
    """The schedulers' statistics at time `t`, summed over the replicas. Counters are
    since the previous sample."""

    t: float
    layout: Layout
    arrived: tuple[Req, ...] = ()
    waiting: tuple[Req, ...] = ()  # queued, admissible on this layout
    held: tuple[Req, ...] = ()  # queued, longer than a replica of this layout holds
    held_wait_s: float = 0.0  # the longest a held request has waited
    running: int = 0
    longest_running: int = 0  # the longest prompt among the running requests
    kv_used: int = 0
    kv_capacity: int = 0  # all replicas
    generated: int = 0  # output tokens
    prompt_tokens: int = 0  # prompt tokens of requests admitted
    cached_tokens: int = 0  # of which served from the prefix cache
    evicted: int = 0  # cached tokens evicted
    refused: int = 0  # requests refused for length (longer than any layout holds)


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs (`--remp-policy-config`): all seconds are wall time."""

    interval_s: float = 1.0  # sample and decide this often
    window_s: float = 8.0  # demand is estimated over this much history
    horizon_s: float = 30.0  # a switch's gain is counted over this long
    min_dwell_s: float = 10.0  # no switch sooner than this after the last
    min_gain: float = 0.2  # the best layout must beat the current one by this fraction
    confirm: int = 2  # decisions in a row that must pick the same layout
    max_hold_s: float = 3.0  # a held request forces a layout that serves it after this
    default_downtime_s: float = 1.0  # a switch's cost before one has been measured
    hold_timeout_s: float = 60.0  # a held request no reshape serves is refused after this
    candidates: tuple[Layout, ...] = ()  # () = every layout that uses all the ranks
    hardware: dict | None = None  # overrides of the step-time model's `perf.Hardware`

    def __post_init__(self) -> None:
        for name in ("interval_s", "window_s", "horizon_s", "default_downtime_s",
                     "hold_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"policy {name} must be > 0, got {getattr(self, name)}")
        for name in ("min_dwell_s", "min_gain", "max_hold_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"policy {name} must be >= 0, got {getattr(self, name)}")
        if self.confirm < 1:
            raise ValueError(f"policy confirm must be >= 1, got {self.confirm}")
        for c in self.candidates:
            if len(c) != 3 or min(c) < 1:
                raise ValueError(f"policy candidates are [dp, tp, pp] triples, got {list(c)}")
        if self.hardware is not None and not isinstance(self.hardware, dict):
            raise ValueError("policy hardware must be an object of perf.Hardware fields")

    @classmethod
    def from_dict(cls, data: dict) -> PolicyConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown policy settings {unknown}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        data = dict(data)
        if "candidates" in data:
            data["candidates"] = tuple(tuple(int(x) for x in c) for c in data["candidates"])
        return cls(**data)


@dataclass(frozen=True)
class Demand:
    """What the window says the clients ask for."""

    rate: float  # requests/s that some candidate can hold
    requests: tuple[Req, ...]  # their lengths (a sample)
    queued: tuple[Req, ...]  # waiting and held now
    hit_rate: float  # share of prompt tokens served from the prefix cache
    unservable: int  # requests in the window no candidate can hold
    goodput: float  # output tokens/s measured over the window
    in_flight: int = 0  # requests running or queued now (that some candidate holds)
    kv_used: int = 0  # KV slots live now, all replicas
    longest_now: int = 0  # the longest prompt running or queued now

    def to_json(self) -> dict:
        n = len(self.requests)
        return {"rate_req_s": round(self.rate, 3), "requests": n,
                "mean_prompt": round(sum(r.prompt for r in self.requests) / n, 1) if n else 0,
                "mean_output": round(sum(r.output for r in self.requests) / n, 1) if n else 0,
                "queued": len(self.queued), "in_flight": self.in_flight,
                "hit_rate": round(self.hit_rate, 3),
                "unservable": self.unservable, "goodput_tok_s": round(self.goodput, 2)}


@dataclass(frozen=True)
class Decision:
    """One evaluation: the layout chosen (`switch` True when it differs and may be
    acted on), why, and the numbers it came from."""

    t: float
    current: Layout
    target: Layout
    switch: bool
    reason: str
    demand: dict
    predicted: dict[str, float]  # goodput (tokens/s) per candidate, "dp,tp,pp" keys
    saturation: dict[str, float] = field(default_factory=dict)  # the most it could serve
    downtime_s: float = 0.0
    gain_tokens: float = 0.0
    cost_tokens: float = 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["current"], data["target"] = list(self.current), list(self.target)
        return data


def key(layout: Layout) -> str:
    return ",".join(str(x) for x in layout)


def estimate_demand(samples: Sequence[LoadSample], max_input: int) -> Demand:
    """Demand over `samples` (oldest first), leaving out prompts longer than `max_input`
    (the most any candidate holds)."""
    if not samples:
        return Demand(0.0, (), (), 0.0, 0, 0.0)
    last = samples[-1]
    span = max(last.t - samples[0].t, 1e-9) if len(samples) > 1 else 1.0
    window = samples[1:] if len(samples) > 1 else samples
    arrived = [r for s in window for r in s.arrived]
    fits = [r for r in arrived if r.prompt < max_input]
    queued = tuple(r for r in last.waiting + last.held if r.prompt < max_input)
    prompt = sum(s.prompt_tokens for s in window)
    return Demand(
        rate=len(fits) / span,
        requests=tuple(fits) or queued,
        queued=queued,
        hit_rate=sum(s.cached_tokens for s in window) / prompt if prompt else 0.0,
        unservable=len(arrived) - len(fits),  # refused ones arrived too
        goodput=measured_goodput(samples),
        in_flight=last.running + len(queued),
        kv_used=last.kv_used,
        longest_now=max([last.longest_running] + [r.prompt for r in queued]),
    )


def measured_goodput(samples: Sequence[LoadSample]) -> float:
    """Output tokens/s the server completed over `samples` (oldest first)."""
    samples = list(samples)
    if len(samples) < 2:
        return 0.0
    span = max(samples[-1].t - samples[0].t, 1e-9)
    return sum(s.generated for s in samples[1:]) / span


def goodput(c: Candidate, demand: Demand, model: StepModel,
            horizon_s: float) -> tuple[float, float]:
    """(output tokens/s `c` would complete for `demand`, the most it could at saturation);
    see the module's docstring."""
    served = [r for r in demand.requests if r.prompt < c.max_input]
    if not served:
        return 0.0, 0.0
    share = len(served) / len(demand.requests)
    queued = sum(1 for r in demand.queued if r.prompt < c.max_input)
    offered = demand.rate * share + queued / horizon_s  # requests/s
    mean_out = sum(r.output for r in served) / len(served)
    footprint = sum(r.prompt + r.output for r in served) / len(served)
    batch = max(1, min(c.max_running, int(c.capacity // max(footprint, 1))))
    context = batch * sum(r.prompt + r.output / 2 for r in served) / len(served)
    period = model.decode_period(c.topo, batch, context)

    def prefill(r: Req, how: Callable) -> float:
        return how(c.topo, max(1, round(r.prompt * (1 - demand.hit_rate))),
                   round(r.prompt * demand.hit_rate))

    work = sum(prefill(r, model.prefill_time) + r.output * period / batch
               for r in served) / len(served)
    service = c.topo.dp / work  # requests/s at saturation
    # Little's law for the requests in flight, spread over the replicas
    per_replica = min(batch, math.ceil(demand.in_flight * share / c.topo.dp))
    if per_replica:
        ctx = per_replica * context / batch
        latency = sum(prefill(r, model.prefill_latency) for r in served) / len(served) + \
            mean_out * model.decode_period(c.topo, per_replica, ctx)
        offered = max(offered, c.topo.dp * per_replica / latency)
    return min(offered, service) * mean_out, service * mean_out


def expected_stay(history: Sequence[tuple[float, int]], t: float, max_input: int,
                  widest: int, horizon_s: float) -> tuple[float, int]:
    """(How long a layout admitting prompts shorter than `max_input` would likely serve
    before a prompt it cannot hold arrives, how many such arrived), from `history`:
    (arrival time, prompt length) over the last `horizon_s`, oldest first. Prompts no
    layout holds (`widest`) are refused anyway and do not count."""
    times = [a for a, prompt in history if max_input <= prompt < widest]
    if not times:
        return horizon_s, 0
    span = min(horizon_s, max(t - history[0][0], 1e-9))
    return min(horizon_s, max(span / len(times), t - times[-1])), len(times)


def decide(samples: Sequence[LoadSample], current: Layout, candidates: Sequence[Candidate],
           model: StepModel, downtime: Callable[[Layout, Layout], float],
           config: PolicyConfig, since_switch_s: float,
           streak: tuple[Layout, int],
           history: Sequence[tuple[float, int]] = ()) -> Decision:
    """The pure decision. `since_switch_s`: time since the last switch (or failed
    attempt); `streak`: (layout, times in a row it was the best so far);
    `downtime(old, new)`: the predicted pause of a switch; `history`: (arrival time,
    prompt length) of the requests that arrived over the last `horizon_s`."""
    t = samples[-1].t if samples else 0.0
    by_layout = {c.layout: c for c in candidates}
    widest = max(c.max_input for c in candidates)
    demand = estimate_demand(samples, widest)
    rates = {c.layout: goodput(c, demand, model, config.horizon_s) for c in candidates}
    predicted = {k: v[0] for k, v in rates.items()}
    info = {"demand": demand.to_json(),
            "predicted": {key(k): round(v, 2) for k, v in predicted.items()},
            "saturation": {key(k): round(v[1], 2) for k, v in rates.items()}}

    def stay(reason: str) -> Decision:
        return Decision(t, current, current, False, reason, **info)

    if not demand.requests:
        return stay("no demand" + (f" ({demand.unservable} requests longer than any "
                                   "layout holds: refused)" if demand.unservable else ""))
    now = predicted.get(current, 0.0)
    held = samples[-1].held if samples else ()
    cur = by_layout.get(current)
    # A held request waits up to max_hold_s while others queue (the replicas keep
    # serving them); with nobody else waiting there is nothing to wait for.
    waited = samples[-1].held_wait_s >= config.max_hold_s or not samples[-1].waiting
    if held and cur is not None and waited and \
            since_switch_s >= config.max_hold_s:  # (a failed attempt is retried as late)
        longest = max(r.prompt for r in held)
        serving = [c for c in candidates if c.max_input > longest]
        if serving and longest >= cur.max_input:
            best = max(serving, key=lambda c: rates[c.layout])
            d = downtime(current, best.layout)
            return Decision(t, current, best.layout, True,
                            f"{len(held)} held request(s) (longest prompt {longest}) waited "
                            f"{samples[-1].held_wait_s:.1f}s"
                            f"{'' if samples[-1].waiting else ', nothing else queued'}; "
                            f"{key(best.layout)} holds them",
                            downtime_s=d, **info)
    longest = demand.longest_now
    # a replica of the target must hold the longest request, and its replicas the KV the
    # running requests pin (a split deals them out, a merge joins them)
    eligible = {c.layout for c in candidates
                if c.max_input > longest and demand.kv_used < c.capacity * c.topo.dp} | \
        {current}
    # ties: stay; else the one with more headroom (lower latency)
    best_layout = max(eligible, key=lambda k: (predicted.get(k, 0.0), k == current,
                                               rates[k][1] if k in rates else 0.0))
    if best_layout == current:
        left_out = "" if len(eligible) == len(candidates) else \
            f"; layouts that cannot hold a {longest}-token prompt or {demand.kv_used} " \
            "pinned KV slots left out"
        return stay(f"current layout is the best ({now:.1f} tok/s){left_out}")
    best = predicted[best_layout]
    target = by_layout[best_layout]
    d = downtime(current, best_layout)
    stay, longer = expected_stay(history, t, target.max_input, widest, config.horizon_s) \
        if cur is None or target.max_input < cur.max_input else (config.horizon_s, 0)
    if longer:  # the next prompt it cannot hold forces the way back: pay for both
        d += downtime(best_layout, current)
    gain = (best - now) * stay
    # the pause, and re-prefilling the live KV the target cannot keep
    lost = max(0, demand.kv_used - target.capacity * target.topo.dp)
    refill = model.prefill_time(target.topo, lost) / target.topo.dp if lost else 0.0
    cost = (d + refill) * max(now, demand.goodput)
    numbers = dict(downtime_s=d, gain_tokens=round(gain, 1), cost_tokens=round(cost, 1))
    if longer and stay < config.min_dwell_s:
        return Decision(t, current, current, False,
                        f"{key(best_layout)} would be left within {stay:.1f}s: {longer} "
                        f"prompts its replicas cannot hold arrived in the last "
                        f"{config.horizon_s:.0f}s", **numbers, **info)
    if best < now * (1 + config.min_gain):
        return Decision(t, current, current, False,
                        f"{key(best_layout)} predicts {best:.1f} tok/s, within "
                        f"{config.min_gain:.0%} of {now:.1f}", **numbers, **info)
    if gain <= cost:
        return Decision(t, current, current, False,
                        f"gain {gain:.0f} tokens over {stay:.0f}s does not pay the "
                        f"pause{'s there and back' if longer else ''}: {cost:.0f}",
                        **numbers, **info)
    count = streak[1] + 1 if streak[0] == best_layout else 1
    if count < config.confirm:
        return Decision(t, current, best_layout, False,
                        f"{key(best_layout)} best ({best:.1f} vs {now:.1f} tok/s), "
                        f"confirming {count}/{config.confirm}", **numbers, **info)
    if since_switch_s < config.min_dwell_s:
        return Decision(t, current, best_layout, False,
                        f"{key(best_layout)} best, but the last switch was less than "
                        f"{config.min_dwell_s:.0f}s ago", **numbers, **info)
    return Decision(t, current, best_layout, True,
                    f"{key(best_layout)} predicts {best:.1f} vs {now:.1f} tok/s: gain "
                    f"{gain:.0f} tokens over {stay:.0f}s > pause cost "
                    f"{cost:.0f}", **numbers, **info)


@dataclass
class Switch:
    """A switch the policy ordered: predicted and observed goodput either side."""

    t: float
    old: Layout
    new: Layout
    predicted_before: float
    predicted_after: float
    observed_before: float
    observed_after: float | None = None
    downtime_s: float | None = None  # measured
    error: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        data["old"], data["new"] = list(self.old), list(self.new)
        return data


@dataclass
class Policy:
    """The policy's state between decisions: the sample window, the streak, the dwell
    clock, and the record of decisions and switches."""

    candidates: list[Candidate]
    model: StepModel
    config: PolicyConfig = field(default_factory=PolicyConfig)
    current: Layout = (1, 1, 1)
    paused: bool = False
    samples: deque = field(default_factory=lambda: deque(maxlen=4096))
    # (arrival time, prompt length) over the last horizon_s, kept across switches
    history: deque = field(default_factory=lambda: deque(maxlen=1 << 16))
    decisions: deque = field(default_factory=lambda: deque(maxlen=50))
    switches: list[Switch] = field(default_factory=list)
    last_switch_t: float = float("-inf")
    streak: tuple[Layout, int] = ((0, 0, 0), 0)
    measured: dict[tuple[Layout, Layout], float] = field(default_factory=dict)
    # the server's own prediction (the planner's bytes for the live KV over the measured
    # bandwidth, plus the measured fixed cost: `/remp/plan`), refreshed by the caller
    planned: dict[tuple[Layout, Layout], float] = field(default_factory=dict)

    def observe(self, sample: LoadSample) -> None:
        self.samples.append(sample)
        self.current = sample.layout
        while self.samples and self.samples[0].t < sample.t - self.config.window_s:
            self.samples.popleft()
        self.history.extend((sample.t, r.prompt) for r in sample.arrived)
        while self.history and self.history[0][0] < sample.t - self.config.horizon_s:
            self.history.popleft()
        for s in self.switches:  # fill what was observed a window after each switch
            if s.observed_after is None and s.error is None and \
                    sample.t - s.t >= self.config.window_s:
                s.observed_after = round(measured_goodput(self.samples), 2)

    def downtime(self, old: Layout, new: Layout) -> float:
        """The pause of a switch: the server's prediction for it, else the last one
        measured between these layouts, else the mean of all measured, else the
        configured guess."""
        if (old, new) in self.planned:
            return self.planned[(old, new)]
        if (old, new) in self.measured:
            return self.measured[(old, new)]
        if self.measured:
            return sum(self.measured.values()) / len(self.measured)
        return self.config.default_downtime_s

    def decide(self) -> Decision:
        """Evaluate the window; a paused policy decides nothing."""
        t = self.samples[-1].t if self.samples else 0.0
        if self.paused:
            decision = Decision(t, self.current, self.current, False, "paused", {}, {})
        else:
            decision = decide(list(self.samples), self.current, self.candidates, self.model,
                              self.downtime, self.config,
                              since_switch_s=t - self.last_switch_t, streak=self.streak,
                              history=self.history)
        self.streak = (decision.target, self.streak[1] + 1
                       if decision.target == self.streak[0] else 1)
        self.decisions.append(decision)
        return decision

    def switched(self, decision: Decision, downtime_s: float | None,
                 error: str | None = None) -> None:
        """Record the outcome of acting on `decision` (measured pause, or the error)."""
        pred = decision.predicted
        self.switches.append(Switch(
            decision.t, decision.current, decision.target,
            pred.get(key(decision.current), 0.0), pred.get(key(decision.target), 0.0),
            round(measured_goodput(self.samples), 2),
            downtime_s=downtime_s, error=error))
        self.last_switch_t = decision.t + (downtime_s or 0.0)  # dwell from the end
        self.streak = ((0, 0, 0), 0)
        if error is None:
            self.current = decision.target
            if downtime_s is not None:
                self.measured[(decision.current, decision.target)] = downtime_s
            self.samples.clear()  # the old layout's window says little about the new one

    def to_json(self) -> dict:
        return {"paused": self.paused, "current": list(self.current),
                "config": asdict(self.config),
                "candidates": [{"layout": list(c.layout), "kv_capacity_per_replica":
                                c.capacity, "max_input": c.max_input}
                               for c in self.candidates],
                "hardware": asdict(self.model.hw),
                "predicted_downtime_s": {key(new): round(v, 4) for (old, new), v in
                                         self.planned.items() if old == self.current},
                "decisions": [d.to_json() for d in self.decisions],
                "switches": [s.to_json() for s in self.switches]}

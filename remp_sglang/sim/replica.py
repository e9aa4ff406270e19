"""One simulated replica: its queue, continuous batching and prefix cache.

The model of a scheduler step (SGLang's, simplified):
- Admission is FCFS over the queue. A request whose prompt the replica cannot hold
  (prompt >= max_input) is HELD: skipped, left in the queue for a layout that holds it.
  Others are admitted while the running requests' reserved KV (prompt + output each:
  no retraction, no new-token ratio) leaves room, up to `max_running` requests and
  `MAX_PREFILL_TOKENS` new tokens a batch (at least one request); the first that does
  not fit stops admission. A lone request longer than the pool is admitted with its
  output cut to what the pool holds (SGLang caps max_new_tokens the same way).
- A prefill batch runs alone (no chunking, no mixing with decode) and occupies the
  replica for the sum of `StepModel.prefill_time` of its requests (a stage's
  occupancy: with pp > 1 the next batch enters the first stage meanwhile); each
  request's first token comes out at the batch's end plus pp - 1 more stages of its
  own prefill (so TTFT counts the whole pipeline's latency).
- Otherwise every running request gains one token per `StepModel.decode_period`,
  several periods at once between events (the batch does not change in between; the
  period is taken at the midpoint context).
- Prefix cache: an LRU of Mooncake block hashes in the KV the running requests leave
  free. A prompt's leading run of cached blocks is not prefilled (at least one token
  is); its blocks are inserted after its prefill; the oldest are evicted to make room.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from remp_sglang.perf import StepModel
from remp_sglang.policy import Candidate

MAX_PREFILL_TOKENS = 16384  # SGLang's default --max-prefill-tokens


@dataclass
class Job:
    """A request in flight: what it asks for and when things happened to it."""

    id: int
    arrival: float
    prompt: int
    output: int
    blocks: tuple[int, ...] = ()
    generated: int = 0
    prefill_s: float = 0.0  # its last prefill's occupancy of the replica
    held_since: float | None = None  # queued where its replica cannot hold it, since
    first_token: float | None = None
    finished: float | None = None

    @property
    def context(self) -> int:
        return self.prompt + self.generated

    @property
    def footprint(self) -> int:
        """KV slots reserved for it while it runs."""
        return self.prompt + self.output


@dataclass
class Counters:
    """What a replica did since the last load sample."""

    generated: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evicted: int = 0


@dataclass
class Replica:
    """One replica of a layout: (tp, pp) devices, a pool of `spec.capacity` KV slots."""

    spec: Candidate
    model: StepModel
    block_tokens: int = 512
    queue: deque[Job] = field(default_factory=deque)
    running: list[Job] = field(default_factory=list)
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    busy_until: float = 0.0
    step: tuple[str, list[Job], int] | None = None  # the iteration in flight
    counters: Counters = field(default_factory=Counters)

    @property
    def reserved(self) -> int:
        return sum(j.footprint for j in self.running)

    @property
    def live_tokens(self) -> int:
        """KV slots in use: running contexts and cached blocks."""
        used = sum(j.context for j in self.running) + len(self.cache) * self.block_tokens
        return min(self.spec.capacity, used)

    @property
    def load(self) -> int:
        return len(self.queue) + len(self.running)

    def holds(self, job: Job) -> bool:
        return job.prompt < self.spec.max_input

    def _cached(self, job: Job) -> int:
        hit = 0
        for h in job.blocks:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            hit += 1
        return min(hit * self.block_tokens, job.prompt - 1) if hit else 0

    def _insert(self, job: Job) -> None:
        for h in job.blocks:
            self.cache[h] = None
            self.cache.move_to_end(h)
        self.trim_cache()

    def trim_cache(self) -> None:
        room = max(0, self.spec.capacity - self.reserved) // self.block_tokens
        while len(self.cache) > room:
            self.cache.popitem(last=False)
            self.counters.evicted += self.block_tokens

    def _admit(self) -> list[Job]:
        batch: list[Job] = []
        reserved, tokens = self.reserved, 0
        for job in self.queue:
            if not self.holds(job):
                continue
            if len(self.running) + len(batch) >= self.spec.max_running:
                break
            if batch and tokens + job.context > MAX_PREFILL_TOKENS:
                break
            if reserved + job.footprint > self.spec.capacity:
                if self.running or batch:
                    break
                job.output = max(job.generated + 1, self.spec.capacity - job.prompt)
            batch.append(job)
            reserved += job.footprint
            tokens += job.context
        if batch:
            taken = {id(j) for j in batch}
            self.queue = deque(j for j in self.queue if id(j) not in taken)
        return batch

    def start(self, now: float, horizon: float) -> bool:
        """Begin the next iteration at `now` (decode steps bounded by `horizon`, the next
        event); False when there is nothing to do."""
        batch = self._admit()
        if batch:
            duration = 0.0
            for job in batch:
                cached = self._cached(job)
                self.counters.prompt_tokens += job.prompt
                self.counters.cached_tokens += cached
                job.prefill_s = self.model.prefill_time(self.spec.topo, job.context - cached,
                                                        cached)
                duration += job.prefill_s
            self.running.extend(batch)
            self.busy_until = now + duration
            self.step = ("prefill", batch, 0)
            return True
        if not self.running:
            return False
        batch, topo = self.running, self.spec.topo
        context = sum(j.context for j in batch)
        period = self.model.decode_period(topo, len(batch), context)
        left = min(j.output - j.generated for j in batch)
        k = max(1, min(left, int((horizon - now) / period) + 1)) if horizon > now else 1
        period = self.model.decode_period(topo, len(batch), context + len(batch) * (k - 1) / 2)
        self.busy_until = now + k * period
        self.step = ("decode", list(batch), k)
        return True

    def finish(self) -> list[Job]:
        """Apply the iteration in flight at its end (`busy_until`); the requests done."""
        assert self.step is not None
        kind, batch, k = self.step
        now, self.step = self.busy_until, None
        if kind == "prefill":
            for job in batch:
                if job.first_token is None:
                    job.first_token = now + (self.spec.topo.pp - 1) * job.prefill_s
                    job.generated = 1
                    self.counters.generated += 1
                self._insert(job)
        else:
            for job in batch:
                job.generated += k
            self.counters.generated += k * len(batch)
        done = [j for j in self.running if j.generated >= j.output]
        for job in done:
            job.finished = now
        self.running = [j for j in self.running if j.generated < j.output]
        return done

"""Client traffic against a live server, for tests, benchmarks and the demo.

Each `Job` is one request through one of SGLang's APIs: `/generate` (token ids in and
out, streaming or not) or the OpenAI-compatible `/v1/completions` and
`/v1/chat/completions` through the `openai` client (streaming or not). Every call is
greedy with `ignore_eos`, so its output is a pure function of the prompt and the length:
an `Outcome` can be compared exactly with an undisturbed run's. Streaming outcomes keep
the arrival time of every chunk and how many tokens had arrived with it, so the largest
gap a client saw is known, and so is the largest gap between two consecutive tokens: a
chunk may carry several (SGLang's chat route sends no chunk while the detokenizer holds
a token's text back, and any route coalesces outputs the front end was too busy to
send one by one), and then the client never saw the tokens apart.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import requests

KINDS = ("generate", "generate_stream", "completions", "completions_stream", "chat",
         "chat_stream")


@dataclass(frozen=True)
class Job:
    kind: str
    prompt_ids: tuple[int, ...]  # /generate
    prompt_text: str  # the OpenAI routes
    max_tokens: int

    @property
    def streaming(self) -> bool:
        return self.kind.endswith("_stream")


@dataclass
class Outcome:
    job: Job
    output: list[int] | str | None = None  # token ids (/generate) or text (OpenAI)
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)  # tokens received so far, per chunk
    t_start: float = 0.0
    t_end: float = 0.0
    error: str | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (/generate)

    @property
    def max_gap(self) -> float:
        """Largest wait between two consecutive chunks (0 for a single answer)."""
        times = self.chunk_times
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def gap_during(self, start: float, end: float) -> float:
        """Largest chunk gap overlapping [start, end] (a reshape's window)."""
        return self.gap_window(start, end)[0]

    def gap_window(self, start: float, end: float) -> tuple[float, float]:
        """(largest chunk gap overlapping [start, end], when it began relative to start)."""
        times = self.chunk_times
        return max(((b - a, a - start) for a, b in zip(times, times[1:], strict=False)
                    if b >= start and a <= end), default=(0.0, 0.0))

    def token_gaps(self) -> list[tuple[float, float]]:
        """(arrival of a token, arrival of the next) for every chunk that brought exactly
        one token more than the chunk before it."""
        times, tokens = self.chunk_times, self.chunk_tokens
        return [(times[i - 1], times[i]) for i in range(1, min(len(times), len(tokens)))
                if tokens[i] - tokens[i - 1] == 1]

    def gap_around(self, start: float, end: float,
                   tokens: bool = False) -> tuple[float, float] | None:
        """The largest gap overlapping [start, end] (a pause, on the server's clock) as
        (its first chunk, its last chunk); None if the stream did not span it. A token made
        before the pause may arrive during it: the gap after it is the one that counts.
        `tokens`: only gaps between two consecutive tokens (`token_gaps`)."""
        times = self.chunk_times
        pairs = self.token_gaps() if tokens else zip(times, times[1:], strict=False)
        return max(((a, b) for a, b in pairs if a < end and b > start),
                   key=lambda g: g[1] - g[0], default=None)

    def straddles(self, start: float, end: float) -> bool:
        return self.t_start < start and self.t_end > end


def make_jobs(prompts: Sequence[Sequence[int]], texts: Sequence[str],
              lengths: Sequence[int], kinds: Sequence[str] = KINDS) -> list[Job]:
    """One job per prompt, cycling through kinds and lengths."""
    return [Job(kinds[i % len(kinds)], tuple(int(t) for t in prompts[i]),
                texts[i % len(texts)], lengths[i % len(lengths)]) for i in range(len(prompts))]


def _sampling(max_tokens: int) -> dict:
    return {"max_new_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}


def run_job(base_url: str, job: Job, model: str, timeout_s: float = 600.0,
            api_key: str | None = None) -> Outcome:
    out = Outcome(job, t_start=time.perf_counter())
    try:
        if job.kind.startswith("generate"):
            _generate(base_url, job, out, timeout_s, api_key)
        else:
            _openai(base_url, job, out, model, timeout_s, api_key)
    except Exception as error:  # a failed request is a result, not a crash of the client
        out.error = f"{type(error).__name__}: {error}"
    out.t_end = time.perf_counter()
    return out


def _generate(base_url: str, job: Job, out: Outcome, timeout_s: float,
              api_key: str | None) -> None:
    payload = {"input_ids": list(job.prompt_ids), "sampling_params": _sampling(job.max_tokens),
               "stream": job.streaming}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with requests.post(base_url + "/generate", json=payload, stream=job.streaming,
                       timeout=timeout_s, headers=headers) as response:
        response.raise_for_status()
        if not job.streaming:
            body = response.json()
            _raise_if_aborted(body)
            out.cached_tokens = (body.get("meta_info") or {}).get("cached_tokens")
            out.output = list(body["output_ids"])
            out.chunk_times.append(time.perf_counter())
            return
        tokens: list[int] = []
        for line in response.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            _raise_if_aborted(chunk)
            ids = list(chunk["output_ids"])
            if ids[:len(tokens)] != tokens:  # SGLang streams the ids so far
                raise RuntimeError("streamed tokens changed after they were sent")
            tokens = ids
            out.cached_tokens = (chunk.get("meta_info") or {}).get("cached_tokens")
            out.chunk_times.append(time.perf_counter())
            out.chunk_tokens.append(len(ids))
        out.output = tokens


def _raise_if_aborted(body: dict) -> None:
    """SGLang answers a request it refuses (too long, aborted) with 200 and an "abort"
    finish reason: for a client that is a failed request."""
    reason = (body.get("meta_info") or {}).get("finish_reason") or {}
    if isinstance(reason, dict) and reason.get("type") == "abort":
        raise RuntimeError(f"aborted: {reason.get('message')}")


def _openai(base_url: str, job: Job, out: Outcome, model: str, timeout_s: float,
            api_key: str | None) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key or "none",
                           timeout=timeout_s, max_retries=0)
    common = {"model": model, "max_tokens": job.max_tokens, "temperature": 0.0,
              "stream": job.streaming, "extra_body": {"ignore_eos": True}}
    if job.streaming:  # every chunk says how many tokens have been generated
        common["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    chat = job.kind.startswith("chat")
    if chat:
        reply = client.chat.completions.create(
            messages=[{"role": "user", "content": job.prompt_text}], **common)
    else:
        reply = client.completions.create(prompt=job.prompt_text, **common)
    if not job.streaming:
        out.output = reply.choices[0].message.content if chat else reply.choices[0].text
        out.chunk_times.append(time.perf_counter())
        return
    parts: list[str] = []
    for chunk in reply:
        # The chat route opens with a chunk that only names the role (no usage, no token);
        # the last chunk only reports usage (no choices).
        if not chunk.choices or chunk.usage is None:
            continue
        piece = chunk.choices[0].delta.content if chat else chunk.choices[0].text
        parts.append(piece or "")
        out.chunk_times.append(time.perf_counter())
        out.chunk_tokens.append(chunk.usage.completion_tokens)
    out.output = "".join(parts)


def _load_openai() -> None:
    """openai loads its resource modules lazily; a first use from several threads at once
    can deadlock on the import lock, so load them here, in one thread."""
    import openai

    client = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="none")
    _ = client.completions, client.chat.completions


def run_concurrently(base_url: str, jobs: Sequence[Job], model: str,
                     stagger_s: float = 0.0, api_key: str | None = None) -> list[Outcome]:
    """Every job in its own thread (started `stagger_s` apart); outcomes in job order."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    if any(not job.kind.startswith("generate") for job in jobs):
        _load_openai()

    def worker(i: int) -> None:
        outcomes[i] = run_job(base_url, jobs[i], model, api_key=api_key)

    threads = []
    for i in range(len(jobs)):
        threads.append(threading.Thread(target=worker, args=(i,), daemon=True))
        threads[-1].start()
        if stagger_s:
            time.sleep(stagger_s)
    for thread in threads:
        thread.join()
    return outcomes  # type: ignore[return-value]


class Background:
    """`run_concurrently` in a background thread: start traffic, reshape, then `wait()`."""

    def __init__(self, base_url: str, jobs: Sequence[Job], model: str,
                 stagger_s: float = 0.0, api_key: str | None = None) -> None:
        self.outcomes: list[Outcome] = []
        self._thread = threading.Thread(
            target=lambda: self.outcomes.extend(
                run_concurrently(base_url, jobs, model, stagger_s, api_key)),
            daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float = 900.0) -> list[Outcome]:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("client traffic did not finish in time")
        return self.outcomes

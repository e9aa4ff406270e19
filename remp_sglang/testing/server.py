"""Launch a real ``sglang.launch_server`` on CPU and talk to it over HTTP.

The server runs as a subprocess in its own session (process group), so that teardown
can reach every scheduler, tokenizer and detokenizer process it spawned. Only the
standard library, ``requests`` and ``remp_sglang.ports`` (standard library only) are
imported: the harness works in an environment
where SGLang is installed for the subprocess's interpreter but never imported here.

The flags and environment follow ``shared/design/sglang-on-cpu.md``: the CPU engine,
torch-native attention, no CUDA graphs, float32 (``--dtype auto`` serves float32
checkpoints in float16, which flips near-tie tokens), and for several ranks one
``SGLANG_CPU_OMP_THREADS_BIND`` entry per rank and a non-existent NCCL library so
that the CUDA build of torch falls back to gloo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from remp_sglang.ports import free_port

#: Start-up to healthy takes 20-60 s on 2 busy cores; leave room for a loaded machine.
DEFAULT_STARTUP_TIMEOUT_S = 300.0
DEFAULT_MAX_TOTAL_TOKENS = 4096
_NO_NCCL = "/nonexistent/remp-sglang/libnccl.so.2"


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message has the log tail."""


def _format_cpus(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``, the syntax of SGLANG_CPU_OMP_THREADS_BIND."""
    parts: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def cpu_binding(ranks: int, cpus: Sequence[int] | None = None) -> str:
    """One ``|``-separated CPU set per rank, splitting the usable CPUs evenly.

    With more ranks than CPUs, ranks share CPUs round-robin. SGLang only applies the
    binding with its AMX/arm64 kernels, but asserts one entry per rank regardless.
    """
    usable = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if ranks <= len(usable):
        size = len(usable) // ranks
        groups = [usable[i * size : (i + 1) * size] for i in range(ranks)]
        groups[-1].extend(usable[ranks * size :])
    else:
        groups = [[usable[i % len(usable)]] for i in range(ranks)]
    return "|".join(_format_cpus(group) for group in groups)


def server_env(ranks: int, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a CPU server with ``ranks`` scheduler processes.

    ``overrides`` wins over every default set here.
    """
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    if ranks > 1:
        env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_binding(ranks)
        # The CUDA build of torch makes pynccl try NCCL on a CPU tensor; with no
        # library to load SGLang uses gloo.
        env["SGLANG_NCCL_SO_PATH"] = _NO_NCCL
        # Ranks that each start a thread per core fight over the cores: on 2 cores TP 2
        # decodes about 4x faster with one thread per rank than with two.
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // ranks))
    env.update(overrides or {})
    return env


def server_command(
    model_path: str | Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    max_total_tokens: int | None = DEFAULT_MAX_TOTAL_TOKENS,
    extra_args: Sequence[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The ``launch_server`` command line for a CPU server (``max_total_tokens=None``:
    SGLang sizes the pool from the memory left, as on a GPU; ``extra_args`` come last,
    so they override ``--mem-fraction-static``)."""
    return [
        python,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        str(tp),
        "--pp-size",
        str(pp),
        *(("--dp-size", str(dp)) if dp > 1 else ()),
        "--device",
        "cpu",
        "--attention-backend",
        "torch_native",
        "--disable-cuda-graph",
        *(("--max-total-tokens", str(max_total_tokens)) if max_total_tokens else ()),
        "--mem-fraction-static",
        "0.1",
        "--dtype",
        "float32",
        *extra_args,
    ]


@dataclass
class SGLangServer:
    """A running server: its process group, URL and log, plus HTTP client calls.

    A context manager: leaving the ``with`` block shuts the whole process group down.
    """

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    model_path: Path
    tp: int = 1
    pp: int = 1
    startup_s: float = 0.0
    request_timeout_s: float = 600.0
    closed: bool = False
    _session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __enter__(self) -> SGLangServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 60, width: int = 400) -> str:
        """The last ``lines`` lines of the stdout/stderr log, each cut to ``width``.

        Cutting keeps SGLang's one-line dump of every server argument (~20 kB) from
        burying the lines that matter.
        """
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        tail = text.splitlines()[-lines:]
        return "\n".join(
            line if len(line) <= width else f"{line[:width]} ... ({len(line) - width} more)"
            for line in tail
        )

    def describe(self, lines: int = 60) -> str:
        """A failure report: where the server ran, its state and its log tail."""
        state = "running" if self.is_alive() else f"exited with {self.process.returncode}"
        return (
            f"SGLang server tp={self.tp} pp={self.pp} at {self.base_url} (pid {self.pid}, "
            f"{state}); log {self.log_path}, last {lines} lines:\n{self.log_tail(lines)}"
        )

    def get(self, path: str, timeout: float | None = None) -> requests.Response:
        return self._session.get(self.base_url + path, timeout=timeout or self.request_timeout_s)

    def post(self, path: str, payload: Any, timeout: float | None = None) -> requests.Response:
        return self._session.post(
            self.base_url + path, json=payload, timeout=timeout or self.request_timeout_s
        )

    def _json(self, response: requests.Response) -> Any:
        if not response.ok:
            raise RuntimeError(
                f"{response.request.method} {response.url} -> {response.status_code}: "
                f"{response.text[:2000]}\n{self.describe(30)}"
            )
        return response.json()

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 16,
        *,
        temperature: float = 0.0,
        ignore_eos: bool = True,
        **sampling_params: Any,
    ) -> dict[str, Any]:
        """POST /generate for one prompt (text or token ids); greedy by default.

        ``ignore_eos`` defaults to True so that a test always gets exactly
        ``max_new_tokens`` tokens to compare. The response carries ``output_ids``
        (the generated token ids), ``text`` and ``meta_info`` (``cached_tokens``,
        ``finish_reason``, ...).
        """
        payload: dict[str, Any] = {
            "sampling_params": {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "ignore_eos": ignore_eos,
                **sampling_params,
            }
        }
        if isinstance(prompt, str):
            payload["text"] = prompt
        else:
            payload["input_ids"] = [int(token) for token in prompt]
        return self._json(self.post("/generate", payload))

    def generate_ids(self, prompt: str | Sequence[int], max_new_tokens: int = 16) -> list[int]:
        """The greedy continuation's token ids, exactly ``max_new_tokens`` of them."""
        return list(self.generate(prompt, max_new_tokens)["output_ids"])

    def generate_batch_ids(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16
    ) -> list[list[int]]:
        """Greedy continuations of several token-id prompts sent as ONE request.

        SGLang schedules them together, so prefill and decode run batched (and, with
        pipeline parallelism, as several micro-batches in flight).
        """
        payload = {
            "input_ids": [[int(token) for token in prompt] for prompt in prompts],
            "sampling_params": {
                "max_new_tokens": max_new_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            },
        }
        return [list(item["output_ids"]) for item in self._json(self.post("/generate", payload))]

    def server_info(self) -> dict[str, Any]:
        """GET /server_info: the resolved server arguments plus live scheduler state."""
        return self._json(self.get("/server_info"))

    def model_info(self) -> dict[str, Any]:
        """GET /model_info: model path, type and architectures."""
        return self._json(self.get("/model_info"))

    def flush_cache(self) -> None:
        """Drop the radix (prefix) cache, e.g. so a prompt is computed afresh."""
        response = self.post("/flush_cache", None)
        if not response.ok:
            raise RuntimeError(f"/flush_cache -> {response.status_code}: {response.text}")

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll /health_generate (which runs a one-token generation) until it answers 200."""
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if not self.is_alive():
                raise ServerStartError(f"server exited during start-up.\n{self.describe()}")
            try:
                response = self.get("/health_generate", timeout=30)
                if response.status_code == 200:
                    return
                last_error = f"/health_generate -> {response.status_code}"
            except requests.RequestException as error:
                last_error = f"{type(error).__name__}: {error}"
            time.sleep(1.0)
        raise ServerStartError(
            f"server not healthy after {timeout_s:.0f}s ({last_error}).\n{self.describe()}"
        )

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass  # nobody left in the group

    def shutdown(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left; idempotent."""
        self.closed = True
        self._session.close()
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # Also after a clean exit of the launcher: children it left behind must go too.
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)


def launch_sglang_server(
    model_path: str | Path,
    tp: int = 1,
    pp: int = 1,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    dp: int = 1,
    timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
    *,
    max_total_tokens: int | None = DEFAULT_MAX_TOTAL_TOKENS,
    log_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    python: str = sys.executable,
) -> SGLangServer:
    """Start ``python -m sglang.launch_server`` on CPU and wait until it is healthy.

    ``env`` entries override the harness defaults (see ``server_env``). The log goes
    to ``log_dir`` (a fresh temporary directory by default). Raises
    ``ServerStartError`` with the log tail, after killing the process group, if the
    server exits or is not healthy within ``timeout`` seconds.
    """
    port = port or free_port()
    log_root = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="sglang-"))
    log_root.mkdir(parents=True, exist_ok=True)
    log_path = log_root / f"sglang-dp{dp}-tp{tp}-pp{pp}-{port}.log"
    command = server_command(
        model_path,
        port=port,
        host=host,
        tp=tp,
        pp=pp,
        dp=dp,
        max_total_tokens=max_total_tokens,
        extra_args=extra_args,
        python=python,
    )
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        log_file.write(("$ " + " ".join(command) + "\n").encode())
        log_file.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=server_env(dp * tp * pp, env),
            start_new_session=True,
        )
    server = SGLangServer(
        process=process,
        base_url=f"http://{host}:{port}",
        log_path=log_path,
        model_path=Path(model_path),
        tp=tp,
        pp=pp,
    )
    try:
        server.wait_healthy(timeout)
    except BaseException:
        server.shutdown(grace_s=2.0)
        raise
    server.startup_s = time.monotonic() - started
    return server


#: ``start(model_path, tp=1, pp=1, **launch_kwargs) -> SGLangServer``, as the test
#: fixture ``sglang_server_factory`` provides it.
ServerFactory = Callable[..., SGLangServer]

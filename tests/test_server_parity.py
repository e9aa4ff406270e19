"""Real SGLang servers on CPU give exactly transformers' greedy tokens (slow), and the
harness that runs them fails loudly and cleans up (fast, no SGLang needed).

This is the baseline every reshape test builds on: stock SGLang 0.5.23, launched by
the harness on a float32 tiny Llama (4 layers, 4 heads, 2 KV heads) at every layout a
reshape may target, must reproduce ``transformers``' ``generate(do_sample=False)``
token for token, one prompt at a time and with all prompts batched in one request.
TP 2 gives each rank one KV head; TP 4 exceeds the KV heads, so each KV head is
replicated on two ranks; PP 2 gives each stage two layers; TP 2 x PP 2 does both.

Qwen2 is compared with transformers at TP 1 only. Stock SGLang 0.5.23 on CPU at
TP > 1 was seen to disagree with transformers for Qwen2 from the first generated
tokens (shared/design/sglang-on-cpu.md; cause not found). These tiny Qwen2 models
matched at TP 2 when tried through this harness, but until the cause is understood a
TP > 1 Qwen2 server is compared with stock SGLang at the same layout, not with
transformers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from remp_checks import transformers_greedy

from remp_sglang.testing import ServerFactory, ServerStartError, SGLangServer, launch_sglang_server
from remp_sglang.testing.server import cpu_binding, server_env

PROMPTS = (
    "The quick brown fox",
    "Hello, world! How are you today?",
    "def main(): return 0",
    "Numbers: 1 2 3 4",
)
# Several ranks share the 2 cores of a CI runner: keep generations short.
NEW_TOKENS = 20

# (arch, tp, pp); one parametrized fixture, so that pytest runs one server at a time.
LAYOUTS = [
    ("llama", 1, 1),
    ("llama", 2, 1),
    ("llama", 4, 1),
    ("llama", 1, 2),
    ("llama", 2, 2),
    ("qwen2", 1, 1),
]


def _model_dir(request: pytest.FixtureRequest, arch: str) -> Path:
    return request.getfixturevalue(f"tiny_{arch}_dir")


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Per model directory: (prompt ids, transformers' greedy continuations), cached."""
    return {}


@pytest.fixture(
    scope="module", params=LAYOUTS, ids=[f"{arch}-tp{tp}-pp{pp}" for arch, tp, pp in LAYOUTS]
)
def served(
    request: pytest.FixtureRequest,
    sglang_server_factory: ServerFactory,
    reference: dict[str, tuple[list[list[int]], list[list[int]]]],
) -> Iterator[tuple[SGLangServer, list[list[int]], list[list[int]]]]:
    """A running server for one layout, with the prompts and the expected tokens."""
    arch, tp, pp = request.param
    model_dir = _model_dir(request, arch)
    key = str(model_dir)
    if key not in reference:
        reference[key] = transformers_greedy(model_dir, PROMPTS, NEW_TOKENS)
    server = sglang_server_factory(model_dir, tp=tp, pp=pp)
    yield server, *reference[key]
    server.shutdown()


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(
    served: tuple[SGLangServer, list[list[int]], list[list[int]]],
) -> None:
    server, prompts, expected = served
    got = [server.generate_ids(prompt, NEW_TOKENS) for prompt in prompts]
    assert got == expected
    # Not a degenerate model: the comparison would prove little if every token were equal.
    assert len({token for out in expected for token in out}) >= 2 * NEW_TOKENS


@pytest.mark.slow
def test_batched_request_equals_transformers(
    served: tuple[SGLangServer, list[list[int]], list[list[int]]],
) -> None:
    server, prompts, expected = served
    server.flush_cache()  # compute the prompts afresh, all in one prefill batch
    assert server.generate_batch_ids(prompts, NEW_TOKENS) == expected


@pytest.mark.slow
def test_repeated_prompt_hits_the_prefix_cache(
    served: tuple[SGLangServer, list[list[int]], list[list[int]]],
) -> None:
    server, prompts, expected = served
    first = server.generate(prompts[1], NEW_TOKENS)
    again = server.generate(prompts[1], NEW_TOKENS)
    assert first["output_ids"] == again["output_ids"] == expected[1]
    assert again["meta_info"]["cached_tokens"] >= len(prompts[1]) - 1


@pytest.mark.slow
def test_server_reports_its_layout(
    served: tuple[SGLangServer, list[list[int]], list[list[int]]],
) -> None:
    server, _, _ = served
    info = server.server_info()
    assert (info["tp_size"], info["pp_size"]) == (server.tp, server.pp)
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert server.model_info()["model_path"] == str(server.model_path)


def _fake_interpreter(tmp_path: Path, body: str) -> str:
    """A stand-in for ``python`` that runs ``body`` instead of SGLang."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_start_failure_raises_with_the_log_tail(tmp_path: Path) -> None:
    python = _fake_interpreter(tmp_path, 'echo "fake launcher refuses: $*"\nexit 3\n')
    with pytest.raises(ServerStartError, match="exited during start-up") as error:
        launch_sglang_server(tmp_path / "model", python=python, log_dir=tmp_path, timeout=30)
    message = str(error.value)
    assert "exited with 3" in message
    assert "fake launcher refuses: -m sglang.launch_server --model-path" in message
    assert "--attention-backend torch_native" in message and "--dtype float32" in message


def test_start_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    python = _fake_interpreter(tmp_path, "sleep 300 &\necho child $!\nwait\n")
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="not healthy after 3s") as error:
        launch_sglang_server(tmp_path / "model", python=python, log_dir=tmp_path, timeout=3)
    assert time.monotonic() - started < 30
    child = int(str(error.value).split("child ")[1].split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"the launcher's child {child} survived teardown")


def test_cpu_binding_gives_one_entry_per_rank() -> None:
    assert cpu_binding(2, [0, 1]) == "0|1"
    assert cpu_binding(2, [0, 1, 2, 3, 4]) == "0-1|2-4"
    assert cpu_binding(3, [0, 2, 4, 5, 6, 7]) == "0,2|4-5|6-7"
    assert cpu_binding(4, [0, 1]) == "0|1|0|1"


def test_server_env_for_several_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    single = server_env(1)
    assert single["SGLANG_USE_CPU_ENGINE"] == "1"
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in single
    multi = server_env(4, {"OMP_NUM_THREADS": "7"})
    assert len(multi["SGLANG_CPU_OMP_THREADS_BIND"].split("|")) == 4
    assert not os.path.exists(multi["SGLANG_NCCL_SO_PATH"])
    assert multi["OMP_NUM_THREADS"] == "7"  # the caller's value wins

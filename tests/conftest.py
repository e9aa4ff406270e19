"""Shared fixtures: tiny models generated at test time and real SGLang servers on CPU.

A failing test's report gets a section per server still running in its module (the
log path and tail), so a server-side error is visible without hunting for the log.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from remp_sglang.testing import ServerFactory, SGLangServer, launch_sglang_server
from remp_sglang.tiny_model import make_tiny_model

#: Servers started through ``sglang_server_factory`` and not shut down yet.
_RUNNING_SERVERS: list[SGLangServer] = []


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers, 4 heads, 2 KV heads, hidden 64: TP 2 splits the KV heads, PP 2 the layers."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shapes as ``tiny_llama_dir`` with Qwen2's QKV biases (non-zero here)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="module")
def sglang_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """``start(model_path, tp=1, pp=1, **launch_kwargs)`` -> a healthy server.

    Every server it starts is shut down (whole process group) at the end of the
    module at the latest; shut one down earlier to keep at most one running.
    """
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed")
    log_dir = tmp_path_factory.mktemp("sglang-logs")
    started: list[SGLangServer] = []

    def start(model_path: str | Path, tp: int = 1, pp: int = 1, **kwargs: object) -> SGLangServer:
        server = launch_sglang_server(model_path, tp=tp, pp=pp, log_dir=log_dir, **kwargs)
        started.append(server)
        _RUNNING_SERVERS.append(server)
        print(f"\nSGLang server tp={tp} pp={pp} healthy after {server.startup_s:.1f}s")
        return server

    yield start
    for server in started:
        server.shutdown()
        _RUNNING_SERVERS.remove(server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in _RUNNING_SERVERS:
            if not server.closed:
                report.sections.append(
                    (f"SGLang server tp={server.tp} pp={server.pp}", server.describe())
                )

"""The SGLang plugin entry point: ``--remp`` and ``GET /remp/topology`` on a real server.

The servers load the plugin through the ``sglang.srt.plugins`` entry point that
``pyproject.toml`` declares (the set-up script installs the package in editable mode);
``SGLANG_PLUGINS=remp`` keeps any other installed plugin out.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from remp_sglang.integration.config import ENV_CONFIG, RempConfig, config_from_env
from remp_sglang.integration.layouts import validate_layout

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT_GROUP = "sglang.srt.plugins"
ENTRY_POINT_NAME = "remp"
ENTRY_POINT_VALUE = "remp_sglang.integration.plugin:register"


# ----------------------------------------------------------------------------- fast checks


def test_config_round_trip_and_validation() -> None:
    config = RempConfig(launch_tp=2, launch_pp=2, initial_tp=2, initial_pp=1)
    config.validate()
    assert config.launch_world_size == 4
    assert config_from_env({ENV_CONFIG: config.to_json()}) == config
    assert config_from_env({}) is None
    with pytest.raises(ValueError, match="needs 4 ranks"):
        RempConfig(launch_tp=2, launch_pp=1, initial_tp=4).validate()
    with pytest.raises(ValueError, match=">= 1"):
        RempConfig(launch_tp=2, initial_pp=0).validate()
    with pytest.raises(ValueError, match="malformed"):
        config_from_env({ENV_CONFIG: "{not json"})


def test_reshape_request_validation_names_the_reason() -> None:
    from types import SimpleNamespace

    hf = SimpleNamespace(architectures=["LlamaForCausalLM"], num_attention_heads=8,
                         num_key_value_heads=2, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, vocab_size=300, tie_word_embeddings=False)
    config = RempConfig(launch_tp=8, launch_pp=1)
    assert validate_layout({"tp": 4, "pp": 2}, config, hf).layout() == {"dp": 1, "tp": 4, "pp": 2}
    assert validate_layout({"tp": 2}, config, hf).layout() == {"dp": 1, "tp": 2, "pp": 1}
    for body, reason in [
        ({"tp": 3}, "attention heads"),
        ({"tp": 1, "pp": 4}, "exceeds the 3 layers"),
        ({"tp": 8, "pp": 2}, "exceeds the 8 ranks"),
        ({"tp": 2.0}, "integer"),
        ({"pp": -1}, ">= 1"),
        ({"tp": 1, "layout": 1}, "unknown fields"),
        ({"dp": 2, "tp": 4}, "launch with --dp-size"),
        ("tp=2", "JSON object"),
    ]:
        with pytest.raises(ValueError, match=reason):
            validate_layout(body, config, hf)
    assert validate_layout({"tp": 8}, config, hf).tp == 8  # GPU: KV heads replicated
    replicas = RempConfig(launch_tp=4, launch_pp=1, launch_dp=2)  # replicas start at 0, 4
    assert validate_layout({"dp": 1, "tp": 8}, replicas, hf).layout() == {
        "dp": 1, "tp": 8, "pp": 1}
    assert validate_layout({"dp": 2, "tp": 2, "pp": 2}, replicas, hf).num_active == 8
    with pytest.raises(ValueError, match="first rank must be one SGLang feeds"):
        validate_layout({"dp": 4, "tp": 2}, replicas, hf)  # would start replicas at 2, 6
    with pytest.raises(ValueError, match="on CPU, tp=8 must divide the 2 KV heads"):
        validate_layout({"tp": 8}, config, hf, cpu=True)
    with pytest.raises(ValueError, match="tied word embeddings"):
        validate_layout({"tp": 1}, config, SimpleNamespace(**{**vars(hf),
                                                                "tie_word_embeddings": True}))


def test_plugin_module_does_not_import_sglang() -> None:
    code = (
        "import sys, remp_sglang.integration.plugin as p; "
        "assert not any(m == 'sglang' or m.startswith('sglang.') for m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith('sglang'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ----------------------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def plugin_env() -> dict[str, str]:
    """The installed package declares the entry point; SGLANG_PLUGINS keeps others out."""
    probe = (
        "import json, importlib.metadata as m; "
        f"print(json.dumps([e.value for e in m.entry_points(group={ENTRY_POINT_GROUP!r}) "
        f"if e.name == {ENTRY_POINT_NAME!r}]))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    )
    # The server's interpreter must see the entry point, or the negative test proves nothing.
    assert ENTRY_POINT_VALUE in json.loads(found.stdout), found.stdout
    return {"SGLANG_PLUGINS": ENTRY_POINT_NAME}


@pytest.mark.slow
def test_topology_route_at_tp2(tiny_llama_dir, sglang_server_factory, plugin_env) -> None:
    server = sglang_server_factory(tiny_llama_dir, tp=2, extra_args=("--remp",), env=plugin_env)
    try:
        response = server.get("/remp/topology", timeout=180)
        assert response.status_code == 200, response.text
        topology = response.json()
        assert topology["tp"] == 2
        assert topology["pp"] == 1
        assert topology["world_size"] == 2
        assert topology["active_ranks"] == [0, 1]
        assert topology["state"] == "serving"
        assert topology["launch_world_size"] == 2
        # The schedulers' pool size, as SGLang itself reports it.
        info = server.server_info()
        assert topology["kv_capacity_tokens"] == info["max_total_num_tokens"]
        assert topology["kv_capacity_tokens"] > 0

        # Serving is unaffected, and the route still answers after a batch has run.
        output_ids = server.generate_ids("The quick brown fox", max_new_tokens=4)
        assert len(output_ids) == 4
        assert server.get("/remp/topology", timeout=180).json() == topology
    finally:
        server.shutdown()


@pytest.mark.slow
def test_without_remp_the_plugin_is_inert(
    tiny_llama_dir, sglang_server_factory, plugin_env
) -> None:
    server = sglang_server_factory(tiny_llama_dir, tp=1, env=plugin_env)
    try:
        assert server.get("/remp/topology", timeout=60).status_code == 404
        assert "remp_sglang enabled" not in server.log_tail(10_000)
        output_ids = server.generate_ids("The quick brown fox", max_new_tokens=4)
        assert len(output_ids) == 4
        assert server.server_info()["tp_size"] == 1
    finally:
        server.shutdown()


@pytest.mark.slow
def test_launch_refuses_an_option_a_reshape_would_break(tiny_llama_dir, plugin_env) -> None:
    """Refused before any process is spawned, with the option named."""
    from remp_sglang.testing.server import server_command, server_env

    command = server_command(tiny_llama_dir, port=1, host="127.0.0.1", tp=1, pp=1,
                             max_total_tokens=512, extra_args=("--remp", "--page-size", "16"),
                             python=sys.executable)
    done = subprocess.run(command, env=server_env(1, plugin_env), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "--remp does not support a KV page size other than 1 (--page-size=16)" in (
        done.stdout + done.stderr), (done.stdout + done.stderr)[-3000:]

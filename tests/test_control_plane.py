"""The control plane of a locked-down server: SGLang's keys on the routes, input that
keeps what it leaves out, health that stays up through a reshape, metrics on /metrics,
and a migration plane that nothing outside the server can reach or drive.

One 2-rank server with ``--api-key``, ``--admin-api-key`` and ``--enable-metrics``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from remp_checks import model_and_fault_file

pytestmark = pytest.mark.slow

USER, ADMIN = "user-key-123", "admin-key-456"
PROMPT = [5 + (i * 11) % 200 for i in range(24)]


@pytest.fixture(scope="module")
def locked(tiny_llama_dir, sglang_server_factory, tmp_path_factory):
    model_dir, spec = model_and_fault_file(tiny_llama_dir, tmp_path_factory.mktemp("locked"))
    server = sglang_server_factory(
        model_dir, tp=2,
        extra_args=("--remp", "--api-key", USER, "--admin-api-key", ADMIN,
                    "--enable-metrics", "--remp-reshape-timeout", "60"),
        env={"REMP_FAULT_INJECT": f"@{spec}", "SGLANG_HEALTH_CHECK_TIMEOUT": "2"})
    yield server, spec
    server.shutdown()


def call(server, method: str, path: str, key: str | None = None, body=None, timeout=300):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, server.base_url + path, json=body, headers=headers,
                            timeout=timeout)


def layout(server) -> dict:
    data = call(server, "GET", "/remp/topology", USER).json()
    return {"tp": data["tp"], "pp": data["pp"]}


def generate(server, n: int = 4) -> list[int]:
    response = call(server, "POST", "/generate", USER, {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}})
    assert response.status_code == 200, response.text
    return response.json()["output_ids"]


def test_reshape_needs_the_admin_key(locked):
    server, _ = locked
    for key in (None, "wrong", USER):
        response = call(server, "POST", "/remp/reshape", key, {"tp": 1})
        assert response.status_code == 401, (key, response.text)
        assert layout(server) == {"tp": 2, "pp": 1}
    response = call(server, "POST", "/remp/reshape", ADMIN, {"tp": 1})
    assert response.status_code == 200, response.text
    assert layout(server) == {"tp": 1, "pp": 1}
    assert call(server, "POST", "/remp/reshape", ADMIN, {"tp": 2}).status_code == 200


def test_topology_is_a_normal_read(locked):
    server, _ = locked
    assert call(server, "GET", "/remp/topology").status_code == 401
    assert call(server, "GET", "/remp/topology", "wrong").status_code == 401
    assert call(server, "GET", "/remp/topology", USER).status_code == 200


def test_policy_route_under_the_keys(locked):
    """GET /remp/policy is a normal read; pausing is a control call (admin key). This
    server's policy is manual: it says so, and there is nothing to pause."""
    server, _ = locked
    assert call(server, "GET", "/remp/policy").status_code == 401
    assert call(server, "GET", "/remp/policy", USER).json() == {"policy": "manual"}
    assert call(server, "POST", "/remp/policy", USER, {"paused": True}).status_code == 401
    response = call(server, "POST", "/remp/policy", ADMIN, {"paused": True})
    assert response.status_code == 400 and "manual" in response.json()["error"]


def test_missing_fields_keep_their_current_value(locked):
    server, _ = locked
    response = call(server, "POST", "/remp/reshape", ADMIN, {})
    assert response.status_code == 200 and response.json()["unchanged"], response.text
    response = call(server, "POST", "/remp/reshape", ADMIN, {"pp": 2})  # tp 2 kept: 4 ranks
    assert response.status_code == 400 and "exceeds the 2 ranks" in response.json()["error"]
    assert call(server, "POST", "/remp/reshape", ADMIN, {"tp": 1}).status_code == 200
    assert layout(server) == {"tp": 1, "pp": 1}
    assert call(server, "POST", "/remp/reshape", ADMIN, {"pp": 2}).status_code == 200
    assert layout(server) == {"tp": 1, "pp": 2}  # tp 1 kept
    assert call(server, "POST", "/remp/reshape", ADMIN, {"tp": 2, "pp": 1}).status_code == 200
    assert generate(server) == generate(server)


def test_health_stays_up_through_a_slow_reshape(locked):
    """The model build is made 6 s slow; SGLang's health check gives up after 2 s here.
    Checks sent during the reshape wait for it and answer 200."""
    server, spec = locked
    spec.write_text("model:0:delay:6")
    result = {}

    def run():
        result["response"] = call(server, "POST", "/remp/reshape", ADMIN, {"tp": 1})

    thread = threading.Thread(target=run)
    try:
        thread.start()
        time.sleep(1.0)
        for path in ("/health_generate", "/health"):
            t = time.monotonic()
            response = call(server, "GET", path, timeout=120)
            assert response.status_code == 200, (path, response.text)
            result[path] = time.monotonic() - t
        thread.join(120)
    finally:
        spec.write_text("")
    assert result["response"].status_code == 200, result["response"].text
    assert result["/health_generate"] > 2.0  # it really waited for the reshape
    assert call(server, "POST", "/remp/reshape", ADMIN, {"tp": 2}).status_code == 200


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name or (want and not all(p in label_text for p in want.split(","))):
            continue
        total, found = total + float(value), True
    assert found, f"{name}{{{want}}} not in /metrics"
    return total


def test_metrics_after_reshapes_and_a_rollback(locked):
    server, spec = locked
    before = call(server, "GET", "/metrics").text
    ok_before = metric(before, "remp_reshapes_total", outcome="succeeded")
    rolled_before = metric(before, "remp_reshapes_total", outcome="rolled_back")
    assert call(server, "POST", "/remp/reshape", ADMIN, {"tp": 1}).status_code == 200
    spec.write_text("world:0:raise")
    try:
        response = call(server, "POST", "/remp/reshape", ADMIN, {"tp": 2})
    finally:
        spec.write_text("")
    assert response.status_code == 500 and response.json()["rolled_back"], response.text
    assert call(server, "POST", "/remp/reshape", ADMIN, {"tp": 2}).status_code == 200
    text = call(server, "GET", "/metrics").text
    assert metric(text, "remp_reshapes_total", outcome="succeeded") == ok_before + 2
    assert metric(text, "remp_reshapes_total", outcome="rolled_back") == rolled_before + 1
    assert metric(text, "remp_reshapes_started_total") >= ok_before + 3
    assert metric(text, "remp_tp_size") == 2 and metric(text, "remp_pp_size") == 1
    assert metric(text, "remp_parked_ranks") == 0
    assert metric(text, "remp_reshape_phase_seconds_count", phase="transfer") >= 2
    assert metric(text, "remp_reshape_bytes_moved_total", kind="weights") > 0
    assert metric(text, "remp_reshape_downtime_seconds_total") > 0
    assert metric(text, "remp_reshape_last_downtime_seconds") > 0
    log = server.log_path.read_text(errors="replace")
    assert "phase world_s" in log and "done on rank 0: downtime" in log


ATTACK = r"""
import pickle, socket, sys, datetime, os
import torch.distributed as dist

class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[1]}",))

payload, port = pickle.dumps(Evil()), int(sys.argv[2])
try:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(os.urandom(4096))
except OSError:
    pass
store = dist.TCPStore("127.0.0.1", port, is_master=False,
                      timeout=datetime.timedelta(seconds=3))
for epoch in range(1, 12):  # where an unpickling plane would look for orders and state
    store.set(f"remp/order/{epoch}", payload)
    store.set(f"remp/state/{epoch}", payload)
print("wrote")
"""


def attack(marker: Path, port: int) -> bool:
    """Garbage, then pickled payloads through a store client; True if the port took them."""
    try:
        done = subprocess.run([sys.executable, "-c", ATTACK, str(marker), str(port)],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return "wrote" in done.stdout


def server_processes(server) -> list[psutil.Process]:
    root = psutil.Process(server.pid)
    return [root, *root.children(recursive=True)]


def test_the_plane_has_no_port_and_strangers_achieve_nothing(locked, tmp_path):
    """The plane is a store file in a directory only the server's user can open; no
    scheduler unpickles anything. A separate process throws garbage and pickled
    payloads at every port the server's processes listen on: nothing runs, and the
    server keeps serving and reshaping."""
    server, _ = locked
    procs = server_processes(server)
    config = None
    for proc in procs:
        try:
            text = proc.environ().get("REMP_SGLANG_CONFIG")
        except psutil.Error:
            continue
        if text:
            config = json.loads(text)
            break
    assert config is not None
    plane_dir = Path(config["plane_path"]).parent
    assert stat.S_IMODE(plane_dir.stat().st_mode) == 0o700
    assert plane_dir.stat().st_uid == os.getuid()
    ports = set()
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    ports.add(conn.laddr.port)
        except psutil.Error:
            continue
    http_port = int(server.base_url.rsplit(":", 1)[1])
    ports.discard(http_port)
    marker = tmp_path / "pwned"
    took: dict[int, bool] = {}
    threads = [threading.Thread(target=lambda p=p: took.update({p: attack(marker, p)}))
               for p in sorted(ports)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(took) == len(ports)
    before = generate(server, 6)
    for tp, pp in ((1, 1), (1, 2), (2, 1)):
        response = call(server, "POST", "/remp/reshape", ADMIN, {"tp": tp, "pp": pp})
        assert response.status_code == 200, response.text
    assert generate(server, 6) == before
    assert not marker.exists()
    assert all(p.is_running() for p in procs)


def test_with_only_an_api_key_the_reshape_takes_it(tiny_llama_dir, sglang_server_factory):
    """Without --admin-api-key, SGLang's control routes take the API key: so does ours."""
    server = sglang_server_factory(tiny_llama_dir, tp=1, extra_args=("--remp", "--api-key", USER))
    try:
        for key, status in ((None, 401), ("wrong", 401), (ADMIN, 401), (USER, 200)):
            response = call(server, "POST", "/remp/reshape", key, {"tp": 1})
            assert response.status_code == status, (key, response.text)
        assert response.json()["unchanged"]
    finally:
        server.shutdown()

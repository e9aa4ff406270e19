"""The compiled extension is built, registers its ops, and the fallback path works.

On a CI machine without a GPU this still proves the CUDA sources compiled:
when torch has CUDA and nvcc is available (and REMP_CUDA != "0") the CUDA
dispatch key must have a kernel for every op.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from remp_sglang import _ext, kernels, kernels_ref

ROOT = Path(__file__).resolve().parents[1]
OPS = ("remp::gather_kv", "remp::scatter_kv", "remp::copy_kv")


def _nvcc_available() -> bool:
    if shutil.which("nvcc"):
        return True
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc"))


def test_extension_imports_and_registers_cpu_kernels():
    import remp_sglang._C as C  # noqa: N812

    assert _ext.available(), _ext.load_error()
    assert isinstance(C.WITH_CUDA, bool)
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    assert "cpu=1" in torch.ops.remp.build_info()
    assert torch.ops.remp.with_cuda() == C.WITH_CUDA


def test_cpu_op_dispatches_to_compiled_kernel():
    k = [torch.arange(24, dtype=torch.float32).view(4, 2, 3) + 100 * i for i in range(2)]
    v = [t + 1000 for t in k]
    out = torch.empty(2, 2, 2, 1, 3)
    torch.ops.remp.gather_kv(k, v, torch.tensor([3, 0]), 0, 2, 1, 2, out)
    assert torch.equal(out, kernels_ref.gather_kv(k, v, torch.tensor([3, 0]), heads=(1, 2)))


@pytest.mark.skipif(
    not (torch.version.cuda and _nvcc_available() and os.environ.get("REMP_CUDA") != "0"),
    reason="CUDA kernels are only expected when torch has CUDA, nvcc exists and REMP_CUDA != 0",
)
def test_cuda_kernels_compiled_in():
    import remp_sglang._C as C  # noqa: N812

    assert C.WITH_CUDA, "torch has CUDA and nvcc exists, but the extension was built CPU-only"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    assert _ext.cuda_available()
    assert "cuda_runtime=" in torch.ops.remp.build_info()


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(_ext, "available", lambda: False)
    monkeypatch.setattr(kernels, "_warned", set())


def test_fallback_warns_once_and_matches_reference(no_extension):
    g = torch.Generator().manual_seed(0)
    k = [torch.randn(8, 4, 16, generator=g).half() for _ in range(3)]
    v = [torch.randn(8, 4, 16, generator=g).half() for _ in range(3)]
    slots = torch.tensor([5, 2, 7], dtype=torch.int32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        packed = kernels.gather_kv(k, v, slots, layers=(1, 3), heads=(2, 4))
        dk = [torch.zeros(6, 2, 16).half() for _ in range(2)]
        dv = [torch.zeros(6, 2, 16).half() for _ in range(2)]
        kernels.scatter_kv(packed, dk, dv, torch.tensor([0, 4, 1]))
        ck = [torch.zeros(6, 2, 16).half() for _ in range(2)]
        cv = [torch.zeros(6, 2, 16).half() for _ in range(2)]
        kernels.copy_kv(dk, dv, torch.tensor([0, 4, 1]), ck, cv, torch.tensor([1, 2, 3]))
    fallback = [w for w in caught if "pure-torch" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert issubclass(fallback[0].category, RuntimeWarning)
    expected = kernels_ref.gather_kv(k, v, slots, layers=(1, 3), heads=(2, 4))
    assert torch.equal(packed.view(torch.int16), expected.view(torch.int16))
    again = kernels_ref.gather_kv(ck, cv, torch.tensor([1, 2, 3]))
    assert torch.equal(again.view(torch.int16), expected.view(torch.int16))
    # Validation still applies on the fallback path.
    with pytest.raises(IndexError, match="slots out of range"):
        kernels.gather_kv(k, v, torch.tensor([8]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fallback_when_cuda_kernels_missing(monkeypatch):
    monkeypatch.setattr(_ext, "cuda_available", lambda: False)
    monkeypatch.setattr(kernels, "_warned", set())
    k = [torch.randn(8, 2, 8, device="cuda") for _ in range(2)]
    v = [torch.randn(8, 2, 8, device="cuda") for _ in range(2)]
    slots = torch.tensor([1, 3], device="cuda")
    with pytest.warns(RuntimeWarning, match="without CUDA kernels"):
        out = kernels.gather_kv(k, v, slots)
    assert torch.equal(out, kernels_ref.gather_kv(k, v, slots))


def test_disable_env_forces_reference(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setenv("REMP_DISABLE_EXT", "1")
    assert not _ext.available()
    assert "REMP_DISABLE_EXT" in (_ext.load_error() or "")
    assert not kernels.extension_available()


def test_setup_rejects_bad_remp_cuda_value():
    env = dict(os.environ, REMP_CUDA="maybe")
    res = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )
    assert res.returncode != 0
    assert "REMP_CUDA must be 0, 1 or unset" in res.stderr

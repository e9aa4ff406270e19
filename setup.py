"""Build the remp_sglang._C extension (KV-cache copy kernels).

Metadata lives in pyproject.toml; this file only declares the extension.

CPU kernels always build. CUDA kernels build when torch has CUDA and nvcc is
found, controlled by REMP_CUDA: "1" = require CUDA (fail clearly if
impossible), "0" = CPU only, unset/"auto" = build CUDA when possible.
TORCH_CUDA_ARCH_LIST defaults to "9.0" (Hopper) when unset, so a build on a
machine without a GPU does not compile for every architecture.

    MAX_JOBS=2 python setup.py build_ext --inplace
    pip install -e . --no-build-isolation
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - build-time guard
    sys.exit(
        "remp-sglang: building the extension needs torch installed in this environment; "
        f"use `pip install -e . --no-build-isolation` ({exc})"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/ops.cpp", "csrc/module.cpp"]
CUDA_SOURCES = ["csrc/kv_copy_cuda.cu"]


def _cudart_dir(home: str) -> str | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        d = os.path.join(home, sub)
        if glob.glob(os.path.join(d, "libcudart.so*")):
            return d
    return None


def _find_cuda_home() -> tuple[str, str] | None:
    """(CUDA_HOME, libcudart dir) of a toolkit with both nvcc and libcudart.

    torch guesses CUDA_HOME from `which nvcc`; when nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc) that guess (/usr/local) lacks the libraries, so
    try the explicit variables, torch's guess, the resolved nvcc path and the
    conventional /usr/local/cuda in turn.
    """
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands.append("/usr/local/cuda")
    for home in cands:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            lib = _cudart_dir(home)
            if lib:
                return home, lib
    return None


def _want_cuda() -> bool:
    mode = os.environ.get("REMP_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto", ""):
        sys.exit(f"remp-sglang: REMP_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return False
    problems = []
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} was built without CUDA")
    if _find_cuda_home() is None:
        problems.append(
            "no CUDA toolkit with nvcc and libcudart was found (set CUDA_HOME or put nvcc on PATH)"
        )
    if problems:
        if mode == "1":
            sys.exit("remp-sglang: REMP_CUDA=1 but the CUDA kernels cannot be built: "
                     + "; ".join(problems))
        print("remp-sglang: building CPU kernels only: " + "; ".join(problems))
        return False
    return True


def _extension():
    with_cuda = _want_cuda()
    cxx = ["-O3"]
    macros = []
    sources = list(CPU_SOURCES)
    if with_cuda:
        home, cudart_dir = _find_cuda_home()
        # torch.utils.cpp_extension reads its module-level CUDA_HOME when it
        # builds the nvcc command line and library paths.
        cpp_extension.CUDA_HOME = home
        os.environ["CUDA_HOME"] = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        macros.append(("REMP_WITH_CUDA", "1"))
        sources += CUDA_SOURCES
        nvcc = ["-O3", "-lineinfo"]
        print(
            "remp-sglang: building CPU + CUDA kernels with CUDA_HOME="
            + home
            + " for TORCH_CUDA_ARCH_LIST="
            + os.environ["TORCH_CUDA_ARCH_LIST"]
        )
        return cpp_extension.CUDAExtension(
            "remp_sglang._C",
            sources,
            define_macros=macros,
            library_dirs=[cudart_dir],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    return cpp_extension.CppExtension(
        "remp_sglang._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx}
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

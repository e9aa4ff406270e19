#!/usr/bin/env bash
# Creates the project-local virtual environment (.venv) with everything the demo and the
# tests need on a machine without a GPU: the torch sglang 0.5.23 pins (2.14.1), sglang
# with its non-GPU dependencies, the CPU `sgl_kernel` shim where no real one imports,
# and this project in editable mode with its C++ (and, where nvcc exists, CUDA)
# extension built. Idempotent: each step is keyed on the files it depends on, so a
# second run only checks and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REMP_VENV:-.venv}
PYTHON=${PYTHON:-python3}
PY="$VENV/bin/python"
# pip's own chatter (dependency notes for the GPU packages left out on purpose, build
# back-end deprecation notices) goes to $LOG; a failing install prints its tail.
pip() {
  if ! "$PY" -m pip install --quiet --disable-pip-version-check "$@" >>"$LOG" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -n 40 >&2
    printf '[setup] pip install %s failed; the full log is %s\n' "$*" "$LOG" >&2
    return 1
  fi
}
key() { cat "$@" | sha256sum | cut -c1-16; }
step() { printf '[setup] %s\n' "$*"; }

[ -x "$PY" ] || { step "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
LOG="$VENV/setup.log"
: >"$LOG"

deps_key=$(key requirements/*.txt scripts/setup.sh)
if [ "$(cat "$VENV/.remp-deps" 2>/dev/null)" != "$deps_key" ]; then
  step "installing torch 2.14.1, sglang 0.5.23 (no GPU packages) and dev tools"
  pip --upgrade pip
  pip torch==2.14.1 torchvision==0.29.2
  pip --no-deps sglang==0.5.23
  pip -r requirements/cpu-runtime.txt -r requirements/dev.txt
  echo "$deps_key" > "$VENV/.remp-deps"
fi

shim_key=$(key compat/sgl_kernel_cpu/pyproject.toml $(find compat/sgl_kernel_cpu/sgl_kernel -name '*.py' | sort))
shim_state=$("$PY" - <<'PYEOF' 2>/dev/null || echo missing
import importlib.metadata as md
import sgl_kernel  # noqa: F401  (fails where no sgl_kernel imports)
try:
    md.distribution("sgl-kernel-cpu-compat")
    print("shim")
except md.PackageNotFoundError:
    print("real")
PYEOF
)
if [ "$shim_state" = missing ] || { [ "$shim_state" = shim ] && [ "$(cat "$VENV/.remp-shim" 2>/dev/null)" != "$shim_key" ]; }; then
  step "installing the CPU sgl_kernel shim (no importable sgl_kernel here)"
  pip --force-reinstall --no-deps ./compat/sgl_kernel_cpu
  echo "$shim_key" > "$VENV/.remp-shim"
fi

ext_key=$(key setup.py pyproject.toml $(find csrc -type f | sort))
if [ "$(cat "$VENV/.remp-ext" 2>/dev/null)" != "$ext_key" ] || ! "$PY" -c 'import torch, remp_sglang._C' 2>/dev/null; then
  step "building the remp extension (C++; CUDA too when nvcc is found, REMP_CUDA=0/1 forces)"
  MAX_JOBS=${MAX_JOBS:-2} pip --no-build-isolation --no-deps -e .
  echo "$ext_key" > "$VENV/.remp-ext"
fi
step "ready: $VENV"

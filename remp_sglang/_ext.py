"""Loader for the compiled extension ``remp_sglang._C``.

Importing ``_C`` registers the ``torch.ops.remp.*`` operators. The import is
attempted once and its outcome cached, so callers can cheaply ask whether the
fast kernels exist and, if not, why. Set ``REMP_DISABLE_EXT=1`` to force the
pure-torch reference (useful to bisect a suspected kernel bug).
"""

from __future__ import annotations

import importlib
import os

import torch

_loaded: bool | None = None
_error: str | None = None


def load() -> bool:
    """Import ``remp_sglang._C`` once; return whether its ops are registered."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if os.environ.get("REMP_DISABLE_EXT", "0") not in ("", "0"):
        _loaded, _error = False, "disabled by REMP_DISABLE_EXT"
        return False
    try:
        importlib.import_module("remp_sglang._C")
        torch.ops.remp.gather_kv  # noqa: B018 - raises if the ops did not register
    except (ImportError, OSError, AttributeError, RuntimeError) as exc:
        _loaded, _error = False, f"{type(exc).__name__}: {exc}"
    else:
        _loaded, _error = True, None
    return _loaded


def available() -> bool:
    """True when the compiled CPU kernels are usable."""
    return load()


def cuda_available() -> bool:
    """True when CUDA kernels were compiled into the extension."""
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key("remp::gather_kv", "CUDA")


def load_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was not tried)."""
    return _error


def build_info() -> str:
    """One-line description of what was compiled in (or why nothing was)."""
    if not load():
        return f"remp._C unavailable ({_error})"
    return str(torch.ops.remp.build_info())

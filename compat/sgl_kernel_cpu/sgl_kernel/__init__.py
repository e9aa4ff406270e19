"""CPU compatibility stand-in for ``sgl_kernel`` (see ../README.md).

SGLang 0.5.23's CPU engine imports a handful of names from ``sgl_kernel`` at module
import time. The CUDA wheel on PyPI cannot be imported without ``libcuda.so.1`` and
the CPU build of sgl-kernel is not published, so this package provides exactly those
names: real pure-torch versions of the ops plain serving can reach, and explicit
``NotImplementedError`` stubs for the speculative-decoding ops.

``convert_weight_packed`` is deliberately absent: SGLang probes
``torch.ops.sgl_kernel.convert_weight_packed`` to decide whether the AMX kernels
exist, and must conclude that they do not.
"""

from sgl_kernel._guard import warn_if_real_kernel_installed
from sgl_kernel._memory import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu
from sgl_kernel._sampling import murmur_hash32_cpu
from sgl_kernel.speculative import (
    assign_draft_cache_locs_contiguous_cpu,
    assign_extend_cache_locs_cpu,
    build_tree_kernel_efficient_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    rotate_input_ids_cpu,
    verify_tree_greedy_cpu,
)

#: Lets tests and tools tell this shim from a real sgl-kernel build.
IS_CPU_COMPAT_SHIM = True
__version__ = "0.1.0+cpu-compat"

warn_if_real_kernel_installed()

__all__ = [
    "IS_CPU_COMPAT_SHIM",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_req_to_token_pool_cpu",
    "build_tree_kernel_efficient_cpu",
    "copy_all_layer_kv_cache_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "murmur_hash32_cpu",
    "rotate_input_ids_cpu",
    "verify_tree_greedy_cpu",
]

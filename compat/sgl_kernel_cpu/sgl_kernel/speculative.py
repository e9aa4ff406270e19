"""Speculative-decoding ops: importable names that refuse to run.

SGLang imports these at module import time on CPU (``kernels/ops/speculative/*``),
so the names must exist; the shim does not implement speculative decoding, and a
silent wrong answer would be worse than a clear failure.
"""

from collections.abc import Callable
from typing import NoReturn


def _unsupported(op_name: str) -> Callable[..., NoReturn]:
    def op(*args: object, **kwargs: object) -> NoReturn:
        raise NotImplementedError(
            f"sgl_kernel.{op_name} is a speculative-decoding op that the CPU "
            "compatibility shim (sgl-kernel-cpu-compat) does not implement; serve "
            "without speculative decoding or install a CPU build of sgl-kernel."
        )

    op.__name__ = op.__qualname__ = op_name
    return op


assign_draft_cache_locs_contiguous_cpu = _unsupported("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _unsupported("assign_extend_cache_locs_cpu")
build_tree_kernel_efficient_cpu = _unsupported("build_tree_kernel_efficient_cpu")
fill_accept_out_cache_loc_cpu = _unsupported("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _unsupported("fill_bonus_tokens_cpu")
reconstruct_indices_from_tree_mask = _unsupported("speculative.reconstruct_indices_from_tree_mask")
rotate_input_ids_cpu = _unsupported("rotate_input_ids_cpu")
verify_tree_greedy_cpu = _unsupported("verify_tree_greedy_cpu")

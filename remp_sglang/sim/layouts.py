"""The candidate layouts of a device count, with what each replica holds: the same memory
rule the server uses (`memory.kv_capacity`), so the simulated capacities are the ones a
server on that hardware would report.

A rank's budget is `--mem-fraction-static` (0.9) of its device's memory, the same at every
layout; a layout whose weights alone exceed it on some rank is not a candidate.
"""

from __future__ import annotations

from remp_sglang import memory
from remp_sglang.perf import Hardware
from remp_sglang.policy import Candidate
from remp_sglang.topology import Topology, layouts

from .hardware import MEM_FRACTION_STATIC
from .models import SimModel

MAX_RUNNING = 256  # requests one replica decodes at once (Candidate's default)


def max_input(capacity: int, context_len: int) -> int:
    """The longest prompt a replica admits, as SGLang 0.5.23 derives it:
    max_req_len = min(context_len - 1, pool - 1); max_req_input_len = max_req_len - 5."""
    return min(context_len - 1, capacity - 1) - 5


def candidate(model: SimModel, hw: Hardware, topo: Topology) -> Candidate | None:
    """`topo` as a policy candidate on `hw`, or None when its weights do not fit."""
    budget = int(hw.memory_bytes * MEM_FRACTION_STATIC)
    shape = model.decoder.shape
    try:
        topo.check_model(shape)
        cap = memory.kv_capacity([budget] * topo.world_size, model.decoder, shape, topo,
                                 shape.dtype_bytes)
    except ValueError:
        return None
    if cap < 1:
        return None
    return Candidate(topo, cap, max_input(cap, model.context_len), MAX_RUNNING)


def candidates(model: SimModel, hw: Hardware, world: int) -> list[Candidate]:
    """Every layout of exactly `world` devices (dp x tp x pp == world) whose weights fit."""
    out = []
    for topo in layouts(world, model.decoder.shape, replicas=True):
        if topo.num_active == world:
            c = candidate(model, hw, topo)
            if c is not None:
                out.append(c)
    return out

"""SGLang's worlds, made once per replica shape at launch and kept: a reshape parks the
old world and resumes the new one, with no rendezvous and no group built or destroyed
in the pause.

A world is what `init_parallel_runtime` builds for one replica: torch's default process
group over the replica's ranks and SGLang's group coordinators over it (world, TP, PP,
attention TP/CP, MoE...), plus the ranks and handles SGLang stamps on its parallel
context. It depends only on (tp, pp, first launch rank of the replica), so layouts share
worlds (TP1 parked and DP2's first replica are one world). Building one in the pause cost
10-80 ms on CPU and destroying one (gloo groups are destroyed one by one) about 86 ms of
a ~200 ms downtime; both now happen at launch, once (`prepare`), for every layout the
server may take.

The swap is of process-wide state: torch's default group (`_update_default_pg`, which
also sets c10d's global rank) and its default-name counter, SGLang's coordinator globals
in `parallel_state`, its init guard, and the parallel context's stamp. Group names stay
unique per process because each world counts its groups from its own base. Device
communicators (NCCL, custom all-reduce) of parked worlds stay alive: a bounded set,
reused rather than rebuilt; their device memory on a GPU is untested here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from remp_sglang.topology import Topology

logger = logging.getLogger("sglang.srt.remp")

WorldKey = tuple[int, int, int]  # (tp, pp, first launch rank of the replica)
GROUP_COUNT_BASE = 1000  # group names of prepared world i start at (i + 1) * this


def world_key(topo: Topology, rank: int) -> WorldKey:
    """The world `rank` serves in under `topo` (it must be active there)."""
    return topo.tp, topo.pp, topo.replica_ranks(topo.replica(rank)).start


def world_keys(topos: list[Topology]) -> list[WorldKey]:
    """Every world the layouts need on any rank, in the one order all ranks build them
    (a rank builds those it belongs to: a total order over subsets cannot deadlock)."""
    return sorted({(t.tp, t.pp, t.replica_ranks(r).start) for t in topos
                   for r in range(t.dp)})


def members(key: WorldKey) -> range:
    tp, pp, first = key
    return range(first, first + tp * pp)


@dataclass
class World:
    """A world's process-wide state, kept while another world serves."""

    key: WorldKey
    port: int
    default_pg: Any = None
    backend: Any = None
    init_method: Any = None
    group_count: int = 0
    coordinators: dict[str, Any] = field(default_factory=dict)
    timeout: Any = None
    stamp: dict[str, Any] = field(default_factory=dict)


@dataclass
class Worlds:
    """This process's worlds: the live one and the parked ones."""

    worlds: dict[WorldKey, World] = field(default_factory=dict)
    live: WorldKey | None = None

    def adopt(self, key: WorldKey, port: int) -> None:
        """Record the world SGLang built (the launch world, or one `build` just made)."""
        self.worlds[key] = World(key, port)
        self.live = key

    def park(self) -> None:
        """Take the live world off the process (its groups stay, unused)."""
        if self.live is None:
            return
        _capture(self.worlds[self.live])
        _clear()
        self.live = None

    def resume(self, key: WorldKey) -> World:
        """Put a parked world back on the process; KeyError if none was prepared."""
        world = self.worlds[key]
        self.park()
        _restore(world)
        self.live = key
        return world


def _capture(world: World) -> None:
    import torch.distributed.distributed_c10d as c10d
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import get_parallel

    world.default_pg = c10d._world.default_pg
    world.backend, world.init_method = c10d._backend, c10d._default_pg_init_method
    world.group_count = c10d._world.group_count
    world.coordinators = {name: value for name, value in vars(parallel_state).items()
                          if isinstance(value, parallel_state.GroupCoordinator)}
    world.timeout = parallel_state._MODEL_PARALLEL_GROUP_TIMEOUT
    world.stamp = dict(get_parallel()._stamp)


def _clear() -> None:
    import torch.distributed.distributed_c10d as c10d
    from sglang.srt.distributed import bootstrap, parallel_state
    from sglang.srt.runtime_context import get_parallel

    c10d._update_default_pg(None)
    c10d._world.group_count = 0
    for name, value in list(vars(parallel_state).items()):
        if isinstance(value, parallel_state.GroupCoordinator):
            setattr(parallel_state, name, None)
    parallel_state._MODEL_PARALLEL_GROUP_TIMEOUT = None
    bootstrap.reset_parallel_initialised()
    get_parallel().clear_stamp()


def _restore(world: World) -> None:
    import torch.distributed.distributed_c10d as c10d
    from sglang.srt.distributed import bootstrap, parallel_state
    from sglang.srt.runtime_context import get_parallel

    c10d._update_default_pg(world.default_pg)
    c10d._backend, c10d._default_pg_init_method = world.backend, world.init_method
    c10d._world.group_count = world.group_count
    for name, value in world.coordinators.items():
        setattr(parallel_state, name, value)
    parallel_state._MODEL_PARALLEL_GROUP_TIMEOUT = world.timeout
    bootstrap._PARALLEL_INITIALISED = True
    parallel = get_parallel()
    parallel.clear_stamp()
    parallel._stamp.update(world.stamp)


def build(sched: Any, launch_rank: int, key: WorldKey, port: int, group_base: int) -> None:
    """SGLang's world `key` on `port`, built in this process (the live world must be
    parked): the ranks stamped as SGLang's data-parallel controller would for the
    replica, then SGLang's own `init_parallel_runtime`."""
    import torch.distributed.distributed_c10d as c10d
    from sglang.srt.distributed import bootstrap
    from sglang.srt.runtime_context import derive_spawn_ranks, get_parallel

    tp, pp, first = key
    rank = launch_rank - first  # inside its replica
    ranks = derive_spawn_ranks(world_rank=rank, tp_size=tp, ep_join_rank_offset=0,
                               attn_cp_size=1, attn_tp_size=tp, moe_dp_size=1, moe_ep_size=1)
    # A process keeps its launch replica's index: SGLang's load snapshots and the
    # controller's workers are numbered by it (a head is a launch replica's first rank).
    launch_dp = sched._remp.launch.dp
    dp_rank = launch_rank // sched._remp.launch.replica_size if launch_dp > 1 else None
    ranks.update(tp_size=tp, pp_size=pp, attn_tp_size=tp, moe_tp_size=tp,
                 attn_tp_rank=ranks["tp_rank"], attn_dp_rank=0, attn_dcp_rank=0,
                 dp_rank=dp_rank, launch_world_rank=rank)
    get_parallel().override_permanently(**ranks)
    configure(sched, tp, pp, port)
    c10d._world.group_count = group_base
    bootstrap.init_parallel_runtime(server_args=sched.server_args,
                                    device=sched.server_args.device, dist_port=port)


def configure(sched: Any, tp: int, pp: int, port: int) -> None:
    """The launch settings SGLang derives from tp and pp, as it resolves a launch: PP
    runs without the overlap scheduler; micro-batches default to an even share of the
    running requests."""
    from sglang.srt.runtime_context import get_context

    overlap = sched._remp.launch_overlap and pp == 1
    get_context().override(
        "remp.reshape", tp_size=tp, pp_size=pp, disable_overlap_schedule=not overlap,
        pp_max_micro_batch_size=max(sched.max_running_requests // pp, 1),
    )
    sched.enable_overlap = overlap
    sched.nccl_port = port


def enter(sched: Any, worlds: Worlds, key: WorldKey) -> None:
    """Serve in world `key` (prepared at launch): SGLang's settings for its shape, its
    groups, and the per-layer buffers SGLang sizes from the model and the groups."""
    from sglang.srt.distributed import bootstrap

    tp, pp, _ = key
    world = worlds.worlds[key]
    configure(sched, tp, pp, world.port)
    worlds.resume(key)
    bootstrap.init_layer_runtime(model_config=sched.model_config)


def prepare(sched: Any, worlds: Worlds, launch_rank: int, live: WorldKey,
            keys: list[WorldKey], ports: list[int]) -> float:
    """Build, at launch, every world in `keys` this rank belongs to (the same order on
    every rank; each rendezvous is bounded by SGLang's own launch timeout), then serve in
    `live` again. Returns the seconds it took."""
    t0 = time.perf_counter()
    for index, (key, port) in enumerate(zip(keys, ports, strict=True)):
        if key in worlds.worlds or launch_rank not in members(key):
            continue
        worlds.park()
        build(sched, launch_rank, key, port, (index + 1) * GROUP_COUNT_BASE)
        worlds.adopt(key, port)
    enter(sched, worlds, live)
    return time.perf_counter() - t0

"""Control messages between the HTTP process and the scheduler processes.

They are msgspec structs deriving from SGLang's ``BaseReq`` so that they travel over the
same ZMQ sockets as SGLang's own control requests (the class name is the msgspec tag).
Every process that decodes them must call ``register_message_types()`` once (the main
process decodes replies, scheduler rank zero decodes requests; the other ranks receive
them pickled through the TP broadcast, which only needs this module to be importable).

This module imports SGLang at import time: import it only inside SGLang processes.
"""

from __future__ import annotations

import msgspec
from sglang.srt.managers.io_struct import BaseReq, hook_custom_types


class RempTopologyReqInput(BaseReq, kw_only=True):
    """Ask scheduler rank zero for the live parallel layout."""


class RempTopologyReqOutput(BaseReq, kw_only=True):
    """The live parallel layout as the schedulers see it."""

    tp: int = 0
    pp: int = 0
    dp: int = 1
    world_size: int = 0
    active_ranks: list[int] = msgspec.field(default_factory=list)
    state: str = "unknown"
    kv_capacity_tokens: int = 0
    launch_tp: int = 0
    launch_pp: int = 0
    launch_dp: int = 1
    launch_world_size: int = 0
    initial_tp: int | None = None
    initial_pp: int | None = None
    threads: int = 0  # rank zero's torch threads and cores (thread binding follows layout)
    cpus: list[int] = msgspec.field(default_factory=list)
    process_groups: int = 0  # rank zero's live torch.distributed groups (leak checks)
    python_threads: int = 0
    error: str | None = None


MESSAGE_TYPES = (RempTopologyReqInput, RempTopologyReqOutput)

_registered = False


def register_message_types() -> None:
    """Make SGLang's msgpack decoder in this process accept the REMP message types."""
    global _registered
    if not _registered:
        hook_custom_types(*MESSAGE_TYPES)
        _registered = True


class RempReshapeReqInput(BaseReq, kw_only=True):
    """Switch the live layout to (dp, tp, pp) (its worlds were prepared at launch); every
    rank gives up by deadline."""

    tp: int = 0
    pp: int = 0
    dp: int = 1
    heads: list[int] = msgspec.field(default_factory=list)  # launch replicas to reach
    deadline: float = 0.0  # wall clock
    nonce: str = ""  # the reply carries it back: only its own caller takes it
    # "": reshape now; "precopy": copy to the joining ranks while serving (answered once
    # done); "after_precopy": the reshape that uses that copy (`precopy`)
    phase: str = ""


class RempReshapeReqOutput(BaseReq, kw_only=True):
    """Rank zero's report (JSON) once the new layout serves, or why it did not happen."""

    report_json: str = "{}"
    error: str | None = None
    status: int = 200
    nonce: str = ""


MESSAGE_TYPES = MESSAGE_TYPES + (RempReshapeReqInput, RempReshapeReqOutput)


class RempKVDigestReqInput(BaseReq, kw_only=True):
    """Test hook: every active rank hashes its live KV rows into the control store."""

    nonce: str = ""


class RempKVDigestReqOutput(BaseReq, kw_only=True):
    ranks: list[int] = msgspec.field(default_factory=list)  # whose digests to collect
    error: str | None = None


MESSAGE_TYPES = MESSAGE_TYPES + (RempKVDigestReqInput, RempKVDigestReqOutput)


class RempPlanReqInput(BaseReq, kw_only=True):
    """A reshape's dry run: what switching to (dp, tp, pp) would move, evict and refuse."""

    tp: int = 0
    pp: int = 0
    dp: int = 1


class RempPlanReqOutput(BaseReq, kw_only=True):
    report_json: str = "{}"
    error: str | None = None


MESSAGE_TYPES = MESSAGE_TYPES + (RempPlanReqInput, RempPlanReqOutput)


class RempReplicasReq(BaseReq, kw_only=True):
    """To the data-parallel controller: feed requests to these launch replicas only."""

    workers: list[int] = msgspec.field(default_factory=list)


MESSAGE_TYPES = MESSAGE_TYPES + (RempReplicasReq,)


class RempLoadReqInput(BaseReq, kw_only=True):
    """The automatic policy's poll: each replica's head reports its load statistics."""


class RempLoadReqOutput(BaseReq, kw_only=True):
    stats_json: str = "{}"  # `load_stats.snapshot`
    error: str | None = None


MESSAGE_TYPES = MESSAGE_TYPES + (RempLoadReqInput, RempLoadReqOutput)

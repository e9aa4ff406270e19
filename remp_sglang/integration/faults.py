"""Fault injection for tests: make one step of a reshape fail on one rank.

Off unless the environment variable ``REMP_FAULT_INJECT`` is set when the server starts
(never in production). Its value names faults as ``step:rank:kind[:seconds]`` (several
separated by commas), or is ``@PATH``: a file holding such a spec, read again at every
step, so one test server can fail a different step on each reshape (an empty file
injects nothing).

Kinds: ``raise`` (an exception), ``freeze`` (the rank stops answering: no heartbeat for
`seconds`, default three stall bounds, then it carries on), ``timeout`` (the rank keeps
beating but sleeps past the reshape's deadline), ``delay`` (sleeps `seconds` while
beating, then carries on: a slow but healthy step).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

ENV_FAULT = "REMP_FAULT_INJECT"
STEPS = ("precopy", "prepare", "transfer", "teardown", "world", "model", "cache_import",
         "rebind")
KINDS = ("raise", "freeze", "timeout", "delay")


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


@dataclass(frozen=True)
class Fault:
    step: str
    rank: int
    kind: str
    seconds: float | None = None


def parse(spec: str) -> list[Fault]:
    """`step:rank:kind[:seconds],...` -> faults; ValueError naming what is wrong."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        if len(parts) not in (3, 4) or parts[0] not in STEPS or parts[2] not in KINDS:
            raise ValueError(f"{ENV_FAULT}: {entry!r} is not step:rank:kind[:seconds] with "
                             f"step in {STEPS} and kind in {KINDS}")
        out.append(Fault(parts[0], int(parts[1]), parts[2],
                         float(parts[3]) if len(parts) == 4 else None))
    return out


def active_faults(environ: Any = None) -> list[Fault]:
    spec = (os.environ if environ is None else environ).get(ENV_FAULT, "")
    if spec.startswith("@"):
        try:
            with open(spec[1:]) as handle:
                spec = handle.read()
        except FileNotFoundError:
            return []
    return parse(spec) if spec else []


def fault_point(ctrl: Any, rank: int, step: str) -> None:
    """Called by the reshape at each step on each rank; does nothing unless asked."""
    if ENV_FAULT not in os.environ:
        return
    for fault in active_faults():
        if fault.step != step or fault.rank != rank:
            continue
        if fault.kind == "raise":
            raise InjectedFault(f"injected fault at step {step!r} on rank {rank}")
        if fault.kind == "freeze":
            ctrl.freeze(fault.seconds if fault.seconds is not None else 3 * ctrl.stall_s)
        elif fault.kind == "timeout":
            left = (ctrl.deadline or time.time()) - time.time()
            time.sleep(max(0.0, left) + (fault.seconds or 1.0))
        elif fault.kind == "delay":
            time.sleep(fault.seconds or 1.0)

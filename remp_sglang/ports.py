"""Ports that a process binds some time after they were chosen.

A port found free by binding port 0 lies in the kernel's ephemeral range, which every
outgoing connection also draws its source port from: between the choice and the bind,
a gloo pair or a store client may take it (a launch once failed with EADDRINUSE on a
rendezvous port picked that way). So ports are drawn at random from below that range,
as SGLang draws its own, and from a span SGLang's draws (22000-29999) do not use.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Collection

LOW, HIGH = 10000, 21999


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(port: int) -> bool:
    """Whether a listening socket could take `port` on every IPv4 address now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(count: int, taken: Collection[int] = (), *, low: int = LOW, high: int = HIGH,
               rng: random.Random | None = None,
               check: Callable[[int], bool] = bindable) -> list[int]:
    """`count` distinct ports, bindable now, below the ephemeral range and outside
    `taken` (ports the server binds later, such as SGLang's HTTP port)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    high = min(high, ephemeral_low() - 1)
    pool = [p for p in range(low, high + 1) if p not in set(taken)]
    out: list[int] = []
    for port in (rng or random.SystemRandom()).sample(pool, len(pool)):
        if len(out) == count:
            break
        if check(port):
            out.append(port)
    if len(out) < count:
        raise RuntimeError(f"only {len(out)} of {count} ports free in {low}-{high}")
    return out


def free_port(taken: Collection[int] = ()) -> int:
    """One port as `free_ports` chooses them."""
    return free_ports(1, taken)[0]

"""Ports chosen now and bound later (`remp_sglang.ports`)."""

from __future__ import annotations

import random
import socket

import pytest

from remp_sglang import ports


def test_ports_lie_below_the_ephemeral_range_and_avoid_the_taken_ones():
    """A rendezvous port once came from the ephemeral range (bind to port 0); an
    outgoing connection took it before the store bound it, and the launch failed with
    EADDRINUSE. A taken port (SGLang's HTTP port, bound later) is never offered."""
    taken = set(range(ports.LOW, ports.LOW + 50))
    got = ports.free_ports(40, taken, rng=random.Random(0))
    assert len(set(got)) == 40
    assert all(ports.LOW <= p < min(ports.HIGH + 1, ports.ephemeral_low()) for p in got)
    assert not set(got) & taken


def test_a_port_in_use_is_skipped():
    busy = ports.free_port()
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", busy))
        sock.listen()
        assert not ports.bindable(busy)
        got = ports.free_ports(2, low=busy, high=busy + 2, rng=random.Random(1))
    assert busy not in got


def test_too_few_ports_is_an_error_naming_the_span():
    with pytest.raises(RuntimeError, match="only 1 of 2 ports"):
        ports.free_ports(2, low=20000, high=20000, check=lambda p: True)
    with pytest.raises(ValueError, match="count"):
        ports.free_ports(-1)

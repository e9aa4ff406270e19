"""The migration plane's agreement and waits (3 processes, gloo over a TCP store).

Rank zero alone decides; a failed vote, a peer whose heartbeat stops, or the deadline
aborts the step on every rank alike, and a given-up transfer leaves a group that is
renewed before the next use.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch

from remp_sglang.comm import Communicator, MigrationError
from remp_sglang.ports import free_port

WORLD = 3




def _rank(rank: int, port: int, errors, results) -> None:
    try:
        comm = Communicator.gloo("127.0.0.1", port, rank, WORLD, timeout_s=20)
        comm.stall_s = 1.0
        out = {}
        # 1. everyone agrees: every rank gets every rank's info
        comm.begin(1, time.time() + 20)
        out["ok"] = comm.agree(None, "step one", info=rank * 10)
        # rank zero's cache state reaches every rank through the group, not the store
        payload = bytes(range(256)) * 4096
        out["bcast"] = comm.broadcast_bytes(payload if rank == 0 else None) == payload
        out["empty"] = comm.broadcast_bytes(b"" if rank == 0 else None) == b""
        # 2. one rank fails: all raise, naming it
        try:
            comm.agree(RuntimeError("boom") if rank == 2 else None, "step two")
        except MigrationError as error:
            out["fail"] = str(error)
        # 3. a frozen peer: rank zero gives up on it; it learns the outcome on waking
        if rank == 1:
            comm.freeze(3.0)
        t = time.monotonic()
        try:
            comm.agree(None, "step three")
            out["frozen"] = "committed"
        except MigrationError as error:
            out["frozen"] = str(error)
        out["frozen_s"] = time.monotonic() - t
        comm.agree(None, "in step again", patient=True)  # waits for the frozen rank
        comm.end()
        # 4. the deadline: rank zero aborts when it passes, a slow but beating rank too
        comm.begin(2, time.time() + 1.5)
        if rank == 2:
            time.sleep(2.5)
        try:
            comm.agree(None, "step four")
            out["late"] = "committed"
        except MigrationError as error:
            out["late"] = str(error)
        comm.end()
        # 5. a transfer to a peer that stops answering is given up; the group is renewed
        comm.begin(3, time.time() + 20)
        buf = torch.zeros(4)
        if rank == 0:
            try:
                comm.wait(comm.exchange({}, {1: buf}, tag=comm.next_tag()))
                out["wait"] = "completed"
            except MigrationError as error:
                out["wait"] = str(error)
        elif rank == 1:
            comm.freeze(3.0)  # never sends
        comm.end()
        comm.dirty = True  # the server marks every rank after an aborted reshape
        comm.begin(4, time.time() + 20)
        assert not comm.dirty
        data = torch.full((4,), float(rank))
        if rank in (0, 1):
            peer = 1 - rank
            recv = torch.empty(4)
            comm.wait(comm.exchange({peer: data}, {peer: recv}, tag=comm.next_tag()))
            out["after_renew"] = recv.tolist()
        out["final"] = comm.agree(None, "after", info="fine")
        comm.end()
        results.put((rank, out))
        comm.close()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
    # A given-up wait leaves a thread blocked in gloo: leave without interpreter teardown.
    time.sleep(0.5)
    os._exit(0)


def test_agreement_is_decided_by_rank_zero_and_bounded() -> None:
    ctx = mp.get_context("spawn")
    errors, results = ctx.Queue(), ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, errors, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    outs = {}
    deadline = time.monotonic() + 120
    while len(outs) < WORLD and time.monotonic() < deadline:
        if not errors.empty():
            rank, tb = errors.get()
            pytest.fail(f"rank {rank}:\n{tb}")
        if not results.empty():
            rank, out = results.get()
            outs[rank] = out
        time.sleep(0.05)
    for p in procs:
        p.join(30)
    assert len(outs) == WORLD, outs
    for rank, out in outs.items():
        assert out["ok"] == [0, 10, 20]
        assert out["bcast"] and out["empty"]
        assert "rank 2" in out["fail"] and "boom" in out["fail"]
        # the frozen rank is not waited for past the stall bound, and all abort alike
        assert "stopped answering" in out["frozen"], (rank, out)
        assert "timed out" in out["late"] or "rank 2" in out["late"], (rank, out)
        assert out["final"] == ["fine"] * WORLD
    assert outs[0]["frozen_s"] < 2.9  # decided on the stall, not after the freeze
    assert "stopped answering" in outs[0]["wait"]
    assert outs[0]["after_renew"] == [1.0] * 4 and outs[1]["after_renew"] == [0.0] * 4


def test_data_moves_on_its_device() -> None:
    """Host tensors go through the gloo group itself; CUDA tensors through NCCL (never a
    host round trip); anything else is refused by name."""
    from remp_sglang.comm import transport_for

    assert transport_for(torch.device("cpu")) == "gloo"
    assert transport_for(torch.device("cuda", 1)) == "nccl"
    with pytest.raises(ValueError, match="meta"):
        transport_for(torch.device("meta"))
    comm = Communicator.gloo("127.0.0.1", free_port(), 0, 1, timeout_s=10)
    try:
        assert comm.data_group(torch.device("cpu")) is comm.pg
        assert comm.exchange({}, {}, tag=comm.next_tag()) == []
    finally:
        comm.close()


def _nccl_rank(rank: int, port: int, errors, results) -> None:
    try:
        torch.cuda.set_device(rank)
        comm = Communicator.gloo("127.0.0.1", port, rank, 2, timeout_s=60)
        comm.begin(1, time.time() + 60)
        dev = torch.device("cuda", rank)
        send = torch.full((1 << 20,), rank + 1, dtype=torch.uint8, device=dev)
        recv = torch.empty_like(send)
        comm.wait(comm.exchange({1 - rank: send}, {1 - rank: recv}, tag=comm.next_tag()))
        results.put((rank, int(recv.float().mean().item()),
                     comm.data_group(dev) is not comm.pg))
        comm.end()
        comm.close()
    except BaseException:
        errors.put((rank, traceback.format_exc()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL p2p needs two GPUs")
def test_cuda_exchange_goes_through_nccl() -> None:
    ctx = mp.get_context("spawn")
    errors, results = ctx.Queue(), ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_nccl_rank, args=(r, port, errors, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert errors.empty(), errors.get()
    got = dict((r, (v, nccl)) for r, v, nccl in (results.get() for _ in range(2)))
    assert got == {0: (2, True), 1: (1, True)}

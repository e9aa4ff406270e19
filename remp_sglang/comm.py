"""The migration plane: point-to-point exchange and agreement over one process group.

The group spans every launched rank (parked ones too) and must outlive the serving
world, which SGLang destroys and re-creates on a reshape; so it is a plain torch
ProcessGroup used through its low-level send/recv/allreduce (no registration in
torch.distributed's default-group machinery needed). Every wait is bounded.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class MigrationError(RuntimeError):
    """A reshape step failed on some rank; the old pools and weights are untouched."""


@dataclass
class Communicator:
    pg: dist.ProcessGroup
    timeout_s: float = 60.0
    store: dist.Store | None = None  # held so the rendezvous outlives no group using it
    _tag: int = field(default=1000, repr=False)

    @property
    def rank(self) -> int:
        return self.pg.rank()

    @property
    def world_size(self) -> int:
        return self.pg.size()

    @classmethod
    def gloo(
        cls, host: str, port: int, rank: int, world_size: int, timeout_s: float = 60.0,
        prefix: str = "remp",
    ) -> Communicator:
        """A gloo group over a fresh TCP store (rank 0 hosts it)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world_size, timeout)
        return cls(pg, timeout_s, store)

    def barrier(self) -> None:
        """Bounded barrier: returns once every rank got here, raises after the timeout."""
        work = self.pg.allreduce([torch.zeros(1)])
        work.wait(datetime.timedelta(seconds=self.timeout_s))

    def close(self) -> None:
        """Orderly end: every rank stops its group's threads, and the rank hosting the
        store leaves last (gloo aborts a process whose peer's store vanished under it)."""
        try:
            self.barrier()
        except RuntimeError:  # a failed transfer may have closed the pairs already
            pass
        self.pg.shutdown()
        if self.store is None:
            return
        self.store.add("closed", 1)
        deadline = time.monotonic() + self.timeout_s
        while self.rank == 0 and self.store.add("closed", 0) < self.world_size:
            if time.monotonic() > deadline:
                raise MigrationError("peers did not close the group in time")
            time.sleep(0.01)

    def next_tag(self) -> int:
        """Tags keep a late message of an aborted step from matching a later step."""
        self._tag += 1
        return self._tag

    def exchange(
        self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], tag: int
    ) -> list:
        """Post every send and receive at once; per pair the lower rank sends first."""
        works = []
        for peer in sorted(set(sends) | set(recvs)):
            ops = [("send", sends.get(peer)), ("recv", recvs.get(peer))]
            if self.rank > peer:
                ops.reverse()
            for kind, tensor in ops:
                if tensor is None or tensor.numel() == 0:
                    continue
                if kind == "send":
                    works.append(self.pg.send([tensor], peer, tag))
                else:
                    works.append(self.pg.recv([tensor], peer, tag))
        return works

    def wait(self, works: list, deadline: float) -> None:
        for work in works:
            left = max(0.001, deadline - time.monotonic())
            work.wait(datetime.timedelta(seconds=left))

    def agree(self, error: BaseException | None, step: str) -> None:
        """All ranks learn whether any rank failed `step`; every rank raises if one did.

        A rank that cannot reach agreement within the timeout raises too, so no rank
        commits unless all reached this point without an error.
        """
        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = 0 if error is None else 1
        mine = f" (rank {self.rank}: {error})" if error is not None else ""
        try:
            # Peers of a failed rank may sit in a transfer wait for up to timeout_s first.
            work = self.pg.allreduce([flags])
            work.wait(datetime.timedelta(seconds=2 * self.timeout_s))
        except Exception as exc:
            raise MigrationError(f"{step}: no agreement among ranks{mine}: {exc}") from (
                error or exc
            )
        failed = [r for r in range(self.world_size) if flags[r]]
        if error is not None:
            raise MigrationError(f"{step} failed on rank {self.rank}: {error}") from error
        if failed:
            raise MigrationError(f"{step} failed on rank(s) {failed}; nothing was committed")

"""The migration plane: point-to-point exchange and agreement over one process group.

The group spans every launched rank (parked ones too) and must outlive the serving
world, which SGLang destroys and re-creates on a reshape; so it is a plain torch
ProcessGroup used through its low-level send/recv (no registration in
torch.distributed's default-group machinery needed).

Data moves on the device that holds it (`transport_for`): host tensors through the
gloo group, CUDA tensors through an NCCL group over the same ranks and store, made on
the first CUDA transfer and kept across SGLang's world rebuilds (gloo has no CUDA
send/recv, and a host round trip would double the bytes on the PCIe link). Control
(votes, state broadcast, heartbeats) always stays on gloo and the store.

Agreement does not use the group: each rank writes a vote into the store, rank zero
alone decides (commit or abort) and writes the decision, every rank follows it. A
decision is one key written once, so no rank commits while another aborts. Waits are
bounded by the reshape's deadline; while a reshape runs every rank's heartbeat thread
bumps a counter in the store, and a peer whose counter stops moving for `stall_s` is
declared lost (a slow peer that still beats is waited for, up to the deadline).
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


def transport_for(device: torch.device) -> str:
    """The backend that moves tensors on `device` without leaving it."""
    if device.type == "cpu":
        return "gloo"
    if device.type == "cuda":
        return "nccl"
    raise ValueError(f"device {device}: the migration plane moves cpu and cuda tensors only")


@dataclass(frozen=True)
class DeviceRound:
    """One coalesced NCCL round of sends and receives (polled, see `Communicator.wait`)."""

    work: Any


class MigrationError(RuntimeError):
    """A reshape step failed on some rank; the old pools and weights are untouched.
    `failed_step`: where the first failing rank was, when it said so in its vote."""

    failed_step: str | None = None


@dataclass
class Heartbeat:
    """A thread that bumps `hb/<rank>` in the store while a reshape runs."""

    store: Any
    rank: int
    interval_s: float
    paused: bool = False  # fault injection: a frozen rank stops beating
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="remp-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        key = f"hb/{self.rank}"
        while not self._stop.wait(self.interval_s):
            if not self.paused:
                self.store.add(key, 1)


@dataclass
class Communicator:
    pg: dist.ProcessGroup
    timeout_s: float = 60.0  # bound of any wait when no reshape deadline is set
    store: Any = None  # votes, decisions and heartbeats; outlives every group
    stall_s: float = 30.0  # a peer whose heartbeat does not move this long is lost
    deadline: float | None = None  # wall clock (time.time()) bound of the current reshape
    _tag: int = field(default=1000, repr=False)
    _round: int = field(default=0, repr=False)
    _heartbeat: Heartbeat | None = field(default=None, repr=False)
    _seen: dict[int, tuple[int, float]] = field(default_factory=dict, repr=False)
    _epoch: int = field(default=0, repr=False)
    _phase: str = field(default="", repr=False)
    dirty: bool = False  # a wait was given up on: renew the group before the next use
    patient: bool = False  # a rollback: wait for a silent peer until the deadline
    _generation: int = field(default=0, repr=False)
    _retired: list = field(default_factory=list, repr=False)
    _nccl: Any = field(default=None, repr=False)  # the CUDA data group, once made

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
        """A gloo group over a fresh TCP store (rank 0 hosts it; tests and benchmarks)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        return cls(_gloo_group(store, prefix, rank, world_size, timeout_s), timeout_s, store)

    @classmethod
    def private(cls, path: str, rank: int, world_size: int, timeout_s: float,
                stall_s: float) -> Communicator:
        """A gloo group over a FileStore at `path` (in a directory only this user can
        open) whose pairs listen on loopback only: the plane opens no port that
        anything outside the server's own processes could use."""
        store = dist.FileStore(path, -1)
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
        pg = _gloo_group(store, "remp", rank, world_size, timeout_s)
        return cls(pg, timeout_s, store, stall_s)

    # ---------------------------------------------------------------------- a reshape
    def begin(self, epoch: int, deadline: float, phase: str = "") -> None:
        """Start a reshape: bound every wait by `deadline`, beat, align tags and rounds.

        Tags and rounds restart from the epoch, so a rank that left an aborted reshape
        early is in step with its peers again, and no late message of that reshape can
        match one of this. A `phase` (the pre-copy before a reshape's pause) has tags and
        agreement keys of its own."""
        self.deadline = deadline
        self._tag = (epoch << 16) | (0x4000 if phase else 0)
        self._round, self._epoch, self._phase = 0, epoch, phase
        if self.dirty:
            self.renew()
        now = time.monotonic()
        self._seen = {r: (-1, now) for r in range(self.world_size)}
        if self.store is not None:
            if self._heartbeat is None:
                self._heartbeat = Heartbeat(self.store, self.rank, min(0.25, self.stall_s / 8))
            self._heartbeat.paused = False
            self._heartbeat.start()

    def end(self) -> None:
        self.deadline = None
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def freeze(self, seconds: float) -> None:
        """Fault injection: behave like a rank that stopped answering for `seconds`."""
        if self._heartbeat is not None:
            self._heartbeat.paused = True
        time.sleep(seconds)
        if self._heartbeat is not None:
            self._heartbeat.paused = False

    def stalled_peers(self) -> list[int]:
        """Peers whose heartbeat has not moved for `stall_s` (none without heartbeats)."""
        if self._heartbeat is None or self._heartbeat._thread is None:
            return []
        now, out = time.monotonic(), []
        values = self.store.multi_get([f"hb/{r}" for r in range(self.world_size)]) \
            if all(self.store.check([f"hb/{r}"]) for r in range(self.world_size)) else None
        for r in range(self.world_size):
            if r == self.rank:
                continue
            value = int(values[r]) if values is not None else -1
            last, since = self._seen.get(r, (-1, now))
            if value != last:
                self._seen[r] = (value, now)
            elif now - since > self.stall_s:
                out.append(r)
        return out

    def _bound(self) -> float:
        """Wall-clock time by which the current wait must end."""
        return self.deadline if self.deadline is not None else time.time() + self.timeout_s

    # ---------------------------------------------------------------------- transfers
    def confirm(self, step: str) -> None:
        """A quick agreement inside a step, between ranks that all succeeded so far: one
        sum on the group, waited for under the same bounds as a transfer (a rank that
        failed votes in the store instead, which ends this wait). Raises if it cannot
        finish; the step's closing `agree` then settles it through the store."""
        try:
            self.wait([self.pg.allreduce([torch.zeros(1, dtype=torch.int32)])])
        except RuntimeError as exc:
            raise MigrationError(f"{step}: {exc}") from exc

    def barrier(self) -> None:
        """Bounded barrier: returns once every rank got here, raises after the timeout."""
        work = self.pg.allreduce([torch.zeros(1)])
        work.wait(datetime.timedelta(seconds=self.timeout_s))

    def close(self) -> None:
        """Orderly end: every rank stops its group's threads, and the rank hosting the
        store leaves last (gloo aborts a process whose peer's store vanished under it)."""
        self.end()
        try:
            self.barrier()
        except RuntimeError:  # a failed transfer may have closed the pairs already
            pass
        self.pg.shutdown()
        if self._nccl is not None:
            self._nccl.shutdown()
            self._nccl = None
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

    def data_group(self, device: torch.device) -> dist.ProcessGroup:
        """The group that moves tensors on `device` (see `transport_for`)."""
        if transport_for(device) == "gloo":
            return self.pg
        if self._nccl is None:
            self._nccl = _nccl_group(self.store, f"remp-nccl-{self._generation}", self.rank,
                                     self.world_size, self.timeout_s, device)
        return self._nccl

    def exchange(
        self, sends: dict[int, torch.Tensor | list[torch.Tensor]],
        recvs: dict[int, torch.Tensor | list[torch.Tensor]], tag: int
    ) -> list:
        """Post every send and receive at once (a peer's list in order: messages of one
        tag between a pair match in the order they are posted); per pair the lower rank
        sends first. On NCCL the round is one coalesced group call (NCCL ignores tags
        and would otherwise serialise the pairs on its stream)."""
        sends, recvs = _lists(sends), _lists(recvs)
        tensors = [t for ts in (*sends.values(), *recvs.values()) for t in ts]
        if not tensors:
            return []
        device = tensors[0].device
        pg = self.data_group(device)
        nccl = transport_for(device) == "nccl"
        if nccl:
            pg._start_coalescing(device)
        works = []
        for peer in sorted(set(sends) | set(recvs)):
            ops = [("send", sends.get(peer, [])), ("recv", recvs.get(peer, []))]
            if self.rank > peer:
                ops.reverse()
            for kind, ts in ops:
                for tensor in ts:
                    if kind == "send":
                        works.append(pg.send([tensor], peer, tag))
                    else:
                        works.append(pg.recv([tensor], peer, tag))
        if nccl:
            works = [DeviceRound(pg._end_coalescing(device))]
        return works

    def _wait_device(self, rounds: list[DeviceRound], bound: float) -> None:
        """NCCL: poll until the round's kernels completed, under the same bounds as gloo;
        a round given up on aborts the NCCL group (its kernels may never finish)."""
        while not all(r.work.is_completed() for r in rounds):
            try:
                self._raise_if_hopeless(bound)
            except MigrationError:
                self.dirty = True
                raise
            time.sleep(0.0005)
        for r in rounds:
            r.work.wait()  # raises a failed round's error; orders the current stream

    def wait(self, works: list, deadline: float | None = None) -> None:
        """Wait for `works`, giving up when the reshape's deadline passes, a peer stops
        beating, or rank zero has already decided to abort the step that follows.

        gloo can neither poll nor withdraw a posted send/recv, and a timed-out wait
        closes every pair of the group; so a helper thread waits and this one watches.
        A wait given up on leaves its thread blocked with the buffers it holds (the
        server drops its staging area after a failed reshape) and marks the group
        dirty: every rank builds a fresh one before the next reshape (`renew`)."""
        if not works:
            return
        bound = self._bound() if deadline is None else min(self._bound(), _wall(deadline))
        if isinstance(works[0], DeviceRound):
            return self._wait_device(works, bound)
        done, errors = threading.Event(), []

        def run() -> None:
            try:
                for work in works:
                    work.wait()
            except Exception as exc:  # reported below
                errors.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="remp-wait", daemon=True).start()
        while not done.wait(0.05):
            try:
                self._raise_if_hopeless(bound)
            except MigrationError:
                self.dirty = True
                raise
        if errors:
            self.dirty = True
            raise errors[0]

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """`root`'s bytes on every rank, through the group (not the store: the store is
        a file that only grows), with the same bounded waits as a transfer."""
        size = torch.tensor([len(data) if self.rank == root else 0], dtype=torch.int64)
        self.wait([self.pg.broadcast(size, root)])
        if not size.item():
            return b""
        if self.rank == root:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8)
        self.wait([self.pg.broadcast(buf, root)])
        return buf.numpy().tobytes()

    def resync(self) -> None:
        """After a failed exchange every rank carries on from the same point: a fresh
        group (messages of the failed one may still be in flight) and tags past the
        failed step's."""
        self.renew()
        self._tag = (self._epoch << 16) | 0x8000

    def renew(self) -> None:
        """A fresh group over the same store (every rank calls it at the same point);
        the old one is shut down but kept referenced, as threads may still wait in it."""
        old = self.pg
        self._generation += 1
        self.pg = _gloo_group(self.store, f"remp-{self._generation}", self.rank,
                              self.world_size, self.timeout_s)
        try:
            old.shutdown()
        except Exception:  # a broken group may refuse; it is dropped all the same
            pass
        self._retired.append(old)
        if self._nccl is not None:  # a given-up round may still hold its kernels: abort
            try:
                self._nccl.abort()
            except Exception:
                pass
            self._retired.append(self._nccl)
            self._nccl = None
        self.dirty = False

    def _raise_if_hopeless(self, bound: float) -> None:
        if time.time() > bound:
            raise MigrationError("transfer exceeded the reshape's deadline")
        stalled = [] if self.patient else self.stalled_peers()
        if stalled:
            raise MigrationError(f"rank(s) {stalled} stopped answering during a transfer")
        if self.store is None:
            return
        key = self._key(self._round + 1)
        if self.store.check([f"{key}/decision"]):
            raise MigrationError("rank 0 aborted this step while it was in flight")
        if self.rank == 0:  # the decider: a peer that already failed the step ends it
            for r in range(1, self.world_size):
                if self.store.check([f"{key}/vote/{r}"]) and \
                        not json.loads(self.store.get(f"{key}/vote/{r}"))["ok"]:
                    raise MigrationError(f"rank {r} failed this step")

    # ---------------------------------------------------------------------- agreement
    def _key(self, round_: int) -> str:
        return f"agree/{self._epoch}{self._phase}/{round_}"

    def agree(self, error: BaseException | None, step: str, info: Any = None,
              patient: bool = False, where: str | None = None) -> list[Any]:
        """All ranks learn whether any rank failed `step`; every rank raises if one did.

        Returns every rank's `info` (plain JSON data) on success. Rank zero decides;
        it aborts on the first failed vote, on a peer that stopped beating (unless
        `patient`: a rollback waits for every rank until the deadline), or at the
        deadline. Without a store (bare groups) the old collective agreement is used.
        """
        if self.store is None:
            return self._agree_collective(error, step, info)
        self._round += 1
        key = self._key(self._round)
        vote = {"ok": error is None, "why": "" if error is None else str(error), "info": info,
                "where": where}
        self.store.set(f"{key}/vote/{self.rank}", json.dumps(vote))
        if self.rank == 0:
            decision = self._decide(key, step, patient or self.patient)
            self.store.set(f"{key}/decision", json.dumps(decision))
        else:
            decision = self._await_decision(key, step)
        if error is not None:
            failed = MigrationError(f"{step} failed on rank {self.rank}: {error}")
            failed.failed_step = where
            raise failed from error
        if not decision["ok"]:
            failed = MigrationError(f"{step}: {decision['why']}; nothing was committed")
            failed.failed_step = decision.get("where")
            raise failed
        return decision["info"]

    def _decide(self, key: str, step: str, patient: bool) -> dict:
        votes: dict[int, dict] = {}
        bound = self._bound()
        poll = Backoff()
        while True:
            for r in range(self.world_size):
                if r not in votes and self.store.check([f"{key}/vote/{r}"]):
                    votes[r] = json.loads(self.store.get(f"{key}/vote/{r}"))
            failed = {r: v for r, v in votes.items() if not v["ok"]}
            if failed:
                why = "; ".join(f"rank {r}: {v['why']}" for r, v in sorted(failed.items()))
                return {"ok": False, "why": f"failed on {why}", "info": None,
                        "where": failed[min(failed)].get("where")}
            missing = [r for r in range(self.world_size) if r not in votes]
            if not patient and time.time() > bound:  # past the deadline nothing commits
                waiting = f" (waiting for rank(s) {missing})" if missing else ""
                return {"ok": False, "why": f"timed out: the reshape's deadline passed"
                        f"{waiting}", "info": None}
            if not missing:
                return {"ok": True, "why": "", "info": [votes[r]["info"]
                                                        for r in range(self.world_size)]}
            stalled = [] if patient else [r for r in self.stalled_peers() if r in missing]
            if stalled:
                return {"ok": False, "why": f"rank(s) {stalled} stopped answering",
                        "info": None}
            if time.time() > bound:
                return {"ok": False, "why": f"timed out waiting for rank(s) {missing}",
                        "info": None}
            poll.sleep()

    def _await_decision(self, key: str, step: str) -> dict:
        """Follow rank zero, however long it takes within the reshape and its rollback:
        a rank that decided on its own could commit while the others abort (rank zero
        is the server's head; if it is gone, so is the server)."""
        give_up = self._bound() + self.timeout_s
        poll = Backoff()
        while not self.store.check([f"{key}/decision"]):
            if time.time() > give_up:
                raise MigrationError(f"{step}: no decision from rank 0")
            poll.sleep()
        return json.loads(self.store.get(f"{key}/decision"))

    def _agree_collective(self, error: BaseException | None, step: str, info: Any) -> list:
        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = 0 if error is None else 1
        mine = f" (rank {self.rank}: {error})" if error is not None else ""
        try:
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
        return self._gather_json(info)

    def _gather_json(self, info: Any) -> list[Any]:
        """Every rank's `info` as JSON through two sums (never a pickle)."""
        data = json.dumps(info).encode()
        sizes = torch.zeros(self.world_size, dtype=torch.int64)
        sizes[self.rank] = len(data)
        self.pg.allreduce([sizes]).wait(datetime.timedelta(seconds=2 * self.timeout_s))
        rows = torch.zeros(self.world_size, int(sizes.max()), dtype=torch.uint8)
        rows[self.rank, :len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.pg.allreduce([rows]).wait(datetime.timedelta(seconds=2 * self.timeout_s))
        return [json.loads(bytes(rows[r, :int(sizes[r])].tolist()))
                for r in range(self.world_size)]


def _wall(monotonic_deadline: float) -> float:
    return time.time() + (monotonic_deadline - time.monotonic())


def _nccl_group(store: Any, prefix: str, rank: int, world_size: int, timeout_s: float,
                device: torch.device) -> dist.ProcessGroup:
    """An NCCL group over the plane's store, outside torch.distributed's registry (so
    SGLang's destroy of its own world leaves it alone). Untested here: no GPU."""
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    pg = dist.ProcessGroupNCCL(dist.PrefixStore(prefix, store), rank, world_size, opts)
    pg.bound_device_id = device
    return pg


def _gloo_group(store: Any, prefix: str, rank: int, world_size: int,
                timeout_s: float) -> dist.ProcessGroup:
    """A gloo group whose pairs listen on loopback only (one node)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world_size, opts)


class Backoff:
    """Polling the store: agreements usually complete within a millisecond of the last
    vote, so the first polls are 0.1 ms apart (a fixed 2 ms had cost a reshape about
    7 ms over its agreements); a long wait (a frozen peer) backs off to 5 ms."""

    def __init__(self, first_s: float = 0.0001, most_s: float = 0.005) -> None:
        self.delay, self.most = first_s, most_s

    def sleep(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 1.5, self.most)


def _lists(messages: dict[int, torch.Tensor | list[torch.Tensor]]) -> dict[int, list]:
    """Each peer's non-empty tensors, as a list."""
    out = {}
    for peer, ts in messages.items():
        ts = [ts] if isinstance(ts, torch.Tensor) else ts
        out[peer] = [t for t in ts if t.numel()]
    return out

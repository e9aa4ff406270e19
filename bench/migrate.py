"""KV migration and weight re-sharding across a real gloo world, against its lower bound.

For each reshape, every rank runs the engine on random data: KV alone, weights alone,
and both in one in-place exchange ("both": old tensors released as they move); the
table shows the busiest rank's bytes, the measured exchange (median of --repeats runs
after a warm-up, slowest rank: packing, sending, receiving and unpacking, and the copies a
rank keeps, made between rounds; allocating the new tensors is "open s", beside it), and
the floor: busiest-rank bytes divided by the point-to-point bandwidth measured on the
same backend, in the same run, with one large message (the best case the backend
reaches). The KV rows move a full pool (every slot live, listed in a random order);
"kv-frag" moves every other slot, so no two live slots are neighbours and every byte
is packed and unpacked. On a CPU the copies a rank keeps ("kept") and the packing take
the same memory bandwidth as the loopback transfer itself; on a GPU they run at HBM speed.

The ranks allocate with transparent huge pages (torch's `THP_MEM_ALLOC_ENABLE`; `--no-thp`
turns it off): a new tensor then faults its memory in 2 MiB pages rather than 4 KiB ones.
Per-page faults are a host-memory cost a GPU's caching allocator does not have; with 4 KiB
pages they were most of "open s" (1.05 s of 1.42 s for TP 2 -> 1 in one run, 0.38 s of
0.75 s with huge pages).

    python bench/migrate.py [--quick] [--json PATH] [--tokens N] [--staging-mib M] [--no-thp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from remp_sglang.comm import Communicator  # noqa: E402
from remp_sglang.engine import (  # noqa: E402
    KVPart,
    KVPool,
    SlotFlow,
    WeightPart,
    migrate_kv,
    relayout,
    reshard_weights,
)
from remp_sglang.planner import plan_kv  # noqa: E402
from remp_sglang.ports import free_port  # noqa: E402
from remp_sglang.topology import ModelShape, Topology  # noqa: E402
from remp_sglang.weights import (  # noqa: E402
    DenseDecoder,
    dense_decoder_params,
    local_shape,
    owns,
)

# Llama-3-8B's KV geometry (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB/token).
KV_SHAPE = ModelShape(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, dtype_bytes=2)
# A ~1B-parameter decoder for weights (what fits twice in this machine's memory).
WEIGHT_MODEL = DenseDecoder(
    ModelShape(num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, dtype_bytes=2),
    hidden_size=2048, intermediate_size=5632, vocab_size=32000,
)
TRANSITIONS = [((2, 1), (1, 1)), ((1, 1), (2, 1)), ((1, 2), (2, 1)), ((2, 1), (1, 2)),
               ((1, 2), (1, 1))]


def random_tensor(shape, dtype, gen) -> torch.Tensor:
    """Random bits, cheaply (never zeros: they can hide unwritten data)."""
    n = torch.Size(shape).numel()
    raw = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int16, generator=gen)
    if dtype.itemsize == 2:
        return raw.view(dtype).view(shape)
    return raw.to(dtype).view(shape)


def random_pool(topo: Topology, rank: int, tokens: int, gen) -> KVPool | None:
    if not topo.is_active(rank):
        return None
    layers = len(topo.layer_range(rank, KV_SHAPE.num_layers))
    heads = len(topo.kv_head_range(rank, KV_SHAPE.num_kv_heads))

    def layer() -> torch.Tensor:
        return random_tensor((tokens + 1, heads, KV_SHAPE.head_dim), torch.bfloat16, gen)

    return KVPool([layer() for _ in range(layers)], [layer() for _ in range(layers)])


def p2p_bandwidth(comm: Communicator, nbytes: int, repeats: int) -> float:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(repeats + 1):
        comm.barrier()
        t = time.perf_counter()
        tag = comm.next_tag()
        works = comm.exchange({1: buf} if comm.rank == 0 else {},
                              {0: buf} if comm.rank == 1 else {}, tag)
        comm.wait(works, time.monotonic() + comm.timeout_s)
        comm.barrier()
        times.append(time.perf_counter() - t)
    return nbytes / min(times[1:])  # the best case: a slow repeat is this host's noise


def raw_pattern_seconds(comm: Communicator, sends: dict[int, int], recvs: dict[int, int],
                        repeats: int) -> float:
    """The same per-pair byte counts as one plain message per pair: the backend's floor
    for this exact traffic pattern (no gather, no scatter, no rounds)."""
    out = {p: torch.empty(n, dtype=torch.uint8) for p, n in sends.items() if n}
    inc = {p: torch.empty(n, dtype=torch.uint8) for p, n in recvs.items() if n}
    times = []
    for _ in range(repeats + 1):
        comm.barrier()
        t = time.perf_counter()
        comm.wait(comm.exchange(out, inc, comm.next_tag()), time.monotonic() + comm.timeout_s)
        comm.barrier()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def _pattern(plan, rank: int, tokens: int) -> tuple[dict[int, int], dict[int, int]]:
    sends: dict[int, int] = {}
    recvs: dict[int, int] = {}
    for m in plan.sends(rank):
        sends[m.dst] = sends.get(m.dst, 0) + plan.bytes_per_token([m]) * tokens
    for m in plan.recvs(rank):
        recvs[m.src] = recvs.get(m.src, 0) + plan.bytes_per_token([m]) * tokens
    return sends, recvs


def _gather_rows(comm: Communicator, values: list[float]) -> list[list[float]]:
    t = torch.zeros(comm.world_size, len(values), dtype=torch.float64)
    t[comm.rank] = torch.tensor(values, dtype=torch.float64)
    comm.pg.allreduce([t]).wait()
    return t.tolist()


def _summary(s) -> list[float]:
    """A rank's figures for a row: exchange s, peak bytes, open s, bytes sent, received,
    moved directly, kept (`_shares` reads the last four)."""
    return [s.seconds["exchange"], s.peak_bytes, s.seconds["open"],
            s.bytes_sent, s.bytes_received, s.bytes_direct, s.bytes_kept]


def _shares(per_rank: list[list[float]]) -> dict[str, float]:
    moved = sum(r[3] + r[4] for r in per_rank)
    return {"direct_share": sum(r[5] for r in per_rank) / moved if moved else 0.0,
            "kept_bytes": max(r[6] for r in per_rank)}


def worker(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    comm = Communicator.gloo("127.0.0.1", port, rank, world, timeout_s=600)
    gen = torch.Generator().manual_seed(rank)
    bw = p2p_bandwidth(comm, args.p2p_mib << 20, repeats=5)
    staging = torch.zeros(args.staging_mib << 20, dtype=torch.uint8)  # kept, as a server would
    rows = []
    tokens, shape = args.tokens, KV_SHAPE
    # every slot live, in a random order (a full pool); "kv-frag": every other slot
    dense = torch.randperm(tokens, generator=torch.Generator().manual_seed(0)) + 1
    cases = [("kv", t, dense) for t in TRANSITIONS] + \
        [("kv-frag", TRANSITIONS[0], dense[dense % 2 == 1])]
    for what, ((otp, opp), (ntp, npp)), live in cases:
        old, new = Topology(otp, opp, world), Topology(ntp, npp, world)
        pool = random_pool(old, rank, tokens, gen)
        runs = []
        for _ in range(args.repeats + 1):  # the first run warms up and is dropped
            comm.barrier()
            res = migrate_kv(comm, old, new, shape, pool, live, tokens + 1,
                             dtype=torch.bfloat16, staging_bytes=staging.numel(),
                             staging=staging)
            runs.append(_gather_rows(comm, _summary(res.stats)))
            del res
        per_rank = runs[-1]
        plan = plan_kv(old, new, shape)
        n = live.numel()
        busiest = plan.max_rank_bytes(n)
        transfer = statistics.median(max(r[0] for r in run) for run in runs[1:])
        raw = raw_pattern_seconds(comm, *_pattern(plan, rank, n), repeats=args.repeats)
        rows.append({
            "what": what, "old": f"TP{otp}PP{opp}", "new": f"TP{ntp}PP{npp}", "tokens": n,
            "busiest_rank_bytes": busiest, "transfer_s": transfer,
            "local_copy_s": statistics.median(max(r[2] for r in run) for run in runs[1:]),
            "lower_bound_s": busiest / bw, "ratio": transfer / (busiest / bw) if busiest else 0,
            "raw_pattern_s": raw, "ratio_raw": transfer / raw if busiest else 0,
            "peak_gib": max(r[1] for r in per_rank) / 2**30, **_shares(per_rank),
            "bytes_per_rank": [int(max(r[3], r[4])) for r in per_rank],
        })
        del pool
    if not args.skip_weights:
        model = WEIGHT_MODEL
        specs = dense_decoder_params(model)
        for (otp, opp), (ntp, npp) in TRANSITIONS[:3]:
            old, new = Topology(otp, opp, world), Topology(ntp, npp, world)
            params = {sp.name: random_tensor(local_shape(sp, model, old, rank), torch.bfloat16, gen)
                      for sp in specs if owns(sp, model, old, rank)}
            runs = []
            for _ in range(args.repeats + 1):
                comm.barrier()
                res = reshard_weights(comm, old, new, model, params, dtype=torch.bfloat16,
                                      staging_bytes=staging.numel(), staging=staging)
                runs.append(_gather_rows(comm, _summary(res.stats)))
            per_rank = runs[-1]
            busiest = res.stats.lower_bound_bytes
            transfer = statistics.median(max(r[0] for r in run) for run in runs[1:])
            rows.append({
                "what": "weights", "old": f"TP{otp}PP{opp}", "new": f"TP{ntp}PP{npp}",
                "tokens": 0, "busiest_rank_bytes": busiest, "transfer_s": transfer,
                "local_copy_s": statistics.median(max(r[2] for r in run) for run in runs[1:]),
                "lower_bound_s": busiest / bw,
                "ratio": transfer / (busiest / bw) if busiest else 0,
                "raw_pattern_s": float("nan"), "ratio_raw": float("nan"),
                "peak_gib": max(r[1] for r in per_rank) / 2**30, **_shares(per_rank),
                "bytes_per_rank": [],
            })
            del params, res
        for (otp, opp), (ntp, npp) in TRANSITIONS[:3]:  # both in one exchange, in place
            old, new = Topology(otp, opp, world), Topology(ntp, npp, world)
            runs = []
            for _ in range(args.repeats + 1):
                params = {sp.name: random_tensor(local_shape(sp, model, old, rank),
                                                 torch.bfloat16, gen)
                          for sp in specs if owns(sp, model, old, rank)}
                pool = random_pool(old, rank, tokens, gen)
                comm.barrier()
                res = relayout(comm, old, new,
                               KVPart(shape, torch.bfloat16, pool,
                                      [SlotFlow(0, 0, dense)], tokens + 1),
                               WeightPart(model, torch.bfloat16, params),
                               staging_bytes=staging.numel(), staging=staging,
                               release_old=True)
                runs.append(_gather_rows(comm, _summary(res.stats)))
                busiest = res.stats.lower_bound_bytes
                del params, pool, res
            transfer = statistics.median(max(r[0] for r in run) for run in runs[1:])
            rows.append({
                "what": "both", "old": f"TP{otp}PP{opp}", "new": f"TP{ntp}PP{npp}",
                "tokens": tokens, "busiest_rank_bytes": busiest, "transfer_s": transfer,
                "local_copy_s": statistics.median(max(r[2] for r in run) for run in runs[1:]),
                "lower_bound_s": busiest / bw,
                "ratio": transfer / (busiest / bw) if busiest else 0,
                "raw_pattern_s": float("nan"), "ratio_raw": float("nan"),
                "peak_gib": max(r[1] for r in runs[-1]) / 2**30, **_shares(runs[-1]),
                "bytes_per_rank": [],
            })
    comm.close()
    if rank == 0:
        queue.put({"p2p_GBps": bw / 1e9, "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute here)")
    ap.add_argument("--tokens", type=int, default=None, help="live tokens (default 16384)")
    ap.add_argument("--staging-mib", type=int, default=64)
    ap.add_argument("--p2p-mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    ap.add_argument("--skip-weights", action="store_true")
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    ap.add_argument("--no-thp", action="store_true", help="4 KiB pages for new tensors")
    args = ap.parse_args()
    if not args.no_thp:  # read by each rank's torch at its first allocation
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    if args.tokens is None:
        args.tokens = 2048 if args.quick else 16384
    if args.quick:
        args.p2p_mib = min(args.p2p_mib, 64)
    world = 2
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"torch {torch.__version__}, gloo over loopback, world {world}"
    print(f"# bench/migrate.py on {machine}")
    print(f"# p2p bandwidth (one {args.p2p_mib} MiB message, best of 5, same backend, same run): "
          f"{result['p2p_GBps']:.2f} GB/s; staging {args.staging_mib} MiB; "
          f"{'4 KiB pages' if args.no_thp else 'transparent huge pages'}")
    print(f"# KV shape: {KV_SHAPE}; weights: {WEIGHT_MODEL.shape}, hidden "
          f"{WEIGHT_MODEL.hidden_size}, vocab {WEIGHT_MODEL.vocab_size}")
    print("# bound = busiest rank's max(sent, received) / one-way p2p bandwidth; raw = the "
          "same per-pair bytes as plain messages (this backend's floor for the pattern)")
    print("# transfer = the exchange, the copies a rank keeps included (between rounds); "
          "open = allocating the new tensors; direct = share of the bytes sent or received "
          "from/into the tensors themselves (no packing); kept = the busiest rank's local "
          "copy")
    hdr = f"{'what':8} {'old':>8} {'new':>8} {'tokens':>7} {'busiest MiB':>12} " \
          f"{'transfer s':>11} {'bound s':>9} {'ratio':>6} {'raw s':>7} {'/raw':>6} " \
          f"{'open s':>8} {'peak GiB':>9} {'direct':>7} {'kept MiB':>9}"
    print(hdr)
    for r in result["rows"]:
        print(f"{r['what']:8} {r['old']:>8} {r['new']:>8} {r['tokens']:>7} "
              f"{r['busiest_rank_bytes'] / 2**20:>12.1f} {r['transfer_s']:>11.3f} "
              f"{r['lower_bound_s']:>9.3f} {r['ratio']:>6.2f} {r['raw_pattern_s']:>7.3f} "
              f"{r['ratio_raw']:>6.2f} {r['local_copy_s']:>8.3f} {r['peak_gib']:>9.2f} "
              f"{r['direct_share']:>7.0%} {r['kept_bytes'] / 2**20:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), **result}, f, indent=1)


if __name__ == "__main__":
    main()

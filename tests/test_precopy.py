"""Pre-copy (`engine.precopy`, then `relayout(..., pre=)`), on gloo worlds of 2 and 4.

While the old layout serves, the joining ranks receive their new weights and the KV rows
of a snapshot of slots; meanwhile "serving" evicts and rewrites some snapshot slots and
writes new ones (all of them reported dirty). The pause then moves only what the joining
ranks lack: every new pool and weight must be bit-exact against the state at the pause,
and a joining rank must receive in the pause exactly the rows of the dirty and
never-copied live slots, and no weights."""

from __future__ import annotations

import itertools
import traceback

import pytest
import torch
from test_engine import (
    MODEL,
    OLD_SLOTS,
    full_pool,
    full_weights,
    run_world,
    shard_pool,
    shard_weights,
)

from remp_sglang.comm import Communicator, MigrationError
from remp_sglang.engine import KVPart, SlotFlow, WeightPart, joining, precopy, relayout
from remp_sglang.planner import plan_kv
from remp_sglang.topology import Topology, layouts

pytestmark = pytest.mark.slow

SHAPE = MODEL.shape


def _write(pool, full_k, full_v, topo: Topology, rank: int, slots: torch.Tensor) -> None:
    """What serving does to a rank's old pool: the rows of `slots` take the full pool's."""
    if pool is None:
        return
    heads = topo.kv_head_range(rank, SHAPE.num_kv_heads)
    for j, layer in enumerate(topo.layer_range(rank, SHAPE.num_layers)):
        pool.k[j][slots] = full_k[layer][slots][:, heads.start:heads.stop]
        pool.v[j][slots] = full_v[layer][slots][:, heads.start:heads.stop]


def _precopy_world(rank: int, world: int, port: int, errors) -> None:
    try:
        comm = Communicator.gloo("127.0.0.1", port, rank, world, timeout_s=30)
        full_k, full_v = full_pool(SHAPE, seed=3)
        weights = full_weights()
        g = torch.Generator().manual_seed(11)
        pairs = [(o, n) for o, n in itertools.product(layouts(world, SHAPE), repeat=2)
                 if joining(o, n)]
        assert pairs
        for (old, new), new_slots in itertools.product(pairs, (OLD_SLOTS, 24)):
            perm = torch.randperm(OLD_SLOTS - 1, generator=g) + 1  # slot 0 reserved
            snap = perm[:16]  # cached when the order came
            rewritten, fresh = snap[3:6], perm[16:22]  # snap[:3] are evicted
            old_pool = shard_pool(full_k, full_v, old, rank, SHAPE)
            old_params = shard_weights(weights, old, rank)
            kv = KVPart(SHAPE, torch.float32, old_pool, [SlotFlow(0, 0, snap)], new_slots)
            pre = precopy(comm, old, new, kv, WeightPart(MODEL, torch.float32, old_params),
                          staging_bytes=1 << 14)
            assert pre.ranks == joining(old, new)
            # serving: three snapshot slots evicted, three reallocated and rewritten, six
            # new ones written (the allocator reports both as dirty)
            now_k = [t.clone() for t in full_k]
            now_v = [t.clone() for t in full_v]
            for t in now_k + now_v:
                t[torch.cat([rewritten, fresh])] = torch.randn(9, *t.shape[1:], generator=g)
            _write(old_pool, now_k, now_v, old, rank, torch.cat([rewritten, fresh]))
            live = torch.cat([snap[3:], fresh])
            dirty = torch.cat([rewritten, fresh])
            res = relayout(comm, old, new,
                           KVPart(SHAPE, torch.float32, old_pool, [SlotFlow(0, 0, live)],
                                  new_slots),
                           WeightPart(MODEL, torch.float32, old_params), pre=pre,
                           dirty=[dirty], staging_bytes=1 << 14, release_old=True)
            # bit-exact: every live row as it is now, every weight
            if new.is_active(rank):
                heads = new.kv_head_range(rank, SHAPE.num_kv_heads)
                for j, layer in enumerate(new.layer_range(rank, SHAPE.num_layers)):
                    for got, full in ((res.pool.k[j], now_k[layer]),
                                      (res.pool.v[j], now_v[layer])):
                        want = full[live][:, heads.start:heads.stop]
                        assert torch.equal(got[res.new_slots], want), (old, new, rank, layer)
                want_w = shard_weights(weights, new, rank)
                assert res.params.keys() == want_w.keys()
                assert all(torch.equal(res.params[k], want_w[k]) for k in want_w)
            else:
                assert res.pool is None and not res.params
            # a joining rank receives in the pause only the rows it lacks, and no weights
            if rank in pre.ranks:
                copied = dict(zip(pre.flows[0].src_slots.tolist(),
                                  pre.flows[0].dst_slots.tolist(), strict=True))
                mapped = dict(zip(live.tolist(), res.new_slots.tolist(), strict=True))
                lacking = sum(1 for s in live.tolist() if s in dirty.tolist()
                              or copied.get(s) != mapped[s])
                plan = plan_kv(old, new, SHAPE)
                per_token = plan.bytes_per_token(plan.recvs(rank))
                assert res.stats.bytes_received == per_token * lacking, (old, new, rank)
                assert res.bytes_sent == {"kv": 0, "weights": 0}  # it held nothing
                assert pre.stats.bytes_received > 0
            else:  # senders allocated nothing in the pre-copy
                assert pre.pool is None and not pre.params
                assert pre.stats.bytes_received == 0
        # a pre-copy for other layouts is refused on every rank, before anything moves
        old, new = pairs[0]
        other = next(n for o, n in pairs if o == old and n != new) if len(pairs) > 1 else new
        pool = shard_pool(full_k, full_v, old, rank, SHAPE)
        params = shard_weights(weights, old, rank)
        pre = precopy(comm, old, new, KVPart(SHAPE, torch.float32, pool,
                                             [SlotFlow(0, 0, torch.arange(1, 9))], OLD_SLOTS),
                      WeightPart(MODEL, torch.float32, params))
        if other != new:
            with pytest.raises(MigrationError, match="pre: copied for"):
                relayout(comm, old, other, KVPart(SHAPE, torch.float32, pool,
                                                  [SlotFlow(0, 0, torch.arange(1, 9))],
                                                  OLD_SLOTS),
                         WeightPart(MODEL, torch.float32, params), pre=pre)
        with pytest.raises(ValueError, match="no rank joins"):
            precopy(comm, new, new, KVPart(SHAPE, torch.float32, None, [], OLD_SLOTS),
                    WeightPart(MODEL, torch.float32, {}))
        comm.close()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


@pytest.mark.parametrize("world", [2, 4])
def test_precopy_then_pause_is_bit_exact_and_moves_only_the_rest(world):
    run_world(_precopy_world, world)

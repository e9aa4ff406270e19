"""Export and import of the radix tree at a reshape, on a deep tree of ~100k cached tokens.

    python bench/cache_state.py [--quick] [--json PATH]

The tree is SGLang's own (its Python core, as under --remp), filled outside a server
like a conversation service: one shared system prompt, conversations whose every turn
extends the previous one, and regenerated answers branching off some turns. Timed, in
one run, for each size: rank zero's export (one walk over the nodes, one device copy of
the slots), its JSON encoding (arrays as base64), a joining rank's decode with every
check, and its import into a fresh tree (one SGLang insert per leaf); then the rebuilt
tree is exported again and compared with the original. Last, the placement of a split
into two replicas (`replicas.place`, on every rank in the pause) with one running
request per conversation, at its longest path: each replica takes the cached prefixes
and the KV of the requests dealt to it ("split ms", and the tokens each replica gets).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from array import array
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remp_sglang.integration.cache_state import (  # noqa: E402
    decode_state,
    encode_state,
    export_state,
    import_state,
    standalone_tree,
)
from remp_sglang.integration.replicas import place  # noqa: E402
from remp_sglang.integration.step_boundary import RequestRecord  # noqa: E402
from remp_sglang.topology import Topology  # noqa: E402


def fill(sched, conversations: int, turns: int = 12, turn_tokens: int = 150,
         system_tokens: int = 1000, seed: int = 0) -> None:
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    rng = random.Random(seed)
    alloc, tree = sched.token_to_kv_pool_allocator, sched.tree_cache

    def insert(tokens: list[int]) -> None:
        slots = alloc.alloc(len(tokens))  # the tree frees those of the cached prefix
        tree.insert(InsertParams(key=RadixKey(array("q", tokens)), value=slots))

    system = [rng.randrange(5, 30000) for _ in range(system_tokens)]
    for _ in range(conversations):
        path = list(system)
        for turn in range(turns):
            nxt = [rng.randrange(5, 30000) for _ in range(turn_tokens)]
            if turn % 4 == 1:  # a regenerated answer: a branch that stays behind
                insert(path + [rng.randrange(5, 30000) for _ in range(turn_tokens)])
            path += nxt
            insert(path)


def measure(conversations: int) -> dict:
    size = 1000 + conversations * 12 * 150 * 2 + 4096
    src = standalone_tree(size)
    fill(src, conversations)
    t0 = time.perf_counter()
    state = export_state(src)
    t1 = time.perf_counter()
    data = encode_state(state)
    t2 = time.perf_counter()
    back = decode_state(data, pool_size=size)
    t3 = time.perf_counter()
    dst = standalone_tree(size)
    t4 = time.perf_counter()
    import_state(dst, back, pool_size=size)
    t5 = time.perf_counter()
    again = export_state(dst)
    same = (sorted((t.tobytes(), s.tobytes()) for t, s, _ in again.leaf_paths())
            == sorted((t.tobytes(), s.tobytes()) for t, s, _ in state.leaf_paths())
            and np.array_equal(again.live_slots, state.live_slots))
    # a split: one running request per conversation, at its longest path
    longest = sorted(state.leaf_paths(), key=lambda p: -len(p[0]))[:conversations]
    tokens = {f"r{i}": t.tolist() for i, (t, _, _) in enumerate(longest)}
    state.requests = [RequestRecord(rid=rid, recv=b"", output_ids=[], max_new_tokens=1,
                                    logprob_start_len=-1, retraction_count=0,
                                    retracted=False) for rid in tokens]
    state.decoding = list(tokens)
    t6 = time.perf_counter()
    split, _ = place([state], Topology(2, 1, 2), Topology(1, 1, 2, dp=2), size,
                     tokens_of=lambda r: tokens[r.rid])
    t7 = time.perf_counter()
    return {"cached_tokens": state.cached_tokens, "nodes": len(state.parents),
            "leaves": len(state.leaf_order), "path_tokens": int(sum(
                len(t) for t, _, _ in state.leaf_paths())),
            "encoded_bytes": len(data), "export_s": t1 - t0, "encode_s": t2 - t1,
            "decode_s": t3 - t2, "import_s": t5 - t4, "total_s": (t3 - t0) + (t5 - t4),
            "rebuilt_tree_equal": same, "split_requests": len(tokens), "split_s": t7 - t6,
            "split_tokens": [s.cached_tokens for s in split]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~10k tokens only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    measure(1)  # first-use costs of SGLang's tree code (imports, caches) are not timed
    rows = [measure(n) for n in ((4,) if args.quick else (4, 48))]
    print(f"{'cached':>8} {'nodes':>6} {'leaves':>6} {'path tok':>9} {'bytes':>9} "
          f"{'export ms':>9} {'encode ms':>9} {'decode ms':>9} {'import ms':>9} "
          f"{'total ms':>9} {'equal':>5} {'split ms':>9} {'split into':>13}")
    for r in rows:
        print(f"{r['cached_tokens']:>8} {r['nodes']:>6} {r['leaves']:>6} {r['path_tokens']:>9} "
              f"{r['encoded_bytes']:>9} {r['export_s'] * 1e3:>9.1f} {r['encode_s'] * 1e3:>9.1f} "
              f"{r['decode_s'] * 1e3:>9.1f} {r['import_s'] * 1e3:>9.1f} "
              f"{r['total_s'] * 1e3:>9.1f} {str(r['rebuilt_tree_equal']):>5} "
              f"{r['split_s'] * 1e3:>9.1f} {'+'.join(map(str, r['split_tokens'])):>13}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rebuilt_tree_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

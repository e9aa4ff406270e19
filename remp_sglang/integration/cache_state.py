"""The scheduler-side cache state every rank must hold identically: radix tree and free lists.

SGLang keeps the radix tree, the KV slot allocator and the request-slot free list
replicated on every TP/PP rank; they stay identical because every rank sees the same
inputs. A rank that joins after being parked holds a stale copy, so at every reshape rank
zero exports its state and every rank of the new world rebuilds from that export (rank
zero included), which makes them identical again by construction. The export also carries
slot indices through a compaction (`remap`). Needs the Python tree core (the plugin selects
it under --remp): the Rust core offers no node access.
"""

from __future__ import annotations

import base64
import hashlib
from array import array
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import numpy as np
import torch

from .step_boundary import RequestRecord

TREE_CORE_ENV = "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND"
_I64 = np.dtype("<i8")


@dataclass
class CacheState:
    """The tree as a node table (each node once, parents before children) plus the free
    lists. Array fields are int64 numpy arrays, which travel as base64 bytes: export,
    encoding, checks and remapping are array operations, never loops over slots."""

    parents: np.ndarray  # per node: index of its parent node, -1 under the root
    lengths: np.ndarray  # per node: tokens on its edge (>= 1)
    tokens: np.ndarray  # every node's edge tokens, node after node
    slots: np.ndarray  # their KV slots, in the same order
    leaf_order: np.ndarray  # leaf node indices, least recently used first
    node_keys: np.ndarray  # per node: index into `keys`
    keys: list[tuple[str | None, str | None]]  # distinct (extra_key, cache_salt)
    free_pages: np.ndarray
    release_pages: np.ndarray
    free_request_slots: list[int]
    requests: list[RequestRecord] = field(default_factory=list)  # queued, in order
    engine_paused: bool = False  # SGLang's pause_generation flag, for joining ranks
    new_token_ratio: float = 1.0  # SGLang's admission estimate, the same on every rank
    decoding: list[str] = field(default_factory=list)  # carried requests that were decoding

    @property
    def live_slots(self) -> np.ndarray:
        """The KV slots the tree holds, sorted: the rows a reshape carries over."""
        return np.unique(self.slots)

    @property
    def cached_tokens(self) -> int:
        """Distinct slots held by the tree."""
        return len(self.live_slots)

    def leaf_paths(self) -> list[tuple[np.ndarray, np.ndarray, tuple[str | None, str | None]]]:
        """(tokens, slots, key) of every root-to-leaf path, least recently used first."""
        starts = np.concatenate(([0], np.cumsum(self.lengths)))
        parents = self.parents.tolist()
        out = []
        for leaf in self.leaf_order.tolist():
            chain, node = [], leaf
            while node != -1:
                chain.append(node)
                node = parents[node]
            idx = np.concatenate([np.arange(starts[n], starts[n + 1]) for n in reversed(chain)])
            out.append((self.tokens[idx], self.slots[idx], self.keys[self.node_keys[leaf]]))
        return out

    def remap(self, old: np.ndarray, new: np.ndarray, new_size: int) -> CacheState:
        """The same state after slot compaction (`old[i]` moved to `new[i]`) into a pool
        of `new_size` usable slots."""
        table = np.arange(max(int(self.slots.max(initial=0)), int(old.max(initial=0))) + 1)
        table[old] = new
        slots = table[self.slots]
        free = np.ones(new_size + 1, dtype=bool)  # a mask, not a set difference: O(size)
        free[0] = False
        free[slots[slots <= new_size]] = False
        free = np.flatnonzero(free).astype(np.int64)
        return replace(self, slots=slots, free_pages=free,
                       release_pages=np.empty(0, dtype=np.int64))


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return base64.b64encode(np.ascontiguousarray(obj, dtype=_I64).tobytes()).decode()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is np.ndarray:
        if not isinstance(obj, str):
            raise ValueError("expected a base64 int64 array")
        raw = base64.b64decode(obj, validate=True)
        if len(raw) % _I64.itemsize:
            raise ValueError("an int64 array's length is not a multiple of 8 bytes")
        return np.frombuffer(raw, dtype=_I64).astype(np.int64)
    raise NotImplementedError(f"cannot decode {kind}")


def encode_state(state: CacheState) -> bytes:
    """Plain JSON (arrays and request inputs as base64): nothing a reader could run."""
    return msgspec.json.encode(state, enc_hook=_enc_hook)


def decode_state(data: bytes, pool_size: int) -> CacheState:
    """The state rank zero exported, type-checked field by field and checked against the
    pool it describes (slot bounds, a consistent node table); ValueError otherwise."""
    try:
        state = msgspec.json.decode(data, type=CacheState, dec_hook=_dec_hook)
    except msgspec.ValidationError as error:
        raise ValueError(f"malformed cache state: {error}") from error
    n = len(state.parents)
    for name, values in (("free_pages", state.free_pages),
                         ("release_pages", state.release_pages), ("slots", state.slots)):
        if len(values) and (values.min() < 0 or values.max() > pool_size):
            raise ValueError(f"cache state: {name} outside the pool's {pool_size} slots")
    if len(state.lengths) != n or len(state.node_keys) != n:
        raise ValueError("cache state: the node table's columns differ in length")
    if n and (state.lengths.min() < 1 or int(state.lengths.sum()) != len(state.tokens)):
        raise ValueError("cache state: node lengths do not add up to the tokens")
    if len(state.tokens) != len(state.slots):
        raise ValueError("cache state: tokens and slots differ in length")
    if n and (np.any(state.parents < -1) or np.any(state.parents >= np.arange(n))):
        raise ValueError("cache state: a node's parent does not come before it")
    if n and (state.node_keys.min() < 0 or state.node_keys.max() >= len(state.keys)):
        raise ValueError("cache state: a node's key index is out of range")
    leaves = state.leaf_order
    if len(leaves) and (leaves.min() < 0 or leaves.max() >= n
                        or len(np.unique(leaves)) != len(leaves)
                        or np.isin(leaves, state.parents).any()):
        raise ValueError("cache state: leaf_order names a node that is not a leaf")
    return state


def live_slots(scheduler: Any) -> torch.Tensor:
    """Every allocated KV slot, sorted (the rows a reshape must carry over)."""
    alloc = scheduler.token_to_kv_pool_allocator
    if getattr(alloc, "page_size", 1) != 1:
        raise ValueError("remp supports --page-size 1 only")
    used = torch.ones(alloc.size + 1, dtype=torch.bool)
    used[0] = False
    for free in (alloc.free_pages, alloc.release_pages):
        used[free.cpu()] = False
    return used.nonzero().flatten()


def _tree_core(scheduler: Any) -> Any:
    core = getattr(scheduler.tree_cache, "tree_core", None)
    if core is None or not hasattr(core, "root_node"):
        raise ValueError(f"remp needs the Python radix tree core ({TREE_CORE_ENV}=python); "
                         f"this server uses {type(core).__name__}")
    return core


def export_state(scheduler: Any) -> CacheState:
    """Rank zero's tree (a node table, leaves in LRU order) and free lists. One walk over
    the nodes; every node's slots leave the device in one copy."""
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType

    root = _tree_core(scheduler).root_node
    parents: list[int] = []
    values: list[torch.Tensor] = []
    tokens = array("q")
    leaves: list[tuple[float, int]] = []
    keys: dict[tuple[str | None, str | None], int] = {}
    node_keys: list[int] = []
    stack = [(child, -1) for child in root.children.values()]
    while stack:
        node, parent = stack.pop()
        value = node.component_data[ComponentType.FULL].value
        if value is None:
            raise ValueError("remp: the radix tree holds evicted (host-only) nodes")
        index = len(parents)
        parents.append(parent)
        values.append(value)
        tokens.extend(node.key.raw_token_ids())
        key = (node.key.extra_key, node.key.cache_salt)
        node_keys.append(keys.setdefault(key, len(keys)))
        if node.children:
            stack.extend((child, index) for child in node.children.values())
        else:
            leaves.append((node.last_access_time, index))
    leaves.sort()
    slots = (torch.cat(values).to("cpu", torch.int64).numpy() if values
             else np.empty(0, dtype=np.int64))
    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    if len(slots) != len(tokens):
        raise ValueError("remp: the radix tree's keys and values differ in length")
    alloc = scheduler.token_to_kv_pool_allocator
    return CacheState(
        parents=np.asarray(parents, dtype=np.int64), lengths=lengths,
        tokens=np.frombuffer(tokens, dtype=np.int64).copy(), slots=slots,
        leaf_order=np.asarray([i for _, i in leaves], dtype=np.int64),
        node_keys=np.asarray(node_keys, dtype=np.int64), keys=list(keys),
        free_pages=alloc.free_pages.to("cpu", torch.int64).numpy(),
        release_pages=alloc.release_pages.to("cpu", torch.int64).numpy(),
        free_request_slots=list(scheduler.req_to_token_pool.free_slots),
    )


def import_state(scheduler: Any, state: CacheState, pool_size: int) -> None:
    """Rebuild tree and free lists from an export (the same steps on every rank): each
    leaf's path is inserted once, in LRU order, through SGLang's own insert."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    _tree_core(scheduler)
    tree, alloc = scheduler.tree_cache, scheduler.token_to_kv_pool_allocator
    tree.reset()
    device = alloc.free_pages.device
    for tokens, slots, (extra_key, cache_salt) in state.leaf_paths():
        key = RadixKey(array("q", tokens.tobytes()), extra_key=extra_key,
                       cache_salt=cache_salt)
        tree.insert(InsertParams(key=key, value=torch.from_numpy(slots).to(device)))
    # Inserting paths that share a prefix reports duplicates but frees nothing: the free
    # lists below are authoritative.
    alloc.size = pool_size
    alloc.free_pages = torch.from_numpy(state.free_pages).to(device)
    alloc.release_pages = torch.from_numpy(state.release_pages).to(device)
    scheduler.req_to_token_pool.free_slots = list(state.free_request_slots)


def standalone_tree(pool_size: int, request_slots: int = 16) -> Any:
    """A scheduler-shaped holder of a fresh SGLang tree (Python core), KV slot allocator
    and request pool, outside any server: for benchmarks and tests of the export."""
    import os

    os.environ.setdefault(TREE_CORE_ENV, "python")
    from types import SimpleNamespace

    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    alloc = TokenToKVPoolAllocator(pool_size, torch.float32, "cpu", None, False)
    requests = ReqToTokenPool(size=request_slots, max_context_len=1 << 16, device="cpu",
                              enable_memory_saver=False)
    tree = UnifiedRadixCache(CacheInitParams(
        disable=False, req_to_token_pool=requests, token_to_kv_pool_allocator=alloc,
        page_size=1, tree_components=(ComponentType.FULL,)))
    return SimpleNamespace(tree_cache=tree, token_to_kv_pool_allocator=alloc,
                           req_to_token_pool=requests)


def kv_digest(scheduler: Any, layers: range, heads: range) -> dict[str, str]:
    """Hash of the live KV rows per (global layer, global KV head): a layout-free identity.

    Test hook: equal digests before and after a reshape mean every cached row arrived
    bit-identical, whichever ranks hold it now. Rows are hashed one by one and the hashes
    sorted, so a compaction that moves rows to other slots leaves the digest unchanged.
    """
    pool = scheduler.tp_worker.model_runner.token_to_kv_pool
    slots = live_slots(scheduler)
    out = {}
    for i, layer in enumerate(layers):
        k, v = pool.k_buffer[i][slots], pool.v_buffer[i][slots]
        for j, head in enumerate(heads):
            rows = torch.cat([k[:, j], v[:, j]], dim=-1).contiguous()
            raw = rows.view(torch.uint8).numpy()
            row_hashes = sorted(hashlib.blake2b(r.tobytes(), digest_size=8).digest() for r in raw)
            out[f"{layer}:{head}"] = hashlib.sha256(b"".join(row_hashes)).hexdigest()[:20]
    return out

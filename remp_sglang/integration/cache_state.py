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

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from .step_boundary import RequestRecord

TREE_CORE_ENV = "SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND"


@dataclass
class CachedPath:
    """A root-to-leaf path of the radix tree: its tokens and their KV slots."""

    tokens: list[int]
    slots: list[int]
    extra_key: str | None
    cache_salt: str | None


@dataclass
class CacheState:
    paths: list[CachedPath]  # least recently used first
    free_pages: list[int]
    release_pages: list[int]
    free_request_slots: list[int]
    requests: list[RequestRecord] = field(default_factory=list)  # queued, in order
    engine_paused: bool = False  # SGLang's pause_generation flag, for joining ranks
    new_token_ratio: float = 1.0  # SGLang's admission estimate, the same on every rank

    @property
    def slots(self) -> list[int]:
        """The KV slots the tree holds, sorted: the rows a reshape carries over."""
        return sorted({s for p in self.paths for s in p.slots})

    @property
    def cached_tokens(self) -> int:
        """Distinct slots held by the tree (shared prefixes counted once)."""
        return len(self.slots)

    def remap(self, mapping: dict[int, int], new_size: int) -> CacheState:
        """The same state after slot compaction into a pool of `new_size` usable slots."""
        paths = [CachedPath(p.tokens, [mapping.get(s, s) for s in p.slots], p.extra_key,
                            p.cache_salt) for p in self.paths]
        moved = CacheState(paths, [], [], self.free_request_slots, self.requests,
                           self.engine_paused, self.new_token_ratio)
        used = set(moved.slots)
        moved.free_pages = [s for s in range(1, new_size + 1) if s not in used]
        return moved


def encode_state(state: CacheState) -> bytes:
    """Plain JSON (request inputs as base64): nothing a reader could be made to run."""
    return msgspec.json.encode(state)


def decode_state(data: bytes, pool_size: int) -> CacheState:
    """The state rank zero exported, type-checked field by field and bounds-checked
    against the pool it describes; ValueError otherwise."""
    try:
        state = msgspec.json.decode(data, type=CacheState)
    except msgspec.ValidationError as error:
        raise ValueError(f"malformed cache state: {error}") from error
    for name, slots in (("free_pages", state.free_pages), ("release_pages", state.release_pages),
                        ("slots", state.slots)):
        if slots and (min(slots) < 0 or max(slots) > pool_size):
            raise ValueError(f"cache state: {name} outside the pool's {pool_size} slots")
    if any(len(p.tokens) != len(p.slots) for p in state.paths):
        raise ValueError("cache state: a path's tokens and slots differ in length")
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
    """Rank zero's tree paths (LRU order) and free lists, as plain Python data."""
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType

    root = _tree_core(scheduler).root_node
    leaves: list[tuple[float, CachedPath]] = []
    stack: list[tuple[Any, list[int], list[int]]] = [(root, [], [])]
    while stack:
        node, tokens, slots = stack.pop()
        if node is not root:
            value = node.component_data[ComponentType.FULL].value
            if value is None:
                raise ValueError("remp: the radix tree holds evicted (host-only) nodes")
            tokens = tokens + list(node.key.raw_token_ids())
            slots = slots + value.cpu().tolist()
        if not node.children and node is not root:
            key = node.key
            leaves.append((node.last_access_time,
                           CachedPath(tokens, slots, key.extra_key, key.cache_salt)))
        for child in node.children.values():
            stack.append((child, tokens, slots))
    leaves.sort(key=lambda item: item[0])
    alloc = scheduler.token_to_kv_pool_allocator
    return CacheState(
        paths=[p for _, p in leaves],
        free_pages=alloc.free_pages.cpu().tolist(),
        release_pages=alloc.release_pages.cpu().tolist(),
        free_request_slots=list(scheduler.req_to_token_pool.free_slots),
    )


def import_state(scheduler: Any, state: CacheState, pool_size: int) -> None:
    """Rebuild tree and free lists from an export (the same steps on every rank)."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    _tree_core(scheduler)
    tree, alloc = scheduler.tree_cache, scheduler.token_to_kv_pool_allocator
    tree.reset()
    device = alloc.free_pages.device
    for path in state.paths:
        key = RadixKey(array("q", path.tokens), extra_key=path.extra_key,
                       cache_salt=path.cache_salt)
        tree.insert(InsertParams(key=key, value=torch.tensor(path.slots, dtype=torch.int64,
                                                             device=device)))
    # Inserting paths that share a prefix reports duplicates but frees nothing: the free
    # lists below are authoritative.
    alloc.size = pool_size
    alloc.free_pages = torch.tensor(state.free_pages, dtype=torch.int64, device=device)
    alloc.release_pages = torch.tensor(state.release_pages, dtype=torch.int64, device=device)
    scheduler.req_to_token_pool.free_slots = list(state.free_request_slots)


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

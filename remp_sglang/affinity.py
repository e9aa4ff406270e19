"""Cache-aware dispatch over replicas: send a request to the replica whose prefix cache
most likely holds the longest prefix of its prompt (as SGLang's router does across
servers), unless that replica is much busier than the least busy one.

The index is approximate and local to the dispatcher: per replica, the chained hashes
of the prompt blocks it was sent (bounded, least recently used dropped first). After a
reshape every fed replica is taken to hold what any replica held (a split copies the
tree to every replica, a merge unions them). Pure Python: no torch, no sglang.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BLOCK = 32  # tokens per hashed block
CAPACITY = 1 << 16  # block hashes remembered per replica


def block_hashes(tokens: Sequence[int], block: int = BLOCK) -> list[bytes]:
    """Chained hashes of the prompt's whole blocks: equal lists share a prefix."""
    out, prev = [], b""
    for i in range(0, len(tokens) - block + 1, block):
        prev = hashlib.blake2b(prev + repr(tuple(tokens[i:i + block])).encode(),
                               digest_size=8).digest()
        out.append(prev)
    return out


@dataclass
class PrefixIndex:
    """Which blocks each replica was sent (approximately what its tree holds)."""

    capacity: int = CAPACITY
    held: dict[int, OrderedDict] = field(default_factory=dict)

    def match(self, replica: int, hashes: list[bytes]) -> int:
        """Leading blocks of `hashes` the replica holds."""
        seen = self.held.get(replica, {})
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def record(self, replica: int, hashes: list[bytes]) -> None:
        seen = self.held.setdefault(replica, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def reshaped(self, replicas: Sequence[int]) -> None:
        """A reshape: every fed replica holds the union of what any held."""
        union: OrderedDict = OrderedDict()
        for seen in self.held.values():
            union.update(seen)
        self.held = {r: OrderedDict(union) for r in replicas}


def choose(index: PrefixIndex, replicas: Sequence[int], hashes: list[bytes],
           load: dict[int, int], slack: int = 4, ratio: float = 1.5) -> int | None:
    """The replica with the longest cached prefix if it is not overloaded (its load at
    most `ratio` x the least loaded's + `slack`); None: no block matches anywhere or
    balance wins (the caller's own dispatch decides)."""
    if not hashes or not replicas:
        return None
    best = max(replicas, key=lambda r: (index.match(r, hashes), -load.get(r, 0)))
    if index.match(best, hashes) == 0:
        return None
    least = min(load.get(r, 0) for r in replicas)
    if load.get(best, 0) > ratio * least + slack:
        return None
    return best

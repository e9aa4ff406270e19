"""Cache-aware dispatch: the longest cached prefix wins unless balance says otherwise."""

from __future__ import annotations

from remp_sglang.affinity import BLOCK, PrefixIndex, block_hashes, choose


def doc(seed: int, n: int = 4 * BLOCK) -> list[int]:
    return [(seed * 131 + i * 7) % 1000 for i in range(n)]


def test_block_hashes_are_chained_prefixes():
    a, b = block_hashes(doc(1) + [1, 2, 3]), block_hashes(doc(1) + doc(2))
    assert len(a) == 4 and b[:4] == a and len(b) == 8
    assert block_hashes(doc(2))[0] != a[0]
    assert block_hashes(list(range(BLOCK - 1))) == []  # no whole block: nothing to match


def test_longest_prefix_wins_and_balance_overrides():
    index = PrefixIndex()
    index.record(0, block_hashes(doc(1)))
    index.record(1, block_hashes(doc(1)[:BLOCK]))  # only the first block
    q = block_hashes(doc(1) + doc(9))
    assert choose(index, [0, 1], q, {0: 0, 1: 0}) == 0
    assert choose(index, [0, 1], q, {0: 20, 1: 2}) is None  # too busy: balance decides
    assert choose(index, [0, 1], block_hashes(doc(5)), {}) is None  # nothing cached
    assert choose(index, [1], q, {}) == 1  # only replica 1 is fed


def test_reshape_gives_every_replica_the_union():
    index = PrefixIndex()
    index.record(0, block_hashes(doc(1)))
    index.record(1, block_hashes(doc(2)))
    index.reshaped([0])  # a merge into replica 0
    assert index.match(0, block_hashes(doc(2))) == 4
    index.reshaped([0, 1])  # a split copies
    assert index.match(1, block_hashes(doc(1))) == 4


def test_the_index_forgets_least_recently_sent_blocks():
    index = PrefixIndex(capacity=4)
    index.record(0, block_hashes(doc(1)))
    index.record(0, block_hashes(doc(2)))
    assert index.match(0, block_hashes(doc(1))) == 0 and index.match(0, block_hashes(doc(2))) == 4

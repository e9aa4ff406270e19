"""The exchange's message layout, without processes: what one rank posts to a peer must
match, message for message and byte for byte, what that peer posts for it, whichever
side of each item is direct."""

from __future__ import annotations

import random

import pytest

from remp_sglang.exchange import ALIGN, Item, _layout, schedule_rounds


def _noop(view) -> None:
    pass


def _item(rng: random.Random, world: int) -> Item:
    src, dst = rng.sample(range(world), 2)
    parts = rng.choice([0, 0, 1, 2])
    nbytes = rng.randrange(1, 64) * (parts or 1) * 4
    src_direct = bool(parts) and rng.random() < 0.5
    dst_direct = bool(parts) and (not src_direct or rng.random() < 0.5)
    return Item(src, dst, nbytes, _noop, _noop, parts=parts, src_direct=src_direct,
                dst_direct=dst_direct, views=lambda: [])


def _sizes(messages: list) -> list[int]:
    """Each message's bytes: a staging range, or a direct item's parts."""
    out = []
    for m in messages:
        if isinstance(m, Item):
            out += [m.nbytes // m.parts] * m.parts
        else:
            out.append(m[1] - m[0])
    return out


@pytest.mark.parametrize("seed", range(20))
def test_every_pair_posts_matching_messages(seed):
    rng = random.Random(seed)
    world = rng.choice([2, 3, 4])
    items = [_item(rng, world) for _ in range(rng.randrange(1, 30))]
    for round_items in schedule_rounds(items, 4096):
        rounds = {r: _layout(round_items, r) for r in range(world)}
        for a in range(world):
            for b in range(world):
                sent = _sizes(rounds[a].sends.get(b, []))
                assert sent == _sizes(rounds[b].recvs.get(a, [])), (seed, a, b)
        for r, lay in rounds.items():
            # staged items lie apart inside the half, aligned; direct sides take none
            spans = sorted((off, off + it.padded) for it, off, _ in lay.placed)
            assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:], strict=False))
            assert all(off % ALIGN == 0 for _, off, _ in lay.placed)
            assert lay.half == sum(it.padded for it, _, _ in lay.placed)
            staged = {id(it) for it, _, _ in lay.placed}
            for it in round_items:
                direct = it.src_direct if it.src == r else it.dst_direct
                if r in (it.src, it.dst):
                    assert (id(it) in staged) != direct, (seed, r)


def test_an_item_with_a_direct_side_needs_parts():
    bad = Item(0, 1, 64, _noop, _noop, src_direct=True)
    with pytest.raises(ValueError, match="parts"):
        schedule_rounds([bad], 4096)
    with pytest.raises(ValueError, match="parts"):
        schedule_rounds([Item(0, 1, 63, _noop, _noop, parts=2)], 4096)

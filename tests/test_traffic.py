"""`Outcome`'s gaps: what a streaming client saw, and what lay between two tokens."""

from __future__ import annotations

from remp_sglang.testing.traffic import Job, Outcome


def outcome(times: list[float], tokens: list[int]) -> Outcome:
    return Outcome(Job("chat_stream", (), "", 8), chunk_times=times, chunk_tokens=tokens)


def test_token_gaps_leave_out_chunks_that_carry_several_tokens():
    # tokens 1, 2 arrive apart; 3-5 come in one chunk (text held back); then 6
    o = outcome([0.0, 0.01, 0.20, 0.21], [1, 2, 5, 6])
    assert o.token_gaps() == [(0.0, 0.01), (0.20, 0.21)]
    assert o.gap_around(0.05, 0.15) == (0.01, 0.20)  # the chunk gap over the pause
    assert o.gap_around(0.05, 0.15, tokens=True) is None  # no two tokens seen apart there


def test_the_token_gap_that_holds_a_pause():
    o = outcome([0.0, 0.01, 0.08, 0.09], [1, 2, 3, 4])
    assert o.gap_around(0.02, 0.05, tokens=True) == (0.01, 0.08)
    assert outcome([0.0, 0.01], []).token_gaps() == []  # no counts: no token gaps

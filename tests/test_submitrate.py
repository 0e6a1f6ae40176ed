"""The per-uid submission rate (leafmail.submitrate), with the clock moved by the test."""

from __future__ import annotations

from leafmail.submitrate import MAX_TRACKED, SubmitRate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_limit_then_refused_then_refilled_at_the_rate() -> None:
    clock = Clock()
    rate = SubmitRate(3, 60.0, clock=clock)
    assert [rate.take(1001) for _ in range(3)] == [None, None, None]
    refused = rate.take(1001)
    assert refused == "uid 1001 submitted more than 3 messages in 60 s; try again in 20 s"
    assert rate.take(1002) is None  # another user has a bucket of its own
    clock.now += 19.0
    assert rate.take(1001) is not None  # not yet a whole message's worth
    clock.now += 1.0
    assert rate.take(1001) is None  # one refilled after 60/3 s ...
    assert rate.take(1001) is not None  # ... and only one
    clock.now += 3600.0
    assert [rate.take(1001) for _ in range(4)] == [None, None, None, refused]  # never > 3


def test_exempt_uids_and_a_zero_limit_are_never_counted() -> None:
    rate = SubmitRate(1, 60.0, exempt={0, 107}, clock=Clock())
    assert all(rate.take(uid) is None for uid in (0, 107) for _ in range(10))
    assert rate.take(1001) is None and rate.take(1001) is not None
    off = SubmitRate(0, 60.0, clock=Clock())
    assert all(off.take(1001) is None for _ in range(1000))


def test_the_table_forgets_full_buckets_so_it_stays_bounded() -> None:
    clock = Clock()
    rate = SubmitRate(2, 1.0, clock=clock)
    for uid in range(MAX_TRACKED):
        assert rate.take(uid) is None
        clock.now += 1.0  # each earlier bucket has refilled by the next take
    assert rate.take(MAX_TRACKED) is None
    assert rate.tracked <= 2

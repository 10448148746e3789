"""The bandwidth cap's bucket: a cap changed while a taker waits applies to that taker at once
(on a fake clock whose long sleeps never end by themselves)."""

import asyncio

import pytest

from orchestrator.transport.bucket import TokenBucket

MIB = 1 << 20


class FakeTime:
    """A clock that moves only by sleeps; a sleep longer than `hang_s` never returns."""

    def __init__(self, hang_s: float = 1000.0) -> None:
        self.now = 0.0
        self.hang_s = hang_s
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds > self.hang_s:
            await asyncio.get_running_loop().create_future()
        self.now += seconds

    def bucket(self, rate: float | None, burst: float | None = None) -> TokenBucket:
        return TokenBucket(rate, burst=burst, clock=self.clock, sleep=self.sleep)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def debt_of_a_mebibyte(t: FakeTime, rate: float) -> tuple[TokenBucket, asyncio.Task]:
    bucket = t.bucket(rate)
    await bucket.take(MIB)  # goes at once, leaving a mebibyte of debt
    waiter = asyncio.create_task(bucket.take(MIB))
    await settle()
    assert not waiter.done() and t.sleeps == [pytest.approx(MIB / rate - bucket.burst / rate)]
    return bucket, waiter


async def test_lifting_the_cap_releases_a_waiting_taker_at_once():
    t = FakeTime()
    bucket, waiter = await debt_of_a_mebibyte(t, rate=1)  # about twelve days at 1 B/s
    bucket.set_rate(None)
    await settle()
    assert waiter.done() and t.now == 0 and bucket.rate is None
    await bucket.take(100 * MIB)  # uncapped: nobody waits
    assert len(t.sleeps) == 1


async def test_raising_the_cap_recomputes_the_wait_from_the_new_rate():
    t = FakeTime()
    bucket, waiter = await debt_of_a_mebibyte(t, rate=1)
    bucket.set_rate(MIB)
    await settle()
    assert waiter.done()
    assert t.sleeps[1:] == [pytest.approx(1.0, rel=1e-3)], "the old debt, paid at the new rate"


async def test_a_waiting_taker_stays_waiting_while_the_cap_holds():
    t = FakeTime()
    bucket, waiter = await debt_of_a_mebibyte(t, rate=1)
    await settle()
    assert not waiter.done(), "without a change, the debt still has to be waited off"
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    bucket.set_rate(None)
    await bucket.take(1)  # the cancelled taker left the bucket usable


async def test_a_cap_set_after_none_starts_with_a_full_burst():
    t = FakeTime()
    bucket = t.bucket(None)
    await bucket.take(10 * MIB)
    bucket.set_rate(1000)
    await bucket.take(500)  # the burst (100 bytes) lets the first frame go
    await bucket.take(1)
    assert t.sleeps == [pytest.approx(0.4)]  # (500 - 100) bytes of debt at 1000 B/s


@pytest.mark.parametrize("rate", [0, -1.0])
def test_a_cap_must_be_positive_or_none(rate):
    with pytest.raises(ValueError, match="positive or None"):
        TokenBucket(rate)

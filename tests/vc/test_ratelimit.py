"""Token bucket and backoff on trio's (mock) clock."""

from __future__ import annotations

import pytest
import trio.testing

from shimv2.vc.ratelimit import Backoff, TokenBucket


async def test_token_bucket_burst_then_rate(mock_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=5, burst=10)
    assert sum(bucket.take() for _ in range(100)) == 10
    assert bucket.wait_time() == pytest.approx(0.2)
    mock_clock.jump(1.0)
    assert sum(bucket.take() for _ in range(100)) == 5
    mock_clock.jump(1000)
    assert sum(bucket.take() for _ in range(100)) == 10  # never more than the burst
    with pytest.raises(ValueError, match="bad token bucket"):
        TokenBucket(rate=0, burst=1)


def test_backoff_doubles_up_to_its_limit_and_resets() -> None:
    backoff = Backoff(first=0.1, limit=1.0)
    assert [backoff.next() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.reset()
    assert backoff.next() == 0.1

"""Pacing for loops fed by the guest, which may answer as fast as it likes.

A loop that relays what the guest sends (OOM events) takes a token per item
and drops what exceeds the rate; a loop that retries a failing guest call
waits longer each time. Both read trio's clock, so tests can drive them.
"""

from __future__ import annotations

import trio


class TokenBucket:
    """At most ``burst`` at once, then ``rate`` a second on average."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"bad token bucket: rate {rate}, burst {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None

    def _refill(self) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        """Take a token if there is one."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until a token is there."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)


class Backoff:
    """Delays that double from ``first`` up to ``limit``; ``reset`` after a success."""

    def __init__(self, first: float = 0.1, limit: float = 10.0) -> None:
        self.first = first
        self.limit = limit
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(delay * 2, self.limit)
        return delay

    def reset(self) -> None:
        self._next = self.first

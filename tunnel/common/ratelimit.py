"""A token bucket: the one rate limiter behind the relay's open limits and the mux's flood
limits. Pure and clock-free: every call passes the time, so callers inject their clock."""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` events per second on average, bursts of up to ``burst`` events.

    Refilled lazily from the time passed in, so it costs nothing while idle; a time that
    does not move forward refills nothing.
    """

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

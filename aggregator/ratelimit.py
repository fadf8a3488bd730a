"""Per-sender token buckets: the message rate limit of [security] rate_limit / rate_burst."""

from __future__ import annotations


class TokenBuckets:
    """One bucket per sender: ``burst`` tokens, refilled at ``rate`` per second, one token per message.

    ``rate`` 0 turns the limit off. Times are the caller's clock (seconds),
    so the rule has no clock of its own and tests drive it directly.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, time of last refill)

    def allow(self, sender: str | None, now: float) -> bool:
        """Take a token of ``sender`` at ``now``; False when it has none left (the message is dropped)."""
        if not self.rate or sender is None:
            return True
        tokens, last = self._buckets.get(sender, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[sender] = (tokens, now)
            return False
        self._buckets[sender] = (tokens - 1.0, now)
        return True

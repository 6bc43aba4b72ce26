"""Per-user rate limits: at most N actions of a kind per key in any minute (a sliding window).

A sliding window log rather than a token bucket: "20 messages a minute" then means exactly that (no
burst of 20 followed by one every 3 s), and the time to wait is exact: until the oldest counted
action leaves the window. The log holds at most N timestamps per key, so memory is bounded by the
active keys; keys with nothing in the window are swept now and then.

Thread-safe (Gradio runs each event on a worker thread); the clock is injectable so tests step time
by hand instead of sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

# The window every limit is counted over: the flags and messages speak of "a minute".
WINDOW_S = 60.0
# The chat's defaults (`--rate-limit-messages`, `--rate-limit-votes`; 0 turns one off). Nobody reads two
# replies every 2 s for a minute, but a script sending in a loop does 30 in seconds. A pair takes at
# most four judgments (a vote, two thumbs, a better reply), so the judgments' limit is four times the
# messages': someone who judges every pair fully never meets it first.
DEFAULT_MESSAGES_PER_MINUTE = 30
DEFAULT_VOTES_PER_MINUTE = 120
# Sweep keys whose window is empty once every this many checks (a browser tab that went away leaves one).
SWEEP_EVERY = 1024


class RateLimiter:
    """At most `limit` acquisitions per key in any `window_s` seconds."""

    def __init__(self, limit: int, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        if limit < 1:
            raise ValueError(f"limit {limit} must be at least 1 (no limiter at all means no limit)")
        if window_s <= 0:
            raise ValueError(f"window_s {window_s} must be positive")
        self.limit = limit
        self.window_s = window_s
        self.clock = clock  # seconds, monotonic; tests step their own
        self._lock = threading.Lock()
        self._events: dict[Hashable, deque[float]] = {}
        self._checks = 0

    def acquire(self, key: Hashable) -> float:
        """Count one action for `key` and return 0.0, or, past the limit, count nothing and return the
        seconds until one more would be allowed."""
        with self._lock:
            now = self.clock()
            self._checks += 1
            if self._checks % SWEEP_EVERY == 0:
                self._sweep(now)
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.window_s:
                events.popleft()
            if len(events) >= self.limit:
                return events[0] + self.window_s - now  # > 0: older events left the window above
            events.append(now)
            return 0.0

    def _sweep(self, now: float) -> None:
        for key in [k for k, e in self._events.items() if not e or e[-1] <= now - self.window_s]:
            del self._events[key]

    def keys(self) -> int:
        """Keys with a log kept (for tests: the sweep bounds memory)."""
        with self._lock:
            return len(self._events)


def wait_text(seconds: float) -> str:
    """Seconds to wait as a person reads them: whole seconds, rounded up, never "0 s"."""
    return f"{max(1, math.ceil(seconds))} s"

"""Refusals, logged so that a flood of them stays readable and cheap. Pure: no I/O but the log."""

from __future__ import annotations

import logging
import time

INTERVAL_S = 10.0
_KEYS_LIMIT = 10_000


class RefusalLog:
    """Warn about refused requests at most once per interval for the same kind of refusal.

    A misconfigured or hostile client can be refused thousands of times a second; the log
    must stay readable. Suppressed repeats are counted into the next line of the same kind.
    """

    def __init__(self, log: logging.Logger, interval_s: float = INTERVAL_S) -> None:
        self._log = log
        self._interval = interval_s
        self._last: dict[tuple[str, ...], tuple[float, int]] = {}

    def warn(self, key: tuple[str, ...], message: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-self._interval, 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > _KEYS_LIMIT:
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            self._log.warning(message + " (and %d more like it)", *args, suppressed)
        else:
            self._log.warning(message, *args)

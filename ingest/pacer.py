"""Per-host request pacing for a whole crawl, not per unit.

A crawl runs many small units at once, on many machines, and popular image hosts turn up in
most of them. A host's pace (`per_host_rps`, or its robots.txt Crawl-delay when longer) must hold
for the crawl as a whole: paced per unit, a host asking for one request every 10 s would get one
per 10 s from every running unit. One small Ray actor on the driver's node hands out start times:
`reserve(host, interval)` books the host's next free start and says how long to wait for it.
A call costs a Ray round trip (0.8 ms from one thread on the 2-core development machine), made only
for hosts that have a pace at all (per_host_rps 0 and no Crawl-delay: no call). Its clock is the only clock, so
machines need not agree on the time.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

FORGET_AFTER = 100_000  # hosts booked; past bookings are then dropped so memory stays bounded


class PaceBook:
    """Each host's next free request start: the state both pacers share."""

    def __init__(self):
        self._next: dict[str, float] = {}
        self._forget_after = FORGET_AFTER

    def reserve(self, host: str, interval: float) -> float:
        """Book the host's next start, `interval` seconds after the previous booking; seconds to wait."""
        now = time.monotonic()
        if len(self._next) > self._forget_after:
            self._next = {h: t for h, t in self._next.items() if t > now}
            # still many hosts booked ahead: prune again only when the book has doubled
            self._forget_after = max(FORGET_AFTER, 2 * len(self._next))
        start = max(now, self._next.get(host, now))
        self._next[host] = start + interval
        return start - now


class LocalPacer:
    """The pace book of one process (a crawl unit run outside Ray, or a crawl without an actor)."""

    def __init__(self):
        self._book, self._lock = PaceBook(), threading.Lock()

    def __call__(self, host: str, interval: float) -> float:
        with self._lock:
            return self._book.reserve(host, interval)


class PacerActor:
    """The crawl's pace book as a Ray actor (async: calls are served one at a time, never blocked)."""

    def __init__(self):
        self._book = PaceBook()

    async def reserve(self, host: str, interval: float) -> float:
        return self._book.reserve(host, interval)


def start_pacer() -> Any:
    """A PacerActor on this (the driver's) node, which lives as long as the crawl."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(PacerActor).options(
        num_cpus=0, max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()


class SharedPacer:
    """Books through the crawl's actor; if the actor cannot be reached, paces within this unit
    (a warning, once) rather than losing the unit."""

    def __init__(self, actor: Any, timeout: float = 30.0):
        import ray

        self._actor, self._timeout, self._get = actor, timeout, ray.get
        self._fallback: Optional[LocalPacer] = None

    def __call__(self, host: str, interval: float) -> float:
        if self._fallback is None:
            try:
                return self._get(self._actor.reserve.remote(host, interval), timeout=self._timeout)
            except Exception as e:  # actor lost or Ray shutting down
                log.warning("the crawl's host pacer is unreachable (%r): pacing hosts within this unit only", e)
                self._fallback = LocalPacer()
        return self._fallback(host, interval)

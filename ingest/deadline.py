"""Wall-clock deadlines for HTTP requests: connect, TLS, headers and the whole body, redirects included.

A socket timeout (the crawl's `timeout`, passed to requests) bounds each connect and each read, not
the request: a server sending one byte a little before every read would time out holds a download
thread for as long as it likes (a 45-byte body sent at 1 byte/s held its unit 45 s under
`--timeout 2`). Here each request gets a deadline, and one watchdog thread per process shuts the
request's socket down when it passes; that wakes the blocked read at once, and the caller, seeing
`expired`, reports a timeout (a body cut this way can look complete, so callers must check).

A unit's requests form one `Deadlines` group: `cancel()` ends every request of the unit in flight,
so a unit that stops (idle) is not held by its slowest request.
"""
from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

TICK_S = 0.05  # the watchdog's resolution
_current = threading.local()  # the deadline of the request this thread is making


class RequestDeadline:
    """One request's deadline and the connection it is using now."""

    def __init__(self, seconds: float, expired: bool = False):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = expired
        self.armed = True
        self._conn = None
        self._lock = threading.Lock()

    def attach(self, conn) -> None:
        """Called by the connection a request is about to use (safety.py's connection classes). Only
        the latest one is kept: an earlier redirect hop's connection is back in its pool."""
        with self._lock:
            self._conn = conn
            if self.expired:
                _shut(conn)

    def expire(self) -> None:
        with self._lock:
            if not self.armed or self.expired:
                return
            self.expired = True
            if self._conn is not None:
                _shut(self._conn)

    def disarm(self) -> None:
        """Stop watching: call before the response is closed, so that the connection is never shut once
        it is back in the pool. (A deadline passing between the body's last byte and this call may still
        shut it as the pool takes it back: the next request on it then fails as a connection error.)"""
        with self._lock:
            self.armed = False
            self._conn = None


def _shut(conn) -> None:
    """Shut a urllib3 connection's socket down (both ways) without closing it: the thread blocked on it
    wakes with EOF or an error, and closing stays with its owner.

    Done on the file descriptor recorded at connect time: once the headers are read `conn.sock` may be
    None (http.client drops it when the server will close) while the response still reads from it,
    and during a TLS handshake it is the plain socket ssl has detached. The descriptor is checked to
    be the same TCP connection (both addresses), in case it was closed and its number reused."""
    recorded = getattr(conn, "deadline_socket", None)
    if recorded is None:
        return  # not connected yet: the connect itself is bounded by the socket timeout
    fd, local, peer = recorded
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return  # closed, and not a socket any more
    try:
        if sock.getsockname() == local and sock.getpeername() == peer:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # the descriptor still belongs to the connection


def current() -> RequestDeadline | None:
    return getattr(_current, "deadline", None)


def attach_current(conn) -> None:
    """Register `conn` with this thread's request, if it has a deadline."""
    d = current()
    if d is not None:
        d.attach(conn)


class Deadlines:
    """The requests of one work unit: each gets `seconds`, and `cancel()` ends them all (and any later one)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.cancelled = False
        self._active: set[RequestDeadline] = set()
        self._lock = threading.Lock()

    @contextmanager
    def request(self) -> Iterator[RequestDeadline]:
        """The deadline of a request made in this block; a block inside another request's (a redirect
        hop, requests' own calls) shares the outer deadline."""
        outer = current()
        if outer is not None:
            yield outer
            return
        d = RequestDeadline(self.seconds, expired=self.cancelled)
        with self._lock:
            self._active.add(d)
        _WATCHDOG.watch(d)
        _current.deadline = d
        try:
            yield d
        finally:
            _current.deadline = None
            d.disarm()
            with self._lock:
                self._active.discard(d)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            active = list(self._active)
        for d in active:
            d.expire()


class _Watchdog:
    """One thread per process expiring deadlines in time order (a heap; disarmed entries wait there
    until their time, holding nothing)."""

    def __init__(self):
        self._heap: list = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, d: RequestDeadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (d.end, next(self._order), d))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="request-deadlines", daemon=True)
                self._thread.start()
            # the thread sleeps until the earliest deadline: wake it only when this one is earlier. A crawl
            # unit's deadlines all last the same, so they arrive in time order and almost never wake it
            # (woken on every request, it showed in py-spy as the download threads waiting on this lock;
            # the CPU per image did not change measurably either way, docs/CRAWL.md)
            if self._heap[0][2] is d:
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    heapq.heappop(self._heap)[2].expire()
                # at most TICK_S apart: a steady stream of requests leaves one deadline every few ms, and
                # waking for each would cost what not notifying saves; a deadline ends <= TICK_S late
                self._cond.wait(max(self._heap[0][0] - now, TICK_S) if self._heap else None)


_WATCHDOG = _Watchdog()

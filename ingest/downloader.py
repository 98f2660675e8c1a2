"""Our icrawler downloader: polite fetching, validation, and samples buffered for one shard.

icrawler 0.6.10's own downloader has a fixed browser User-Agent, no backoff, no byte cap, writes
loose files from many threads, and its threads quit early when the parser is slow
(docs/CRAWL.md). We keep icrawler's feeders and parsers and replace the download step: each
image is fetched (retries with backoff on 429/5xx and network errors, a per-host limit, robots.txt
and opt-outs honoured), cleaned by `validator.clean_image`, and handed whole to a `UnitSink`, which keeps one
sample per content key under a lock, so the shard is written once, by one thread, at the end.
"""
from __future__ import annotations

import logging
import queue
import random
import re
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import urlsplit

import requests
from icrawler import ImageDownloader
from icrawler.storage import BaseStorage
from urllib3.exceptions import NameResolutionError

from maskless.ingest.deadline import Deadlines
from maskless.ingest.pacer import LocalPacer, SharedPacer
from maskless.ingest.robots import RobotsCache, RobotsStore, site_of
from maskless.ingest.safety import RefusedAddress
from maskless.core.shards import Sample
from maskless.ingest.validator import PixelBudget, Rejected, clean_image

logger = logging.getLogger(__name__)

MAX_LOGGED_REJECTS = 2000  # per unit; counts by reason are always complete
AGENT = "maskless"  # our product token, matched by robots.txt groups and X-Robots-Tag scopes
_VALUED_DIRECTIVES = {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}


def robots_opt_out(header: str | None, agent: str = AGENT) -> bool:
    """True when an X-Robots-Tag value says noai / noimageai for every agent or for ours.

    Directives may be scoped: `otherbot: noai` applies to otherbot only, until the next scope."""
    if not header:
        return False
    scope = None
    for part in header.split(","):
        part = part.strip().lower()
        m = re.match(r"^([a-z0-9_.\-*]+)\s*:\s*(.*)$", part)
        if m and m.group(1) not in _VALUED_DIRECTIVES:
            scope, part = m.group(1), m.group(2).strip()
        if part in ("noai", "noimageai") and scope in (None, "*", agent):
            return True
    return False


class HostLimiter:
    """At most `concurrency` requests at once per host (in this unit), and request starts `1/rate`
    seconds apart, or the host's own delay (its robots.txt Crawl-delay) when longer, booked with
    `pacer` (ingest/pacer.py): the crawl's shared pace book, so that pace holds for the whole crawl."""

    def __init__(self, concurrency: int, rate: float, pacer: Callable[[str, float], float] | None = None):
        self.concurrency, self.rate = concurrency, rate
        self._pacer = pacer or LocalPacer()
        self._lock = threading.Lock()
        self._sems: dict[str, threading.Semaphore] = {}
        self._delay: dict[str, float] = {}

    def set_delay(self, host: str, seconds: float) -> None:
        with self._lock:
            self._delay[host] = seconds

    @contextmanager
    def slot(self, host: str):
        with self._lock:
            sem = self._sems.setdefault(host, threading.Semaphore(self.concurrency))
        with sem:
            with self._lock:
                interval = max(1.0 / self.rate if self.rate > 0 else 0.0, self._delay.get(host, 0.0))
            if interval > 0:
                time.sleep(max(0.0, self._pacer(host, interval)))
            yield


def fetch(session: requests.Session, url: str, *, timeout: float, deadlines: Deadlines, max_bytes: int,
          retries: int, backoff: float, max_backoff: float, respect_noai: bool, limiter: HostLimiter,
          agent: str = AGENT, html_ok: bool = False,
          sleep: Callable[[float], None] = time.sleep) -> tuple[bytes, str]:
    """GET an image body (any body with html_ok); (bytes, final url) or Rejected with the reason of
    the last attempt. `timeout` bounds each connect and read; each attempt, redirects included, ends
    by its deadline from `deadlines` (deadline.py)."""
    host = urlsplit(url).hostname or ""
    attempt = 0
    while True:
        retry_after = 0.0
        try:
            with limiter.slot(host), deadlines.request() as d:
                try:
                    return _get_once(session, url, timeout, max_bytes, respect_noai, agent, html_ok, d)
                except requests.RequestException:
                    if d.expired:
                        raise requests.Timeout(f"not complete after {d.seconds:.1f} s") from None
                    raise
        except _Retryable as e:
            reason, retry_after = e.reason, e.retry_after
        except RefusedAddress as e:
            raise Rejected("refused_private", str(e)) from None
        except requests.TooManyRedirects:
            raise Rejected("too_many_redirects") from None
        except requests.Timeout:
            reason = "timeout"
        except requests.ConnectionError as e:
            if _caused_by(e, NameResolutionError):
                reason = "dns_error"
            else:
                reason = "timeout" if "timed out" in str(e).lower() else "connection_error"
        except requests.RequestException as e:
            raise Rejected("bad_url", str(e)) from None
        if attempt >= retries:
            raise Rejected(reason)
        delay = backoff * 2 ** attempt * random.uniform(0.8, 1.2)
        sleep(min(max_backoff, max(retry_after, delay)))  # Retry-After is a floor, max_backoff the cap
        attempt += 1


def _caused_by(e: BaseException, kind: type) -> bool:
    """True when `kind` is somewhere in e's chain: requests wraps urllib3's errors in args and .reason."""
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, kind):
            return True
        todo += [x.__cause__, x.__context__, getattr(x, "reason", None)]
        todo += [a for a in getattr(x, "args", ()) if isinstance(a, BaseException)]
    return False


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float = 0.0):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float:
    """Seconds a Retry-After header asks for: delay-seconds or an HTTP date (RFC 9110 10.2.3);
    0 when absent, unreadable or past."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))  # delay-seconds (fractions accepted)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when.tzinfo is None:  # an HTTP date is GMT; parsedate gives naive for "-0000"
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def _get_once(session, url, timeout, max_bytes, respect_noai, agent, html_ok, d) -> tuple[bytes, str]:
    with session.get(url, timeout=timeout, stream=True) as resp:
        try:
            status = resp.status_code
            if status == 429 or status >= 500:
                raise _Retryable(f"http_{status}", retry_after_seconds(resp.headers.get("Retry-After")))
            if status != 200:
                raise Rejected(f"http_{status}")
            if respect_noai and robots_opt_out(resp.headers.get("X-Robots-Tag"), agent):
                raise Rejected("noai", "X-Robots-Tag opts out of AI use")
            if not html_ok and resp.headers.get("Content-Type", "").lower().startswith("text/html"):
                raise Rejected("not_image", "Content-Type text/html")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise Rejected("too_large", f"Content-Length {length} > {max_bytes}")
            chunks, size = [], 0
            for chunk in resp.iter_content(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise Rejected("too_large", f"more than {max_bytes} bytes")
        finally:
            d.disarm()  # before the response goes back to the pool
        if d.expired:  # the deadline shut the socket: what was read may look complete but is cut
            raise requests.Timeout(f"not complete after {d.seconds:.1f} s")
        return b"".join(chunks), resp.url


class UnitSink(BaseStorage):
    """Everything one work unit produced: its samples (one per content key) and its counts.

    It stands in icrawler's storage slot; `write` takes a whole Sample, under a lock."""

    def __init__(self):
        self.samples: dict[str, Sample] = {}
        self.ranks: dict[str, int] = {}  # a sample's first position in the engine's results
        self.counts: Counter = Counter()
        self.rejected: Counter = Counter()
        self.rejects: list[dict] = []
        self.lock = threading.Lock()

    def write(self, id: str, data: Sample, rank: int = 0) -> bool:
        """Keep a sample; a second copy of the same content only adds its labels. True when new."""
        with self.lock:
            old = self.samples.get(id)
            if old is None:
                self.samples[id], self.ranks[id] = data, rank
                self.counts["accepted"] += 1
                return True
            old.meta["labels"] = sorted(set(old.meta["labels"]) | set(data.meta["labels"]))
            self.ranks[id] = min(self.ranks[id], rank)
            self.counts["duplicates"] += 1
            return False

    def first(self, limit: int) -> list[str]:
        """Keys of the `limit` samples that came first in the results (all when limit is 0), sorted.

        Downloads finish in any order and the ones in flight when the window fills still land, so
        which samples a unit holds would depend on timing; keeping the first ones by result rank
        makes a unit's shard the same on every run that gets the same answers."""
        with self.lock:
            keys = sorted(self.samples, key=lambda k: (self.ranks[k], k))
        return sorted(keys[:limit] if limit else keys)

    def exists(self, id: str) -> bool:
        with self.lock:
            return id in self.samples

    def max_file_idx(self) -> int:
        return 0

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def reject(self, url: str, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1
            if len(self.rejects) < MAX_LOGGED_REJECTS:
                self.rejects.append({"url": url, "reason": reason})


class MasklessDownloader(ImageDownloader):
    """Fetch, validate and buffer; options come through the crawler's `extra_downloader_args`."""

    def __init__(self, thread_num, signal, session, storage, *, options: dict, unit: dict,
                 labels_for: Callable[[str], list[str]]):
        super().__init__(thread_num, signal, session, storage)
        self.options, self.unit, self.labels_for = options, unit, labels_for
        o = options
        pacer = SharedPacer(o["pacer"]) if o.get("pacer") is not None else None  # None: this unit's own pace
        self.limiter = HostLimiter(o["per_host_concurrency"], o["per_host_rps"], pacer)
        store = RobotsStore(o["robots_store"]) if o.get("robots_store") else None
        self.robots = RobotsCache(self._fetch_robots, store)
        self.deadlines = Deadlines(o["request_deadline"])  # the unit's requests; run_unit cancels them on an idle stop
        # decoded pixels in flight: the crawl worker's budget, shared by the units it runs at once, else the unit's
        self.pixels = o.get("pixel_budget") or PixelBudget(o["decode_pixels"])

    def _fetch_robots(self, url: str) -> bytes:
        self.storage.count("robots_fetched")
        # read whatever its Content-Type: some servers send real rules as text/html
        return self._fetch(url, respect_noai=False, html_ok=True)[0]

    def _fetch(self, url: str, respect_noai: bool, html_ok: bool = False) -> tuple[bytes, str]:
        o = self.options
        return fetch(self.session, url, timeout=o["timeout"], deadlines=self.deadlines, max_bytes=o["max_bytes"],
                     retries=o["retries"], backoff=o["backoff"], max_backoff=o["max_backoff"],
                     respect_noai=respect_noai, limiter=self.limiter, html_ok=html_ok)

    def robots_refusal(self, url: str) -> str | None:
        """None when robots.txt lets us fetch `url` (its Crawl-delay then paces the host), else why not."""
        if not self.options["respect_robots"]:
            return None
        rules = self.robots.rules(url)
        reason = rules.check(url, AGENT)
        if reason is None:
            delay = rules.delay(AGENT)
            if delay > self.options["max_crawl_delay"]:
                return "crawl_delay"
            self.limiter.set_delay(urlsplit(url).hostname or "", delay)
        return reason

    def download(self, task, default_ext, timeout=5, max_retry=3, overwrite=False, **kwargs) -> bool:
        o, sink, url = self.options, self.storage, task["file_url"]
        sink.count("found")
        try:
            refusal = self.robots_refusal(url)
            if refusal:
                raise Rejected(refusal)
            body, final_url = self._fetch(url, respect_noai=o["respect_noai"])
            # a redirect to another site: that site's robots.txt decides whether we keep the image
            if site_of(final_url) != site_of(url) and (refusal := self.robots_refusal(final_url)):
                raise Rejected(refusal)
            sink.count("downloaded")
            sink.count("bytes", len(body))
            img = clean_image(body, o["image_size"], o["jpeg_quality"], o["min_size"], o["max_pixels"], self.pixels)
        except Rejected as e:
            sink.reject(url, e.reason)
            return False
        except Exception as e:  # a bug or an unexpected library error must not kill the thread
            logger.warning("unexpected error on %s: %r", url, e)
            sink.reject(url, "error")
            return False
        meta = {
            "labels": sorted(set(self.labels_for(url))), "width": img.width, "height": img.height,
            "sha256": img.sha256, "phash": img.phash, "colour": img.colour, "url": url,
            "engine": self.unit["engine"], "query": self.unit["query"], "unit": self.unit["name"],
            "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_width": img.source_width, "source_height": img.source_height,
            "source_format": img.source_format,
        }
        if final_url != url:
            meta["final_url"] = final_url
        key = img.sha256[:24]
        new = sink.write(key, Sample(key=key, jpg=img.jpg, meta=meta), task.get("rank", 0))
        if new and self.max_num and len(sink.samples) >= self.max_num:
            self.signal.set(reach_max_num=True)
        return new

    def worker_exec(self, max_num, default_ext="jpg", queue_timeout=0.2, req_timeout=5, **kwargs):
        """Take tasks until the parser has finished and the queue is empty, or the window is full.

        Replaces icrawler's loop, which also quits after one idle poll once anything was fetched
        (losing every image of a slow second result page)."""
        self.max_num = max_num
        while not self.signal.get("reach_max_num"):
            try:
                task = self.in_queue.get(timeout=queue_timeout)
            except queue.Empty:
                if self.signal.get("parser_exited"):
                    break
                continue
            try:
                self.download(task, default_ext)
            finally:
                self.in_queue.task_done()

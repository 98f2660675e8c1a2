"""Work units and the icrawler feeder/parser pair behind each engine.

A unit is one (engine, query, result window): the smallest piece of a crawl that is retried,
resumed and written as one shard. Its name is a digest of what it fetches, so a rerun (or a Ray
retry on another node) finds the same unit under the same name.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import quote_plus
from urllib.request import getproxies

from icrawler import Crawler
from icrawler.builtin.baidu import BaiduFeeder, BaiduParser
from icrawler.builtin.bing import BingFeeder, BingParser
from icrawler.builtin.flickr import FlickrFeeder, FlickrParser
from icrawler.builtin.google import GoogleFeeder, GoogleParser
from icrawler.builtin.greedy import GreedyFeeder, GreedyParser
from icrawler.builtin.urllist import PseudoParser
from icrawler.feeder import UrlListFeeder
from icrawler.utils import CachedQueue
from urllib3 import PoolManager

from maskless.ingest.downloader import MasklessDownloader, UnitSink
from maskless.ingest.local_engine import PAGE_SIZE
from maskless.ingest.reader import ListSlice
from maskless.ingest.safety import PINNED_POOL_CLASSES, SafeAdapter

QUEUE_POLL_S = 0.05  # how often idle feeder/parser/download threads look for the end of the unit
FLICKR_SIZES = ["large", "medium 800", "medium 640", "large 1600", "original", "medium"]
FLICKR_PAGE = 100  # results per Flickr search page we ask for (the API allows up to 500)


@dataclass(frozen=True)
class Unit:
    """One work unit. A URL-list unit carries a reference to its rows (`source`, read by the task),
    never the rows themselves: the driver's memory grows with the units, not with the URLs."""

    engine: str
    label: str          # the class of a search query; "" for url lists (labels per row)
    query: str          # a search query, a site, or a URL list's file name
    window: int
    offset: int
    count: int          # results to keep; 0: every row of the list slice
    source: Optional[ListSlice] = None

    @property
    def name(self) -> str:
        ident = "\n".join([self.engine, self.label, self.query, str(self.offset), str(self.count)]
                          + ([self.source.ident()] if self.source is not None else []))
        digest = hashlib.sha1(ident.encode()).hexdigest()[:10]
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.label or self.query)[:24].strip("_") or "list"
        return f"{self.engine}-{slug}-{digest}-w{self.window:05d}"

    def describe(self) -> dict:
        info = {"engine": self.engine, "class": self.label, "query": self.query, "window": self.window,
                "offset": self.offset, "count": self.count, "name": self.name}
        if self.source is not None:
            info["list"] = self.source.describe()
        return info


class LocalBingFeeder(BingFeeder):
    """Bing's feeder pointed at our loopback result server instead of bing.com."""

    def feed(self, keyword, offset, max_num, base_url, filters=None):
        for i in range(offset, offset + max_num, PAGE_SIZE):
            self.out_queue.put(f"{base_url}/images/async?q={quote_plus(keyword)}&first={i}")


class FlickrPageFeeder(FlickrFeeder):
    """The Flickr search pages holding one unit's results [offset, offset + count), found by offset
    (icrawler's feeder walks up to 40 pages from the first). Pages are FLICKR_PAGE results long and
    the planner aligns windows to them, so a short last window asks the right page (issue #15)."""

    def feed(self, apikey, text, offset, count, per_page=None):
        per_page = per_page or FLICKR_PAGE
        if offset % per_page:
            raise ValueError(f"Flickr window offset {offset} is not a multiple of its page size {per_page}")
        for page in range(offset // per_page, (offset + count + per_page - 1) // per_page):
            self.out_queue.put("https://api.flickr.com/services/rest/?method=flickr.photos.search"
                               f"&api_key={apikey}&format=json&nojsoncallback=1&text={quote_plus(text)}"
                               f"&page={page + 1}&per_page={per_page}")


class TolerantGoogleParser(GoogleParser):
    """Google's parser returns None when its pattern misses (upstream bug); treat that as no results."""

    def parse(self, response):
        return super().parse(response) or []


class PoliteGreedyFeeder(GreedyFeeder):
    """icrawler's site crawl, starting only where the site's robots.txt lets us in."""
    robots_refusal: Callable[[str], Optional[str]] = staticmethod(lambda url: None)

    def feed(self, domains):
        return super().feed([d for d in domains if self.robots_refusal(d + "/") is None])


class PoliteGreedyParser(GreedyParser):
    """icrawler's site crawl, following only the links the site's robots.txt allows us.

    Pages are fetched by icrawler's parser loop; the links it would queue are filtered here, so a
    disallowed page is never requested (its images are checked again by the downloader)."""
    robots_refusal: Callable[[str], Optional[str]] = staticmethod(lambda url: None)
    on_disallowed: Callable[[], None] = staticmethod(lambda: None)

    def parse(self, response, domains):
        for task in super().parse(response, domains):
            if isinstance(task, str) and self.robots_refusal(task) is not None:
                self.on_disallowed()
                continue
            yield task


def _window(unit: Unit, local_base: str | None, rows: list) -> dict:
    return dict(keyword=unit.query, offset=unit.offset, max_num=unit.count)


def _site(unit: Unit) -> dict:
    site = unit.query if unit.query.startswith("http") else "http://" + unit.query
    return dict(domains=[site.rstrip("/")])


def _flickr_page(unit: Unit, local_base: str | None, rows: list) -> dict:
    return dict(apikey=os.environ.get("FLICKR_APIKEY", ""), text=unit.query, offset=unit.offset, count=unit.count,
                per_page=FLICKR_PAGE)


@dataclass(frozen=True)
class Engine:
    """One source of image URLs: icrawler's feeder and parser for it, how its results are paged, and
    what a crawl must provide to use it. Adding an engine is one entry of ENGINES."""

    name: str
    feeder: type
    parser: type
    # (unit, local engine base URL, the rows of a URL-list slice) -> feeder.start kwargs
    feeder_kwargs: Callable[[Unit, Optional[str], list], dict]
    parser_kwargs: Callable[[Unit], dict] = lambda unit: {}
    page_size: int = 1                 # results per result page: a unit's window is a multiple of it
    result_cap: int = 1_000_000        # most results the engine serves per query
    searches: bool = True              # False: no queries (URL lists)
    paged: bool = True                 # False: one unit per query, however many results (site crawls)
    needs_option: Optional[str] = None  # a CrawlConfig field that must be set
    needs_env: Optional[str] = None     # an environment variable that must be set
    needs_help: str = ""
    no_results_hint: str = "the engine may refuse this machine or have changed its result pages"


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("bing", BingFeeder, BingParser, _window, page_size=PAGE_SIZE, result_cap=1000),
    Engine("baidu", BaiduFeeder, BaiduParser, _window, page_size=30, result_cap=1000),
    Engine("google", GoogleFeeder, TolerantGoogleParser, _window, page_size=100, result_cap=1000,
           no_results_hint="icrawler 0.6.10's Google parser no longer matches Google's result pages "
                           "(icrawler issue #135); use bing, baidu or flickr"),
    Engine("flickr", FlickrPageFeeder, FlickrParser, _flickr_page,
           lambda unit: dict(apikey=os.environ.get("FLICKR_APIKEY", ""), size_preference=FLICKR_SIZES),
           page_size=FLICKR_PAGE, result_cap=4000, needs_env="FLICKR_APIKEY",
           needs_help="the FLICKR_APIKEY environment variable"),
    Engine("greedy", PoliteGreedyFeeder, PoliteGreedyParser, lambda unit, base, rows: _site(unit),
           lambda unit: _site(unit), paged=False),
    Engine("urls", UrlListFeeder, PseudoParser, lambda unit, base, rows: dict(url_list=[u for u, _ in rows]),
           searches=False, needs_option="urls",
           needs_help="--urls (URL list files, folders or globs: CSV, TSV, TXT, JSON lines, parquet)"),
    Engine("local", LocalBingFeeder, BingParser,
           lambda unit, base, rows: {**_window(unit, base, rows), "base_url": base},
           page_size=PAGE_SIZE, needs_option="local_root",
           needs_help="--local-root (class subfolders, or a world from `maskless world`)"),
)}


class RankedQueue(CachedQueue):
    """The parser -> downloader queue, unbounded, numbering each result in the order it is queued
    (the engine's result order) for the unit's window (UnitSink.first)."""

    def __init__(self):
        super().__init__()
        self.queued = 0

    def _put(self, item) -> None:  # Queue calls it under its lock: ranks follow the queue's order
        if isinstance(item, dict):
            item["rank"], self.queued = self.queued, self.queued + 1
        super()._put(item)


def connection_pools(max_per_host: int) -> PoolManager:
    """HTTP connection pools for a crawl worker's units: one per host (the 32 hosts used last), so the
    units a worker runs one after another reuse a host's open connections instead of opening new ones
    (a TLS handshake per unit and host). Each unit still sends every request through its own
    SafeAdapter, which checks the address before a new connection is made, and the pools' connections
    are the pinned ones (they connect only to the address checked)."""
    pools = PoolManager(num_pools=32, maxsize=max_per_host)
    pools.pool_classes_by_scheme = PINNED_POOL_CLASSES
    return pools


def _read_environment_once(session) -> None:
    """Take the settings requests reads from the environment once per unit instead of once per request.

    With `trust_env` requests looks for proxies and a CA bundle again on every request, scanning every
    environment variable (0.4 ms of CPU a request on the 2-core development machine, about a tenth
    of an image's whole cost), and reads ~/.netrc, whose passwords a crawler has no business sending
    to hosts a search turned up. Proxies keep the per-request lookup (no_proxy is decided per URL);
    otherwise the CA bundle is set here, as requests would have set it."""
    session.trust_env = bool(getproxies())
    if not session.trust_env:
        session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


def run_unit(unit: Unit, options: dict, local_base: str | None = None, sink: UnitSink | None = None,
             pools: PoolManager | None = None) -> UnitSink:
    """Drive icrawler's feeder and parser with our downloader for one unit; returns what it got.

    `sink` lets the caller watch the unit's counts while it runs; `pools` are the worker's
    connection pools (connection_pools), else the unit opens its own."""
    engine = ENGINES[unit.engine]
    feeder_cls, parser_cls = engine.feeder, engine.parser
    sink = sink if sink is not None else UnitSink()
    rows: list = []
    if unit.source is not None:  # a URL list's slice, read here on the worker (ListReadError fails the unit)
        rows, rejects = unit.source.read()
        for where, reason in rejects:
            sink.reject(where, reason)
        if not rows:  # icrawler's list feeder raises on an empty list
            return sink
    feeder_kw, parser_kw = engine.feeder_kwargs(unit, local_base, rows), engine.parser_kwargs(unit)
    by_url: dict[str, set] = {}
    for url, labels in rows:
        by_url.setdefault(url, set()).update(labels)

    def labels_for(url: str) -> list[str]:
        return sorted(by_url.get(url, ())) if not engine.searches else [unit.label]

    crawler = Crawler(feeder_cls, parser_cls, MasklessDownloader, downloader_threads=options["threads"],
                      storage=sink, log_level=logging.CRITICAL,
                      extra_downloader_args=dict(options=options, unit=unit.describe(), labels_for=labels_for))
    # icrawler's queues hold 5 tasks per thread, and a put that waited 1 s on a full queue is retried
    # and then dropped as a "duplicate" (its CachedQueue marks an item seen before the put): a slow
    # download lost search results. Unbounded queues never wait; they hold one unit's URLs at most.
    crawler.feeder.out_queue = crawler.parser.in_queue = CachedQueue()
    crawler.parser.out_queue = crawler.downloader.in_queue = RankedQueue()
    session = crawler.session
    session.headers.clear()
    session.headers.update({"User-Agent": options["user_agent"], "Accept": "image/*,*/*;q=0.8"})
    session.max_redirects = options["max_redirects"]
    _read_environment_once(session)
    origins = [local_base.split("://", 1)[1]] if local_base else []
    adapter = SafeAdapter(options["allow_private"], origins, pool_maxsize=max(10, options["threads"]),
                          on_refused=lambda url, why: sink.count("requests_refused"),
                          deadlines=crawler.downloader.deadlines)
    if pools is not None:
        adapter.poolmanager = pools  # requests' HTTPAdapter keeps its pools there; the session is never closed
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if issubclass(feeder_cls, PoliteGreedyFeeder):  # the site crawl asks robots.txt before every page
        crawler.feeder.robots_refusal = crawler.parser.robots_refusal = crawler.downloader.robots_refusal
        crawler.parser.on_disallowed = lambda: sink.count("pages_disallowed")

    signal = crawler.signal
    signal.reset()
    crawler.feeder.start(**feeder_kw)
    crawler.parser.start(queue_timeout=QUEUE_POLL_S, req_timeout=options["timeout"],
                         max_retry=options["retries"] + 1, **parser_kw)
    # the window bound also stops engines whose feeders never finish (greedy)
    crawler.downloader.start(max_num=unit.count, queue_timeout=QUEUE_POLL_S)
    # icrawler's own loop polls once a second; a unit's tail is this poll, so poll faster
    last, idle_since = -1, time.monotonic()
    while crawler.downloader.is_alive():
        if not crawler.feeder.is_alive():
            signal.set(feeder_exited=True)
        if not crawler.parser.is_alive():
            signal.set(parser_exited=True)
        found = sink.counts["found"]
        if found != last:
            last, idle_since = found, time.monotonic()
        elif time.monotonic() - idle_since > options["unit_idle_timeout"]:
            sink.count("idle_stops")  # nothing new for that long: a feeder that never ends, or a stuck site
            signal.set(reach_max_num=True)
            crawler.downloader.deadlines.cancel()  # and the requests still in flight end now, as timeouts
        time.sleep(0.02)
    signal.set(reach_max_num=True)
    _join(crawler.feeder.workers + crawler.parser.workers, limit_s=2.0)
    return sink


def _join(threads: list, limit_s: float) -> None:
    """Wait (at most limit_s in all) for the feeder and parser threads, which see the stop within a
    queue poll, so their last counts (pages_disallowed) are in the unit's stats. A parser still
    fetching a result page ends by its own timeout."""
    end = time.monotonic() + limit_s
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))

"""`maskless crawl`: search by keyword (or read URL lists) into clean, deduplicated, labelled shards.

The crawl is a list of work units, one per (engine, query, result window) or per slice of a URL
list (reader.py: planned by reference, read by the unit), run by a few long-lived crawl workers
(Ray actors) with a bound on how many units are in flight. Each unit drives icrawler (engines.py)
with our downloader (downloader.py) and writes its samples as ONE shard under OUT/_units/; that
shard's tar is the unit's completion record (the shard commit rule), so a rerun skips finished
units and a Ray retry of a finished unit returns its record. A final pass (finalize.py, in Ray tasks)
merges exact and near duplicates across units, engines and runs (dedup.py) and writes the dataset's shards in OUT,
each derived from one unit shard and rewritten only when its dedup decision changed.
Docs: docs/CRAWL.md.
"""
from __future__ import annotations

import logging
import math
import os
import posixpath
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from urllib3 import PoolManager

from maskless.core import errors, resources, shards, storage
from maskless.ingest.dedup import MAX_NEAR_DISTANCE
from maskless.ingest.downloader import UnitSink
from maskless.ingest.engines import ENGINES, Unit, connection_pools, run_unit
from maskless.ingest.finalize import finalize
from maskless.ingest.local_engine import LocalSearchServer
from maskless.ingest.pacer import start_pacer
from maskless.ingest.reader import FORMATS, FilePlan, ListOptions, find_lists, plan_lists, save_ledgers
from maskless.ingest.progress import CrawlProgress, live_counts
from maskless.ingest.validator import PixelBudget

logger = logging.getLogger(__name__)

UNITS_DIR = "_units"
LISTS_DIR = "_lists"    # what each URL list file's earlier commands planned of it (ingest/reader.py)
ROBOTS_DIR = "_robots"  # robots.txt answers shared by the run's tasks (ingest/robots.py RobotsStore)
SUMMARY_FILE = "crawl_summary.json"
PROGRESS_INTERVAL_S = 1.0  # how often the driver asks the crawl workers for their running units' counts
DEFAULT_USER_AGENT = "maskless/0.1 (image dataset crawler; honours robots.txt and X-Robots-Tag noai/noimageai)"


@dataclass
class CrawlConfig:
    keywords: list[str] = field(default_factory=list, metadata={
        "help": "classes to crawl, each searched under its own name (e.g. car,dog)"})
    classes: dict = field(default_factory=dict, metadata={
        "help": "YAML only: class -> list of search queries (greedy: sites)"})
    engine: list[str] = field(default_factory=lambda: ["bing"], metadata={
        "help": f"engines, comma separated: {', '.join(ENGINES)}"})
    images_per_query: int = field(default=100, metadata={"help": "search results to fetch per query"})
    image_size: int = field(default=512, metadata={"help": "longest side of stored images (never upscaled)"})
    jpeg_quality: int = field(default=90, metadata={"help": "JPEG quality of stored images"})
    timeout: float = field(default=10.0, metadata={"help": "seconds per connect and per socket read"})
    request_deadline: float = field(default=30.0, metadata={
        "help": "seconds per request in all: connect, headers, whole body and redirects (a timeout)"})
    shard_size: int = field(default=500, metadata={
        "help": "most samples per shard (= result window per unit; URL lists: rows per unit, estimated beyond a "
                "text list's first 64 KiB)"})
    out: str = field(default="data/crawl", metadata={"help": "output folder or URI"})
    urls: list[str] = field(default_factory=list, metadata={
        "help": "URL lists for --engine urls: files, folders or globs, local or URIs, in CSV, TSV, TXT (one URL "
                "a line), JSON lines or parquet (docs/CRAWL.md)"})
    input_format: str = field(default="auto", metadata={
        "help": "format of the URL lists (auto: by file extension)", "choices": ["auto", *FORMATS]})
    url_col: str = field(default="url", metadata={"help": "URL lists: the column (key) holding the URL"})
    label_col: list[str] = field(default_factory=lambda: ["label", "labels"], metadata={
        "help": "URL lists: the label column, the first of these names a list has"})
    label_sep: str = field(default="", metadata={
        "help": "URL lists: split label cells on this string, e.g. '|' (empty: a cell is one label)"})
    label: Optional[str] = field(default=None, metadata={
        "help": "URL lists: the label of every row of a list without a label column (TXT lists: default the "
                "file's name without extension)"})
    dry_run: bool = field(default=False, metadata={
        "help": "plan and print the units, rows and an estimate of requests; no request, nothing written"})
    local_root: Optional[str] = field(default=None, metadata={
        "help": "engine local: folder of class subfolders, or a VOC-format world"})
    allow_private: bool = field(default=False, metadata={
        "help": "allow URLs resolving to private, loopback or link-local addresses"})
    min_size: int = field(default=64, metadata={"help": "reject images whose shorter side is smaller"})
    max_pixels: int = field(default=40_000_000, metadata={"help": "reject images with more pixels (bombs)"})
    max_bytes: int = field(default=20_000_000, metadata={"help": "reject downloads larger than this"})
    decode_pixels: int = field(default=40_000_000, metadata={
        "help": "decoded pixels in flight per crawl worker, all its units and threads together (bounds decode memory)"})
    per_host_concurrency: int = field(default=4, metadata={"help": "concurrent requests per host, per unit"})
    per_host_rps: float = field(default=5.0, metadata={"help": "request starts per second per host, for the whole crawl (0: no limit)"})
    retries: int = field(default=2, metadata={"help": "retries on 429, 5xx, timeouts and connection errors"})
    backoff: float = field(default=1.0, metadata={"help": "first retry delay in seconds (doubles each retry)"})
    max_backoff: float = field(default=30.0, metadata={"help": "longest retry delay, Retry-After included"})
    max_redirects: int = field(default=5, metadata={"help": "redirects followed per request"})
    user_agent: str = field(default=DEFAULT_USER_AGENT, metadata={"help": "User-Agent header (keep 'maskless' in it)"})
    respect_noai: bool = field(default=True, metadata={"help": "skip images served with X-Robots-Tag noai/noimageai"})
    respect_robots: bool = field(default=True, metadata={
        "help": "read each image site's robots.txt (agent maskless) and skip what it disallows"})
    max_crawl_delay: float = field(default=30.0, metadata={
        "help": "skip sites whose robots.txt asks for more seconds between requests (shorter delays are kept)"})
    threads: int = field(default=16, metadata={"help": "download threads per unit"})
    workers: int = field(default=4, metadata={"help": "crawl workers (long-lived Ray actors, each running unit after unit)"})
    units_per_worker: int = field(default=1, metadata={
        "help": "units a crawl worker runs at once, `threads` download threads each"})
    task_cpus: float = field(default=0.5, metadata={"help": "CPUs Ray reserves per crawl worker"})
    resources: Optional[dict[str, float]] = field(default=None, metadata={
        "help": "custom Ray resources per crawl task, NAME=AMOUNT,... (default: a share of crawl where nodes have it)"})
    near_dup_bits: int = field(default=4, metadata={
        "help": f"perceptual-hash distance (bits of 64, at most {MAX_NEAR_DISTANCE}) counted as a near duplicate "
                "when the colours match too; -1: exact only"})
    unit_idle_timeout: float = field(default=120.0, metadata={"help": "stop a unit after this many seconds without new results"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        if isinstance(self.urls, str):  # one list, as YAML and Python callers often give it
            self.urls = [self.urls]
        if isinstance(self.label_col, str):
            self.label_col = [self.label_col]

    def list_options(self) -> ListOptions:
        return ListOptions(self.url_col, tuple(self.label_col), self.label_sep, self.label, self.input_format)

    def queries(self) -> dict[str, list[str]]:
        """class -> queries, YAML classes first, then keywords."""
        out: dict[str, list[str]] = {}
        for label, qs in (self.classes or {}).items():
            qs = [qs] if isinstance(qs, str) else list(qs or [label])
            out[str(label)] = [str(q) for q in qs]
        for k in self.keywords:
            qs = out.setdefault(k, [])
            if k not in qs:
                qs.append(k)
        return out

    def validate(self) -> None:
        bad = [e for e in self.engine if e not in ENGINES]
        if bad or not self.engine:
            raise ValueError(f"unknown engine(s) {bad or self.engine}; choose from {', '.join(ENGINES)}")
        if not isinstance(self.classes, dict):
            raise ValueError("classes must be a mapping class -> list of queries (YAML)")
        engines = [ENGINES[e] for e in self.engine]
        if any(e.searches for e in engines) and not self.queries():
            raise ValueError("nothing to search: give --keywords car,dog or a classes: mapping in YAML")
        for e in engines:
            if (e.needs_option and not getattr(self, e.needs_option)) or (e.needs_env and not os.environ.get(e.needs_env)):
                raise ValueError(f"engine {e.name} needs {e.needs_help}")
        for name in ("images_per_query", "image_size", "shard_size", "threads", "workers", "units_per_worker",
                     "per_host_concurrency", "max_bytes", "max_pixels", "min_size", "decode_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        for name in ("timeout", "request_deadline", "task_cpus", "unit_idle_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if min(self.retries, self.backoff, self.per_host_rps, self.max_redirects, self.max_crawl_delay) < 0:
            raise ValueError("retries, backoff, per_host_rps, max_redirects and max_crawl_delay must not be negative")
        resources.check_resources(self.resources)
        if not -1 <= self.near_dup_bits <= MAX_NEAR_DISTANCE:
            raise ValueError(f"near_dup_bits must be in -1..{MAX_NEAR_DISTANCE}, got {self.near_dup_bits}")
        if "maskless" not in self.user_agent.lower():
            raise ValueError("user_agent must name maskless, so that sites can tell who is crawling")
        if not self.url_col.strip() or not [c for c in self.label_col if c.strip()]:
            raise ValueError("url_col and label_col must name columns")
        if self.label is not None and not self.label.strip():
            raise ValueError("label must not be empty")
        if any(not e.searches for e in engines):
            find_lists(self.urls, self.input_format)  # a list that does not exist fails here, before Ray starts


@dataclass
class CrawlPlan:
    """The crawl's units in a stable order, and for URL lists what planning found of each file."""

    units: list[Unit]
    lists: list[FilePlan] = field(default_factory=list)

    def images(self) -> dict[str, int]:
        """Images each unit may yield, by unit name: its list slice's rows (counted or estimated), or
        its result window."""
        rows_of = {s: n for fp in self.lists for s, n in zip(fp.slices, fp.slice_rows)}
        return {u.name: rows_of[u.source] if u.source is not None else u.count for u in self.units}


def plan_crawl(cfg: CrawlConfig) -> CrawlPlan:
    """Plan every unit; reads the URL lists' heads or footers and OUT/_lists, writes nothing."""
    units: list[Unit] = []
    lists: list[FilePlan] = []
    for name in cfg.engine:
        engine = ENGINES[name]
        if not engine.searches:  # URL lists: one unit per slice, by reference
            lists = plan_lists(cfg.urls, cfg.list_options(), cfg.shard_size, storage.join(cfg.out, LISTS_DIR))
            for fp in lists:
                query = posixpath.basename(fp.file.path)
                units += [Unit(name, "", query, w, 0, 0, source) for w, source in enumerate(fp.slices)]
            continue
        for label, queries in cfg.queries().items():
            for q in queries:
                if not engine.paged:
                    units.append(Unit(name, label, q, 0, 0, cfg.images_per_query))
                    continue
                total = min(cfg.images_per_query, engine.result_cap)
                window = max(engine.page_size, min(cfg.shard_size, total) // engine.page_size * engine.page_size)
                for w, start in enumerate(range(0, total, window)):
                    units.append(Unit(name, label, q, w, start, min(window, total - start)))
    seen, unique = set(), []
    for u in units:
        if u.name not in seen:
            seen.add(u.name)
            unique.append(u)
    return CrawlPlan(unique, lists)


def plan_units(cfg: CrawlConfig) -> list[Unit]:
    """Every unit of the crawl, in a stable order."""
    return plan_crawl(cfg).units


def crawl_unit(unit: Unit, options: dict, units_root: str, local_base: str | None,
               pools: PoolManager | None = None, sink: UnitSink | None = None) -> dict:
    """Run one unit and commit its shard; a unit already committed returns its record unchanged.

    `pools` and `sink` come from a CrawlWorker: its connection pools, and a sink it can watch."""
    base = storage.join(units_root, unit.name)
    if storage.exists(base + ".tar"):
        return {**storage.read_json(base + ".stats.json"), "resumed": True}
    t0 = time.monotonic()
    sink = run_unit(unit, options, local_base, sink, pools)
    c = sink.counts
    keys = sink.first(unit.count)
    stats = {
        **unit.describe(), "found": c["found"], "downloaded": c["downloaded"], "accepted": len(keys),
        "beyond_window": c["accepted"] - len(keys),
        "duplicates": c["duplicates"], "bytes": c["bytes"], "requests_refused": c["requests_refused"],
        "idle_stops": c["idle_stops"], "pages_disallowed": c["pages_disallowed"], "robots_fetched": c["robots_fetched"],
        "rejected": dict(sink.rejected), "rejects": sink.rejects,
        "seconds": round(time.monotonic() - t0, 3), "node": resources.node_id(), "pid": os.getpid(),
    }
    with errors.disk_full_is_one_line(f"unit {unit.name} into {units_root}", "units already written are kept"):
        with shards.ShardWriter(units_root, unit.name) as writer:
            for key in keys:
                writer.write(sink.samples[key])
            info = writer.commit(stats)
    return {**info, "resumed": False}


class CrawlWorker:
    """A long-lived crawl process (a Ray actor) that runs unit after unit, `units_at_once` at a time.
    It keeps what units share: the imports and the per-host HTTP connection pools. A
    unit is still the unit of work: one shard, committed atomically, retried alone (on a restarted
    worker when this one is lost). Its progress() answers while units run (its own concurrency group)."""

    def __init__(self, options: dict, units_root: str, local_base: str | None, units_at_once: int):
        self.options, self.units_root, self.local_base = options, units_root, local_base
        self.pools = connection_pools(options["threads"] * units_at_once)
        self.pixels = PixelBudget(options["decode_pixels"])  # one decode budget for all the units running here
        self.running: dict[str, tuple[Unit, UnitSink]] = {}

    def ready(self) -> int:
        return os.getpid()

    def crawl_unit(self, unit: Unit, pacer: Any) -> dict:
        """Run one unit; `pacer` is the crawl's PacerActor (given per call: a handle among a restartable
        actor's constructor arguments is one Ray cannot promise to keep for the restart)."""
        sink = UnitSink()
        self.running[unit.name] = (unit, sink)
        try:
            return crawl_unit(unit, {**self.options, "pacer": pacer, "pixel_budget": self.pixels}, self.units_root,
                              self.local_base, self.pools, sink)
        finally:
            self.running.pop(unit.name, None)

    def progress(self) -> dict[str, dict]:
        """Live counts of the units running here (progress.live_counts), by unit name."""
        out = {}
        for name, (unit, sink) in list(self.running.items()):
            with sink.lock:
                out[name] = live_counts(sink.counts, sink.rejected, unit.count)
        return out


def _options(cfg: CrawlConfig) -> dict:
    keys = ("image_size", "jpeg_quality", "timeout", "request_deadline", "min_size", "max_pixels", "max_bytes",
            "decode_pixels", "per_host_concurrency", "per_host_rps", "retries", "backoff", "max_backoff",
            "max_redirects", "user_agent", "respect_noai", "respect_robots", "max_crawl_delay", "threads",
            "allow_private", "unit_idle_timeout")
    return {**{k: getattr(cfg, k) for k in keys}, "robots_store": storage.join(cfg.out, ROBOTS_DIR)}


def _run_units(cfg: CrawlConfig, units: list[Unit], units_root: str, local_base: str | None,
               images: dict[str, int]) -> tuple[list, list]:
    """Run units on cfg.workers CrawlWorker actors, units_per_worker at once on each, a unit going to
    a worker as soon as it has room (so none waits behind a slow unit while another worker idles);
    returns (records, failures)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("run_crawl needs Ray initialised by the caller (ray.init(...) or the maskless CLI)")
    if not units:
        return [], []
    per_worker = cfg.units_per_worker
    # a lost worker is restarted (elsewhere when its node is gone) and its units in flight are run
    # again (max_task_retries): a retried unit finds its shard if it had committed
    actor = ray.remote(concurrency_groups={"units": per_worker, "progress": 1})(CrawlWorker).options(
        **resources.crawl_options(cfg.task_cpus, cfg.resources), max_restarts=-1, max_task_retries=3,
        scheduling_strategy="SPREAD")
    pacer = start_pacer()  # per-host pace for the whole crawl (ingest/pacer.py)
    workers = [actor.remote(_options(cfg), units_root, local_base, per_worker)
               for _ in range(min(cfg.workers, len(units)))]
    starting = {w.ready.remote(): i for i, w in enumerate(workers)}  # units go only to workers that started
    load: dict[int, int] = {}  # worker -> units in flight, for the workers that started
    pending: dict = {}         # unit ref -> (unit, worker)
    polls: dict = {}           # progress ref -> worker
    todo = deque(units)
    records, failures = [], []
    progress = CrawlProgress({u.name: images[u.name] for u in units}, cfg.progress)
    next_poll = time.monotonic() + PROGRESS_INTERVAL_S
    try:
        while todo or pending:
            while todo and (free := [i for i in load if load[i] < per_worker]):
                i = min(free, key=load.get)
                u = todo.popleft()
                pending[workers[i].crawl_unit.options(concurrency_group="units").remote(u, pacer)] = (u, i)
                load[i] += 1
            if not load and not starting:
                raise RuntimeError(f"no crawl worker could start: {failures[-1]['error']}")
            ready, _ = ray.wait(list(pending) + list(starting) + list(polls), num_returns=1,
                                timeout=max(0.0, next_poll - time.monotonic()))
            for ref in ready:
                if ref in starting:
                    i = starting.pop(ref)
                    try:
                        ray.get(ref)
                        load[i] = 0
                    except Exception as e:  # this worker cannot start; the others go on
                        logger.error("crawl worker %d could not start: %s", i, e)
                        failures.append({"unit": None, "error": _last_line(e)})
                elif ref in polls:
                    polls.pop(ref)
                    try:
                        for name, counts in ray.get(ref).items():
                            progress.unit_live(name, counts)
                    except Exception:  # a worker being restarted: its units report when they end
                        pass
                else:
                    u, i = pending.pop(ref)
                    load[i] -= 1
                    try:
                        rec = ray.get(ref)
                    except Exception as e:  # one bad unit must not lose the others' work
                        logger.error("unit %s failed: %s", u.name, e)
                        failures.append({"unit": u.name, "error": _last_line(e)})
                        progress.unit_ended(u.name, None)
                    else:
                        records.append(rec)
                        progress.unit_ended(u.name, rec)
            if time.monotonic() >= next_poll:
                if cfg.progress:
                    asked = set(polls.values())
                    polls.update({workers[i].progress.options(concurrency_group="progress").remote(): i
                                  for i in load if i not in asked})
                    progress.show()
                next_poll = time.monotonic() + PROGRESS_INTERVAL_S
    finally:
        progress.close()
        for w in workers:
            ray.kill(w)
        ray.kill(pacer)
    return records, [f for f in failures if f["unit"] is not None]


def _last_line(e: Exception) -> str:
    return str(e).splitlines()[-1] if str(e) else repr(e)


def _list_status(plan: CrawlPlan) -> dict:
    by = Counter(fp.status for fp in plan.lists)
    return {"files": len(plan.lists), **{k: by.get(k, 0) for k in ("new", "unchanged", "grown")},
            "changed": [fp.file.path for fp in plan.lists if fp.status == "changed"]}


def dry_run(cfg: CrawlConfig, plan: CrawlPlan, done: set[str], seconds: float) -> dict:
    """What the crawl would do: units per engine and class, rows or result windows, requests to expect."""
    images_of = plan.images()
    groups: dict[str, dict] = {}
    pages = images = 0
    for u in plan.units:
        engine = ENGINES[u.engine]
        key = f"{u.engine}/{u.label or '(list)'}"
        if key not in groups:
            groups[key] = {"units": 0, "units_to_run": 0, **(
                {"rows": 0, "rows_exact": all(fp.rows_exact for fp in plan.lists)} if u.source is not None
                else {"results": 0})}
        g = groups[key]
        g["units"] += 1
        n = images_of[u.name]
        g["rows" if u.source is not None else "results"] += n
        if u.name in done:
            continue
        g["units_to_run"] += 1
        images += n
        if engine.searches and engine.paged:
            pages += math.ceil(u.count / engine.page_size)
    to_run = [u for u in plan.units if u.name not in done]
    return {
        "dry_run": True, "out": cfg.out, "engines": list(cfg.engine), "units": len(plan.units),
        "units_already_done": len(plan.units) - len(to_run), "units_to_run": len(to_run),
        "by_engine_class": dict(sorted(groups.items())),
        "requests_estimate": {"result_pages": pages, "images": images, "total": pages + images,
                              "not_counted": "retries, robots.txt (one per image site new to OUT) and "
                                             "the pages of greedy site crawls"},
        "url_lists": _list_status(plan),
        "first_units": [u.describe() for u in to_run[:5]],
        "planning_seconds": round(seconds, 3),
    }


def _engines_without_results(cfg: CrawlConfig, units: list[Unit], meta: dict[str, dict]) -> list[str]:
    """A warning (logged once per crawl) for each search engine whose every query found nothing."""
    warnings = []
    for name in cfg.engine:
        engine = ENGINES[name]
        stats = [meta.get(u.name) for u in units if u.engine == name]
        if not engine.searches or not stats or None in stats or any(st.get("found", 0) for st in stats):
            continue
        queries = len({(u.label, u.query) for u in units if u.engine == name})
        warnings.append(f"engine {name} found no results for any of its {queries} queries; likely cause: "
                        f"{engine.no_results_hint}")
        logger.warning(warnings[-1])
    return warnings


def run_crawl(cfg: CrawlConfig) -> dict:
    """Crawl, resume-safe, and return (and write to OUT/crawl_summary.json) the summary.

    Everything that can fail on bad input (options, lists, columns, the local engine's folder) is
    checked and planned before OUT is touched: a failed command leaves a finished dataset finished."""
    cfg.validate()
    t0 = time.monotonic()
    out = cfg.out
    units_root = storage.join(out, UNITS_DIR)
    plan = plan_crawl(cfg)
    units = plan.units
    server = None
    if "local" in cfg.engine:  # indexes its folder now: a bad folder fails before OUT is touched
        server = LocalSearchServer(cfg.local_root, {q: c for c, qs in cfg.queries().items() for q in qs})
    done = set(shards.shard_names(units_root))
    if cfg.dry_run:
        return dry_run(cfg, plan, done, time.monotonic() - t0)
    storage.makedirs(units_root)
    storage.remove_stale_temps(units_root)
    storage.remove_stale_temps(out)
    save_ledgers(storage.join(out, LISTS_DIR), plan.lists)
    storage.delete(storage.join(out, shards.DATASET_FILE))  # "finished" again only when this run finishes
    todo = [u for u in units if u.name not in done]
    logger.info("crawl: %d units, %d already done", len(units), len(units) - len(todo))
    local_base = server.start() if server is not None else None
    try:
        records, failures = _run_units(cfg, todo, units_root, local_base, plan.images())
    finally:
        if server is not None:
            server.stop()
    crawl_seconds = time.monotonic() - t0
    final = finalize(out, units_root, cfg.near_dup_bits)  # every unit in OUT, earlier commands' too
    per_class = final.samples_per_class
    classes = list(cfg.queries())
    classes += sorted(set(per_class) - set(classes))
    accepted_now = sum(r.get("accepted", 0) for r in records if not r.get("resumed"))
    committed = set(shards.shard_names(units_root))  # search units only: a few per query, not per image
    meta = {u.name: storage.read_json(storage.join(units_root, u.name + ".stats.json"))
            for u in units if ENGINES[u.engine].searches and u.name in committed}
    warnings = _engines_without_results(cfg, units, meta)
    summary = {
        "out": out, "engines": list(cfg.engine), "classes": classes,
        "units": len(units), "units_run": sum(1 for r in records if not r.get("resumed")),
        "units_already_done": len(units) - len(todo) + sum(1 for r in records if r.get("resumed")),
        "units_failed": failures, **final.summary(),
        "samples_per_class": {c: per_class.get(c, 0) for c in classes},
        "accepted_this_run": accepted_now, "crawl_seconds": round(crawl_seconds, 3),
        "seconds": round(time.monotonic() - t0, 3),
        "images_per_second": round(accepted_now / crawl_seconds, 2) if crawl_seconds > 0 else None,
        "by_engine_class": final.by_engine_class,
        **({"url_lists": _list_status(plan)} if plan.lists else {}), "warnings": warnings,
        "config": {k: v for k, v in asdict(cfg).items()},
    }
    storage.write_json_atomic(storage.join(out, SUMMARY_FILE), summary)
    if failures:
        raise errors.IncompleteRun(f"{len(failures)} of {len(units)} crawl units failed (unit {failures[0]['unit']}: "
                                   f"{failures[0]['error']}); the rest are saved: rerun the same command to "
                                   f"retry only those (details in {storage.join(out, SUMMARY_FILE)})")
    shards.write_dataset_info(out, classes, stage="crawl", engines=list(cfg.engine),
                              samples_per_class=summary["samples_per_class"])
    return summary

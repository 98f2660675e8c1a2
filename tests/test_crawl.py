"""Crawl tests, all on loopback against servers defined here (no traffic leaves 127.0.0.1)."""
import dataclasses
import html
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import struct
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import requests
from PIL import Image

from maskless.core import shards, storage
from maskless.ingest import crawl
from maskless.ingest.crawl import CrawlConfig, crawl_unit, plan_units, run_crawl, _options
from maskless.ingest.dedup import NearIndex, decide, hamming
from maskless.ingest.engines import Unit, _read_environment_once, connection_pools
from maskless.ingest.downloader import robots_opt_out
from maskless.ingest.pacer import FORGET_AFTER, PaceBook, SharedPacer, start_pacer
from maskless.ingest.progress import CrawlProgress
from maskless.ingest.robots import RobotsCache, RobotsStore, rules_from_fetch
from maskless.ingest.safety import RefusedAddress, address_block, check_url
from maskless.ingest.validator import Rejected, clean_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth_image(seed: int, w: int = 120, h: int = 96) -> Image.Image:
    """A low-frequency random picture: its perceptual hash survives resizing and re-encoding."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (4, 5, 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BICUBIC)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR claiming w x h pixels, with a tiny IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def key_of(data: bytes) -> str:
    return clean_image(data, image_size=512, quality=90, min_size=16).sha256[:24]


class Server:
    """Loopback HTTP server: routes map a path to (status, headers, body) or to a callable(n) giving
    that for the n-th request of the path. Counts every request it receives.

    A callable body writes itself (see `trickle`) and gets no Content-Length; with status None it
    writes the whole response, status line and headers included."""

    def __init__(self, routes: dict, delay: float = 0.0, keep_alive: bool = False):
        self.routes, self.delay = routes, delay
        self.connections = 0  # TCP connections accepted
        self.hits: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}
        self.agents: set[str] = set()
        self.hosts: set[str] = set()  # Host headers received
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"  # 1.1: connections stay open

            def setup(self):
                super().setup()
                with owner.lock:
                    owner.connections += 1

            def do_GET(self):
                with owner.lock:
                    n = owner.hits[self.path] = owner.hits.get(self.path, 0) + 1
                    owner.times.setdefault(self.path, []).append(time.monotonic())
                    owner.agents.add(self.headers.get("User-Agent", ""))
                    owner.hosts.add(self.headers.get("Host", ""))
                if owner.delay:
                    time.sleep(owner.delay)
                route = owner.routes.get(self.path)
                if route is None:
                    return self.send_error(404)
                status, headers, body = route(n) if callable(route) else route
                try:
                    if callable(body):
                        if status is not None:
                            self.send_response(status)
                            for k, v in headers.items():
                                self.send_header(k, v)
                            self.end_headers()
                        return body(self.wfile)
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> int:
        return sum(self.hits.values())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def trickle(data: bytes, every: float):
    """A body that sends one byte every `every` seconds: each read sees data long before any timeout."""
    def write(wfile):
        for i in range(len(data)):
            wfile.write(data[i:i + 1])
            wfile.flush()
            time.sleep(every)
    return write


@pytest.fixture
def serve():
    servers = []

    def start(routes, delay=0.0, keep_alive=False):
        servers.append(Server(routes, delay, keep_alive))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def write_urls(path, rows):
    with open(path, "w") as f:
        f.write("url,label\n")
        for url, *labels in rows:
            f.write(",".join([url, *labels]) + "\n")
    return str(path)


def fast_config(tmp_path, **kw) -> CrawlConfig:
    base = dict(engine=["urls"], out=str(tmp_path / "out"), allow_private=True, per_host_rps=0, timeout=2.0,
                retries=1, backoff=0.05, min_size=32, threads=4, workers=2, progress=False, shard_size=50)
    base.update(kw)
    return CrawlConfig(**base)


# ---------------------------------------------------------------- safety and politeness, no traffic

def test_address_classification():
    for ip, kind in [("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.7", "private"),
                     ("172.16.5.4", "private"), ("169.254.169.254", "link-local"), ("::1", "loopback"),
                     ("fc00::1", "private"), ("fe80::1%eth0", "link-local"), ("::ffff:127.0.0.1", "loopback"),
                     ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.0.1", "not-global")]:
        assert address_block(ip) == kind, ip
    for ip in ("8.8.8.8", "2001:4860:4860::8888", "93.184.216.34"):
        assert address_block(ip) is None, ip


def test_check_url_uses_resolved_addresses_without_connecting():
    def resolver(answers):
        return lambda host, port: answers[host]
    fake = resolver({"inside.test": ["93.184.216.34", "10.0.0.5"], "outside.test": ["93.184.216.34"]})
    with pytest.raises(RefusedAddress, match="private address 10.0.0.5"):
        check_url("http://inside.test/a.jpg", resolver=fake)  # one private answer is enough to refuse
    check_url("https://outside.test/a.jpg", resolver=fake)
    check_url("http://inside.test/a.jpg", allow_private=True, resolver=fake)
    with pytest.raises(RefusedAddress, match="loopback"):
        check_url("http://127.0.0.1:9/a.jpg")
    with pytest.raises(RefusedAddress, match="scheme"):
        check_url("file:///etc/passwd", allow_private=True)
    check_url("http://127.0.0.1:8123/x", allowed_origins=["127.0.0.1:8123"])
    with pytest.raises(RefusedAddress):
        check_url("http://127.0.0.1:8124/x", allowed_origins=["127.0.0.1:8123"])


def test_every_redirect_hop_is_checked_before_connecting(serve):
    import requests
    from maskless.ingest.safety import SafeAdapter

    inner = serve({"/x.jpg": (200, {"Content-Type": "image/jpeg"}, b"x")})
    outer = serve({"/r": (302, {"Location": inner.url + "/x.jpg"}, b"")})
    session = requests.Session()
    session.mount("http://", SafeAdapter(allowed_origins=[outer.url.split("://")[1]]))
    with pytest.raises(RefusedAddress, match="loopback"):
        session.get(outer.url + "/r", timeout=5)
    assert outer.requests == 1 and inner.requests == 0  # the redirect target was never contacted


def test_robots_opt_out():
    assert robots_opt_out("noai") and robots_opt_out("noindex, noimageai") and robots_opt_out("NoAI")
    assert robots_opt_out("maskless: noai") and robots_opt_out("*: noimageai")
    assert not robots_opt_out("otherbot: noai") and not robots_opt_out("noindex") and not robots_opt_out(None)
    assert robots_opt_out("otherbot: noindex, maskless: noai")


def test_robots_fetch_outcomes_follow_rfc_9309():
    def get_raising(reason):
        def get(url):
            raise Rejected(reason)
        return get
    url = "http://site.test/a.jpg"
    for reason in ("http_404", "http_401", "http_403", "too_many_redirects"):
        assert rules_from_fetch(get_raising(reason), "http://site.test").check(url, "maskless") is None, reason
    for reason in ("http_503", "http_429", "timeout", "connection_error"):
        assert rules_from_fetch(get_raising(reason), "http://site.test").check(url, "maskless") == "robots_unreachable"
    assert rules_from_fetch(get_raising("refused_private"), "http://site.test").check(url, "m") == "refused_private"
    body = b"User-agent: *\nDisallow: /\n\nUser-agent: maskless\nDisallow: /p/\nRequest-rate: 1/5\nCrawl-delay: 2\n"
    fetched = []
    rules = rules_from_fetch(lambda u: fetched.append(u) or body, "https://site.test:8443")
    assert fetched == ["https://site.test:8443/robots.txt"]
    assert rules.check("https://site.test:8443/a.jpg", "maskless") is None
    assert rules.check("https://site.test:8443/p/a.jpg", "maskless") == "robots"
    assert rules.check("https://site.test:8443/a.jpg", "otherbot") == "robots"
    assert rules.delay("maskless") == 5.0 and rules.delay("otherbot") == 0.0  # the longer of 2 s and 5 s/request


def test_robots_store_shares_answers_between_tasks_for_a_day(tmp_path, caplog):
    store = RobotsStore(str(tmp_path / "_robots"))
    answers = {"http://a.test": b"User-agent: *\nDisallow: /p/\n", "http://gone.test": Rejected("http_404"),
               "http://busy.test": Rejected("http_503")}
    asked = []

    def get(url):
        site = url.rsplit("/", 1)[0]
        asked.append(site)
        if isinstance(answers[site], Exception):
            raise answers[site]
        return answers[site]

    def task_view(url):  # each crawl task has its own cache over the run's store
        return RobotsCache(get, store).rules(url).check(url, "maskless")

    for _ in range(3):
        assert task_view("http://a.test/p/x.jpg") == "robots" and task_view("http://a.test/y.jpg") is None
        assert task_view("http://gone.test/x.jpg") is None
        assert task_view("http://busy.test/x.jpg") == "robots_unreachable"
    # rules and "no robots.txt" are asked once; an unreachable site is asked again by every task
    assert asked.count("http://a.test") == 1 and asked.count("http://gone.test") == 1
    assert asked.count("http://busy.test") == 3
    entries = [storage.read_json(str(tmp_path / "_robots" / n)) for n in sorted(os.listdir(tmp_path / "_robots"))]
    assert sorted(e["site"] for e in entries) == ["http://a.test", "http://gone.test"]

    # older than 24 hours (RFC 9309): fetched again, and the new answer is what counts
    path = store._path("http://a.test")
    storage.write_json_atomic(path, {**storage.read_json(path), "fetched_at": time.time() - 25 * 3600})
    answers["http://a.test"] = b"User-agent: *\nDisallow: /\n"
    assert task_view("http://a.test/y.jpg") == "robots" and asked.count("http://a.test") == 2
    assert task_view("http://a.test/z.jpg") == "robots" and asked.count("http://a.test") == 2
    # a damaged entry is fetched again (with a warning) and replaced
    with open(path, "w") as f:
        f.write('{"site": "http://a.te')
    assert task_view("http://a.test/y.jpg") == "robots" and asked.count("http://a.test") == 3
    assert "unreadable" in caplog.text and storage.read_json(path)["site"] == "http://a.test"


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown engine"):
        CrawlConfig(keywords=["car"], engine=["altavista"]).validate()
    with pytest.raises(ValueError, match="--urls"):
        CrawlConfig(engine=["urls"]).validate()
    with pytest.raises(ValueError, match="nothing to search"):
        CrawlConfig(engine=["bing"]).validate()
    with pytest.raises(ValueError, match="max_crawl_delay"):
        CrawlConfig(keywords=["car"], max_crawl_delay=-1).validate()
    with pytest.raises(ValueError, match="name maskless"):
        CrawlConfig(keywords=["car"], user_agent="Mozilla/5.0").validate()
    with pytest.raises(FileNotFoundError, match="not found"):
        plan_units(CrawlConfig(engine=["urls"], urls=str(tmp_path / "nope.csv")))
    bad = tmp_path / "bad.csv"
    bad.write_text("http://x.test/a.jpg\n")
    with pytest.raises(ValueError, match="no label"):
        plan_units(CrawlConfig(engine=["urls"], urls=str(bad)))


def test_every_engine_declaration_plans_units_its_icrawler_parts_accept(tmp_path, monkeypatch):
    """One entry of ENGINES is all an engine is: its needs are checked, its units planned by its page size
    and result cap, and the kwargs it builds fit its icrawler feeder's feed() and parser's parse()."""
    import inspect

    from maskless.ingest.engines import ENGINES

    urls = tmp_path / "list.csv"
    urls.write_text("http://x.test/a.jpg,car\nhttp://x.test/b.jpg,dog\n")
    monkeypatch.delenv("FLICKR_APIKEY", raising=False)
    assert set(ENGINES) == {"bing", "baidu", "google", "flickr", "greedy", "urls", "local"}
    for name, engine in ENGINES.items():
        base = CrawlConfig(keywords=["car"], engine=[name], images_per_query=250, shard_size=100)
        if engine.needs_option or engine.needs_env:
            with pytest.raises(ValueError, match=f"engine {name} needs"):
                base.validate()
        cfg = CrawlConfig(keywords=["car"], engine=[name], images_per_query=250, shard_size=100, urls=str(urls),
                          local_root=str(tmp_path))
        monkeypatch.setenv("FLICKR_APIKEY", "k")
        cfg.validate()
        units = plan_units(cfg)
        monkeypatch.delenv("FLICKR_APIKEY")
        if not engine.searches:  # one unit holding both rows, read by the task
            assert [len(u.source.read()[0]) for u in units] == [2]
        elif not engine.paged:
            assert [(u.offset, u.count) for u in units] == [(0, 250)]
        else:
            assert sum(u.count for u in units) == min(250, engine.result_cap)
            assert all(u.offset % engine.page_size == 0 for u in units)
        for u in units:
            feed = inspect.signature(engine.feeder.feed)
            rows = u.source.read()[0] if u.source is not None else []
            feed.bind(None, **engine.feeder_kwargs(u, "http://127.0.0.1:1", rows))
            parse = inspect.signature(engine.parser.parse)
            parse.bind(None, None, **engine.parser_kwargs(u))


def test_clean_image_resizes_longest_side_and_flattens_alpha():
    img = clean_image(encode(smooth_image(5, 300, 150)), image_size=100, quality=90, min_size=16)
    assert (img.width, img.height, img.source_width, img.source_format) == (100, 50, 300, "JPEG")
    rgba = smooth_image(6, 80, 40).convert("RGBA")  # left half transparent (a blank image is rejected)
    rgba.putalpha(Image.fromarray(np.where(np.arange(80) < 40, 0, 255).astype(np.uint8)[None].repeat(40, 0)))
    out = clean_image(encode(rgba, "PNG"), image_size=100, min_size=16)
    assert (out.width, out.height) == (80, 40)  # never upscaled
    assert Image.open(io.BytesIO(out.jpg)).getpixel((10, 20)) >= (250, 250, 250)  # transparent -> white


def test_local_engine_serves_class_folders_in_bing_format(tmp_path):
    import requests
    from icrawler.builtin.bing import BingParser
    from maskless.ingest.local_engine import LocalSearchServer

    for label, n in (("cat", 3), ("dog", 25)):
        (tmp_path / label).mkdir()
        for i in range(n):
            smooth_image(i).save(tmp_path / label / f"{i}.png")
    with LocalSearchServer(str(tmp_path), {"kitten": "cat"}) as server:
        parser = BingParser(1, None, None)
        page = lambda q, first: [t["file_url"] for t in parser.parse(
            requests.get(f"{server.base_url}/images/async", params={"q": q, "first": first}, timeout=5))]
        assert len(page("kitten", 0)) == 3 and page("cat", 0) == page("kitten", 0)
        assert len(page("dog", 0)) == 20 and len(page("dog", 20)) == 5 and page("horse", 0) == []
        body = requests.get(page("kitten", 0)[1], timeout=5).content
        assert body == (tmp_path / "cat" / "1.png").read_bytes()


# ---------------------------------------------------------------- crawls

def test_local_engine_crawl_via_bing_parser(ray_local, tiny_world, tmp_path):
    expected: dict[str, set] = {}
    classes = [c.strip() for c in open(os.path.join(tiny_world, "classes.txt")) if c.strip()]
    for name in os.listdir(os.path.join(tiny_world, "Annotations")):
        labels = {o.findtext("name") for o in ET.parse(os.path.join(tiny_world, "Annotations", name)).iter("object")}
        with open(os.path.join(tiny_world, "JPEGImages", name[:-4] + ".jpg"), "rb") as f:
            expected.setdefault(key_of(f.read()), set()).update(labels)
    cfg = fast_config(tmp_path, engine=["local"], keywords=classes, local_root=tiny_world, allow_private=False,
                      images_per_query=40, shard_size=20)
    summary = run_crawl(cfg)
    got = {s.key: set(s.labels) for s in shards.read_dataset(cfg.out)}
    assert got == expected  # every world image once, with every class it contains
    info = shards.read_dataset_info(cfg.out)
    assert info["stage"] == "crawl" and info["classes"] == classes and info["samples"] == len(expected)
    for c in classes:
        g = summary["by_engine_class"][f"local/{c}"]
        assert g["found"] == g["accepted"] == sum(c in v for v in expected.values()) and g["rejected"] == {}
    assert summary["exact_duplicates"] == sum(len(v) - 1 for v in expected.values())
    s = next(shards.read_dataset(cfg.out))
    assert s.meta["engine"] == "local" and "/img/" in s.meta["url"] and s.image().size == (96, 96)


def test_a_slow_download_loses_no_search_result(serve, tmp_path):
    # one download thread stuck on a slow first image while the parser has 11 more results: icrawler's
    # queue holds 5, and a result whose put timed out (1 s) was retried as a "duplicate" and dropped
    jpg = {"Content-Type": "image/jpeg"}
    bodies = [encode(smooth_image(280 + i)) for i in range(12)]

    def slow(n):
        time.sleep(2.5)
        return 200, jpg, bodies[0]
    srv = serve({f"/i{i}.jpg": (200, jpg, b) for i, b in enumerate(bodies)})
    srv.routes["/i0.jpg"] = slow
    divs = []
    for i in range(12):
        m = html.escape(json.dumps({"murl": f"{srv.url}/i{i}.jpg", "t": str(i)}, separators=(",", ":")), quote=True)
        divs.append(f'<div class="imgpt"><a class="iusc" m="{m}" href="#"><img src="x"></a></div>')
    srv.routes["/images/async?q=thing&first=0"] = (200, {"Content-Type": "text/html"},
                                                   ("<html><body>" + "".join(divs) + "</body></html>").encode())
    unit = Unit("local", "thing", "thing", 0, 0, 12)
    record = crawl_unit(unit, _options(fast_config(tmp_path, threads=1, timeout=5.0)), str(tmp_path / "u"), srv.url)
    assert record["found"] == record["accepted"] == 12, (srv.hits, record)
    assert all(srv.hits.get(f"/i{i}.jpg") == 1 for i in range(12))


def test_hostile_server_yields_exactly_the_good_images(ray_local, serve, tmp_path):
    good = [encode(smooth_image(i)) for i in range(3)]
    png = encode(smooth_image(3), "PNG")
    noisy = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)),
                   quality=95)
    jpg = {"Content-Type": "image/jpeg"}

    def slow(n):
        time.sleep(4.0)  # well past the timeout below, which leaves room for a loaded machine
        return 200, jpg, good[0]
    routes = {
        "/good0.jpg": (200, jpg, good[0]),
        "/good1.jpg": (200, jpg, good[1]),
        "/good.png": (200, {"Content-Type": "image/png"}, png),
        "/flaky.jpg": lambda n: (429, {"Retry-After": "0"}, b"slow down") if n == 1 else (200, jpg, good[2]),
        "/missing.jpg": (404, {}, b"not here"),
        "/broken.jpg": (500, {}, b"oops"),
        "/slow.jpg": slow,
        "/html.jpg": (200, jpg, b"<!DOCTYPE html><html><body>Not found</body></html>"),
        "/truncated.jpg": (200, jpg, good[1][: len(good[1]) // 2]),
        "/bomb.png": (200, {"Content-Type": "image/png"}, png_header_only(50000, 50000)),
        "/loop.jpg": (302, {"Location": "/loop.jpg"}, b""),
        "/noai.jpg": (200, {**jpg, "X-Robots-Tag": "noai"}, good[0]),
        "/tiny.jpg": (200, jpg, encode(smooth_image(9, 16, 12))),
        "/huge.jpg": (200, jpg, noisy),
    }
    srv = serve(routes)
    urls = write_urls(tmp_path / "urls.csv", [(srv.url + p, "thing") for p in routes])
    cfg = fast_config(tmp_path, urls=urls, timeout=1.5, max_bytes=len(noisy) - 1, shard_size=5, near_dup_bits=-1)
    summary = run_crawl(cfg)
    got = {s.key for s in shards.read_dataset(cfg.out)}
    assert got == {key_of(good[0]), key_of(good[1]), key_of(good[2]), key_of(png)}
    reasons = {r["url"][len(srv.url):]: r["reason"] for st in shards.read_stats(storage.join(cfg.out, "_units"))
               for r in st["rejects"]}
    assert reasons == {"/missing.jpg": "http_404", "/broken.jpg": "http_500", "/slow.jpg": "timeout",
                       "/html.jpg": "not_image", "/truncated.jpg": "truncated", "/bomb.png": "too_many_pixels",
                       "/loop.jpg": "too_many_redirects", "/noai.jpg": "noai", "/tiny.jpg": "too_small",
                       "/huge.jpg": "too_large"}
    assert srv.hits["/flaky.jpg"] == 2 and srv.hits["/broken.jpg"] == 2  # one retry each
    assert all("maskless" in a for a in srv.agents)
    g = summary["by_engine_class"]["urls/(list)"]
    assert g["found"] == len(routes) and g["accepted"] == 4 and sum(g["rejected"].values()) == 10


def test_robots_txt_is_read_once_per_site_and_obeyed(ray_local, serve, tmp_path):
    jpg, png = {"Content-Type": "image/jpeg"}, {"Content-Type": "image/png"}
    img = [encode(smooth_image(200 + i)) for i in range(8)]
    text = {"Content-Type": "text/plain"}
    ruled = serve({  # other agents may fetch nothing; maskless has its own group, with RFC 9309 wildcards
        "/robots.txt": (200, text, b"User-agent: *\nDisallow: /\n\nUser-agent: maskless\nDisallow: /private/\n"
                                   b"Allow: /private/ok.jpg\nDisallow: /*.png$\n"),
        "/a.jpg": (200, jpg, img[0]), "/private/b.jpg": (200, jpg, img[1]), "/private/ok.jpg": (200, jpg, img[2]),
        "/c.png": (200, png, encode(smooth_image(209), "PNG")), "/c.png?v=1": (200, png, encode(smooth_image(210), "PNG")),
    })
    target = serve({"/robots.txt": (200, text, b"User-agent: maskless\nDisallow: /x.jpg\n"),
                    "/x.jpg": (200, jpg, img[3]), "/z.jpg": (200, jpg, img[4])})
    ruled.routes["/moved.jpg"] = (302, {"Location": target.url + "/x.jpg"}, b"")
    down = serve({"/robots.txt": (503, {}, b"busy"), "/y.jpg": (200, jpg, img[5])})
    # rules served as text/html (a misconfigured server) are rules all the same
    slow = serve({"/robots.txt": (200, {"Content-Type": "text/html"}, b"User-agent: *\nCrawl-delay: 60\n"),
                  "/s.jpg": (200, jpg, img[6])})
    paced = serve({"/robots.txt": (200, text, b"User-agent: *\nCrawl-delay: 0.4\n"),
                   **{f"/p{i}.jpg": (200, jpg, encode(smooth_image(220 + i))) for i in range(3)}})
    rows = [(ruled.url + p, "thing") for p in ("/a.jpg", "/private/b.jpg", "/private/ok.jpg", "/c.png", "/c.png?v=1",
                                                 "/moved.jpg")]
    rows += [(target.url + "/z.jpg", "thing"), (down.url + "/y.jpg", "thing"), (slow.url + "/s.jpg", "thing")]
    rows += [(f"{paced.url}/p{i}.jpg", "thing") for i in range(3)]
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", rows), near_dup_bits=-1)
    summary = run_crawl(cfg)
    got = {s.meta["url"] for s in shards.read_dataset(cfg.out)}
    assert got == {ruled.url + "/a.jpg", ruled.url + "/private/ok.jpg", ruled.url + "/c.png?v=1",
                   target.url + "/z.jpg", *(f"{paced.url}/p{i}.jpg" for i in range(3))}
    reasons = {r["url"]: r["reason"] for st in shards.read_stats(storage.join(cfg.out, "_units")) for r in st["rejects"]}
    assert reasons == {ruled.url + "/private/b.jpg": "robots", ruled.url + "/c.png": "robots",
                       ruled.url + "/moved.jpg": "robots", down.url + "/y.jpg": "robots_unreachable",
                       slow.url + "/s.jpg": "crawl_delay"}
    # disallowed paths are never requested; every site's robots.txt is read once (the 503 once more: a retry)
    assert "/private/b.jpg" not in ruled.hits and "/c.png" not in ruled.hits
    assert "/y.jpg" not in down.hits and "/s.jpg" not in slow.hits
    assert [s.hits["/robots.txt"] for s in (ruled, target, down, slow, paced)] == [1, 1, 2, 1, 1]
    starts = sorted(t for i in range(3) for t in paced.times[f"/p{i}.jpg"])
    assert all(b - a > 0.3 for a, b in zip(starts, starts[1:])), starts  # Crawl-delay 0.4 s kept
    assert summary["by_engine_class"]["urls/(list)"]["rejected"] == {"robots": 3, "robots_unreachable": 1,
                                                                       "crawl_delay": 1}
    # --no-respect-robots: no robots.txt request, the disallowed image is fetched
    free = fast_config(tmp_path, out=str(tmp_path / "free"), respect_robots=False,
                       urls=write_urls(tmp_path / "f.csv", [(ruled.url + "/private/b.jpg", "thing")]))
    assert run_crawl(free)["samples"] == 1 and ruled.hits["/robots.txt"] == 1 and ruled.hits["/private/b.jpg"] == 1


def test_robots_txt_is_read_once_per_run_and_rerun(ray_local, serve, tmp_path):
    jpg, text = {"Content-Type": "image/jpeg"}, {"Content-Type": "text/plain"}
    srv = serve({"/robots.txt": (200, text, b"User-agent: maskless\nDisallow: /no/\n"),
                 **{f"/i{i}.jpg": (200, jpg, encode(smooth_image(240 + i))) for i in range(6)},
                 "/no/j.jpg": (200, jpg, encode(smooth_image(250)))})
    rows = [(f"{srv.url}/i{i}.jpg", "thing") for i in range(4)] + [(srv.url + "/no/j.jpg", "thing")]
    # three units of 2 rows, one after the other: the first one's answer serves the others
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", rows), shard_size=2, workers=1, near_dup_bits=-1)
    summary = run_crawl(cfg)
    assert summary["units_run"] == 3 and summary["samples"] == 4 and srv.hits["/robots.txt"] == 1
    assert "/no/j.jpg" not in srv.hits
    stats = shards.read_stats(storage.join(cfg.out, "_units"))
    assert sorted(st["robots_fetched"] for st in stats) == [0, 0, 1]
    # a later command into the same folder (new URLs, new units) asks no more
    more = rows + [(f"{srv.url}/i{i}.jpg", "thing") for i in (4, 5)]
    summary = run_crawl(fast_config(tmp_path, urls=write_urls(tmp_path / "v.csv", more), shard_size=2, workers=1,
                                    near_dup_bits=-1))
    assert summary["samples"] == 6 and srv.hits["/robots.txt"] == 1


def test_pace_book_books_each_host_interval_after_interval(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("maskless.ingest.pacer.time.monotonic", lambda: now[0])
    book = PaceBook()
    assert [book.reserve("a", 0.5) for _ in range(3)] == [0.0, 0.5, 1.0]
    assert book.reserve("b", 2.0) == 0.0  # hosts are paced apart
    now[0] += 0.75
    assert book.reserve("a", 0.5) == 0.75  # booked at 1001.5, asked at 1000.75
    now[0] += 10
    assert book.reserve("a", 0.5) == 0.0 and book.reserve("b", 2.0) == 0.0  # past bookings do not carry over
    # past bookings are forgotten once there are too many hosts
    book = PaceBook()
    for i in range(FORGET_AFTER + 1):
        book.reserve(f"h{i}", 0.001)
    now[0] += 5
    book.reserve("c", 1.0)
    assert list(book._next) == ["c"]
    # bookings still ahead are kept, and the book is scanned again only once it has doubled
    book = PaceBook()
    for i in range(FORGET_AFTER + 2):
        book.reserve(f"h{i}", 100.0)
    assert len(book._next) == FORGET_AFTER + 2  # the scan at FORGET_AFTER + 1 found nothing past
    now[0] += 200
    book.reserve("d", 1.0)
    assert len(book._next) == FORGET_AFTER + 3  # all past now, but no scan before 2 x (FORGET_AFTER + 1)


def test_shared_pacer_books_through_the_actor_and_survives_losing_it(ray_local, caplog):
    actor = start_pacer()
    first, second = SharedPacer(actor), SharedPacer(actor)  # two tasks
    assert first("h", 30.0) == 0.0 and 29.0 < second("h", 30.0) <= 30.0  # one book for both
    ray_local.kill(actor)
    # ray.kill only asks: a call made at once may still reach the actor (it once booked "h" at +60 s),
    # so wait until the actor answers no more (another host's booking, which "h" does not see)
    with pytest.raises(ray_local.exceptions.RayActorError):
        for _ in range(200):
            ray_local.get(actor.reserve.remote("probe", 0.0), timeout=10)
            time.sleep(0.05)
    assert second("h", 30.0) == 0.0  # its own book from now on: a unit is never lost to the pacer
    assert 29.0 < second("h", 30.0) <= 30.0 and "unreachable" in caplog.text


def test_crawl_delay_holds_across_concurrent_tasks(ray_local, serve, tmp_path):
    # two units crawl the same host at once; its Crawl-delay is for the crawl, not for each task
    srv = serve({"/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nCrawl-delay: 0.5\n"),
                 **{f"/i{i}.jpg": (200, {"Content-Type": "image/jpeg"}, encode(smooth_image(260 + i))) for i in range(6)}})
    rows = [(f"{srv.url}/i{i}.jpg", "thing") for i in range(6)]
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", rows), shard_size=3, workers=2, near_dup_bits=-1)
    assert run_crawl(cfg)["samples"] == 6
    starts = sorted(t for i in range(6) for t in srv.times[f"/i{i}.jpg"])
    gaps = [round(b - a, 3) for a, b in zip(starts, starts[1:])]
    assert len(starts) == 6 and min(gaps) > 0.35, gaps


def test_a_unit_keeps_the_first_results_of_its_window_whatever_finishes_first(serve, tmp_path):
    jpg = {"Content-Type": "image/jpeg"}
    bodies = [encode(smooth_image(270 + i)) for i in range(8)]

    def slow(n):  # the second result takes longest: the window fills while it is still in flight
        time.sleep(1.0)
        return 200, jpg, bodies[1]
    srv = serve({**{f"/i{i}.jpg": (200, jpg, b) for i, b in enumerate(bodies)}, "/i1.jpg": slow})
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", [(f"{srv.url}/i{i}.jpg", "thing") for i in range(8)]))
    (whole,) = plan_units(cfg)
    unit = dataclasses.replace(whole, count=5)  # a window of 5 over 8 results
    units_root = str(tmp_path / "units")
    record = crawl_unit(unit, _options(cfg), units_root, None)
    kept = sorted(s.meta["url"] for s in shards.read_shard(storage.join(units_root, unit.name + ".tar")))
    assert kept == sorted(f"{srv.url}/i{i}.jpg" for i in range(5))
    assert record["accepted"] == 5 and record["beyond_window"] >= 1  # rank 5 finished before rank 1


def test_greedy_site_crawl_follows_only_the_pages_robots_txt_allows(ray_local, serve, tmp_path):
    jpg, page = {"Content-Type": "image/jpeg"}, {"Content-Type": "text/html"}
    img = [encode(smooth_image(300 + i)) for i in range(3)]
    srv = serve({})
    u = srv.url
    srv.routes.update({
        "/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: maskless\nDisallow: /private\n"),
        "/": (200, page, f'<html><body><img src="{u}/i0.jpg"><a href="{u}/open.html">open</a>'
                         f'<a href="{u}/private/p.html">private</a></body></html>'.encode()),
        "/open.html": (200, page, f'<html><body><img src="{u}/i1.jpg"></body></html>'.encode()),
        "/private/p.html": (200, page, f'<html><body><img src="{u}/i2.jpg"></body></html>'.encode()),
        **{f"/i{i}.jpg": (200, jpg, b) for i, b in enumerate(img)},
    })
    cfg = fast_config(tmp_path, engine=["greedy"], classes={"thing": [u]}, images_per_query=3,
                      unit_idle_timeout=3.0, near_dup_bits=-1)
    run_crawl(cfg)
    assert {s.key for s in shards.read_dataset(cfg.out)} == {key_of(img[0]), key_of(img[1])}
    assert "/private/p.html" not in srv.hits and "/i2.jpg" not in srv.hits and srv.hits["/robots.txt"] == 1
    (stats,) = shards.read_stats(storage.join(cfg.out, "_units"))
    assert stats["pages_disallowed"] >= 1  # the private link, once per time the root page is parsed


def test_private_addresses_refused_before_any_connection(ray_local, serve, tmp_path):
    srv = serve({"/a.jpg": (200, {"Content-Type": "image/jpeg"}, encode(smooth_image(1)))})
    urls = write_urls(tmp_path / "urls.csv", [(srv.url + "/a.jpg", "x"), (srv.url + "/b.jpg", "y")])
    summary = run_crawl(fast_config(tmp_path, urls=urls, allow_private=False))
    assert srv.requests == 0
    assert summary["samples"] == 0
    assert summary["by_engine_class"]["urls/(list)"]["rejected"] == {"refused_private": 2}


def test_exact_and_near_duplicates_merge_labels_across_units_and_reruns(ray_local, serve, tmp_path):
    a = smooth_image(11, 200, 160)
    a_bytes = encode(a)
    near = encode(a.resize((180, 144), Image.Resampling.BILINEAR), quality=70)
    b_bytes = encode(smooth_image(12, 200, 160))
    jpg = {"Content-Type": "image/jpeg"}
    srv = serve({"/a.jpg": (200, jpg, a_bytes), "/a-copy.jpg": (200, jpg, a_bytes),
                 "/a-small.jpg": (200, jpg, near), "/b.jpg": (200, jpg, b_bytes)})
    rows = [(srv.url + "/a.jpg", "cat"), (srv.url + "/b.jpg", "cat"),
            (srv.url + "/a-copy.jpg", "dog"), (srv.url + "/a-small.jpg", "bird", "cow")]
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", rows), shard_size=2)  # 2 units
    first = run_crawl(cfg)
    got = {s.key: s for s in shards.read_dataset(cfg.out)}
    assert set(got) == {key_of(a_bytes), key_of(b_bytes)}
    assert got[key_of(a_bytes)].labels == ["bird", "cat", "cow", "dog"]  # the larger original is kept
    assert got[key_of(b_bytes)].labels == ["cat"]
    assert first["exact_duplicates"] == 1 and first["near_duplicates"] == 1
    kept = got[key_of(a_bytes)].meta
    assert kept["width"] == 200 and kept["url"] in (srv.url + "/a.jpg", srv.url + "/a-copy.jpg")
    assert sorted([kept["url"], *kept["duplicate_urls"]]) == [srv.url + p for p in ("/a-copy.jpg", "/a-small.jpg", "/a.jpg")]
    hits = srv.requests
    again = run_crawl(cfg)  # a rerun fetches nothing and rewrites nothing
    assert srv.requests == hits and again["units_run"] == 0 and again["shards_rewritten"] == 0
    assert {s.key: s.labels for s in shards.read_dataset(cfg.out)} == {k: s.labels for k, s in got.items()}


def test_dedup_decision_is_stable_and_band_index_is_exact():
    rng = np.random.default_rng(0)
    hashes = [int(rng.integers(0, 2**63)) for _ in range(200)]
    hashes += [h ^ (1 << int(rng.integers(0, 64))) ^ (1 << int(rng.integers(0, 64))) for h in hashes[:50]]
    index = NearIndex(4)
    for i, h in enumerate(hashes[:100]):
        index.add(h, i)
    for h in hashes:
        brute = [i for i, k in enumerate(hashes[:100]) if hamming(h, k) <= 4]
        assert (index.find(h) is not None) == bool(brute)
    rows = [{"shard": "s%d" % (i % 3), "key": "k%03d" % i, "labels": ["c%d" % (i % 4)], "width": 10 + i % 7,
             "height": 10, "sha256": "x%d" % (i % 150), "phash": "%016x" % h} for i, h in enumerate(hashes)]
    d = decide(rows, 4)
    kept = [r for r in rows if (r["shard"], r["key"]) not in d.dropped]
    for r in kept:
        r["labels"] = d.labels[(r["shard"], r["key"])]
    d2 = decide(kept, 4)  # the pass applied to its own output changes nothing
    assert not d2.dropped and all(d2.labels[k] == d.labels[k] for k in d2.labels)
    assert len(kept) + len(d.dropped) == len(rows)
    all_labels = set(l for r in rows for l in r["labels"])
    assert set(l for r in kept for l in r["labels"]) == all_labels  # no label is lost


# ---------------------------------------------------------------- kill and rerun

KILLED_RUN = """
import sys, ray
from maskless.ingest.crawl import CrawlConfig, run_crawl
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
         configure_logging=False, _temp_dir=sys.argv[3])
run_crawl(CrawlConfig(engine=["urls"], urls=sys.argv[1], out=sys.argv[2], allow_private=True, per_host_rps=0,
                      shard_size=3, threads=1, workers=1, min_size=32, progress=False))
"""


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = [int(x) for x in out.split()]
    return kids + [d for k in kids for d in descendants(k)]


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


LOCAL_RAY_DRIVER = """
import sys, time
import ray
from maskless.ray_runtime import init_ray
init_ray(num_cpus=1, temp_dir=sys.argv[1])
print(ray.get(ray.remote(lambda: "ready").remote()), flush=True)
time.sleep(600)
"""


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_local_ray_does_not_outlive_its_sigkilled_driver(tmp_path):
    """Before: the DashboardAgent and RuntimeEnvAgent of a SIGKILLed driver's local Ray lived on (about
    a minute, 170 MB). Now every process the driver started is gone within seconds, the reaper too.
    Only processes this test started are looked at and killed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    ray_dir = tempfile.mkdtemp(prefix="mlk")  # Ray's socket paths must stay under 107 bytes
    log = tmp_path / "driver.log"
    for _ in range(3):  # Ray gives its raylet 30 s to start: a loaded machine can miss that window
        proc = subprocess.Popen([sys.executable, "-c", LOCAL_RAY_DRIVER, ray_dir], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, start_new_session=True)
        started = proc.stdout.readline().strip() == "ready"
        if started or "timed out during startup" not in log.read_text():
            break
        proc.wait()
    tree = []
    try:
        assert started, f"the driver did not start: {log.read_text()[-2000:]}"
        tree = descendants(proc.pid)  # everything the driver started: its Ray, the agents, the reaper
        names = " | ".join(cmdline(p) for p in tree)
        assert "DashboardAgent" in names and "RuntimeEnvAgent" in names and "--reap" in names, names
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        end = time.time() + 20
        while any(not zombie(p) for p in tree) and time.time() < end:
            time.sleep(0.1)
        left = {p: cmdline(p) for p in tree if not zombie(p)}
        assert not left, left
    finally:
        for pid in [proc.pid] + tree:
            if not zombie(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_kill_and_rerun_loses_nothing_and_duplicates_nothing(ray_local, serve, tmp_path):
    images = [encode(smooth_image(100 + i)) for i in range(18)]
    srv = serve({f"/{i}.jpg": (200, {"Content-Type": "image/jpeg"}, b) for i, b in enumerate(images)}, delay=0.1)
    urls = write_urls(tmp_path / "u.csv", [(f"{srv.url}/{i}.jpg", f"c{i % 3}") for i in range(18)])
    out, units = str(tmp_path / "out"), str(tmp_path / "out" / "_units")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    ray_dir = tempfile.mkdtemp(prefix="mlk")  # Ray's socket paths must stay under 107 bytes
    log = tmp_path / "killed.log"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, urls, out, ray_dir], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        deadline = time.time() + 300  # Ray's start and the first units: seconds here, minutes on a loaded machine
        while len(shards.shard_names(units)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"the crawl to kill ended early: {log.read_text()[-2000:]}"
    finally:
        tree = [proc.pid] + descendants(proc.pid)  # the driver and every Ray process it started
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        gone = time.time() + 10
        while any(os.path.exists(f"/proc/{pid}") and not zombie(pid) for pid in tree) and time.time() < gone:
            time.sleep(0.05)
        shutil.rmtree(ray_dir, ignore_errors=True)
    before = {n: os.stat(os.path.join(units, n + ".tar")).st_mtime_ns for n in shards.shard_names(units)}
    assert 2 <= len(before) < 6, "the kill should land mid-crawl"
    cfg = fast_config(tmp_path, urls=urls, out=out, shard_size=3)
    summary = run_crawl(cfg)
    assert summary["units"] == 6 and summary["units_already_done"] == len(before)
    assert summary["units_run"] == 6 - len(before)
    for n, mtime in before.items():  # work written before the kill is kept, not redone
        assert os.stat(os.path.join(units, n + ".tar")).st_mtime_ns == mtime
    samples = list(shards.read_dataset(out))
    assert sorted(s.key for s in samples) == sorted(key_of(b) for b in images)  # each image exactly once
    assert {s.key: s.labels for s in samples} == {key_of(b): [f"c{i % 3}"] for i, b in enumerate(images)}
    # a Ray retry of a unit that had committed returns its record instead of fetching again
    unit = plan_units(cfg)[0]
    hits = srv.requests
    assert crawl_unit(unit, _options(cfg), units, None)["resumed"] and srv.requests == hits


# ---------------------------------------------------------------- hostile servers: time, names, addresses

def crawl_one_url(url, tmp_path, **options) -> tuple[dict, float]:
    """Crawl one URL as a unit, in this process (no robots.txt, no retry unless asked); returns (record,
    seconds)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = fast_config(tmp_path, **{"respect_robots": False, "retries": 0, **options,
                                   "urls": write_urls(tmp_path / "one.csv", [(url, "thing")])})
    (unit,) = plan_units(cfg)
    t0 = time.monotonic()
    record = crawl_unit(unit, _options(cfg), str(tmp_path / "units"), None)
    return record, time.monotonic() - t0



def test_a_trickling_body_is_cut_at_the_request_deadline(serve, tmp_path):
    # 45 bytes, one every 0.3 s, no Content-Length: no read ever waits --timeout, the body takes 13.5 s
    srv = serve({"/slow.jpg": (200, {"Content-Type": "image/jpeg"}, trickle(b"\xff" * 45, 0.3))})
    record, seconds = crawl_one_url(srv.url + "/slow.jpg", tmp_path, timeout=1.0, request_deadline=1.5,
                                    unit_idle_timeout=60.0)
    assert record["rejected"] == {"timeout": 1} and record["accepted"] == 0
    assert seconds < 7.0, seconds  # 1.5 s and the unit's own tail (a loaded machine), not the 13.5 s of the body


def test_trickling_headers_are_cut_at_the_request_deadline(serve, tmp_path):
    head = b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\nX-Pad: " + b"a" * 200
    srv = serve({"/slow.jpg": (None, {}, trickle(head, 0.2))})  # 40 s of headers, never finished
    record, seconds = crawl_one_url(srv.url + "/slow.jpg", tmp_path, timeout=1.0, request_deadline=1.5,
                                    unit_idle_timeout=60.0)
    assert record["rejected"] == {"timeout": 1} and seconds < 7.0, (record["rejected"], seconds)


def test_a_shorter_deadline_set_after_a_longer_one_still_expires_on_time():
    """The watchdog sleeps until its earliest deadline and is woken only when a new one is earlier:
    a 0.3 s deadline set while a 30 s one is watched must not wait for the 30 s."""
    from maskless.ingest.deadline import Deadlines

    long, short = Deadlines(30.0), Deadlines(0.3)
    seen = {}

    def hold(deadlines, name):
        with deadlines.request() as d:
            t0 = time.monotonic()
            while not d.expired and time.monotonic() - t0 < 5.0:
                time.sleep(0.01)
            seen[name] = (d.expired, time.monotonic() - t0)

    first = threading.Thread(target=hold, args=(long, "long"), daemon=True)
    first.start()
    time.sleep(0.2)  # the 30 s deadline is the watchdog's earliest now
    hold(short, "short")
    assert seen["short"][0] and seen["short"][1] < 2.0, seen
    long.cancel()
    first.join(5.0)
    assert seen["long"][0] and seen["long"][1] < 5.0, seen  # ended by cancel, not by its 30 s


def test_an_idle_stop_ends_the_requests_in_flight(serve, tmp_path):
    """The issue's reproduction, shortened: a body at 1 byte per 0.5 s held its unit until the body
    ended (45 bytes at 1 byte/s: 45 s) whatever --unit-idle-timeout said."""
    srv = serve({"/slow.jpg": (200, {"Content-Type": "image/jpeg"}, trickle(b"\xff" * 45, 0.5))})
    record, seconds = crawl_one_url(srv.url + "/slow.jpg", tmp_path, timeout=2.0, request_deadline=60.0,
                                    unit_idle_timeout=1.5)
    assert record["rejected"] == {"timeout": 1} and record["idle_stops"] >= 1
    assert seconds < 7.0, seconds  # 1.5 s idle and the unit's tail, not the 22 s of the body


@pytest.fixture
def fake_dns(monkeypatch):
    """Names under .test answer what `answers[name]` says, one answer per lookup (the last one repeats);
    literal addresses resolve as usual. No connection may leave loopback: connecting elsewhere is
    refused here, and recorded."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    answers, lookups, connects = {}, [], []

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".test"):
            lookups.append(host)
            queue = answers.get(host) or [None]
            ip = queue.pop(0) if len(queue) > 1 else queue[0]
            if ip is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real_getaddrinfo(ip, port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    def connect(sock, address):
        connects.append(address[0])
        if not address[0].startswith("127."):
            raise ConnectionRefusedError(111, "test: no traffic leaves loopback")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return answers, lookups, connects


def test_dns_rebinding_cannot_reach_a_private_address(serve, tmp_path, fake_dns):
    """The name answers public to the check and loopback a moment later: the connection goes to the
    address that was checked (refused here, as no packet may leave loopback), never to the server."""
    answers, lookups, connects = fake_dns
    srv = serve({"/a.jpg": (200, {"Content-Type": "image/jpeg"}, encode(smooth_image(400)))})
    port = srv.url.rsplit(":", 1)[1]
    answers["rebind.test"] = ["93.184.216.34", "127.0.0.1"]
    record, _ = crawl_one_url(f"http://rebind.test:{port}/a.jpg", tmp_path, allow_private=False, retries=1)
    assert srv.requests == 0 and record["accepted"] == 0
    assert "127.0.0.1" not in connects and connects == ["93.184.216.34"]
    # the retry looked the name up again, got loopback, and was refused before connecting
    assert lookups == ["rebind.test", "rebind.test"] and record["rejected"] == {"refused_private": 1}


def test_a_pinned_connection_still_names_the_host(serve, fake_dns):
    import requests

    from maskless.ingest.safety import SafeAdapter

    answers, lookups, connects = fake_dns
    srv = serve({"/a.jpg": (200, {"Content-Type": "image/jpeg"}, b"x")})
    port = srv.url.rsplit(":", 1)[1]
    answers["named.test"] = ["127.0.0.1"]
    session = requests.Session()
    session.mount("http://", SafeAdapter(allow_private=True))
    assert session.get(f"http://named.test:{port}/a.jpg", timeout=5).content == b"x"
    assert srv.hosts == {f"named.test:{port}"} and connects == ["127.0.0.1"] and lookups == ["named.test"]


def test_a_name_that_does_not_resolve_is_a_retried_dns_error(serve, tmp_path, fake_dns):
    answers, lookups, connects = fake_dns
    record, _ = crawl_one_url("http://gone.test/a.jpg", tmp_path, allow_private=False, retries=2)
    assert record["rejected"] == {"dns_error": 1} and lookups == ["gone.test"] * 3 and connects == []
    assert record["requests_refused"] == 0


def test_a_gzip_bomb_is_cut_at_max_bytes(serve, tmp_path):
    import gzip

    bomb = gzip.compress(b"\0" * 50_000_000, 9)  # about 50 KB on the wire
    srv = serve({"/z.jpg": (200, {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}, bomb)})
    record, _ = crawl_one_url(srv.url + "/z.jpg", tmp_path, max_bytes=1_000_000)
    assert len(bomb) < 100_000 and record["rejected"] == {"too_large": 1}


def test_retry_after_as_an_http_date_is_honoured_and_capped(serve, tmp_path):
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    from maskless.ingest.downloader import retry_after_seconds

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert retry_after_seconds("Fri, 02 Jan 2026 03:04:07 GMT", now) == 2.0
    assert retry_after_seconds("Fri, 02 Jan 2026 03:04:00 GMT", now) == 0.0  # past
    assert retry_after_seconds("3", now) == 3.0 and retry_after_seconds("soon", now) == 0.0
    jpg = encode(smooth_image(401))

    def busy(n, seconds):
        when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=seconds), usegmt=True)
        return (503, {"Retry-After": when}, b"busy") if n == 1 else (200, {"Content-Type": "image/jpeg"}, jpg)
    srv = serve({"/a.jpg": lambda n: busy(n, 3), "/b.jpg": lambda n: busy(n, 3600)})
    record, _ = crawl_one_url(srv.url + "/a.jpg", tmp_path, retries=1, backoff=0.05, max_backoff=30.0)
    gap = srv.times["/a.jpg"][1] - srv.times["/a.jpg"][0]
    assert record["accepted"] == 1 and 1.5 < gap < 4.5, gap  # the date's second is cut: 2-3 s, not 0.05 s
    record, _ = crawl_one_url(srv.url + "/b.jpg", tmp_path / "b", retries=1, backoff=0.05, max_backoff=0.5)
    gap = srv.times["/b.jpg"][1] - srv.times["/b.jpg"][0]
    assert record["accepted"] == 1 and gap < 2.0, gap  # an hour asked, --max-backoff 0.5 s given


# ---------------------------------------------------------------- hostile images: orientation, depth, bombs

def halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


def test_exif_orientation_is_applied_before_resizing():
    # orientation 6 (a phone held upright): the pixels are stored turned 90 degrees anticlockwise, so
    # the stored left half is the picture's top; orientation 8 the other way round, 3 upside down
    for fmt, orientation, top_is_red, size in (("JPEG", 6, True, (50, 100)), ("PNG", 8, False, (50, 100)),
                                               ("JPEG", 3, None, (100, 50)), ("JPEG", 1, None, (100, 50))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out = clean_image(encode(halves(400, 200), fmt, exif=exif.tobytes()), image_size=100, min_size=16)
        img = np.asarray(Image.open(io.BytesIO(out.jpg)))
        assert (out.width, out.height) == size and (out.source_width, out.source_height) == (size[0] * 4, size[1] * 4)
        assert Image.open(io.BytesIO(out.jpg)).getexif().get(0x0112) is None  # no reader turns it again
        if top_is_red is None:  # left/right kept (1) or swapped (3)
            left_red = img[:, :10, 0].mean() > 200
            assert left_red == (orientation == 1), (fmt, orientation)
        else:
            top_red = img[:10, :, 0].mean() > 200
            assert top_red == top_is_red and (img[-10:, :, 0].mean() > 200) != top_is_red, (fmt, orientation)


def two_levels(mode: str, low, high, shape=(48, 64)) -> Image.Image:
    """Left half `low`, right half `high`: flat halves, yet not a near-blank image."""
    dtype = {"I;16": np.uint16, "F": np.float32}[mode]
    arr = np.full(shape, low, dtype)
    arr[:, shape[1] // 2:] = high
    return Image.fromarray(arr)  # uint16: I;16, float32: F


def test_high_bit_depth_is_scaled_to_8_bits_or_rejected():
    import cv2

    def halves_8bit(data: bytes) -> tuple[float, float]:
        got = np.asarray(Image.open(io.BytesIO(clean_image(data, min_size=16).jpg)).convert("L")).astype(float)
        return got[:, 8:24].mean(), got[:, 40:56].mean()  # away from the edge JPEG blurs

    gray16 = encode(two_levels("I;16", 32768, 16384), "PNG")
    assert Image.open(io.BytesIO(gray16)).mode == "I;16"
    assert np.allclose(halves_8bit(gray16), (128, 64), atol=1.5)  # 32768 was all white
    ramp = (np.arange(64, dtype=np.uint16) * 1040)[None, :].repeat(48, 0)  # 0 .. 65520
    out = clean_image(encode(Image.fromarray(ramp), "PNG"), min_size=16)
    got = np.asarray(Image.open(io.BytesIO(out.jpg)).convert("L")).astype(int)
    assert np.abs(got[24] - (ramp[24] >> 8)).max() <= 3  # the ramp's high byte, JPEG's error aside
    rgb = np.full((48, 64, 3), 40000, np.uint16)
    rgb[:, 32:] = 10000
    rgb16 = cv2.imencode(".png", rgb)[1].tobytes()
    assert np.allclose(halves_8bit(rgb16), (40000 >> 8, 10000 >> 8), atol=1.5)
    half = encode(two_levels("F", 0.5, 0.25), "TIFF")
    assert Image.open(io.BytesIO(half)).mode == "F"
    assert np.allclose(halves_8bit(half), (128, 64), atol=1.5)  # 0.5 was all black
    for bad in (Image.new("F", (64, 48), 3.0), Image.new("F", (64, 48), -0.25)):
        with pytest.raises(Rejected) as e:
            clean_image(encode(bad, "TIFF"), min_size=16)
        assert e.value.reason == "unsupported_depth"


# A lossless WebP of 34 bytes declaring 6000 x 6000 px: decoded, 36 million pixels (docs/CRAWL.md)
WEBP_BOMB = bytes.fromhex("524946461a000000574542505650384c0e0000002f6fd7db05071011fd0f4444ff03")


def test_the_pixel_budget_bounds_decodes_in_flight():
    from maskless.ingest.validator import PixelBudget

    assert len(WEBP_BOMB) == 34 and Image.open(io.BytesIO(WEBP_BOMB)).size == (6000, 6000)
    budget, inside, most = PixelBudget(10), [0], [0]
    lock = threading.Lock()

    def use(n):
        with budget.reserve(n):
            with lock:
                inside[0] += min(n, 10)  # one larger than the budget takes all of it
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= min(n, 10)
    threads = [threading.Thread(target=use, args=(n,)) for n in (4, 4, 4, 25, 3, 6)]  # 25 > the budget: alone
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads) and budget.used == 0
    assert most[0] == budget.peak == 10
    # four small bombs (4 million px each) from four threads at once, a budget of one: one at a time
    bomb = encode(Image.new("RGB", (2000, 2000)), "WEBP", lossless=True, quality=0, method=0)
    one = PixelBudget(4_000_000)
    results = []

    def decode():
        try:
            results.append(clean_image(bomb, pixels=one).width)
        except Rejected as e:  # a flat bomb is decoded (under the budget), then rejected as near blank
            results.append(e.reason)
    threads = [threading.Thread(target=decode) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == ["near_blank"] * 4 and one.peak == 4_000_000 and one.used == 0
    # a JPEG draws only the pixels its draft decodes: 4000 x 3000 for 256 px is decoded at 1/8
    jpeg = PixelBudget(10**9)
    out = clean_image(encode(smooth_image(402, 4000, 3000)), image_size=256, pixels=jpeg)
    assert (out.width, out.height) == (256, 192) and jpeg.peak == 500 * 375


BOMB_MEMORY = """
import sys, threading
from maskless.ingest.validator import PixelBudget, Rejected, clean_image
def peak_kib():  # this process's own high-water mark: ru_maxrss would carry the parent's over exec
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
data, budget = open(sys.argv[1], "rb").read(), PixelBudget(int(sys.argv[2]))
base = peak_kib()
done = []
def decode():
    try:
        done.append(clean_image(data, pixels=budget).width)
    except Rejected as e:  # decoded in full under the budget, then rejected: flat
        done.append(e.reason)
threads = [threading.Thread(target=decode) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
assert done == ["near_blank"] * 4, done
print(peak_kib() - base)
"""


def test_four_bombs_at_once_cost_the_memory_of_one(tmp_path):
    """Peak memory of a process decoding four 9-million-pixel WebP bombs at once: with a budget of one
    bomb's pixels, about one decode's worth; with room for all four, about four."""
    path = tmp_path / "bomb.webp"
    path.write_bytes(encode(Image.new("RGB", (3000, 3000)), "WEBP", lossless=True, quality=0, method=0))

    def peak_kib(budget: int) -> int:
        out = subprocess.run([sys.executable, "-c", BOMB_MEMORY, str(path), str(budget)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout)
    one, four = peak_kib(9_000_000), peak_kib(36_000_000)
    assert one < 0.5 * four, (one, four)


DISK_FULL_CRAWL = """
set -u
mount -t tmpfs -o size=$SIZE tmpfs "$MNT"
crawl() { "$PY" -m maskless.cli crawl --engine urls --urls "$URLS" --out "$MNT/out" --allow-private \
    --per-host-rps 0 --shard-size 1 --workers 1 --threads 1 --min-size 32 --no-progress --num-cpus 2 \
    --near-dup-bits -1; }
crawl 2> "$LOG/first.err"; echo $? > "$LOG/first.rc"
find "$MNT/out/_units" -name '*.tar' -printf '%f %T@\n' > "$LOG/first.ls"
mount -o remount,size=4m "$MNT"  # space freed
crawl 2> "$LOG/second.err"; echo $? > "$LOG/second.rc"
cp -a "$MNT/out" "$LOG/out"
"""


@pytest.mark.slow
def test_disk_full_during_a_crawl_is_exit_2_and_a_rerun_finishes(serve, tmp_path):
    """A real full disk: OUT on a 160 KiB tmpfs, mounted in a private mount namespace of an
    unprivileged user namespace (`unshare -r -m`), so nothing outside this test sees it."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-r", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -r -m (user and mount namespaces) for a private tmpfs")
    noisy = [encode(Image.fromarray(np.random.default_rng(500 + i).integers(0, 255, (200, 200, 3), dtype=np.uint8)),
                    quality=95) for i in range(6)]  # about 35 KiB each once stored
    srv = serve({f"/{i}.jpg": (200, {"Content-Type": "image/jpeg"}, b) for i, b in enumerate(noisy)})
    urls = write_urls(tmp_path / "u.csv", [(f"{srv.url}/{i}.jpg", "thing") for i in range(6)])
    (tmp_path / "mnt").mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}, "PY": sys.executable,
           "URLS": urls, "MNT": str(tmp_path / "mnt"), "LOG": str(logs), "SIZE": "160k",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="mlk"), "PYTHONPATH": REPO}
    try:
        subprocess.run(["unshare", "-r", "-m", "sh", "-c", DISK_FULL_CRAWL], cwd=REPO, env=env, timeout=400)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    first, second = (logs / "first.err").read_text(), (logs / "second.err").read_text()
    assert (logs / "first.rc").read_text().strip() == "2", first[-3000:]
    assert "No space left on device" in first or "no space left on device" in first, first[-3000:]
    assert "free space and rerun the same command" in first and "Traceback" not in first, first[-3000:]
    assert "no space left on device writing unit urls-" in first, first[-3000:]  # the unit named
    committed = dict(line.split() for line in (logs / "first.ls").read_text().splitlines())
    assert 1 <= len(committed) < 6, committed
    assert (logs / "second.rc").read_text().strip() == "0", second[-3000:]
    out = str(logs / "out")
    assert sorted(s.key for s in shards.read_dataset(out)) == sorted(key_of(b) for b in noisy)
    for name, mtime in committed.items():  # what the first run committed is kept, not redone
        assert abs(os.stat(logs / "out" / "_units" / name).st_mtime - float(mtime)) < 1e-3, name


def _self_signed(tmp_path, name: str) -> tuple[str, str]:
    """A certificate for `name` and its key, as PEM files (cryptography)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_https_is_pinned_with_the_name_in_sni_and_the_certificate_check(serve, tmp_path, fake_dns):
    import ssl

    import requests

    from maskless.ingest.safety import SafeAdapter

    answers, lookups, connects = fake_dns
    cert, key = _self_signed(tmp_path, "tls.test")
    srv = serve({"/a.jpg": (200, {"Content-Type": "image/jpeg"}, b"tls body")})
    names = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    srv.httpd.socket = context.wrap_socket(srv.httpd.socket, server_side=True)
    port = srv.url.rsplit(":", 1)[1]
    answers["tls.test"] = ["127.0.0.1"]
    session = requests.Session()
    session.mount("https://", SafeAdapter(allow_private=True))
    assert session.get(f"https://tls.test:{port}/a.jpg", timeout=5, verify=cert).content == b"tls body"
    assert names == ["tls.test"] and srv.hosts == {f"tls.test:{port}"} and connects == ["127.0.0.1"]


def test_a_trickled_tls_handshake_is_cut_at_the_request_deadline(tmp_path):
    """A TLS record announced 16 KB long, then sent a byte every 0.2 s: the handshake waits for the
    whole record (an hour of it; CPython bounds a handshake by the socket timeout, here 5 s); the
    deadline ends it first, though ssl has detached the socket urllib3 holds during the handshake."""
    import requests

    from maskless.ingest.deadline import Deadlines
    from maskless.ingest.safety import SafeAdapter

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def slow_tls():
        conn, _ = server.accept()
        try:
            conn.sendall(b"\x16\x03\x03\x40\x00")  # handshake record header, 16 KB to follow
            while not stop.wait(0.2):
                conn.sendall(b"\x00")
        except OSError:
            pass
        finally:
            conn.close()
    t = threading.Thread(target=slow_tls, daemon=True)
    t.start()
    session = requests.Session()
    session.mount("https://", SafeAdapter(allow_private=True, deadlines=Deadlines(1.5)))
    t0 = time.monotonic()
    try:
        with pytest.raises(requests.Timeout, match="not complete after 1.5 s"):
            session.get(f"https://127.0.0.1:{server.getsockname()[1]}/", timeout=5.0)
        assert time.monotonic() - t0 < 4.5
    finally:
        stop.set()
        server.close()


# ---------------------------------------------------------------- crawl workers and progress

def test_crawl_workers_run_many_units_and_keep_their_connections(ray_local, serve, tmp_path):
    jpg = {"Content-Type": "image/jpeg"}
    images = [encode(smooth_image(400 + i)) for i in range(12)]
    srv = serve({"/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nAllow: /\n"),
                 **{f"/{i}.jpg": (200, jpg, b) for i, b in enumerate(images)}}, keep_alive=True)
    rows = [(f"{srv.url}/{i}.jpg", "thing") for i in range(12)]
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", rows), shard_size=2, workers=2, threads=1,
                      near_dup_bits=-1)
    summary = run_crawl(cfg)
    assert summary["units_run"] == 6 and summary["samples"] == 12 and summary["units_failed"] == []
    stats = shards.read_stats(storage.join(cfg.out, "_units"))
    assert len({(st["node"], st["pid"]) for st in stats}) <= 2  # 6 units, 2 worker processes
    # each worker keeps its one connection to the host from unit to unit (a unit alone opened its own)
    assert srv.connections <= 2, srv.connections


def test_pooled_connections_still_pass_the_address_guard(serve, tmp_path):
    jpg = {"Content-Type": "image/jpeg"}
    srv = serve({f"/{i}.jpg": (200, jpg, encode(smooth_image(410 + i))) for i in range(2)}, keep_alive=True)
    rows = [(f"{srv.url}/{i}.jpg", "thing") for i in range(2)]
    pools, units = connection_pools(1), str(tmp_path / "units")
    lax = fast_config(tmp_path, urls=write_urls(tmp_path / "a.csv", rows), threads=1, respect_robots=False)
    (unit,) = plan_units(lax)
    first = crawl_unit(unit, _options(lax), units, None, pools)
    assert first["accepted"] == 2 and srv.connections == 1 and srv.requests == 2
    strict = fast_config(tmp_path, urls=write_urls(tmp_path / "b.csv", rows), threads=1, respect_robots=False,
                         allow_private=False)
    (unit,) = plan_units(strict)
    second = crawl_unit(unit, _options(strict), units, None, pools)
    # the open connection to 127.0.0.1 is in the pool, and still every request is checked first
    assert second["accepted"] == 0 and second["rejected"] == {"refused_private": 2} and srv.requests == 2


def test_a_lost_crawl_worker_loses_only_its_unfinished_units(ray_local, serve, tmp_path):
    jpg = {"Content-Type": "image/jpeg"}
    images = [encode(smooth_image(420 + i)) for i in range(9)]

    def hangs_once(n):  # the first fetch of the second unit's last image waits for its worker to be killed
        if n == 1:
            time.sleep(3.0)
        return 200, jpg, images[5]
    srv = serve({**{f"/{i}.jpg": (200, jpg, b) for i, b in enumerate(images)}, "/5.jpg": hangs_once})
    rows = [(f"{srv.url}/{i}.jpg", f"c{i % 3}") for i in range(9)]
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", rows), shard_size=3, workers=1, threads=1,
                      near_dup_bits=-1, respect_robots=False, timeout=10.0)
    units_root = storage.join(cfg.out, "_units")
    first, second, third = (u.name for u in plan_units(cfg))
    box = {}
    runner = threading.Thread(target=lambda: box.update(summary=run_crawl(cfg)), daemon=True)
    runner.start()
    deadline = time.time() + 90
    while not (srv.hits.get("/5.jpg") and shards.shard_names(units_root)) and time.time() < deadline:
        time.sleep(0.02)
    assert shards.shard_names(units_root) == [first] and srv.hits.get("/5.jpg") == 1
    pid = storage.read_json(os.path.join(units_root, first + ".stats.json"))["pid"]
    assert pid in descendants(os.getpid())  # a worker of this test's own Ray, nobody else's
    committed = os.stat(os.path.join(units_root, first + ".tar")).st_mtime_ns
    os.kill(pid, signal.SIGKILL)
    runner.join(120)
    summary = box["summary"]
    assert summary["units_failed"] == [] and summary["units_run"] == 3 and summary["samples"] == 9
    samples = list(shards.read_dataset(cfg.out))
    assert sorted(s.key for s in samples) == sorted(key_of(b) for b in images)  # each image exactly once
    assert os.stat(os.path.join(units_root, first + ".tar")).st_mtime_ns == committed  # not redone
    assert [srv.hits[f"/{i}.jpg"] for i in range(9)] == [1, 1, 1, 2, 2, 2, 1, 1, 1]  # the lost unit refetched
    pids = {st["name"]: st["pid"] for st in shards.read_stats(units_root)}
    assert pids[first] == pid and pids[second] == pids[third] != pid  # on the restarted worker


def test_progress_counts_images_while_units_run(ray_local, serve, tmp_path, monkeypatch, capsys):
    jpg = {"Content-Type": "image/jpeg"}
    routes = {f"/{i}.jpg": (200, jpg, encode(smooth_image(440 + i))) for i in range(8)}
    routes.update({"/gone.jpg": (404, {}, b"gone"), "/page.jpg": (200, jpg, b"<html><body>moved</body></html>")})
    srv = serve(routes, delay=0.15)
    paths = ["/gone.jpg", "/0.jpg", "/1.jpg", "/2.jpg", "/3.jpg", "/4.jpg", "/5.jpg", "/page.jpg", "/6.jpg", "/7.jpg"]
    urls = write_urls(tmp_path / "u.csv", [(srv.url + p, "thing") for p in paths])
    monkeypatch.setattr(crawl, "PROGRESS_INTERVAL_S", 0.1)
    seen, show = [], CrawlProgress.show

    def watched(self, final=False):
        seen.append(self.snapshot())
        show(self, final)
    monkeypatch.setattr(CrawlProgress, "show", watched)
    cfg = fast_config(tmp_path, urls=urls, shard_size=5, workers=1, threads=1, progress=True, respect_robots=False,
                      near_dup_bits=-1)
    summary = run_crawl(cfg)
    running = [s for s in seen if s["units_done"] == 0]
    assert any(0 < s["accepted"] < 4 for s in running), running  # images counted while the first unit runs
    assert any(s["rejected"] == {"http_404": 1} for s in running)  # and its failures by reason
    final, g = seen[-1], summary["by_engine_class"]["urls/(list)"]
    assert final["accepted"] == summary["accepted_this_run"] == 8
    assert final["rejected"] == g["rejected"] == {"http_404": 1, "not_image": 1} and final["failed"] == 2
    assert final["settled"] == final["images"] == 10 and final["units_done"] == 2
    err = capsys.readouterr().err
    assert "crawl: 10/10 images, 2/2 units, accepted 8, failed 2 (http_404 1, not_image 1)" in err
    run_crawl(fast_config(tmp_path, urls=urls, out=str(tmp_path / "quiet"), shard_size=5, progress=False))
    captured = capsys.readouterr()
    assert "crawl:" not in captured.err + captured.out  # progress: false prints nothing


def test_progress_bar_shows_images_and_failure_reasons():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    units = [Unit("urls", "", "list", w, 5 * w, 5) for w in range(2)]
    out = Terminal()
    progress = CrawlProgress({u.name: 5 for u in units}, out=out)
    progress.unit_live(units[0].name, {"accepted": 2, "rejected": {"http_404": 1}, "settled": 3})
    progress.show()
    assert "3/10" in out.getvalue() and "units 0/2, accepted 2, failed 1 (http_404 1)" in out.getvalue()
    progress.unit_ended(units[0].name, {"accepted": 4, "rejected": {"http_404": 1}})
    progress.unit_live(units[0].name, {"accepted": 9, "rejected": {}, "settled": 9})  # late: ignored
    progress.unit_ended(units[1].name, None)  # a failed unit: its window is settled, nothing accepted
    progress.close()
    snap = progress.snapshot()
    assert {k: v for k, v in snap.items() if k != "seconds"} == {
        "units": 2, "units_done": 2, "units_failed": 1, "images": 10, "settled": 10, "accepted": 4, "failed": 1,
        "rejected": {"http_404": 1}}
    assert "10/10" in out.getvalue() and "units 2/2, accepted 4, failed 1 (http_404 1)" in out.getvalue()


def test_a_proxy_from_the_environment_is_still_used(serve, tmp_path, monkeypatch, fake_dns):
    # requests' environment lookups are off unless there is something to find (engines.run_unit); the
    # name is still checked here (it answers a public address) before the proxy is asked for it
    answers, _, _ = fake_dns
    answers["images.test"] = ["93.184.216.34"]
    img = encode(smooth_image(450))
    proxy = serve({"http://images.test/a.jpg": (200, {"Content-Type": "image/jpeg"}, img)})
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", [("http://images.test/a.jpg", "thing")]),
                      threads=1, respect_robots=False, retries=0)
    (unit,) = plan_units(cfg)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    record = crawl_unit(unit, _options(cfg), str(tmp_path / "a"), None)
    assert record["accepted"] == 1 and proxy.hits == {"http://images.test/a.jpg": 1}
    monkeypatch.delenv("HTTP_PROXY")
    session = requests.Session()
    _read_environment_once(session)  # no proxy: requests skips its per-request lookups, keeps the CA bundle
    assert not session.trust_env and session.verify == (os.environ.get("REQUESTS_CA_BUNDLE")
                                                        or os.environ.get("CURL_CA_BUNDLE") or True)
    record = crawl_unit(unit, _options(cfg), str(tmp_path / "b"), None)  # no proxy: the name does not resolve
    assert record["accepted"] == 0 and record["rejected"] == {"connection_error": 1} and proxy.requests == 1

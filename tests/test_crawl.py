"""Crawl tests, all on loopback against servers defined here (no traffic leaves 127.0.0.1)."""
import dataclasses
import html
import io
import json
import os
import shutil
import signal
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
from PIL import Image

from maskless.core import shards, storage
from maskless.ingest.crawl import CrawlConfig, crawl_unit, plan_units, run_crawl, _options
from maskless.ingest.dedup import NearIndex, decide, hamming
from maskless.ingest.engines import Unit
from maskless.ingest.downloader import robots_opt_out
from maskless.ingest.pacer import FORGET_AFTER, PaceBook, SharedPacer, start_pacer
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
    that for the n-th request of the path. Counts every request it receives."""

    def __init__(self, routes: dict, delay: float = 0.0):
        self.routes, self.delay = routes, delay
        self.hits: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}
        self.agents: set[str] = set()
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with owner.lock:
                    n = owner.hits[self.path] = owner.hits.get(self.path, 0) + 1
                    owner.times.setdefault(self.path, []).append(time.monotonic())
                    owner.agents.add(self.headers.get("User-Agent", ""))
                if owner.delay:
                    time.sleep(owner.delay)
                route = owner.routes.get(self.path)
                if route is None:
                    return self.send_error(404)
                status, headers, body = route(n) if callable(route) else route
                try:
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


@pytest.fixture
def serve():
    servers = []

    def start(routes, delay=0.0):
        servers.append(Server(routes, delay))
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
        deadline = time.time() + 90
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

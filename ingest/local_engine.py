"""The `local` engine: a loopback search engine that answers in Bing's result-page format.

It serves a folder of class-name subfolders of images, or a VOC-format folder such as a world
from `maskless world` (class -> the images whose Annotations XML name it), local or at a URI, so
that the crawl runs icrawler's real Bing parser end to end without internet: the demo and the tests
crawl this way.
"""
from __future__ import annotations

import html
import json
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.etree import ElementTree as ET

from maskless.core import storage

PAGE_SIZE = 20  # results per page, as icrawler's BingFeeder assumes
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def index_images(root: str) -> dict[str, list[str]]:
    """class name -> sorted image paths, from a VOC-format folder or from class subfolders (a path or URI)."""
    if not storage.is_dir(root):
        raise FileNotFoundError(f"local engine root {root} is not a folder (give a folder of class "
                                f"subfolders or a VOC-format world)")
    index: dict[str, set[str]] = {}
    ann, jpegs = storage.join(root, "Annotations"), storage.join(root, "JPEGImages")
    if storage.is_dir(ann) and storage.is_dir(jpegs):
        have = set(storage.listdir(jpegs))
        for name in storage.listdir(ann):
            if not name.endswith(".xml") or name[:-4] + ".jpg" not in have:
                continue
            try:
                objects = ET.fromstring(storage.read_bytes(storage.join(ann, name))).iter("object")
            except ET.ParseError as e:
                raise ValueError(f"local engine root {root}: Annotations/{name} is not well-formed XML ({e})") from None
            for obj in objects:
                label = (obj.findtext("name") or "").strip()
                if label:
                    index.setdefault(label, set()).add(storage.join(jpegs, name[:-4] + ".jpg"))
    else:
        for label in storage.listdir(root):
            folder = storage.join(root, label)
            if label.startswith(".") or not storage.is_dir(folder):
                continue
            files = {storage.join(folder, f) for f in storage.listdir(folder) if f.lower().endswith(IMAGE_EXTS)}
            if files:
                index[label] = files
    if not index:
        raise ValueError(f"local engine root {root} holds no labelled images (expected class subfolders "
                         f"of images, or Annotations/*.xml with JPEGImages/)")
    return {k: sorted(v) for k, v in sorted(index.items())}


class LocalSearchServer:
    """Threaded HTTP server on 127.0.0.1 (ephemeral port). `queries` maps a query to its class;
    a query that is a class name needs no entry."""

    def __init__(self, root: str, queries: dict[str, str] | None = None):
        self.index = index_images(root)
        self.queries = dict(queries or {})
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def results_page(self, query: str, first: int) -> str:
        label = self.queries.get(query, query)
        images = self.index.get(label, [])
        divs = []
        for i in range(first, min(first + PAGE_SIZE, len(images))):
            murl = f"{self.base_url}/img/{quote(label)}/{i}.jpg"
            m = html.escape(json.dumps({"murl": murl, "t": f"{label} {i}"}, separators=(",", ":")), quote=True)
            divs.append(f'<div class="imgpt"><a class="iusc" m="{m}" href="#"><img src="{murl}"></a></div>')
        return "<html><body>" + "\n".join(divs) + "</body></html>"

    def start(self) -> str:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests += 1
                parts = urlsplit(self.path)
                if parts.path == "/images/async":
                    qs = parse_qs(parts.query)
                    first = int((qs.get("first") or ["0"])[0] or 0)
                    body, ctype = owner.results_page((qs.get("q") or [""])[0], first).encode(), "text/html"
                elif parts.path.startswith("/img/"):
                    try:
                        label, name = (unquote(p) for p in parts.path[len("/img/"):].split("/", 1))
                        path = owner.index[label][int(name.rsplit(".", 1)[0])]
                    except (KeyError, ValueError, IndexError):
                        return self.send_error(404)
                    body = storage.read_bytes(path)
                    ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
                else:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="local-engine", daemon=True).start()
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LocalSearchServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

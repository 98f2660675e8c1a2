"""The loopback image server of bench.ingest: a folder served over HTTP the way a web server serves it.

`python -m http.server` listens with a backlog of 5 (socketserver's default) and speaks HTTP/1.0. With
2 x 16 download threads connecting at once the backlog overflows, the kernel drops their SYNs and each
client connects only on the retransmission, a second later: in py-spy samples of maskless's crawl
workers over 10,000 URLs (every thread, idle ones too, 10 s at 50 Hz) 26 % sat in `connect`, and both
tools' figures measured that wait. Real servers listen with hundreds (nginx: 511) and keep connections
open; `--protocol HTTP/1.0` still closes each one after its request (as when every URL is on its own host).

    python -m bench.image_server PORT FOLDER [--protocol HTTP/1.1] [--backlog 1024]
"""
from __future__ import annotations

import argparse
import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


def serve(port: int, folder: str, protocol: str = "HTTP/1.1", backlog: int = 1024) -> None:
    class Server(ThreadingHTTPServer):
        request_queue_size = backlog
        daemon_threads = True

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = protocol  # HTTP/1.1: the connection stays open for the client's next request

        def log_message(self, *args) -> None:
            pass

    Server(("127.0.0.1", port), functools.partial(Handler, directory=folder)).serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("folder")
    ap.add_argument("--protocol", default="HTTP/1.1", choices=("HTTP/1.0", "HTTP/1.1"))
    ap.add_argument("--backlog", type=int, default=1024, help="listen backlog (python -m http.server: 5)")
    a = ap.parse_args()
    serve(a.port, a.folder, a.protocol, a.backlog)

"""Bench: peak memory of the crawl's image decoding under small decompression bombs (docs/CRAWL.md).

A 34-byte lossless WebP declaring 6000 x 6000 px passes the pixel cap (36 M < 40 M) and decodes to
hundreds of MB. Each case runs in a fresh process, `threads` threads calling validator.clean_image
on the same body at once, sharing one PixelBudget as a crawl task's download threads do; the figure
is the process's peak resident memory above what it held before the first decode (VmHWM of
/proc/self/status: ru_maxrss would carry over the parent's peak through exec).

    .venv/bin/python -m bench.decode_memory [--json FILE]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):
    # Run as a file (`maskless bench` does): its folder would shadow the `ingest` and `train` packages.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WEBP_BOMB = bytes.fromhex("524946461a000000574542505650384c0e0000002f6fd7db05071011fd0f4444ff03")
DEFAULT_BUDGET = 40_000_000  # CrawlConfig.decode_pixels
CASES = {  # name: (body, threads, budget in pixels)
    "webp_bomb_1_thread": ("webp", 1, DEFAULT_BUDGET),
    "webp_bomb_4_threads": ("webp", 4, DEFAULT_BUDGET),
    "webp_bomb_4_threads_unbounded": ("webp", 4, 4 * 36_000_000),
    "jpeg_6000px_4_threads": ("jpeg", 4, DEFAULT_BUDGET),
}


def body(kind: str) -> bytes:
    """The case's image; made in the parent, so that making it does not count in the child's peak."""
    if kind == "webp":
        return WEBP_BOMB
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 140, 200)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def peak_kib() -> int:
    """This process's peak resident memory (Linux)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


def child(case: str, path: str) -> dict:
    from maskless.ingest.validator import PixelBudget, clean_image

    kind, threads, limit = CASES[case]
    with open(path, "rb") as f:
        data = f.read()
    budget = PixelBudget(limit)
    before = peak_kib()
    t0 = time.perf_counter()
    workers = [threading.Thread(target=clean_image, args=(data,), kwargs={"pixels": budget}) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    peak = peak_kib()
    return {"peak_mb": round((peak - before) / 1024), "seconds": round(time.perf_counter() - t0, 2),
            "body_bytes": len(data), "budget_peak_pixels": budget.peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("CASE", "BODY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from bench.common import write_result

    rows = []
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bodies = tempfile.mkdtemp(prefix="decode_memory")
    for case, (kind, threads, limit) in CASES.items():
        path = os.path.join(bodies, kind)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(body(kind))
        out = subprocess.run([sys.executable, "-m", "bench.decode_memory", "--child", case, path], cwd=repo,
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        rows.append({"metric": f"{case} peak memory ({r['body_bytes']} B body, budget {limit / 1e6:g} M px)",
                     "value": r["peak_mb"], "unit": "MB"})
        rows.append({"metric": f"{case} most pixels decoding at once", "value": r["budget_peak_pixels"], "unit": "px"})
        rows.append({"metric": f"{case} wall time", "value": r["seconds"], "unit": "s"})
    shutil.rmtree(bodies)
    write_result("decode_memory", rows, args.json)


if __name__ == "__main__":
    main()

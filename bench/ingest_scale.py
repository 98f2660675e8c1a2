"""Bench: how the ingest's costs grow with the size of the job (issue #13 item 7).

Each section is one function of SECTIONS, chosen with --only (default: all of them):
- plan: `maskless crawl --dry-run` (validation, listing and planning, nothing fetched or written) over
  synthetic URL lists of --sizes rows, as CSV and as parquet, made on the fly in --work and deleted after
  each size. Each run is a fresh process: its wall time, the units planned, and the driver's peak RSS
  added by planning (VmHWM after planning minus VmRSS before it, the peak reset in between through
  /proc/self/clear_refs). Then what a task pays to read one slice: the first and the last unit of the list.
- crawl: a real loopback crawl of --crawl-urls URLs through `maskless crawl` and img2dataset, beside
  the decode+resize+encode floor (bench/ingest.py, which has the details and more options).

    .venv/bin/python -m bench.ingest_scale [--only plan,crawl] [--sizes 10000,100000,1000000,10000000] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ("cat", "dog", "car", "bird", "horse")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def make_csv(path: str, rows: int, chunk: int = 200_000) -> None:
    """url,label rows: 1,000 hosts, one label each (the shape of a LAION-style list without captions)."""
    with open(path, "w") as f:
        f.write("url,label\n")
        for lo in range(0, rows, chunk):
            f.write("".join(f"http://img{i % 1000}.example.com/photos/{i:010d}.jpg,{LABELS[i % 5]}\n"
                            for i in range(lo, min(rows, lo + chunk))))


def make_parquet(path: str, rows: int, row_group: int = 100_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(0, rows, row_group):
            ids = range(lo, min(rows, lo + row_group))
            writer.write_table(pa.table({"url": [f"http://img{i % 1000}.example.com/photos/{i:010d}.jpg" for i in ids],
                                         "label": [LABELS[i % 5] for i in ids]}, schema=schema))


def plan_child(path: str, shard_size: int) -> dict:
    """In a fresh process: plan one list the way `maskless crawl --dry-run` does; what it cost."""
    from maskless.ingest.crawl import CrawlConfig, plan_units, run_crawl

    out = tempfile.mkdtemp(prefix="plan-out-")
    cfg = CrawlConfig(engine=["urls"], urls=[path], out=os.path.join(out, "crawl"), shard_size=shard_size,
                      dry_run=True)
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS: the peak counted is planning's alone
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    plan = run_crawl(cfg)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    written = os.listdir(out)
    shutil.rmtree(out)
    units = plan_units(cfg)
    reads = {}
    for which, unit in (("first", units[0]), ("last", units[-1])):
        t = time.perf_counter()
        rows, _ = unit.source.read()
        reads[which] = {"seconds": time.perf_counter() - t, "rows": len(rows)}
    return {"seconds": seconds, "units": plan["units"], "rows": plan["by_engine_class"]["urls/(list)"]["rows"],
            "rows_exact": plan["by_engine_class"]["urls/(list)"]["rows_exact"],
            "rss_before_mib": before / 1024, "peak_added_mib": (peak - before) / 1024, "peak_reset": reset,
            "wrote_to_out": written, "reads": reads}


def bench_plan(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        for fmt, make in (("csv", make_csv), ("parquet", make_parquet)):
            folder = tempfile.mkdtemp(prefix="plan-", dir=args.work)
            path = os.path.join(folder, f"list.{fmt}")
            t0 = time.perf_counter()
            make(path, size)
            made = time.perf_counter() - t0
            proc = subprocess.run([sys.executable, "-m", "bench.ingest_scale", "--plan-child", path,
                                   "--shard-size", str(args.shard_size)], cwd=REPO, capture_output=True, text=True)
            mib = os.path.getsize(path) / 2**20
            shutil.rmtree(folder)
            if proc.returncode != 0:
                raise RuntimeError(f"planning {size} rows of {fmt} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if r["wrote_to_out"]:
                raise RuntimeError(f"the dry run wrote {r['wrote_to_out']} into OUT")
            what = f"plan {fmt} {size:,} rows"
            rows += [
                {"metric": f"{what}: wall (crawl --dry-run)", "value": round(r["seconds"], 3), "unit": "s"},
                {"metric": f"{what}: driver peak RSS added", "value": round(r["peak_added_mib"], 1), "unit": "MiB"},
                {"metric": f"{what}: units", "value": r["units"], "unit": ""},
                {"metric": f"{what}: rows {'counted' if r['rows_exact'] else 'estimated'}", "value": r["rows"],
                 "unit": ""},
                {"metric": f"{what}: one task reads its first slice", "value": round(r["reads"]["first"]["seconds"], 4),
                 "unit": "s"},
                {"metric": f"{what}: one task reads the last slice", "value": round(r["reads"]["last"]["seconds"], 4),
                 "unit": "s"},
                {"metric": f"{what}: list file (made in {made:.0f} s)", "value": round(mib, 1), "unit": "MiB"},
            ]
            print(f"[ingest_scale] {what}: {r['seconds']:.2f} s, +{r['peak_added_mib']:.0f} MiB peak, "
                  f"{r['units']} units", flush=True)
    return rows


def bench_crawl(args) -> list[dict]:
    """A real loopback crawl of --crawl-urls URLs against img2dataset and the decode+resize+encode
    floor: bench/ingest.py's comparison with its defaults (its own command takes more options)."""
    from bench import ingest

    rows, _ = ingest.compare(ingest.parser().parse_args(["--urls", args.crawl_urls]))
    return rows


SECTIONS = {"plan": bench_plan, "crawl": bench_crawl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma separated: {', '.join(SECTIONS)}")
    p.add_argument("--sizes", default="10000,100000,1000000,10000000",
                   type=lambda s: [int(x) for x in s.split(",") if x.strip()], help="rows of the synthetic lists")
    p.add_argument("--shard-size", type=int, default=500, help="the crawl's shard_size (rows per unit)")
    p.add_argument("--crawl-urls", default="1000,10000", help="section crawl: URL list sizes, comma separated")
    p.add_argument("--work", default=None, help="folder for the synthetic lists (default: the system temp folder)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--plan-child", default=None, help=argparse.SUPPRESS)  # the fresh process of one plan run
    args = p.parse_args()
    load = os.getloadavg()[0]
    if args.plan_child:
        print(json.dumps(plan_child(args.plan_child, args.shard_size)))
        return
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {', '.join(sorted(unknown))}; available: {', '.join(SECTIONS)}")
    rows = []
    for name in chosen:
        rows += SECTIONS[name](args)
    write_result("ingest_scale", rows, args.json, sections=chosen, sizes=args.sizes, shard_size=args.shard_size,
                 load_average_1min_at_start=load)


if __name__ == "__main__":
    main()

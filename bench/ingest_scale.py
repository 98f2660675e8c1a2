"""Bench: how the ingest's costs grow with the size of the job (issue #13 item 7).

Each section is one function of SECTIONS, chosen with --only (default: all of them):
- plan: `maskless crawl --dry-run` (validation, listing and planning, nothing fetched or written) over
  synthetic URL lists of --sizes rows, as CSV and as parquet, made on the fly in --work and deleted after
  each size. Each run is a fresh process: its wall time, the units planned, and the driver's peak RSS
  added by planning (VmHWM after planning minus VmRSS before it, the peak reset in between through
  /proc/self/clear_refs). Then what a task pays to read one slice: the first and the last unit of the list.
- finalize: the crawl's final pass (ingest/finalize.py: partitioned dedup, then the dataset's shards) over
  synthetic unit shards of 500 rows with random 64-bit pHashes and colour signatures and 10 % planted
  copies of random earlier rows anywhere in the dataset (half exact, half near: 1-4 hash bits flipped,
  colour bytes moved by up to 8), so copies of copies make chains. Per size, each in a fresh driver
  process (its peak RSS is its own), each run twice (the first starts Ray's workers):
  `decision`, dedup.decide_partitioned over the unit manifests (parquet files only), its outcome blocks
  consumed by one counting task per batch of units (none reaches the driver); and `finalize`, the whole
  pass writing the dataset's shards (tars of 1-byte images: rewriting real images adds their I/O), then
  the same pass again (nothing to rewrite), at sizes up to --finalize-max-rows (each row is 2 KB of tar,
  written twice). Wall time, CPU seconds of the driver and its Ray processes, driver peak RSS (VmHWM).
- crawl: a real loopback crawl of --crawl-urls URLs through `maskless crawl` and img2dataset, beside
  the decode+resize+encode floor (bench/ingest.py, which has the details and more options).

    .venv/bin/python -m bench.ingest_scale [--only plan,finalize,crawl] [--sizes 10000,100000,1000000,10000000] [--json OUT]
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

import numpy as np

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


def _hex(values: np.ndarray, nbytes: int) -> list[str]:
    """Rows of `values` (uint8 (n, nbytes), or uint64 when nbytes is 8) as hex strings, fast."""
    raw = values.astype(">u8").tobytes() if values.ndim == 1 else np.ascontiguousarray(values).tobytes()
    return np.frombuffer(raw.hex().encode(), f"S{2 * nbytes}").astype(str).tolist()


def make_units(root: str, rows: int, tars: bool, seed: int = 0, per_unit: int = 500) -> list[str]:
    """Write rows // per_unit unit shards (manifest, stats and, with `tars`, a tar) under root."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from maskless.core import shards, storage

    rng = np.random.default_rng(seed)
    phash = rng.integers(0, 2**64, rows, dtype=np.uint64)
    colour = rng.integers(0, 256, (rows, 12), dtype=np.uint8)
    sha = rng.integers(0, 256, (rows, 32), dtype=np.uint8)
    copies = np.flatnonzero(rng.random(rows) < 0.1)[1:]
    sources = (rng.random(len(copies)) * copies).astype(np.int64)  # an earlier row: chains of copies arise
    exact = rng.random(len(copies)) < 0.5
    for row, src, same in zip(copies.tolist(), sources.tolist(), exact.tolist()):
        phash[row], colour[row] = phash[src], colour[src]
        if same:
            sha[row] = sha[src]
        else:
            for bit in rng.choice(64, int(rng.integers(1, 5)), replace=False).tolist():
                phash[row] ^= np.uint64(1 << bit)
            colour[row] = np.clip(colour[row].astype(int) + rng.integers(-8, 9, 12), 0, 255)
    size = rng.integers(100, 400, (rows, 2))
    labels = rng.integers(0, 20, rows)
    os.makedirs(root, exist_ok=True)
    names = []
    for u, lo in enumerate(range(0, rows, per_unit)):
        hi = min(rows, lo + per_unit)
        name = f"unit-{u:08d}"
        table = pa.table({
            "key": [f"{r:024x}" for r in range(lo, hi)], "labels": [[f"class{c}"] for c in labels[lo:hi].tolist()],
            "width": size[lo:hi, 0].astype(np.int32), "height": size[lo:hi, 1].astype(np.int32),
            "sha256": _hex(sha[lo:hi], 32), "phash": _hex(phash[lo:hi], 8), "colour": _hex(colour[lo:hi], 12),
            "url": [f"http://example.com/{r}.jpg" for r in range(lo, hi)]})
        stats = {"engine": "urls", "class": "", "found": hi - lo, "downloaded": hi - lo, "accepted": hi - lo,
                 "duplicates": 0, "rejected": {}, "seconds": 1.0}
        if tars:
            with shards.ShardWriter(root, name) as writer:
                for r in table.to_pylist():
                    writer.write(shards.Sample(key=r.pop("key"), jpg=b"\xff", meta=r))
                writer.commit(stats)
        else:
            pq.write_table(table.cast(pa.schema([shards.MANIFEST_SCHEMA.field(c) for c in table.column_names])),
                           os.path.join(root, name + ".parquet"))
            storage.write_json_atomic(os.path.join(root, name + ".stats.json"), stats)
        names.append(name)
    return names


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every process under it (Ray's raylet and workers):
    on a loaded machine, a figure less distorted than wall time."""
    parent, cpu = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)], cpu[int(pid)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [p for p, pp in parent.items() if pp == pid and p not in tree]
    return sum(cpu.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def finalize_child(mode: str, work: str) -> dict:
    """In a fresh process: start Ray, run the decision or the whole pass twice; what it cost."""
    import ray

    from maskless.ingest.dedup import decide_partitioned
    from maskless.ingest.finalize import finalize
    from maskless.ray_runtime import init_ray

    init_ray()
    after_init = _status_kib("VmRSS")
    units = os.path.join(work, "_units")
    result = {}
    cpu0 = _tree_cpu_seconds()
    for run in ("first", "again"):
        t0 = time.perf_counter()
        if mode == "decision":
            names = sorted(n[:-len(".parquet")] for n in os.listdir(units) if n.endswith(".parquet"))
            outcomes, counts = decide_partitioned(units, names, 4)
            count = ray.remote(lambda *blocks: sum(len(b) for b in blocks))
            result["decided"] = sum(ray.get([count.remote(*blocks) for blocks in outcomes]))
            result["exact"], result["near"] = map(sum, zip(*ray.get(counts)))
        else:
            final = finalize(work, units, 4)
            result.update({f"{run}_rewritten": final.shards_rewritten, "samples": final.samples,
                           "exact": final.exact_duplicates, "near": final.near_duplicates})
        result[f"{run}_seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = _tree_cpu_seconds() - cpu0
    result["rss_after_ray_init_mib"] = after_init / 1024
    result["peak_rss_mib"] = _status_kib("VmHWM") / 1024
    return result


def bench_finalize(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        for mode in ("decision", "finalize"):
            if mode == "finalize" and size > args.finalize_max_rows:
                continue
            folder = tempfile.mkdtemp(prefix=f"{mode}-", dir=args.work)
            made = subprocess.run([sys.executable, "-m", "bench.ingest_scale", "--make-units", folder, str(size),
                                   *(["--no-tars"] if mode == "decision" else [])], cwd=REPO, capture_output=True,
                                  text=True)
            load = os.getloadavg()[0]
            proc = made
            # Ray gives its raylet 30 s to start: a loaded machine can miss that (the pass never began)
            for _ in range(3 if not made.returncode else 0):
                proc = subprocess.run(
                    [sys.executable, "-m", "bench.ingest_scale", "--finalize-child", mode, folder], cwd=REPO,
                    capture_output=True, text=True)
                if "node timed out during startup" not in proc.stderr:
                    break
            shutil.rmtree(folder)
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} over {size} rows failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            what = f"{mode} {size:,} rows"
            again = "again, warm" if mode == "decision" else "again, nothing to rewrite"
            rows += [
                {"metric": f"{what}: wall, first (Ray workers start)", "value": round(r["first_seconds"], 2),
                 "unit": "s"},
                {"metric": f"{what}: wall, {again}", "value": round(r["again_seconds"], 2), "unit": "s"},
                {"metric": f"{what}: CPU of both, driver and its Ray processes", "value": round(r["cpu_seconds"], 1),
                 "unit": "s"},
                {"metric": f"{what}: driver peak RSS", "value": round(r["peak_rss_mib"]), "unit": "MiB"},
                {"metric": f"{what}: driver RSS after ray.init", "value": round(r["rss_after_ray_init_mib"]),
                 "unit": "MiB"},
                {"metric": f"{what}: load average before", "value": round(load, 1), "unit": ""},
                {"metric": f"{what}: " + ("rows dropped or merged / exact / near" if mode == "decision" else
                                          "kept / exact / near"), "unit": "",
                 "value": f"{r['decided'] if mode == 'decision' else r['samples']} / {r['exact']} / {r['near']}"},
            ]
            print(f"[ingest_scale] {what}: {r['first_seconds']:.1f} s then {r['again_seconds']:.1f} s, "
                  f"{r['cpu_seconds']:.0f} CPU s, {r['peak_rss_mib']:.0f} MiB peak", flush=True)
    return rows


SECTIONS = {"plan": bench_plan, "finalize": bench_finalize, "crawl": bench_crawl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma separated: {', '.join(SECTIONS)}")
    p.add_argument("--sizes", default="10000,100000,1000000,10000000",
                   type=lambda s: [int(x) for x in s.split(",") if x.strip()], help="rows of the synthetic lists")
    p.add_argument("--shard-size", type=int, default=500, help="the crawl's shard_size (rows per unit)")
    p.add_argument("--crawl-urls", default="1000,10000", help="section crawl: URL list sizes, comma separated")
    p.add_argument("--work", default=None, help="folder for the synthetic lists (default: the system temp folder)")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--finalize-max-rows", type=int, default=1_000_000,
                   help="largest size of finalize's whole pass (the decision runs at every size)")
    p.add_argument("--plan-child", default=None, help=argparse.SUPPRESS)  # the fresh process of one plan run
    p.add_argument("--make-units", nargs=2, default=None, help=argparse.SUPPRESS)  # FOLDER ROWS: synthetic units
    p.add_argument("--no-tars", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--finalize-child", nargs=2, default=None, help=argparse.SUPPRESS)  # MODE FOLDER
    args = p.parse_args()
    load = os.getloadavg()[0]
    if args.plan_child:
        print(json.dumps(plan_child(args.plan_child, args.shard_size)))
        return
    if args.make_units:
        make_units(os.path.join(args.make_units[0], "_units"), int(args.make_units[1]), tars=not args.no_tars)
        return
    if args.finalize_child:
        print(json.dumps(finalize_child(*args.finalize_child)))
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

"""`maskless bench`: run every benchmark in bench/ and print one table.

Each bench/NAME.py is a module that takes `--json PATH` and writes its result there: the figures
(as `rows` of metric/value, see bench/common.py, or as plain JSON numbers), the machine and its
settings. This runner executes them one after another (they measure throughput, so never in
parallel) and prints their numbers as one table. Where torch sees no CUDA device, the benchmarks
of NEEDS_CUDA are skipped with one line each (not counted as failed).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
NEEDS_CUDA = {"gpu"}  # bench/gpu.py measures the CUDA paths; its CPU check is `python -m bench.gpu --device cpu --tiny`


def available() -> list[str]:
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH_DIR, "*.py"))
                  if not os.path.basename(p).startswith("_") and os.path.basename(p) != "common.py")


def flatten(obj, prefix: str = "", depth: int = 3) -> list[tuple[str, object]]:
    """(dotted key, number or short string) for the scalar leaves of a JSON result."""
    rows: list[tuple[str, object]] = []
    if isinstance(obj, dict) and depth > 0:
        for k, v in obj.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k), depth - 1)
    elif isinstance(obj, bool) or obj is None:
        pass
    elif isinstance(obj, (int, float)):
        rows.append((prefix, obj))
    return rows


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_benchmarks(only: str | None = None, out: str = "bench/out", names: list[str] | None = None) -> dict:
    """Run the benchmarks named in `names` and `only` (comma-separated), or all of them; those that need
    CUDA are skipped, with one line, where torch sees none."""
    found = available()
    if not found:
        raise FileNotFoundError(f"no benchmarks found in {BENCH_DIR} (bench/ ships with a source checkout)")
    chosen = list(names or []) + ([n.strip() for n in only.split(",")] if only else [])
    chosen = list(dict.fromkeys(chosen)) or found
    unknown = set(chosen) - set(found)
    if unknown:
        raise ValueError(f"unknown benchmarks {', '.join(sorted(unknown))}; available: {', '.join(found)}")
    skipped = {}
    if NEEDS_CUDA & set(chosen) and not _has_cuda():
        for name in sorted(NEEDS_CUDA & set(chosen)):
            skipped[name] = "torch sees no CUDA device"
            print(f"[maskless bench] {name} skipped: torch sees no CUDA device here "
                  f"(`python -m bench.{name} --device cpu --tiny` checks it on a CPU)", flush=True)
        chosen = [n for n in chosen if n not in skipped]
    os.makedirs(out, exist_ok=True)
    results, failed = {}, []
    for name in chosen:
        path = os.path.abspath(os.path.join(out, f"{name}.json"))
        print(f"[maskless bench] {name} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--json", path],
                              cwd=os.path.dirname(BENCH_DIR))
        if proc.returncode != 0 or not os.path.exists(path):
            failed.append(name)
            continue
        with open(path) as f:
            results[name] = json.load(f)
    print("\n| benchmark | figure | value |\n|---|---|---|")
    for name, res in results.items():
        rows = [(r["metric"], r["value"]) for r in res.get("rows", [])]  # bench.common.write_result's rows
        rows += flatten({k: v for k, v in res.items() if k not in ("machine", "rows")})
        for key, value in rows:
            print(f"| {name} | {key} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {key} | {value} |")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return {"out": out, "ran": sorted(results), "failed": failed, "skipped": skipped}

"""`maskless bench`: run every benchmark in bench/ (each a script that writes a JSON result) and print one table."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def available() -> list[str]:
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCH_DIR, "*.py"))
                  if not os.path.basename(p).startswith(("_", "common")))


def run_benchmarks(only: str | None = None, out: str = "bench/out") -> dict:
    names = available()
    if not names:
        raise FileNotFoundError(f"no benchmarks found in {BENCH_DIR} (bench/ ships with a source checkout)")
    chosen = [n.strip() for n in only.split(",")] if only else names
    unknown = set(chosen) - set(names)
    if unknown:
        raise ValueError(f"unknown benchmarks {', '.join(sorted(unknown))}; available: {', '.join(names)}")
    os.makedirs(out, exist_ok=True)
    results, failed = {}, []
    for name in chosen:
        path = os.path.join(out, f"{name}.json")
        print(f"[maskless bench] {name} ...", flush=True)
        proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, f"{name}.py"), "--json", path])
        if proc.returncode != 0 or not os.path.exists(path):
            failed.append(name)
            continue
        with open(path) as f:
            results[name] = json.load(f)
    print("\n| benchmark | metric | value | unit |\n|---|---|---|---|")
    for name, res in results.items():
        for r in res["rows"]:
            value = f"{r['value']:.4g}" if isinstance(r["value"], float) else r["value"]
            print(f"| {name} | {r['metric']} | {value} | {r.get('unit', '')} |")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return {"results": {n: r["rows"] for n, r in results.items()}, "failed": failed, "out": out}

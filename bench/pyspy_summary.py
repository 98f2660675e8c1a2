"""Bench helper: where a process's CPU goes, from py-spy's raw output (folded stacks), as the share of
samples in which each function is on the stack (inclusive), over one or more files.

py-spy samples only threads that are running (without --idle), so the shares are of CPU time, and
they hold on a loaded machine too. How BENCHMARKS.md's crawl-worker profile was taken: during
`python -m bench.ingest --urls 10000 --no-img2dataset`, about 20 s into the crawl,

    py-spy record --pid PID --duration 25 --rate 50 --format raw --output /tmp/prof_PID.txt --nonblocking

for each `ray::CrawlWorker` process (py-spy: `pip install --target DIR py-spy`), then

    python -m bench.pyspy_summary /tmp/prof_*.txt [--top 40]
"""
from __future__ import annotations

import argparse
import collections
import re


def frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)': one name per function, whatever the line."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2).rsplit('/', 1)[-1]})"


def inclusive_shares(paths: list[str]) -> tuple[int, collections.Counter]:
    """(samples, per function the samples with it anywhere on the stack, counted once per sample)."""
    total, counts = 0, collections.Counter()
    for path in paths:
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip("\n").rpartition(" ")
                if not stack or not n.isdigit():
                    continue
                total += int(n)
                for name in {frame_name(fr) for fr in stack.split(";")}:
                    counts[name] += int(n)
    return total, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="py-spy --format raw outputs")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    total, counts = inclusive_shares(args.files)
    print(f"{total} samples in {len(args.files)} file(s); share of samples with the function on the stack:")
    for name, n in counts.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()

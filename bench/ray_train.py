"""Bench: Ray Train's fixed cost per fit, and what the settings of core/resources.py save of it.

A fit of an empty training function (1 worker, 1 CPU, one report) on a local Ray, timed from
`TorchTrainer.fit()` to its return, under three environments, interleaved so that load drifts hit each
alike:
- Ray Train's defaults (health check every 2 s, preemption watcher on);
- maskless joined to a cluster: health check every 0.25 s (RAY_TRAIN_ENV), watcher on;
- maskless on a local Ray it started: the same, watcher off (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0).
Ray Train reads these variables from the driver's environment at each fit.

    .venv/bin/python -m bench.ray_train [--repeats 3] [--json FILE]
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import statistics
import tempfile
import time

from bench.common import write_result
from maskless.core.resources import PREEMPTION_WATCHER_ENV, RAY_TRAIN_ENV
from maskless.ray_runtime import init_ray

SETTINGS = {
    "Ray Train defaults": {},
    "maskless on a cluster (health check 0.25 s)": dict(RAY_TRAIN_ENV),
    "maskless on a local Ray (also no preemption watcher)": {**RAY_TRAIN_ENV, PREEMPTION_WATCHER_ENV: "0"},
}


def empty_loop(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def timed_fit(env: dict[str, str], storage: str) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    for key in set(RAY_TRAIN_ENV) | {PREEMPTION_WATCHER_ENV}:
        os.environ.pop(key, None)
    os.environ.update(env)
    trainer = TorchTrainer(empty_loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(storage_path=storage))
    t0 = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="fits per setting")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    init_ray(num_cpus=4)
    timed_fit({}, tempfile.mkdtemp(prefix="bench-ray-train-"))  # warm-up: first imports, first worker processes
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="bench-ray-train-") as tmp:
        for i in range(args.repeats):
            for j, (name, env) in enumerate(SETTINGS.items()):
                seconds[name].append(timed_fit(env, os.path.join(tmp, f"fit-{i}-{j}")))
    rows = [{"metric": f"fit of an empty loop, {name} (median)", "value": statistics.median(s), "unit": "s"}
            for name, s in seconds.items()]
    write_result("ray_train", rows, args.json, settings=vars(args), seconds=seconds)


if __name__ == "__main__":
    main()

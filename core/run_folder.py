"""The run folder of a Ray Train stage (classify, train): its layout, and who owns it.

A run folder belongs to one run: a rerun with the same settings continues it, and a run with
different settings is refused before anything in the folder is overwritten."""
from __future__ import annotations

import json
import math

from maskless.core import storage

RAY_RUN_NAME = "ray"          # Ray Train's experiment folder (checkpoints)
STATE_FILE = "state.pt"       # inside each checkpoint
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"         # the settings and classes that own the folder


def claim_run_folder(path: str, stage: str, config: dict, identity: tuple[str, ...] | list[str],
                     classes: list[str]) -> None:
    """Record (config, classes) in the run file at `path`, or check them against the one already there.
    `identity` names the config keys that must match for a rerun to continue the run."""
    if storage.exists(path):
        previous = storage.read_json(path)
        diff = [k for k in identity if previous["config"].get(k) != config[k]]
        if previous["classes"] != classes:
            diff.append("classes")
        if diff:
            out = path.rsplit("/", 1)[0]
            raise ValueError(f"{out} holds a {stage} run with different {', '.join(diff)}: "
                             f"rerun with the same settings to continue it, or use a new --out")
        return
    storage.write_json_atomic(path, {"config": config, "classes": classes})


def json_safe(record: dict) -> dict:
    """NaN values (an AP of a class without held-out positives) as null, so the files are strict JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def append_metrics(out: str, record: dict, position: str) -> None:
    """Add one record to OUT/metrics.jsonl (rewritten atomically). Records at or after its `position`
    (its epoch or step) come from an attempt that died after its last checkpoint and is being redone:
    they are dropped, so the file holds each position once, in order."""
    kept = [r for r in read_metrics(out) if r.get(position, -1) < record[position]]
    lines = [json.dumps(r) for r in kept + [json_safe(record)]]
    storage.write_bytes_atomic(storage.join(out, METRICS_FILE), ("\n".join(lines) + "\n").encode())


def read_metrics(out: str) -> list[dict]:
    """The records of OUT/metrics.jsonl, oldest first ([] before the first one)."""
    path = storage.join(out, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(l) for l in storage.read_bytes(path).decode().splitlines() if l.strip()]


def ray_run_config(out: str, max_failures: int, keep_checkpoints: int, callbacks: list | None = None):
    """Ray Train's RunConfig that keeps the experiment in OUT/ray, on OUT's filesystem (local or a URI)."""
    import ray.train

    fs, out_path = storage.resolve(out)
    return ray.train.RunConfig(
        name=RAY_RUN_NAME, storage_path=out_path, storage_filesystem=None if storage.is_local(fs) else fs,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints), callbacks=callbacks)

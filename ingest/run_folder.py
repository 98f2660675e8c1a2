"""A run folder belongs to one run: a rerun with the same settings continues it, and a run with
different settings is refused before anything in the folder is overwritten."""
from __future__ import annotations

from ingest import storage


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

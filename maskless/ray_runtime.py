"""Starting or joining Ray the way maskless needs it: quiet, no dashboard, and no Ray Data deadlock
on small machines."""
from __future__ import annotations

import logging
import os

from maskless.core.resources import use_ray_train_env

log = logging.getLogger(__name__)

# Ray prints a lot that users of a CLI do not need; --verbose turns it back on.
QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "ERROR",  # Ray Data's per-dataset INFO lines and its "progress bars disabled" warning
}


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
             temp_dir: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets it), else start a local Ray.

    A local Ray gets twice as many logical CPUs as the machine has cores (at least 4): on a 2-core
    machine an actor pool of two 1-CPU actors would otherwise take every CPU slot and starve Ray
    Data's read tasks, and the job hangs (measured, see docs/ARCHITECTURE.md). A local Ray also runs
    Ray Train without its preemption watcher: nothing preempts the node of a Ray started here
    (core/resources.py); a cluster keeps it."""
    import ray

    use_ray_train_env()
    for key, value in QUIET_ENV.items():
        if not verbose or key == "RAY_AUTH_MODE":
            os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if verbose else logging.ERROR
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
        return
    use_ray_train_env(local_ray=True)
    cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    kwargs = {"_temp_dir": temp_dir} if temp_dir else {}
    # address="local": always a new local instance, never a cluster some other process started here
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=verbose, logging_level=level,
             configure_logging=verbose, **kwargs)
    log.info("started local Ray with %d logical CPUs", cpus)

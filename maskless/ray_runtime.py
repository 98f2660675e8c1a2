"""Starting or joining Ray the way maskless needs it: quiet, no dashboard unless asked, no Ray Data
deadlock on small machines, and a local Ray that never outlives the command that started it.

Ray ties its head processes to the driver (the kernel kills them when it dies), but not the node's
agents: after the driver is SIGKILLed, its DashboardAgent and RuntimeEnvAgent (about 190 MB) outlive
it for a minute or more (measured: they first try to report the raylet's death to the dead GCS).
So a local Ray started here gets a reaper: a small process that waits for the driver to end, however
it ends, then stops every process of that Ray that is still there. They are told apart from every
other process on the machine by a token in their environment, which they all inherit.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid

from maskless.core.resources import use_ray_train_env

log = logging.getLogger(__name__)

# Ray prints a lot that users of a CLI do not need; --verbose turns it back on.
QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "ERROR",  # Ray Data's per-dataset INFO lines and its "progress bars disabled" warning
}
OWNER_ENV = "MASKLESS_RAY_OWNER"  # the token of the local Ray a process belongs to
_reapers: list[subprocess.Popen] = []  # held open for the driver's life: their stdin closing is the signal


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
             temp_dir: str | None = None, dashboard: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets it), else start a local Ray.

    A local Ray gets twice as many logical CPUs as the machine has cores (at least 4): on a 2-core
    machine an actor pool of two 1-CPU actors would otherwise take every CPU slot and starve Ray
    Data's read tasks, and the job hangs (measured, see docs/ARCHITECTURE.md). Its dashboard starts
    only with `dashboard` (Ray still starts a head process without frontend and a per-node agent,
    which ray.init cannot turn off); usage statistics are not sent (RAY_USAGE_STATS_ENABLED=0)."""
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
    cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    kwargs = {"_temp_dir": temp_dir} if temp_dir else {}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    previous, token = os.environ.get(OWNER_ENV), _start_reaper()
    os.environ[OWNER_ENV] = token  # every process of this Ray inherits it, the driver's later children do not
    try:
        # address="local": always a new local instance, never a cluster some other process started here
        ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, log_to_driver=verbose,
                 logging_level=level, configure_logging=verbose, **kwargs)
    finally:
        if previous is None:
            del os.environ[OWNER_ENV]
        else:
            os.environ[OWNER_ENV] = previous
    log.info("started local Ray with %d logical CPUs", cpus)


def _start_reaper() -> str:
    """Start the reaper of the local Ray about to start; returns its token."""
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    # its own session: a Ctrl-C or hang-up of the terminal reaches the driver, not the reaper
    _reapers.append(subprocess.Popen([sys.executable, "-m", "maskless.ray_runtime", "--reap", token],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True))
    return token


def owned_processes(token: str) -> list[int]:
    """Pids of the processes whose environment carries this token (Linux /proc; others: none)."""
    needle = f"{OWNER_ENV}={token}".encode()
    pids = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def reap(token: str, grace_s: float = 2.0) -> None:
    """Wait until the driver closes our stdin (it exited, whatever way), then stop its Ray's processes:
    SIGTERM, and SIGKILL for those still there after `grace_s`."""
    while sys.stdin.buffer.read(65536):
        pass
    pids = owned_processes(token)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace_s
        while pids and time.monotonic() < end:
            time.sleep(0.05)
            pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet waited for
    except OSError:
        return False


if __name__ == "__main__" and sys.argv[1:2] == ["--reap"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reap(sys.argv[2])

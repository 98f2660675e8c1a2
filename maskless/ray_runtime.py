"""Starting or joining Ray the way maskless needs it: quiet, no dashboard unless asked, no Ray Data
deadlock on small machines, and a local Ray that never outlives the command that started it.

Ray ties its head processes to the driver (the kernel kills them when it dies), but not the node's
agents: after the driver is SIGKILLed, its DashboardAgent and RuntimeEnvAgent (about 170 MB) outlive
it for about a minute (measured: they first try to report the raylet's death to the dead GCS). So a
local Ray started here gets a reaper: a small process that keeps a list of the driver's descendants
(every 5 s, and at once when Ray has started), and when the driver ends, however it ends, stops
those still there. Only the driver's own descendants are listed, each with its start time, so no
other process on the machine is touched, even one that was given a listed pid again.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time

from maskless.core.resources import use_ray_train_env

log = logging.getLogger(__name__)

# Ray prints a lot that users of a CLI do not need; --verbose turns it back on.
QUIET_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "ERROR",  # Ray Data's per-dataset INFO lines and its "progress bars disabled" warning
}
SCAN_EVERY_S = 5.0  # a scan of /proc: about 20 ms for 160 processes on this loaded 2-core machine
_reapers: list[subprocess.Popen] = []  # held open for the driver's life: their stdin closing is the signal


def init_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
             temp_dir: str | None = None, dashboard: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets it), else start a local Ray.

    A local Ray gets twice as many logical CPUs as the machine has cores (at least 4): on a 2-core
    machine an actor pool of two 1-CPU actors would otherwise take every CPU slot and starve Ray
    Data's read tasks, and the job hangs (measured, see docs/ARCHITECTURE.md). Its dashboard starts
    only with `dashboard` (Ray still starts a head process without frontend and a per-node agent,
    which ray.init cannot turn off); usage statistics are not sent (RAY_USAGE_STATS_ENABLED=0). A
    local Ray also runs Ray Train without its preemption watcher: nothing preempts the node of a Ray
    started here (core/resources.py); a cluster keeps it."""
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
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    reaper = _start_reaper()
    # address="local": always a new local instance, never a cluster some other process started here
    ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, log_to_driver=verbose,
             logging_level=level, configure_logging=verbose, **kwargs)
    try:
        reaper.stdin.write(b"\n")  # Ray's processes are up: list them now
        reaper.stdin.flush()
    except OSError:
        log.warning("the reaper of the local Ray has gone: a killed driver may leave Ray processes")
    log.info("started local Ray with %d logical CPUs", cpus)


def _start_reaper() -> subprocess.Popen:
    """Start the reaper of the local Ray about to start (its own session: a Ctrl-C or hang-up of the
    terminal reaches the driver, not the reaper)."""
    proc = subprocess.Popen([sys.executable, "-m", "maskless.ray_runtime", "--reap", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _reapers.append(proc)
    return proc


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc (Linux; elsewhere none)."""
    out = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            except OSError:  # gone meanwhile
                continue
            if fields[0] != "Z":
                out[int(name)] = (int(fields[1]), fields[19])
    return out


def _descendants(pid: int, table: dict[int, tuple[int, str]]) -> dict[int, str]:
    """pid -> start time of every live descendant of pid."""
    children: dict[int, list[int]] = {}
    for p, (parent, _) in table.items():
        children.setdefault(parent, []).append(p)
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found[p] = table[p][1]
        todo += children.get(p, [])
    return found


def reap(driver: int, grace_s: float = 2.0) -> None:
    """List the driver's descendants until it closes our stdin (it ended, whatever way), then stop
    those still alive with the same start time: SIGTERM, and SIGKILL after `grace_s`."""
    known: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], SCAN_EVERY_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
        known.update(_descendants(driver, _processes()))
        known.pop(os.getpid(), None)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        table = _processes()
        alive = [p for p, started in known.items() if p in table and table[p][1] == started]
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace_s
        while time.monotonic() < end and set(alive) & set(_processes()):
            time.sleep(0.05)


if __name__ == "__main__" and sys.argv[1:2] == ["--reap"]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reap(int(sys.argv[2]))

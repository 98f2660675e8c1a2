"""A local Ray started by maskless never outlives its driver (tested only on the processes started here)."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = """
import sys, time
import ray
from maskless.ray_runtime import init_ray
init_ray(num_cpus=1, temp_dir=sys.argv[1])
print(ray.get(ray.remote(lambda: "ready").remote()), flush=True)
time.sleep(600)
"""


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = [int(x) for x in out.split()]
    return kids + [d for k in kids for d in _children(k)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_local_ray_does_not_outlive_its_sigkilled_driver():
    """Before: the DashboardAgent and RuntimeEnvAgent of a SIGKILLed driver's Ray lived on (a minute or
    more, about 190 MB). Now every process the driver's Ray started is gone within seconds, the reaper too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    ray_dir = tempfile.mkdtemp(prefix="mlk")  # Ray's socket paths must stay under 107 bytes
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, ray_dir], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    tree = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        tree = _children(proc.pid)  # everything the driver started: its Ray, the agents, the reaper
        names = " | ".join(_cmdline(p) for p in tree)
        assert "DashboardAgent" in names and "RuntimeEnvAgent" in names and "--reap" in names, names
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        end = time.monotonic() + 20
        while any(_alive(p) for p in tree) and time.monotonic() < end:
            time.sleep(0.1)
        left = {p: _cmdline(p) for p in tree if _alive(p)}
        assert not left, left
    finally:
        for pid in [proc.pid] + tree:  # only what this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)

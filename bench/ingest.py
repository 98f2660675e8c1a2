"""Bench: the same loopback URL list through `maskless crawl --engine urls` and through img2dataset,
beside the floor of the work itself.

1. Makes --urls N distinct photo-like JPEGs (default 640 px on the longest side, deterministic:
   generated here, so a fresh clone needs nothing else), or takes them from --source (a folder of
   JPEGs, re-encoded as flipped/rotated/cropped variants until there are enough).
2. Serves them on 127.0.0.1 in a process of its own (bench/image_server.py: listen backlog 1024, HTTP/1.1
   keep-alive unless --protocol HTTP/1.0) and writes a url,label CSV.
3. For each size, back to back on the same cores:
   - the floor: a plain multiprocessing pool of --processes over the same files, decoding, resizing
     (longest side --image-size, never up) and JPEG-encoding each, no network: once with PIL and
     OpenCV alone (JPEG draft decoding to the target size, area resize), once through our
     validator's clean_image (the crawl's own pixel work: the same plus its checks and hashes);
   - `maskless crawl` as a user runs it: its own process (`python -m maskless.cli crawl`, Ray start
     and imports included), --processes Ray workers x --threads threads, no per-host limit; with
     --running-ray, as a user of a long-lived Ray runs it: the bench starts one Ray (`ray start --head`,
     --processes CPUs) before the sizes and every crawl joins it through RAY_ADDRESS, so ray.init and
     Ray's shutdown leave each command (its workers still start with the job; their CPU seconds are not
     in the crawl's process tree then, so that row counts the driver only);
   - img2dataset (its own virtualenv, --processes x --threads, webdataset output), same resize.
4. Prints images/s of each (whole process, start-up included), the ratio ours / img2dataset and
   ours / floor, and the machine's load average before and after each run.

    python -m bench.ingest [--urls 1000,10000] [--work DIR] [--img2dataset-venv DIR] [--json OUT]

img2dataset pins an old webdataset, so it lives in its own virtualenv, created on first use under
~/.cache/maskless/img2dataset-venv with `pip install img2dataset` (give --img2dataset-venv to use
another, --no-img2dataset to skip it). When it cannot be installed the bench says so and reports
our figures and the floor only.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image, ImageOps

from bench.common import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "maskless", "img2dataset-venv")


def synthetic_photo(index: int, side: int = 640) -> bytes:
    """A deterministic photo-like JPEG (smooth colour field, a few blurred shapes, fine grain), so its
    size and decode cost resemble a real photo's (about 50-70 KB at 640 x 480) and every index differs."""
    import cv2

    rng = np.random.default_rng(index)
    w, h = (side, side * 3 // 4) if index % 3 else (side * 3 // 4, side)  # a third portrait
    field = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(3, 8))):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 16, w // 3)), int(rng.integers(h // 16, h // 3)))
        cv2.ellipse(field, centre, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
    field = cv2.GaussianBlur(field, (0, 0), 2.0)
    grain = cv2.resize(rng.normal(0, 10, (h // 2, w // 2)).astype(np.float32), (w, h))
    field += grain[..., None]
    img = cv2.convertScaleAbs(np.minimum(field, 255, out=field))  # |x| folds the few values below 0
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_generated(job: tuple[str, int, int]) -> None:
    path, index, side = job
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(synthetic_photo(index, side))
    os.replace(tmp, path)


def _variant(job: tuple[str, str, int]) -> None:
    """Variant `variant` of a real photo: mirrored, rotated by 90 degree steps, cropped to 85 %."""
    path, source, variant = job
    img = Image.open(source).convert("RGB")
    if variant & 1:
        img = ImageOps.mirror(img)
    img = img.rotate(90 * ((variant >> 1) & 3), expand=True)
    if variant >> 3:
        w, h = img.size
        img = img.crop((int(w * 0.075), int(h * 0.075), w - int(w * 0.075), h - int(h * 0.075)))
    img.save(path + ".tmp", "JPEG", quality=90)
    os.replace(path + ".tmp", path)


def make_images(out: str, count: int, side: int, source: str | None, processes: int) -> list[str]:
    """File names of `count` distinct JPEGs in `out`, made once and reused by later runs."""
    os.makedirs(out, exist_ok=True)
    if source:
        sources = sorted(glob.glob(os.path.join(source, "*.jpg")))
        if len(sources) * 16 < count:
            raise FileNotFoundError(f"{source} has {len(sources)} JPEGs: at most {len(sources) * 16} variants, "
                                    f"{count} asked for")
        jobs = [(os.path.join(out, f"v{i // len(sources):02d}_{os.path.basename(sources[i % len(sources)])}"),
                 sources[i % len(sources)], i // len(sources)) for i in range(count)]
        work = _variant
    else:
        jobs = [(os.path.join(out, f"gen{side}_{i:06d}.jpg"), i, side) for i in range(count)]
        work = _write_generated
    missing = [j for j in jobs if not os.path.exists(j[0])]
    if missing:
        print(f"bench.ingest: making {len(missing)} images in {out}", flush=True)
        with multiprocessing.Pool(processes) as pool:
            pool.map(work, missing, chunksize=64)
    return [os.path.basename(j[0]) for j in jobs]


# ---------------------------------------------------------------- the floor: no network, no crawler

def _decode_resize_encode(job: tuple[str, int, bool]) -> int:
    """One image's pixel work: our validator's own (`validator=True`: decode, checks, resize, encode,
    hashes), or a plain PIL/OpenCV pass (JPEG draft decoding to the target size, area resize, encode)."""
    import cv2

    from maskless.ingest.validator import clean_image

    path, size, validator = job
    with open(path, "rb") as f:
        data = f.read()
    if validator:
        return len(clean_image(data, size, 90, 1).jpg)
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    scale = min(1.0, size / max(w, h))
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    img.draft("RGB", target)  # decode at 1/2..1/8 scale where that still covers the target
    img = img.convert("RGB")
    if img.size != target:
        img = Image.fromarray(cv2.resize(np.asarray(img), target, interpolation=cv2.INTER_AREA))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return len(buf.getvalue())


def run_floor(paths: list[str], processes: int, size: int, validator: bool) -> dict:
    """Images/s of a plain pool doing each file's pixel work, no network (the pool's start included)."""
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with multiprocessing.Pool(processes) as pool:
        pool.map(_decode_resize_encode, [(p, size, validator) for p in paths], chunksize=32)
    seconds = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's processes, reaped by now
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return {"seconds": seconds, "images_per_second": len(paths) / seconds, "cpu_seconds": cpu}


# ---------------------------------------------------------------- the two tools

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_img2dataset(venv: str) -> tuple[str | None, str]:
    """(img2dataset executable or None, why not): installs it with pip into `venv` when missing."""
    exe = os.path.join(venv, "bin", "img2dataset")
    if os.path.exists(exe):
        return exe, ""
    try:
        print(f"bench.ingest: installing img2dataset into {venv} (pip, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "img2dataset"], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"img2dataset could not be installed into {venv} ({e})"
    return (exe, "") if os.path.exists(exe) else (None, f"pip installed no {exe}")


def run_ours(csv_path: str, out: str, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "maskless.cli", "crawl", "--engine", "urls", "--urls", csv_path, "--out", out,
           "--allow-private", "--image-size", str(args.image_size), "--jpeg-quality", "90",
           "--shard-size", str(args.shard_size), "--threads", str(args.threads), "--workers", str(args.processes),
           "--task-cpus", "1", "--per-host-rps", "0", "--per-host-concurrency", str(args.threads),
           "--timeout", "10", "--retries", "0", "--min-size", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    if args.ray_address:
        env["RAY_ADDRESS"] = args.ray_address  # join the Ray the bench started (--running-ray)
    else:
        env.pop("RAY_ADDRESS", None)  # a local Ray of --processes CPUs, like img2dataset's processes
        cmd += ["--num-cpus", str(args.processes)]
    proc, seconds, tree = run_watched(cmd, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"maskless crawl failed ({proc.returncode}): {proc.stderr[-3000:]}")
    with open(os.path.join(out, "crawl_summary.json")) as f:
        summary = json.load(f)
    unit_seconds = 0.0
    for path in glob.glob(os.path.join(out, "_units", "*.stats.json")):
        with open(path) as f:
            unit_seconds += json.load(f)["seconds"]
    # where the whole process's time went: outside run_crawl (imports, ray.init, Ray's shutdown at
    # exit), the final pass, and the crawl beyond what the workers spent inside units (their start-up,
    # the gaps between units)
    return {"seconds": seconds, "cpu_seconds": tree.total(), "cpu_by_process": tree.by_title(),
            "crawl_seconds": summary["crawl_seconds"],
            "run_crawl_seconds": summary["seconds"],
            "outside_run_crawl_seconds": seconds - summary["seconds"],
            "finalize_seconds": summary["seconds"] - summary["crawl_seconds"],
            "unit_seconds_per_worker": unit_seconds / args.processes,
            "accepted": summary["accepted_this_run"], "kept_after_dedup": summary["samples"],
            "rejected": {k: v for g in summary["by_engine_class"].values() for k, v in g["rejected"].items()}}


def run_img2dataset(exe: str, csv_path: str, out: str, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [exe, "--url_list", csv_path, "--input_format", "csv", "--url_col", "url", "--caption_col", "label",
           "--output_folder", out, "--output_format", "webdataset", "--processes_count", str(args.processes),
           "--thread_count", str(args.threads), "--image_size", str(args.image_size),
           "--resize_mode", "keep_ratio_largest", "--resize_only_if_bigger", "True", "--encode_quality", "90",
           "--number_sample_per_shard", str(args.shard_size), "--timeout", "10", "--retries", "0",
           "--enable_wandb", "False"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc, seconds, tree = run_watched(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}): {proc.stderr[-2000:]}")
    ok = failed = 0
    for path in glob.glob(os.path.join(out, "*_stats.json")):
        with open(path) as f:
            st = json.load(f)
        ok += st.get("successes", 0)
        failed += st.get("failed_to_download", 0) + st.get("failed_to_resize", 0)
    return {"seconds": seconds, "cpu_seconds": tree.total(), "accepted": ok, "failed": failed}


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:  # it just exited
        pass
    return kids


def process_title(pid: int, root: int) -> str:
    """A short name for a process of the tree: "driver", a Ray worker's title up to its method
    ("ray::PseudoActor"), or the program (and script) it runs."""
    if pid == root:
        return "driver"
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    if argv and argv[0].startswith("ray::"):
        return re.split(r"[.(\s]", argv[0], maxsplit=1)[0]
    scripts = [os.path.basename(a) for a in argv[1:3] if a.endswith(".py")]
    return " ".join([os.path.basename(argv[0]) if argv else "?"] + scripts[:1])


class TreeCPU:
    """CPU seconds of a process and all its descendants (Ray's raylet, workers...), sampled twice a
    second while it runs: a measure of work that, unlike images/s, other jobs on the cores barely
    change. A process loses the CPU it used after its last sample (at most half a second's worth).
    `by_title()` gives the CPU each kind of process used while watched (processes already running at
    the first sample count from there)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.seen, self.start, self.titles = interval, {}, {}, {}
        self._stop = threading.Event()

    def watch(self, root: int) -> None:
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(root,), daemon=True)
        self._thread.start()
        self._first.wait()

    def _run(self, root: int) -> None:
        while not self._stop.is_set():
            todo = [root]
            while todo:
                pid = todo.pop()
                try:
                    cpu = cpu_seconds(pid)
                    title = process_title(pid, root)
                except (OSError, IndexError):
                    continue
                if not self._first.is_set():
                    self.start[pid] = cpu
                self.seen[pid] = max(self.seen.get(pid, 0.0), cpu)
                if title != "ray::IDLE" or pid not in self.titles:  # an idle worker keeps its last task's name
                    self.titles[pid] = title
                todo += _children(pid)
            self._first.set()
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.total()

    def total(self) -> float:
        return sum(self.seen.values())

    def by_title(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self.seen.items():
            out[self.titles[pid]] = out.get(self.titles[pid], 0.0) + cpu - self.start.get(pid, 0.0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run_watched(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float, TreeCPU]:
    """(completed process, wall seconds, the CPU of its process tree, stopped: total() and by_title())."""
    tree = TreeCPU()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    tree.watch(proc.pid)
    out, err = proc.communicate()
    seconds = time.time() - t0
    tree.stop()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seconds, tree


def timed(server_pid: int, fn, *a) -> dict:
    """fn's result with the 1-minute load average before and after (other jobs on the cores skew it)
    and the CPU seconds the image server spent meanwhile (it shares the cores with the tool)."""
    before, server = os.getloadavg()[0], cpu_seconds(server_pid)
    result = fn(*a)
    return {**result, "load_before": round(before, 2), "load_after": round(os.getloadavg()[0], 2),
            "server_cpu_seconds": round(cpu_seconds(server_pid) - server, 2)}


def start_ray(args: argparse.Namespace) -> tuple[str, subprocess.Popen]:
    """A Ray head with --processes CPUs, no dashboard: its address and its `ray start --block` process,
    in a session of its own, so that stop_ray ends this Ray and no other (`ray stop` would end every
    Ray on the machine, another job's too)."""
    port, ray_cli = free_port(), os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}",
           f"--num-cpus={args.processes}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while subprocess.run([ray_cli, "status", f"--address={address}"], capture_output=True).returncode != 0:
        if head.poll() is not None or time.time() > deadline:
            stop_ray(head)
            raise RuntimeError(f"ray start failed: {head.stderr.read()[-2000:] if head.stderr else ''}")
        time.sleep(1.0)
    return address, head


def stop_ray(head: subprocess.Popen) -> None:
    """End the Ray of start_ray: SIGTERM to its session (the head, its GCS, raylet and workers)."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(head.pid, signal.SIGKILL)


def bench_size(n: int, names: list[str], images_dir: str, server, port: int, exe: str | None,
               args) -> tuple[list, dict]:
    """One size: floor, ours, img2dataset, back to back; (rows, raw results)."""
    sub = names[:n]
    csv_path = os.path.join(args.work, f"urls-{n}.csv")
    with open(csv_path, "w") as f:
        f.write("url,label\n")
        for name in sub:
            f.write(f"http://127.0.0.1:{port}/{name},photo\n")
    paths = [os.path.join(images_dir, name) for name in sub]
    floor = timed(server.pid, run_floor, paths, args.processes, args.image_size, False)
    floor_ours = timed(server.pid, run_floor, paths, args.processes, args.image_size, True)
    ours = timed(server.pid, run_ours, csv_path, os.path.join(args.work, f"ours-{n}"), args)
    theirs = (timed(server.pid, run_img2dataset, exe, csv_path, os.path.join(args.work, f"img2dataset-{n}"), args)
              if exe else None)
    rate = ours["accepted"] / ours["seconds"]
    tag = f"{n} urls:"
    rows = [
        {"metric": f"{tag} floor: PIL draft + OpenCV resize + encode", "value": floor["images_per_second"],
         "unit": "images/s"},
        {"metric": f"{tag} floor: our validator's clean_image", "value": floor_ours["images_per_second"],
         "unit": "images/s"},
        {"metric": f"{tag} floor CPU per image: PIL draft / clean_image",
         "value": f"{1000 * floor['cpu_seconds'] / n:.2f} / {1000 * floor_ours['cpu_seconds'] / n:.2f}", "unit": "ms"},
        {"metric": f"{tag} maskless crawl accepted", "value": ours["accepted"], "unit": "images"},
        {"metric": f"{tag} maskless crawl, whole process", "value": rate, "unit": "images/s"},
        {"metric": f"{tag} maskless crawl: CPU per image (its processes{'; the driver only' if args.ray_address else ''})",
         "value": 1000 * ours["cpu_seconds"] / n, "unit": "ms"},
        {"metric": f"{tag} maskless crawl: server CPU per image", "value": 1000 * ours["server_cpu_seconds"] / n,
         "unit": "ms"},
        {"metric": f"{tag} maskless crawl: CPU s by process (the 5 largest)", "unit": "s",
         "value": ", ".join(f"{t} {c:.1f}" for t, c in list(ours["cpu_by_process"].items())[:5])},
        {"metric": f"{tag} maskless: outside run_crawl (imports, {'joining Ray' if args.ray_address else 'ray.init'}, exit)",
         "value": ours["outside_run_crawl_seconds"], "unit": "s"},
        {"metric": f"{tag} maskless: crawl, workers' time in units", "value": ours["unit_seconds_per_worker"],
         "unit": "s"},
        {"metric": f"{tag} maskless: crawl, the rest (workers' start, gaps)",
         "value": ours["crawl_seconds"] - ours["unit_seconds_per_worker"], "unit": "s"},
        {"metric": f"{tag} maskless: final pass and summary", "value": ours["finalize_seconds"], "unit": "s"},
        {"metric": f"{tag} maskless / floor (PIL draft)", "value": rate / floor["images_per_second"], "unit": "x"},
        {"metric": f"{tag} maskless / floor (clean_image)", "value": rate / floor_ours["images_per_second"],
         "unit": "x"},
    ]
    if theirs:
        their_rate = theirs["accepted"] / theirs["seconds"]
        rows += [
            {"metric": f"{tag} img2dataset written", "value": theirs["accepted"], "unit": "images"},
            {"metric": f"{tag} img2dataset, whole process", "value": their_rate, "unit": "images/s"},
            {"metric": f"{tag} img2dataset: CPU per image (its processes)",
             "value": 1000 * theirs["cpu_seconds"] / n, "unit": "ms"},
            {"metric": f"{tag} img2dataset: server CPU per image", "value": 1000 * theirs["server_cpu_seconds"] / n,
             "unit": "ms"},
            {"metric": f"{tag} ratio maskless / img2dataset", "value": rate / their_rate, "unit": "x"},
        ]
    loads = [floor["load_before"], ours["load_before"], ours["load_after"]] + ([theirs["load_after"]] if theirs else [])
    rows.append({"metric": f"{tag} load average (1 min) around the runs",
                 "value": "/".join(f"{x:.1f}" for x in loads), "unit": ""})
    return rows, {"floor": floor, "floor_clean_image": floor_ours, "ours": ours, "img2dataset": theirs}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--urls", default="1000,10000", help="URL list sizes, comma separated")
    ap.add_argument("--source", default=None, help="a folder of JPEGs to make variants of (default: generated)")
    ap.add_argument("--side", type=int, default=640, help="longest side of generated images")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "maskless-bench-ingest"))
    ap.add_argument("--img2dataset-venv", default=DEFAULT_VENV)
    ap.add_argument("--no-img2dataset", action="store_true", help="skip the img2dataset row")
    ap.add_argument("--protocol", default="HTTP/1.1", choices=("HTTP/1.0", "HTTP/1.1"),
                    help="the image server's HTTP version: 1.1 keeps connections open, 1.0 closes each")
    ap.add_argument("--backlog", type=int, default=1024,
                    help="the image server's listen backlog (python -m http.server's is 5: SYNs dropped)")
    ap.add_argument("--running-ray", action="store_true",
                    help="start one Ray before the runs and have every maskless crawl join it (RAY_ADDRESS)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--json", default=None, help="write the result JSON here")
    return ap


def compare(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every size of --urls, back to back: (rows for write_result, the raw results by size)."""
    sizes = [int(x) for x in args.urls.split(",")]
    images_dir = os.path.join(args.work, "images" if args.source else f"generated-{args.side}")
    names = make_images(images_dir, max(sizes), args.side, args.source, args.processes)
    exe, why = (None, "skipped (--no-img2dataset)") if args.no_img2dataset else ensure_img2dataset(args.img2dataset_venv)
    if exe is None:
        print(f"bench.ingest: img2dataset row skipped: {why}", flush=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.image_server", str(port), images_dir, "--protocol",
                               args.protocol, "--backlog", str(args.backlog)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows, raw = [], {}
    args.ray_address, head = start_ray(args) if args.running_ray else (None, None)
    try:
        time.sleep(1.0)
        for n in sizes:
            r, raw[n] = bench_size(n, names, images_dir, server, port, exe, args)
            rows += r
    finally:
        server.terminate()
        server.wait()
        if head:
            stop_ray(head)
    mb = sum(os.path.getsize(os.path.join(images_dir, n)) for n in names[:max(sizes)]) / 2**20
    if args.ray_address:
        rows.insert(0, {"metric": "maskless crawl joins a running Ray (--running-ray)", "value": args.ray_address,
                        "unit": f"{args.processes} CPUs"})
    rows.insert(0, {"metric": f"source images (loopback, bench/image_server.py, {args.protocol}, backlog "
                              f"{args.backlog})", "value": max(sizes),
                    "unit": f"JPEGs, {mb:.0f} MiB, longest side {args.side if not args.source else 'as given'}"})
    if exe is None:
        rows.append({"metric": "img2dataset", "value": f"skipped: {why}", "unit": ""})
    return rows, raw


def main() -> None:
    args = parser().parse_args()
    rows, raw = compare(args)
    write_result("ingest", rows, args.json, runs=raw,
                 settings={k: getattr(args, k) for k in ("processes", "threads", "image_size", "shard_size", "side",
                                                         "protocol", "backlog", "running_ray")})


if __name__ == "__main__":
    main()

"""Bench: the same loopback URL list through `maskless crawl --engine urls` and through img2dataset.

1. Builds 1,000+ real-size JPEGs from --source (default: the COCO val2017 sample in shared/realdata)
   by re-encoding the 8 flips/rotations of each image, full and centre-cropped to 85 %.
2. Serves them on 127.0.0.1 with `python -m http.server` in its own process and writes url,label CSV.
3. Runs, one after the other on the same cores: our run_crawl (urls engine, Ray with --processes
   tasks x --threads threads) and img2dataset (its own virtualenv, --processes x --threads,
   webdataset output), both resizing the longest side to --image-size (never up) at JPEG quality 90.
4. Prints images/s of each (end to end, start-up included) and the ratio ours / img2dataset.

    .venv/bin/python -m bench.ingest [--images 1264] [--work /tmp/maskless-bench-ingest] [--out result.json]

img2dataset pins an old webdataset, so it lives in --img2dataset-venv (created here with pip when
missing) and never in the project's venv. If it cannot be installed, the bench says so and reports
our figures only.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from PIL import Image, ImageOps

from bench.common import write_result

DEFAULT_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                              "realdata", "coco_mini_val2017", "val2017")


def make_images(source: str, out: str, count: int) -> list[str]:
    """Distinct real-size JPEGs: the dihedral variants of each source image, full and cropped."""
    os.makedirs(out, exist_ok=True)
    sources = sorted(glob.glob(os.path.join(source, "*.jpg")))
    if not sources:
        raise FileNotFoundError(f"no JPEGs in {source} (give --source a folder of real photos)")
    names = []
    for variant in range(16):
        for path in sources:
            if len(names) >= count:
                return names
            name = f"v{variant:02d}_{os.path.basename(path)}"
            names.append(name)
            target = os.path.join(out, name)
            if os.path.exists(target):
                continue
            img = Image.open(path).convert("RGB")
            flip, rot, crop = variant & 1, (variant >> 1) & 3, variant >> 3
            if flip:
                img = ImageOps.mirror(img)
            img = img.rotate(90 * rot, expand=True)
            if crop:
                w, h = img.size
                dw, dh = int(w * 0.075), int(h * 0.075)
                img = img.crop((dw, dh, w - dw, h - dh))
            img.save(target, "JPEG", quality=90)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_img2dataset(venv: str) -> str | None:
    """Path of the img2dataset executable in its own venv, installing it with pip when missing."""
    exe = os.path.join(venv, "bin", "img2dataset")
    if os.path.exists(exe):
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "img2dataset"], check=True)
    except subprocess.CalledProcessError as e:
        print(f"img2dataset could not be installed into {venv} ({e}); comparing nothing, reporting ours only")
        return None
    return exe if os.path.exists(exe) else None


def run_ours(csv_path: str, out: str, args) -> dict:
    import ray

    from maskless.ingest.crawl import CrawlConfig, run_crawl
    from maskless.ray_runtime import init_ray

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    init_ray(num_cpus=args.processes)
    t_ray = time.time()
    cfg = CrawlConfig(engine=["urls"], urls=csv_path, out=out, allow_private=True, image_size=args.image_size,
                      jpeg_quality=90, shard_size=args.shard_size, threads=args.threads, workers=args.processes,
                      task_cpus=1.0, per_host_rps=0, per_host_concurrency=args.threads, timeout=10, retries=0,
                      min_size=1, progress=False)
    summary = run_crawl(cfg)
    t1 = time.time()
    ray.shutdown()
    return {"seconds": t1 - t0, "crawl_seconds": summary["crawl_seconds"], "seconds_without_ray_start": t1 - t_ray,
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
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({proc.returncode}): {proc.stderr[-2000:]}")
    ok = failed = 0
    for path in glob.glob(os.path.join(out, "*_stats.json")):
        with open(path) as f:
            st = json.load(f)
        ok += st.get("successes", 0)
        failed += st.get("failed_to_download", 0) + st.get("failed_to_resize", 0)
    return {"seconds": seconds, "accepted": ok, "failed": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE)
    ap.add_argument("--images", type=int, default=1264)
    ap.add_argument("--work", default="/tmp/maskless-bench-ingest")
    ap.add_argument("--img2dataset-venv", default="/work/bench-venvs/img2dataset")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--json", default=None, help="write the result JSON here")
    args = ap.parse_args()

    images_dir = os.path.join(args.work, "images")
    names = make_images(os.path.abspath(args.source), images_dir, args.images)
    mb = sum(os.path.getsize(os.path.join(images_dir, n)) for n in names) / 2**20
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", images_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        csv_path = os.path.join(args.work, "urls.csv")
        with open(csv_path, "w") as f:
            f.write("url,label\n")
            for n in names:
                f.write(f"http://127.0.0.1:{port}/{n},photo\n")
        exe = ensure_img2dataset(args.img2dataset_venv)
        ours = run_ours(csv_path, os.path.join(args.work, "ours"), args)
        theirs = run_img2dataset(exe, csv_path, os.path.join(args.work, "img2dataset"), args) if exe else None
    finally:
        server.terminate()
        server.wait()
    rows = [
        {"metric": "urls (real-size JPEGs, loopback)", "value": len(names), "unit": f"images, {mb:.0f} MiB"},
        {"metric": "maskless crawl: images accepted", "value": ours["accepted"], "unit": "images"},
        {"metric": "maskless crawl: kept after near-dup merge", "value": ours["kept_after_dedup"], "unit": "images"},
        {"metric": "maskless crawl: end to end (Ray start included)", "value": ours["accepted"] / ours["seconds"],
         "unit": "images/s"},
        {"metric": "maskless crawl: without Ray start", "value": ours["accepted"] / ours["seconds_without_ray_start"],
         "unit": "images/s"},
    ]
    if theirs:
        rows += [
            {"metric": "img2dataset: images written", "value": theirs["accepted"], "unit": "images"},
            {"metric": "img2dataset: end to end", "value": theirs["accepted"] / theirs["seconds"], "unit": "images/s"},
            {"metric": "ratio maskless / img2dataset (end to end)",
             "value": (ours["accepted"] / ours["seconds"]) / (theirs["accepted"] / theirs["seconds"]), "unit": "x"},
        ]
    else:
        rows.append({"metric": "img2dataset", "value": "not installed: no comparison", "unit": ""})
    write_result("ingest", rows, args.json, ours=ours, img2dataset=theirs,
                 settings={k: getattr(args, k) for k in ("processes", "threads", "image_size", "shard_size")})


if __name__ == "__main__":
    main()

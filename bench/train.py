"""Bench: Mask R-CNN training throughput through maskless (Ray Train) against a plain torchvision loop.

On one synthetic world (ingest.world) imported as shards, with the same model, data, batches and
optimizer, measures images/s:
- plain: one process, a hand-written torchvision training loop (the floor of what maskless can do);
- maskless, 1 worker: `run_train` (Ray Train TorchTrainer, metrics reports, checkpoints);
  overhead ratio = plain / maskless (goal <= 1.05);
- maskless, 2 workers: DDP; scaling = 2-worker images/s / 1-worker images/s, where each worker gets
  the same CPUs (--threads) as the 1-worker run.
Throughput is the median of the per-interval images/s after the first interval (start-up and the
first allocations excluded), the same rule for all three.

    .venv/bin/python -m bench.train [--steps 40] [--log-every 5] [--threads 1] [--size 128] [--json FILE]
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a file (`maskless bench` does): its folder would shadow the `train` package.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from bench.common import write_result
from maskless.ingest.voc import import_voc
from maskless.ingest.world import make_world
from maskless.train.dataset import ShardDataset, build_index, collate, rank_batches, steps_per_epoch
from maskless.train.maskrcnn import build_model
from maskless.ray_runtime import init_ray
from maskless.core.run_folder import read_metrics
from maskless.train.trainer import TrainConfig, learning_rate, run_train


def plain_loop(cfg: TrainConfig, steps: int, log_every: int) -> list[float]:
    """The same training as one maskless worker, without Ray: images/s per log interval."""
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    entries, classes, _ = build_index(cfg.data, cfg.masks)
    spe = steps_per_epoch(len(entries), cfg.batch_size, 1)
    model = build_model(classes, weights=cfg.weights, **cfg.model_options()).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.total_lr(),
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dataset = ShardDataset(entries, classes)
    speeds, step, t0 = [], 0, time.perf_counter()
    while step < steps:
        epoch = step // spe
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=rank_batches(entries, cfg.batch_size, 0, 1, epoch,
                                                                                 cfg.seed, cfg.hflip),
                                             collate_fn=collate, num_workers=cfg.loader_workers)
        for images, targets in loader:
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(cfg, step, epoch, spe)
            loss = sum(model(list(images), list(targets)).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            step += 1
            if step % log_every == 0:
                speeds.append(log_every * cfg.batch_size / (time.perf_counter() - t0))
                t0 = time.perf_counter()
            if step >= steps:
                break
    return speeds


def maskless_speeds(cfg: TrainConfig) -> list[float]:
    run_train(cfg)
    return [m["images_per_s"] for m in read_metrics(cfg.out)]


def steady(speeds: list[float]) -> float:
    return statistics.median(speeds[1:] if len(speeds) > 1 else speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    ap.add_argument("--log-every", type=int, default=5, help="steps per throughput interval")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each worker (and of the plain loop)")
    ap.add_argument("--size", type=int, default=128, help="world image side = model min/max size")
    ap.add_argument("--images", type=int, default=64, help="world images")
    ap.add_argument("--batch-size", type=int, default=2, help="images per step per worker")
    ap.add_argument("--arch", default="resnet18_fpn")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        run(args, args.out or tmp)


def run(args: argparse.Namespace, work: str) -> None:
    import ray

    world = os.path.join(work, "world")
    make_world(world, classes=3, images=args.images, seed=0, size=args.size)
    data = os.path.join(work, "train")
    import_voc(world, data, split="train", shard_size=16)
    base = TrainConfig(data=data, out="", masks="gt", arch=args.arch, weights="none", min_size=args.size,
                       max_size=args.size, anchor_sizes=[16, 32, 64, 128, 256] if args.arch != "mobilenet_v3_fpn"
                       else [16, 32, 64], rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                       box_batch_size_per_image=64, batch_size=args.batch_size, epochs=1000, max_steps=args.steps,
                       lr=0.01, clip_grad_norm=5.0, loader_workers=0, log_every=args.log_every,
                       cpus_per_worker=args.threads)

    plain = steady(plain_loop(base, args.steps, args.log_every))
    init_ray(num_cpus=max(4, 2 * args.threads))
    one = steady(maskless_speeds(dataclasses.replace(base, out=os.path.join(work, "w1"), workers=1)))
    two = steady(maskless_speeds(dataclasses.replace(base, out=os.path.join(work, "w2"), workers=2)))
    ray.shutdown()
    rows = [
        {"metric": "plain torchvision loop", "value": plain, "unit": "images/s"},
        {"metric": "maskless, 1 worker", "value": one, "unit": "images/s"},
        {"metric": "overhead ratio plain / maskless-1 (goal <= 1.05)", "value": plain / one, "unit": "x"},
        {"metric": "maskless, 2 workers", "value": two, "unit": "images/s"},
        {"metric": "scaling 1 -> 2 workers", "value": two / one, "unit": "x"},
    ]
    write_result("train", rows, args.json, settings=vars(args),
                 note=f"{args.arch} from scratch at {args.size} px, batch {args.batch_size} per worker, "
                      f"{args.threads} CPU thread(s) per worker, median of {args.log_every}-step intervals "
                      f"after the first")


if __name__ == "__main__":
    main()

"""Bench: the peak classifier on the synthetic world: held-out classification mAP and peak hits.

Builds a world (ingest.world.make_world), imports its train and val splits as shards, trains the
classifier with `run_classify` (Ray Train, from scratch), then on the held-out images measures:
- classification mAP (per-class AP of the peak-stimulated scores);
- peak hit rate: the fraction of ground-truth instances (gt.json) that contain at least one peak of
  their class, peaks taken for the image's labelled classes only (as the pseudo stage does), at
  several relative peak thresholds (fraction of the map's maximum);
- peak precision: the fraction of those peaks that lie inside an instance of their class, and the
  mean number of peaks per (image, labelled class): a hit rate means little if peaks are everywhere.

    .venv/bin/python -m bench.classifier [--classes 4] [--images 400] [--epochs 40] [--out /tmp/bench-classifier]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from maskless.core import masks, shards
from maskless.ingest.voc import import_voc
from maskless.ingest.world import make_world
from maskless.pseudo.classifier import load_classifier
from bench.common import write_result
from maskless.ray_runtime import init_ray
from maskless.pseudo.classify import ClassifyConfig, eval_transform, run_classify
from maskless.pseudo.peak_stimulation import find_peaks

THRESHOLDS = (0.0, 0.25, 0.5)


@torch.no_grad()
def peak_hits(run: str, val_root: str, image_size: int, thresholds=THRESHOLDS) -> dict:
    """Peak hit rate, precision and count per relative threshold on a shard dataset with gt.json."""
    model, classes, _ = load_classifier(run)
    index = {c: i for i, c in enumerate(classes)}
    transform = eval_transform(image_size)
    stats = {t: {"hit": 0, "peaks": 0, "good": 0} for t in thresholds}
    instances = maps = 0
    for s in shards.read_dataset(val_root):
        if s.gt is None:
            raise ValueError(f"{val_root}: sample {s.key} has no gt.json; peak hits need ground truth")
        image = s.image()
        crm = model.class_response_maps(transform(image)[None])
        gts = [(g["class"], masks.decode(g["mask"]).astype(bool)) for g in s.gt["instances"] if g["class"] in index]
        instances += len(gts)
        labelled = sorted({index[l] for l in s.labels if l in index})
        maps += len(labelled)
        for t in thresholds:
            coords, _ = find_peaks(crm, relative_threshold=t)
            coords = coords[torch.isin(coords[:, 1], torch.tensor(labelled, dtype=torch.long))]
            yx = model.crm_to_input(coords[:, 2:], crm.shape[-2:], (image_size, image_size))
            yx = yx * torch.tensor([image.height / image_size, image.width / image_size])
            points = [(classes[int(c)], min(int(y), image.height - 1), min(int(x), image.width - 1))
                      for c, (y, x) in zip(coords[:, 1], yx)]
            stats[t]["peaks"] += len(points)
            stats[t]["good"] += sum(any(gc == pc and m[y, x] for gc, m in gts) for pc, y, x in points)
            stats[t]["hit"] += sum(any(pc == gc and m[y, x] for pc, y, x in points) for gc, m in gts)
    return {t: {"hit_rate": v["hit"] / max(instances, 1), "precision": v["good"] / max(v["peaks"], 1),
                "peaks_per_map": v["peaks"] / max(maps, 1)} for t, v in stats.items()} | {
        "instances": instances}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=128, help="world image side")
    ap.add_argument("--image-size", type=int, default=128, help="classifier input side")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--peak-backward", default="prm")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cpus-per-worker", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/bench-classifier")
    ap.add_argument("--json", default=None, help="write the result here (default OUT/bench.json)")
    args = ap.parse_args()

    import ray

    world = os.path.join(args.out, "world")
    info = make_world(world, classes=args.classes, images=args.images, seed=args.seed, size=args.size)
    data = {split: os.path.join(args.out, "shards", split) for split in ("train", "val")}
    for split, root in data.items():
        if not shards.list_shards(root):
            import_voc(world, root, split=split, shard_size=100)
    run = os.path.join(args.out, f"run-{args.backbone}-{args.image_size}-{args.peak_backward}-e{args.epochs}")
    init_ray(num_cpus=max(2, int(args.workers * args.cpus_per_worker)))
    t0 = time.time()
    try:
        summary = run_classify(ClassifyConfig(
            data=data["train"], val_data=data["val"], out=run, backbone=args.backbone, backbone_weights="none",
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
            peak_backward=args.peak_backward, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
            seed=args.seed))
    finally:
        ray.shutdown()
    train_s = time.time() - t0
    peaks = peak_hits(run, data["val"], args.image_size)
    final = summary["final"]
    rows = [{"metric": "held-out classification mAP", "value": final["map"], "unit": ""}]
    rows += [{"metric": f"held-out AP {c}", "value": final[f"ap/{c}"], "unit": ""} for c in summary["classes"]]
    for t in THRESHOLDS:
        rows += [{"metric": f"gt instances with a peak of their class (r>={t})", "value": peaks[t]["hit_rate"],
                  "unit": "fraction"},
                 {"metric": f"peaks inside an instance of their class (r>={t})", "value": peaks[t]["precision"],
                  "unit": "fraction"},
                 {"metric": f"peaks per labelled (image, class) (r>={t})", "value": peaks[t]["peaks_per_map"],
                  "unit": "peaks"}]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        epoch_s = sum(json.loads(l)["train_time_s"] for l in f if l.strip())
    rows += [{"metric": "training steps, summed over epochs", "value": epoch_s, "unit": "s"},
             {"metric": "run_classify wall time (this invocation)", "value": train_s, "unit": "s"}]
    write_result("classifier", rows, args.json or os.path.join(args.out, "bench.json"),
                 world={k: info[k] for k in ("classes", "images", "train", "val", "instances", "size")},
                 held_out_instances=peaks["instances"], run=run, epochs=summary["epochs_done"],
                 final_train_loss=final["loss"], config=summary["config"])


if __name__ == "__main__":
    main()

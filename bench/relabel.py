"""Bench: one round of self-training (issue #18's "published cheap lever"), measured before it is built
into the pipeline.

The Mask R-CNN trained on the pseudo masks (a run folder's models/weak) relabels the same train images;
a second Mask R-CNN, same recipe, trains on its masks and is scored on the same val split. Published
ablations credit one such round with +4.8 to +8.4 mAP50 (docs/REFERENCES.md). Rule of the new labels:
the weak model's detections of the image's own tags (image-level labels: weak supervision knows
nothing else) at score >= --score; a tagged class the model finds nowhere in the image keeps its
old pseudo instances, so no class disappears from an image.

    .venv/bin/python -m bench.relabel --run /tmp/quality/runs/cls-e80-steps-60/w8-s1 [--score 0.5]

RUN is a `maskless run` (or bench.quality) folder: recipe.yaml, data/pseudo, data/val, models/weak/model.pt,
stages/eval_weak.json (and eval_full.json, when the run trained on the true masks). Writes
RUN/relabel-SCORE/ (data, models/weak2, reports) and prints the pseudo masks' and the models' figures
before and after; a rerun reuses what it finished.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import yaml

from bench.common import write_result
from maskless.core import masks as rle
from maskless.core import shards, storage


def relabel(model: torch.nn.Module, classes: list[str], src: str, dst: str, score: float) -> dict:
    """Write `src`'s samples to `dst` with pseudo.json = the model's masks of each image's tags (see the
    module's rule); shards already complete in `dst` are kept. Returns counts."""
    from maskless.train.predict import decode, detect

    storage.makedirs(dst)
    storage.remove_stale_temps(dst)
    done = set(shards.shard_names(dst))
    counts = {"images": 0, "instances": 0, "kept_old": 0}
    for name in shards.shard_names(src):
        if name in done:
            continue
        with shards.ShardWriter(dst, name) as w:
            for s in shards.read_shard(storage.join(src, name + ".tar")):
                with torch.no_grad():
                    dets = detect(model, [decode(s.jpg, f"sample {s.key} of {src}")], torch.device("cpu"), score)[0]
                found = [(classes[c], p, m) for c, p, m in dets if classes[c] in s.labels]
                new = [{"class": c, "score": p, "mask": rle.encode(m.numpy())} for c, p, m in found]
                missing = set(s.labels) - {c for c, _, _ in found}
                old = [i for i in (s.pseudo or {}).get("instances", []) if i["class"] in missing]
                for inst in new:
                    inst["bbox"] = rle.bbox_xywh(inst["mask"])
                s.pseudo = {**(s.pseudo or {}), "instances": new + old, "rule": f"relabel:weak>={score}"}
                counts["images"] += 1
                counts["instances"] += len(new) + len(old)
                counts["kept_old"] += len(old)
                w.write(s)
    shards.write_dataset_info(dst, classes, stage="bench-relabel", source=src, score=score)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run folder with models/weak and data/pseudo")
    ap.add_argument("--score", type=float, default=0.5, help="least detection score of a new label")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    ap.add_argument("--json", default=None, help="write the result here (default RUN/relabel-SCORE/bench.json)")
    args = ap.parse_args()

    from maskless.pseudo.fidelity import FidelityConfig, run_fidelity
    from maskless.ray_runtime import init_ray
    from maskless.run import _stage_config
    from maskless.train.evaluate import run_eval
    from maskless.train.maskrcnn import load_model
    from maskless.train.trainer import run_train

    run = os.path.abspath(args.run)
    out = os.path.join(run, f"relabel-{args.score:g}")
    with open(os.path.join(run, "recipe.yaml")) as f:
        recipe = yaml.safe_load(f)
    t0 = time.time()
    model, classes, _ = load_model(os.path.join(run, "models", "weak", "model.pt"))
    counts = relabel(model.eval(), classes, os.path.join(run, "data", "pseudo"), os.path.join(out, "data"), args.score)
    relabel_s = time.time() - t0
    before = storage.read_json(os.path.join(run, "reports", "fidelity", "fidelity.json"))
    after = run_fidelity(FidelityConfig(data=os.path.join(out, "data"), out=os.path.join(out, "reports", "fidelity"),
                                        grid_images=0))
    init_ray(num_cpus=args.num_cpus)
    model_path = os.path.join(out, "models", "weak2", "model.pt")
    if not storage.exists(model_path):
        run_train(_stage_config("maskless.train.trainer", "TrainConfig", recipe.get("train", {}),
                                data=os.path.join(out, "data"), masks="pseudo", out=os.path.join(out, "models", "weak2")))
    ev = run_eval(_stage_config("maskless.train.evaluate", "EvalConfig", recipe.get("eval", {}), model=model_path,
                                gt=os.path.join(run, "data", "val"), out=os.path.join(out, "reports", "weak2")))
    weak = storage.read_json(os.path.join(run, "stages", "eval_weak.json"))["result"]["mAP"]["voc"]
    full_path = os.path.join(run, "stages", "eval_full.json")
    full = storage.read_json(full_path)["result"]["mAP"]["voc"] if storage.exists(full_path) else None
    weak2 = ev["mAP"]["voc"]
    rows = [{"metric": "relabelled images / instances (old pseudo instances kept)",
             "value": f"{counts['images']} / {counts['instances']} ({counts['kept_old']})", "unit": ""},
            {"metric": "relabel seconds", "value": round(relabel_s, 1), "unit": "s"}]
    for name in ("recall", "precision", "abo_same_class"):
        rows.append({"metric": f"pseudo masks {name}, before -> after",
                     "value": f"{before[name]:.3f} -> {after[name]:.3f}", "unit": ""})
    rows.append({"metric": "recall per class, before -> after", "unit": "",
                 "value": ", ".join(f"{c} {before['per_class'][c]['recall']:.2f}->{after['per_class'][c]['recall']:.2f}"
                                    for c in classes)})
    for iou in ("0.25", "0.5", "0.75"):
        line = f"{100 * weak[iou]:.1f} -> {100 * weak2[iou]:.1f}"
        if full:
            line += f" (full {100 * full[iou]:.1f}; weak/full {weak[iou] / full[iou]:.3f} -> {weak2[iou] / full[iou]:.3f})"
        rows.append({"metric": f"weak mAP^r@{iou} (voc), round 1 -> round 2", "value": line, "unit": ""})
    write_result("relabel", rows, args.json or os.path.join(out, "bench.json"), run=run, score=args.score,
                 counts=counts, fidelity_before=before, fidelity_after=after, weak=weak, weak2=weak2, full=full)


if __name__ == "__main__":
    main()

"""Bench: one round of self-training (issue #18's "published cheap lever"), measured before it is built
into the pipeline.

The Mask R-CNN trained on the pseudo masks (a run folder's models/weak) relabels the same train images;
a second Mask R-CNN, same recipe, trains on its masks and is scored on the same val split. Issue #18 names
it the published cheap lever: what CIM and BESTIE publish (+4.8 and about +8.4 mAP50) is the step before,
a Mask R-CNN trained on the first stage's pseudo masks, which maskless's weak model already is; no figure
of a further round was found (docs/REFERENCES.md). The new labels come
from the weak model's detections of the image's own tags (image-level labels: weak supervision knows
nothing else) at score >= --score, by one of two rules (--rule):
  - replace: those detections; a tagged class the model finds nowhere in the image keeps its old pseudo
    instances, so no class disappears from an image;
  - add: every old pseudo instance, plus the detections that overlap none of them (mask IoU < 0.3).

    .venv/bin/python -m bench.relabel --run /tmp/quality/runs/cls-e80-steps-60/w8-s1 [--score 0.5]
        [--rule replace|add] [--fidelity-only]

RUN is a `maskless run` (or bench.quality) folder: recipe.yaml, data/pseudo, data/val, models/weak/model.pt,
stages/eval_weak.json (and eval_full.json, when the run trained on the true masks). Writes
RUN/relabel-RULE-SCORE/ (data, models/weak2, reports) and prints the pseudo masks' and the models' figures
before and after; a rerun reuses what it finished.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import yaml

from bench.common import write_result
from maskless.core import masks as rle
from maskless.core import shards, storage


ADD_MAX_IOU = 0.3  # rule "add": a detection overlapping an old pseudo instance this much is that instance


def relabel(model: torch.nn.Module, classes: list[str], src: str, dst: str, score: float,
            rule: str = "replace") -> dict:
    """Write `src`'s samples to `dst` with pseudo.json = the model's masks of each image's tags by `rule`
    (see the module's docstring); shards already complete in `dst` are kept. Returns counts over all of
    `dst` (each instance says where it came from: "from" is "model" or "pseudo")."""
    from maskless.train.predict import decode, detect

    def relabelled(s: shards.Sample) -> shards.Sample:
        with torch.no_grad():
            dets = detect(model, [decode(s.jpg, f"sample {s.key} of {src}")], torch.device("cpu"), score)[0]
        found = [(classes[c], p, m) for c, p, m in dets if classes[c] in s.labels]
        new = [{"class": c, "score": p, "mask": rle.encode(m.numpy()), "from": "model"} for c, p, m in found]
        before = [{**i, "from": "pseudo"} for i in (s.pseudo or {}).get("instances", [])]
        if rule == "add":
            old = before
            overlap = rle.iou_matrix([i["mask"] for i in new], [i["mask"] for i in old])
            new = [inst for inst, row in zip(new, overlap) if not (row >= ADD_MAX_IOU).any()]
        else:
            missing = set(s.labels) - {c for c, _, _ in found}
            old = [i for i in before if i["class"] in missing]
        for inst in new:
            inst["bbox"] = rle.bbox_xywh(inst["mask"])
        s.pseudo = {**(s.pseudo or {}), "instances": new + old, "rule": f"relabel-{rule}:weak>={score}"}
        return s

    shards.map_shards(src, dst, relabelled)
    shards.write_dataset_info(dst, classes, stage="bench-relabel", source=src, score=score, rule=rule)
    counts = {"images": 0, "instances": 0, "kept_old": 0}
    for s in shards.read_dataset(dst):
        counts["images"] += 1
        counts["instances"] += len(s.pseudo["instances"])
        counts["kept_old"] += sum(i["from"] == "pseudo" for i in s.pseudo["instances"])
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run folder with models/weak and data/pseudo")
    ap.add_argument("--score", type=float, default=0.5, help="least detection score of a new label")
    ap.add_argument("--rule", default="replace", choices=("replace", "add"), help="how new labels meet the old")
    ap.add_argument("--fidelity-only", action="store_true", help="relabel and score the masks; train nothing")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    ap.add_argument("--json", default=None, help="write the result here (default RUN/relabel-RULE-SCORE/bench.json)")
    args = ap.parse_args()

    from maskless.pseudo.fidelity import FidelityConfig, run_fidelity
    from maskless.ray_runtime import init_ray
    from maskless.run import _stage_config
    from maskless.train.evaluate import run_eval
    from maskless.train.maskrcnn import load_model
    from maskless.train.trainer import run_train

    run = os.path.abspath(args.run)
    out = os.path.join(run, f"relabel-{args.rule}-{args.score:g}")
    with open(os.path.join(run, "recipe.yaml")) as f:
        recipe = yaml.safe_load(f)
    t0 = time.time()
    model, classes, _ = load_model(os.path.join(run, "models", "weak", "model.pt"))
    counts = relabel(model.eval(), classes, os.path.join(run, "data", "pseudo"), os.path.join(out, "data"), args.score,
                     args.rule)
    relabel_s = time.time() - t0
    before = storage.read_json(os.path.join(run, "reports", "fidelity", "fidelity.json"))
    after = run_fidelity(FidelityConfig(data=os.path.join(out, "data"), out=os.path.join(out, "reports", "fidelity"),
                                        grid_images=0))
    rows = [{"metric": "relabelled images / instances (old pseudo instances kept)",
             "value": f"{counts['images']} / {counts['instances']} ({counts['kept_old']})", "unit": ""},
            {"metric": "relabel seconds", "value": round(relabel_s, 1), "unit": "s"}]
    for name in ("recall", "precision", "abo_same_class"):
        rows.append({"metric": f"pseudo masks {name}, before -> after",
                     "value": f"{before[name]:.3f} -> {after[name]:.3f}", "unit": ""})
    rows.append({"metric": "recall per class, before -> after", "unit": "",
                 "value": ", ".join(f"{c} {before['per_class'][c]['recall']:.2f}->{after['per_class'][c]['recall']:.2f}"
                                    for c in classes)})
    extra = dict(run=run, score=args.score, rule=args.rule, counts=counts, fidelity_before=before,
                 fidelity_after=after)
    if args.fidelity_only:
        write_result("relabel", rows, args.json or os.path.join(out, "bench.json"), **extra)
        return
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
    for iou in ("0.25", "0.5", "0.75"):
        line = f"{100 * weak[iou]:.1f} -> {100 * weak2[iou]:.1f}"
        if full:
            line += f" (full {100 * full[iou]:.1f}; weak/full {weak[iou] / full[iou]:.3f} -> {weak2[iou] / full[iou]:.3f})"
        rows.append({"metric": f"weak mAP^r@{iou} (voc), round 1 -> round 2", "value": line, "unit": ""})
    write_result("relabel", rows, args.json or os.path.join(out, "bench.json"), weak=weak, weak2=weak2, full=full,
                 **extra)


if __name__ == "__main__":
    main()

"""Bench: one round of self-training (issue #18's "published cheap lever") on a finished run folder.

The relabel stage (train/relabel.py; `maskless run` does the same with `run.self_training: true`) has the
Mask R-CNN trained on the pseudo masks (RUN/models/weak) relabel the same train images; a second Mask
R-CNN, same recipe, trains on its masks and is scored on the same val split. Issue #18 names it the
published cheap lever: what CIM and BESTIE publish (+4.8 and about +8.4 mAP50) is the step before, a Mask
R-CNN trained on the first stage's pseudo masks, which maskless's weak model already is; no figure of a
further round was found (docs/REFERENCES.md). Here it runs on folders that bench.quality already trained,
so that the rules (--rule add | split | replace, --score) are compared without retraining what comes
before.

    .venv/bin/python -m bench.relabel --run /tmp/quality/runs/cls-e80-steps-60/w8-s1 [--score 0.5]
        [--rule add|split|replace] [--fidelity-only]

RUN is a `maskless run` (or bench.quality) folder: recipe.yaml, data/pseudo, data/val, models/weak/model.pt,
stages/eval_weak.json (and eval_full.json, when the run trained on the true masks). Writes
RUN/relabel-RULE-SCORE/ (data, models/weak2, reports) and prints the pseudo masks' and the models' figures
before and after; a rerun reuses what it finished.
"""
from __future__ import annotations

import argparse
import os
import time

import yaml

from bench.common import write_result
from maskless.core import storage
from maskless.train.relabel import RULES, RelabelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run folder with models/weak and data/pseudo")
    ap.add_argument("--score", type=float, default=0.5, help="least detection score of a new label")
    ap.add_argument("--rule", default=RelabelConfig.rule, choices=RULES, help="how new labels meet the old (train/relabel.py)")
    ap.add_argument("--fidelity-only", action="store_true", help="relabel and score the masks; train nothing")
    ap.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    ap.add_argument("--json", default=None, help="write the result here (default RUN/relabel-RULE-SCORE/bench.json)")
    args = ap.parse_args()

    from maskless.pseudo.fidelity import FidelityConfig, run_fidelity
    from maskless.ray_runtime import init_ray
    from maskless.run import _stage_config
    from maskless.train.evaluate import run_eval
    from maskless.train.relabel import run_relabel
    from maskless.train.trainer import run_train

    run = os.path.abspath(args.run)
    out = os.path.join(run, f"relabel-{args.rule}-{args.score:g}")
    with open(os.path.join(run, "recipe.yaml")) as f:
        recipe = yaml.safe_load(f)
    init_ray(num_cpus=args.num_cpus)
    t0 = time.time()
    counts = run_relabel(RelabelConfig(data=os.path.join(run, "data", "pseudo"), out=os.path.join(out, "data"),
                                       model=os.path.join(run, "models", "weak", "model.pt"), rule=args.rule,
                                       score=args.score))
    relabel_s = time.time() - t0
    before = storage.read_json(os.path.join(run, "reports", "fidelity", "fidelity.json"))
    after = run_fidelity(FidelityConfig(data=os.path.join(out, "data"), out=os.path.join(out, "reports", "fidelity"),
                                        grid_images=0))
    rows = [{"metric": "relabelled images / instances (old pseudo instances kept, split)",
             "value": f"{counts['samples']} / {counts['instances']} ({counts['kept_old']}, {counts['split']})", "unit": ""},
            {"metric": "relabel seconds", "value": round(relabel_s, 1), "unit": "s"}]
    for name in ("recall", "precision", "abo_same_class"):
        rows.append({"metric": f"pseudo masks {name}, before -> after",
                     "value": f"{before[name]:.3f} -> {after[name]:.3f}", "unit": ""})
    rows.append({"metric": "recall per class, before -> after", "unit": "",
                 "value": ", ".join(f"{c} {before['per_class'][c]['recall']:.2f}->{after['per_class'][c]['recall']:.2f}"
                                    for c in before["per_class"])})
    extra = dict(run=run, score=args.score, rule=args.rule, counts=counts, fidelity_before=before,
                 fidelity_after=after)
    if args.fidelity_only:
        write_result("relabel", rows, args.json or os.path.join(out, "bench.json"), **extra)
        return
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

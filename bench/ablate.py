"""Bench: the noise-sensitivity curve, `maskless ablate` with its defaults.

The demo's world (3 classes, 120 images of 128 px: 90 train, 30 val) with its true train masks degraded
at each level (clean, erode:2, dilate:2, drop:0.3, merge:3, shift:3 by default), the demo's Mask R-CNN
recipe trained on each (ResNet-18 FPN from scratch, 110 steps) and scored on the untouched val split.
Prints, per level, the training masks' fidelity (ABO against the true masks, instances kept) and the
final mAP^r at IoU 0.25 / 0.5 / 0.75, and the wall time of the whole run. One 110-step training per
level: differences of a few points are within the run-to-run noise of such a model (BENCHMARKS.md).

    .venv/bin/python -m bench.ablate [--out DIR] [--levels clean,erode:2,...] [--protocol voc] [--json FILE]
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import tempfile
import time

from bench.common import write_result
from maskless.ray_runtime import init_ray
from maskless.train.ablate import DEFAULT_LEVELS, AblateConfig, run_ablate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default=",".join(DEFAULT_LEVELS), help="degradation levels, comma-separated")
    ap.add_argument("--protocol", default="voc", choices=["voc", "coco101"])
    ap.add_argument("--out", default=None, help="ablation folder (default: a temporary one; a rerun into the "
                                                "same folder skips finished levels)")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    init_ray()
    with tempfile.TemporaryDirectory(prefix="bench-ablate-") as tmp:
        cfg = AblateConfig(levels=args.levels.split(","), protocol=args.protocol, out=args.out or tmp)
        t0 = time.time()
        summary = run_ablate(cfg)
        minutes = (time.time() - t0) / 60
    rows = []
    for r in summary["levels"]:
        fid, ap = r["fidelity"], r["mAP"]
        rows.append({"metric": f"{r['level']}: training-mask ABO", "value": fid["abo_same_class"], "unit": ""})
        rows.append({"metric": f"{r['level']}: instances kept", "value": fid["pseudo_instances"] / fid["gt_instances"],
                     "unit": "of the true ones"})
        for t in ("0.25", "0.5", "0.75"):
            rows.append({"metric": f"{r['level']}: mAP^r@{t} ({args.protocol})", "value": 100 * (ap[t] or 0.0),
                         "unit": "%"})
    rows.append({"metric": "wall time, all levels", "value": minutes, "unit": "min"})
    write_result("ablate", rows, args.json, settings=vars(args), train=summary["train"])


if __name__ == "__main__":
    main()

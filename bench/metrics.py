"""Bench: scoring the predictions of 1,449 VOC-sized images at 3 IoU thresholds, maskless vs COCOeval.

Synthetic data of VOC 2012 val's shape: 1,449 images of 500x375, 20 classes, 1-6 instances per image
(crowded same-class groups, void borders), and about 20 predictions per image (near-copies, duplicates,
wrong classes, noise), as a Mask R-CNN at a low score threshold gives. Both scorers get the same RLEs;
the COCOeval time includes loadRes, evaluate and accumulate, ours includes validation and both the
coco101 and voc protocols. The two coco101 tables are also compared.

    .venv/bin/python -m bench.metrics [--images 1449] [--preds-per-image 20] [--seed 0] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

if __package__ in (None, ""):
    # Run as a file (`maskless bench` does): its folder would shadow the `ingest` and `train` packages.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import cv2
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.common import write_result
from maskless.core import masks as ingest_masks
from maskless.core.shards import Sample
from maskless.core import metrics

CLASSES = [f"class{i:02d}" for i in range(20)]
THRESHOLDS = [0.25, 0.5, 0.75]


def make_data(n_images: int, preds_per_image: int, seed: int, h: int = 375, w: int = 500):
    rng = np.random.default_rng(seed)
    kernel = np.ones((5, 5), np.uint8)
    samples, preds = [], []
    for i in range(n_images):
        obj = np.zeros((h, w), np.uint8)
        labels = []
        for k in range(int(rng.integers(1, 7))):
            c = labels[-1] if labels and rng.random() < 0.5 else int(rng.integers(0, 20))
            cy, cx = int(rng.integers(30, h - 30)), int(rng.integers(30, w - 30))
            axes = (int(rng.integers(10, 120)), int(rng.integers(10, 120)))
            cv2.ellipse(obj, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, len(labels) + 1, -1)
            labels.append(c)
        void = cv2.dilate(obj, kernel) != cv2.erode(obj, kernel)
        obj[void] = 0
        key = f"2012_{i:06d}"
        inst, gts = [], []
        for k, c in enumerate(labels, start=1):
            m = obj == k
            if m.sum() >= 20:
                inst.append({"class": CLASSES[c], "score": 1.0, "mask": ingest_masks.encode(m), "bbox": [0, 0, 1, 1]})
                gts.append((m, c))
        samples.append(Sample(key=key, jpg=b"", meta={"width": w, "height": h},
                              gt={"instances": inst, "void": ingest_masks.encode(void)}))
        n = 0
        for m, c in gts:
            for _ in range(int(rng.integers(1, 4))):
                pm = np.roll(m, tuple(rng.integers(-8, 9, 2)), (0, 1))
                pm = cv2.dilate(pm.astype(np.uint8), kernel, iterations=int(rng.integers(0, 3))) > 0
                pc = c if rng.random() < 0.8 else int(rng.integers(0, 20))
                preds.append({"image_id": key, "category": CLASSES[pc], "segmentation": ingest_masks.encode(pm),
                              "score": float(rng.random())})
                n += 1
        while n < preds_per_image:
            pm = np.zeros((h, w), np.uint8)
            cv2.ellipse(pm, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                        (int(rng.integers(5, 80)), int(rng.integers(5, 80))), 0, 0, 360, 1, -1)
            preds.append({"image_id": key, "category": CLASSES[int(rng.integers(0, 20))],
                          "segmentation": ingest_masks.encode(pm > 0), "score": float(rng.random() * 0.6)})
            n += 1
    return samples, preds


def run_cocoeval(samples, preds):
    ids = {s.key: n + 1 for n, s in enumerate(samples)}
    images = [{"id": ids[s.key], "height": s.meta["height"], "width": s.meta["width"]} for s in samples]
    anns = []
    for s in samples:
        for inst in s.gt["instances"]:
            anns.append({"id": len(anns) + 1, "image_id": ids[s.key], "category_id": CLASSES.index(inst["class"]) + 1,
                         "segmentation": dict(inst["mask"]), "area": float(ingest_masks.area(inst["mask"])),
                         "bbox": ingest_masks.bbox_xywh(inst["mask"]), "iscrowd": 0})
    results = [{"image_id": ids[p["image_id"]], "category_id": CLASSES.index(p["category"]) + 1,
                "segmentation": dict(p["segmentation"]), "score": p["score"]} for p in preds]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": n + 1, "name": c} for n, c in enumerate(CLASSES)]}
        gt.createIndex()
        t0, c0 = time.perf_counter(), time.process_time()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "segm")
        ev.params.iouThrs = np.array(THRESHOLDS)
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.params.maxDets = [100]
        ev.evaluate()
        ev.accumulate()
        seconds = (time.perf_counter() - t0, time.process_time() - c0)
    prec = ev.eval["precision"][:, :, :, 0, 0]
    ap = np.array([[prec[t, :, k].mean() if (prec[t, :, k] > -1).all() else np.nan for k in range(len(CLASSES))]
                   for t in range(len(THRESHOLDS))])
    return seconds, ap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1449)
    ap.add_argument("--preds-per-image", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    samples, preds = make_data(args.images, args.preds_per_image, args.seed)
    gt = metrics.GroundTruth.from_samples(samples, CLASSES)
    print(f"data: {len(samples)} images of 500x375, {gt.n_instances} gt instances, {len(preds)} predictions, "
          f"{len(CLASSES)} classes (made in {time.perf_counter() - t0:.1f} s)")

    def best_of_3(run):
        """(wall, cpu) seconds of the run with the least CPU time, and its result. CPU time is what
        compares fairly on a shared machine; both scorers are single-threaded."""
        runs = []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            result = run()
            runs.append(((time.perf_counter() - t0, time.process_time() - c0), result))
        return min(runs, key=lambda r: r[0][1])

    timings = {}
    timings["validate"], loaded = best_of_3(lambda: metrics.load_predictions(preds, gt))
    for protocols in (["coco101"], ["voc"], ["voc", "coco101"]):
        name = "+".join(protocols)
        timings[name], ev = best_of_3(lambda: metrics.evaluate(gt, preds, protocols=protocols, thresholds=THRESHOLDS))
        timings[name + " (validated)"], _ = best_of_3(
            lambda: metrics.evaluate(gt, loaded, protocols=protocols, thresholds=THRESHOLDS))
        if protocols == ["coco101"]:
            ours = ev.protocols["coco101"].ap
    coco, ref = min((run_cocoeval(samples, preds) for _ in range(3)), key=lambda r: r[0][1])
    diff = np.nanmax(np.abs(ours - ref))
    same_nan = bool((np.isnan(ours) == np.isnan(ref)).all())
    rows = []
    for name, (wall, cpu) in timings.items():
        what = "maskless validate predictions" if name == "validate" else f"maskless {name}, 3 thresholds"
        rows += [{"metric": f"{what}: CPU", "value": round(cpu, 3), "unit": "s"},
                 {"metric": f"{what}: wall", "value": round(wall, 3), "unit": "s"}]
    rows += [
        {"metric": "pycocotools COCOeval, 3 thresholds: CPU", "value": round(coco[1], 3), "unit": "s"},
        {"metric": "pycocotools COCOeval, 3 thresholds: wall", "value": round(coco[0], 3), "unit": "s"},
        {"metric": "ratio COCOeval / maskless coco101 (CPU)", "value": round(coco[1] / timings["coco101"][1], 2),
         "unit": "x"},
        {"metric": "ratio COCOeval / maskless voc+coco101 (CPU)",
         "value": round(coco[1] / timings["voc+coco101"][1], 2), "unit": "x"},
        {"metric": "ratio COCOeval / maskless coco101 without validation (CPU)",
         "value": round(coco[1] / timings["coco101 (validated)"][1], 2), "unit": "x"},
        {"metric": "max |AP difference| coco101 vs COCOeval", "value": float(diff), "unit": ""},
    ]
    write_result("metrics", rows, args.json, images=len(samples), gt_instances=gt.n_instances,
                 predictions=len(preds), same_classes_scored=same_nan,
                 mAP={"maskless_coco101": np.nanmean(ours, 1).tolist(), "cocoeval": np.nanmean(ref, 1).tolist()})


if __name__ == "__main__":
    main()

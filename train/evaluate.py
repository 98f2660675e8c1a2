"""`maskless eval`: score a model or a predictions file against ground truth, and write the report.

Ground truth is a shard dataset with gt.json (an import, the world's shards) or a VOC folder
(VOCdevkit/VOC2012 layout, or a synthetic world), which is imported into a temporary shard folder first.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from maskless.core import shards, storage
from maskless.core import metrics
from maskless.train import report

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    gt: str = field(default="", metadata={"help": "ground truth: a shard dataset with gt.json, or a VOC folder "
                                                  "(VOCdevkit/VOC2012 layout or a world)"})
    model: Optional[str] = field(default=None, metadata={"help": "model file (RUN/model.pt) to run on the ground-truth images"})
    predictions: Optional[str] = field(default=None, metadata={
        "help": "COCO results JSON to score instead of a model: [{image_id, category|category_id, segmentation, score}]"})
    split: str = field(default="val", metadata={"help": "split of a VOC folder to import (ignored for shards)"})
    protocol: str = field(default="both", metadata={"help": "scoring protocol (docs/METRICS.md)",
                                                    "choices": ["voc", "coco101", "both"]})
    thresholds: list[float] = field(default_factory=lambda: list(metrics.DEFAULT_THRESHOLDS),
                                    metadata={"help": "IoU thresholds of mAP^r"})
    ignore_void: bool = field(default=False, metadata={
        "help": "remove void (255) pixels from predictions before IoU (WISE's way) instead of chainercv's rule"})
    max_dets: int = field(default=100, metadata={"help": "coco101: detections kept per image and class"})
    overlays: int = field(default=4, metadata={"help": "best and worst images drawn in the report (0: none)"})
    out: str = field(default="eval-out", metadata={"help": "report folder (file path or URI)"})

    def validate(self) -> None:
        if not self.gt:
            raise ValueError("--gt is required: a shard dataset with ground truth or a VOC folder")
        if (self.model is None) == (self.predictions is None):
            raise ValueError("give exactly one of --model (run a model) or --predictions (score a results file)")
        if self.protocol not in ("voc", "coco101", "both"):
            raise ValueError(f"--protocol must be voc, coco101 or both, not {self.protocol!r}")
        if not self.thresholds or any(not 0 < t <= 1 for t in self.thresholds):
            raise ValueError(f"--thresholds must be IoU values in (0, 1], got {self.thresholds}")
        if self.max_dets < 1:
            raise ValueError("--max-dets must be at least 1")
        if self.overlays < 0:
            raise ValueError("--overlays must be 0 or more")

    @property
    def protocols(self) -> list[str]:
        return list(metrics.PROTOCOLS) if self.protocol == "both" else [self.protocol]


def is_shard_dataset(path: str) -> bool:
    return storage.exists(storage.join(path, shards.DATASET_FILE))


def load_ground_truth(gt: str, split: str, workdir: str) -> metrics.GroundTruth:
    """Shards as they are; a VOC folder is imported (split) into `workdir` first."""
    if is_shard_dataset(gt):
        return metrics.GroundTruth.from_shards(gt)
    if "://" not in gt and os.path.isdir(gt):
        from maskless.ingest.voc import import_voc

        import_voc(gt, workdir, split=split)
        return metrics.GroundTruth.from_shards(workdir)
    if not storage.exists(gt):
        raise FileNotFoundError(f"ground truth {gt} not found")
    raise ValueError(f"{gt} is neither a shard dataset (no {shards.DATASET_FILE}) nor a VOC folder")


def run_eval(cfg: EvalConfig) -> dict:
    """Score and report; returns the report summary (also in OUT/report.json)."""
    cfg.validate()
    storage.makedirs(cfg.out)
    with tempfile.TemporaryDirectory(prefix="maskless-eval-gt-") as tmp:
        gt = load_ground_truth(cfg.gt, cfg.split, tmp)
        log.info("ground truth: %d images, %d instances, %d classes", len(gt.keys), gt.n_instances, len(gt.classes))
        meta = {"gt": cfg.gt, "split": cfg.split if not is_shard_dataset(cfg.gt) else None}
        if cfg.model is not None:
            from maskless.train.maskrcnn import load_model
            from maskless.train.predict import predict_dataset

            model, classes, _ = load_model(cfg.model)
            t0 = time.perf_counter()
            raw = predict_dataset(model, classes, gt.shard_root)
            meta["model"] = cfg.model
            meta["predict_seconds"] = round(time.perf_counter() - t0, 2)
            pred_path = storage.join(cfg.out, "predictions.json")
            storage.write_json_atomic(pred_path, raw)
            meta["predictions_file"] = pred_path
        else:
            raw = metrics.read_predictions(cfg.predictions)
            meta["predictions_file"] = cfg.predictions
        t0 = time.perf_counter()
        preds = metrics.load_predictions(raw, gt)
        ev = metrics.evaluate(gt, preds, protocols=cfg.protocols, thresholds=cfg.thresholds,
                              ignore_void=cfg.ignore_void, max_dets=cfg.max_dets)
        meta["scoring_seconds"] = round(time.perf_counter() - t0, 3)
        rep = report.write_report(cfg.out, ev, gt, preds, meta=meta, overlays=cfg.overlays)
    m = rep["measured"]
    summary = {"out": cfg.out, "images": m["images"], "predictions": m["predictions"], "void": m["void"],
               "scoring_seconds": meta["scoring_seconds"],
               "mAP": {p: {t: v["mAP"] for t, v in m["protocols"][p]["thresholds"].items()} for p in m["protocols"]},
               "abo_same_class": m["abo"]["same_class"]["mean_over_instances"]}
    for p, vals in summary["mAP"].items():
        log.info("mAP^r (%s): %s", p, ", ".join(f"{t}: {'-' if v is None else f'{100 * v:.1f}'}" for t, v in vals.items()))
    return summary

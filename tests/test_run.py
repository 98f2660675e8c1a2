"""`maskless run` end to end on a tiny world: every stage runs and achieves what it is for (the crawl
finds the world's train images under their labels, the trained classifier's pseudo masks beat an
untrained one's, the model trained on them beats chance on the val split), the report has both models,
and a second run skips every stage."""
import json
import os
import time
from collections import Counter

import torch
import yaml

from baselines import chance_predictions
from maskless.cli import main
from maskless.core import shards
from maskless.core.metrics import GroundTruth, evaluate
from maskless.pseudo.classifier import PeakClassifier, load_classifier, save_classifier

TINY_TRAIN = dict(arch="resnet18_fpn", weights="none", min_size=96, max_size=96, anchor_sizes=[16, 32, 64, 128, 256],
                  rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                  rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, box_detections_per_img=20,
                  epochs=10, batch_size=2, lr=0.01, warmup_iters=10, clip_grad_norm=5.0, loader_workers=0, workers=1,
                  cpus_per_worker=2, log_every=10)
PSEUDO = {"actors": 1, "peak_threshold": 0.3, "nms_iou": 0.5}


def _untrained_fidelity(run, tmp_path) -> dict:
    """The fidelity of the pseudo masks an untrained classifier (same backbone and input size) gives."""
    _, classes, config = load_classifier(str(run / "classifier"))
    torch.manual_seed(0)
    path = str(tmp_path / "untrained" / "classifier.pt")
    save_classifier(PeakClassifier(len(classes), backbone=config["backbone"]).eval(), classes, config, path)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in PSEUDO.items()]
    assert main(["pseudo", "--classifier", path, "--data", str(run / "data" / "train"),
                 "--out", str(tmp_path / "untrained" / "pseudo"), *flags]) == 0
    assert main(["pseudo-eval", "--data", str(tmp_path / "untrained" / "pseudo"),
                 "--out", str(tmp_path / "untrained" / "fidelity"), "--grid-images", "0"]) == 0
    return json.loads((tmp_path / "untrained" / "fidelity" / "fidelity.json").read_text())


def test_run_end_to_end_then_rerun_skips_everything(ray_local, tmp_path, capsys):
    cfg = {
        "run": {"out": str(tmp_path / "run"), "world": {"classes": 2, "images": 16, "seed": 3, "size": 96}},
        "crawl": {"image_size": 96, "shard_size": 50, "workers": 2, "progress": False},
        "classify": {"backbone": "tiny", "backbone_weights": "none", "image_size": 96, "batch_size": 8,
                     "epochs": 60, "steps_per_epoch": 2, "workers": 1, "cpus_per_worker": 2},
        "pseudo": PSEUDO,
        "pseudo_eval": {"grid_images": 2},
        "train": TINY_TRAIN,
        "eval": {"overlays": 1},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert "report: " + summary["report"] in printed and "eval_weak mAP^r" in printed
    assert summary["report"] == str(run / "reports" / "report.md") and os.path.exists(summary["report"])
    report = (run / "reports" / "report.md").read_text()
    assert "weak: Mask R-CNN on pseudo masks" in report and "full: Mask R-CNN on true masks" in report
    assert "Published results" in report
    stages = summary["stage_seconds"]
    assert set(stages) >= {"world", "import", "web", "crawl", "classify", "pseudo", "fidelity",
                           "train_weak", "eval_weak", "train_full", "eval_full"}

    # the crawl found every train image of the world once, under each of its labels (the web folder's)
    world = json.loads((run / "stages" / "world.json").read_text())["result"]
    web = json.loads((run / "stages" / "web.json").read_text())["result"]
    crawled = list(shards.read_dataset(str(run / "data" / "crawl")))
    assert len(crawled) == world["train"] == 12
    assert Counter(label for s in crawled for label in s.labels) == web["images_per_class"]
    held_out = json.loads((run / "stages" / "classify.json").read_text())["result"]["held_out"]
    assert held_out["samples"] == world["val"] and sum(held_out["class_counts"].values()) >= world["val"]  # val split
    assert "too small" in held_out["warning"] and str(held_out["class_counts"]) in held_out["warning"]

    # the classifier learned where the objects are: its pseudo masks beat an untrained classifier's (whose
    # many loose masks give as high an ABO, but a fraction of the precision and semantic IoU: 0.07 and 0.20
    # against 0.38 and 0.64 here)
    fid, untrained = summary["results"]["fidelity"], _untrained_fidelity(run, tmp_path)
    assert fid["images"] == 12 and fid["gt_instances"] == untrained["gt_instances"] > 0
    assert fid["precision"] >= untrained["precision"] + 0.2 and fid["miou"] >= untrained["miou"] + 0.2, (fid, untrained)

    # Mask R-CNN trained on those pseudo masks finds the val split's objects far better than chance
    # (here 52.0 and 24.5 at IoU 0.25 and 0.5, against 4.7 and 0.3 for random boxes)
    gt = GroundTruth.from_shards(str(run / "data" / "val"))
    chance = evaluate(gt, chance_predictions(gt, gt.classes), protocols=("voc",), thresholds=(0.25, 0.5))
    chance_25, chance_50 = chance.protocols["voc"].mean_ap
    weak = summary["results"]["eval_weak"]["mAP"]["voc"]
    assert weak["0.25"] >= max(0.2, 4 * chance_25) and weak["0.5"] >= max(0.1, 10 * chance_50), (weak, chance_25, chance_50)

    t0 = time.time()
    assert main(["run", "--config", str(path)]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert all(sec == 0 for sec in again["stage_seconds"].values())
    assert time.time() - t0 < 30

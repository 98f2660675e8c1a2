"""`maskless run` end to end on a tiny world: every stage runs, the report has finite numbers,
and a second run skips every stage."""
import json
import math
import os
import time

import yaml

from maskless.cli import main

TINY_TRAIN = dict(arch="resnet18_fpn", weights="none", min_size=96, max_size=96, anchor_sizes=[16, 32, 64, 128, 256],
                  rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                  rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, box_detections_per_img=20,
                  epochs=1, max_steps=3, batch_size=2, lr=0.01, warmup_iters=2, clip_grad_norm=5.0, loader_workers=0, workers=1)


def test_run_end_to_end_then_rerun_skips_everything(ray_local, tmp_path, capsys):
    cfg = {
        "run": {"out": str(tmp_path / "run"), "world": {"classes": 2, "images": 12, "seed": 3, "size": 96}},
        "crawl": {"image_size": 96, "shard_size": 50, "workers": 2, "progress": False},
        "classify": {"backbone": "tiny", "backbone_weights": "none", "image_size": 64, "batch_size": 4,
                     "epochs": 1, "steps_per_epoch": 2, "workers": 1},
        "pseudo": {"actors": 1},
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
    for key in ("eval_weak", "eval_full"):
        for vals in summary["results"][key]["mAP"].values():
            assert all(v is None or (math.isfinite(v) and 0 <= v <= 1) for v in vals.values())
            assert any(v is not None for v in vals.values())
    fid = summary["results"]["fidelity"]
    assert fid["images"] == 9 and all(math.isfinite(fid[k]) for k in ("abo_same_class", "miou"))
    stages = summary["stage_seconds"]
    assert set(stages) >= {"world", "import", "web", "crawl", "classify", "pseudo", "fidelity",
                           "train_weak", "eval_weak", "train_full", "eval_full"}
    held_out = json.loads((run / "stages" / "classify.json").read_text())["result"]["held_out"]
    assert held_out["samples"] == 3 and sum(held_out["class_counts"].values()) >= 3  # the run's val split
    assert "too small" in held_out["warning"] and str(held_out["class_counts"]) in held_out["warning"]
    crawl = json.loads((run / "stages" / "crawl.json").read_text())["result"]
    assert crawl  # the crawl found the world's train images through the loopback engine

    t0 = time.time()
    assert main(["run", "--config", str(path)]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert all(sec == 0 for sec in again["stage_seconds"].values())
    assert time.time() - t0 < 30

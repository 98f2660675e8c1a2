"""`maskless run` end to end on a tiny world: every stage runs, the crawl finds each of the world's
train images once under its labels, the classifier is checked on the run's val split, the report has
both models, and a second run skips every stage. (That the models learn is each stage's own test:
tests/test_classifier.py, tests/test_train.py; this one trains for a few steps only.)"""
import json
import os
import time
from collections import Counter

import yaml

from maskless.cli import main
from maskless.core import shards

TINY_TRAIN = dict(arch="resnet18_fpn", weights="none", min_size=96, max_size=96, anchor_sizes=[16, 32, 64, 128, 256],
                  rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                  rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, box_detections_per_img=20,
                  epochs=1, max_steps=3, batch_size=2, lr=0.01, warmup_iters=2, clip_grad_norm=5.0, loader_workers=0,
                  workers=1)


def test_run_end_to_end_then_rerun_skips_everything(ray_local, tmp_path, capsys):
    cfg = {
        "run": {"out": str(tmp_path / "run"), "world": {"classes": 2, "images": 16, "seed": 3, "size": 96}},
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

    fid = summary["results"]["fidelity"]
    assert fid["images"] == 12 and fid["gt_instances"] > 0

    t0 = time.time()
    assert main(["run", "--config", str(path)]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert all(sec == 0 for sec in again["stage_seconds"].values())
    assert time.time() - t0 < 30

    # self-training added to the finished run: only its four stages run, on what the run has
    cfg["run"]["self_training"] = True
    cfg["relabel"] = {"actors": 1, "score": 0.05}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    third = json.loads((run / "summary.json").read_text())
    ran = {k for k, sec in third["stage_seconds"].items() if sec > 0}
    assert ran == {"relabel", "fidelity_relabel", "train_relabel", "eval_relabel"}
    old = {s.key: s.pseudo["instances"] for s in shards.read_dataset(str(run / "data" / "pseudo"))}
    new = {s.key: s.pseudo["instances"] for s in shards.read_dataset(str(run / "data" / "relabel"))}
    assert sorted(new) == sorted(old)
    split_total = 0
    for key, instances in new.items():  # rule split (default): every old instance kept unless split, in order
        split = {i["split_of"] for i in instances if "split_of" in i}
        assert all(sum(i.get("split_of") == j for i in instances) >= 2 for j in split)  # a split gives 2 or more
        kept = [i for i in instances if i["from"] == "pseudo"]
        assert [i["mask"] for i in kept] == [i["mask"] for j, i in enumerate(old[key]) if j not in split]
        split_total += len(split)
    relabel = json.loads((run / "stages" / "relabel.json").read_text())["result"]
    assert relabel["rule"] == "split" and relabel["samples"] == 12
    assert relabel["kept_old"] + relabel["split"] == sum(map(len, old.values())) and relabel["split"] == split_total
    report = (run / "reports" / "report.md").read_text()
    assert "weak, self-trained" in report and "self-trained / full" in report and "relabelled by the weak model" in report
    assert third["results"]["fidelity_relabel"]["images"] == 12

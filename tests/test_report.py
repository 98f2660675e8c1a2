"""`maskless eval` end to end on the tiny world: report files, self-contained html, honest labels."""
import json
import re

import cv2
import numpy as np
import pytest

from maskless.core import masks as ingest_masks
from maskless.core import shards
from maskless.core import metrics
from maskless.train import evaluate, report


def world_predictions(root: str, seed: int = 0) -> list[dict]:
    """Dilated, eroded and noise predictions of the world's ground truth."""
    rng = np.random.default_rng(seed)
    preds = []
    for s in shards.read_dataset(root):
        for inst in s.gt["instances"]:
            m = ingest_masks.decode(inst["mask"]).astype(np.uint8)
            op = [cv2.dilate, cv2.erode][int(rng.integers(0, 2))]
            m = op(m, np.ones((3, 3), np.uint8), iterations=int(rng.integers(0, 4))) > 0
            if m.any():
                preds.append({"image_id": s.key, "category": inst["class"], "segmentation": ingest_masks.encode(m),
                              "score": float(rng.random())})
        noise = np.zeros((s.meta["height"], s.meta["width"]), bool)
        noise[:20, :20] = True
        preds.append({"image_id": s.key, "category_id": 1, "segmentation": ingest_masks.encode(noise),
                      "score": float(rng.random())})
    return preds


def test_report_from_predictions_file(world_shards, tmp_path):
    preds = world_predictions(world_shards["val"])
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(preds))
    out = tmp_path / "report"
    summary = evaluate.run_eval(evaluate.EvalConfig(gt=world_shards["val"], predictions=str(pred_file), out=str(out),
                                                 overlays=2))
    for name in ("report.json", "report.md", "report.html", "pr-voc.png", "pr-coco101.png", "ap-voc.png",
                 "ap-coco101.png", "best-images.png", "worst-images.png"):
        assert (out / name).stat().st_size > 0, name

    # The numbers in the report are the metrics' numbers, each under its protocol.
    rep = json.loads((out / "report.json").read_text())
    gt = metrics.GroundTruth.from_shards(world_shards["val"])
    ev = metrics.evaluate(gt, preds)
    assert rep["measured"] == json.loads(json.dumps(ev.to_dict()))
    assert summary["mAP"]["voc"]["0.5"] == rep["measured"]["protocols"]["voc"]["thresholds"]["0.5"]["mAP"]
    assert 0 < summary["mAP"]["coco101"]["0.5"] < 1
    assert rep["measured"]["ignore_void"] is False and "chainercv" in rep["measured"]["void"]

    # Published numbers live apart, labelled, never in the measured part.
    assert rep["published"]["rows"][0]["method"] == "PRM" and "not measured" in rep["published"]["note"]
    assert "PRM" not in json.dumps(rep["measured"])
    md = (out / "report.md").read_text()
    assert "Published results (side table, not measured here)" in md
    assert md.count("(voc)") >= 3 and md.count("(coco101)") >= 3  # every AP column names its protocol
    mAP50 = rep["measured"]["protocols"]["voc"]["thresholds"]["0.5"]["mAP"]
    assert f"{100 * mAP50:.1f}" in md

    # Self-contained html: every image inline, nothing fetched from elsewhere.
    html = (out / "report.html").read_text()
    imgs = re.findall(r"<img [^>]*src='([^']*)'", html)
    assert len(imgs) == len(rep["figures"]) >= 6
    assert all(src.startswith("data:image/png;base64,") for src in imgs)
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", html)
    assert "<link" not in html and "<script" not in html
    assert "method (PUBLISHED)" in html


def test_report_from_voc_folder_with_void_ignored(tiny_world, world_shards, tmp_path):
    preds = world_predictions(world_shards["val"], seed=1)
    pred_file = tmp_path / "pred.json"
    pred_file.write_text(json.dumps(preds))
    base = evaluate.run_eval(evaluate.EvalConfig(gt=world_shards["val"], predictions=str(pred_file),
                                                 out=str(tmp_path / "a"), overlays=0, protocol="voc"))
    voc = evaluate.run_eval(evaluate.EvalConfig(gt=tiny_world, split="val", predictions=str(pred_file),
                                                out=str(tmp_path / "b"), overlays=0, protocol="voc", ignore_void=True))
    assert set(voc["mAP"]) == {"voc"}
    assert "ignored" in voc["void"] and "chainercv" in base["void"]
    # dilated predictions spill onto the void border: ignoring void can only raise IoU, hence ABO
    assert voc["abo_same_class"] > base["abo_same_class"]
    assert "void pixels removed" in (tmp_path / "b" / "report.md").read_text()
    assert not (tmp_path / "b" / "best-images.png").exists()


def test_eval_config_errors(tmp_path, world_shards):
    with pytest.raises(ValueError, match="exactly one of --model"):
        evaluate.EvalConfig(gt=world_shards["val"]).validate()
    with pytest.raises(ValueError, match="--gt is required"):
        evaluate.EvalConfig(predictions="x.json").validate()
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate.run_eval(evaluate.EvalConfig(gt=str(tmp_path / "nowhere"), predictions="x.json", out=str(tmp_path / "o")))
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": "zzz", "category": "disc", "score": 1,
                                                    "segmentation": {"size": [1, 1], "counts": "01"}}]))
    with pytest.raises(ValueError, match="unknown image_id 'zzz'"):
        evaluate.run_eval(evaluate.EvalConfig(gt=world_shards["val"], predictions=str(tmp_path / "bad.json"),
                                              out=str(tmp_path / "o")))
    assert not (tmp_path / "o" / "report.json").exists()


def test_published_table_is_labelled():
    caption, header, rows = report.published_table()
    assert "PUBLISHED" in header[0] and "not measured" in caption
    assert {r[0] for r in rows} >= {"PRM", "WISE (+Mask R-CNN)", "BESTIE (+Mask R-CNN)"}
    assert all(r[-1] for r in rows)  # every published row states its protocol (or that it is unknown)


def test_eval_runs_a_model(world_shards, tmp_path):
    """The --model path end to end with an untrained tiny export: predictions are written and scored."""
    import torch

    from maskless.train.maskrcnn import build_model, build_options, save_model

    torch.manual_seed(0)
    opts = dict(arch="resnet18_fpn", min_size=96, max_size=96, trainable_backbone_layers=None, anchor_sizes=None,
                norm=None, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10)
    model = build_model(world_shards["classes"], weights="none", **opts)
    save_model(str(tmp_path / "model.pt"), model.state_dict(), world_shards["classes"],
               {"build": build_options(**opts)})
    summary = evaluate.run_eval(evaluate.EvalConfig(gt=world_shards["val"], model=str(tmp_path / "model.pt"),
                                                    out=str(tmp_path / "out"), overlays=1))
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["predictions"] == len(written)
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["model"] == str(tmp_path / "model.pt") and rep["predict_seconds"] >= 0
    gt = metrics.GroundTruth.from_shards(world_shards["val"])
    assert rep["measured"] == json.loads(json.dumps(metrics.evaluate(gt, written).to_dict()))

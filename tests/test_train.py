"""Mask R-CNN stage: shard index and batches, 2-worker Ray Train run interrupted and resumed, export,
predict, and a model trained on true masks that must beat chance on held-out images."""
import json
import os
import signal
import threading
import time

import pytest
import torch
from PIL import Image

from baselines import chance_predictions
from maskless.core import masks, shards, storage
from maskless.train.dataset import ShardDataset, build_index, rank_batches, steps_per_epoch
from maskless.train.maskrcnn import build_model, load_model
from maskless.core.metrics import GroundTruth, evaluate
from maskless.train.predict import PredictConfig, predict_dataset, run_predict
from maskless.core.run_folder import read_metrics
from maskless.train.trainer import STOP_FILE, TrainConfig, _StopOnSignal, learning_rate, run_train

# ResNet-18 FPN at 96 px with few proposals and RoIs: about a second a step on this machine's CPU.
TINY = dict(arch="resnet18_fpn", weights="none", min_size=96, max_size=96, anchor_sizes=[16, 32, 64, 128, 256],
            rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
            rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, box_detections_per_img=20)


def _with_pseudo(src: str, out: str, score=lambda i: 0.9) -> str:
    """The dataset at src with its true masks also written as pseudo.json (instance i scored score(i))."""
    samples = []
    for s in shards.read_dataset(src):
        s.pseudo = {"instances": [{**inst, "score": score(i)} for i, inst in enumerate(s.gt["instances"])],
                    "classifier": "test", "rule": "prm", "proposals": "ground truth"}
        samples.append(s)
    shards.write_shards(samples, out, "pseudo", max_count=6)
    shards.write_dataset_info(out, shards.read_dataset_info(src)["classes"], stage="pseudo")
    return out


def test_index_filters_flips_and_splits(world_shards, tmp_path):
    root = _with_pseudo(world_shards["train"], str(tmp_path / "p"), score=lambda i: 0.9 if i % 2 == 0 else 0.3)
    gt_entries, classes, gt_counts = build_index(world_shards["train"], masks="gt")
    entries, _, counts = build_index(root, masks="pseudo", score_threshold=0.5)
    assert classes == world_shards["classes"] and len(gt_entries) == 18
    n_gt = [e.instances for e in gt_entries]
    assert [e.instances for e in entries] == [(n + 1) // 2 for n in n_gt]  # odd-numbered instances dropped
    assert counts["below_threshold"] == sum(n // 2 for n in n_gt) == gt_counts["instances"] - counts["instances"]
    # Images left empty are dropped unless asked for.
    none_left, _, c = build_index(root, masks="pseudo", score_threshold=0.95, keep_empty=True)
    assert len(none_left) == 18 and c["instances"] == 0 and c["empty"] == 18
    with pytest.raises(ValueError, match="no image left"):
        build_index(root, masks="pseudo", score_threshold=0.95)
    with pytest.raises(ValueError, match="pseudo.json"):
        build_index(world_shards["train"], masks="pseudo")
    with pytest.raises(FileNotFoundError):
        build_index(str(tmp_path / "missing"))

    # A flipped sample: image, masks and boxes all mirrored, boxes still the masks' boxes.
    ds = ShardDataset(gt_entries, classes)
    image, target = ds[(0, False)]
    fimage, ftarget = ds[(0, True)]
    assert image.shape[0] == 3 and 0 <= float(image.min()) and float(image.max()) <= 1
    assert torch.equal(fimage, image.flip(-1)) and torch.equal(ftarget["masks"], target["masks"].flip(-1))
    for box, m in zip(ftarget["boxes"], ftarget["masks"]):
        x, y, w, h = masks.bbox_xywh(masks.encode(m.numpy().astype(bool)))
        assert box.tolist() == [x, y, x + w, y + h]
    assert target["labels"].min() >= 1 and target["labels"].max() <= len(classes)

    # Two ranks: the same number of batches, together every image once (DistributedSampler pads the odd one).
    b0 = rank_batches(gt_entries, 2, 0, 2, epoch=3, seed=1)
    b1 = rank_batches(gt_entries, 2, 1, 2, epoch=3, seed=1)
    assert len(b0) == len(b1) == steps_per_epoch(18, 2, 2) == 4
    seen = [i for b in b0 + b1 for i, _ in b]
    assert len(seen) == 16 and len(set(seen)) == 16
    assert b0 == rank_batches(gt_entries, 2, 0, 2, epoch=3, seed=1) != rank_batches(gt_entries, 2, 0, 2, epoch=4, seed=1)


def test_build_model_weights_rules(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights none"):
        build_model(["a"], arch="resnet18_fpn", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no COCO"):
        build_model(["a"], arch="mobilenet_v3_fpn", weights="coco")
    with pytest.raises(ValueError, match="3 sizes"):
        build_model(["a"], arch="mobilenet_v3_fpn", weights="none", anchor_sizes=[16, 32, 64, 128, 256])
    scratch = build_model(["a", "b"], **{**TINY, "arch": "mobilenet_v3_fpn", "anchor_sizes": [16, 32, 64]})
    assert all(p.requires_grad for p in scratch.backbone.body.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.backbone.body.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in build_model(["a"], **TINY, norm="group").backbone.body.modules())
    with pytest.raises(ValueError, match="norm 'group'"):
        build_model(["a"], **{**TINY, "arch": "mobilenet_v3_fpn", "anchor_sizes": [16, 32, 64], "norm": "group"})
    # A detector file (here: a model's own state) loads into every layer but the class-specific heads.
    path = str(tmp_path / "det.pth")
    torch.save(build_model(["a", "b", "c"], **TINY).state_dict(), path)
    warm = build_model(["x"], **{**TINY, "weights": path})
    assert warm.roi_heads.box_predictor.cls_score.out_features == 2
    assert not any(p.requires_grad for p in warm.backbone.body.layer1.parameters())  # 3 trainable stages


def test_every_arch_declaration_builds_a_detector_that_trains_a_step(tmp_path):
    """One entry of ARCHS is all a network is: built from scratch with its own number of anchor sizes, it
    takes a training step at 64 px and predicts; its ImageNet weights are named in the torch hub cache."""
    from maskless.train.maskrcnn import ARCHS

    assert set(ARCHS) == {"maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "resnet18_fpn", "mobilenet_v3_fpn"}
    image = torch.rand(3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[0, 10:40, 12:44] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 44.0, 40.0]]), "labels": torch.tensor([1]), "masks": mask}
    for name, spec in ARCHS.items():
        model = build_model(["a"], **{**TINY, "arch": name, "min_size": 64, "max_size": 64,
                                      "anchor_sizes": [16, 32, 64, 128, 256][:spec.levels]})
        losses = model.train()([image], [target])
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        assert set(model.eval()([image])[0]) == {"boxes", "labels", "scores", "masks"}
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty cache: every entry's ImageNet file is named as missing
    try:
        for name, spec in ARCHS.items():
            with pytest.raises(FileNotFoundError, match=os.path.basename(spec.imagenet.url)):
                build_model(["a"], arch=name, weights="imagenet")
    finally:
        torch.hub.set_dir(hub)


def test_stop_signal_writes_stop_file(tmp_path):
    stop = str(tmp_path / STOP_FILE)
    before = signal.getsignal(signal.SIGINT)
    with _StopOnSignal(stop):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert storage.exists(stop)
    assert signal.getsignal(signal.SIGINT) is before


def _stop_when(out: str, step: int, done: threading.Event) -> None:
    while not done.is_set():
        if any(m["step"] >= step for m in read_metrics(out)):
            storage.write_bytes_atomic(storage.join(out, STOP_FILE), b"stop\n")
            return
        time.sleep(0.05)


def test_train_two_workers_interrupt_resume_predict_and_learn(ray_local, world_shards, tiny_world, tmp_path):
    data = _with_pseudo(world_shards["train"], str(tmp_path / "pseudo"))
    out = str(tmp_path / "run")
    cfg = TrainConfig(data=data, out=out, workers=2, batch_size=1, epochs=7, lr=0.01, warmup_iters=20,
                      clip_grad_norm=5.0, lr_steps=[6], log_every=1, loader_workers=0, hflip=0.5, **TINY)
    total = 7 * 9  # 18 images over 2 workers of 1 image: 9 steps an epoch

    # First run: stopped (as Ctrl-C or RUN/STOP does) after a few steps; it checkpoints where it stands.
    done = threading.Event()
    watcher = threading.Thread(target=_stop_when, args=(out, 3, done), daemon=True)
    watcher.start()
    first = run_train(cfg)
    done.set()
    k = first["step"]
    assert first["status"] == "interrupted" and 3 <= k < total
    assert not os.path.exists(os.path.join(out, "model.pt"))
    before = {m["step"]: m for m in read_metrics(out)}
    assert sorted(before) == list(range(1, k + 1))

    # Second run, same command: resumes at step k + 1 and finishes; steps 1..k are not redone.
    second = run_train(cfg)
    assert second["status"] == "finished" and second["step"] == total and second["epoch"] == 6
    history = read_metrics(out)
    assert [m["step"] for m in history] == list(range(1, total + 1))
    assert all(history[s - 1] == before[s] for s in range(1, k + 1))
    assert history[k]["lr"] == pytest.approx(learning_rate(cfg, k, k // 9, 9))
    assert all(m["workers"] == 2 and m["images_per_s"] > 0 for m in history)
    assert history[-1]["loss"] < history[0]["loss"]

    # The export: one file with the classes and config; predictions at each image's own size.
    model, classes, config = load_model(second["model"])
    assert classes == world_shards["classes"] and config["build"]["arch"] == "resnet18_fpn"
    val_ids = open(os.path.join(tiny_world, "ImageSets", "Segmentation", "val.txt")).read().split()
    images = [os.path.join(tiny_world, "JPEGImages", f"{i}.jpg") for i in val_ids[:3]]
    pred_out = str(tmp_path / "pred")
    summary = run_predict(PredictConfig(images=images, model=second["model"], out=pred_out, score_threshold=0.1))
    assert summary["images"] == summary["predicted"] == 3 and summary["instances"] > 0
    for path in images:
        name = os.path.splitext(os.path.basename(path))[0]
        record = json.load(open(os.path.join(pred_out, name + ".json")))
        w, h = Image.open(path).size
        assert (record["width"], record["height"]) == (w, h)
        for inst in record["instances"]:
            assert inst["class"] in classes and inst["score"] >= 0.1
            assert masks.decode(inst["mask"]).shape == (h, w)
        assert Image.open(os.path.join(pred_out, name + ".png")).size == (w, h)
    assert run_predict(PredictConfig(images=images, model=second["model"], out=pred_out))["skipped_done"] == 3

    # Trained on true masks, it must find the held-out objects far better than chance.
    gt = GroundTruth.from_shards(world_shards["val"])
    preds = predict_dataset(model, classes, world_shards["val"])
    assert preds and all(masks.decode(p["segmentation"]).shape == gt.sizes[gt.keys.index(p["image_id"])]
                         for p in preds)
    ours = evaluate(gt, preds, protocols=("voc",), thresholds=(0.5,))
    chance = evaluate(gt, chance_predictions(gt, classes, per_image=20), protocols=("voc",), thresholds=(0.5,))
    ap, ap_chance = ours.protocols["voc"].mean_ap[0], chance.protocols["voc"].mean_ap[0]
    abo, abo_chance = ours.abo()["mean_over_instances"], chance.abo()["mean_over_instances"]
    assert ap >= 0.1 and ap >= 10 * ap_chance, (ap, ap_chance)
    assert abo >= abo_chance + 0.15, (abo, abo_chance)

"""The relabel stage (train/relabel.py): its rules on a stand-in model whose detections are known (rule
replace: the model's masks of an image's own tags at the score threshold, the old pseudo instances of a tag
it does not find, nothing of an untagged class; rule add: every old instance plus what overlaps none; rule
split: a pseudo mask over two objects replaced by the model's two detections inside it),
and the stage on Ray: every sample once in units named after their input slice, a rerun redoing only a
missing unit, another model's output refused, bad input named."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from maskless.core import masks as rle
from maskless.core import shards
from maskless.core.units import plan_shard
from maskless.train.relabel import RelabelConfig, relabel_unit, run_relabel

CLASSES = ["disc", "bar", "star"]


def _jpg(h=32, w=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue()


def _box(y0, y1, x0, x1, h=32, w=32) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


class StandIn(torch.nn.Module):
    """Answers like torchvision's Mask R-CNN in eval mode: per image, boxes, labels (1-based), scores and
    soft masks (N, 1, H, W); here the same four detections for every image."""

    def __init__(self):
        super().__init__()
        self.dets = [(1, 0.9, _box(2, 12, 2, 12)),     # disc, confident
                     (1, 0.3, _box(20, 30, 20, 30)),   # disc, under the threshold
                     (2, 0.8, _box(0, 4, 0, 30)),      # bar, confident
                     (3, 0.95, _box(14, 18, 14, 18))]  # star, confident

    def forward(self, images):
        out = []
        for _ in images:
            labels, scores, masks = zip(*self.dets)
            out.append({"labels": torch.tensor(labels), "scores": torch.tensor(scores),
                        "masks": torch.tensor(np.stack(masks), dtype=torch.float32)[:, None] * 0.9,
                        "boxes": torch.zeros(len(labels), 4)})
        return out


def _sample(key, labels, old):
    inst = [{"class": c, "score": 1.0, "mask": rle.encode(m), "bbox": rle.bbox_xywh(rle.encode(m))} for c, m in old]
    return shards.Sample(key=key, jpg=_jpg(), meta={"labels": labels},
                         pseudo={"instances": inst, "rule": "response"})


def relabel(model, classes, src, dst, score, rule="replace"):
    """relabel_unit over every shard of src as one unit each (no Ray), then counts over all of dst (and the
    pseudo instances split, as the units' rows count them)."""
    cfg = RelabelConfig(data=src, model="stand-in", out=dst, rule=rule, score=score)
    split = 0
    for name in shards.shard_names(src):
        (unit,) = plan_shard(src, name, 100).units
        row = relabel_unit(model, classes, torch.device("cpu"), unit, cfg)
        assert row["error"] == ""
        split += row["split"]
    counts = {"images": 0, "instances": 0, "kept_old": 0, **({"split": split} if rule == "split" else {})}
    for s in shards.read_dataset(dst):
        counts["images"] += 1
        counts["instances"] += len(s.pseudo["instances"])
        counts["kept_old"] += sum(i["from"] == "pseudo" for i in s.pseudo["instances"])
    return counts


def test_relabel_keeps_tagged_confident_masks_and_old_masks_of_unfound_tags(tmp_path):
    src, dst = str(tmp_path / "pseudo"), str(tmp_path / "relabelled")
    old_square = _box(5, 25, 5, 25)
    with shards.ShardWriter(src, "part-000000") as w:
        w.write(_sample("a", ["disc", "bar"], [("disc", old_square)]))   # the model finds both tags
        w.write(_sample("b", ["disc"], [("disc", old_square)]))          # bar and star untagged: dropped
    with shards.ShardWriter(src, "part-000001") as w:
        w.write(_sample("c", ["bar", "star"], [("star", old_square)]))
    shards.write_dataset_info(src, CLASSES, stage="test")
    model = StandIn().eval()

    counts = relabel(model, CLASSES, src, dst, score=0.5)

    got = {s.key: s.pseudo["instances"] for s in shards.read_dataset(dst)}
    classes = {k: sorted(i["class"] for i in v) for k, v in got.items()}
    assert classes == {"a": ["bar", "disc"], "b": ["disc"], "c": ["bar", "star"]}
    disc = next(i for i in got["a"] if i["class"] == "disc")
    assert np.array_equal(rle.decode(disc["mask"]), _box(2, 12, 2, 12))  # the model's mask, not the old square
    assert disc["score"] == 0.9 and disc["bbox"] == [2.0, 2.0, 10.0, 10.0]
    assert counts == {"images": 3, "instances": 5, "kept_old": 0}

    # a tag the model misses keeps its old instance
    shards.delete_shard(dst, "part-000001_000000-000001")
    kept = os.stat(os.path.join(dst, "part-000000_000000-000002.tar")).st_mtime_ns
    model.dets = [d for d in model.dets if d[0] != 3]  # no star any more
    counts = relabel(model, CLASSES, src, dst, score=0.5)
    assert os.stat(os.path.join(dst, "part-000000_000000-000002.tar")).st_mtime_ns == kept  # only the deleted unit was redone
    assert counts == {"images": 3, "instances": 5, "kept_old": 1}
    c = {s.key: s.pseudo["instances"] for s in shards.read_dataset(dst)}["c"]
    star = next(i for i in c if i["class"] == "star")
    assert np.array_equal(rle.decode(star["mask"]), old_square) and star["score"] == 1.0


def test_relabel_add_keeps_every_old_instance_and_adds_only_what_overlaps_none(tmp_path):
    src, dst = str(tmp_path / "pseudo"), str(tmp_path / "added")
    with shards.ShardWriter(src, "part-000000") as w:
        # the old disc lies on the model's confident disc (IoU 100/121 = 0.83): not added again
        w.write(_sample("a", ["disc", "bar", "star"], [("disc", _box(2, 13, 2, 13))]))
    shards.write_dataset_info(src, CLASSES, stage="test")

    counts = relabel(StandIn().eval(), CLASSES, src, dst, score=0.5, rule="add")

    (s,) = list(shards.read_dataset(dst))
    got = sorted((i["class"], i["score"]) for i in s.pseudo["instances"])
    assert got == [("bar", 0.8), ("disc", 1.0), ("star", 0.95)]
    assert counts == {"images": 1, "instances": 3, "kept_old": 1}
    assert s.pseudo["rule"] == "response" and s.pseudo["relabel"]["rule"] == "add"


def test_relabel_split_replaces_a_mask_over_two_objects_by_the_two_detections_inside_it(tmp_path):
    src = str(tmp_path / "pseudo")
    pair, single = _box(2, 12, 2, 22), _box(20, 30, 20, 30)
    with shards.ShardWriter(src, "part-000000") as w:
        w.write(_sample("a", ["disc", "bar"], [("disc", pair), ("disc", single)]))
    shards.write_dataset_info(src, CLASSES, stage="test")
    model = StandIn().eval()
    model.dets = [(1, 0.9, _box(2, 12, 2, 12)),     # the pair's left disc: all of it inside the pair's mask
                  (1, 0.85, _box(2, 12, 12, 22)),   # its right disc
                  (1, 0.7, _box(2, 12, 2, 22)),     # the whole pair: IoU 0.5 with each half, not a third disc
                  (1, 0.9, _box(21, 30, 21, 30)),   # the single disc: one detection inside, the old mask stays
                  (2, 0.8, _box(14, 18, 0, 8)),     # a bar no pseudo mask has: added
                  (3, 0.95, _box(14, 18, 14, 18))]  # star: not a tag of the image

    counts = relabel(model, CLASSES, src, str(tmp_path / "split"), score=0.5, rule="split")

    (s,) = list(shards.read_dataset(str(tmp_path / "split")))
    got = sorted((i["class"], i["score"], i["from"], tuple(i["bbox"])) for i in s.pseudo["instances"])
    assert got == [("bar", 0.8, "model", (0.0, 14.0, 8.0, 4.0)),
                   ("disc", 0.85, "model", (12.0, 2.0, 10.0, 10.0)),
                   ("disc", 0.9, "model", (2.0, 2.0, 10.0, 10.0)),
                   ("disc", 1.0, "pseudo", (20.0, 20.0, 10.0, 10.0))]
    assert counts == {"images": 1, "instances": 4, "kept_old": 1, "split": 1}
    assert s.pseudo["relabel"] == {"model": "stand-in", "rule": "split", "score": 0.5, "split_inside": 0.8}

    # rule add on the same detections cannot mend the pair: each half overlaps its mask at IoU 0.5
    relabel(model, CLASSES, src, str(tmp_path / "add"), score=0.5, rule="add")
    (s,) = list(shards.read_dataset(str(tmp_path / "add")))
    assert sorted((i["class"], i["from"]) for i in s.pseudo["instances"]) == [
        ("bar", "model"), ("disc", "pseudo"), ("disc", "pseudo")]


def _export_untrained(path, classes):
    from maskless.train.maskrcnn import build_model, build_options, save_model

    torch.manual_seed(0)
    opts = dict(arch="resnet18_fpn", min_size=96, max_size=96, trainable_backbone_layers=None, anchor_sizes=None,
                norm=None, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10)
    save_model(path, build_model(classes, weights="none", **opts).state_dict(), classes, {"build": build_options(**opts)})


def test_relabel_stage_on_ray_every_sample_once_and_reruns_only_what_is_missing(ray_local, world_shards, tmp_path):
    """Pseudo-like input of 18 train samples in shards of 6, units of 4: 3 x 2 units (4 + 2) on 2 actors.
    Score 1.0: no detection can pass (scores are < 1), so the default rule (split, then add) keeps exactly
    the old instances."""
    src, out, model = world_shards["train"], str(tmp_path / "relabel"), str(tmp_path / "model.pt")
    _export_untrained(model, world_shards["classes"])
    cfg = RelabelConfig(data=src, model=model, out=out, score=1.0, unit_size=4, actors=2, actor_cpus=1)

    summary = run_relabel(cfg)

    names = shards.shard_names(src)
    assert shards.shard_names(out) == sorted(f"{n}_{a:06d}-{b:06d}" for n in names for a, b in ((0, 4), (4, 6)))
    assert summary["units"] == 6 and summary["samples"] == 18 and summary["added"] == 0 and summary["failed"] == {}
    before = {s.key: s for s in shards.read_dataset(src)}
    after = {s.key: s for s in shards.read_dataset(out)}
    assert sorted(after) == sorted(before)
    assert cfg.rule == "split"
    for key, s in after.items():  # split and add with nothing found: the pseudo instances, unchanged, marked as kept
        old = (before[key].pseudo or {}).get("instances", [])
        assert [i["mask"] for i in s.pseudo["instances"]] == [i["mask"] for i in old]
        assert {i["from"] for i in s.pseudo["instances"]} <= {"pseudo"} and s.jpg == before[key].jpg

    # a lost unit is redone, alone
    kept = {n: os.stat(os.path.join(out, n + ".tar")).st_mtime_ns for n in shards.shard_names(out)}
    lost = shards.shard_names(out)[1]
    shards.delete_shard(out, lost)
    again = run_relabel(cfg)
    assert again["skipped"] == 5 and again["images"] == 2
    assert all(os.stat(os.path.join(out, n + ".tar")).st_mtime_ns == t for n, t in kept.items() if n != lost)

    # another model: its units would be mixed with this one's, refused
    _export_untrained(str(tmp_path / "other.pt"), world_shards["classes"])
    with open(tmp_path / "other.pt", "ab") as f:
        f.write(b"\0")  # another file, another digest
    with pytest.raises(ValueError, match="model_sha256"):
        run_relabel(RelabelConfig(**{**cfg.__dict__, "model": str(tmp_path / "other.pt")}))
    # another rule (or score) on the same model: refused too, naming what differs
    with pytest.raises(ValueError, match="rule split, this run has add"):
        run_relabel(RelabelConfig(**{**cfg.__dict__, "rule": "add"}))
    with pytest.raises(ValueError, match="score 1.0, this run has 0.9"):
        run_relabel(RelabelConfig(**{**cfg.__dict__, "score": 0.9}))


def test_relabel_bad_input(tmp_path, world_shards):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_relabel(RelabelConfig(data=world_shards["train"], model=str(tmp_path / "none.pt"), out=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        os.makedirs(tmp_path / "unfinished")
        run_relabel(RelabelConfig(data=str(tmp_path / "unfinished"), model="m.pt", out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="--rule"):
        run_relabel(RelabelConfig(data=world_shards["train"], model="m.pt", out=str(tmp_path / "o"), rule="swap"))
    with pytest.raises(ValueError, match="--split-inside"):
        run_relabel(RelabelConfig(data=world_shards["train"], model="m.pt", out=str(tmp_path / "o"), rule="split",
                                  split_inside=0.0))
    with pytest.raises(ValueError, match="--out must differ"):
        run_relabel(RelabelConfig(data=world_shards["train"], model="m.pt", out=world_shards["train"]))


def test_relabel_unreadable_image_fails_its_unit_only_and_the_cli_says_which(ray_local, world_shards, tmp_path, capsys):
    from maskless.cli import main
    from maskless.core import errors

    src, model = str(tmp_path / "pseudo"), str(tmp_path / "model.pt")
    _export_untrained(model, world_shards["classes"])
    samples = list(shards.read_dataset(world_shards["train"]))[:8]
    samples[5].jpg = b"not a jpeg"
    for i, name in enumerate(("part-000000", "part-000001")):
        with shards.ShardWriter(src, name) as w:
            for s in samples[4 * i:4 * i + 4]:
                w.write(s)
    shards.write_dataset_info(src, world_shards["classes"], stage="test")
    out = str(tmp_path / "relabel")
    with pytest.raises(errors.IncompleteRun, match=r"part-000001_000000-000004.*not a readable image"):
        run_relabel(RelabelConfig(data=src, model=model, out=out, score=1.0, actors=1, actor_cpus=1))
    assert shards.shard_names(out) == ["part-000000_000000-000004"]  # the good unit is committed
    assert main(["relabel", "--data", src, "--model", model, "--out", out, "--score", "1.0", "--actors", "1"]) == 2
    err = capsys.readouterr().err
    assert "part-000001_000000-000004" in err and samples[5].key in err and "Traceback" not in err

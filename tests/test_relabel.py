"""bench.relabel's rule: the weak model's masks of an image's own tags at the score threshold, the old pseudo
instances of a tag the model does not find, nothing of an untagged class; a rerun keeps finished shards."""
import io
import os

import numpy as np
import torch
from PIL import Image

from bench.relabel import relabel
from maskless.core import masks as rle
from maskless.core import shards

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
    assert disc["score"] == np.float32(0.9) and disc["bbox"] == [2.0, 2.0, 10.0, 10.0]
    assert counts == {"images": 3, "instances": 5, "kept_old": 0}
    assert shards.read_dataset_info(dst)["classes"] == CLASSES

    # a tag the model misses keeps its old instance; a threshold above every score keeps only old ones
    shards.delete_shard(dst, "part-000001")
    kept = os.stat(os.path.join(dst, "part-000000.tar")).st_mtime_ns
    model.dets = [d for d in model.dets if d[0] != 3]  # no star any more
    counts = relabel(model, CLASSES, src, dst, score=0.5)
    assert os.stat(os.path.join(dst, "part-000000.tar")).st_mtime_ns == kept  # only the deleted shard was redone
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
    assert got == [("bar", np.float32(0.8)), ("disc", 1.0), ("star", np.float32(0.95))]
    assert counts == {"images": 1, "instances": 3, "kept_old": 1}
    assert s.pseudo["rule"] == "relabel-add:weak>=0.5"

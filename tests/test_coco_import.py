"""COCO import: a tiny generated COCO file round-trips through the shard format."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskless.core import masks, shards
from maskless.ingest.coco import import_coco


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros), written by hand."""
    flat = m.astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(m.shape), "counts": counts}


@pytest.fixture
def tiny_coco(tmp_path):
    h, w = 48, 64
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    files = {}
    for i, name in [(7, "a.jpg"), (3, "b.jpg"), (12, "c.png")]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        img.save(images_dir / name, "PNG" if name.endswith("png") else "JPEG")
        files[i] = name
    blob = np.zeros((h, w), bool)
    blob[5:20, 30:50] = True
    blob[20:25, 30:35] = True
    crowd = np.zeros((h, w), bool)
    crowd[30:45, 2:60] = True
    comp = np.zeros((h, w), bool)
    comp[10:40, 10:20] = True
    compressed = mask_utils.encode(np.asfortranarray(comp.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 20, 2, 20, 15, 2, 15]]},
        {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 0, "segmentation": uncompressed_rle(blob)},
        {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1, "segmentation": uncompressed_rle(crowd)},
        {"id": 4, "image_id": 3, "category_id": 3, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": compressed["counts"]}},
    ]
    coco = {"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n in files.items()],
            "annotations": anns, "categories": [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]}
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps(coco))
    return {"ann": str(ann_path), "images": str(images_dir), "blob": blob, "crowd": crowd, "comp": comp,
            "coco": coco}


def test_coco_round_trip(tiny_coco, tmp_path):
    out = str(tmp_path / "out")
    result = import_coco(tiny_coco["ann"], tiny_coco["images"], out, shard_size=2)
    assert result["images"] == 3 and result["classes"] == ["cat", "dog"] and result["shards_written"] == 2
    got = {s.key: s for s in shards.read_dataset(out)}
    assert list(got) == ["coco_000000000003", "coco_000000000007", "coco_000000000012"]

    a = got["coco_000000000007"]
    assert a.labels == ["cat", "dog"] and a.meta["source_id"] == 7
    with open(os.path.join(tiny_coco["images"], "a.jpg"), "rb") as f:
        assert a.jpg == f.read()  # JPEG files are stored as they are
    inst = {i["coco_id"]: i for i in a.gt["instances"]}
    assert set(inst) == {1, 2}  # the crowd annotation is no instance...
    assert np.array_equal(masks.decode(a.gt["void"]), tiny_coco["crowd"])  # ...but the void region
    assert np.array_equal(masks.decode(inst[2]["mask"]), tiny_coco["blob"]) and inst[2]["class"] == "dog"
    poly = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[2, 2, 20, 2, 20, 15, 2, 15]], 48, 64)))
    assert np.array_equal(masks.decode(inst[1]["mask"]), poly.astype(bool)) and inst[1]["class"] == "cat"
    assert inst[1]["bbox"] == masks.bbox_xywh(inst[1]["mask"])

    b = got["coco_000000000003"]
    assert b.labels == ["dog"] and b.gt["void"] is None
    assert np.array_equal(masks.decode(b.gt["instances"][0]["mask"]), tiny_coco["comp"])

    c = got["coco_000000000012"]  # a PNG without annotations: stored as JPEG, empty ground truth
    assert c.labels == [] and c.gt == {"instances": [], "void": None}
    assert Image.open(io.BytesIO(c.jpg)).format == "JPEG" and c.image().size == (64, 48)

    manifest = shards.read_manifest(out).to_pylist()
    assert sorted((r["key"], r["gt_instances"]) for r in manifest) == [
        ("coco_000000000003", 1), ("coco_000000000007", 2), ("coco_000000000012", 0)]
    info = shards.read_dataset_info(out)
    assert info["stage"] == "import-coco" and info["samples"] == 3

    again = import_coco(tiny_coco["ann"], tiny_coco["images"], out, shard_size=2)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 2 and again["images"] == 3


def test_coco_bad_inputs_are_clear(tiny_coco, tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file"):
        import_coco(str(tmp_path / "nope.json"), tiny_coco["images"], str(tmp_path / "o1"))
    coco = dict(tiny_coco["coco"])
    coco["images"] = coco["images"] + [{"id": 99, "file_name": "gone.jpg", "width": 64, "height": 48}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(shards.InvalidSample, match="image 99 .gone.jpg.*--skip-invalid"):  # a ValueError: exit 2
        import_coco(str(bad), tiny_coco["images"], str(tmp_path / "o2"), shard_size=10)
    assert shards.shard_names(str(tmp_path / "o2")) == []  # the failed shard left nothing that reads as complete
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        import_coco(str(bad), tiny_coco["images"], str(tmp_path / "o3"))

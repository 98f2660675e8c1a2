"""Malformed datasets, as a careless provider or an attacker gives them: every failure is exit 2 naming
the file and the image id and what to do, without a traceback; nothing already committed is lost;
broken ground truth is never stored."""
import errno
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskless.cli import main
from maskless.core import masks, shards
from maskless.ingest.coco import rle_counts
from maskless.ingest.world import make_world


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_world")
    make_world(str(root), classes=2, images=6, seed=1, size=64)
    return str(root)


@pytest.fixture
def voc(small_world, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(small_world, root)
    (root / "all.txt").write_text("".join(f"world_{i:06d}\n" for i in range(6)))  # masks or labels only
    return root


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def import_voc_cli(capsys, root, out, *extra):
    return run_cli(capsys, "import", "voc", str(root), "--split", str(root / "all.txt"), "--out", str(out),
                   "--shard-size", "2", *extra)


def labels_only(root, image_id):
    """Make an image a labels-only one (no masks): its XML annotation is then what is read."""
    (root / "SegmentationObject" / f"{image_id}.png").unlink()
    (root / "SegmentationClass" / f"{image_id}.png").unlink()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<annotation><object><name>&lol4;</name></object></annotation>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE a [<!ENTITY secret SYSTEM "file:///etc/hostname">]>
<annotation><object><name>&secret;</name></object></annotation>"""


@pytest.mark.parametrize("xml, says", [
    (b"this is not xml <<<", "not well-formed XML"),
    (BILLION_LAUGHS, "declares a DTD or entities"),
    (XXE, "declares a DTD or entities"),
    (b"<annotation><object><pose>Left</pose></object></annotation>", "object 1 of"),
    (b"<annotation><object><name>unicorn</name></object></annotation>", "unknown classes ['unicorn']"),
])
def test_bad_voc_annotations_are_exit_2_with_the_file_and_the_id(voc, tmp_path, capsys, xml, says):
    labels_only(voc, "world_000003")
    (voc / "Annotations" / "world_000003.xml").write_bytes(xml)
    rc, err = import_voc_cli(capsys, voc, tmp_path / "out")
    assert rc == 2 and says in err and "image world_000003" in err and "world_000003.xml" in err, err
    assert "--skip-invalid" in err
    assert shards.shard_names(str(tmp_path / "out")) == ["all-000000"]  # the shard before it is committed


def test_a_broken_or_truncated_image_is_refused_or_skipped_and_counted(voc, tmp_path, capsys):
    jpg = voc / "JPEGImages" / "world_000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # header intact: opens, does not decode
    broken = voc / "JPEGImages" / "world_000005.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0garbage" + broken.read_bytes()[40:])  # a broken header
    out = tmp_path / "out"
    rc, err = import_voc_cli(capsys, voc, out)
    assert rc == 2 and "image world_000002" in err and "world_000002.jpg is not a readable image" in err, err
    assert shards.shard_names(str(out)) == ["all-000000"] and not (out / "dataset.json").exists()
    rc, err = import_voc_cli(capsys, voc, out, "--skip-invalid")
    assert rc == 0
    info = shards.read_dataset_info(str(out))
    assert info["samples"] == 4 and info["skipped"] == {"bad_image": 2}
    assert sorted(s.meta["source_id"] for s in shards.read_dataset(str(out))) == [
        "world_000000", "world_000001", "world_000003", "world_000004"]
    stats = {st["shard"]: st for st in shards.read_stats(str(out))}
    assert any("world_000005" in m for m in stats["all-000002"]["skipped_items"])


def test_masks_are_decoded_at_import(voc, tmp_path, capsys):
    png = voc / "SegmentationObject" / "world_000004.png"
    png.write_bytes(png.read_bytes()[:60])
    rc, err = import_voc_cli(capsys, voc, tmp_path / "out")
    assert rc == 2 and "image world_000004" in err and "SegmentationObject" in err and "PNG mask" in err, err


def test_disk_full_during_import_keeps_finished_shards_and_a_rerun_finishes(voc, tmp_path, capsys, monkeypatch):
    """ENOSPC simulated where the shard's tar is written (the tar member writes of the third shard)."""
    out = tmp_path / "out"
    real_addfile, calls = tarfile.TarFile.addfile, []

    def addfile(self, info, fileobj=None):
        calls.append(info.name)
        if info.name.startswith("world_000004"):  # the first sample of the third shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_addfile(self, info, fileobj)
    monkeypatch.setattr(tarfile.TarFile, "addfile", addfile)
    rc, err = import_voc_cli(capsys, voc, out)
    assert rc == 2, err
    assert "no space left on device writing shard all-000002" in err and "image world_000004" in err
    assert "free space and rerun the same command" in err
    done = {n: os.stat(out / f"{n}.tar").st_mtime_ns for n in shards.shard_names(str(out))}
    assert sorted(done) == ["all-000000", "all-000001"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the aborted shard left nothing
    monkeypatch.setattr(tarfile.TarFile, "addfile", real_addfile)
    rc, _ = import_voc_cli(capsys, voc, out)
    assert rc == 0 and len(list(shards.read_dataset(str(out)))) == 6
    assert all(os.stat(out / f"{n}.tar").st_mtime_ns == t for n, t in done.items())  # not redone


# ---------------------------------------------------------------- COCO

H, W = 40, 50


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / name)
    square = [5, 5, 30, 5, 30, 30, 5, 30]
    doc = {"images": [{"id": i, "file_name": n, "width": W, "height": H} for i, n in ((1, "a.jpg"), (2, "b.jpg"),
                                                                                      (3, "c.jpg"))],
           "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1, "iscrowd": 0, "segmentation": [square]}
                           for i in (1, 2, 3)],
           "categories": [{"id": 1, "name": "thing"}]}

    def write(**changes):
        d = json.loads(json.dumps(doc))
        for k, v in changes.items():
            d[k] = v(d[k]) if callable(v) else v
        path = tmp_path / "instances.json"
        path.write_text(json.dumps(d))
        return str(path)
    return write, str(images), doc


def import_coco_cli(capsys, ann, images, out, *extra):
    return run_cli(capsys, "import", "coco", ann, images, "--out", str(out), "--shard-size", "1", *extra)


def with_segmentation(segm, image_id=2):
    def change(anns):
        for a in anns:
            if a["image_id"] == image_id:
                a["segmentation"] = segm
        return anns
    return change


@pytest.mark.parametrize("segm, says", [
    ([[5, 5]], "polygon 0 has 2 coordinates"),              # one point: pycocotools fails cryptically
    ([[5, 5, 30, 30]], "polygon 0 has 4 coordinates"),      # two points: pycocotools reads a box
    ([[5, 5, 30, 5, 30, 30, 5]], "polygon 0 has 7 coordinates"),
    ({"size": [H, W], "counts": "0"}, "do not decode to a 40x50 mask"),  # decoded to uninitialised memory
    ({"size": [H, W], "counts": "garbage!!"}, "not in COCO's RLE alphabet"),
    ({"size": [H, W], "counts": [100, 5]}, "summing to 2000"),
    ({"size": [H + 1, W], "counts": "PPPPP"}, "differs from the image's 40x50"),
])
def test_malformed_coco_masks_are_exit_2_naming_image_and_annotation(coco, tmp_path, capsys, segm, says):
    write, images, _ = coco
    ann = write(annotations=with_segmentation(segm))
    rc, err = import_coco_cli(capsys, ann, images, tmp_path / "out")
    assert rc == 2 and says in err and "image 2 (b.jpg)" in err and "annotation 12" in err, err
    assert shards.shard_names(str(tmp_path / "out")) == ["coco-000000"]  # image 1 is kept
    rc, err = import_coco_cli(capsys, ann, images, tmp_path / "out", "--skip-invalid")
    info = shards.read_dataset_info(str(tmp_path / "out"))
    assert rc == 0 and info["samples"] == 2 and info["skipped"] == {"bad_annotation": 1}


def test_polygons_outside_the_image_are_dropped_and_counted(coco, tmp_path, capsys):
    write, images, _ = coco
    ann = write(annotations=with_segmentation([[100, 100, 120, 100, 120, 120]]))  # all outside 50x40
    rc, _ = import_coco_cli(capsys, ann, images, tmp_path / "out")
    got = {s.meta["source_id"]: s for s in shards.read_dataset(str(tmp_path / "out"))}
    assert rc == 0 and got[2].gt["instances"] == [] and len(got[1].gt["instances"]) == 1
    assert shards.read_dataset_info(str(tmp_path / "out"))["dropped_instances"] == {"empty": 1}


def test_file_names_outside_the_image_folder_are_refused_before_anything_is_read(coco, tmp_path, capsys,
                                                                                  monkeypatch):
    from maskless.core import storage

    write, images, _ = coco
    read = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri: read.append(uri) or real(uri))
    for name in ("/etc/hostname", "../instances.json", "x/../../instances.json", "s3://bucket/a.jpg"):
        ann = write(images=lambda imgs, n=name: imgs[:2] + [{**imgs[2], "file_name": n}])
        read.clear()
        rc, err = import_coco_cli(capsys, ann, images, tmp_path / "out", "--skip-invalid")
        assert rc == 2 and f"image 3: file_name {name!r}" in err and "refused" in err, err
        assert read == [ann] and shards.shard_names(str(tmp_path / "out")) == []  # only the annotation file


def test_a_truncated_coco_image_is_refused(coco, tmp_path, capsys):
    write, images, _ = coco
    path = os.path.join(images, "c.jpg")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    rc, err = import_coco_cli(capsys, write(), images, tmp_path / "out")
    assert rc == 2 and "image 3 (c.jpg)" in err and "not a readable image" in err, err
    assert shards.shard_names(str(tmp_path / "out")) == ["coco-000000", "coco-000001"]


def test_rle_counts_reads_what_pycocotools_writes():
    """Against run lengths counted by hand (column-major, starting with background)."""
    rng = np.random.default_rng(1)
    for t in range(100):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = rng.random((h, w)) < rng.random()
        flat = m.flatten(order="F")
        edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        if flat[0]:
            runs = [0] + runs
        assert rle_counts(masks.encode(m)["counts"].encode()) == runs
    with pytest.raises(ValueError, match="alphabet"):
        rle_counts(b"\x01")
    assert sum(rle_counts(mask_utils.encode(np.asfortranarray(np.ones((7, 9), np.uint8)))["counts"])) == 63

"""The shard format round-trips through our reader, webdataset, Ray Data and pyarrow; writes are atomic."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from maskless.core import masks, shards
from maskless.ingest.voc import import_voc


def test_voc_import_round_trips_instances_exactly(tiny_world, world_shards):
    from PIL import Image

    samples = list(shards.read_dataset(world_shards["train"]))
    assert len(samples) == 18
    info = shards.read_dataset_info(world_shards["train"])
    assert info["classes"] == ["disc", "square", "triangle"] and info["samples"] == 18
    for s in samples:
        obj = np.array(Image.open(os.path.join(tiny_world, "SegmentationObject", s.key + ".png")))
        cls = np.array(Image.open(os.path.join(tiny_world, "SegmentationClass", s.key + ".png")))
        assert s.jpg == open(os.path.join(tiny_world, "JPEGImages", s.key + ".jpg"), "rb").read()
        ids = [i for i in np.unique(obj) if i not in (0, 255)]
        assert [i["voc_id"] for i in s.gt["instances"]] == ids
        for inst in s.gt["instances"]:
            m = masks.decode(inst["mask"])
            assert np.array_equal(m, obj == inst["voc_id"])
            assert inst["class"] == info["classes"][np.unique(cls[m])[0] - 1]
        assert np.array_equal(masks.decode(s.gt["void"]), obj == 255)
        assert s.labels == sorted({i["class"] for i in s.gt["instances"]}, key=info["classes"].index)


def test_shards_read_with_webdataset_ray_and_pyarrow(world_shards, ray_local):
    root = world_shards["val"]
    paths = shards.list_shards(root)
    keys = [s.key for s in shards.read_dataset(root)]
    recs = list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in recs] == keys
    assert all({"jpg", "json", "gt.json"} <= set(r) for r in recs)
    assert json.loads(recs[0]["json"])["labels"]
    rows = ray_local.data.read_webdataset(paths).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(keys)
    assert rows[0]["jpg"].ndim == 3  # Ray decodes the jpg column to HWC arrays
    table = pq.read_table(paths[0].replace(".tar", ".parquet"))
    assert table.num_rows == json.load(open(paths[0].replace(".tar", ".stats.json")))["count"]
    manifest = shards.read_manifest(root)
    assert manifest.column("key").to_pylist() == keys
    assert all(n > 0 for n in manifest.column("gt_instances").to_pylist())


def _sample(key: str) -> shards.Sample:
    return shards.Sample(key=key, jpg=b"\xff\xd8fake", meta={"labels": ["a"], "width": 1, "height": 1})


def test_killed_writer_leaves_no_shard_that_reads_complete(tmp_path):
    root = str(tmp_path / "ds")
    script = textwrap.dedent(f"""
        import os, signal
        from maskless.core import shards
        w = shards.ShardWriter({root!r}, "part-000000")
        for i in range(50):
            w.write(shards.Sample(key=f"k{{i}}", jpg=os.urandom(20000), meta={{"labels": ["a"]}}))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -9
    assert shards.list_shards(root) == []
    assert any(n.endswith(".tmp") for n in os.listdir(root))  # the half-written tar is hidden
    assert list(shards.read_dataset(root)) == []
    # a rerun cleans the leftovers and writes the shard whole
    from maskless.core import storage
    assert storage.remove_stale_temps(root) == 1
    shards.write_shards([_sample(f"k{i}") for i in range(3)], root, "part")
    assert [s.key for s in shards.read_dataset(root)] == ["k0", "k1", "k2"]


def test_writer_aborts_on_error_and_rejects_bad_keys(tmp_path):
    root = str(tmp_path / "ds")
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(root, "s-000000") as w:
            w.write(_sample("a"))
            raise RuntimeError("boom")
    assert shards.list_shards(root) == [] and os.listdir(root) == []
    with shards.ShardWriter(root, "s-000001") as w:
        with pytest.raises(ValueError, match="letters"):
            w.write(_sample("has.dot"))
        w.write(_sample("ok"))
        with pytest.raises(ValueError, match="duplicate"):
            w.write(_sample("ok"))
    assert [s.key for s in shards.read_dataset(root)] == ["ok"]
    with pytest.raises(ValueError, match="shard name"):
        shards.ShardWriter(root, "bad name")
    with pytest.raises(FileNotFoundError, match="not a finished maskless dataset"):
        shards.read_dataset_info(root)


def test_file_uri_and_import_resume(tiny_world, tmp_path):
    out = "file://" + str(tmp_path / "uri")
    first = import_voc(tiny_world, out, split="val", shard_size=4)
    assert first["shards_written"] == 2
    again = import_voc(tiny_world, out, split="val", shard_size=4)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 2
    assert len(list(shards.read_dataset(out))) == 6
    with pytest.raises(FileNotFoundError, match="split 'nope'"):
        import_voc(tiny_world, str(tmp_path / "x"), split="nope")
    with pytest.raises(FileNotFoundError, match="not a VOC folder"):
        import_voc(str(tmp_path), str(tmp_path / "y"))


def test_voc_import_of_an_id_list_takes_labels_from_xml_for_unsegmented_images(tiny_world, tmp_path):
    """train_aug-style lists name images that have XML annotations but no masks."""
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(tiny_world, root)
    (root / "SegmentationObject" / "world_000001.png").unlink()
    ids = tmp_path / "my list.txt"
    ids.write_text("world_000000\nworld_000001\n")
    out = str(tmp_path / "labels")
    import_voc(str(root), out, split=str(ids))
    a, b = list(shards.read_dataset(out))
    assert shards.shard_names(out) == ["my_list-000000"]
    assert a.gt is not None and b.gt is None
    from xml.etree import ElementTree as ET
    names = {o.findtext("name") for o in ET.parse(root / "Annotations" / "world_000001.xml").getroot().iter("object")}
    assert set(b.labels) == names and b.labels


def test_run_folder_is_continued_by_the_same_run_and_refused_to_another(tmp_path):
    from maskless.core.run_folder import claim_run_folder

    path = str(tmp_path / "run" / "run.json")
    claim_run_folder(path, "train", {"arch": "a", "lr": 0.1}, ("arch",), ["x"])
    claim_run_folder(path, "train", {"arch": "a", "lr": 0.5}, ("arch",), ["x"])  # lr may change
    with pytest.raises(ValueError, match="holds a train run with different arch"):
        claim_run_folder(path, "train", {"arch": "b", "lr": 0.1}, ("arch",), ["x"])
    with pytest.raises(ValueError, match="different classes"):
        claim_run_folder(path, "train", {"arch": "a", "lr": 0.1}, ("arch",), ["x", "y"])
    assert json.load(open(path))["config"] == {"arch": "a", "lr": 0.1}

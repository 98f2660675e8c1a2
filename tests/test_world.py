"""The synthetic world is valid PASCAL VOC and as hard as promised."""
import os
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from maskless.ingest.world import VOID, make_world, voc_palette


def _ids(root, split):
    with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def test_world_files_follow_voc_format(tiny_world):
    root = tiny_world
    train, val = _ids(root, "train"), _ids(root, "val")
    assert len(train) == 18 and len(val) == 6 and not set(train) & set(val)
    names = open(os.path.join(root, "classes.txt")).read().split()
    assert names == ["disc", "square", "triangle"]
    palette = voc_palette()
    for image_id in train + val:
        jpg = Image.open(os.path.join(root, "JPEGImages", image_id + ".jpg"))
        obj_im = Image.open(os.path.join(root, "SegmentationObject", image_id + ".png"))
        cls_im = Image.open(os.path.join(root, "SegmentationClass", image_id + ".png"))
        assert jpg.format == "JPEG" and jpg.mode == "RGB"
        assert obj_im.mode == "P" and cls_im.mode == "P"
        assert obj_im.getpalette()[:768] == palette and cls_im.getpalette()[:768] == palette
        obj, cls = np.array(obj_im), np.array(cls_im)
        assert obj.shape == cls.shape == (jpg.height, jpg.width)
        # 255 marks the same void pixels in both maps, and lies on instance borders
        assert np.array_equal(obj == VOID, cls == VOID)
        void = obj == VOID
        assert void.any()
        inst_ids = [i for i in np.unique(obj) if i not in (0, VOID)]
        assert inst_ids == list(range(1, len(inst_ids) + 1))
        # each void region (borders, nearly hidden slivers) touches an instance
        grown = ndimage.binary_dilation(np.isin(obj, inst_ids), np.ones((3, 3)))
        regions, n = ndimage.label(void, np.ones((3, 3)))
        assert all((grown & (regions == r)).any() for r in range(1, n + 1))
        # every instance has exactly one class, and background is background in both maps
        assert np.array_equal(obj == 0, cls == 0)
        boxes = ET.parse(os.path.join(root, "Annotations", image_id + ".xml")).findall("object")
        assert len(boxes) == len(inst_ids)
        for inst_id, box in zip(inst_ids, boxes):
            classes = np.unique(cls[obj == inst_id])
            assert len(classes) == 1 and 1 <= classes[0] <= 3
            assert box.find("name").text == names[classes[0] - 1]
            ys, xs = np.nonzero(obj == inst_id)
            b = box.find("bndbox")
            x1, y1, x2, y2 = (int(b.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
            # The XML box (1-based, inclusive, as VOC writes it) is the box of the instance's pixels.
            assert (x1 - 1, y1 - 1, x2 - 1, y2 - 1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_world_has_touching_same_class_instances(tiny_world):
    """A method that only finds blobs must fail: same-class instances merge into one component."""
    root = tiny_world
    merged = 0
    for image_id in _ids(root, "trainval"):
        obj = np.array(Image.open(os.path.join(root, "SegmentationObject", image_id + ".png")))
        cls = np.array(Image.open(os.path.join(root, "SegmentationClass", image_id + ".png")))
        for c in np.unique(cls):
            if c in (0, VOID):
                continue
            # a class region with its void borders filled in, as a blob finder would see it
            region = ndimage.binary_closing((cls == c) | ((obj == VOID) & ndimage.binary_dilation(cls == c)))
            labels, n_blobs = ndimage.label(region)
            n_inst = len(np.unique(obj[cls == c]))
            merged += max(0, n_inst - n_blobs)
    assert merged >= 3


def _files(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names if n != "world.json"}


def test_world_is_deterministic_and_validates_arguments(tmp_path):
    a = make_world(str(tmp_path / "a"), classes=2, images=4, seed=5, size=64)
    b = make_world(str(tmp_path / "b"), classes=2, images=4, seed=5, size=64)
    c = make_world(str(tmp_path / "c"), classes=2, images=4, seed=6, size=64)
    same_seed, other_seed = _files(tmp_path / "a"), _files(tmp_path / "c")
    assert same_seed == _files(tmp_path / "b")  # every image, mask, box and split list, byte for byte
    assert {k: v for k, v in a.items() if k != "root"} == {k: v for k, v in b.items() if k != "root"}
    # another seed draws another world: same files, none of its images or object maps the same
    assert set(other_seed) == set(same_seed) and c["seed"] == 6
    drawn = [k for k in same_seed if k.startswith(("JPEGImages", "SegmentationObject"))]
    assert len(drawn) == 8 and all(other_seed[k] != same_seed[k] for k in drawn)
    with pytest.raises(ValueError, match="classes"):
        make_world(str(tmp_path / "d"), classes=99)
    with pytest.raises(ValueError, match="at least 2 images"):
        make_world(str(tmp_path / "d"), images=1)

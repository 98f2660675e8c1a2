"""PASCAL VOC (and the synthetic world, which uses VOC's layout) -> maskless shards with ground truth.

Instances come from SegmentationObject: every id other than 0 (background) and 255 (void) is one
instance; its class is read from SegmentationClass under the same pixels. Void pixels belong to no
instance and are kept as one `void` RLE per image, so evaluation can apply either void rule.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re

import numpy as np
from PIL import Image

from maskless.core import masks, shards
from maskless.core.units import SHARD_SIZE
from maskless.ingest.world import VOID

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def find_voc_root(root: str) -> str:
    """Accept VOCdevkit/VOC2012 itself, VOCdevkit, or the folder above it."""
    for cand in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")) and os.path.isdir(os.path.join(cand, "SegmentationObject")):
            return cand
    raise FileNotFoundError(f"{root} is not a VOC folder: expected JPEGImages/ and SegmentationObject/ "
                            f"in it, in VOC2012/ or in VOCdevkit/VOC2012/")


def voc_class_names(root: str) -> list[str]:
    """classes.txt when the folder has one (the world), else VOC 2012's 20 classes."""
    path = os.path.join(root, "classes.txt")
    if os.path.exists(path):
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    return list(VOC_CLASSES)


def split_ids(root: str, split: str) -> list[str]:
    """Image ids of a split: a name in ImageSets/Segmentation (train, val, ...), 'all' (every segmented
    image), or the path of an id-list file (e.g. train_aug, whose images have labels but no masks)."""
    if os.path.isfile(split):
        with open(split) as f:
            return [line.split()[0] for line in f if line.strip()]
    if split == "all":
        return sorted(n[:-4] for n in os.listdir(os.path.join(root, "SegmentationObject")) if n.endswith(".png"))
    path = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.exists(path):
        have = sorted(n[:-4] for n in os.listdir(os.path.join(root, "ImageSets", "Segmentation")) if n.endswith(".txt")) \
            if os.path.isdir(os.path.join(root, "ImageSets", "Segmentation")) else []
        raise FileNotFoundError(f"split {split!r} not found ({path}); available: {', '.join(have) or 'none'}, or 'all'")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def read_instances(object_png: np.ndarray, class_png: np.ndarray, class_names: list[str]) -> dict:
    """gt.json content from a SegmentationObject/SegmentationClass pair (palette indices)."""
    if object_png.shape != class_png.shape:
        raise ValueError(f"object map {object_png.shape} and class map {class_png.shape} differ in size")
    instances = []
    for obj_id in np.unique(object_png):
        if obj_id in (0, VOID):
            continue
        m = object_png == obj_id
        cls_values = class_png[m]
        cls_values = cls_values[(cls_values != 0) & (cls_values != VOID)]
        if cls_values.size == 0:
            raise ValueError(f"instance {obj_id} has no class in SegmentationClass")
        c = int(np.bincount(cls_values).argmax())
        if not 1 <= c <= len(class_names):
            raise ValueError(f"class index {c} of instance {obj_id} is outside 1..{len(class_names)}")
        rle = masks.encode(m)
        instances.append({"class": class_names[c - 1], "score": 1.0, "mask": rle, "bbox": masks.bbox_xywh(rle),
                          "voc_id": int(obj_id)})
    void = object_png == VOID
    return {"instances": instances, "void": masks.encode(void) if void.any() else None}


def xml_labels(root: str, image_id: str, class_names: list[str]) -> list[str]:
    """Image-level labels from Annotations/ID.xml (for images without segmentation masks)."""
    from xml.etree import ElementTree as ET

    path = os.path.join(root, "Annotations", image_id + ".xml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{image_id}: neither SegmentationObject/{image_id}.png nor {path} exists")
    names = {o.findtext("name").strip() for o in ET.parse(path).getroot().iter("object")}
    unknown = names - set(class_names)
    if unknown:
        raise ValueError(f"{path}: unknown classes {sorted(unknown)}")
    return sorted(names, key=class_names.index)


def read_sample(root: str, image_id: str, class_names: list[str]) -> shards.Sample:
    """One image with its ground-truth instances, or with XML labels only when it has no masks."""
    with open(os.path.join(root, "JPEGImages", image_id + ".jpg"), "rb") as f:
        jpg = f.read()
    with Image.open(os.path.join(root, "JPEGImages", image_id + ".jpg")) as im:
        width, height = im.size
    meta = {"width": width, "height": height, "sha256": hashlib.sha256(jpg).hexdigest(),
            "engine": "voc", "source_id": image_id, "url": None, "query": None}
    key = image_id.replace(".", "_")
    if not os.path.exists(os.path.join(root, "SegmentationObject", image_id + ".png")):
        return shards.Sample(key=key, jpg=jpg, meta={"labels": xml_labels(root, image_id, class_names), **meta})
    obj = np.array(Image.open(os.path.join(root, "SegmentationObject", image_id + ".png")))
    cls = np.array(Image.open(os.path.join(root, "SegmentationClass", image_id + ".png")))
    if obj.ndim != 2 or cls.ndim != 2:
        raise ValueError(f"{image_id}: segmentation PNGs must be palette (index) images, not RGB")
    gt = read_instances(obj, cls, class_names)
    labels = sorted({i["class"] for i in gt["instances"]}, key=class_names.index)
    if (height, width) != obj.shape:
        raise ValueError(f"{image_id}: image is {width}x{height} but its masks are {obj.shape[1]}x{obj.shape[0]}")
    return shards.Sample(key=key, jpg=jpg, meta={"labels": labels, **meta}, gt=gt)


def import_voc(root: str, out: str, split: str = "val", shard_size: int = SHARD_SIZE) -> dict:
    """Write the images of a VOC segmentation split, with ground-truth instances, as shards.

    Shard i always holds the same ids (sorted split, chunks of shard_size), so a rerun skips the
    shards that are complete and writes only the rest."""
    root = find_voc_root(root)
    names = voc_class_names(root)
    ids = split_ids(root, split)
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(split))[0]) or "split"
    if not ids:
        raise ValueError(f"split {split!r} of {root} is empty")
    written, skipped = shards.write_chunks(ids, out, prefix, shard_size, lambda i: read_sample(root, i, names),
                                           desc=f"import voc {split}")
    info = shards.write_dataset_info(out, names, stage="import-voc", source=root, split=split)
    log.info("imported %d images of %s (split %s) into %s (%d shards written, %d already there)",
             info["samples"], root, split, out, written, skipped)
    return {"out": out, "images": info["samples"], "classes": names, "shards_written": written,
            "shards_skipped": skipped}

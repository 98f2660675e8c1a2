"""PASCAL VOC (and the synthetic world, which uses VOC's layout) -> maskless shards with ground truth.

Instances come from SegmentationObject: every id other than 0 (background) and 255 (void) is one
instance; its class is read from SegmentationClass under the same pixels. Void pixels belong to no
instance and are kept as one `void` RLE per image, so evaluation can apply either void rule.
Every image and mask is decoded once here, so a broken file stops the import with its id (or, with
`skip_invalid`, is left out and counted) instead of failing later in training. Paths may be URIs.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from maskless.core import masks, shards, storage
from maskless.core.units import SHARD_SIZE
from maskless.ingest.world import VOID

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def find_voc_root(root: str) -> str:
    """Accept VOCdevkit/VOC2012 itself, VOCdevkit, or the folder above it (a path or URI)."""
    for cand in (root, storage.join(root, "VOC2012"), storage.join(root, "VOCdevkit", "VOC2012")):
        if storage.exists(storage.join(cand, "JPEGImages")) and storage.exists(storage.join(cand, "SegmentationObject")):
            return cand
    raise FileNotFoundError(f"{root} is not a VOC folder: expected JPEGImages/ and SegmentationObject/ "
                            f"in it, in VOC2012/ or in VOCdevkit/VOC2012/")


def _lines(uri: str) -> list[str]:
    return storage.read_bytes(uri).decode("utf-8").splitlines()


def voc_class_names(root: str) -> list[str]:
    """classes.txt when the folder has one (the world), else VOC 2012's 20 classes."""
    path = storage.join(root, "classes.txt")
    if storage.exists(path):
        return [line.strip() for line in _lines(path) if line.strip()]
    return list(VOC_CLASSES)


def split_ids(root: str, split: str) -> list[str]:
    """Image ids of a split: a name in ImageSets/Segmentation (train, val, ...), 'all' (every segmented
    image), or the path or URI of an id-list file (e.g. train_aug, whose images have labels but no masks)."""
    if "://" in split or os.path.isfile(split):
        return [line.split()[0] for line in _lines(split) if line.strip()]
    if split == "all":
        return sorted(n[:-4] for n in storage.listdir(storage.join(root, "SegmentationObject")) if n.endswith(".png"))
    sets = storage.join(root, "ImageSets", "Segmentation")
    path = storage.join(sets, f"{split}.txt")
    if not storage.exists(path):
        have = sorted(n[:-4] for n in storage.listdir(sets) if n.endswith(".txt"))
        raise FileNotFoundError(f"split {split!r} not found ({path}); available: {', '.join(have) or 'none'}, or 'all'")
    return [line.split()[0] for line in _lines(path) if line.strip()]


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


FIX = "fix or replace the file, remove the id from the split, or rerun with --skip-invalid to leave such images out"


def _read(root: str, image_id: str, sub: str, ext: str) -> tuple[str, bytes]:
    path = storage.join(root, sub, image_id + ext)
    if not storage.exists(path):
        raise shards.InvalidSample("missing_file", f"image {image_id}: {path} does not exist; {FIX}")
    return path, storage.read_bytes(path)


def _decode(path: str, data: bytes, image_id: str, what: str, reason: str) -> Image.Image:
    """The file decoded in full, once: a broken header or a file cut short stops here, not in training."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise shards.InvalidSample(reason, f"image {image_id}: {path} is not a readable {what} ({e}); {FIX}") from None


def xml_labels(root: str, image_id: str, class_names: list[str]) -> list[str]:
    """Image-level labels from Annotations/ID.xml (for images without segmentation masks)."""
    path = storage.join(root, "Annotations", image_id + ".xml")
    if not storage.exists(path):
        raise shards.InvalidSample("missing_file", f"image {image_id}: neither SegmentationObject/{image_id}.png "
                                                   f"nor {path} exists; {FIX}")
    data = storage.read_bytes(path)
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        # VOC annotations declare no DTD; one that does may expand entities (billion laughs) or point
        # at other files (XXE): refused before parsing, whatever the XML parser would do with it
        raise shards.InvalidSample("bad_xml", f"image {image_id}: {path} declares a DTD or entities, which VOC "
                                              f"annotations never do: refused; {FIX}")
    try:
        objects = list(ElementTree.fromstring(data).iter("object"))
    except ElementTree.ParseError as e:
        raise shards.InvalidSample("bad_xml", f"image {image_id}: {path} is not well-formed XML ({e}); {FIX}") from None
    names = []
    for i, o in enumerate(objects):
        name = (o.findtext("name") or "").strip()
        if not name:
            raise shards.InvalidSample("bad_xml", f"image {image_id}: object {i + 1} of {path} has no <name>; {FIX}")
        names.append(name)
    unknown = set(names) - set(class_names)
    if unknown:
        raise shards.InvalidSample("unknown_class", f"image {image_id}: {path} names unknown classes "
                                                    f"{sorted(unknown)} (known: {', '.join(class_names)}); {FIX}")
    return sorted(set(names), key=class_names.index)


def read_sample(root: str, image_id: str, class_names: list[str]) -> shards.Sample:
    """One image with its ground-truth instances, or with XML labels only when it has no masks."""
    path, jpg = _read(root, image_id, "JPEGImages", ".jpg")
    width, height = _decode(path, jpg, image_id, "image", "bad_image").size
    meta = {"width": width, "height": height, "sha256": hashlib.sha256(jpg).hexdigest(),
            "engine": "voc", "source_id": image_id, "url": None, "query": None}
    key = image_id.replace(".", "_")
    if not storage.exists(storage.join(root, "SegmentationObject", image_id + ".png")):
        return shards.Sample(key=key, jpg=jpg, meta={"labels": xml_labels(root, image_id, class_names), **meta})
    maps = []
    for sub in ("SegmentationObject", "SegmentationClass"):
        png_path, png = _read(root, image_id, sub, ".png")
        arr = np.array(_decode(png_path, png, image_id, "PNG mask", "bad_mask"))
        if arr.ndim != 2:
            raise shards.InvalidSample("bad_mask", f"image {image_id}: {png_path} must be a palette (index) "
                                                   f"image, not RGB; {FIX}")
        maps.append(arr)
    obj, cls = maps
    if (height, width) != obj.shape:
        raise shards.InvalidSample("bad_mask", f"image {image_id}: {path} is {width}x{height} but its masks are "
                                               f"{obj.shape[1]}x{obj.shape[0]}; {FIX}")
    try:
        gt = read_instances(obj, cls, class_names)
    except ValueError as e:
        raise shards.InvalidSample("bad_mask", f"image {image_id}: {e}; {FIX}") from None
    labels = sorted({i["class"] for i in gt["instances"]}, key=class_names.index)
    return shards.Sample(key=key, jpg=jpg, meta={"labels": labels, **meta}, gt=gt)


def import_voc(root: str, out: str, split: str = "val", shard_size: int = SHARD_SIZE,
               skip_invalid: bool = False) -> dict:
    """Write the images of a VOC segmentation split, with ground-truth instances, as shards.

    Shard i always holds the same ids (sorted split, chunks of shard_size), so a rerun skips the
    shards that are complete and writes only the rest. An image that cannot be read correctly stops
    the import with its id (exit 2), or with skip_invalid is left out and counted (`skipped`)."""
    root = find_voc_root(root)
    names = voc_class_names(root)
    ids = split_ids(root, split)
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(split))[0]) or "split"
    if not ids:
        raise ValueError(f"split {split!r} of {root} is empty")
    written, done = shards.write_chunks(ids, out, prefix, shard_size, lambda i, dropped: read_sample(root, i, names),
                                        desc=f"import voc {split}", skip_invalid=skip_invalid,
                                        describe=lambda i: f"image {i}")
    skipped = shards.sum_stats(out, "skipped")
    info = shards.write_dataset_info(out, names, stage="import-voc", source=root, split=split, skipped=skipped)
    log.info("imported %d images of %s (split %s) into %s (%d shards written, %d already there, skipped %s)",
             info["samples"], root, split, out, written, done, skipped or "none")
    return {"out": out, "images": info["samples"], "classes": names, "shards_written": written,
            "shards_skipped": done, "skipped": skipped}

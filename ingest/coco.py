"""COCO instance annotations -> maskless shards with ground truth (`maskless import coco`).

Polygons, uncompressed and compressed RLE all become compressed RLE through pycocotools.
Crowd regions (iscrowd=1) are not instances: they are unioned into the image's `void` mask,
like VOC's 255 pixels, so evaluation treats both datasets the same way. Every image and mask is
checked and decoded once here, so broken ground truth stops the import naming the image and the
annotation (or is skipped and counted) instead of failing later in training.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from pathlib import PurePosixPath

from PIL import Image
from pycocotools import mask as mask_utils

from maskless.core import masks, shards, storage
from maskless.core.units import SHARD_SIZE

log = logging.getLogger(__name__)


FIX = "fix or remove the annotation, or rerun with --skip-invalid to leave such images out"


def rle_counts(counts: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string. Written out because pycocotools checks nothing:
    its decode of counts that cover less than the mask returns uninitialised memory, and no function of
    it returns the runs. The format: each run is 5-bit groups, low first, 0x20 marking a following group,
    0x10 of the last group the sign, characters offset by 48; from the third run on, a run is stored as
    its difference from the run two before."""
    runs: list[int] = []
    value = shift = 0
    for ch in counts:
        c = ch - 48
        if not 0 <= c < 64:
            raise ValueError(f"character {chr(ch)!r} is not in COCO's RLE alphabet")
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift  # sign-extend the last group
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("the string ends inside a run")
    return runs


def segmentation_rle(segm, height: int, width: int) -> dict:
    """Any COCO segmentation (polygon list, uncompressed or compressed RLE) -> pycocotools RLE, checked
    before pycocotools sees it: ValueError when it does not describe a height x width mask."""
    n = height * width
    if isinstance(segm, list):
        if not segm:
            raise ValueError("empty polygon list")
        for k, poly in enumerate(segm):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                # pycocotools reads a list of 4 numbers as a box, and fails on 2
                size = len(poly) if isinstance(poly, list) else type(poly).__name__
                raise ValueError(f"polygon {k} has {size} coordinates; a polygon is at least 3 x,y points")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly):
                raise ValueError(f"polygon {k} holds a coordinate that is not a finite number")
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ValueError(f"unknown segmentation format: {type(segm).__name__}")
    if list(segm["size"]) != [height, width]:
        raise ValueError(f"mask size {segm['size']} differs from the image's {height}x{width}")
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != n:
            raise ValueError(f"uncompressed RLE counts must be non-negative integers summing to {n} "
                             f"({height}x{width}), got sum {sum(c for c in counts if isinstance(c, (int, float)))}")
        return mask_utils.frPyObjects(segm, height, width)
    if not isinstance(counts, (str, bytes)):
        raise ValueError(f"RLE counts of type {type(counts).__name__}")
    counts = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
    runs = rle_counts(counts)
    if any(r < 0 for r in runs) or sum(runs) != n:
        raise ValueError(f"RLE counts do not decode to a {height}x{width} mask "
                         f"(runs sum to {sum(runs)} of {n}, {sum(r < 0 for r in runs)} negative)")
    return {"size": [height, width], "counts": counts}


def _json_rle(rle: dict) -> dict:
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def image_gt(image: dict, anns: list[dict], cat_names: dict[int, str], where: str,
             dropped: Counter | None = None) -> dict:
    """gt.json content of one COCO image. Each mask is checked and decoded once (its area): an
    instance with no pixel in the image (a polygon outside it) is dropped and counted as `empty`;
    a malformed one raises InvalidSample naming the annotation."""
    h, w = int(image["height"]), int(image["width"])
    instances, crowd = [], []
    for a in sorted(anns, key=lambda a: a["id"]):
        if a["category_id"] not in cat_names:
            raise ValueError(f"{where}: annotation {a['id']}: category {a['category_id']} is not in categories")
        try:
            rle = segmentation_rle(a["segmentation"], h, w)
        except (ValueError, TypeError) as e:
            raise shards.InvalidSample("bad_annotation", f"{where}: annotation {a['id']}: {e}; {FIX}") from None
        if a.get("iscrowd"):
            crowd.append(rle)
            continue
        if int(mask_utils.area(rle)) == 0:
            if dropped is not None:
                dropped["empty"] += 1
            continue
        j = _json_rle(rle)
        instances.append({"class": cat_names[a["category_id"]], "score": 1.0, "mask": j,
                          "bbox": masks.bbox_xywh(j), "coco_id": int(a["id"])})
    void = _json_rle(mask_utils.merge(crowd)) if crowd else None
    return {"instances": instances, "void": void}


def _jpeg(data: bytes, where: str) -> tuple[bytes, int, int]:
    """The file's own bytes when it is a JPEG (no re-encoding loss), else an RGB JPEG of it; decoded in
    full once, so a file cut short or with a broken header stops here, not in training."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format == "JPEG" and im.mode == "RGB":
                return data, im.size[0], im.size[1]
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=95)
            return buf.getvalue(), im.size[0], im.size[1]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise shards.InvalidSample("bad_image", f"{where} is not a readable image ({e}); {FIX}") from None


def image_path(images: str, file_name, where: str) -> str:
    """The image's path inside the image folder; a name that would leave it (absolute, '..', a URI) is
    refused, whatever --skip-invalid says: an annotation file must not make us read other files."""
    parts = PurePosixPath(file_name).parts if isinstance(file_name, str) else ()
    if not parts or file_name.startswith("/") or os.path.isabs(file_name) or "://" in file_name or ".." in parts:
        raise ValueError(f"{where}: file_name {file_name!r} is not a path inside the image folder {images}: "
                         f"refused (file names must be relative, without '..'); fix the annotation file")
    return storage.join(images, *parts)


def _check_fields(coco: dict, annotations: str) -> None:
    """Every image and annotation has the fields the import reads, before anything is written."""
    for image in coco["images"]:
        missing = [k for k in ("id", "file_name", "width", "height") if k not in image]
        if missing:
            raise ValueError(f"{annotations}: image {image.get('id', '?')} has no {', '.join(missing)}")
    for a in coco["annotations"]:
        missing = [k for k in ("id", "image_id", "category_id", "segmentation") if k not in a]
        if missing:
            raise ValueError(f"{annotations}: annotation {a.get('id', '?')} (image {a.get('image_id', '?')}) "
                             f"has no {', '.join(missing)}")


def import_coco(annotations: str, images: str, out: str, shard_size: int = SHARD_SIZE,
                skip_invalid: bool = False) -> dict:
    """Write every image of a COCO annotation file, with its instances, as shards coco-NNNNNN.

    Images are taken in id order and shard i always holds the same ids, so a rerun skips the
    shards that are complete and writes only the rest. An image or annotation that cannot be read
    correctly stops the import naming both ids (exit 2), or with skip_invalid its image is left out
    and counted (`skipped`); instances with no pixel are always dropped and counted (`dropped`).
    Paths may be URIs."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    if not storage.exists(annotations):
        raise FileNotFoundError(f"COCO annotation file {annotations} not found")
    if not storage.exists(images):
        raise FileNotFoundError(f"COCO image folder {images} not found")
    try:
        coco = json.loads(storage.read_bytes(annotations))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{annotations} is not valid JSON: {e}") from None
    if not isinstance(coco, dict):
        raise ValueError(f"{annotations} is not a COCO instances file (a JSON object)")
    for k in ("images", "annotations", "categories"):
        if k not in coco:
            raise ValueError(f"{annotations} has no '{k}': not a COCO instances file")
    _check_fields(coco, annotations)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cat_names = {c["id"]: c["name"] for c in cats}
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    imgs = sorted(coco["images"], key=lambda i: i["id"])
    if not imgs:
        raise ValueError(f"{annotations} lists no images")
    for image in imgs:  # before anything is written: a file outside the folder is never opened
        image_path(images, image.get("file_name"), f"{annotations}: image {image['id']}")

    def to_sample(image: dict, dropped: Counter) -> shards.Sample:
        where = f"{annotations}: image {image['id']} ({image['file_name']})"
        path = image_path(images, image["file_name"], where)
        if not storage.exists(path):
            raise shards.InvalidSample("missing_file", f"{where}: {path} is not in {images}; {FIX}")
        jpg, width, height = _jpeg(storage.read_bytes(path), f"{where}: {path}")
        if (width, height) != (image["width"], image["height"]):
            raise shards.InvalidSample("bad_image", f"{where}: {path} is {width}x{height} but the annotation "
                                                    f"file says {image['width']}x{image['height']}; {FIX}")
        anns = by_image.get(image["id"], [])
        gt = image_gt(image, anns, cat_names, where, dropped)
        names = {cat_names[a["category_id"]] for a in anns}
        meta = {"labels": [c["name"] for c in cats if c["name"] in names], "width": width,
                "height": height, "sha256": hashlib.sha256(jpg).hexdigest(), "engine": "coco",
                "source_id": image["id"], "url": image.get("coco_url") or image.get("flickr_url"),
                "query": None, "file_name": image["file_name"]}
        if image.get("license") is not None:
            meta["licence"] = image["license"]
        return shards.Sample(key=f"coco_{int(image['id']):012d}", jpg=jpg, meta=meta, gt=gt)

    written, done = shards.write_chunks(imgs, out, "coco", shard_size, to_sample, desc="import coco",
                                        skip_invalid=skip_invalid,
                                        describe=lambda i: f"image {i['id']} ({i['file_name']})")
    classes = [c["name"] for c in cats]
    skipped, dropped = shards.sum_stats(out, "skipped"), shards.sum_stats(out, "dropped")
    info = shards.write_dataset_info(out, classes, stage="import-coco", source=annotations, skipped=skipped,
                                     dropped_instances=dropped)
    log.info("imported %d COCO images into %s (%d shards written, %d already there; skipped %s, dropped %s)",
             info["samples"], out, written, done, skipped or "none", dropped or "none")
    return {"out": out, "images": info["samples"], "classes": classes, "shards_written": written,
            "shards_skipped": done, "skipped": skipped, "dropped_instances": dropped}

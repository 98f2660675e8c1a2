"""COCO instance annotations -> maskless shards with ground truth (`maskless import coco`).

Polygons, uncompressed and compressed RLE all become compressed RLE through pycocotools.
Crowd regions (iscrowd=1) are not instances: they are unioned into the image's `void` mask,
like VOC's 255 pixels, so evaluation treats both datasets the same way.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os

from PIL import Image
from pycocotools import mask as mask_utils

from maskless.core import masks, shards
from maskless.core.units import SHARD_SIZE

log = logging.getLogger(__name__)


def segmentation_rle(segm, height: int, width: int) -> dict:
    """Any COCO segmentation (polygon list, uncompressed or compressed RLE) -> pycocotools RLE."""
    if isinstance(segm, list):
        if not segm:
            raise ValueError("empty polygon list")
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, height, width)
    if isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        counts = segm["counts"].encode("ascii") if isinstance(segm["counts"], str) else segm["counts"]
        return {"size": list(segm["size"]), "counts": counts}
    raise ValueError(f"unknown segmentation format: {type(segm).__name__}")


def _json_rle(rle: dict) -> dict:
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def image_gt(image: dict, anns: list[dict], cat_names: dict[int, str]) -> dict:
    """gt.json content of one COCO image."""
    h, w = int(image["height"]), int(image["width"])
    instances, crowd = [], []
    for a in sorted(anns, key=lambda a: a["id"]):
        if a["category_id"] not in cat_names:
            raise ValueError(f"annotation {a['id']}: category {a['category_id']} is not in categories")
        try:
            rle = segmentation_rle(a["segmentation"], h, w)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"annotation {a['id']} of image {image['id']}: {e}") from None
        if list(rle["size"]) != [h, w]:
            raise ValueError(f"annotation {a['id']}: mask size {rle['size']} differs from image {h}x{w}")
        if a.get("iscrowd"):
            crowd.append(rle)
            continue
        j = _json_rle(rle)
        instances.append({"class": cat_names[a["category_id"]], "score": 1.0, "mask": j,
                          "bbox": masks.bbox_xywh(j), "coco_id": int(a["id"])})
    void = _json_rle(mask_utils.merge(crowd)) if crowd else None
    return {"instances": instances, "void": void}


def _jpeg(path: str) -> tuple[bytes, int, int]:
    """The file's own bytes when it is a JPEG (no re-encoding loss), else an RGB JPEG of it."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and im.mode == "RGB":
            return data, im.size[0], im.size[1]
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=95)
        return buf.getvalue(), im.size[0], im.size[1]


def import_coco(annotations: str, images: str, out: str, shard_size: int = SHARD_SIZE) -> dict:
    """Write every image of a COCO annotation file, with its instances, as shards coco-NNNNNN.

    Images are taken in id order and shard i always holds the same ids, so a rerun skips the
    shards that are complete and writes only the rest."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    if not os.path.isfile(annotations):
        raise FileNotFoundError(f"COCO annotation file {annotations} not found")
    if not os.path.isdir(images):
        raise FileNotFoundError(f"COCO image folder {images} not found")
    try:
        with open(annotations) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{annotations} is not valid JSON: {e}") from None
    for k in ("images", "annotations", "categories"):
        if k not in coco:
            raise ValueError(f"{annotations} has no '{k}': not a COCO instances file")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cat_names = {c["id"]: c["name"] for c in cats}
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    imgs = sorted(coco["images"], key=lambda i: i["id"])
    if not imgs:
        raise ValueError(f"{annotations} lists no images")

    def to_sample(image: dict) -> shards.Sample:
        path = os.path.join(images, image["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {image['file_name']} (id {image['id']}) of {annotations} "
                                    f"is not in {images}")
        jpg, width, height = _jpeg(path)
        if (width, height) != (image["width"], image["height"]):
            raise ValueError(f"{path} is {width}x{height} but {annotations} says "
                             f"{image['width']}x{image['height']}")
        anns = by_image.get(image["id"], [])
        gt = image_gt(image, anns, cat_names)
        names = {cat_names[a["category_id"]] for a in anns}
        meta = {"labels": [c["name"] for c in cats if c["name"] in names], "width": width,
                "height": height, "sha256": hashlib.sha256(jpg).hexdigest(), "engine": "coco",
                "source_id": image["id"], "url": image.get("coco_url") or image.get("flickr_url"),
                "query": None, "file_name": image["file_name"]}
        if image.get("license") is not None:
            meta["licence"] = image["license"]
        return shards.Sample(key=f"coco_{int(image['id']):012d}", jpg=jpg, meta=meta, gt=gt)

    written, skipped = shards.write_chunks(imgs, out, "coco", shard_size, to_sample, desc="import coco")
    classes = [c["name"] for c in cats]
    info = shards.write_dataset_info(out, classes, stage="import-coco", source=annotations)
    log.info("imported %d COCO images into %s (%d shards written, %d already there)",
             info["samples"], out, written, skipped)
    return {"out": out, "images": info["samples"], "classes": classes, "shards_written": written,
            "shards_skipped": skipped}

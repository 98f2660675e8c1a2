"""Instance masks as COCO run-length encoding (pycocotools), the one mask format of the shards."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode(mask: np.ndarray) -> dict:
    """Binary HxW mask -> JSON-safe COCO RLE {"size": [h, w], "counts": str}."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> bool HxW mask."""
    return mask_utils.decode(_to_pyc(rle)).astype(bool)


def area(rle: dict) -> int:
    return int(mask_utils.area(_to_pyc(rle)))


def bbox_xywh(rle: dict) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(_to_pyc(rle))]


def iou_matrix(dets: list[dict], gts: list[dict]) -> np.ndarray:
    """Plain IoU (no crowd rule) between two lists of RLEs, shape (len(dets), len(gts))."""
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_utils.iou([_to_pyc(d) for d in dets], [_to_pyc(g) for g in gts], [0] * len(gts)))


def _to_pyc(rle: dict) -> dict:
    counts = rle["counts"]
    h, w = rle["size"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}

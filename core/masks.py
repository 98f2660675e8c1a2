"""Instance masks as COCO run-length encoding (pycocotools), the one mask format of the shards, and
the one mask IoU every stage uses (pseudo-mask NMS, fidelity, evaluation)."""
from __future__ import annotations

import numpy as np


def _pyc_mask():
    """pycocotools' mask module, imported on first use rather than at the top: the stages import this
    module, and a bare GPU machine without pycocotools still runs their model-level code (bench/gpu.py)."""
    from pycocotools import mask

    return mask


def encode(mask: np.ndarray) -> dict:
    """Binary HxW mask -> JSON-safe COCO RLE {"size": [h, w], "counts": str}."""
    rle = _pyc_mask().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> bool HxW mask."""
    return _pyc_mask().decode(_to_pyc(rle)).astype(bool)


def area(rle: dict) -> int:
    return int(_pyc_mask().area(_to_pyc(rle)))


def areas(rles: list[dict]) -> np.ndarray:
    """Areas of a list of RLEs. pycocotools 2.0.11's `area` builds a throwaway uint8 array of the list's
    length and raises OverflowError under numpy 2 for 256 masks or more, so it is called in chunks."""
    if not rles:
        return np.zeros(0, np.int64)
    pyc = [_to_pyc(r) for r in rles]
    return np.concatenate([_pyc_mask().area(pyc[i:i + 255]) for i in range(0, len(pyc), 255)]).astype(np.int64)


def bbox_xywh(rle: dict) -> list[float]:
    return [float(v) for v in _pyc_mask().toBbox(_to_pyc(rle))]


def intersections(dets: list[dict], gts: list[dict], area_d: np.ndarray | None = None) -> np.ndarray:
    """Exact pixel counts |det & gt|, shape (len(dets), len(gts)). With iscrowd=1 pycocotools returns
    intersection / detection area; multiplying back by the area and rounding recovers the integer."""
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)), np.int64)
    d, g = [_to_pyc(r) for r in dets], [_to_pyc(r) for r in gts]
    area_d = areas(d) if area_d is None else area_d
    return np.rint(np.asarray(_pyc_mask().iou(d, g, [1] * len(g))) * area_d[:, None]).astype(np.int64)


def iou_matrix(dets: list[dict], gts: list[dict], area_d: np.ndarray | None = None,
               area_g: np.ndarray | None = None) -> np.ndarray:
    """Plain mask IoU (no crowd rule) between two lists of RLEs, shape (len(dets), len(gts)), as the
    exact ratio of integer pixel counts. area_d / area_g: the masks' areas when the caller has them."""
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    area_d = areas(dets) if area_d is None else area_d
    area_g = areas(gts) if area_g is None else area_g
    inter = intersections(dets, gts, area_d)
    union = area_d[:, None] + area_g[None, :] - inter
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def _to_pyc(rle: dict) -> dict:
    counts = rle["counts"]
    h, w = rle["size"]
    if isinstance(counts, list):
        return _pyc_mask().frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}

"""Instance-segmentation metrics of the benchmark: mask mAP^r under two protocols, and ABO.

The exact rules are in docs/METRICS.md. In short:
- `voc`: chainercv's `eval_instance_segmentation_voc` (used by PRM, IRN, BESTIE): per class, detections in
  score order take the ground-truth instance of highest IoU; taken or under the threshold -> false
  positive (no fallback); AP = area under the monotone precision envelope; mAP = nanmean over classes.
- `coco101`: pycocotools COCOeval with one area range (all) and maxDets 100: greedy matching with
  fallback to the best untaken instance, 101-point interpolated precision.
- ABO: average over ground-truth instances of the best IoU any prediction reaches (same class, or any class).

Every IoU is computed once per image from COCO RLEs with pycocotools and shared by all protocols and
thresholds; matching is vectorised with numpy. That is what makes 1,449 images x 3 thresholds take
seconds, where COCOeval's per-detection Python loops take much longer (bench/metrics.py).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from maskless.core import masks, shards, storage

PROTOCOLS = ("voc", "coco101")
DEFAULT_THRESHOLDS = (0.25, 0.5, 0.75)
# COCOeval's recall points, built the same way so the values are bit-identical.
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


# ---------------------------------------------------------------------------------------------- RLE checks

def rle_totals(counts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the runs of each compressed COCO RLE string, and whether every run is a valid count.

    Hand-written because pycocotools checks nothing: a malformed string silently decodes to a wrong mask
    (or writes past the buffer). This parses the strings exactly as pycocotools' `rleFrString` does
    (5-bit little-endian groups, continuation bit 0x20, sign bit 0x10 on the last group, runs from the
    4th on delta-coded against the run two back), vectorised over all strings at once: the only per-char
    work is finding where numbers end; the rest is per number."""
    n = len(counts)
    totals = np.zeros(n, np.int64)
    ok = np.ones(n, bool)
    lengths = np.fromiter((len(c) for c in counts), np.int64, n)
    if lengths.sum() == 0:
        return totals, ok
    buf = np.frombuffer(b"".join(counts), np.uint8)
    str_end = np.cumsum(lengths) - 1
    if buf.min() < 48 or buf.max() > 48 + 63:  # characters outside pycocotools' alphabet
        owner = np.repeat(np.arange(n), lengths)
        ok[np.unique(owner[(buf < 48) | (buf > 48 + 63)])] = False
    ends = np.flatnonzero(buf < 48 + 32)  # a number ends at a char without the continuation bit
    nonempty = lengths > 0
    ok[nonempty] &= buf[str_end[nonempty]] < 48 + 32  # a string must not stop inside a number
    if not ok.all():  # parse the well-formed strings alone, so no number spans two strings
        return _totals_of_rest(counts, ok)
    per_string = np.diff(np.searchsorted(ends, str_end, side="right"), prepend=0)  # numbers per string
    first = np.cumsum(per_string) - per_string  # index of each string's first number
    size = np.diff(ends, prepend=-1)  # chars per number
    # The last char of a number holds its top 5 bits, the sign bit 0x10 among them: as a signed 5-bit
    # value that is ((digit + 16) & 31) - 16. Most numbers are one char long; the rest get their lower
    # groups added below.
    value = ((buf[ends] - 32) & 0x1F).astype(np.int64) - 16
    multi = np.flatnonzero(size > 1)
    if len(multi):
        if size[multi].max() > 12:  # > 60 bits: no valid count is that long
            ok[np.searchsorted(np.cumsum(per_string), multi[size[multi] > 12], side="right")] = False
            return _totals_of_rest(counts, ok)
        msize, mstart = size[multi], ends[multi] - size[multi] + 1
        value[multi] <<= 5 * (msize - 1)
        for j in range(int(msize.max()) - 1):
            sel = msize - 1 > j
            value[multi[sel]] += ((buf[mstart[sel] + j] - 48) & 0x1F).astype(np.int64) << (5 * j)
    # Undo the delta coding: run m (m >= 3) = value m + run m-2, a running sum along each string's two
    # chains of alternate numbers. Within a string a chain is one parity of the global index, so each
    # chain is a slice of value[p::2]: one cumsum per parity, minus its value before the chain starts.
    has = np.flatnonzero(per_string)
    last = first + per_string - 1
    runs = np.empty_like(value)
    for p in (0, 1):
        cs = np.cumsum(value[p::2])
        chain_start = np.where((first & 1) == p, first + 2, first + 1)  # the run-0 number stands alone
        k0 = (chain_start - p) // 2  # position of the chain's first number in value[p::2]
        base = np.where(k0 > 0, cs[np.clip(k0 - 1, 0, len(cs) - 1)], 0) if len(cs) else np.zeros_like(k0)
        count = np.maximum((last - p) // 2 - (first - p + 1) // 2 + 1, 0)  # numbers of parity p per string
        runs[p::2] = cs - np.repeat(base, count)
    runs[first[has]] = value[first[has]]
    bad = runs.view(np.uint64) >= 2 ** 32  # negative runs wrap to huge values in this view
    if bad.any():
        ok[has[np.searchsorted(first[has], np.flatnonzero(bad), side="right") - 1]] = False
    totals[has] = np.add.reduceat(runs, first[has])
    return totals, ok


def _totals_of_rest(counts: Sequence[bytes], ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rle_totals of the strings still marked ok; the others keep ok False and total 0."""
    totals = np.zeros(len(counts), np.int64)
    good = np.flatnonzero(ok)
    totals[good], ok[good] = rle_totals([counts[i] for i in good])
    return totals, ok


def check_rles(rles: Sequence[dict], sizes: Sequence[tuple[int, int]], what: Callable[[int], str]) -> list[dict]:
    """Validate JSON RLEs against the image sizes they belong to; return them in pycocotools form.

    `what(i)` names rle i in error messages (e.g. "prediction 17 (image 2007_000033)")."""
    out: list[dict] = []
    for i, (rle, (h, w)) in enumerate(zip(rles, sizes)):
        if type(rle) is dict and type(rle.get("counts")) is str and rle.get("size") == [h, w]:
            out.append({"size": [h, w], "counts": rle["counts"].encode()})  # the common case, checked fast
            continue
        name = what(i)
        if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
            raise ValueError(f"{name}: segmentation must be a COCO RLE dict with 'size' and 'counts', got "
                             f"{type(rle).__name__}{' with keys ' + str(sorted(rle)) if isinstance(rle, dict) else ''}")
        size = rle["size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise ValueError(f"{name}: RLE size must be [height, width] integers, got {size!r}")
        if (size[0], size[1]) != (h, w):
            raise ValueError(f"{name}: mask size {size[0]}x{size[1]} (h x w) does not match the image, "
                             f"{h}x{w}; predictions must be pasted at the original image size")
        counts = rle["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise ValueError(f"{name}: uncompressed RLE counts must be non-negative integers summing to "
                                 f"{h}*{w}={h * w}")
            out.append(mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w))
        elif isinstance(counts, (str, bytes)):
            out.append({"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts})
        else:
            raise ValueError(f"{name}: RLE counts must be a string or a list of integers, got {type(counts).__name__}")
    totals, ok = rle_totals([r["counts"] for r in out])
    for i in np.flatnonzero(~ok | (totals != np.array([h * w for h, w in sizes], np.int64)[:len(out)])):
        h, w = sizes[i]
        raise ValueError(f"{what(i)}: malformed RLE: its runs {'are not valid counts' if not ok[i] else f'cover {totals[i]} pixels'}"
                         f", not {h}*{w}={h * w}; encode masks with pycocotools.mask.encode")
    return out


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class GroundTruth:
    """Ground-truth instances of an evaluation set, per image, as pycocotools RLEs."""

    classes: list[str]
    keys: list[str]
    sizes: list[tuple[int, int]]  # (height, width)
    masks: list[list[dict]]
    labels: list[np.ndarray]  # 0-based class index per instance
    voids: list[dict | None]
    shard_root: str | None = None

    @classmethod
    def from_samples(cls, samples: Iterable, classes: Sequence[str], shard_root: str | None = None) -> "GroundTruth":
        """From shard samples (gt.json: instances + void). A sample without gt.json is an error."""
        def items():
            for s in samples:
                if s.gt is None:
                    raise ValueError(f"sample {s.key} has no gt.json: evaluate against a dataset imported with "
                                     f"ground truth (maskless import voc / the world)")
                h, w = int(s.meta.get("height", 0)), int(s.meta.get("width", 0))
                if h <= 0 or w <= 0:
                    raise ValueError(f"sample {s.key}: its metadata has no image height/width (docs/FORMAT.md); "
                                     f"re-import it")
                yield s.key, (h, w), s.gt

        return cls.from_annotations(items(), classes, shard_root)

    @classmethod
    def from_annotations(cls, items: Iterable[tuple[str, tuple[int, int], dict]], classes: Sequence[str],
                         shard_root: str | None = None) -> "GroundTruth":
        """From (image key, (height, width), gt.json content) triples."""
        classes = list(classes)
        index = {c: i for i, c in enumerate(classes)}
        keys, sizes, rle_lists, labels, voids = [], [], [], [], []
        for key, (h, w), gt in items:
            inst = gt.get("instances", [])
            unknown = sorted({i["class"] for i in inst} - set(index))
            if unknown:
                raise ValueError(f"sample {key}: ground-truth classes {unknown} are not in the dataset's classes {classes}")
            def name(_: int, key: str = key) -> str:
                return f"ground truth of {key}"

            rles = check_rles([i["mask"] for i in inst], [(h, w)] * len(inst), name)
            void = gt.get("void")
            void = check_rles([void], [(h, w)], name)[0] if void else None
            if void is not None and rles and np.any(mask_utils.iou(rles, [void], [1]) > 0):
                raise ValueError(f"sample {key}: ground-truth instances overlap the void mask; void pixels "
                                 f"belong to no instance (docs/FORMAT.md)")
            keys.append(key)
            sizes.append((h, w))
            rle_lists.append(rles)
            labels.append(np.array([index[i["class"]] for i in inst], np.int64))
            voids.append(void)
        if len(set(keys)) != len(keys):
            raise ValueError("the ground truth has duplicate image keys")
        return cls(classes, keys, sizes, rle_lists, labels, voids, shard_root)

    @classmethod
    def from_shards(cls, root: str) -> "GroundTruth":
        info = shards.read_dataset_info(root)
        return cls.from_samples(shards.read_dataset(root), info["classes"], shard_root=root)

    @property
    def n_instances(self) -> int:
        return sum(len(m) for m in self.masks)


@dataclass
class Predictions:
    """Validated predictions in canonical order: by image (ground-truth order), then score descending,
    then class, then mask bytes. The order is a pure function of the set, so shuffling changes nothing."""

    image: np.ndarray
    label: np.ndarray
    score: np.ndarray
    rles: list[dict]


def read_predictions(path: str) -> list[dict]:
    if not storage.exists(path):
        raise FileNotFoundError(f"predictions file {path} not found")
    try:
        data = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); expected a COCO results list") from None
    if isinstance(data, dict) and "annotations" in data:
        raise ValueError(f"{path} is a COCO dataset file, not a results list: pass the list of "
                         f"{{image_id, category, segmentation, score}}")
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of COCO results, got {type(data).__name__}")
    return data


def load_predictions(preds: list[dict] | str, gt: GroundTruth) -> Predictions:
    """Check a COCO results list against the ground truth and put it in canonical order.

    Each entry: image_id (the image key), category (class name) or category_id (1-based index into
    the classes), segmentation (COCO RLE at the image size), score (finite number)."""
    if isinstance(preds, (str, os.PathLike)):
        preds = read_predictions(str(preds))
    if not isinstance(preds, list):
        raise ValueError(f"predictions must be a list of dicts, got {type(preds).__name__}")
    key_index = {k: i for i, k in enumerate(gt.keys)}
    cls_index = {c: i for i, c in enumerate(gt.classes)}
    image, label, score, segs = [], [], [], []
    for n, p in enumerate(preds):
        if not isinstance(p, dict):
            raise ValueError(f"prediction {n}: must be a dict, got {type(p).__name__}")
        missing = [f for f in ("image_id", "segmentation", "score") if f not in p]
        if missing or ("category" not in p and "category_id" not in p):
            raise ValueError(f"prediction {n}: missing {missing + ([] if 'category' in p or 'category_id' in p else ['category or category_id'])}")
        key = p["image_id"]
        if key not in key_index:
            some = ", ".join(gt.keys[:3])
            raise ValueError(f"prediction {n}: unknown image_id {key!r}: not in the ground truth "
                             f"({len(gt.keys)} images, e.g. {some}); image ids are the sample keys (VOC ids)")
        c = _category(p, n, cls_index, gt.classes)
        s = p["score"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"prediction {n}: score must be a finite number, got {s!r}")
        image.append(key_index[key])
        label.append(c)
        score.append(float(s))
        segs.append(p["segmentation"])
    rles = check_rles(segs, [gt.sizes[i] for i in image], lambda n: f"prediction {n} (image {preds[n]['image_id']})")
    order = sorted(range(len(rles)), key=lambda i: (image[i], -score[i], label[i], rles[i]["counts"]))
    return Predictions(np.array(image, np.int64)[order] if order else np.zeros(0, np.int64),
                       np.array(label, np.int64)[order] if order else np.zeros(0, np.int64),
                       np.array(score, np.float64)[order] if order else np.zeros(0),
                       [rles[i] for i in order])


def _category(p: dict, n: int, cls_index: dict, classes: list[str]) -> int:
    by_name = by_id = None
    if "category" in p:
        if p["category"] not in cls_index:
            raise ValueError(f"prediction {n}: unknown category {p['category']!r}; classes are {classes}")
        by_name = cls_index[p["category"]]
    if "category_id" in p:
        cid = p["category_id"]
        if isinstance(cid, bool) or not isinstance(cid, int) or not 1 <= cid <= len(classes):
            raise ValueError(f"prediction {n}: category_id {cid!r} must be a 1-based index into the "
                             f"{len(classes)} classes {classes}")
        by_id = cid - 1
    if by_name is not None and by_id is not None and by_name != by_id:
        raise ValueError(f"prediction {n}: category {p['category']!r} and category_id {p['category_id']} disagree")
    return by_name if by_name is not None else by_id


# ---------------------------------------------------------------------------------------------- overlaps

def image_iou(dets: list[dict], gts: list[dict], void: dict | None, ignore_void: bool,
              area_d: np.ndarray | None = None, area_g: np.ndarray | None = None) -> np.ndarray:
    """IoU (len(dets), len(gts)) of pycocotools RLEs of one image.

    Default (chainercv's rule): plain mask IoU (masks.iou_matrix); predicted pixels on void count in
    the union. ignore_void: void pixels are removed from each prediction first. Ground truth never
    covers void, so only the union shrinks, by |prediction & void|.
    area_d / area_g: the masks' areas when the caller has them already."""
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    if not (ignore_void and void is not None):
        return masks.iou_matrix(dets, gts, area_d, area_g)
    area_d = masks.areas(dets) if area_d is None else area_d
    area_g = masks.areas(gts) if area_g is None else area_g
    inter = masks.intersections(dets, gts, area_d)
    on_void = masks.intersections(dets, [void], area_d)[:, 0]
    union = area_d[:, None] + area_g[None, :] - inter - on_void[:, None]
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


# ---------------------------------------------------------------------------------------------- results

@dataclass
class ProtocolResult:
    """AP per threshold and class under one protocol; nan where a class has no ground truth."""

    protocol: str
    thresholds: list[float]
    ap: np.ndarray  # (T, C)
    curves: list[list[tuple[np.ndarray, np.ndarray] | None]]  # [t][c] (recall, precision) as the protocol sees it
    true_positives: np.ndarray  # (T, C) predictions matched under the protocol's rule

    @property
    def mean_ap(self) -> list[float]:
        return [_nanmean(row) for row in self.ap]


@dataclass
class Evaluation:
    classes: list[str]
    thresholds: list[float]
    ignore_void: bool
    max_dets: int
    n_images: int
    n_predictions: int
    n_gt: np.ndarray  # per class
    protocols: dict[str, ProtocolResult]
    abo_same_class: np.ndarray  # per gt instance (all images, concatenated)
    abo_any_class: np.ndarray
    gt_label: np.ndarray  # per gt instance
    gt_image: np.ndarray  # per gt instance
    image_keys: list[str] = field(default_factory=list)

    def abo(self, variant: str = "same_class") -> dict:
        best = self.abo_same_class if variant == "same_class" else self.abo_any_class
        per_class = [float(best[self.gt_label == c].mean()) if (self.gt_label == c).any() else None
                     for c in range(len(self.classes))]
        return {"variant": variant, "mean_over_instances": float(best.mean()) if len(best) else None,
                "mean_over_classes": _nanmean(np.array([np.nan if v is None else v for v in per_class])),
                "per_class": dict(zip(self.classes, per_class))}

    def image_abo(self) -> dict[str, float]:
        """Same-class ABO per image that has ground truth (used to pick the best and worst images)."""
        out = {}
        for i in np.unique(self.gt_image):
            out[self.image_keys[i]] = float(self.abo_same_class[self.gt_image == i].mean())
        return out

    def to_dict(self) -> dict:
        """JSON-safe summary; every AP carries its protocol, and void handling is stated."""
        protocols = {}
        for name, r in self.protocols.items():
            protocols[name] = {
                "protocol": name,
                "rule": PROTOCOL_RULES[name],
                "thresholds": {f"{t:g}": {
                    "mAP": r.mean_ap[ti],
                    "AP": {c: _num(r.ap[ti, ci]) for ci, c in enumerate(self.classes)},
                } for ti, t in enumerate(r.thresholds)},
            }
        return {
            "classes": self.classes,
            "thresholds": self.thresholds,
            "void": "ignored (void pixels removed from predictions before IoU)" if self.ignore_void
            else "chainercv rule (void pixels belong to no instance; predicted void pixels count in the union)",
            "ignore_void": self.ignore_void,
            "max_dets": self.max_dets,
            "images": self.n_images,
            "predictions": self.n_predictions,
            "gt_instances": {c: int(n) for c, n in zip(self.classes, self.n_gt)},
            "protocols": protocols,
            "abo": {"same_class": self.abo("same_class"), "any_class": self.abo("any_class")},
        }


PROTOCOL_RULES = {
    "voc": "chainercv eval_instance_segmentation_voc: best-IoU match, no fallback, area under the precision envelope",
    "coco101": "pycocotools COCOeval (segm, area all, maxDets per image and class): greedy match with fallback, "
               "101-point interpolated precision",
}


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _num(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


# ---------------------------------------------------------------------------------------------- evaluation

def evaluate(gt: GroundTruth, predictions: list[dict] | str | Predictions,
             protocols: Sequence[str] = PROTOCOLS, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
             ignore_void: bool = False, max_dets: int = 100) -> Evaluation:
    """Score predictions against ground truth under the given protocols (docs/METRICS.md)."""
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        raise ValueError(f"IoU thresholds must be in (0, 1], got {thresholds}")
    if max_dets < 1:
        raise ValueError("max_dets must be at least 1")
    preds = predictions if isinstance(predictions, Predictions) else load_predictions(predictions, gt)
    C = len(gt.classes)
    gt_label = np.concatenate([np.zeros(0, np.int64)] + gt.labels)
    gt_image = np.repeat(np.arange(len(gt.keys)), [len(m) for m in gt.masks])
    gt_offset = np.concatenate([[0], np.cumsum([len(m) for m in gt.masks])])
    n_gt = np.bincount(gt_label, minlength=C)

    # One IoU matrix per image, shared by everything below.
    bounds = np.searchsorted(preds.image, np.arange(len(gt.keys) + 1))
    ious: list[np.ndarray] = []
    best_iou = np.full(len(preds.rles), -np.inf)  # same-class best IoU of each prediction (voc)
    best_gt = np.full(len(preds.rles), -1, np.int64)  # its global gt index (first of equal maxima)
    abo_same = np.zeros(len(gt_label))
    abo_any = np.zeros(len(gt_label))
    area_d = masks.areas(preds.rles)
    area_g = masks.areas([r for m in gt.masks for r in m])
    for i in range(len(gt.keys)):
        lo, hi = bounds[i], bounds[i + 1]
        m = image_iou(preds.rles[lo:hi], gt.masks[i], gt.voids[i], ignore_void, area_d[lo:hi],
                      area_g[gt_offset[i]:gt_offset[i + 1]])
        ious.append(m)
        if m.size == 0:
            continue
        same = preds.label[lo:hi, None] == gt.labels[i][None, :]
        masked = np.where(same, m, -np.inf)
        arg = masked.argmax(axis=1)
        best = masked[np.arange(hi - lo), arg]
        best_iou[lo:hi] = best
        best_gt[lo:hi] = np.where(np.isfinite(best), gt_offset[i] + arg, -1)
        g0 = gt_offset[i]
        abo_any[g0:g0 + m.shape[1]] = m.max(axis=0)
        abo_same[g0:g0 + m.shape[1]] = np.where(same, m, 0).max(axis=0)

    results = {}
    if "voc" in protocols:
        results["voc"] = _voc(preds, best_iou, best_gt, n_gt, thresholds)
    if "coco101" in protocols:
        results["coco101"] = _coco101(preds, gt, ious, bounds, n_gt, thresholds, max_dets)
    return Evaluation(list(gt.classes), thresholds, ignore_void, max_dets, len(gt.keys), len(preds.rles), n_gt,
                      results, abo_same, abo_any, gt_label, gt_image, list(gt.keys))


def _score_order(preds: Predictions) -> np.ndarray:
    """Global order: score descending; ties keep canonical order (image, then class, then mask)."""
    return np.argsort(-preds.score, kind="stable")


def _voc(preds: Predictions, best_iou: np.ndarray, best_gt: np.ndarray, n_gt: np.ndarray,
         thresholds: list[float]) -> ProtocolResult:
    """chainercv's rule. A prediction is a true positive when its best same-class instance reaches the
    threshold and no higher-scored prediction of that image already took it; which is exactly the first
    occurrence of that instance among the above-threshold predictions in global score order."""
    order = _score_order(preds)
    C = len(n_gt)
    ap = np.full((len(thresholds), C), np.nan)
    true_positives = np.zeros((len(thresholds), C), np.int64)
    curves: list[list] = []
    label_sorted = preds.label[order]
    for ti, t in enumerate(thresholds):
        valid = best_iou[order] >= t
        tp = np.zeros(len(order), bool)
        idx = np.flatnonzero(valid)
        _, first = np.unique(best_gt[order][idx], return_index=True)
        tp[idx[first]] = True
        true_positives[ti] = np.bincount(label_sorted[tp], minlength=C)
        row = []
        for c in range(C):
            sel = label_sorted == c
            if n_gt[c] == 0:
                row.append(None)
                continue
            tpc = np.cumsum(tp[sel])
            fpc = np.cumsum(~tp[sel])
            prec = tpc / np.maximum(tpc + fpc, 1)
            rec = tpc / n_gt[c]
            ap[ti, c] = _envelope_area(prec, rec)
            row.append((rec, prec))
        curves.append(row)
    return ProtocolResult("voc", thresholds, ap, curves, true_positives)


def _envelope_area(prec: np.ndarray, rec: np.ndarray) -> float:
    """Area under the monotone precision envelope (VOC 2010+ AP), as chainercv computes it."""
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _coco101(preds: Predictions, gt: GroundTruth, ious: list[np.ndarray], bounds: np.ndarray, n_gt: np.ndarray,
             thresholds: list[float], max_dets: int) -> ProtocolResult:
    """COCOeval's rule with one area range (all): per image and class, the max_dets highest-scored
    detections in score order each take the untaken instance of highest IoU >= t (ties: the later
    instance, as COCOeval's loop does); precision over all images is made monotone and read at 101
    recall points with searchsorted(side='left'); AP = mean of the 101 values."""
    T, C = len(thresholds), len(n_gt)
    kept = np.ones(len(preds.rles), bool)
    matched = np.zeros((T, len(preds.rles)), bool)
    for i in range(len(gt.keys)):
        lo, hi = bounds[i], bounds[i + 1]
        if lo == hi:
            continue
        labels = preds.label[lo:hi]
        if np.bincount(labels).max() > max_dets:  # keep the max_dets best of each class (rows are in score order)
            by_class = np.argsort(labels, kind="stable")
            group_start = np.searchsorted(labels[by_class], labels[by_class])
            rank = np.empty(hi - lo, np.int64)
            rank[by_class] = np.arange(hi - lo) - group_start
            kept[lo:hi] = rank < max_dets
        if not ious[i].size:
            continue
        # One matrix for all classes: other classes' instances (and dropped rows) can never be taken.
        usable = (labels[:, None] == gt.labels[i][None, :]) & kept[lo:hi, None]
        sub = np.where(usable, ious[i], -1.0)
        matched[:, lo:hi] = _greedy_match(sub, [min(t, 1 - 1e-10) for t in thresholds])
    idx = np.flatnonzero(kept)
    order = idx[np.argsort(-preds.score[idx], kind="stable")]
    label_sorted = preds.label[order]
    ap = np.full((T, C), np.nan)
    curves: list[list] = []
    eps = np.spacing(1)
    for ti in range(T):
        tp_sorted = matched[ti, order]
        row = []
        for c in range(C):
            if n_gt[c] == 0:
                row.append(None)
                continue
            tps = tp_sorted[label_sorted == c]
            tp = np.cumsum(tps).astype(float)
            fp = np.cumsum(~tps).astype(float)
            rc = tp / n_gt[c]
            pr = tp / (fp + tp + eps)
            pr = np.maximum.accumulate(pr[::-1])[::-1]
            inds = np.searchsorted(rc, REC_THRS, side="left")
            q = np.where(inds < len(pr), pr[np.minimum(inds, len(pr) - 1)] if len(pr) else 0.0, 0.0)
            ap[ti, c] = float(np.mean(q))
            row.append((REC_THRS.copy(), q))
        curves.append(row)
    true_positives = np.stack([np.bincount(label_sorted[matched[ti, order]], minlength=C) for ti in range(T)]) \
        if T else np.zeros((0, C), np.int64)
    return ProtocolResult("coco101", thresholds, ap, curves, true_positives)


def _greedy_match(iou: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Which rows (detections, score order) match under COCOeval's greedy rule, per threshold: (T, rows)."""
    cand = iou[None] >= np.asarray(thresholds)[:, None, None]
    out = cand.any(axis=2)
    # Where no instance is wanted by two detections, every candidate row gets one: only the other
    # thresholds need the loop (plain Python: the rows are short, numpy calls would cost more).
    rows = iou.tolist()
    for ti in np.flatnonzero((cand.sum(axis=1) > 1).any(axis=1)):
        t, taken = thresholds[ti], [False] * iou.shape[1]
        for r in np.flatnonzero(out[ti]).tolist():
            best, j = -1.0, -1
            for g, v in enumerate(rows[r]):
                if v >= t and not taken[g] and v >= best:  # >=: the last of equal maxima, as COCOeval
                    best, j = v, g
            if j < 0:
                out[ti, r] = False
            else:
                taken[j] = True
    return out


def mean_best_overlap(gt: GroundTruth, predictions: list[dict] | Predictions, same_class: bool = True,
                      ignore_void: bool = False) -> float:
    """ABO: mean over ground-truth instances of the best IoU any prediction reaches (0 when none does)."""
    ev = evaluate(gt, predictions, protocols=(), ignore_void=ignore_void)
    best = ev.abo_same_class if same_class else ev.abo_any_class
    return float(best.mean()) if len(best) else float("nan")

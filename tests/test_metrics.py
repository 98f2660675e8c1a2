"""The benchmark's metrics against pycocotools COCOeval and an independent, loop-by-loop VOC reference."""
import contextlib
import io
import json
import random

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskless.core import masks as ingest_masks
from maskless.core.shards import Sample
from maskless.core import metrics

CLASSES = ["cat", "dog", "cow", "bus"]  # "bus" never appears in the ground truth


# ------------------------------------------------------------------------------------------ random data

def random_world(seed: int, n_images: int = 30):
    """Images with crowded same-class instances, VOC-style void borders, and predictions that are
    near-copies, sloppy copies, wrong-class copies and pure noise. Returns (gt samples, dense gt, preds)."""
    rng = np.random.default_rng(seed)
    samples, dense, preds = [], [], []
    for i in range(n_images):
        h, w = int(rng.integers(40, 70)), int(rng.integers(40, 70))
        obj = np.zeros((h, w), np.int32)
        labels = []
        for k in range(int(rng.integers(0, 7))):
            c = int(rng.integers(0, 3)) if rng.random() > 0.5 or not labels else labels[-1]  # crowd same class
            canvas = np.zeros((h, w), np.uint8)
            cy, cx = int(rng.integers(5, h - 5)), int(rng.integers(5, w - 5))
            cv2.ellipse(canvas, (cx, cy), (int(rng.integers(4, 16)), int(rng.integers(4, 16))),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
            obj[canvas > 0] = len(labels) + 1
            labels.append(c)
        kernel = np.ones((3, 3), np.uint8)
        border = cv2.dilate(obj.astype(np.uint8), kernel) != cv2.erode(obj.astype(np.uint8), kernel)
        void = border & (cv2.dilate((obj > 0).astype(np.uint8), kernel) > 0)
        if rng.random() < 0.3:  # a "difficult" void blob
            void[: h // 4, : w // 4] = True
        obj[void] = 0
        inst_masks, inst_labels = [], []
        for k, c in enumerate(labels, start=1):
            m = obj == k
            if m.sum() >= 3:
                inst_masks.append(m)
                inst_labels.append(c)
        key = f"img_{i:03d}"
        gt = {"instances": [{"class": CLASSES[c], "score": 1.0, "mask": ingest_masks.encode(m),
                             "bbox": [0, 0, 1, 1]} for m, c in zip(inst_masks, inst_labels)],
              "void": ingest_masks.encode(void) if void.any() else None}
        samples.append(Sample(key=key, jpg=b"", meta={"width": w, "height": h}, gt=gt))
        dense.append((inst_masks, inst_labels, void))
        if rng.random() < 0.1:
            continue  # an image without predictions
        for m, c in zip(inst_masks, inst_labels):
            for _ in range(int(rng.integers(0, 3))):  # duplicates compete for one instance
                shift = rng.integers(-3, 4, 2)
                pm = np.roll(m, tuple(shift), (0, 1))
                if rng.random() < 0.5:
                    pm = cv2.dilate(pm.astype(np.uint8), kernel, iterations=int(rng.integers(1, 3))) > 0
                pc = c if rng.random() < 0.85 else int(rng.integers(0, 4))
                preds.append(_pred(key, pc, pm, rng))
        for _ in range(int(rng.integers(0, 4))):  # noise
            pm = np.zeros((h, w), bool)
            y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            pm[y:y + int(rng.integers(3, 20)), x:x + int(rng.integers(3, 20))] = True
            preds.append(_pred(key, int(rng.integers(0, 4)), pm, rng))
    return samples, dense, preds


def _pred(key, c, m, rng):
    return {"image_id": key, "category": CLASSES[c], "segmentation": ingest_masks.encode(m),
            "score": float(rng.random())}


def coco_eval(samples, preds, thresholds, max_dets=100, remove_void=False):
    """pycocotools COCOeval, segm, iouThrs as given, one area range (all), one maxDets: AP[t][class]."""
    ids = {s.key: n + 1 for n, s in enumerate(samples)}  # ids increase in sample order, like our image order
    images, anns = [], []
    for s in samples:
        images.append({"id": ids[s.key], "height": s.meta["height"], "width": s.meta["width"]})
        for inst in s.gt["instances"]:
            anns.append({"id": len(anns) + 1, "image_id": ids[s.key], "category_id": CLASSES.index(inst["class"]) + 1,
                         "segmentation": dict(inst["mask"]), "area": float(ingest_masks.area(inst["mask"])),
                         "bbox": ingest_masks.bbox_xywh(inst["mask"]), "iscrowd": 0})
    void = {s.key: s.gt["void"] for s in samples}
    results = []
    for p in preds:
        seg = p["segmentation"]
        if remove_void and void[p["image_id"]]:
            seg = ingest_masks.encode(ingest_masks.decode(seg) & ~ingest_masks.decode(void[p["image_id"]]))
        results.append({"image_id": ids[p["image_id"]], "category_id": CLASSES.index(p["category"]) + 1,
                        "segmentation": dict(seg), "score": p["score"]})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": n + 1, "name": c} for n, c in enumerate(CLASSES)]}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "segm")
        ev.params.iouThrs = np.array(thresholds)
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, 0]  # T x R x K
    return np.array([[prec[t, :, k].mean() if (prec[t, :, k] > -1).all() else np.nan
                      for k in range(len(CLASSES))] for t in range(len(thresholds))])


def voc_reference(dense, preds, thresholds, ignore_void=False):
    """chainercv's rule written out plainly: dense masks, explicit loops, nothing shared with metrics.py."""
    by_image = {}
    for p in preds:
        by_image.setdefault(p["image_id"], []).append(p)
    out = np.full((len(thresholds), len(CLASSES)), np.nan)
    for ti, t in enumerate(thresholds):
        scores = {c: [] for c in range(len(CLASSES))}
        hits = {c: [] for c in range(len(CLASSES))}
        n_pos = {c: 0 for c in range(len(CLASSES))}
        for i, (gms, gls, void) in enumerate(dense):
            key = f"img_{i:03d}"
            for c in range(len(CLASSES)):
                gt_c = [m for m, l in zip(gms, gls) if l == c]
                n_pos[c] += len(gt_c)
                mine = [p for p in by_image.get(key, []) if p["category"] == CLASSES[c]]
                mine.sort(key=lambda p: -p["score"])
                used = [False] * len(gt_c)
                for p in mine:
                    pm = ingest_masks.decode(p["segmentation"])
                    if ignore_void:
                        pm = pm & ~void
                    best, best_j = -1.0, -1
                    for j, g in enumerate(gt_c):
                        union = np.logical_or(pm, g).sum()
                        v = np.logical_and(pm, g).sum() / union if union else 0.0
                        if v > best:
                            best, best_j = v, j
                    scores[c].append(p["score"])
                    if best_j >= 0 and best >= t and not used[best_j]:
                        used[best_j] = True
                        hits[c].append(1)
                    else:
                        if best_j >= 0 and best >= t:
                            used[best_j] = True
                        hits[c].append(0)
        for c in range(len(CLASSES)):
            if n_pos[c] == 0:
                continue
            pairs = sorted(zip(scores[c], hits[c]), key=lambda x: -x[0])
            tp = fp = 0
            precisions, recalls = [], []
            for _, hit in pairs:
                tp += hit
                fp += 1 - hit
                precisions.append(tp / (tp + fp))
                recalls.append(tp / n_pos[c])
            # area under the envelope: for each recall step, the best precision at that recall or beyond
            ap, prev_r = 0.0, 0.0
            for k, r in enumerate(recalls):
                if r > prev_r:
                    ap += (r - prev_r) * max(precisions[k:])
                    prev_r = r
            out[ti, c] = ap
    return out


def ap_table(ev, protocol):
    return ev.protocols[protocol].ap


@pytest.fixture(scope="module")
def world():
    samples, dense, preds = random_world(seed=3)
    gt = metrics.GroundTruth.from_samples(samples, CLASSES)
    return samples, dense, preds, gt


# ------------------------------------------------------------------------------------------ cross-checks

THR = [0.25, 0.5, 0.75]


@pytest.mark.parametrize("ignore_void", [False, True])
def test_coco101_equals_cocoeval(world, ignore_void):
    samples, _, preds, gt = world
    ev = metrics.evaluate(gt, preds, protocols=["coco101"], thresholds=THR, ignore_void=ignore_void)
    ref = coco_eval(samples, preds, THR, remove_void=ignore_void)
    assert np.isnan(ref[:, 3]).all() and np.isfinite(ref[:, :3]).all()
    assert 0.05 < np.nanmean(ref) < 0.95  # a non-trivial case
    np.testing.assert_allclose(ap_table(ev, "coco101"), ref, atol=1e-6, equal_nan=True)


def test_coco101_max_dets_per_image_and_class(world):
    samples, _, preds, gt = world
    ev = metrics.evaluate(gt, preds, protocols=["coco101"], thresholds=THR, max_dets=2)
    ref = coco_eval(samples, preds, THR, max_dets=2)
    np.testing.assert_allclose(ap_table(ev, "coco101"), ref, atol=1e-6, equal_nan=True)
    assert not np.allclose(np.nan_to_num(ref), np.nan_to_num(coco_eval(samples, preds, THR)))


@pytest.mark.parametrize("seed", [5, 11])
def test_coco101_other_worlds(seed):
    samples, _, preds = random_world(seed=seed, n_images=20)
    gt = metrics.GroundTruth.from_samples(samples, CLASSES)
    ev = metrics.evaluate(gt, preds, protocols=["coco101"], thresholds=THR)
    np.testing.assert_allclose(ap_table(ev, "coco101"), coco_eval(samples, preds, THR), atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("ignore_void", [False, True])
def test_voc_equals_reference(world, ignore_void):
    _, dense, preds, gt = world
    ev = metrics.evaluate(gt, preds, protocols=["voc"], thresholds=THR, ignore_void=ignore_void)
    ref = voc_reference(dense, preds, THR, ignore_void)
    np.testing.assert_allclose(ap_table(ev, "voc"), ref, atol=1e-12, equal_nan=True)
    assert ev.to_dict()["protocols"]["voc"]["thresholds"]["0.5"]["mAP"] == pytest.approx(np.nanmean(ref[1]))


def test_voc_and_coco_differ_where_the_rules_differ(world):
    """Duplicates of one instance: VOC gives no fallback, COCOeval does; 101 points vs exact area."""
    _, _, preds, gt = world
    ev = metrics.evaluate(gt, preds, thresholds=THR)
    assert not np.allclose(np.nan_to_num(ap_table(ev, "voc")), np.nan_to_num(ap_table(ev, "coco101")))


def test_abo_equals_dense(world):
    _, dense, preds, gt = world
    ev = metrics.evaluate(gt, preds, protocols=[])
    best_same, best_any = [], []
    for i, (gms, gls, _) in enumerate(dense):
        mine = [p for p in preds if p["image_id"] == f"img_{i:03d}"]
        for g, l in zip(gms, gls):
            ious = [(np.logical_and(ingest_masks.decode(p["segmentation"]), g).sum()
                     / np.logical_or(ingest_masks.decode(p["segmentation"]), g).sum(), p["category"] == CLASSES[l])
                    for p in mine]
            best_same.append(max([v for v, same in ious if same], default=0.0))
            best_any.append(max([v for v, _ in ious], default=0.0))
    np.testing.assert_allclose(ev.abo_same_class, best_same, atol=1e-12)
    np.testing.assert_allclose(ev.abo_any_class, best_any, atol=1e-12)
    assert ev.abo("any_class")["mean_over_instances"] >= ev.abo("same_class")["mean_over_instances"]
    assert metrics.mean_best_overlap(gt, preds) == pytest.approx(np.mean(best_same))


# ------------------------------------------------------------------------------------------ edge cases

def test_perfect_and_empty_predictions(world):
    samples, _, _, gt = world
    perfect = [{"image_id": s.key, "category": inst["class"], "segmentation": inst["mask"], "score": 0.5 + 0.001 * n}
               for s in samples for n, inst in enumerate(s.gt["instances"])]
    ev = metrics.evaluate(gt, perfect, thresholds=THR)
    for proto in metrics.PROTOCOLS:
        ap = ap_table(ev, proto)
        np.testing.assert_allclose(ap[:, :3], 1.0, atol=1e-9)
        assert np.isnan(ap[:, 3]).all()  # "bus" has no ground truth
    assert ev.abo("same_class")["mean_over_instances"] == 1.0
    none = metrics.evaluate(gt, [], thresholds=THR)
    for proto in metrics.PROTOCOLS:
        np.testing.assert_array_equal(ap_table(none, proto)[:, :3], 0.0)
        assert none.to_dict()["protocols"][proto]["thresholds"]["0.25"]["mAP"] == 0.0
    assert none.abo("any_class")["mean_over_instances"] == 0.0


def test_shuffling_changes_nothing(world):
    _, _, preds, gt = world
    tied = [dict(p, score=round(p["score"], 1)) for p in preds]  # many equal scores
    for ps in (preds, tied):
        base = metrics.evaluate(gt, ps, thresholds=THR).to_dict()
        for seed in range(3):
            shuffled = list(ps)
            random.Random(seed).shuffle(shuffled)
            assert metrics.evaluate(gt, shuffled, thresholds=THR).to_dict() == base


def test_void_changes_iou_exactly_as_documented():
    h, w = 20, 20
    g = np.zeros((h, w), bool)
    g[5:15, 5:15] = True  # 100 px
    void = np.zeros((h, w), bool)
    void[4, 4:16] = True  # 12 px border above the instance
    p = g | void  # the prediction spills onto void
    p[14, 5:15] = False  # and misses 10 instance pixels
    sample = Sample(key="a", jpg=b"", meta={"width": w, "height": h},
                    gt={"instances": [{"class": "cat", "mask": ingest_masks.encode(g)}], "void": ingest_masks.encode(void)})
    gt = metrics.GroundTruth.from_samples([sample], ["cat"])
    preds = [{"image_id": "a", "category": "cat", "segmentation": ingest_masks.encode(p), "score": 1.0}]
    pred = metrics.load_predictions(preds, gt).rles
    default = metrics.image_iou(pred, gt.masks[0], gt.voids[0], ignore_void=False)[0, 0]
    ignored = metrics.image_iou(pred, gt.masks[0], gt.voids[0], ignore_void=True)[0, 0]
    assert default == 90 / (100 + 12)  # void pixels of the prediction count in the union
    assert ignored == 90 / 100  # removed from the prediction first
    for ignore, expect in ((False, 0.0), (True, 1.0)):  # 90/112 < 0.85 <= 90/100
        ev = metrics.evaluate(gt, preds, thresholds=[0.85], ignore_void=ignore)
        assert ev.protocols["voc"].ap[0, 0] == expect
        assert ev.to_dict()["ignore_void"] is ignore


def test_rle_parser_agrees_with_pycocotools():
    rng = np.random.default_rng(0)
    rles = []
    for _ in range(200):
        h, w = rng.integers(1, 300, 2)
        m = rng.random((h, w)) < rng.random() ** 3
        if rng.random() < 0.5:
            m = cv2.dilate(m.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        rles.append(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
    totals, ok = metrics.rle_totals([r["counts"] for r in rles])
    assert ok.all()
    np.testing.assert_array_equal(totals, [r["size"][0] * r["size"][1] for r in rles])
    totals, ok = metrics.rle_totals([b"0", b"a!b", b"3", b"0O"])  # stops mid-number / bad char / fine / negative
    assert ok.tolist() == [True, False, True, False] and totals[2] == 3


# ------------------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(image_id="nope"), "unknown image_id 'nope'"),
    (lambda p: p.update(category="horse"), "unknown category 'horse'"),
    (lambda p: (p.pop("category"), p.update(category_id=9)), "category_id 9"),
    (lambda p: p.update(category_id=(CLASSES.index(p["category"]) + 1) % 4 + 1), "disagree"),
    (lambda p: p.update(score=float("nan")), "finite"),
    (lambda p: p.pop("segmentation"), "missing"),
    (lambda p: p.update(segmentation=[[1, 2, 3, 4]]), "COCO RLE dict"),
    (lambda p: p["segmentation"].update(counts="0" + p["segmentation"]["counts"][1:] + "1"), "malformed RLE"),
    (lambda p: p["segmentation"].update(counts=p["segmentation"]["counts"] + "W"), "malformed RLE"),
    (lambda p: p["segmentation"].update(counts="\x01\x02"), "malformed RLE"),
    (lambda p: p["segmentation"].update(size=[10, 10]), "does not match the image"),
])
def test_bad_predictions_give_clear_errors(world, mutate, message):
    samples, _, preds, gt = world
    bad = [json.loads(json.dumps(p)) for p in preds[:5]]
    mutate(bad[2])
    with pytest.raises(ValueError, match=message):
        metrics.evaluate(gt, bad)


def test_bad_prediction_files(tmp_path, world):
    gt = world[3]
    with pytest.raises(FileNotFoundError, match="not found"):
        metrics.load_predictions(str(tmp_path / "missing.json"), gt)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        metrics.load_predictions(str(tmp_path / "x.json"), gt)
    (tmp_path / "y.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="not a results list"):
        metrics.load_predictions(str(tmp_path / "y.json"), gt)
    with pytest.raises(ValueError, match="thresholds"):
        metrics.evaluate(gt, [], thresholds=[0.0])
    with pytest.raises(ValueError, match="unknown protocol"):
        metrics.evaluate(gt, [], protocols=["voc07"])


def test_many_predictions_in_one_image(world):
    """300 predictions on one image (pycocotools' area fails on 256+ masks in one call) and the 100 cap."""
    samples, _, _, gt = world
    s = next(s for s in samples if len(s.gt["instances"]) >= 2)
    inst = s.gt["instances"][0]
    preds = [{"image_id": s.key, "category": inst["class"], "segmentation": inst["mask"], "score": 0.001 * n}
             for n in range(300)]
    ev = metrics.evaluate(gt, preds, thresholds=[0.5])
    assert ev.abo_same_class.max() == 1.0
    np.testing.assert_allclose(ap_table(ev, "coco101"), coco_eval(samples, preds, [0.5]), atol=1e-6, equal_nan=True)


def test_rle_parser_flags_only_the_bad_strings():
    good = mask_utils.encode(np.asfortranarray(np.eye(30, dtype=np.uint8)))["counts"]
    huge = b"P" * 13 + b"0"  # a 14-char number: more than 60 bits
    totals, ok = metrics.rle_totals([good, huge, good, b"0O2", good])
    assert ok.tolist() == [True, False, True, False, True]
    assert totals[[0, 2, 4]].tolist() == [900, 900, 900]


def _runs_reference(s: bytes) -> list[int]:
    """pycocotools' rleFrString, char by char."""
    runs, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def test_rle_parser_equals_a_char_by_char_reference():
    rng = np.random.default_rng(1)
    strings = []
    for _ in range(300):  # random well-terminated strings: big, negative and delta-coded numbers
        n = int(rng.integers(0, 12))
        parts = [bytes(rng.integers(48 + 32, 48 + 64, int(rng.integers(0, 4)), dtype=np.uint8))
                 + bytes([int(rng.integers(48, 48 + 32))]) for _ in range(n)]
        strings.append(b"".join(parts))
    totals, ok = metrics.rle_totals(strings)
    for s, t, o in zip(strings, totals, ok):
        runs = _runs_reference(s)
        assert o == all(0 <= r < 2 ** 32 for r in runs), s
        if o:
            assert t == sum(runs), s
    assert 0.2 < ok.mean() < 0.9  # both kinds were drawn

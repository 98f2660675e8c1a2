"""Bench: pseudo masks that cover two objects of one class, and whether colour tells them apart (issue #18).

On bench/quality.py's cells (the demo recipe's pseudo masks of the train images, from the cached peak
responses of `--stages pseudo`), for every class:
  - of the true objects without a mask at IoU >= 0.5, how many are covered (> 30 % of their pixels) by a
    mask of their class that covers another object of that class as much ("merged"), and how many
    peaks of the class such a merged mask holds (one peak for two objects: no peak rule can split it);
  - a colour split, tried and measured here only (not in the pipeline): each mask's pixels clustered in
    two by k-means (OpenCV) on their local mean colour (CIE Lab, a `window` x `window` mean inside the
    mask), kept when both parts are connected, each >= `min_part` of the mask, and the two clusters'
    squared distance over their summed variances (Fisher's ratio) is >= `fisher`. Recall and
    precision at IoU 0.5 before and after, per class.

    .venv/bin/python -m bench.merged --out /tmp/quality --worlds w8 --seeds 0,1,2 --splits 7:2,7:4,11:4
"""
from __future__ import annotations

import argparse
from collections import Counter

import cv2
import numpy as np

from bench import quality

MIN_SPLIT_PIXELS = 80  # smaller masks are never split


def covers(mask: np.ndarray, obj: np.ndarray) -> bool:
    """The mask holds over 30 % of the object's pixels."""
    return bool((mask & obj).sum() > 0.3 * obj.sum())


def colour_split(lab: np.ndarray, mask: np.ndarray, window: int, fisher: float, min_part: float) -> list[np.ndarray]:
    """The mask as one part, or as two when its local colours (the image in Lab, float32) form two
    separated connected clusters."""
    area = int(mask.sum())
    if area < MIN_SPLIT_PIXELS:
        return [mask]
    inside = mask.astype(np.float32)
    local = cv2.blur(lab * inside[..., None], (window, window)) / np.maximum(cv2.blur(inside, (window, window)), 1e-6)[..., None]
    features = local[mask]
    cv2.setRNGSeed(0)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    _, labels, centres = cv2.kmeans(features, 2, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    labels = labels.ravel()
    ys, xs = np.nonzero(mask)
    parts = []
    for j in (0, 1):
        part = np.zeros(mask.shape, np.uint8)
        part[ys[labels == j], xs[labels == j]] = 1
        part = cv2.morphologyEx(part, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        n, components, stats, _ = cv2.connectedComponentsWithStats(part)
        if n < 2:
            return [mask]
        parts.append(components == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))
    spread = sum(float(features[labels == j].var(0).sum()) for j in (0, 1))
    if min(p.sum() for p in parts) < min_part * area or float(((centres[0] - centres[1]) ** 2).sum()) < fisher * spread:
        return [mask]
    # every pixel of the mask to the nearer part
    away = [cv2.distanceTransform((~p).astype(np.uint8), cv2.DIST_L2, 3) for p in parts]
    return [mask & (away[0] <= away[1]), mask & (away[1] < away[0])]


def merged_cell(out: str, world: str, seed: int, splits: list[tuple[int, float]], min_part: float) -> dict:
    from maskless.core import masks as rle
    from maskless.pseudo.fidelity import FidelityAccumulator

    base = quality.base_folder(out, world, seed)
    masker, _ = quality._masker(base, quality.cell_recipe(world, seed)["pseudo"])
    classes = masker.classes
    kinds, peaks_in_merged = Counter(), Counter()
    accs = {None: FidelityAccumulator(classes, 0.5), **{s: FidelityAccumulator(classes, 0.5) for s in splits}}
    split_count = Counter()
    for key, gt, pr in quality.cached_responses(base, masker):
        instances = masker.instances(pr, None)
        truth = [(g["class"], rle.decode(g["mask"]).astype(bool)) for g in gt["instances"]]
        masks = [(i["class"], rle.decode(i["mask"]).astype(bool)) for i in instances]
        for k, kind in enumerate(quality._failure_kinds(classes, gt, pr, instances)):
            c, m = truth[k]
            if kind == "hit":
                kinds[c, "hit"] += 1
                continue
            covering = [pm for pc, pm in masks if pc == c and covers(pm, m)]
            merged = any(covers(pm, m2) for pm in covering for j, (c2, m2) in enumerate(truth) if j != k and c2 == c)
            kinds[c, "merged" if merged else "other"] += 1
        for pc, pm in masks:
            if sum(covers(pm, m2) for c2, m2 in truth if c2 == pc) >= 2:
                peaks_in_merged[sum(1 for p, pt in zip(pr.peaks, pr.points)
                                    if classes[p.cls] == pc and pm[tuple(pt)])] += 1
        size = pr.image.shape[:2]
        accs[None].add(gt, {"instances": instances}, size, key)
        lab = cv2.cvtColor(pr.image, cv2.COLOR_RGB2LAB).astype(np.float32)  # once per image, for every split
        for s in splits:
            split = []
            for inst, (_, pm) in zip(instances, masks):
                parts = colour_split(lab, pm, s[0], s[1], min_part)
                split_count[s] += len(parts) > 1
                split += [inst] if len(parts) == 1 else [{**inst, "mask": rle.encode(p)} for p in parts]
            accs[s].add(gt, {"instances": split}, size, key)
    return {"classes": classes, "kinds": kinds, "peaks_in_merged": peaks_in_merged,
            "results": {s: a.result() for s, a in accs.items()}, "split_count": split_count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="bench.quality's output folder (its cells' base folders)")
    p.add_argument("--worlds", default="w8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--splits", default="7:2,7:4,11:4", help="colour splits to try, window:fisher,...")
    p.add_argument("--min-part", type=float, default=0.2, help="each part at least this share of the mask")
    a = p.parse_args()
    splits = [(int(w), float(f)) for w, f in (s.split(":") for s in a.splits.split(",") if s)]
    for world in a.worlds.split(","):
        cells = [merged_cell(a.out, world, int(s), splits, a.min_part) for s in a.seeds.split(",")]
        classes, kinds, peaks = cells[0]["classes"], Counter(), Counter()
        for c in cells:
            kinds.update(c["kinds"])
            peaks.update(c["peaks_in_merged"])
        print(f"### {world}, seeds {a.seeds}: true objects per class, summed over the seeds\n")
        print("| class | objects | hit @0.5 | missed, in a mask covering another of its class | missed, other |")
        print("|---|---|---|---|---|")
        for c in classes:
            n = sum(kinds[c, k] for k in ("hit", "merged", "other"))
            print(f"| {c} | {n} | {kinds[c, 'hit']} | {kinds[c, 'merged']} | {kinds[c, 'other']} |")
        total = sum(peaks.values())
        print(f"\nmasks covering two or more objects of their class: {total}; peaks of the class inside them: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(peaks.items())))
        print("\n| colour split (window, Fisher) | masks split | recall @0.5 | precision @0.5 | "
              + " | ".join(classes) + " |")
        print("|---|---|---|---|" + "---|" * len(classes))
        for s in [None, *splits]:
            rs = [c["results"][s] for c in cells]
            mean = lambda f: float(np.mean([f(r) for r in rs]))
            name = "none (the masks as they are)" if s is None else f"{s[0]} px, {s[1]:g}"
            count = "-" if s is None else str(sum(c["split_count"][s] for c in cells))
            print(f"| {name} | {count} | {mean(lambda r: r['recall']):.3f} | {mean(lambda r: r['precision']):.3f} | "
                  + " | ".join(f"{mean(lambda r, c=c: r['per_class'][c]['recall']):.2f}" for c in classes) + " |")
        print(f"\n(recall and precision: the mean over seeds {a.seeds})")


if __name__ == "__main__":
    main()

"""Bench: the quality grid that decides the pseudo-mask defaults (issue #18).

Grid: worlds (the demo's 3-class world, and the world with all 8 classes: bar, star, cross, moon,
hexagon beside disc, square, triangle) x world seeds x pseudo-mask variants, each run with the demo
recipe (examples/demo.yaml and its `maskless run` pipeline, maskless/run.py). Per cell:
  - stage `pseudo`: the pseudo masks of the train images against their true masks, per class:
    recall and precision at IoU 0.5 (and 0.75), ABO (same class), pseudo instances per true object, the
    classifier's held-out mAP, and what became of each true object (FAILURES: a mask at IoU >= 0.5, no
    peak of its class inside it, or a peak inside and a mask too small or too large); computed
    in-process from the run's classifier, whose peak responses are cached per cell;
  - stage `full`: the rest of the pipeline (pseudo stage, fidelity, Mask R-CNN on the pseudo masks and
    on the true masks, both scored on the val split): weak and full mAP^r (voc) at 0.25/0.5/0.75. A
    self-training variant (`default-self`, `cls-e80-self`) adds one round of self-training to its base
    variant's run folder (train/relabel.py): "weak" is then the second Mask R-CNN, beside the first's.
The stages before pseudo (world, import, web, crawl, classify) run once per (world, seed) into
OUT/base/WORLD-sSEED and are shared by every variant (a variant with its own classifier, CLASSIFIERS,
trains it in OUT/base/WORLD-sSEED-NAME on the same crawl; the `full` stage links them into the variant's
run folder; the true-mask model is trained once per (world, seed) and linked too). Every result is a
JSON file under OUT/results; a rerun skips what is there, so the grid can be run in parts:

    .venv/bin/python -m bench.quality --out /tmp/quality --worlds w3,w8 --seeds 0,1,2 --stages pseudo \\
        --variants default,explain-3
    .venv/bin/python -m bench.quality --out /tmp/quality --stages full --variants default

Then the table: per variant and world, the mean and the range (min-max) over seeds of every figure.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import sys
import time

import numpy as np

from bench.common import write_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "demo.yaml")
# world name -> run.world overrides and run.queries: the demo's own world, and all 8 classes (180 train
# images, as issue #18 measured it; the crawl queries each class by its name)
WORLDS = {
    "w3": {"world": {"classes": 3}, "queries": None},
    "w8": {"world": {"classes": 8, "images": 240}, "queries": {}},
}
# classifier name -> classify-section overrides of the demo recipe; a variant naming one gets its own base
# folder OUT/base/WORLD-sSEED-NAME, whose world, import, web and crawl are the default base's, linked
CLASSIFIERS: dict[str, dict] = {
    "e40": {"epochs": 40, "lr_steps": []},               # the demo's classifier until 2026-12-02: 40 epochs, constant lr
    "steps-30": {"epochs": 40, "lr_steps": [30]},        # 40 epochs, lr x0.1 for the last 10
    "e80-steps-60": {"epochs": 80, "lr_steps": [60]},   # the demo's since 2026-12-02: lr x0.1 for the last 20
    "b8": {"epochs": 40, "lr_steps": [], "batch_size": 8},  # twice the steps of half the images: e40's compute
    "e120-steps-90": {"epochs": 120, "lr_steps": [90]},  # half as long again as the demo's, same lr shape
    "e80-crop-1": {"epochs": 80, "lr_steps": [60], "crop_scale": 1.0},  # flips only: no crop drops a tagged object
}
# variant name -> pseudo-section overrides of the demo recipe ("default" is the recipe as it is), and
# optionally "classifier": a name of CLASSIFIERS (default: the demo's classifier)
VARIANTS: dict[str, dict] = {
    "default": {},
    "iou-only": {"group_overlap": None},          # peaks grouped by mask IoU alone (NMS before GrabCut)
    "overlap-0.3": {"group_overlap": 0.3},
    "overlap-0.5": {"group_overlap": 0.5},
    "overlap-0.7": {"group_overlap": 0.7},
    "overlap-0.5-unmerged": {"group_overlap": 0.5, "merge_responses": False},
    "input-256": {"input_size": 256},             # the classifier applied at twice its training size
    "peak-0.15": {"peak_threshold": 0.15},
    "explain-3": {"explain_rounds": 3},            # up to 3 more peaks per class where the class map is unexplained
    "explain-3-0.3": {"explain_rounds": 3, "explain_threshold": 0.3},
    "peak-0.5": {"peak_threshold": 0.5},
    "cls-e40": {"classifier": "e40"},             # the demo's recipe before 2026-12-02 ("default" in earlier tables)
    "cls-steps-30": {"classifier": "steps-30"},
    "cls-e80-steps-60": {"classifier": "e80-steps-60"},
    "cls-b8": {"classifier": "b8"},
    "cls-e120-steps-90": {"classifier": "e120-steps-90"},
    "cls-e80-crop-1": {"classifier": "e80-crop-1"},
    # the 80-epoch classifier with the pseudo-mask levers that need no retraining
    "cls-e80-input-256": {"classifier": "e80-steps-60", "input_size": 256},
    "cls-e80-explain-3": {"classifier": "e80-steps-60", "explain_rounds": 3},
    "cls-e80-peak-0.15": {"classifier": "e80-steps-60", "peak_threshold": 0.15},
    "cls-e80-blur-0.015": {"classifier": "e80-steps-60", "response_blur": 0.015},  # masks that can follow a star's arms
    "cls-e80-thr-0.25": {"classifier": "e80-steps-60", "response_threshold": 0.25},  # larger masks before GrabCut
    "cls-e80-core-0.4": {"classifier": "e80-steps-60", "refine_core": 0.4},        # GrabCut's sure-object core larger
    # one round of self-training (train/relabel.py, the relabel section's defaults) on top of another
    # variant: run in that variant's folder, so only the four self-training stages are new
    "default-self": {"self_training_of": "default"},
    "cls-e80-self": {"self_training_of": "cls-e80-steps-60"},
}
SHARED_STAGES = ("world", "import", "web", "crawl", "classify")
FULL_STAGES = ("train_full", "eval_full")


def demo_recipe() -> dict:
    import yaml

    with open(DEMO) as f:
        return yaml.safe_load(f)


def cell_recipe(world: str, seed: int, variant: dict | None = None) -> dict:
    """The demo recipe for one world and seed, with the variant's pseudo section and classifier (and,
    for a self-training variant, its base variant's with run.self_training)."""
    if variant and "self_training_of" in variant:
        recipe = cell_recipe(world, seed, VARIANTS[variant["self_training_of"]])
        recipe["run"]["self_training"] = True
        return recipe
    pseudo = {k: v for k, v in (variant or {}).items() if k != "classifier"}
    recipe = copy.deepcopy(demo_recipe())
    classifier = (variant or {}).get("classifier")
    if classifier:
        recipe["classify"] = {**recipe["classify"], **CLASSIFIERS[classifier]}
    spec = WORLDS[world]
    recipe["run"]["world"] = {**recipe["run"]["world"], **spec["world"], "seed": seed}
    if spec["queries"] is not None:
        recipe["run"]["queries"] = spec["queries"]
    recipe["pseudo"] = {**recipe.get("pseudo", {}), **(pseudo or {})}
    recipe["pseudo_eval"] = {**recipe.get("pseudo_eval", {}), "grid_images": 0}
    return recipe


def _write_yaml(recipe: dict, path: str) -> str:
    import yaml

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def base_folder(out: str, world: str, seed: int, classifier: str | None = None) -> str:
    """The stages every variant shares, run once: world, import, web, crawl, classify; with another
    classifier, the default base's stages before classify are linked and only classify runs."""
    from maskless.run import run_pipeline

    if classifier:
        default = base_folder(out, world, seed)
        base = os.path.join(out, "base", f"{world}-s{seed}-{classifier}")
        _link_stages(default, base, SHARED_STAGES[:-1], ("world", os.path.join("data", "train"),
                                                          os.path.join("data", "val"), "web", os.path.join("data", "crawl")))
    else:
        base = os.path.join(out, "base", f"{world}-s{seed}")
    if not os.path.exists(os.path.join(base, "stages", "classify.json")):
        recipe = cell_recipe(world, seed, {"classifier": classifier} if classifier else None)
        run_pipeline(_write_yaml(recipe, os.path.join(base, "recipe.yaml")), out=base, until="classify")
    return base


def _result_path(out: str, stage: str, variant: str, world: str, seed: int) -> str:
    return os.path.join(out, "results", stage, variant, f"{world}-s{seed}.json")


def _save(path: str, result: dict) -> None:
    from maskless.core import storage

    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.write_json_atomic(path, result)


# ---------------------------------------------------------------- stage pseudo (in-process)

def _masker(base: str, pseudo: dict):
    from maskless import config
    from maskless.pseudo.classifier import load_classifier
    from maskless.pseudo.instances import PseudoMasker
    from maskless.pseudo.stage import PseudoConfig

    cfg = config.build(PseudoConfig, pseudo, {"classifier": os.path.join(base, "classifier"), "data": "-",
                                              "out": "-/pseudo"})
    model, classes, train_config = load_classifier(cfg.classifier)
    return PseudoMasker(model, classes, train_config, cfg.masker_options()), cfg


def _response_key(opts) -> str:
    """The options the peaks and their responses depend on (the cache key)."""
    key = (f"{opts.response}-{opts.classes_from}-{opts.class_threshold}-{opts.peak_threshold}-{opts.max_peaks}-"
           f"{opts.input_size}")
    if opts.explain_rounds:
        r = opts.retrieval
        key += f"-explain{opts.explain_rounds}-{opts.explain_threshold}-{r.response_blur}-{r.response_threshold}"
    return key


def cached_responses(base: str, masker) -> list:
    """The peak responses of every train image under the masker's peak options, cached in the base folder."""
    from maskless.core import shards

    path = os.path.join(base, "bench-responses", _response_key(masker.opts) + ".pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    items = []
    for s in shards.read_dataset(os.path.join(base, "data", "train")):
        items.append((s.key, s.gt, masker.responses(np.asarray(s.image()), s.labels)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + ".tmp", path)
    return items


# what became of each true object: its best same-class pseudo mask at IoU >= 0.5 ("hit"); else no peak of
# its class inside it (one within NEAR_PX of it, or none), or a peak inside but every mask of its class
# under IoU 0.5, the best-overlapping one smaller or larger than the object (larger: it leaks or covers
# neighbours)
FAILURES = ("hit", "no_peak", "peak_near", "peak_mask_smaller", "peak_mask_larger")
NEAR_PX = 8  # one cell of the tiny classifier's stride-8 map at the demo's 128 px


def _failure_kinds(classes: list[str], gt: dict, pr, instances: list[dict]) -> list[str]:
    import cv2

    from maskless.core import masks as rle

    masks = [i["mask"] for i in instances]
    iou = rle.iou_matrix(masks, [g["mask"] for g in gt["instances"]])  # every mask x every object, once
    kinds = []
    for k, g in enumerate(gt["instances"]):
        same = [d for d, i in enumerate(instances) if i["class"] == g["class"]]
        best = max(same, key=lambda d: iou[d, k], default=None)
        if best is not None and iou[best, k] >= 0.5:
            kinds.append("hit")
            continue
        truth = rle.decode(g["mask"]).astype(bool)
        points = [(int(pt[0]), int(pt[1])) for p, pt in zip(pr.peaks, pr.points) if classes[p.cls] == g["class"]]
        if not any(truth[pt] for pt in points):
            # distance of every pixel to the object (0 inside it)
            away = cv2.distanceTransform((~truth).astype(np.uint8), cv2.DIST_L2, 5)
            kinds.append("peak_near" if any(away[pt] <= NEAR_PX for pt in points) else "no_peak")
        elif best is not None and rle.area(masks[best]) > rle.area(g["mask"]):
            kinds.append("peak_mask_larger")
        else:
            kinds.append("peak_mask_smaller")
    return kinds


def _classifier_map(base: str) -> float:
    """The classifier's held-out mAP after its last epoch (its summary.json)."""
    with open(os.path.join(base, "classifier", "summary.json")) as f:
        return json.load(f)["final"]["map"]


def pseudo_cell(out: str, variant: str, world: str, seed: int) -> dict:
    import torch

    from maskless.pseudo.fidelity import FidelityAccumulator

    path = _result_path(out, "pseudo", variant, world, seed)
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        if set(result.get("failures_all", ())) == set(FAILURES):
            return result  # else a cell from before these failure counts: masked again (seconds; deterministic)
    base = base_folder(out, world, seed, VARIANTS[variant].get("classifier"))
    torch.set_num_threads(2)
    masker, _ = _masker(base, cell_recipe(world, seed, VARIANTS[variant])["pseudo"])
    items = cached_responses(base, masker)
    t0 = time.time()
    accs = {iou: FidelityAccumulator(masker.classes, iou) for iou in (0.5, 0.75)}
    failures = {c: dict.fromkeys(FAILURES, 0) for c in masker.classes}
    for key, gt, pr in items:
        instances = masker.instances(pr, None)
        size = pr.image.shape[:2]
        for acc in accs.values():
            acc.add(gt, {"instances": instances}, size, key)
        for g, kind in zip(gt["instances"], _failure_kinds(masker.classes, gt, pr, instances)):
            failures[g["class"]][kind] += 1
    at = {iou: acc.result() for iou, acc in accs.items()}
    r = at[0.5]
    per_class = {c: {"gt": v["gt_instances"], "pseudo": v["pseudo_instances"], "recall": v["recall"],
                     "precision": v["precision"], "abo": v["abo_same_class"],
                     "recall75": at[0.75]["per_class"][c]["recall"],
                     "per_object": v["pseudo_instances"] / v["gt_instances"] if v["gt_instances"] else None}
                 for c, v in r["per_class"].items()}
    result = {"variant": variant, "world": world, "seed": seed, "images": r["images"], "gt": r["gt_instances"],
              "pseudo": r["pseudo_instances"], "abo": r["abo_same_class"], "precision": r["precision"],
              "recall": r["recall"], "recall75": at[0.75]["recall"], "precision75": at[0.75]["precision"],
              "miou": r["miou"], "per_object": r["pseudo_instances"] / r["gt_instances"],
              "per_class": per_class, "masking_s": time.time() - t0, "pseudo_config": VARIANTS[variant],
              "classifier_map": _classifier_map(base), "failures": failures,
              "failures_all": {k: sum(f[k] for f in failures.values()) for k in FAILURES}}
    _save(path, result)
    return result


# ---------------------------------------------------------------- stage pairs (which peaks are one object)

def _valley(class_map: np.ndarray, a: np.ndarray, b: np.ndarray, steps: int = 32) -> float:
    """The class map's minimum on the segment between two peaks, over the lower of its two ends."""
    t = np.linspace(0, 1, steps)
    ys = np.round(a[0] + t * (b[0] - a[0])).astype(int)
    xs = np.round(a[1] + t * (b[1] - a[1])).astype(int)
    ends = min(class_map[tuple(a)], class_map[tuple(b)])
    return float(class_map[ys, xs].min() / ends) if ends > 0 else 0.0


def pairs_cell(out: str, world: str, seed: int) -> dict:
    """For every two same-class peaks that both fall inside true instances of their class: the grouping
    criteria (response overlap, IoU of their masks before GrabCut, class-map valley between them) and
    whether the two instances are one. The table says how well each criterion tells them apart."""
    from maskless.core import masks as rle
    from maskless.pseudo.grouping import response_overlap
    from maskless.pseudo.retrieval import response_mask, smooth

    path = _result_path(out, "pairs", "default", world, seed)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    base = base_folder(out, world, seed)
    masker, _ = _masker(base, cell_recipe(world, seed)["pseudo"])
    opts = masker.opts.retrieval
    rows = []
    for key, gt, pr in cached_responses(base, masker):
        truth = [(g["class"], rle.decode(g["mask"]).astype(bool)) for g in gt["instances"]]
        inside = [next((k for k, (c, m) in enumerate(truth) if c == masker.classes[p.cls] and m[tuple(pt)]), None)
                  for p, pt in zip(pr.peaks, pr.points)]
        smoothed = [smooth(r, opts.response_blur) for r in pr.responses]
        masks = [response_mask(r, (int(pt[0]), int(pt[1])), opts.response_blur, opts.response_threshold)
                 for r, pt in zip(pr.responses, pr.points)]
        for i in range(len(pr.peaks)):
            for j in range(i + 1, len(pr.peaks)):
                if pr.peaks[i].cls != pr.peaks[j].cls or inside[i] is None or inside[j] is None:
                    continue
                union = (masks[i] | masks[j]).sum()
                rows.append({"class": masker.classes[pr.peaks[i].cls], "same": inside[i] == inside[j],
                             "overlap": response_overlap(smoothed[i], smoothed[j]),
                             "iou": float((masks[i] & masks[j]).sum() / union) if union else 0.0,
                             "valley": _valley(pr.class_maps[pr.peaks[i].cls], pr.points[i], pr.points[j])})
    result = {"world": world, "seed": seed, "pairs": rows}
    _save(path, result)
    return result


def pairs_table(out: str, worlds: list[str], seeds: list[int]) -> str:
    """Per criterion and threshold: the fraction of same-object pairs it joins and of different-object
    pairs it joins (wrongly), over every finished cell."""
    lines = ["| world | criterion | threshold | same-object pairs joined | different-object pairs joined |",
             "|---|---|---|---|---|"]
    for world in worlds:
        rows = []
        for seed in seeds:
            p = _result_path(out, "pairs", "default", world, seed)
            if os.path.exists(p):
                with open(p) as f:
                    rows += json.load(f)["pairs"]
        same = [r for r in rows if r["same"]]
        diff = [r for r in rows if not r["same"]]
        if not rows:
            continue
        for crit, thresholds in (("overlap", (0.3, 0.4, 0.5, 0.6, 0.7)), ("iou", (0.3, 0.5)),
                                 ("valley", (0.8, 0.9, 0.95))):
            for t in thresholds:
                j_same = np.mean([r[crit] >= t for r in same]) if same else float("nan")
                j_diff = np.mean([r[crit] >= t for r in diff]) if diff else float("nan")
                lines.append(f"| {world} ({len(same)} same, {len(diff)} different) | {crit} | {t} | "
                             f"{j_same:.2f} | {j_diff:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- stage full (the pipeline)

def _link_stages(base: str, run: str, stages: tuple[str, ...], paths: tuple[str, ...]) -> None:
    for rel in paths:
        src, dst = os.path.join(base, rel), os.path.join(run, rel)
        if os.path.exists(src) and not os.path.lexists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(src, dst)
    os.makedirs(os.path.join(run, "stages"), exist_ok=True)
    for name in stages:
        src, dst = os.path.join(base, "stages", f"{name}.json"), os.path.join(run, "stages", f"{name}.json")
        if os.path.exists(src) and not os.path.exists(dst):
            with open(src) as f, open(dst, "w") as g:
                g.write(f.read())


def _fidelity_fields(fid: dict) -> dict:
    """What a full cell keeps of a fidelity stage's result: the totals and, per class, the counts and rates."""
    return {"fidelity": {k: fid[k] for k in ("abo_same_class", "precision", "recall", "miou")},
            "fidelity_per_class": {c: {k: v[k] for k in ("gt_instances", "pseudo_instances", "recall", "precision",
                                                         "abo_same_class")}
                                   for c, v in fid["per_class"].items()}}


def full_cell(out: str, variant: str, world: str, seed: int) -> dict:
    """The pipeline after classify for one variant: pseudo, fidelity, train/eval weak; the full model is
    trained once per (world, seed), in the first variant's run folder, and linked into the others."""
    from maskless.run import run_pipeline

    path = _result_path(out, "full", variant, world, seed)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    spec = VARIANTS[variant]
    if "self_training_of" in spec:
        return self_training_cell(out, variant, world, seed)
    base = base_folder(out, world, seed, spec.get("classifier"))
    run = os.path.join(out, "runs", variant, f"{world}-s{seed}")
    shared = ("world", os.path.join("data", "train"), os.path.join("data", "val"), "web",
              os.path.join("data", "crawl"), "classifier")
    _link_stages(base, run, SHARED_STAGES, shared)
    # where the true-mask model of this (world, seed) lives: it does not depend on the classifier
    full_home = os.path.join(base_folder(out, world, seed), "full")
    if os.path.exists(os.path.join(full_home, "stages", "eval_full.json")):
        _link_stages(full_home, run, FULL_STAGES, (os.path.join("models", "full"), os.path.join("reports", "full")))
    recipe = _write_yaml(cell_recipe(world, seed, VARIANTS[variant]), os.path.join(run, "recipe.yaml"))
    t0 = time.time()
    summary = run_pipeline(recipe, out=run)
    if not os.path.exists(os.path.join(full_home, "stages", "eval_full.json")):
        _link_stages(run, full_home, FULL_STAGES, (os.path.join("models", "full"), os.path.join("reports", "full")))
    res = summary["results"]
    result = {"variant": variant, "world": world, "seed": seed, "seconds": time.time() - t0,
              "stage_seconds": summary["stage_seconds"],
              "weak": res["eval_weak"]["mAP"]["voc"], "full": res["eval_full"]["mAP"]["voc"],
              **_fidelity_fields(res["fidelity"]), "pseudo_config": VARIANTS[variant], "load_average": os.getloadavg()}
    _save(path, result)
    return result


def self_training_cell(out: str, variant: str, world: str, seed: int) -> dict:
    """A self-training variant: its base variant's cell first, then the same run folder with
    run.self_training, which adds only the stages relabel, fidelity_relabel, train_relabel, eval_relabel.
    "weak" is the self-trained model's mAP^r (the method's result then), "weak_round1" the first's."""
    from maskless.run import run_pipeline

    of = VARIANTS[variant]["self_training_of"]
    first = full_cell(out, of, world, seed)
    run = os.path.join(out, "runs", of, f"{world}-s{seed}")
    recipe = _write_yaml(cell_recipe(world, seed, VARIANTS[variant]), os.path.join(run, f"recipe-{variant}.yaml"))
    t0 = time.time()
    res = run_pipeline(recipe, out=run)["results"]
    result = {"variant": variant, "world": world, "seed": seed, "seconds": first["seconds"] + time.time() - t0,
              "weak": res["eval_relabel"]["mAP"]["voc"], "weak_round1": first["weak"], "full": first["full"],
              **_fidelity_fields(res["fidelity_relabel"]), "fidelity_round1": first["fidelity"],
              "pseudo_config": VARIANTS[variant], "load_average": os.getloadavg()}
    _save(_result_path(out, "full", variant, world, seed), result)
    return result


# ---------------------------------------------------------------- the table

def _stats(values: list) -> tuple[float, float, float] | None:
    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(min(v)), float(max(v))) if v else None


def _fmt(st: tuple | None, pct: bool = False) -> str:
    if st is None:
        return "-"
    k = 100 if pct else 1
    f = "{:.1f}" if pct else "{:.2f}"
    return f"{f.format(k * st[0])} ({f.format(k * st[1])}-{f.format(k * st[2])})"


def tables(out: str, variants: list[str], worlds: list[str], seeds: list[int]) -> tuple[str, dict]:
    """Markdown tables of every finished cell: mean (min-max) over the seeds found."""
    lines, summary = [], {}
    for stage in ("pseudo", "full"):
        for variant in variants:
            for world in worlds:
                cells = []
                for seed in seeds:
                    p = _result_path(out, stage, variant, world, seed)
                    if os.path.exists(p):
                        with open(p) as f:
                            cells.append(json.load(f))
                if not cells:
                    continue
                found = [c["seed"] for c in cells]
                head = f"### {stage}: variant `{variant}`, world {world}, seeds {found} (mean (min-max))"
                lines += [head, ""]
                key = f"{stage}/{variant}/{world}"
                if stage == "pseudo":
                    summary[key] = _pseudo_table(cells, lines)
                else:
                    summary[key] = _full_table(cells, lines)
                lines.append("")
    return "\n".join(lines), summary


def _pseudo_table(cells: list[dict], lines: list[str]) -> dict:
    lines += ["| class | objects | recall@0.5 | precision@0.5 | ABO | instances per object | recall@0.75 |",
              "|---|---|---|---|---|---|---|"]
    out = {}
    for c in cells[0]["per_class"]:
        row = {k: _stats([cell["per_class"][c][k] for cell in cells])
               for k in ("recall", "precision", "abo", "per_object", "recall75")}
        gt = sum(cell["per_class"][c]["gt"] for cell in cells)
        lines.append(f"| {c} | {gt} | {_fmt(row['recall'])} | {_fmt(row['precision'])} | {_fmt(row['abo'])} | "
                     f"{_fmt(row['per_object'])} | {_fmt(row['recall75'])} |")
        out[c] = row
    row = {k: _stats([cell[k] for cell in cells]) for k in ("recall", "precision", "abo", "per_object", "recall75")}
    lines.append(f"| **all** | {sum(c['gt'] for c in cells)} | {_fmt(row['recall'])} | {_fmt(row['precision'])} | "
                 f"{_fmt(row['abo'])} | {_fmt(row['per_object'])} | {_fmt(row['recall75'])} |")
    out["all"] = row
    out["classifier_map"] = _stats([c.get("classifier_map") for c in cells])
    lines.append(f"\nclassifier held-out mAP: {_fmt(out['classifier_map'])}")
    if all(set(c.get("failures_all", ())) == set(FAILURES) for c in cells):
        gt = sum(c["gt"] for c in cells)
        out["failures"] = {k: sum(c["failures_all"][k] for c in cells) / gt for k in FAILURES}
        lines.append("what became of the true objects, over the seeds: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in out["failures"].items()))
    else:  # cells from older code: `--stages pseudo` for these seeds adds the counts
        lines.append("what became of the true objects: not in every cell yet (run --stages pseudo)")
    return out


def _full_table(cells: list[dict], lines: list[str]) -> dict:
    lines += ["| figure | @0.25 | @0.5 | @0.75 |", "|---|---|---|---|"]
    out = {}
    for name in ("weak", "full", "weak/full"):
        row = {}
        for t in ("0.25", "0.5", "0.75"):
            if name == "weak/full":
                vals = [c["weak"][t] / c["full"][t] if c["weak"][t] is not None and c["full"][t] else None
                        for c in cells]
            else:
                vals = [c[name][t] for c in cells]
            row[t] = _stats(vals)
        lines.append(f"| {name} | " + " | ".join(_fmt(row[t], pct=True) for t in ("0.25", "0.5", "0.75")) + " |")
        out[name] = row
    if all("weak_round1" in c for c in cells):  # self-training variants: the first round's model, for comparison
        row = {t: _stats([c["weak_round1"][t] for c in cells]) for t in ("0.25", "0.5", "0.75")}
        lines.append("| weak, first round | " + " | ".join(_fmt(row[t], pct=True) for t in ("0.25", "0.5", "0.75"))
                     + " |")
        out["weak_round1"] = row
    fid = {k: _stats([c["fidelity"][k] for c in cells]) for k in ("recall", "precision", "abo_same_class")}
    lines.append("\nthe masks Mask R-CNN trained on (recall / precision @0.5, ABO): "
                 + " / ".join(_fmt(fid[k]) for k in ("recall", "precision", "abo_same_class")))
    if all("fidelity_round1" in c for c in cells):
        fid1 = {k: _stats([c["fidelity_round1"][k] for c in cells]) for k in ("recall", "precision", "abo_same_class")}
        lines.append("the first round's pseudo masks: " + " / ".join(_fmt(fid1[k]) for k in ("recall", "precision",
                                                                                           "abo_same_class")))
    per_class = {cls: _stats([c["fidelity_per_class"][cls]["recall"] for c in cells])
                 for cls in cells[0]["fidelity_per_class"]}
    lines.append("recall@0.5 per class: " + ", ".join(f"{cls} {_fmt(v)}" for cls, v in per_class.items()))
    per_seed = ", ".join(f"s{c['seed']}: {100 * c['weak']['0.5'] / c['full']['0.5']:.0f}%" for c in cells
                         if c["weak"]["0.5"] is not None and c["full"]["0.5"])
    lines.append(f"\nweak/full @0.5 per seed: {per_seed}; pipeline seconds per cell: "
                 + ", ".join(f"s{c['seed']}: {c['seconds']:.0f}" for c in cells))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bench-quality", help="grid folder (resumable: finished cells are kept)")
    ap.add_argument("--worlds", default="w3,w8", help=f"comma-separated, of {', '.join(WORLDS)}")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated world seeds")
    ap.add_argument("--stages", default="pseudo", help="pseudo (in-process fidelity), pairs (grouping criteria) "
                                                       "and/or full (Mask R-CNN)")
    ap.add_argument("--variants", default="default", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--json", default=None, help="write the result here (default OUT/bench.json)")
    args = ap.parse_args()
    worlds, seeds = args.worlds.split(","), [int(s) for s in args.seeds.split(",")]
    variants, stages = args.variants.split(","), args.stages.split(",")
    for name, known in ((worlds, WORLDS), (variants, VARIANTS), (stages, ("pseudo", "pairs", "full"))):
        unknown = set(name) - set(known)
        if unknown:
            sys.exit(f"bench.quality: unknown {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    for stage in stages:
        for world in worlds:
            for seed in seeds:
                for variant in (variants if stage != "pairs" else ["default"]):
                    t0 = time.time()
                    if stage == "pairs":
                        pairs_cell(args.out, world, seed)
                    else:
                        (pseudo_cell if stage == "pseudo" else full_cell)(args.out, variant, world, seed)
                    print(f"[bench.quality] {stage} {variant} {world} seed {seed}: {time.time() - t0:.0f} s "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    text, summary = tables(args.out, variants, worlds, seeds)
    if "pairs" in stages:
        text += "\n\n### which peaks are one object (same-class peak pairs inside true instances)\n\n"
        text += pairs_table(args.out, worlds, seeds)
    print(text)
    rows = []
    for key, table in summary.items():
        if key.startswith("pseudo/"):
            rows.append({"metric": f"{key} recall@0.5 (mean over seeds)", "value": table["all"]["recall"][0], "unit": ""})
        else:
            rows.append({"metric": f"{key} weak/full mAP^r@0.5 (mean over seeds)",
                         "value": table["weak/full"]["0.5"][0], "unit": ""})
    write_result("quality", rows, args.json or os.path.join(args.out, "bench.json"), tables=text, summary=summary)


if __name__ == "__main__":
    main()

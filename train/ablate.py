"""`maskless ablate`: how much does Mask R-CNN care about pseudo-mask quality?

Ground-truth masks are degraded in controlled ways (erode/dilate by k px, drop a fraction of instances,
merge touching same-class instances, shift by k px), written as pseudo masks (pseudo.json) beside the
untouched gt.json, and Mask R-CNN is trained on each level with everything else fixed. The result is final
mAP^r against the fidelity of the training masks (ABO vs ground truth), one point per level.
"""
from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np

from maskless.core import masks as ingest_masks
from maskless.core import shards, storage
from maskless.core import metrics
from maskless.core.linked import linked_groups

log = logging.getLogger(__name__)

KINDS = {"clean": None, "erode": int, "dilate": int, "drop": float, "merge": int, "shift": int}
DEFAULT_LEVELS = ["clean", "erode:2", "dilate:2", "drop:0.3", "merge:3", "shift:3"]
# Every level trains with exactly these settings: the demo's Mask R-CNN recipe (examples/demo.yaml), small
# enough for a CPU run on the default world, which is the demo's world, so the `clean` level trains the
# demo's fully supervised configuration. From scratch it needs the gradient clipping (docs/TRAIN.md).
DEFAULT_TRAIN = {"arch": "resnet18_fpn", "weights": "none", "min_size": 128, "max_size": 128,
                 "anchor_sizes": [16, 32, 64, 128, 256], "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
                 "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64,
                 "box_detections_per_img": 20, "batch_size": 4, "epochs": 5, "lr": 0.01, "clip_grad_norm": 5.0,
                 "warmup_iters": 50, "lr_steps": [4], "loader_workers": 0, "cpus_per_worker": 2}


@dataclass
class AblateConfig:
    gt: Optional[str] = field(default=None, metadata={
        "help": "VOC folder with train/val splits; unset: a synthetic world made in OUT/world"})
    train_split: str = field(default="train", metadata={"help": "split trained on (degraded)"})
    val_split: str = field(default="val", metadata={"help": "split evaluated on (never degraded)"})
    levels: list[str] = field(default_factory=lambda: list(DEFAULT_LEVELS), metadata={
        "help": "degradations: clean, erode:K, dilate:K (px), drop:F (fraction), merge:G (gap px), shift:K (px)"})
    protocol: str = field(default="voc", metadata={"help": "scoring protocol", "choices": ["voc", "coco101"]})
    world_classes: int = field(default=3, metadata={"help": "classes of the default world"})
    world_images: int = field(default=120, metadata={"help": "images of the default world"})
    world_size: int = field(default=128, metadata={"help": "image size of the default world"})
    train: dict = field(default_factory=lambda: dict(DEFAULT_TRAIN), metadata={
        "help": "TrainConfig options shared by every level (YAML only)"})
    seed: int = field(default=0, metadata={"help": "seed of the world, the degradations and training"})
    out: str = field(default="ablate-out", metadata={"help": "output folder"})

    def validate(self) -> None:
        if not self.levels:
            raise ValueError("--levels needs at least one degradation level, e.g. clean,erode:2")
        for level in self.levels:
            parse_level(level)
        if len(set(map(level_name, self.levels))) != len(self.levels):
            raise ValueError(f"--levels has duplicates: {self.levels}")
        if self.protocol not in metrics.PROTOCOLS:
            raise ValueError(f"--protocol must be one of {metrics.PROTOCOLS}")
        bad = {"data", "out", "masks"} & set(self.train)
        if bad:
            raise ValueError(f"train options {sorted(bad)} are set by the ablation itself; remove them")


def parse_level(level: str) -> tuple[str, float | int | None]:
    """'erode:2' -> ('erode', 2); 'clean' -> ('clean', None). Clear errors for anything else."""
    kind, _, arg = level.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown degradation {level!r}; use one of clean, erode:K, dilate:K, drop:F, merge:G, shift:K")
    if kind == "clean":
        if arg:
            raise ValueError(f"'clean' takes no argument, got {level!r}")
        return kind, None
    try:
        value = KINDS[kind](arg)
    except ValueError:
        raise ValueError(f"degradation {level!r}: {arg!r} is not a {KINDS[kind].__name__}") from None
    if kind == "drop" and not 0 <= value <= 1:
        raise ValueError(f"degradation {level!r}: the dropped fraction must be in [0, 1]")
    if kind != "drop" and value < 0:
        raise ValueError(f"degradation {level!r}: pixels must be 0 or more")
    return kind, value


def level_name(level: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", level.replace(":", "-"))


# ---------------------------------------------------------------------------------------------- degradations

def _disk(k: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))


def erode(masks: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Each mask eroded by a disk of radius k; masks that vanish are returned empty (and later dropped)."""
    return [cv2.erode(m.astype(np.uint8), _disk(k)) > 0 for m in masks] if k else list(masks)


def dilate(masks: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Each mask dilated by a disk of radius k (masks may then overlap, as pseudo masks do)."""
    return [cv2.dilate(m.astype(np.uint8), _disk(k)) > 0 for m in masks] if k else list(masks)


def shift(masks: list[np.ndarray], k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each mask moved k px in its own random direction (rounded to whole pixels); what leaves the image is cut."""
    out = []
    for m in masks:
        angle = rng.uniform(0, 2 * np.pi)
        dy, dx = int(round(k * np.sin(angle))), int(round(k * np.cos(angle)))
        moved = np.zeros_like(m)
        h, w = m.shape
        moved[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = m[max(-dy, 0):h - max(dy, 0),
                                                                        max(-dx, 0):w - max(dx, 0)]
        out.append(moved)
    return out


def merge(masks: list[np.ndarray], labels: list[str], gap: int) -> tuple[list[np.ndarray], list[str]]:
    """Union of same-class instances that touch (closer than `gap` px: VOC separates touching objects by
    a void band), transitively; other instances are kept as they are, in their order."""
    grown = dilate(masks, gap)
    group = linked_groups(len(masks), lambda i, j: labels[i] == labels[j] and bool((grown[i] & masks[j]).any()))
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        groups.setdefault(g, []).append(i)
    merged = [np.logical_or.reduce([masks[i] for i in g]) for g in groups.values()]
    return merged, [labels[g[0]] for g in groups.values()]


def plan_drops(counts: dict[str, int], fraction: float, seed: int) -> set[tuple[str, int]]:
    """Exactly round(fraction * total) instances to drop, as (image key, instance index), chosen
    uniformly over the whole dataset; a pure function of the counts and the seed."""
    keys = sorted(counts)
    slots = [(k, i) for k in keys for i in range(counts[k])]
    n = int(round(fraction * len(slots)))
    chosen = np.random.default_rng(seed).choice(len(slots), size=n, replace=False) if n else []
    return {slots[i] for i in chosen}


def degrade(key: str, masks: list[np.ndarray], labels: list[str], level: str, seed: int,
            drops: set[tuple[str, int]] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """One image's instances at a degradation level; instances left empty are removed."""
    kind, value = parse_level(level)
    if kind == "erode":
        masks = erode(masks, value)
    elif kind == "dilate":
        masks = dilate(masks, value)
    elif kind == "shift":
        masks = shift(masks, value, np.random.default_rng([seed, zlib.crc32(key.encode())]))
    elif kind == "merge":
        masks, labels = merge(masks, labels, value)
    elif kind == "drop":
        keep = [i for i in range(len(masks)) if (key, i) not in (drops or set())]
        masks, labels = [masks[i] for i in keep], [labels[i] for i in keep]
    kept = [i for i, m in enumerate(masks) if m.any()]
    return [masks[i] for i in kept], [labels[i] for i in kept]


def write_degraded(src: str, dst: str, level: str, seed: int = 0) -> dict:
    """Copy a gt shard dataset to `dst` with pseudo.json = degraded ground truth (gt.json untouched).

    One output shard per input shard, same name; shards already complete in `dst` are skipped, so a
    rerun finishes the rest. Returns dataset.json of `dst`."""
    info = shards.read_dataset_info(src)
    kind, value = parse_level(level)
    drops = None
    if kind == "drop":
        table = shards.read_manifest(src).to_pydict()
        drops = plan_drops(dict(zip(table["key"], [n or 0 for n in table["gt_instances"]])), value, seed)

    def degraded(s: shards.Sample) -> shards.Sample:
        inst = (s.gt or {}).get("instances", [])
        masks, labels = degrade(s.key, [ingest_masks.decode(i["mask"]) for i in inst],
                                [i["class"] for i in inst], level, seed, drops)
        pseudo = []
        for m, c in zip(masks, labels):
            rle = ingest_masks.encode(m)
            pseudo.append({"class": c, "score": 1.0, "mask": rle, "bbox": ingest_masks.bbox_xywh(rle)})
        s.pseudo = {"instances": pseudo, "classifier": None, "rule": f"degraded:{level}",
                    "proposals": "ground truth"}
        return s

    shards.map_shards(src, dst, degraded)
    return shards.write_dataset_info(dst, info["classes"], stage="ablate-degrade", level=level, source=src, seed=seed)


def fidelity(root: str) -> dict:
    """How close a dataset's pseudo masks are to its ground truth: ABO (same class and any class,
    chainercv void rule), and instance and pixel counts relative to the ground truth."""
    samples = list(shards.read_dataset(root))
    info = shards.read_dataset_info(root)
    gt = metrics.GroundTruth.from_samples(samples, info["classes"])
    preds = [{"image_id": s.key, "category": i["class"], "segmentation": i["mask"], "score": i.get("score", 1.0)}
             for s in samples for i in (s.pseudo or {}).get("instances", [])]
    ev = metrics.evaluate(gt, preds, protocols=())
    gt_pixels = sum(ingest_masks.area(i["mask"]) for s in samples for i in s.gt["instances"])
    pseudo_pixels = sum(ingest_masks.area(p["segmentation"]) for p in preds)
    return {"abo_same_class": ev.abo("same_class")["mean_over_instances"],
            "abo_any_class": ev.abo("any_class")["mean_over_instances"],
            "gt_instances": gt.n_instances, "pseudo_instances": len(preds),
            "pixel_ratio": pseudo_pixels / gt_pixels if gt_pixels else None}


# ---------------------------------------------------------------------------------------------- the run

def _train_and_evaluate(cfg: AblateConfig, data: str, val: str, name: str) -> dict:
    """Train on one level's pseudo masks and score on the untouched val split (thin by design)."""
    from maskless.train.evaluate import EvalConfig, run_eval
    from maskless.train.trainer import TrainConfig, run_train

    tcfg = TrainConfig(**{**cfg.train, "data": data, "out": storage.join(cfg.out, "runs", name), "masks": "pseudo",
                          "seed": cfg.train.get("seed", cfg.seed)})
    summary = run_train(tcfg)
    model = summary.get("model") or storage.join(tcfg.out, "model.pt")
    return run_eval(EvalConfig(gt=val, model=model, protocol=cfg.protocol, overlays=2,
                               out=storage.join(cfg.out, "eval", name)))


def prepare_data(cfg: AblateConfig) -> tuple[str, str]:
    """Train and val shards with ground truth: from cfg.gt (VOC folder) or a world made in OUT/world."""
    from maskless.ingest.voc import import_voc

    root = cfg.gt
    if root is None:
        from maskless.ingest.world import make_world

        root = storage.join(cfg.out, "world")
        if not storage.exists(storage.join(root, "world.json")):
            make_world(root, classes=cfg.world_classes, images=cfg.world_images, seed=cfg.seed, size=cfg.world_size)
    train, val = storage.join(cfg.out, "data", "train"), storage.join(cfg.out, "data", "val")
    import_voc(root, train, split=cfg.train_split)
    import_voc(root, val, split=cfg.val_split)
    return train, val


def run_ablate(cfg: AblateConfig) -> dict:
    """Every level: degrade, measure fidelity, train, evaluate; then plot mAP against fidelity.
    A level whose result.json exists is not redone, so a rerun finishes the rest."""
    cfg.validate()
    storage.makedirs(cfg.out)
    train, val = prepare_data(cfg)
    results = []
    for level in cfg.levels:
        name = level_name(level)
        level_dir = storage.join(cfg.out, "levels", name)
        result_path = storage.join(level_dir, "result.json")
        if storage.exists(result_path):
            results.append(storage.read_json(result_path))
            continue
        data = storage.join(level_dir, "data")
        write_degraded(train, data, level, seed=cfg.seed)
        fid = fidelity(data)
        log.info("level %s: ABO %.3f, %d of %d instances", level, fid["abo_same_class"], fid["pseudo_instances"],
                 fid["gt_instances"])
        scored = _train_and_evaluate(cfg, data, val, name)
        result = {"level": level, "fidelity": fid, "protocol": cfg.protocol, "mAP": scored["mAP"][cfg.protocol],
                  "eval": scored["out"]}
        storage.write_json_atomic(result_path, result)
        results.append(result)
    summary = {"out": cfg.out, "protocol": cfg.protocol, "fidelity": "ABO of the training masks vs ground truth "
               "(same class, chainercv void rule)", "train": cfg.train, "levels": results}
    storage.write_bytes_atomic(storage.join(cfg.out, "ablate.png"), plot(results, cfg.protocol))
    storage.write_json_atomic(storage.join(cfg.out, "ablate.json"), summary)
    return summary


def plot(results: list[dict], protocol: str) -> bytes:
    """Final mAP^r (one line per threshold) against the training masks' ABO, a labelled point per level."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    x = [100 * r["fidelity"]["abo_same_class"] for r in results]
    for t in results[0]["mAP"] if results else []:
        y = [100 * (r["mAP"][t] or 0) for r in results]
        order = np.argsort(x)
        ax.plot(np.array(x)[order], np.array(y)[order], "o-", label=f"mAP^r@{t} ({protocol})")
    for r, xi in zip(results, x):
        ax.annotate(r["level"], (xi, 100 * (r["mAP"].get("0.5") or 0)), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xlabel="training-mask fidelity: ABO vs ground truth (%)", ylabel=f"final mAP^r (%), {protocol}",
           title="Mask R-CNN vs pseudo-mask quality")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()

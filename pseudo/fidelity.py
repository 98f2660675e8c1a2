"""`maskless pseudo-eval`: how faithful are the pseudo masks to the ground truth?

On shards holding both `pseudo.json` and `gt.json` (the pseudo stage run on an import with ground truth):
  - ABO, average best overlap: per ground-truth instance, the best IoU of any pseudo instance, averaged;
    two variants: `abo_same_class` (only pseudo instances of the instance's class count; the headline
    figure) and `abo_any_class` (class-agnostic: any pseudo instance);
  - instance precision and recall at an IoU threshold (0.5): pseudo instances in score order each take
    the same-class ground truth of highest IoU; under the threshold or already taken -> false positive
    (the VOC instance-segmentation matching rule, no fallback to the second best);
  - semantic IoU of the union of each class's masks, accumulated over the dataset, with background as
    a class (VOC convention), void pixels ignored; mIoU = mean over background and the classes.
Instance IoUs are plain mask IoUs (void pixels count in the union, as chainercv's evaluator does).
Outputs OUT/fidelity.json, OUT/fidelity.md and OUT/fidelity.png (pseudo vs true masks).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
import numpy as np

from maskless.core import masks as rle
from maskless.core import metrics, shards, storage

log = logging.getLogger(__name__)


@dataclass
class FidelityConfig:
    data: str = field(default="", metadata={"help": "shards with pseudo.json and gt.json (pseudo stage output)"})
    out: str = field(default="", metadata={"help": "report folder: fidelity.json, fidelity.md, fidelity.png"})
    iou: float = field(default=0.5, metadata={"help": "IoU threshold of instance precision and recall"})
    grid_images: int = field(default=8, metadata={"help": "images in the picture grid (0 = no picture)"})
    max_images: int = field(default=0, metadata={"help": "evaluate at most this many images (0 = all)"})

    def validate(self) -> None:
        if not self.data or not self.out:
            raise ValueError("pseudo-eval needs --data (pseudo shards with gt.json) and --out (report folder)")
        if not 0 < self.iou <= 1:
            raise ValueError(f"--iou must be in (0, 1], got {self.iou}")
        if self.grid_images < 0 or self.max_images < 0:
            raise ValueError("--grid-images and --max-images must be >= 0")


class FidelityAccumulator:
    """Adds images one at a time; `result()` gives the metrics. Kept apart from the files so the
    benchmark can score in-process pseudo masks the same way. The instance figures come from the
    benchmark's own metrics (maskless.core.metrics: ABO and the VOC matching rule); the semantic IoU
    is accumulated here, image by image."""

    def __init__(self, classes: list[str], iou: float = 0.5):
        self.classes, self.iou = list(classes), iou
        self._gt: list[tuple[str, tuple[int, int], dict]] = []
        self._pseudo: list[dict] = []  # COCO results
        self.n_pseudo = dict.fromkeys(classes, 0)
        self.inter = np.zeros(len(classes) + 1)
        self.union = np.zeros(len(classes) + 1)
        self.images = 0

    def _check(self, name: str) -> None:
        if name not in self.classes:
            raise ValueError(f"class {name!r} is not one of the dataset's classes {self.classes}")

    def add(self, gt: dict, pseudo: dict, size: tuple[int, int], key: str | None = None) -> None:
        """One image of (height, width) `size`: gt = gt.json, pseudo = pseudo.json (FORMAT.md)."""
        g, p = gt["instances"], pseudo["instances"]
        for inst in g + p:
            self._check(inst["class"])
        key = key or f"image_{self.images}"
        self._gt.append((key, size, gt))
        for inst in p:
            self.n_pseudo[inst["class"]] += 1
            self._pseudo.append({"image_id": key, "category": inst["class"], "segmentation": inst["mask"],
                                 "score": float(inst.get("score", 1.0))})
        self._semantic(gt, g, p, size)
        self.images += 1

    def _semantic(self, gt: dict, g: list[dict], p: list[dict], size: tuple[int, int]) -> None:
        valid = ~rle.decode(gt["void"]) if gt.get("void") else np.ones(size, bool)
        for k, c in enumerate(self.classes, start=1):
            gu, pu = self._union(g, c, size), self._union(p, c, size)
            self.inter[k] += (gu & pu & valid).sum()
            self.union[k] += ((gu | pu) & valid).sum()
        gb, pb = ~self._union(g, None, size), ~self._union(p, None, size)
        self.inter[0] += (gb & pb & valid).sum()
        self.union[0] += ((gb | pb) & valid).sum()

    @staticmethod
    def _union(instances: list[dict], cls: str | None, size: tuple[int, int]) -> np.ndarray:
        out = np.zeros(size, bool)
        for i in instances:
            if cls is None or i["class"] == cls:
                out |= rle.decode(i["mask"])
        return out

    def result(self) -> dict:
        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        gt = metrics.GroundTruth.from_annotations(self._gt, self.classes)
        ev = metrics.evaluate(gt, self._pseudo, protocols=("voc",), thresholds=[self.iou])
        tp = dict(zip(self.classes, ev.protocols["voc"].true_positives[0].tolist()))
        n_gt = dict(zip(self.classes, ev.n_gt.tolist()))
        same, any_class = ev.abo("same_class"), ev.abo("any_class")
        per_class = {}
        for k, c in enumerate(self.classes, start=1):
            per_class[c] = {
                "gt_instances": n_gt[c], "pseudo_instances": self.n_pseudo[c], "true_positives": tp[c],
                "abo_same_class": same["per_class"][c], "abo_any_class": any_class["per_class"][c],
                "precision": ratio(tp[c], self.n_pseudo[c]), "recall": ratio(tp[c], n_gt[c]),
                "iou": ratio(self.inter[k], self.union[k]),
            }
        n_tp, n_p, n_g = sum(tp.values()), sum(self.n_pseudo.values()), sum(n_gt.values())
        missing = [c for c in self.classes if n_gt[c] and not self.n_pseudo[c]]
        ious = [self.inter[k] / self.union[k] for k in range(len(self.classes) + 1) if self.union[k]]
        return {
            "images": self.images, "gt_instances": n_g, "pseudo_instances": n_p, "iou_threshold": self.iou,
            "abo_same_class": same["mean_over_instances"], "abo_any_class": any_class["mean_over_instances"],
            "precision": ratio(n_tp, n_p), "recall": ratio(n_tp, n_g),
            "miou": float(np.mean(ious)) if ious else None,
            "background_iou": ratio(self.inter[0], self.union[0]),
            "classes_without_pseudo_instances": missing,
            "per_class": per_class,
        }


def image_size(s: shards.Sample) -> tuple[int, int]:
    """(height, width) from the metadata, else from the decoded image."""
    if s.meta.get("height") and s.meta.get("width"):
        return int(s.meta["height"]), int(s.meta["width"])
    w, h = s.image().size
    return h, w


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(result: dict, data: str) -> str:
    lines = [f"# Pseudo-mask fidelity of `{data}`", "",
             f"{result['images']} images, {result['gt_instances']} ground-truth and {result['pseudo_instances']} "
             f"pseudo instances. ABO same-class is the headline (pseudo instances of the instance's class only); "
             f"precision/recall at IoU {result['iou_threshold']}; mIoU over background and the classes.", "",
             "| class | gt | pseudo | ABO same-class | ABO any-class | precision | recall | semantic IoU |",
             "|---|---|---|---|---|---|---|---|"]
    for c, r in result["per_class"].items():
        lines.append(f"| {c} | {r['gt_instances']} | {r['pseudo_instances']} | {_fmt(r['abo_same_class'])} | "
                     f"{_fmt(r['abo_any_class'])} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['iou'])} |")
    lines.append(f"| **all** | {result['gt_instances']} | {result['pseudo_instances']} | "
                 f"{_fmt(result['abo_same_class'])} | {_fmt(result['abo_any_class'])} | {_fmt(result['precision'])} | "
                 f"{_fmt(result['recall'])} | mIoU {_fmt(result['miou'])} |")
    lines += [""] + missing_lines(result)
    return "\n".join(lines) + "\n"


def missing_lines(result: dict) -> list[str]:
    """The classes with true instances and no pseudo instance, and why when the pseudo stage said
    (no peak anywhere, or peaks but no mask): a model trained on these masks never sees them."""
    no_peak = set(result.get("classes_without_peaks") or [])
    lines = []
    for c in result["classes_without_pseudo_instances"]:
        why = "no peak in any image" if c in no_peak else "peaks, but no pseudo instance"
        lines.append(f"- **{c}: no pseudo instance at all** ({result['per_class'][c]['gt_instances']} true instances; "
                     f"{why}): a model trained on these masks never sees this class.")
    return lines


def picture_grid(samples: list[shards.Sample], classes: list[str]) -> bytes:
    """PNG: one row per image, pseudo masks left, true masks right, instances outlined and named."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 2, figsize=(6, 3 * len(samples)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for row, s in enumerate(samples):
        image = np.asarray(s.image())
        for col, (title, insts) in enumerate((("pseudo", s.pseudo["instances"]), ("true", s.gt["instances"]))):
            ax = axes[row, col]
            overlay = image.astype(float) / 255
            for k, inst in enumerate(insts):
                m = rle.decode(inst["mask"])
                colour = np.array(colours(k % 10)[:3])
                overlay[m] = 0.5 * overlay[m] + 0.5 * colour
                ax.contour(m, levels=[0.5], colors=[colour], linewidths=0.8)
                x, y, _, _ = inst["bbox"]
                ax.text(x, y, inst["class"], fontsize=6, color="white", backgroundcolor=colour, va="top")
            ax.imshow(overlay)
            ax.set_title(f"{s.key}: {title} ({len(insts)})", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run_fidelity(cfg: FidelityConfig) -> dict:
    """Score the pseudo masks of cfg.data against its ground truth; write the report into cfg.out."""
    cfg.validate()
    if not shards.list_shards(cfg.data):
        raise FileNotFoundError(f"--data {cfg.data} holds no complete shard: run `maskless pseudo` first")
    classes = shards.read_dataset_info(cfg.data)["classes"]
    acc, grid, no_gt = FidelityAccumulator(classes, cfg.iou), [], 0
    for s in shards.read_dataset(cfg.data):
        if cfg.max_images and acc.images >= cfg.max_images:
            break
        if s.pseudo is None:
            raise ValueError(f"sample {s.key} of {cfg.data} has no pseudo.json: run `maskless pseudo` on it first")
        if s.gt is None:
            no_gt += 1
            continue
        acc.add(s.gt, s.pseudo, image_size(s), s.key)
        if len(grid) < cfg.grid_images:
            grid.append(s)
    if acc.images == 0:
        raise ValueError(f"no sample of {cfg.data} has gt.json: fidelity needs data with ground truth "
                         f"(e.g. an imported VOC split or the synthetic world)")
    info = shards.read_dataset_info(cfg.data)
    result = {**acc.result(), "data": cfg.data, "samples_without_gt": no_gt,
              "classes_without_peaks": info.get("classes_without_peaks")}  # as the pseudo stage counted them
    for line in missing_lines(result):
        log.warning("fidelity: %s", line.removeprefix("- ").replace("**", ""))
    storage.makedirs(cfg.out)
    storage.write_json_atomic(storage.join(cfg.out, "fidelity.json"), result)
    storage.write_bytes_atomic(storage.join(cfg.out, "fidelity.md"), markdown(result, cfg.data).encode())
    if grid:
        storage.write_bytes_atomic(storage.join(cfg.out, "fidelity.png"), picture_grid(grid, classes))
    log.info("fidelity: ABO %s, precision %s, recall %s, mIoU %s", _fmt(result["abo_same_class"]),
             _fmt(result["precision"]), _fmt(result["recall"]), _fmt(result["miou"]))
    return result

"""Evaluation report: report.json, report.md and a self-contained report.html (figures embedded as base64).

Measured numbers come only from an `Evaluation`; published numbers are a separate, labelled side table
and never enter the measured table. Every AP in the reports names the protocol that produced it.
"""
from __future__ import annotations

import base64
import html
import io
import logging
from typing import Sequence

import numpy as np

from maskless.core import masks as ingest_masks
from maskless.core import shards, storage
from maskless.core.metrics import Evaluation, GroundTruth, Predictions

log = logging.getLogger(__name__)

# Published VOC 2012 val mAP^r (image-level supervision), copied from the papers (docs/REFERENCES.md).
# "protocol" says how each paper scored, as far as the sources tell; these are NOT measured here.
PUBLISHED: list[dict] = [
    {"method": "PRM", "25": 44.3, "50": 26.8, "75": 9.0, "extra": "MCG proposals", "protocol": "voc (chainercv)"},
    {"method": "IAM", "25": 45.9, "50": 28.3, "75": 11.9, "extra": "proposals", "protocol": "not stated in our sources"},
    {"method": "Label-PEnet", "25": 49.2, "50": 30.2, "75": 12.9, "extra": "region proposals",
     "protocol": "not stated in our sources"},
    {"method": "WISE (+Mask R-CNN)", "25": 49.2, "50": 41.7, "75": 23.7, "extra": "SharpMask (COCO-trained) proposals",
     "protocol": "coco101, void removed from predictions, score >= 0.5"},
    {"method": "IRN (+Mask R-CNN)", "25": None, "50": 46.7, "75": None, "extra": "none", "protocol": "voc (chainercv)"},
    {"method": "LIID (+Mask R-CNN)", "25": None, "50": 48.4, "75": 24.9, "extra": "proposals + salient instances",
     "protocol": "not stated in our sources"},
    {"method": "Arun et al. (+Mask R-CNN)", "25": 59.7, "50": 50.9, "75": 28.5, "extra": "proposals",
     "protocol": "not stated in our sources"},
    {"method": "BESTIE (+Mask R-CNN)", "25": 61.2, "50": 51.0, "75": 26.6,
     "extra": "none (semantic-segmentation maps + peak points)", "protocol": "voc (chainercv)"},
    {"method": "CIM (+Mask R-CNN)", "25": 68.7, "50": 55.9, "75": 30.9, "extra": "proposals",
     "protocol": "pycocotools COCOeval"},
    {"method": "fully supervised Mask R-CNN", "25": 76.7, "50": 67.9, "75": 44.9, "extra": "masks",
     "protocol": "not stated in our sources"},
]
PUBLISHED_NOTE = ("Published on PASCAL VOC 2012 val (1,449 images), mAP^r in %, as reported by each paper; "
                  "not measured by maskless and not comparable across protocols.")


def write_report(out: str, ev: Evaluation, gt: GroundTruth, preds: Predictions, meta: dict | None = None,
                 overlays: int = 4, title: str = "maskless evaluation") -> dict:
    """Write report.json, report.md, report.html (and the figures as PNGs) into `out`; return report.json."""
    storage.makedirs(out)
    report = {"title": title, **(meta or {}), "measured": ev.to_dict(),
              "published": {"note": PUBLISHED_NOTE, "rows": PUBLISHED}}
    figures = _figures(ev, gt, preds, overlays)
    for name, png in figures.items():
        storage.write_bytes_atomic(storage.join(out, name + ".png"), png)
    report["figures"] = sorted(f"{n}.png" for n in figures)
    storage.write_json_atomic(storage.join(out, "report.json"), report)
    storage.write_bytes_atomic(storage.join(out, "report.md"), _markdown(report).encode())
    storage.write_bytes_atomic(storage.join(out, "report.html"), _html(report, figures).encode())
    return report


# ---------------------------------------------------------------------------------------------- tables

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def measured_tables(m: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(caption, header, rows) per protocol: AP per class and threshold, mAP last; then ABO."""
    tables = []
    for name, p in m["protocols"].items():
        thr = list(p["thresholds"])
        header = ["class"] + [f"AP@{t} ({name})" for t in thr]
        rows = [[c] + [_pct(p["thresholds"][t]["AP"][c]) for t in thr] for c in m["classes"]]
        rows.append(["**mAP^r**"] + [_pct(p["thresholds"][t]["mAP"]) for t in thr])
        tables.append((f"Measured, protocol `{name}`: {p['rule']}. Void: {m['void']}. In %.", header, rows))
    abo = m["abo"]
    header = ["class", "ABO same class", "ABO any class"]
    rows = [[c, _pct(abo["same_class"]["per_class"][c]), _pct(abo["any_class"]["per_class"][c])] for c in m["classes"]]
    rows.append(["**mean over instances**", _pct(abo["same_class"]["mean_over_instances"]),
                 _pct(abo["any_class"]["mean_over_instances"])])
    rows.append(["**mean over classes**", _pct(abo["same_class"]["mean_over_classes"]),
                 _pct(abo["any_class"]["mean_over_classes"])])
    tables.append(("Measured ABO (average best overlap of each ground-truth instance with any prediction, "
                   f"same class or any class; no score threshold). Void: {m['void']}. In %.", header, rows))
    return tables


def published_table() -> tuple[str, list[str], list[list[str]]]:
    header = ["method (PUBLISHED)", "mAP^r@0.25", "mAP^r@0.5", "mAP^r@0.75", "extra supervision", "protocol"]
    rows = [[r["method"]] + ["-" if r[k] is None else f"{r[k]:.1f}" for k in ("25", "50", "75")]
            + [r["extra"], r["protocol"]] for r in PUBLISHED]
    return PUBLISHED_NOTE, header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    m = report["measured"]
    parts = [f"# {report['title']}", "", _summary_line(report), ""]
    for caption, header, rows in measured_tables(m):
        parts += [caption, "", _md_table(header, rows), ""]
    parts += ["## Published results (side table, not measured here)", ""]
    caption, header, rows = published_table()
    parts += [caption, "", _md_table(header, rows), ""]
    parts += ["## Figures", ""] + [f"![{f}]({f})" for f in report["figures"]] + [""]
    return "\n".join(parts)


def _summary_line(report: dict) -> str:
    m = report["measured"]
    bits = [f"{m['images']} images, {m['predictions']} predictions, {sum(m['gt_instances'].values())} "
            f"ground-truth instances; protocols: {', '.join(m['protocols'])}; void: {m['void']}; "
            f"max detections per image and class (coco101): {m['max_dets']}."]
    for k in ("gt", "split", "predictions_file", "model", "scoring_seconds"):
        if report.get(k) is not None:
            bits.append(f"{k}: {report[k]}.")
    return " ".join(bits)


def _html(report: dict, figures: dict[str, bytes]) -> str:
    esc = html.escape

    def table(caption, header, rows, cls=""):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c.strip('*'))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table class='{cls}'><caption>{esc(caption)}</caption><tr>{head}</tr>{body}</table>"

    parts = [f"<h1>{esc(report['title'])}</h1>", f"<p>{esc(_summary_line(report))}</p>", "<h2>Measured</h2>"]
    parts += [table(*t) for t in measured_tables(report["measured"])]
    parts += ["<h2>Published results (side table, not measured here)</h2>", table(*published_table(), cls="published")]
    parts.append("<h2>Figures</h2>")
    for name, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'/>"
                     f"<figcaption>{esc(_FIGURE_CAPTIONS.get(name.split('-')[0], name))} ({esc(name)})</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #999;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
             "caption{text-align:left;font-weight:bold}table.published{background:#f4f4f4}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(report['title'])}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


_FIGURE_CAPTIONS = {
    "pr": "Precision/recall per class and threshold",
    "ap": "AP per class",
    "best": "Best images (highest same-class ABO): ground truth outlined white, predictions with score >= 0.5 filled",
    "worst": "Worst images (lowest same-class ABO): ground truth outlined white, predictions with score >= 0.5 filled",
}


# ---------------------------------------------------------------------------------------------- figures

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figures(ev: Evaluation, gt: GroundTruth, preds: Predictions, overlays: int) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    present = [c for c in range(len(ev.classes)) if ev.n_gt[c] > 0]
    for name, r in ev.protocols.items():
        if not present:
            break
        ncol = min(5, len(present))
        nrow = (len(present) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 2.6 * nrow), squeeze=False,
                                 layout="constrained")
        for ax in axes.flat[len(present):]:
            ax.axis("off")
        for ax, c in zip(axes.flat, present):
            for ti, t in enumerate(r.thresholds):
                rec, prec = r.curves[ti][c]
                ax.plot(rec, prec, label=f"IoU {t:g}: AP {100 * r.ap[ti, c]:.1f}")
            ax.set(title=ev.classes[c], xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
            ax.legend(fontsize=6, loc="lower left")
        fig.suptitle(f"precision/recall, protocol {name}")
        out[f"pr-{name}"] = _png(fig)

        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(present) * len(r.thresholds)), 3.5))
        width = 0.8 / len(r.thresholds)
        for ti, t in enumerate(r.thresholds):
            ax.bar(np.arange(len(present)) + ti * width, 100 * r.ap[ti, present], width, label=f"IoU {t:g}")
        ax.set_xticks(np.arange(len(present)) + 0.4 - width / 2, [ev.classes[c] for c in present], rotation=45,
                      ha="right")
        ax.set(ylabel=f"AP (%), {name}", ylim=(0, 100), title=f"AP per class, protocol {name}")
        ax.legend(fontsize=7)
        out[f"ap-{name}"] = _png(fig)

    if overlays > 0:
        per_image = ev.image_abo()
        ranked = sorted(per_image, key=lambda k: (per_image[k], k))
        jpgs = _read_images(gt.shard_root, set(ranked[:overlays] + ranked[-overlays:]))
        if jpgs:
            for name, keys in (("best", ranked[::-1][:overlays]), ("worst", ranked[:overlays])):
                keys = [k for k in keys if k in jpgs]
                if keys:
                    out[f"{name}-images"] = _overlay_figure(keys, per_image, jpgs, gt, preds, ev.classes)
        else:
            log.info("no images readable from %s: overlays skipped", gt.shard_root)
    return out


def _read_images(root: str | None, keys: set[str]) -> dict[str, bytes]:
    """JPEG bytes of the given sample keys, reading only the shards that hold them."""
    if not root or not keys:
        return {}
    manifest = shards.read_manifest(root).to_pydict()
    wanted = {s for k, s in zip(manifest["key"], manifest["shard"]) if k in keys}
    found = {}
    for name in sorted(wanted):
        for s in shards.read_shard(storage.join(root, name + ".tar")):
            if s.key in keys and s.jpg:
                found[s.key] = s.jpg
    return found


def _overlay_figure(keys: Sequence[str], per_image: dict, jpgs: dict, gt: GroundTruth, preds: Predictions,
                    classes: list[str]) -> bytes:
    import matplotlib.pyplot as plt
    from PIL import Image
    from skimage.segmentation import find_boundaries

    index = {k: i for i, k in enumerate(gt.keys)}
    colours = plt.get_cmap("tab20")(np.arange(20))[:, :3]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        i = index[key]
        img = np.asarray(Image.open(io.BytesIO(jpgs[key])).convert("RGB"), float) / 255
        sel = np.flatnonzero(preds.image == i)
        shown = [j for j in sel if preds.score[j] >= 0.5] or list(sel[:5])
        for n, j in enumerate(shown):
            m = ingest_masks.decode(preds.rles[j])
            img[m] = 0.5 * img[m] + 0.5 * colours[n % 20]
        for g in gt.masks[i]:
            img[find_boundaries(ingest_masks.decode(g), mode="inner")] = 1.0
        ax.imshow(img)
        ax.set_title(f"{key}\nABO {100 * per_image[key]:.1f}", fontsize=8)
        ax.axis("off")
        names = sorted({classes[preds.label[j]] for j in shown})
        ax.text(0, 1.0, ", ".join(names), fontsize=6, va="bottom", transform=ax.transAxes)
    return _png(fig)

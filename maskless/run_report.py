"""The report of a `maskless run`: weak supervision (pseudo masks), full supervision (true masks of the
same images, same training budget) and the pseudo masks' own fidelity, side by side, with the
published VOC 2012 numbers as a separate reference table."""
from __future__ import annotations

from maskless.core import storage
from maskless.train.report import _md_table, _pct, published_table


def _ap_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    runs = [(name, results.get(f"eval_{key}")) for name, key in
            (("weak: Mask R-CNN on pseudo masks", "weak"), ("full: Mask R-CNN on true masks", "full"),
             ("weak, self-trained: Mask R-CNN on the weak model's relabelled masks", "relabel"))]
    runs = [(n, r) for n, r in runs if r]
    full = results.get("eval_full")
    header, rows = ["model"], []
    if not runs:
        return header, rows
    columns = [(p, t) for p, vals in runs[0][1]["mAP"].items() for t in vals]
    header += [f"mAP^r@{t} ({p})" for p, t in columns] + ["ABO (same class)"]
    for name, r in runs:
        rows.append([name] + [_pct(r["mAP"][p][t]) for p, t in columns] + [_pct(r.get("abo_same_class"))])
    for label, key in (("weak / full", "eval_weak"), ("self-trained / full", "eval_relabel")):
        weak = results.get(key)
        if not (weak and full):
            continue
        ratio = []
        for p, t in columns:
            w, f = weak["mAP"][p][t], full["mAP"][p][t]
            ratio.append("-" if w is None or not f else f"{100 * w / f:.0f}% of full")
        rows.append([label] + ratio + [""])
    return header, rows


def write_run_report(out: str, results: dict) -> str:
    """Write OUT/report.md and OUT/report.json from the stage results of a run; return the .md path."""
    header, rows = _ap_rows(results)
    parts = ["# maskless run report", "",
             "Measured by this run. Both Mask R-CNNs use the same images, architecture and training budget; "
             "they differ only in their masks. In %.", ""]
    parts += [_md_table(header, rows) if rows else "(no model was evaluated)", ""]
    fid = results.get("fidelity")
    fids = [(name, results[key]) for name, key in (("pseudo masks", "fidelity"),
                                                   ("relabelled by the weak model", "fidelity_relabel"))
            if results.get(key)]
    if fids:
        parts += ["## Pseudo-mask fidelity (pseudo masks vs true masks of the same images)", "",
                  _md_table(["masks", "images", "ABO same class", "ABO any class",
                             f"precision@{fids[0][1]['iou_threshold']}", f"recall@{fids[0][1]['iou_threshold']}",
                             "semantic mIoU"],
                            [[name, str(f["images"]), _pct(f["abo_same_class"]), _pct(f["abo_any_class"]),
                              _pct(f["precision"]), _pct(f["recall"]), _pct(f["miou"])] for name, f in fids]), ""]
    for key, folder in (("eval_weak", "weak"), ("eval_full", "full"), ("eval_relabel", "relabel"),
                        ("fidelity", "fidelity"), ("fidelity_relabel", "fidelity-relabel")):
        if results.get(key):
            parts.append(f"- {key}: detailed report in `{storage.join(out, folder)}`")
    caption, pub_header, pub_rows = published_table()
    parts += ["", "## Published results on PASCAL VOC 2012 val (reference only, not measured here)", "",
              caption, "", _md_table(pub_header, pub_rows), ""]
    storage.makedirs(out)
    md_path = storage.join(out, "report.md")
    storage.write_bytes_atomic(md_path, "\n".join(parts).encode())
    storage.write_json_atomic(storage.join(out, "report.json"),
                              {"measured": {"table": {"header": header, "rows": rows}, "fidelity": fid,
                                            "fidelity_relabel": results.get("fidelity_relabel")},
                               "published": pub_rows})
    return md_path

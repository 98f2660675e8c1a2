"""The report of a `maskless run`: weak supervision (pseudo masks), full supervision (true masks of the
same images, same training budget) and the pseudo masks' own fidelity, side by side, with the
published VOC 2012 numbers as a separate reference table."""
from __future__ import annotations

from maskless.core import storage
from maskless.train.report import _md_table, _pct, published_table


def _ap_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    runs = [(name, results.get(f"eval_{key}")) for name, key in
            (("weak: Mask R-CNN on pseudo masks", "weak"), ("full: Mask R-CNN on true masks", "full"))]
    runs = [(n, r) for n, r in runs if r]
    header, rows = ["model"], []
    if not runs:
        return header, rows
    columns = [(p, t) for p, vals in runs[0][1]["mAP"].items() for t in vals]
    header += [f"mAP^r@{t} ({p})" for p, t in columns] + ["ABO (same class)"]
    for name, r in runs:
        rows.append([name] + [_pct(r["mAP"][p][t]) for p, t in columns] + [_pct(r.get("abo_same_class"))])
    if len(runs) == 2:
        weak, full = runs[0][1], runs[1][1]
        ratio = []
        for p, t in columns:
            w, f = weak["mAP"][p][t], full["mAP"][p][t]
            ratio.append("-" if w is None or not f else f"{100 * w / f:.0f}% of full")
        rows.append(["weak / full"] + ratio + [""])
    return header, rows


def write_run_report(out: str, results: dict) -> str:
    """Write OUT/report.md and OUT/report.json from the stage results of a run; return the .md path."""
    header, rows = _ap_rows(results)
    parts = ["# maskless run report", "",
             "Measured by this run. Both Mask R-CNNs use the same images, architecture and training budget; "
             "they differ only in their masks. In %.", ""]
    parts += [_md_table(header, rows) if rows else "(no model was evaluated)", ""]
    fid = results.get("fidelity")
    if fid:
        parts += ["## Pseudo-mask fidelity (pseudo masks vs true masks of the same images)", "",
                  _md_table(["images", "ABO same class", "ABO any class", f"precision@{fid['iou_threshold']}",
                             f"recall@{fid['iou_threshold']}", "semantic mIoU"],
                            [[str(fid["images"]), _pct(fid["abo_same_class"]), _pct(fid["abo_any_class"]),
                              _pct(fid["precision"]), _pct(fid["recall"]), _pct(fid["miou"])]]), ""]
    for key, folder in (("eval_weak", "weak"), ("eval_full", "full"), ("fidelity", "fidelity")):
        if results.get(key):
            parts.append(f"- {key}: detailed report in `{storage.join(out, folder)}`")
    caption, pub_header, pub_rows = published_table()
    parts += ["", "## Published results on PASCAL VOC 2012 val (reference only, not measured here)", "",
              caption, "", _md_table(pub_header, pub_rows), ""]
    storage.makedirs(out)
    md_path = storage.join(out, "report.md")
    storage.write_bytes_atomic(md_path, "\n".join(parts).encode())
    storage.write_json_atomic(storage.join(out, "report.json"),
                              {"measured": {"table": {"header": header, "rows": rows}, "fidelity": fid},
                               "published": pub_rows})
    return md_path

"""`maskless run`: the whole pipeline from one YAML file, every stage resumable.

Stages, in order (each writes into the run folder and records `stages/NAME.json` when it has
finished; a rerun skips recorded stages, and each stage itself skips its finished work units):

  world      synthetic VOC-format world (source: world)
  import     ground-truth shards of the train and val splits (for fidelity, the upper bound, eval)
  crawl      the tags: images found by keyword through a search engine (the local engine over the
             world by default), image-level labels only
  classify   the peak-stimulation classifier, trained on the crawl's labels
  pseudo     pseudo instance masks for the train images
  fidelity   pseudo masks against the true masks of the same images
  train_weak     Mask R-CNN on the pseudo masks            (weak supervision: the method)
  train_full     the same Mask R-CNN on the true masks     (full supervision: the upper bound)
  eval_weak / eval_full   both scored on the val split
  with run.self_training (one round of self-training, docs/PSEUDO.md):
  relabel        the weak Mask R-CNN relabels the train images (section `relabel`)
  fidelity_relabel   those masks against the true masks
  train_relabel / eval_relabel   a second Mask R-CNN on them, scored on the val split

After the stages (not a stage: it is rewritten by every run, from the recorded results) comes one
side-by-side report, OUT/reports/report.md.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from maskless.core import storage
from maskless import config

log = logging.getLogger("maskless.run")


@dataclass
class RunConfig:
    out: str = field(default="maskless-run", metadata={"help": "run folder"})
    source: str = field(default="world", metadata={"help": "world (synthetic) or voc", "choices": ["world", "voc"]})
    world: dict = field(default_factory=lambda: {"classes": 3, "images": 120, "seed": 0, "size": 128})
    voc_root: str | None = field(default=None, metadata={"help": "VOCdevkit/VOC2012 (source: voc)"})
    train_split: str = field(default="train", metadata={"help": "split whose images get pseudo masks"})
    val_split: str = field(default="val", metadata={"help": "split the models are scored on"})
    queries: dict = field(default_factory=dict)  # class -> queries for the crawl; default: the class name
    crawl: bool = field(default=True, metadata={"help": "get the image labels by crawling (else from label_split)"})
    label_split: str | None = field(default=None, metadata={
        "help": "without crawl: split name or id-list file whose image labels train the classifier (default: train_split)"})
    fully_supervised: bool = field(default=True, metadata={"help": "also train on true masks (the upper bound)"})
    self_training: bool = field(default=False, metadata={
        "help": "one round of self-training: the weak Mask R-CNN relabels the train images (section relabel) and "
                "a second Mask R-CNN trains on them"})

    def validate(self) -> None:
        if self.source == "voc" and not self.voc_root:
            raise ValueError("run.source is 'voc' but run.voc_root is not set")
        unknown = set(self.world) - {"classes", "images", "seed", "size", "val_fraction"}
        if unknown:
            raise ValueError(f"unknown run.world options: {', '.join(sorted(unknown))}")


STAGE_SECTIONS = ("crawl", "classify", "pseudo", "pseudo_eval", "train", "eval", "relabel")


def _stage_config(module: str, cls_name: str, section: dict, **paths: Any):
    """A stage config from the user's YAML section plus the paths the pipeline wires in."""
    import importlib

    cls = getattr(importlib.import_module(module), cls_name)
    return config.absolute_paths(config.build(cls, {**section, **paths}))


class _Until(Exception):
    """Raised after the stage a run was asked to stop at."""


class Pipeline:
    """Runs stages in order, skipping those recorded as finished, timing each; with `until`, stops
    after that stage."""

    def __init__(self, out: str, until: str | None = None):
        self.out, self.until = out, until
        self.times: dict[str, float] = {}
        self.results: dict[str, Any] = {}

    def path(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        marker = self.path("stages", f"{name}.json")
        if storage.exists(marker):
            record = storage.read_json(marker)
            log.info("stage %-10s done earlier (%.0f s), skipped", name, record["seconds"])
            self.times[name] = 0.0
            self.results[name] = record["result"]
            self._stop_after(name)
            return record["result"]
        log.info("stage %-10s ...", name)
        t0 = time.time()
        result = fn()
        seconds = time.time() - t0
        storage.write_json_atomic(marker, {"stage": name, "seconds": seconds, "result": result})
        self.times[name] = seconds
        self.results[name] = result
        log.info("stage %-10s done in %.0f s", name, seconds)
        self._stop_after(name)
        return result

    def _stop_after(self, name: str) -> None:
        if name == self.until:
            raise _Until(name)


def _log_to_file(out: str) -> logging.Handler:
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    handler = logging.FileHandler(os.path.join(out, "logs", "run.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger("maskless").addHandler(handler)  # every stage logs under maskless.*
    logging.getLogger("maskless").setLevel(logging.INFO)
    return handler


STAGES = ("world", "import", "web", "crawl", "labels", "classify", "pseudo", "fidelity",
          "train_weak", "eval_weak", "train_full", "eval_full", "relabel", "fidelity_relabel", "train_relabel",
          "eval_relabel")


def run_pipeline(config_path: str, out: str | None = None, address: str | None = None,
                 num_cpus: int | None = None, verbose: bool = False, dashboard: bool = False,
                 until: str | None = None) -> dict:
    """Run every stage of the YAML at config_path (or up to and including `until`, so that a benchmark
    can share the stages before it between runs); returns the summary also written to OUT/summary.json."""
    if until is not None and until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
    raw = config.load_yaml(config_path)
    unknown = set(raw) - {"run", *STAGE_SECTIONS}
    if unknown:
        raise ValueError(f"{config_path}: unknown sections {', '.join(sorted(unknown))}; "
                         f"known: run, {', '.join(STAGE_SECTIONS)}")
    run_cfg = config.build(RunConfig, raw.get("run", {}), {"out": out})
    if "://" not in run_cfg.out:  # Ray workers run elsewhere than the driver: no relative paths
        run_cfg.out = os.path.abspath(run_cfg.out)
    if run_cfg.voc_root and "://" not in run_cfg.voc_root:
        run_cfg.voc_root = os.path.abspath(run_cfg.voc_root)
    sections = {k: dict(raw.get(k) or {}) for k in STAGE_SECTIONS}
    storage.makedirs(run_cfg.out)
    handler = _log_to_file(run_cfg.out) if "://" not in run_cfg.out else None
    from maskless.ray_runtime import init_ray

    init_ray(address, num_cpus, verbose, dashboard=dashboard)
    p = Pipeline(run_cfg.out, until)
    t_start = time.time()
    try:
        _run_stages(p, run_cfg, sections)
    except _Until:
        pass
    finally:
        if handler:
            logging.getLogger("maskless").removeHandler(handler)
    summary = _summary(p, run_cfg, time.time() - t_start)
    storage.write_json_atomic(p.path("summary.json"), summary)
    _print_summary(summary)
    return summary


def _run_stages(p: Pipeline, cfg: RunConfig, s: dict[str, dict]) -> None:
    from maskless.ingest.voc import import_voc

    if cfg.source == "world":
        from maskless.ingest.world import make_world

        root = p.path("world")
        p.stage("world", lambda: make_world(root, **cfg.world))
    else:
        root = cfg.voc_root
    data = {split: p.path("data", split) for split in ("train", "val")}
    p.stage("import", lambda: {
        "train": import_voc(root, data["train"], split=cfg.train_split),
        "val": import_voc(root, data["val"], split=cfg.val_split),
    })
    classes = p.results["import"]["train"]["classes"]

    if cfg.crawl:
        from maskless.ingest.crawl import run_crawl

        queries = cfg.queries or {c: [c] for c in classes}
        engine = {}
        if cfg.source == "world":
            # The demo's "web": the world's train images filed by class, served by the local engine.
            # Its loopback origin is exempt from the private-address guard; the guard stays on for every
            # other address (a redirect or a result pointing elsewhere is refused as in any crawl).
            web = p.path("web")
            p.stage("web", lambda: _web_folder(root, cfg.train_split, web))
            engine = {"engine": ["local"], "local_root": web}
        crawl_cfg = _stage_config("maskless.ingest.crawl", "CrawlConfig", s["crawl"], out=p.path("data", "crawl"),
                                  classes=queries, **engine)
        p.stage("crawl", lambda: run_crawl(crawl_cfg))
        label_data = p.path("data", "crawl")
    elif cfg.label_split and cfg.label_split != cfg.train_split:
        label_data = p.path("data", "labels")
        p.stage("labels", lambda: import_voc(root, label_data, split=cfg.label_split))
    else:
        label_data = data["train"]

    from maskless.pseudo.classify import run_classify
    from maskless.pseudo.fidelity import run_fidelity
    from maskless.pseudo.stage import run_pseudo

    held_out = {}
    if not {"val_data", "val_fraction"} & set(s["classify"]):
        # the classifier is checked on the val split's image labels: a fraction held out of a small crawl is
        # a handful of images, and it would not train on them; it never trains on the val split
        held_out = {"val_data": data["val"]}
    classify_cfg = _stage_config("maskless.pseudo.classify", "ClassifyConfig", s["classify"], data=label_data,
                                 out=p.path("classifier"), **held_out)
    p.stage("classify", lambda: run_classify(classify_cfg))
    pseudo_cfg = _stage_config("maskless.pseudo.stage", "PseudoConfig", s["pseudo"], classifier=p.path("classifier"),
                               data=data["train"], out=p.path("data", "pseudo"))
    p.stage("pseudo", lambda: run_pseudo(pseudo_cfg))
    fid_cfg = _stage_config("maskless.pseudo.fidelity", "FidelityConfig", s["pseudo_eval"], data=p.path("data", "pseudo"),
                            out=p.path("reports", "fidelity"))
    p.stage("fidelity", lambda: run_fidelity(fid_cfg))

    from maskless.train.evaluate import run_eval
    from maskless.train.trainer import run_train

    runs = [("weak", p.path("data", "pseudo"), "pseudo")]
    if cfg.fully_supervised:
        runs.append(("full", data["train"], "gt"))
    if cfg.self_training:
        runs.append(("relabel", p.path("data", "relabel"), "pseudo"))
    for name, train_data, mask_source in runs:
        if name == "relabel":
            from maskless.train.relabel import run_relabel

            relabel_cfg = _stage_config("maskless.train.relabel", "RelabelConfig", s["relabel"], data=p.path("data", "pseudo"),
                                        model=p.path("models", "weak", "model.pt"), out=train_data)
            p.stage("relabel", lambda: run_relabel(relabel_cfg))
            fid_relabel = _stage_config("maskless.pseudo.fidelity", "FidelityConfig", s["pseudo_eval"], data=train_data,
                                        out=p.path("reports", "fidelity-relabel"))
            p.stage("fidelity_relabel", lambda: run_fidelity(fid_relabel))
        train_cfg = _stage_config("maskless.train.trainer", "TrainConfig", s["train"], data=train_data, masks=mask_source,
                                  out=p.path("models", name))
        p.stage(f"train_{name}", lambda c=train_cfg: run_train(c))
        eval_cfg = _stage_config("maskless.train.evaluate", "EvalConfig", s["eval"], model=p.path("models", name, "model.pt"),
                                 gt=data["val"], out=p.path("reports", name))
        p.stage(f"eval_{name}", lambda c=eval_cfg: run_eval(c))


def _web_folder(voc_root: str, split: str, out: str) -> dict:
    """Copy the split's images into OUT/CLASS/ID.jpg by their XML labels (an image under each of its
    classes); paths may be URIs."""
    from maskless.ingest.voc import split_ids, voc_class_names, xml_labels

    names = voc_class_names(voc_root)
    counts = {c: 0 for c in names}
    for image_id in split_ids(voc_root, split):
        labels = xml_labels(voc_root, image_id, names)
        if labels:
            jpg = storage.read_bytes(storage.join(voc_root, "JPEGImages", image_id + ".jpg"))
        for label in labels:
            storage.write_bytes_atomic(storage.join(out, label, image_id + ".jpg"), jpg)
            counts[label] += 1
    return {"out": out, "images_per_class": counts}


def _summary(p: Pipeline, cfg: RunConfig, seconds: float) -> dict:
    from maskless.run_report import write_run_report

    report = write_run_report(p.path("reports"), p.results)
    return {"out": cfg.out, "report": report, "seconds": seconds, "stage_seconds": p.times,
            "results": {k: v for k, v in p.results.items() if k.startswith(("eval", "fidelity"))}}


def _print_summary(summary: dict) -> None:
    print("\n[maskless run] finished in %.0f s" % summary["seconds"])
    for name, sec in summary["stage_seconds"].items():
        print(f"  {name:<12} {'skipped (done earlier)' if sec == 0 else f'{sec:.0f} s'}")
    print(f"\n  report: {summary['report']}")
    for key in ("eval_weak", "eval_full", "eval_relabel"):
        r = summary["results"].get(key)
        if r:
            table = ", ".join(f"{p} {t}: {'-' if v is None else f'{100 * v:.1f}'}"
                              for p, vals in r["mAP"].items() for t, v in vals.items())
            print(f"  {key} mAP^r: {table}")

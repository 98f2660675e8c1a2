"""`maskless relabel`: self-training's relabelling step. The Mask R-CNN trained on the pseudo masks labels
the same train images again, and a second Mask R-CNN trains on the result (`maskless run` with
`run.self_training: true`; measured in docs/PSEUDO.md, "one round of self-training").

Weak supervision knows only the image's tags, so only detections of those classes count, at score >=
--score. Three rules (--rule):
  - add: every pseudo instance stays, and each detection that overlaps none of them (mask IoU <
    --max-iou) is added: the model has learnt objects whose peaks the classifier missed, and that is
    where pseudo masks lose most (objects with no peak inside them, docs/PSEUDO.md);
  - split (default): as add, and first a pseudo instance that holds two or more detections of its class (each with
    at least --split-inside of its area inside it, and overlapping each other under --max-iou) is
    replaced by them: two touching objects of a class get one peak and one mask between them, which
    add cannot mend (each detection overlaps the pair's mask at about IoU 0.5);
  - replace: the detections instead of the pseudo instances; a tag the model finds nowhere in the image
    keeps its old instances, so no class disappears from an image. Measured: it loses (its masks are
    less precise than the ones they replace).
split is the default since its masks scored at least as well as add's on every world and seed measured
(docs/PSEUDO.md, "add against split"); the two differ only where split finds a pair.
Every instance records where it came from ("from": "pseudo" or "model").

Work units of at most --unit-size samples (core/units.py), whatever the input's sharding, on --actors
Ray actors that each load the model once; one output shard per unit, named after the input slice, committed
atomically (ShardWriter), and a rerun skips committed units after checking that the input shards and
the model are the ones those units came from (OUT/relabel.units.json). An actor decodes its own units:
Mask R-CNN's forward pass, not decoding, is the cost here (unlike the pseudo stage's readers).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from maskless.core import errors, masks, shards, storage
from maskless.core.resources import check_resources, gpu_stage_options, has_gpus
from maskless.core.units import UNIT_SIZE, Unit, check_earlier_units, plan_shard, write_unit_plan

log = logging.getLogger(__name__)
RULES = ("add", "split", "replace")
PLAN_FILE = "relabel.units.json"
SUMMARY_FILE = "relabel.summary.json"


@dataclass
class RelabelConfig:
    data: str = field(default="", metadata={"help": "pseudo-mask shard dataset (the pseudo stage's output)"})
    model: str = field(default="", metadata={"help": "Mask R-CNN trained on those masks (model.pt of `maskless train`)"})
    out: str = field(default="", metadata={"help": "output shard dataset (the new pseudo masks)"})
    rule: str = field(default="split", metadata={"help": "add: keep the pseudo instances and add the detections "
                                                       "that overlap none; split: add, after replacing a pseudo "
                                                       "instance that holds two or more detections by them; "
                                                       "replace: the detections instead",
                                               "choices": list(RULES)})
    score: float = field(default=0.5, metadata={"help": "least detection score of a new instance"})
    max_iou: float = field(default=0.3, metadata={
        "help": "rules add, split: a detection whose mask IoU with a pseudo instance reaches this is that instance"})
    split_inside: float = field(default=0.8, metadata={
        "help": "rule split: a detection is part of a pseudo instance when this share of its area lies inside it"})
    unit_size: int = field(default=UNIT_SIZE, metadata={
        "help": "samples per work unit (one output shard each), whatever the input's sharding"})
    batch_size: int = field(default=4, metadata={"help": "images per Mask R-CNN forward pass"})
    actors: int = field(default=2, metadata={"help": "Mask R-CNN actors"})
    actor_cpus: float = field(default=1.0, metadata={"help": "logical CPUs per actor"})
    threads: int = field(default=1, metadata={"help": "torch threads per actor"})
    use_gpu: Optional[bool] = field(default=None, metadata={"help": "GPU actors (default: when Ray has GPUs)"})
    gpus_per_actor: float = field(default=1.0, metadata={"help": "GPUs per actor when use_gpu"})
    resources: Optional[dict[str, float]] = field(default=None, metadata={
        "help": "custom Ray resources per actor, NAME=AMOUNT,... (default: a share of gpu_stage where nodes have it)"})
    unit_retries: int = field(default=2, metadata={"help": "times a unit is retried after its actor process died"})

    def rule_settings(self) -> dict[str, Any]:
        """The rule and the settings of it that every relabelled sample records (split_inside with split only)."""
        return {"rule": self.rule, "score": self.score,
                **({"split_inside": self.split_inside} if self.rule == "split" else {})}

    def validate(self) -> None:
        for name in ("data", "model", "out"):
            if not getattr(self, name):
                raise ValueError(f"relabel needs --{name}")
        if self.rule not in RULES:
            raise ValueError(f"--rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not 0 <= self.score <= 1 or not 0 < self.max_iou <= 1 or not 0 < self.split_inside <= 1:
            raise ValueError(f"--score must be in [0, 1], --max-iou and --split-inside in (0, 1], got {self.score}, "
                             f"{self.max_iou} and {self.split_inside}")
        if min(self.unit_size, self.batch_size, self.actors, self.threads) < 1:
            raise ValueError("--unit-size, --batch-size, --actors and --threads must be >= 1")
        if self.actor_cpus <= 0 or self.gpus_per_actor <= 0:
            raise ValueError("--actor-cpus and --gpus-per-actor must be > 0")
        check_resources(self.resources)
        if storage.same_location(self.data, self.out):
            raise ValueError("--out must differ from --data: relabel writes new shards")


def relabel_instances(labels: list[str], old: list[dict], found: list[tuple[str, float, np.ndarray]],
                      rule: str, max_iou: float, split_inside: float = 0.8) -> list[dict]:
    """The new instance list of one image: `old` its pseudo instances, `found` the model's detections
    (class, score, bool HxW mask) at the score threshold. Detections of classes the image is not tagged
    with are dropped (weak supervision knows the tags only)."""
    new = [{"class": c, "score": round(float(p), 4), "mask": masks.encode(m), "from": "model"}
           for c, p, m in found if c in labels]
    before = [{**i, "from": "pseudo"} for i in old]
    if rule == "replace":
        missing = set(labels) - {i["class"] for i in new}
        kept = [i for i in before if i["class"] in missing]
    else:
        parts = []
        if rule == "split":
            before, parts, new = split_pairs(before, new, max_iou, split_inside)
        kept = before + parts
        if new and kept:
            overlap = masks.iou_matrix([i["mask"] for i in new], [i["mask"] for i in kept])
            new = [inst for inst, row in zip(new, overlap) if not (row >= max_iou).any()]
    for inst in new + kept:
        inst.setdefault("bbox", masks.bbox_xywh(inst["mask"]))
    return new + kept


def split_pairs(old: list[dict], found: list[dict], max_iou: float, inside: float
                ) -> tuple[list[dict], list[dict], list[dict]]:
    """Rule split: (the pseudo instances kept, the detections that replace the others, the detections
    left). A pseudo instance is replaced when two or more detections of its class lie in it (at least
    `inside` of each one's area), taken by score and each overlapping those taken before under `max_iou`
    (a detection of the whole pair beside its halves is not a third object). One detection inside keeps
    the pseudo instance: then the model saw one object there too."""
    if not old or not found:
        return old, [], found
    det_masks = [d["mask"] for d in found]
    area_d = masks.areas(det_masks)
    share = masks.intersections(det_masks, [i["mask"] for i in old], area_d) / np.maximum(area_d, 1)[:, None]
    pairwise = masks.iou_matrix(det_masks, det_masks, area_d, area_d)
    used: set[int] = set()
    kept, parts = [], []
    for j, inst in enumerate(old):
        chosen: list[int] = []
        for d in sorted(range(len(found)), key=lambda d: -found[d]["score"]):
            if (d not in used and found[d]["class"] == inst["class"] and share[d, j] >= inside
                    and all(pairwise[d, c] < max_iou for c in chosen)):
                chosen.append(d)
        if len(chosen) >= 2:
            used.update(chosen)
            parts += [{**found[d], "split_of": j} for d in chosen]
        else:
            kept.append(inst)
    return kept, parts, [d for k, d in enumerate(found) if k not in used]


def model_digest(path: str) -> str:
    """sha256 of the checkpoint: units made by another model are not mixed with this one's."""
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def relabel_unit(model: Any, classes: list[str], device: Any, unit: Unit, cfg: RelabelConfig) -> dict[str, Any]:
    """Relabel one unit with `model` (torchvision Mask R-CNN in eval mode on `device`) and commit it as
    output shard OUT/UNIT.tar; its result row (count, instances added and kept, error). A unit already
    committed is left as it is."""
    from maskless.train.predict import decode, detect

    start = time.time()
    row = {"unit": unit.name, "count": 0, "added": 0, "kept_old": 0, "split": 0, "instances": 0, "seconds": 0.0,
           "error": ""}
    if storage.exists(storage.join(cfg.out, unit.name + ".tar")):
        return row  # committed by an earlier attempt whose result was lost: never write it twice
    try:
        samples = list(unit.samples())
        with shards.ShardWriter(cfg.out, unit.name) as writer:
            for first in range(0, len(samples), cfg.batch_size):
                batch = samples[first:first + cfg.batch_size]
                images = [decode(s.jpg, f"sample {s.key} of {unit.tar}") for s in batch]
                for s, dets in zip(batch, detect(model, images, device, cfg.score)):
                    found = [(classes[c], p, m.numpy()) for c, p, m in dets]
                    old = (s.pseudo or {}).get("instances", [])
                    instances = relabel_instances(s.labels, old, found, cfg.rule, cfg.max_iou, cfg.split_inside)
                    s.pseudo = {**(s.pseudo or {}), "instances": instances,
                                "relabel": {"model": cfg.model, **cfg.rule_settings()}}
                    writer.write(s)
                    row["added"] += sum(i["from"] == "model" for i in instances)
                    row["kept_old"] += sum(i["from"] == "pseudo" for i in instances)
                    row["split"] += len({i["split_of"] for i in instances if "split_of" in i})
                    row["instances"] += len(instances)
            row["count"] = len(writer)
            writer.commit({"stage": "relabel", "input_shard": unit.shard, "input_samples": [unit.start, unit.stop],
                           "pseudo_instances": row["instances"], "added": row["added"], "kept_old": row["kept_old"],
                           "split": row["split"]})
    except Exception as e:  # the writer aborted: no output shard; reported, and a rerun redoes it
        log.exception("unit %s failed", unit.name)
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.time() - start, 3)
    return row


class RelabelActor:
    """Ray actor: loads the Mask R-CNN once, then relabels and commits one unit per call."""

    def __init__(self, cfg: dict, device: str):
        import torch

        from maskless.train.maskrcnn import load_model

        self.cfg = RelabelConfig(**cfg)
        torch.set_num_threads(self.cfg.threads)
        model, self.classes, _ = load_model(self.cfg.model)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def relabel(self, unit: Unit) -> dict[str, Any]:
        return relabel_unit(self.model, self.classes, self.device, unit, self.cfg)


def _run_units(cfg: RelabelConfig, todo: list[Unit], use_gpu: bool) -> list[dict]:
    """Every unit of `todo` on a pool of actors (Ray's ActorPool: a unit goes to whichever actor is free)."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    actor_cls = ray.remote(RelabelActor).options(
        **gpu_stage_options(cfg.actor_cpus, cfg.gpus_per_actor if use_gpu else 0, cfg.resources),
        max_restarts=-1, max_task_retries=cfg.unit_retries, scheduling_strategy="SPREAD")
    actors = [actor_cls.remote(dataclasses.asdict(cfg), "cuda" if use_gpu else "cpu")
              for _ in range(min(cfg.actors, len(todo)))]
    pool, rows = ActorPool(actors), []
    bar = tqdm(total=sum(len(u) for u in todo), unit="img", desc="relabel", disable=not sys.stderr.isatty())
    try:
        for row in pool.map_unordered(lambda a, u: a.relabel.remote(u), todo):
            rows.append(row)
            bar.update(row["count"])
            if row["error"]:
                log.error("relabel: unit %s failed: %s", row["unit"], row["error"])
    except ray.exceptions.RayError as e:  # an actor lost on every retry, or Ray gone: the committed units stay
        log.error("relabel: Ray stopped: %s", e)
    finally:
        bar.close()
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception as e:  # Ray itself gone (logged above): nothing left to stop
                log.debug("relabel: could not stop an actor: %s", e)
    return rows


def run_relabel(cfg: RelabelConfig) -> dict:
    """New pseudo masks for every unit of cfg.data not yet in cfg.out; dataset.json once all are there.
    Ray must be initialised by the caller. Raises errors.IncompleteRun naming the units not written (the
    others are committed; a rerun redoes only those), ValueError when cfg.out holds units of other input
    samples or of another model."""
    from maskless.train.maskrcnn import load_model

    cfg.validate()
    info = shards.read_dataset_info(cfg.data)  # a finished dataset, or a clear error
    names = shards.shard_names(cfg.data)
    _, classes, _ = load_model(cfg.model)  # fails early and clearly on a missing or bad checkpoint
    unknown = set(info["classes"]) - set(classes)
    if unknown:
        raise ValueError(f"--model {cfg.model} knows {', '.join(classes)}, --data {cfg.data} also has "
                         f"{', '.join(sorted(unknown))}: relabel with the model trained on that data")
    storage.makedirs(cfg.out)
    storage.remove_stale_temps(cfg.out)
    start = time.time()
    plans = [plan_shard(cfg.data, n, cfg.unit_size) for n in names]  # tar headers only
    digest = model_digest(cfg.model)
    done = set(shards.shard_names(cfg.out))
    # what a unit's masks depend on besides its input: a rerun with another model or rule (the default
    # rule changed once, add -> split) must not add its units to these
    made_by = {"model_sha256": digest, **cfg.rule_settings(), "max_iou": cfg.max_iou}
    check_earlier_units(cfg.data, cfg.out, cfg.unit_size, plans, done, PLAN_FILE, **made_by)
    write_unit_plan(cfg.data, cfg.out, cfg.unit_size, plans, PLAN_FILE, **made_by)
    units = [u for p in plans for u in p.units]
    todo = [u for u in units if u.name not in done]
    use_gpu = has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    rows = _run_units(cfg, todo, use_gpu) if todo else []
    written = set(shards.shard_names(cfg.out))
    missing = [u.name for u in units if u.name not in written]
    failed = {r["unit"]: r["error"] for r in rows if r["error"]}
    stats = shards.read_stats(cfg.out)
    images = sum(r["count"] for r in rows)
    seconds = time.time() - start
    summary = {"units": len(units), "skipped": len(units) - len(todo), "failed": failed, "images": images,
               "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3) if images else 0.0,
               "instances": sum(s.get("pseudo_instances", 0) for s in stats),
               "added": sum(s.get("added", 0) for s in stats), "kept_old": sum(s.get("kept_old", 0) for s in stats),
               "split": sum(s.get("split", 0) for s in stats),
               "rule": cfg.rule, "score": cfg.score, "gpu": use_gpu, "out": cfg.out}
    storage.write_json_atomic(storage.join(cfg.out, SUMMARY_FILE), summary)
    if missing:
        raise errors.IncompleteRun.of_units("relabel", missing, failed)
    summary["samples"] = shards.write_dataset_info(cfg.out, classes, stage="relabel", source=cfg.data,
                                                   model=cfg.model, rule=cfg.rule, score=cfg.score)["samples"]
    log.info("relabel: %s", summary)
    return summary

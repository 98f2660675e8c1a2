"""`maskless pseudo`: pseudo instance masks for every image of a shard dataset, on Ray actors.

Unit of work = a slice of at most --unit-size samples of one input shard (core/units.py), whatever
the input's sharding, so every actor has work while units remain: one output shard per unit, named
`INPUT_START-STOP` after the input shard and the samples it holds. The driver cuts the shards into
units with CPU tasks (tar headers only) and records the cut and a digest of every input shard's keys
in OUT/pseudo.units.json. Per unit a Ray CPU task reads the unit's bytes of the input tar (one ranged
read), decodes its images and computes their proposals when the rule needs them, so a GPU actor never
waits on that; one of --actors classifier actors, each loading the checkpoint once, runs the classifier
forward on batches of the unit's images, the peaks and their back-propagation per image, and commits
the unit through `ShardWriter` (run_units schedules them).
The tar is renamed into place last, so a killed actor leaves no output shard, only a hidden
temporary file; Ray restarts the actor and retries the unit, and a rerun skips every unit whose tar
exists, after checking that the input shards its committed units came from still hold the same samples.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from maskless.core import errors, shards, storage
from maskless.core.resources import check_resources, gpu_stage_options, has_gpus
from maskless.core.units import UNIT_SIZE, ShardPlan, Unit, check_earlier_units, plan_shard, write_unit_plan
from maskless.pseudo.instances import CLASS_SOURCES, MaskerOptions, PseudoMasker
from maskless.pseudo.peak_response import RULES as RESPONSE_RULES
from maskless.pseudo.proposals import CACHE_ENTRY, SCORES, SOURCES, Proposals, make_source
from maskless.pseudo.reader import read_unit, unit_of, unit_row
from maskless.pseudo.refine import REFINERS
from maskless.pseudo.retrieval import RULES, RetrievalOptions

log = logging.getLogger(__name__)
SUMMARY_FILE = "pseudo.summary.json"
PLAN_FILE = "pseudo.units.json"  # the unit size and, per input shard, its sample count and key digest
CLASS_COUNTS = ("images_labelled", "peaks", "instances")  # per class, in each shard's stats and the summary


def class_report(stats: list[dict], classes: list[str]) -> dict:
    """Per-class counts over the committed shards' stats, and the classes that got no peak, or peaks but
    no instance, in the whole dataset: Mask R-CNN never sees those classes, so they are named, not zeros."""
    per_class = {c: dict.fromkeys(CLASS_COUNTS, 0) for c in classes}
    for st in stats:
        for key, counts in st.get("per_class", {}).items():
            for c, n in counts.items():
                per_class.setdefault(c, dict.fromkeys(CLASS_COUNTS, 0))[key] += n
    return {"per_class": per_class,
            "classes_without_peaks": [c for c, v in per_class.items() if v["peaks"] == 0],
            "classes_without_instances": [c for c, v in per_class.items() if v["peaks"] and v["instances"] == 0]}


@dataclass
class PseudoConfig:
    classifier: str = field(default="", metadata={"help": "classify run folder or its classifier.pt"})
    data: str = field(default="", metadata={"help": "input shard dataset (images with image-level labels)"})
    out: str = field(default="", metadata={"help": "output shard dataset: same shards with pseudo.json added"})
    rule: str = field(default=MaskerOptions.rule, metadata={
        "help": "mask per peak: response (the smoothed peak response map; measured best, docs/PSEUDO.md), "
                "prm (proposal by PRM's retrieval score) or wise (highest-objectness proposal at the point)",
        "choices": list(RULES)})
    response: str = field(default=MaskerOptions.response, metadata={
        "help": "peak response backward rule: prm (peak backpropagation) or gradient (WISE)",
        "choices": list(RESPONSE_RULES)})
    proposals: str = field(default="selective_search", metadata={
        "help": "proposal source (default chosen by measured fidelity, docs/PSEUDO.md)", "choices": list(SOURCES)})
    objectness: str = field(default="stability", metadata={
        "help": "objectness proxy of the merging hierarchy", "choices": list(SCORES)})
    classes_from: str = field(default=MaskerOptions.classes_from, metadata={
        "help": "peaks for the image's labels or for the classifier's predicted classes",
        "choices": list(CLASS_SOURCES)})
    class_threshold: float = field(default=MaskerOptions.class_threshold, metadata={
        "help": "predicted class: score (logit) above this"})
    peak_threshold: float = field(default=MaskerOptions.peak_threshold, metadata={
        "help": "peaks >= this fraction of the class map's max"})
    max_peaks: int = field(default=MaskerOptions.max_peaks, metadata={"help": "peaks per class and image"})
    peak_batch: int = field(default=MaskerOptions.peak_batch, metadata={"help": "peaks back-propagated in one batch"})
    input_size: Optional[int] = field(default=MaskerOptions.input_size, metadata={
        "help": "classifier input side (default: the classifier's training image size)"})
    refine: str = field(default=MaskerOptions.refine, metadata={
        "help": "refine each peak's mask to the object's colour boundary (GrabCut seeded by the response) or none",
        "choices": list(REFINERS)})
    refine_core: float = field(default=MaskerOptions.refine_core, metadata={
        "help": "GrabCut: definitely object where the smoothed response >= this x its maximum in the mask"})
    refine_margin: float = field(default=MaskerOptions.refine_margin, metadata={
        "help": "GrabCut: definitely background outside the mask's box grown by this x its size"})
    refine_iterations: int = field(default=MaskerOptions.refine_iterations, metadata={"help": "GrabCut iterations"})
    explain_rounds: int = field(default=MaskerOptions.explain_rounds, metadata={
        "help": "rounds that add, per class, a peak where the class map is still high outside the masks of the "
                "peaks so far (touching same-class objects share one local maximum); 0 = local maxima only"})
    explain_threshold: float = field(default=MaskerOptions.explain_threshold, metadata={
        "help": "such a peak needs the class map at least this x its maximum"})
    group_overlap: Optional[float] = field(default=MaskerOptions.group_overlap, metadata={
        "help": "peaks of a class whose smoothed response maps share at least this fraction of their mass are "
                "one object (one mask); peaks whose masks overlap at --nms-iou are too (None: that alone)"})
    inside_weight: float = field(default=RetrievalOptions.inside_weight, metadata={
        "help": "PRM score: weight of the response inside"})
    contour_weight: float = field(default=RetrievalOptions.contour_weight, metadata={
        "help": "PRM score: weight of the response on the contour"})
    background_weight: float = field(default=RetrievalOptions.background_weight, metadata={
        "help": "PRM score: penalty per background pixel"})
    background_ratio: float = field(default=RetrievalOptions.background_ratio, metadata={
        "help": "background = class response below this x its mean"})
    contour_width: int = field(default=RetrievalOptions.contour_width, metadata={
        "help": "contour = morphological gradient of this width (px)"})
    min_area: float = field(default=RetrievalOptions.min_area, metadata={
        "help": "skip proposals under this fraction of the image"})
    max_area: float = field(default=RetrievalOptions.max_area, metadata={
        "help": "skip proposals at or over this fraction"})
    max_proposals: int = field(default=RetrievalOptions.max_proposals, metadata={
        "help": "best N proposals by objectness considered (0 = all)"})
    response_blur: float = field(default=RetrievalOptions.response_blur, metadata={
        "help": "rule response: Gaussian sigma as a fraction of the image's shorter side"})
    response_threshold: float = field(default=RetrievalOptions.response_threshold, metadata={
        "help": "rule response: mask where the smoothed map >= this x its maximum"})
    nms_iou: float = field(default=RetrievalOptions.nms_iou, metadata={
        "help": "NMS IoU threshold between a peak's instances"})
    merge_responses: bool = field(default=RetrievalOptions.merge_responses, metadata={
        "help": "a group of peaks gets the mask of their summed response maps (else its strongest peak's mask)"})
    class_agnostic_nms: bool = field(default=RetrievalOptions.class_agnostic_nms, metadata={
        "help": "NMS across classes"})
    cache_proposals: bool = field(default=False, metadata={
        "help": "store each sample's proposals in the output shard (proposals.npz), reused by later runs "
                "(rules prm and wise: the response rule computes none)"})
    unit_size: int = field(default=UNIT_SIZE, metadata={
        "help": "samples per work unit (one output shard each), whatever the input's sharding"})
    forward_batch: int = field(default=16, metadata={
        "help": "images per classifier forward pass in an actor (peaks and their back-propagation stay per image)"})
    actors: int = field(default=2, metadata={"help": "classifier actors in the pool"})
    actor_cpus: float = field(default=0.5, metadata={
        "help": "logical CPUs per actor (fractional leaves room for the reading tasks on small machines)"})
    threads: int = field(default=1, metadata={"help": "torch and OpenCV threads per actor"})
    readers: Optional[int] = field(default=None, metadata={
        "help": "CPU tasks reading units at once (decoding, proposals; default: one per actor, more with proposals "
                "to compute)"})
    reader_cpus: float = field(default=0.5, metadata={
        "help": "logical CPUs per CPU task: cutting a shard into units, reading and decoding a unit's "
                "images and computing their proposals"})
    use_gpu: Optional[bool] = field(default=None, metadata={"help": "GPU actors (default: when Ray has GPUs)"})
    gpus_per_actor: float = field(default=1.0, metadata={"help": "GPUs per actor when use_gpu"})
    resources: Optional[dict[str, float]] = field(default=None, metadata={
        "help": "custom Ray resources per actor, NAME=AMOUNT,... (default: a share of gpu_stage where nodes have it)"})
    fail_units: list[str] = field(default_factory=list, metadata={
        "cli": False, "help": "failure injection for tests: the actor fails halfway through the units of these "
                              "input shards (or the units of these names)"})
    unit_retries: int = field(default=3, metadata={
        "help": "times a unit is retried after its actor process died; then the run fails naming it"})
    fail_mode: str = field(default="raise", metadata={
        "cli": False, "help": "failure injection: raise (an exception), exit (the actor process dies, once) "
                              "or exit_always (it dies on every attempt)"})

    @property
    def needs_proposals(self) -> bool:
        """The response rule takes its masks from the peak response maps: no proposals to compute."""
        return self.rule != "response"

    def masker_options(self) -> MaskerOptions:
        """The masker's options: the fields this config shares with MaskerOptions and RetrievalOptions
        (whose defaults are this config's defaults)."""
        retrieval = RetrievalOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RetrievalOptions)})
        shared = [f.name for f in dataclasses.fields(MaskerOptions) if f.name != "retrieval"]
        return MaskerOptions(**{n: getattr(self, n) for n in shared}, retrieval=retrieval)

    def reader_count(self) -> int:
        """Reading tasks at once: --readers, else one per actor (two with proposals to compute, which
        cost as much as masking)."""
        return self.readers or self.actors * (2 if self.needs_proposals else 1)

    def validate(self) -> None:
        for name in ("classifier", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"pseudo needs --{name}")
        check_resources(self.resources)
        if self.proposals not in SOURCES:
            raise ValueError(f"unknown proposal source {self.proposals!r}; use one of {SOURCES}")
        if self.objectness not in SCORES:
            raise ValueError(f"unknown objectness proxy {self.objectness!r}; use one of {SCORES}")
        if self.actors < 1 or self.threads < 1:
            raise ValueError("--actors and --threads must be >= 1")
        if self.unit_size < 1 or self.forward_batch < 1:
            raise ValueError(f"--unit-size and --forward-batch must be >= 1, got {self.unit_size} and "
                             f"{self.forward_batch}")
        if self.readers is not None and self.readers < 1:
            raise ValueError(f"--readers must be >= 1, got {self.readers}")
        if self.actor_cpus <= 0 or self.reader_cpus <= 0 or self.gpus_per_actor <= 0:
            raise ValueError("--actor-cpus, --reader-cpus and --gpus-per-actor must be > 0")
        if self.fail_mode not in ("raise", "exit", "exit_always"):
            raise ValueError("fail_mode must be raise, exit or exit_always")
        if self.unit_retries < 0:
            raise ValueError("--unit-retries must be >= 0")
        if self.cache_proposals and not self.needs_proposals:
            raise ValueError("--cache-proposals keeps the proposals of the prm and wise rules; the response rule "
                             "computes none: pass --rule prm or wise, or drop --cache-proposals")
        if storage.same_location(self.data, self.out):
            raise ValueError("--out must differ from --data: the pseudo stage writes new shards")
        self.masker_options().validate()


class PseudoActor:
    """Ray actor: loads the classifier once, then masks and commits one unit per call."""

    def __init__(self, cfg: dict, device: str):
        started = time.time()
        import cv2
        import ray
        import torch

        from maskless.pseudo.classifier import load_classifier

        self.cfg = PseudoConfig(**cfg)
        torch.set_num_threads(self.cfg.threads)
        cv2.setNumThreads(self.cfg.threads)  # GrabCut and the blurs: the actor's share, not every core
        model, classes, train_config = load_classifier(self.cfg.classifier)
        self.masker = PseudoMasker(model, classes, train_config, self.cfg.masker_options(), device)
        self.source = make_source(self.cfg.proposals, self.cfg.objectness).name if self.cfg.needs_proposals else None
        ctx = ray.get_runtime_context()
        self.actor, self.node = ctx.get_actor_id() or f"pid{os.getpid()}", ctx.get_node_id()
        self.started, self.ready = started, time.time()  # in every unit's stats: how long the actor took to start

    def mask(self, read: dict[str, Any]) -> dict[str, Any]:
        """One unit as its reading task returned it (pseudo/reader.py) -> its result row."""
        timing = {"proposals_reused": int(read["proposals_reused"]), "read_started": float(read["read_started"]),
                  "read_seconds": round(float(read["read_seconds"]), 3), "reader_pid": int(read["reader_pid"])}
        return self._unit(unit_of(read), read["payload"], timing)

    def _unit(self, unit: Unit, payload: bytes, timing: dict) -> dict[str, Any]:
        cfg, start = self.cfg, time.time()
        row = _result_row(unit, actor=self.actor, node=self.node)
        if storage.exists(storage.join(cfg.out, unit.name + ".tar")):
            return row  # committed by an earlier attempt whose result was lost: never write it twice
        counts = {k: dict.fromkeys(self.masker.classes, 0) for k in CLASS_COUNTS}
        try:
            items = pickle.loads(payload)
            with shards.ShardWriter(cfg.out, unit.name) as writer:
                for first in range(0, len(items), cfg.forward_batch):
                    chunk = items[first:first + cfg.forward_batch]
                    masked = self.masker.mask_images(
                        [image for _, image, _ in chunk], [s.labels for s, _, _ in chunk],
                        [None if props is None else Proposals.from_bytes(props) for _, _, props in chunk])
                    for (s, _, props), (responses, instances) in zip(chunk, masked):
                        if len(writer) == 1 and {unit.shard, unit.name} & set(cfg.fail_units):
                            self._inject_failure(unit.name)
                        for label in set(s.labels) & set(self.masker.classes):
                            counts["images_labelled"][label] += 1
                        for p in responses.peaks:
                            counts["peaks"][self.masker.classes[p.cls]] += 1
                        for inst in instances:
                            counts["instances"][inst["class"]] += 1
                        extra = {k: v for k, v in s.extra.items() if k != CACHE_ENTRY}
                        if cfg.cache_proposals and props is not None:
                            extra[CACHE_ENTRY] = props
                        pseudo = {"instances": instances, "classifier": cfg.classifier, "rule": cfg.rule,
                                  "response": cfg.response, "proposals": self.source, "refine": cfg.refine}
                        writer.write(shards.Sample(s.key, s.jpg, s.meta, s.gt, pseudo, extra))
                        row["instances"] += len(instances)
                        row["empty"] += not instances
                row["count"] = len(writer)
                if row["count"] != len(unit):
                    raise ValueError(f"unit {unit.name}: read {row['count']} samples of {unit.tar}, planned "
                                     f"{len(unit)}: the input shard changed during the run")
                row["seconds"] = round(time.time() - start, 3)
                writer.commit({"stage": "pseudo", "input_shard": unit.shard, "input_samples": [unit.start, unit.stop],
                               "pseudo_instances": row["instances"], "images_without_instances": row["empty"],
                               "per_class": counts, **timing, "masking_seconds": row["seconds"], "finished": time.time(),
                               "actor": self.actor, "node": self.node, "actor_started": self.started,
                               "actor_ready": self.ready})
        except Exception as e:  # the writer aborted: no output shard; reported, and a rerun redoes it
            log.exception("unit %s failed", unit.name)
            row["error"] = f"{type(e).__name__}: {e}"
        row["seconds"] = round(time.time() - start, 3)
        return row

    def _inject_failure(self, name: str) -> None:
        if self.cfg.fail_mode == "raise":
            raise RuntimeError(f"injected failure in unit {name}")
        marker = storage.join(self.cfg.out, f".crash-{name}.tmp")  # hidden temp: removed by the next run
        if self.cfg.fail_mode == "exit_always" or not storage.exists(marker):
            storage.write_bytes_atomic(marker, b"")
            os._exit(1)  # the actor process dies mid-unit, once


def plan_units(cfg: PseudoConfig, names: list[str]) -> list[ShardPlan]:
    """Every input shard cut into units, by CPU tasks (each reads one tar's headers) in parallel."""
    import ray

    task = ray.remote(plan_shard).options(num_cpus=cfg.reader_cpus)
    try:
        return ray.get([task.remote(cfg.data, n, cfg.unit_size) for n in names])
    except ray.exceptions.RayTaskError as e:  # a tar that does not read: name it, without the remote traceback
        raise ValueError(f"--data {cfg.data}: {e.cause}") from None


def actor_rates(rows: list[dict]) -> dict[str, dict]:
    """Per actor: units and images masked, seconds busy masking them, images/s while busy."""
    per: dict[str, dict] = defaultdict(lambda: {"node": "", "units": 0, "images": 0, "busy_s": 0.0})
    for r in rows:
        if r["count"]:
            a = per[r["actor"]]
            a["node"], a["units"], a["images"] = r["node"], a["units"] + 1, a["images"] + r["count"]
            a["busy_s"] += r["seconds"]
    return {k: {**v, "busy_s": round(v["busy_s"], 3), "images_per_s": round(v["images"] / v["busy_s"], 3)}
            for k, v in per.items() if v["busy_s"] > 0}


def _result_row(unit: Unit, actor: str = "", node: str = "", error: str = "") -> dict[str, Any]:
    """A unit's result row before any sample of it is masked (the actor fills in the counts)."""
    return {"unit": unit.name, "count": 0, "instances": 0, "empty": 0, "seconds": 0.0, "error": error,
            "actor": actor, "node": node}


def _one_line(e: BaseException, line: int = 0) -> str:
    text = str(e).splitlines()
    return f"{type(e).__name__}: {text[line] if text else ''}"


def _failed_row(unit: Unit, error: Exception, retries: int) -> dict[str, Any]:
    """The result row of a unit whose reading task failed or whose actor died on every attempt."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError):  # the reader's (or actor's) own exception, without Ray's traceback
        why = _one_line(error.cause if error.cause is not None else error, line=-1)
    else:
        why = f"its actor was lost on all {retries + 1} attempts (--unit-retries {retries}); last: {_one_line(error)}"
    return _result_row(unit, error=why)


def run_units(cfg: PseudoConfig, todo: list[Unit], use_gpu: bool) -> list[dict]:
    """Every unit of `todo` read by a CPU task and masked by one of `cfg.actors` actors; their result rows.

    Plain Ray tasks and actors, scheduled here: one unit in flight per actor, so no unit waits in one
    actor's queue while another actor has none; at most `cfg.reader_count()` reading tasks at once and
    as many units read ahead, so an actor's next unit is decoded before it asks (a GPU actor never waits
    on CPU work) and the driver's memory holds a few units, not the dataset. (Through Ray Data the same
    pipeline also ran Ray Data's own actors and executor loop, about a fifth of a core on the 2-core
    machine: BENCHMARKS.md, pseudo.) A killed actor is restarted by Ray and its
    unit retried, at most `cfg.unit_retries` times; a unit that then still fails, or whose reading failed,
    gets an error row and the other units go on."""
    import ray
    from tqdm import tqdm

    readers = min(cfg.reader_count(), len(todo))
    read = ray.remote(read_unit).options(num_cpus=cfg.reader_cpus, scheduling_strategy="SPREAD")
    actor_cls = ray.remote(PseudoActor).options(
        **gpu_stage_options(cfg.actor_cpus, cfg.gpus_per_actor if use_gpu else 0, cfg.resources),
        max_restarts=-1, max_task_retries=cfg.unit_retries, scheduling_strategy="SPREAD")
    actors = [actor_cls.remote(dataclasses.asdict(cfg), "cuda" if use_gpu else "cpu")
              for _ in range(min(cfg.actors, len(todo)))]
    source = cfg.proposals if cfg.needs_proposals else None
    waiting = list(reversed(todo))      # not read yet, next last
    ready: list[tuple[Unit, Any]] = []  # (unit, its reading task) read ahead, oldest first
    reading: set = set()                # reading tasks not known to have finished
    masking: dict = {}                  # an actor's call -> (actor, unit)
    free, rows = list(actors), []
    bar = tqdm(total=sum(len(u) for u in todo), unit="img", desc="pseudo", disable=not sys.stderr.isatty())
    try:
        while waiting or ready or masking:
            while waiting and len(reading) < readers and len(ready) < readers:
                unit = waiting.pop()
                ref = read.remote(unit_row(unit), source, cfg.objectness)
                reading.add(ref)
                ready.append((unit, ref))
            while free and ready:
                unit, ref = ready.pop(0)
                actor = free.pop()
                masking[actor.mask.remote(ref)] = (actor, unit)
            (done,), _ = ray.wait(list(masking) + list(reading), num_returns=1)
            if done in reading:
                reading.discard(done)
                continue
            actor, unit = masking.pop(done)
            free.append(actor)
            try:
                row = ray.get(done)
            except ray.exceptions.RayError as e:  # its reading failed, or its actor died unit_retries + 1 times
                row = _failed_row(unit, e, cfg.unit_retries)
                log.error("pseudo: unit %s failed: %s", unit.name, row["error"])
            rows.append(row)
            bar.update(len(unit))
    finally:
        bar.close()
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception as e:  # Ray itself gone (the error being raised says why): nothing left to stop
                log.debug("pseudo: could not stop an actor: %s", e)
    return rows


def run_pseudo(cfg: PseudoConfig) -> dict:
    """Pseudo masks for every input unit not yet in cfg.out; dataset.json once all are there.
    Ray must be initialised by the caller. Raises errors.IncompleteRun naming the units that failed
    (the others are committed; rerun to redo the failed ones; the CLI exits 2 with its message), ValueError when cfg.out holds units of
    other input samples."""
    import ray

    from maskless.pseudo.classifier import load_classifier

    cfg.validate()
    if not storage.exists(cfg.data):
        raise FileNotFoundError(f"--data {cfg.data} does not exist")
    names = shards.shard_names(cfg.data)
    if not names:
        raise FileNotFoundError(f"--data {cfg.data} holds no complete shard (*.tar): run ingest first")
    _, classes, _ = load_classifier(cfg.classifier)  # fails early and clearly on a bad checkpoint
    storage.makedirs(cfg.out)
    storage.remove_stale_temps(cfg.out)
    start = time.time()
    plans = plan_units(cfg, names)
    done = set(shards.shard_names(cfg.out))
    check_earlier_units(cfg.data, cfg.out, cfg.unit_size, plans, done, PLAN_FILE)
    write_unit_plan(cfg.data, cfg.out, cfg.unit_size, plans, PLAN_FILE)
    units = [u for p in plans for u in p.units]
    todo = [u for u in units if u.name not in done]
    use_gpu = has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    rows: list[dict] = []
    crashed = ""
    if todo:
        try:
            rows = run_units(cfg, todo, use_gpu)
        except ray.exceptions.RayError as e:  # Ray itself failed (the cluster went away): the committed units stay
            log.error("pseudo: Ray stopped: %s", e)
            crashed = _one_line(e)
    failed = {r["unit"]: r["error"] for r in rows if r["error"]}
    proposals = cfg.proposals if cfg.needs_proposals else None
    written = set(shards.shard_names(cfg.out))
    missing = [u.name for u in units if u.name not in written]
    images = int(sum(r["count"] for r in rows))
    seconds = time.time() - start
    report = class_report(shards.read_stats(cfg.out), classes)
    for key, what in (("classes_without_peaks", "no peak in any train image (no image labelled with it, or never "
                                                "predicted)"),
                      ("classes_without_instances", "peaks but no pseudo instance")):
        if report[key]:
            log.warning("pseudo: %d class(es) with %s: %s; Mask R-CNN gets no example of them", len(report[key]),
                        what, ", ".join(report[key]))
    summary = {
        "input_shards": len(names), "unit_size": cfg.unit_size, "units": len(units), "skipped": len(units) - len(todo),
        "processed": len([u for u in todo if u.name in written]), "failed": failed, "ray_error": crashed,
        "images": images, "instances": int(sum(r["instances"] for r in rows)),
        "images_without_instances": int(sum(r["empty"] for r in rows)),
        "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3),
        "actors": cfg.actors, "per_actor": actor_rates(rows), "gpu": use_gpu,
        "rule": cfg.rule, "response": cfg.response, "refine": cfg.refine, "proposals": proposals, "out": cfg.out,
        **report,
    }
    storage.write_json_atomic(storage.join(cfg.out, SUMMARY_FILE), summary)
    if missing:
        raise errors.IncompleteRun.of_units("pseudo", missing, failed or crashed)
    info = shards.write_dataset_info(cfg.out, classes, stage="pseudo", classifier=cfg.classifier, rule=cfg.rule,
                                     response=cfg.response, proposals=proposals,
                                     classes_without_peaks=report["classes_without_peaks"],
                                     classes_without_instances=report["classes_without_instances"])
    summary["samples"] = info["samples"]
    log.info("pseudo: %s", summary)
    return summary

"""`maskless pseudo`: pseudo instance masks for every image of a shard dataset, on Ray actors.

Unit of work = one input shard -> one output shard of the same name. Ray Data carries a dataset of
shard names (one row, one block per shard): a CPU task computes the shard's proposals (so a GPU actor
never waits on them), then an actor pool (`ActorPoolStrategy`) of classifier actors, each loading the
checkpoint once, masks the shard's images and commits the output shard through `ShardWriter`. The tar
is renamed into place last, so a killed actor leaves no output shard, only a hidden temporary file;
Ray restarts the actor and retries the shard, and a rerun skips every shard whose tar exists.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from maskless.core import shards, storage
from maskless.core.resources import check_resources, gpu_stage_options, has_gpus
from maskless.pseudo.instances import CLASS_SOURCES, MaskerOptions, PseudoMasker
from maskless.pseudo.peak_response import RULES as RESPONSE_RULES
from maskless.pseudo.proposals import CACHE_ENTRY, SCORES, SOURCES, Proposals, cached_or_compute, make_source
from maskless.pseudo.refine import REFINERS
from maskless.pseudo.retrieval import RULES, RetrievalOptions

log = logging.getLogger(__name__)
SUMMARY_FILE = "pseudo.summary.json"
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
        "help": "store each sample's proposals in the output shard (proposals.npz), reused by later runs"})
    actors: int = field(default=2, metadata={"help": "classifier actors in the pool"})
    actor_cpus: float = field(default=0.5, metadata={
        "help": "logical CPUs per actor (fractional leaves room for Ray Data's tasks on small machines)"})
    threads: int = field(default=1, metadata={"help": "torch threads per actor"})
    proposal_cpus: float = field(default=0.5, metadata={"help": "logical CPUs per proposal task"})
    use_gpu: Optional[bool] = field(default=None, metadata={"help": "GPU actors (default: when Ray has GPUs)"})
    gpus_per_actor: float = field(default=1.0, metadata={"help": "GPUs per actor when use_gpu"})
    resources: Optional[dict[str, float]] = field(default=None, metadata={
        "help": "custom Ray resources per actor, NAME=AMOUNT,... (default: a share of gpu_stage where nodes have it)"})
    fail_shards: list[str] = field(default_factory=list, metadata={
        "cli": False, "help": "failure injection for tests: the actor fails halfway through these shards"})
    shard_retries: int = field(default=3, metadata={
        "help": "times a shard is retried after its actor process died; then the run fails naming it"})
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
        if self.actor_cpus <= 0 or self.proposal_cpus <= 0 or self.gpus_per_actor <= 0:
            raise ValueError("--actor-cpus, --proposal-cpus and --gpus-per-actor must be > 0")
        if self.fail_mode not in ("raise", "exit", "exit_always"):
            raise ValueError("fail_mode must be raise, exit or exit_always")
        if self.shard_retries < 0:
            raise ValueError("--shard-retries must be >= 0")
        same = (self.data.rstrip("/") == self.out.rstrip("/") if "://" in self.data
                else os.path.abspath(self.data) == os.path.abspath(self.out))
        if same:
            raise ValueError("--out must differ from --data: the pseudo stage writes new shards")
        self.masker_options().validate()


def _image(sample: shards.Sample) -> np.ndarray:
    return np.asarray(sample.image())


def compute_proposals(batch: dict[str, np.ndarray], source_name: str, objectness: str) -> dict[str, np.ndarray]:
    """Ray Data task (CPU): the proposals of every image of one shard, as one pickled {key: npz bytes}."""
    source = make_source(source_name, objectness)
    blobs, reused, start = [], 0, time.time()
    for path in batch["shard"]:
        per_key = {}
        for s in shards.read_shard(str(path)):
            p, was_cached = cached_or_compute(source, _image(s), s.extra)
            reused += was_cached
            per_key[s.key] = p.to_bytes()
        blobs.append(pickle.dumps(per_key))
    return {**batch, "proposals": np.array(blobs, dtype=object), "proposals_reused": np.full(len(blobs), reused),
            "proposals_started": np.full(len(blobs), start), "proposal_seconds": np.full(len(blobs), time.time() - start)}


class PseudoActor:
    """Ray Data actor: loads the classifier once, then masks and commits one shard per call."""

    def __init__(self, cfg: dict, device: str):
        import torch

        from maskless.pseudo.classifier import load_classifier

        self.cfg = PseudoConfig(**cfg)
        torch.set_num_threads(self.cfg.threads)
        model, classes, train_config = load_classifier(self.cfg.classifier)
        self.masker = PseudoMasker(model, classes, train_config, self.cfg.masker_options(), device)
        self.source = make_source(self.cfg.proposals, self.cfg.objectness).name if self.cfg.needs_proposals else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for i, name in enumerate(batch["name"]):
            if "proposals" in batch:
                timing = {"proposals_reused": int(batch["proposals_reused"][i]),
                          "proposals_started": float(batch["proposals_started"][i]),
                          "proposal_seconds": round(float(batch["proposal_seconds"][i]), 3)}
                proposals = pickle.loads(batch["proposals"][i])
            else:
                timing = {"proposals_reused": 0, "proposals_started": time.time(), "proposal_seconds": 0.0}
                proposals = None
            rows.append(self._shard(str(name), str(batch["shard"][i]), proposals, timing))
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}

    def _shard(self, name: str, path: str, proposals: dict[str, bytes] | None, timing: dict) -> dict[str, Any]:
        cfg, start = self.cfg, time.time()
        row = {"name": name, "count": 0, "instances": 0, "empty": 0, "seconds": 0.0, "error": ""}
        if storage.exists(storage.join(cfg.out, name + ".tar")):
            return row  # committed by an earlier attempt whose result was lost: never write it twice
        counts = {k: dict.fromkeys(self.masker.classes, 0) for k in CLASS_COUNTS}
        try:
            with shards.ShardWriter(cfg.out, name) as writer:
                for s in shards.read_shard(path):
                    if name in cfg.fail_shards and len(writer) == 1:
                        self._inject_failure(name)
                    props = None if proposals is None else Proposals.from_bytes(proposals[s.key])
                    responses = self.masker.responses(_image(s), s.labels)
                    instances = self.masker.instances(responses, props)
                    for label in set(s.labels) & set(self.masker.classes):
                        counts["images_labelled"][label] += 1
                    for p in responses.peaks:
                        counts["peaks"][self.masker.classes[p.cls]] += 1
                    for inst in instances:
                        counts["instances"][inst["class"]] += 1
                    extra = {k: v for k, v in s.extra.items() if k != CACHE_ENTRY}
                    if cfg.cache_proposals and proposals is not None:
                        extra[CACHE_ENTRY] = proposals[s.key]
                    pseudo = {"instances": instances, "classifier": cfg.classifier, "rule": cfg.rule,
                              "response": cfg.response, "proposals": self.source, "refine": cfg.refine}
                    writer.write(shards.Sample(s.key, s.jpg, s.meta, s.gt, pseudo, extra))
                    row["instances"] += len(instances)
                    row["empty"] += not instances
                row["count"] = len(writer)
                writer.commit({"stage": "pseudo", "pseudo_instances": row["instances"],
                               "images_without_instances": row["empty"], "per_class": counts, **timing,
                               "masking_seconds": round(time.time() - start, 3), "finished": time.time()})
        except Exception as e:  # the writer aborted: no output shard; reported, and a rerun redoes it
            log.exception("shard %s failed", name)
            row["error"] = f"{type(e).__name__}: {e}"
        row["seconds"] = round(time.time() - start, 3)
        return row

    def _inject_failure(self, name: str) -> None:
        if self.cfg.fail_mode == "raise":
            raise RuntimeError(f"injected failure in shard {name}")
        marker = storage.join(self.cfg.out, f".crash-{name}.tmp")  # hidden temp: removed by the next run
        if self.cfg.fail_mode == "exit_always" or not storage.exists(marker):
            storage.write_bytes_atomic(marker, b"")
            os._exit(1)  # the actor process dies mid-shard, once


def run_pseudo(cfg: PseudoConfig) -> dict:
    """Pseudo masks for every input shard not yet in cfg.out; dataset.json once all are there.
    Ray must be initialised by the caller. Raises RuntimeError naming the shards that failed (the
    others are committed; rerun to redo the failed ones)."""
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
    done = set(shards.shard_names(cfg.out))
    todo = [n for n in names if n not in done]
    use_gpu = has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    start = time.time()
    rows: list[dict] = []
    crashed = ""
    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = sys.stderr.isatty()
        items = [{"name": n, "shard": storage.join(cfg.data, n + ".tar")} for n in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # with GPU actors the two steps differ in resources, so Ray Data keeps proposals on CPU tasks;
        # on CPU-only clusters it fuses them into the actors, which saves a copy and changes no result
        if cfg.needs_proposals:
            ds = ds.map_batches(compute_proposals, batch_size=1, num_cpus=cfg.proposal_cpus,
                                fn_kwargs={"source_name": cfg.proposals, "objectness": cfg.objectness})
        # Ray Data restarts a dead actor without limit and by default retries its task without limit:
        # a shard that kills its actor every time would loop forever, so its retries are bounded. In
        # Ray 2.60 max_task_retries can only go through the deprecated **ray_remote_args (hence the
        # pin below 2.64 in pyproject.toml and the silenced deprecation warning).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(PseudoActor, batch_size=1,
                                compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, len(todo))),
                                **gpu_stage_options(cfg.actor_cpus, cfg.gpus_per_actor if use_gpu else 0,
                                                    cfg.resources),
                                max_task_retries=cfg.shard_retries,
                                fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg),
                                                       "device": "cuda" if use_gpu else "cpu"})
        try:
            rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in ds.take_all()]
        except Exception as e:  # a shard's actor died more than shard_retries times: the run stops here
            log.error("pseudo: Ray Data stopped: %s", e)
            crashed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    failed = {r["name"]: r["error"] for r in rows if r["error"]}
    proposals = cfg.proposals if cfg.needs_proposals else None
    written = set(shards.shard_names(cfg.out))
    missing = [n for n in names if n not in written]
    report = class_report(shards.read_stats(cfg.out), classes)
    for key, what in (("classes_without_peaks", "no peak in any train image (no image labelled with it, or never "
                                                "predicted)"),
                      ("classes_without_instances", "peaks but no pseudo instance")):
        if report[key]:
            log.warning("pseudo: %d class(es) with %s: %s; Mask R-CNN gets no example of them", len(report[key]),
                        what, ", ".join(report[key]))
    summary = {
        "shards": len(names), "skipped": len(done), "processed": len([n for n in todo if n in written]),
        "failed": failed, "ray_error": crashed,
        "images": int(sum(r["count"] for r in rows)), "instances": int(sum(r["instances"] for r in rows)),
        "images_without_instances": int(sum(r["empty"] for r in rows)),
        "seconds": round(time.time() - start, 3), "actors": cfg.actors, "gpu": use_gpu,
        "rule": cfg.rule, "response": cfg.response, "refine": cfg.refine, "proposals": proposals, "out": cfg.out,
        **report,
    }
    storage.write_json_atomic(storage.join(cfg.out, SUMMARY_FILE), summary)
    if missing:
        raise RuntimeError(f"pseudo: {len(missing)} shard(s) not written ({', '.join(missing)}): "
                           f"{failed or crashed or 'see the Ray logs'}; rerun the same command to redo them")
    info = shards.write_dataset_info(cfg.out, classes, stage="pseudo", classifier=cfg.classifier, rule=cfg.rule,
                                     response=cfg.response, proposals=proposals,
                                     classes_without_peaks=report["classes_without_peaks"],
                                     classes_without_instances=report["classes_without_instances"])
    summary["samples"] = info["samples"]
    log.info("pseudo: %s", summary)
    return summary

"""`maskless classify`: train the peak-stimulation classifier on image-level labels with Ray Train.

Data streams from the shards (labels from each sample's `json`), split into train and held-out by a
hash of the sample key. Every epoch ends with a checkpoint; a worker failure restarts the worker
group from the latest checkpoint, and rerunning with the same `out` after a driver crash continues
the run (Ray Train keeps its checkpoint list under OUT/ray).
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms

from maskless.core import shards, storage
from maskless.core.units import UNIT_SIZE, Unit, dataset_units
from maskless.core.run_folder import (RUN_FILE, STATE_FILE, SUMMARY_FILE, append_metrics, claim_run_folder, json_safe,
                                     ray_run_config, read_metrics)
from maskless.core.resources import check_resources, has_gpus, train_scaling, use_ray_train_env
from maskless.pseudo.classifier import (BACKBONES, EXPORT_NAME, PeakClassifier, build_classifier, classifier_from_checkpoint,
                               checkpoint_dict, imagenet_file, save_classifier)
from maskless.pseudo.peak_stimulation import BACKWARD_MODES
from maskless.pseudo.preprocess import IMAGENET_MEAN, IMAGENET_STD, eval_transform

log = logging.getLogger(__name__)

# settings a rerun into an existing run folder must share with it (the rest, e.g. epochs, may change)
RUN_IDENTITY = ("data", "val_data", "val_fraction", "val_min_per_class", "backbone", "backbone_weights",
                "peak_backward")


@dataclass
class ClassifyConfig:
    data: str = field(default="", metadata={"help": "shard dataset with image-level labels (json `labels`)"})
    out: str = field(default="", metadata={"help": "run folder: checkpoints, metrics.jsonl, classifier.pt"})
    val_data: Optional[str] = field(default=None, metadata={
        "help": "held-out shards; when set, all of --data trains and --val-fraction is unused"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of --data held out (by key hash)"})
    val_min_per_class: int = field(default=5, metadata={
        "help": "held-out floor: where --val-fraction holds out fewer images of a class, more of that class are "
                "held out (lowest key hashes first; at most half of the class); a held-out split still under "
                "it is warned about with its counts (0 = no floor)"})
    backbone: str = field(default="resnet50", metadata={"help": "backbone network", "choices": list(BACKBONES)})
    backbone_weights: str = field(default="imagenet", metadata={
        "help": "'imagenet' (torchvision weights, torch hub cache), a weights file, or 'none' (from scratch)"})
    download_weights: bool = field(default=False, metadata={
        "help": "let torchvision download 'imagenet' weights missing from the torch hub cache"})
    epochs: int = field(default=20, metadata={"help": "training epochs"})
    steps_per_epoch: Optional[int] = field(default=None, metadata={
        "help": "optimizer steps per epoch (default: one pass over the training split)"})
    batch_size: int = field(default=16, metadata={"help": "images per step on each worker"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate of the class-response head"})
    backbone_lr_scale: Optional[float] = field(default=None, metadata={
        "help": "backbone lr = lr x this (default 0.01 from pretrained weights, as PRM; 1 from scratch)"})
    lr_steps: list[int] = field(default_factory=list, metadata={
        "help": "epochs (0-based) from which the lr is multiplied by --lr-gamma once more (default: none, a constant lr)"})
    lr_gamma: float = field(default=0.1, metadata={"help": "lr factor at each of --lr-steps"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay"})
    image_size: int = field(default=448, metadata={"help": "training and evaluation image side (pixels)"})
    crop_scale: float = field(default=0.5, metadata={
        "help": "smallest image-area fraction of a random resized crop (1 = flips only)"})
    balanced: bool = field(default=False, metadata={
        "help": "class-balanced sampling (rare classes repeated, frequent ones thinned)"})
    peak_backward: str = field(default="prm", metadata={
        "help": "peak stimulation gradient: prm (unscaled, PRM's code) or mean (exact)",
        "choices": list(BACKWARD_MODES)})
    workers: int = field(default=1, metadata={"help": "Ray Train workers (data-parallel processes)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker"})
    use_gpu: Optional[bool] = field(default=None, metadata={"help": "one GPU per worker (default: when present)"})
    resources: Optional[dict[str, float]] = field(default=None, metadata={
        "help": "custom Ray resources per worker, NAME=AMOUNT,... (default: a share of gpu_stage where nodes have it)"})
    loader_workers: int = field(default=0, metadata={"help": "image-decoding processes per worker"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the latest checkpoint"})
    keep_checkpoints: int = field(default=2, metadata={"help": "epoch checkpoints kept under OUT/ray"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    fail_at_epoch: Optional[int] = field(default=None, metadata={
        "cli": False, "help": "failure injection for tests: raise once at the start of this (0-based) epoch"})

    def validate(self) -> None:
        if not self.data:
            raise ValueError("classify needs --data: a shard dataset with image-level labels")
        if not self.out:
            raise ValueError("classify needs --out: the run folder")
        check_resources(self.resources)
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.backbone == "tiny" and self.backbone_weights.lower() == "imagenet":
            raise ValueError("the tiny backbone has no ImageNet weights: use --backbone-weights none")
        if self.peak_backward not in BACKWARD_MODES:
            raise ValueError(f"--peak-backward must be one of {', '.join(BACKWARD_MODES)}")
        if self.val_min_per_class < 0:
            raise ValueError(f"--val-min-per-class must be >= 0, got {self.val_min_per_class}")
        if self.val_data is None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction} (or pass --val-data)")
        for name in ("epochs", "batch_size", "workers", "image_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.image_size % 32:
            raise ValueError(f"--image-size must be a multiple of 32 (the ResNet backbones' stride), got {self.image_size}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"--steps-per-epoch must be >= 1, got {self.steps_per_epoch}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if self.lr <= 0 or (self.backbone_lr_scale is not None and self.backbone_lr_scale < 0):
            raise ValueError("--lr must be > 0 and --backbone-lr-scale >= 0")
        if not 0.0 < self.lr_gamma <= 1.0 or any(not 0 < e < self.epochs for e in self.lr_steps):
            raise ValueError(f"--lr-gamma must be in (0, 1] and every --lr-steps epoch in 1..{self.epochs - 1} "
                             f"(--epochs {self.epochs}), got {self.lr_gamma} and {self.lr_steps}")
        if self.cpus_per_worker <= 0 or self.loader_workers < 0 or self.max_failures < -1:
            raise ValueError("--cpus-per-worker must be > 0, --loader-workers >= 0, --max-failures >= -1")


def _key_hash(key: str) -> float:
    """A fixed hash of the sample key in [0, 1), so every run and stage agrees on the split."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0 ** 64


def is_held_out(key: str, fraction: float) -> bool:
    """The held-out split by fraction: the samples whose key hash is under it."""
    return _key_hash(key) < fraction


@dataclass(frozen=True)
class HeldOut:
    """The held-out side of --data: key hash under `fraction`, plus the `extra` keys of the per-class floor."""

    fraction: float
    extra: frozenset = frozenset()

    def __call__(self, key: str) -> bool:
        return key in self.extra or is_held_out(key, self.fraction)


def held_out_split(root: str, classes: list[str], fraction: float, floor: int) -> HeldOut:
    """The fraction's split, topped up to `floor` held-out images per class where it has fewer.

    Why: a key-hash fraction of a small dataset holds out a handful of images (0.1 of 100 is about 10,
    three per class), too few for a per-class AP to mean anything. The extra images of a class are its
    not-yet-held-out images of lowest key hash (so the split is the same in every run), at most half of
    the class's images, so that the class still trains. One pass over the manifests, keeping at most
    `floor` candidates per class: memory grows with the classes, not with the images."""
    if floor == 0:
        return HeldOut(fraction)
    table = shards.read_manifest(root)
    known = set(classes)
    held, total = dict.fromkeys(classes, 0), dict.fromkeys(classes, 0)
    candidates: dict[str, list] = {c: [] for c in classes}  # per class, a max-heap of the `floor` lowest hashes
    for key, labels in zip(table.column("key").to_pylist(), table.column("labels").to_pylist()):
        labels = sorted(set(labels) & known)
        h = _key_hash(key)
        for c in labels:
            total[c] += 1
            if h < fraction:
                held[c] += 1
            elif len(candidates[c]) < floor:
                heapq.heappush(candidates[c], (-h, key, labels))
            elif -candidates[c][0][0] > h:
                heapq.heapreplace(candidates[c], (-h, key, labels))
    extra: set[str] = set()
    for c in classes:
        for _, key, labels in sorted(candidates[c], reverse=True):  # lowest hash first
            if held[c] >= floor or 2 * (held[c] + 1) > total[c]:
                break
            if key in extra:
                continue
            if any(2 * (held[l] + 1) > total[l] for l in labels):
                continue  # it would take more than half of another of its classes
            extra.add(key)
            for l in labels:
                held[l] += 1
    return HeldOut(fraction, frozenset(extra))


def dataset_classes(root: str) -> list[str]:
    """The class list: dataset.json `classes` when the dataset is finished, else the sorted union of labels."""
    if storage.exists(storage.join(root, shards.DATASET_FILE)):
        classes = list(shards.read_dataset_info(root)["classes"])
    else:
        classes = sorted({l for labels in shards.read_manifest(root).column("labels").to_pylist() for l in labels})
    if not classes:
        raise ValueError(f"{root} has no labelled samples: the classifier needs image-level labels (json `labels`)")
    return classes


def _split_counts(root: str, classes: list[str], held: HeldOut | None, held_out: bool) -> dict[str, Any]:
    """Samples and per-class counts of one side of the split, from the manifests (no image decoding)."""
    table = shards.read_manifest(root)
    known = set(classes)
    counts, n, unlabelled = dict.fromkeys(classes, 0), 0, 0
    for key, labels in zip(table.column("key").to_pylist(), table.column("labels").to_pylist()):
        if held is not None and held(key) != held_out:
            continue
        labels = [l for l in labels if l in known]
        if not labels:
            unlabelled += 1
            continue
        n += 1
        for l in set(labels):
            counts[l] += 1
    return {"samples": n, "unlabelled": unlabelled, "class_counts": counts}


def sample_weights_fn(class_counts: dict[str, int]):
    """Class-balanced repeat weight of a sample: mean of 1/frequency over its labels, normalised so that
    the expected number of samples per pass is unchanged.

    Shards are streamed, not indexed, so a WeightedRandomSampler cannot be used: instead each sample is
    emitted floor(w) times plus once more with probability frac(w).
    """
    inv = {c: 1.0 / n for c, n in class_counts.items() if n > 0}
    total = sum(class_counts.values())
    # sum over samples of mean(1/f) equals the number of classes present for single-label data
    norm = total / max(len(inv), 1) if total else 1.0
    return lambda labels: norm * float(np.mean([inv[l] for l in labels]))


class ShardStream(IterableDataset):
    """Samples of a shard dataset as (image tensor, multi-hot target).

    train=True: an endless, shuffled stream of the training side, partitioned across (rank, loader
    worker) by work units (core/units.py: slices of at most unit_size samples, whatever the input's
    sharding, so every partition holds about as many samples and reads only its own bytes) when there
    are enough units, else by key hash; DDP needs every rank to take the same number of steps, so the
    loop takes a fixed number of batches from an endless stream rather than exhausting uneven
    partitions. `units`: the dataset's units, planned once by the caller (else planned here).
    train=False: one ordered pass (rank 0 evaluates).
    """

    def __init__(self, root: str, classes: list[str], held: HeldOut | None, held_out: bool, transform,
                 train: bool, seed: int = 0, rank: int = 0, world: int = 1, weights: dict[str, int] | None = None,
                 shuffle_buffer: int = 256, units: list[Unit] | None = None, unit_size: int = UNIT_SIZE):
        self.root, self.classes, self.held, self.held_out = root, classes, held, held_out
        self.transform, self.train, self.seed, self.rank, self.world = transform, train, seed, rank, world
        self.weight = sample_weights_fn(weights) if weights else None
        self.shuffle_buffer, self.units, self.unit_size = shuffle_buffer, units, unit_size
        self.index = {c: i for i, c in enumerate(classes)}

    def _labelled(self, samples: Iterable[shards.Sample], part: int, parts: int,
                  by_key: bool) -> Iterator[tuple[shards.Sample, list]]:
        for s in samples:
            if self.held is not None and self.held(s.key) != self.held_out:
                continue
            if by_key and int(hashlib.sha1(s.key.encode()).hexdigest()[-8:], 16) % parts != part:
                continue
            labels = [l for l in s.labels if l in self.index]
            if labels:
                yield s, labels

    def _item(self, s: shards.Sample, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        target = torch.zeros(len(self.classes))
        target[[self.index[l] for l in labels]] = 1.0
        return self.transform(s.image()), target

    def __iter__(self):
        if not self.train:
            for s, labels in self._labelled(shards.read_dataset(self.root), 0, 1, False):
                yield self._item(s, labels)
            return
        units = self.units if self.units is not None else dataset_units(self.root, self.unit_size)
        info = get_worker_info()
        n_loader, loader_id = (info.num_workers, info.id) if info else (1, 0)
        parts, part = self.world * n_loader, self.rank * n_loader + loader_id
        rng = random.Random(f"{self.seed}-{part}")
        by_unit = len(units) >= parts
        mine, by_key = (units[part::parts], False) if by_unit else (units, parts > 1)
        buffer: list = []
        while True:
            emitted = 0
            order = rng.sample(mine, len(mine))
            for s, labels in self._labelled((s for u in order for s in u.samples()), part, parts, by_key):
                repeats = 1
                if self.weight is not None:
                    w = self.weight(labels)
                    repeats = int(w) + (rng.random() < w - int(w))
                for _ in range(repeats):
                    emitted += 1
                    buffer.append((s, labels))
                    if len(buffer) >= self.shuffle_buffer:
                        yield self._item(*buffer.pop(rng.randrange(len(buffer))))
            if emitted == 0:
                if len(mine) == len(units) and not by_key:
                    raise ValueError(f"{self.root}: no labelled training samples to stream")
                # this partition holds no training sample (tiny data): stream the whole training side
                mine, by_key = units, False
                continue
            while len(buffer) > min(self.shuffle_buffer, emitted) // 2:
                yield self._item(*buffer.pop(rng.randrange(len(buffer))))


def train_transform(size: int, crop_scale: float):
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(crop_scale, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Non-interpolated AP of one class (mean precision at each positive, ties ranked pessimistically
    by stable sort); NaN when the class has no positive. Hand-written: scikit-learn is not a dependency."""
    positives = targets.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = targets[order] > 0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / positives)


def classification_metrics(scores: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict[str, Any]:
    ap = {c: average_precision(scores[:, i], targets[:, i]) for i, c in enumerate(classes)}
    valid = [v for v in ap.values() if not math.isnan(v)]
    return {"map": float(np.mean(valid)) if valid else float("nan"), "ap": ap}


@torch.no_grad()
def evaluate(model: PeakClassifier, loader, classes: list[str], device) -> dict[str, Any]:
    """Held-out loss, per-class AP and mAP of the classification scores."""
    model.eval()
    all_scores, all_targets = [], []
    for x, y in loader:
        all_scores.append(model(x.to(device)).float().cpu())
        all_targets.append(y)
    if not all_scores:
        return {"val_samples": 0}
    scores, targets = torch.cat(all_scores), torch.cat(all_targets)
    out = classification_metrics(scores.numpy(), targets.numpy(), classes)
    out["val_loss"] = float(F.multilabel_soft_margin_loss(scores, targets))
    out["val_samples"] = len(targets)
    return out


def build_optimizer(model: PeakClassifier, lc: dict) -> torch.optim.Optimizer:
    """SGD over the head at lc["lr"] and the backbone at lr x backbone_lr_scale (lc: a ClassifyConfig as a dict)."""
    scale = lc["backbone_lr_scale"]
    if scale is None:
        scale = 0.01 if model.frozen_bn else 1.0
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lc["lr"] * scale},
              {"params": list(model.head.parameters()), "lr": lc["lr"]}]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.SGD(groups, lr=lc["lr"], momentum=lc["momentum"], weight_decay=lc["weight_decay"])


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, lc: dict) -> float:
    """Step decay: each group's lr is its base lr x lr_gamma per --lr-steps epoch reached. Set from the epoch
    number, not from the optimizer's state, so a run resumed from a checkpoint gets the same schedule.
    Returns the factor."""
    factor = lc["lr_gamma"] ** sum(epoch >= s for s in lc["lr_steps"])
    for g in optimizer.param_groups:
        g["lr"] = g.setdefault("base_lr", g["lr"]) * factor  # checkpoints from before the schedule lack it
    return factor


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
    """One SGD step of the multi-label soft-margin loss; returns the detached loss. The stage trains in
    fp32 (no scaler); with a scaler the forward runs under fp16 autocast and the loss is scaled, which
    bench/gpu.py measures to see what mixed precision would give."""
    with torch.autocast(x.device.type, enabled=scaler is not None):
        loss = F.multilabel_soft_margin_loss(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, steps: int,
                device: torch.device) -> torch.Tensor:
    """`steps` train_step calls on the next (images, labels) batches: a worker's epoch. No Ray here, so a
    test trains the same way in its own process. Returns [sum of loss x images, images]."""
    model.train()
    loss_sum = torch.zeros(2, device=device)
    for _ in range(steps):
        x, y = next(batches)
        loss = train_step(model, optimizer, x.to(device), y.to(device))
        loss_sum += torch.stack([loss * len(x), torch.tensor(float(len(x)), device=device)])
    return loss_sum


def train_loop(lc: dict) -> None:
    """Ray Train worker loop (one per worker)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(lc["seed"])  # same initial weights everywhere (DDP also broadcasts rank 0's)
    classes = lc["classes"]
    model = build_classifier(len(classes), lc["backbone"], lc["backbone_weights"], lc["peak_backward"],
                             lc["download_weights"])
    state, start_epoch = None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        if state["classes"] != classes or state["model_config"] != model.model_config():
            raise ValueError(f"the checkpoint in {lc['out']} is for classes {state['classes']} / "
                             f"{state['model_config']}: use a new --out for a different run")
        model.load_state_dict(state["model"])
        start_epoch = state["epoch"]
    device = ray.train.torch.get_device()
    ddp = ray.train.torch.prepare_model(model)
    net: PeakClassifier = getattr(ddp, "module", ddp)
    optimizer = build_optimizer(net, lc)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    steps = lc["steps_per_epoch"] or max(1, math.ceil(lc["train_samples"] / (lc["batch_size"] * world)))
    units = lc["units"]
    val_data = lc["val_data"] or lc["data"]
    # None: --val-data holds the held-out split
    held = None if lc["val_data"] else HeldOut(lc["val_fraction"], frozenset(lc["held_out_extra"]))
    if rank == 0:
        log.info("classify: epochs %d..%d, %d steps/epoch on %d worker(s)", start_epoch, lc["epochs"], steps, world)

    for epoch in range(start_epoch, lc["epochs"]):
        if lc["fail_at_epoch"] == epoch and start_epoch < epoch:
            # All ranks fail, but only after rank 0 has handed in the last epoch's checkpoint: Ray Train keeps a
            # report only once every rank's is in, so a rank failing while rank 0 still uploads would end the
            # attempt without it (Ray's semantics for a real crash; not the failure this hook simulates).
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            raise RuntimeError(f"injected failure at the start of epoch {epoch} (fail_at_epoch)")
        lr_factor = set_epoch_lr(optimizer, epoch, lc)
        t0 = time.time()
        stream = ShardStream(lc["data"], classes, held, False,
                             train_transform(lc["image_size"], lc["crop_scale"]), train=True,
                             seed=lc["seed"] * 100003 + epoch, rank=rank, world=world,
                             weights=lc["class_counts"] if lc["balanced"] else None, units=units)
        loader = DataLoader(stream, batch_size=lc["batch_size"], num_workers=lc["loader_workers"])
        batches = iter(loader)
        loss_sum = train_steps(ddp, optimizer, batches, steps, device)
        del batches, loader
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss_sum)
        train_time = time.time() - t0
        metrics: dict[str, Any] = {"epoch": epoch, "attempt_start_epoch": start_epoch, "steps": steps,
                                   "loss": float(loss_sum[0] / loss_sum[1]),
                                   "images_per_s": float(loss_sum[1]) / train_time, "train_time_s": train_time,
                                   "lr": lc["lr"] * lr_factor}
        if rank == 0:
            val = ShardStream(val_data, classes, held, True, eval_transform(lc["image_size"]), train=False)
            result = evaluate(net, DataLoader(val, batch_size=lc["batch_size"]), classes, device)
            metrics.update({k: v for k, v in result.items() if k != "ap"})
            metrics.update({f"ap/{c}": v for c, v in result.get("ap", {}).items()})
            append_metrics(lc["out"], {**metrics, "time": time.time()}, "epoch")
            with tempfile.TemporaryDirectory() as d:
                ckpt = checkpoint_dict(net, classes, lc["run_config"])
                ckpt.update(epoch=epoch + 1, optimizer=optimizer.state_dict())
                torch.save(ckpt, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        else:
            ray.train.report(metrics)


def _small_split_warning(val_counts: dict, cfg: ClassifyConfig) -> str:
    """A line naming the classes with fewer held-out images than the floor (at least one), with the counts;
    empty when the split is large enough."""
    floor = max(cfg.val_min_per_class, 1)
    small = {c: n for c, n in val_counts["class_counts"].items() if n < floor}
    if not small:
        return ""
    where = f"--val-data {cfg.val_data}" if cfg.val_data else f"--val-fraction {cfg.val_fraction} of {cfg.data}"
    return (f"the held-out split ({where}) is too small to measure the classifier: {val_counts['samples']} images, "
            f"under {floor} for {', '.join(f'{c} ({n})' for c, n in small.items())}; per class: "
            f"{val_counts['class_counts']}. Pass --val-data, or more data, or raise --val-fraction")


def _check_run_folder(cfg: ClassifyConfig, classes: list[str]) -> None:
    claim_run_folder(storage.join(cfg.out, RUN_FILE), "classify", dataclasses.asdict(cfg), RUN_IDENTITY, classes)


def run_classify(cfg: ClassifyConfig) -> dict:
    """Train (or continue training) the classifier; writes OUT/classifier.pt, metrics.jsonl, summary.json.

    Assumes Ray is initialized by the caller."""
    from ray.train.torch import TorchTrainer

    cfg.validate()
    for root in [cfg.data] + ([cfg.val_data] if cfg.val_data else []):
        if not shards.list_shards(root):
            raise FileNotFoundError(f"no complete shards in {root}: run the crawl or import stage first")
    classes = dataset_classes(cfg.data)
    held = None if cfg.val_data else held_out_split(cfg.data, classes, cfg.val_fraction, cfg.val_min_per_class)
    train_counts = _split_counts(cfg.data, classes, held, held_out=False)
    val_counts = _split_counts(cfg.val_data or cfg.data, classes, held, held_out=True)
    if train_counts["samples"] == 0:
        raise ValueError(f"{cfg.data} has no labelled training samples (after holding out {cfg.val_fraction})")
    val_counts["added_by_floor"] = len(held.extra) if held else 0
    val_counts["warning"] = _small_split_warning(val_counts, cfg)
    if val_counts["warning"]:
        log.warning("classify: %s", val_counts["warning"])
    log.info("classify: %d training and %d held-out images (held out per class: %s)", train_counts["samples"],
             val_counts["samples"], val_counts["class_counts"])
    if cfg.backbone_weights.lower() == "imagenet":
        imagenet_file(cfg.backbone, cfg.download_weights)  # missing weights fail (or download) here first
    elif cfg.backbone_weights.lower() != "none" and not storage.exists(cfg.backbone_weights):
        raise FileNotFoundError(f"backbone weights file {cfg.backbone_weights} does not exist: pass an existing "
                                f"file, 'imagenet', or 'none' to train from scratch")
    storage.makedirs(cfg.out)
    _check_run_folder(cfg, classes)
    use_ray_train_env()

    use_gpu = has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    run_config = dataclasses.asdict(cfg)
    loop_config = {**run_config, "classes": classes, "train_samples": train_counts["samples"],
                   "held_out_extra": sorted(held.extra) if held else [],
                   "class_counts": train_counts["class_counts"], "run_config": run_config,
                   "units": dataset_units(cfg.data)}  # planned once here, not on every rank
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=train_scaling(cfg.workers, cfg.cpus_per_worker, use_gpu, cfg.resources),
        run_config=ray_run_config(cfg.out, cfg.max_failures, cfg.keep_checkpoints),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"classify finished without a checkpoint in {cfg.out}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    model = classifier_from_checkpoint(state, result.checkpoint.path)
    export = storage.join(cfg.out, EXPORT_NAME)
    save_classifier(model, classes, run_config, export)
    history = read_metrics(cfg.out)
    last = history[-1] if history else {}
    summary = {
        "stage": "classify", "out": cfg.out, "classifier": export, "classes": classes,
        "epochs_done": state["epoch"], "train": train_counts, "held_out": val_counts,
        "device": "gpu" if use_gpu else "cpu", "workers": cfg.workers, "fit_time_s": round(time.time() - t0, 2),
        "final": json_safe({k: v for k, v in last.items() if k != "time"}),
        "checkpoint": result.checkpoint.path, "config": run_config,
    }
    storage.write_json_atomic(storage.join(cfg.out, SUMMARY_FILE), summary)
    return summary

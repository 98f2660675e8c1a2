"""`maskless train`: Mask R-CNN on pseudo (or true) masks, data-parallel with Ray Train.

The run folder RUN holds everything: Ray Train's checkpoints (RUN/ray), metrics.jsonl, the exported
model.pt and summary.json. A rerun with the same RUN continues from the latest checkpoint (Ray Train
restores its run from the same name and storage path), so a crashed driver loses at most the steps
since the last checkpoint; a lost worker restarts the worker group from it (FailureConfig). Ctrl-C /
SIGTERM on the driver, or a file RUN/STOP, makes every worker checkpoint at the next log point and stop.
When Ray drains a node of the run for preemption (an autoscaler reclaiming a spot node), the workers
checkpoint at the next log point and Ray Train restarts them elsewhere from it at the drain's deadline; Ray
Train's preemption watcher, which tells them, runs on a cluster (core/resources.py).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from maskless.core import storage
from maskless.core.run_folder import (RUN_FILE, STATE_FILE, SUMMARY_FILE, append_metrics, claim_run_folder,
                                     ray_run_config, read_metrics)
from maskless.core.resources import check_resources, has_gpus, train_scaling, use_ray_train_env
from maskless.train.dataset import MASK_SOURCES, ShardDataset, build_index, collate, rank_batches, steps_per_epoch
from maskless.train.maskrcnn import ARCHS, build_model, build_options, resolve_norm, save_model, weights_file

log = logging.getLogger(__name__)

STOP_FILE = "STOP"
EXPORT_NAME = "model.pt"
# settings a rerun into an existing run folder must share with it (the rest, e.g. epochs, may change)
RUN_IDENTITY = ("data", "masks", "score_threshold", "keep_empty", "arch", "weights", "norm", "min_size",
                "max_size", "anchor_sizes", "trainable_backbone_layers", "batch_size", "workers", "seed")
LOSSES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@dataclass
class TrainConfig:
    data: str = field(default="", metadata={"help": "shard dataset with pseudo.json (or gt.json with --masks gt)"})
    out: str = field(default="", metadata={"help": "run folder: checkpoints, metrics.jsonl, model.pt, summary.json"})
    masks: str = field(default="pseudo", metadata={
        "help": "train on pseudo masks, or on ground truth (the fully supervised upper bound)",
        "choices": list(MASK_SOURCES)})
    score_threshold: float = field(default=0.0, metadata={"help": "drop pseudo instances scored below this"})
    keep_empty: bool = field(default=False, metadata={"help": "keep images left without instances (negatives)"})
    arch: str = field(default="maskrcnn_resnet50_fpn", metadata={"help": "network", "choices": list(ARCHS)})
    weights: str = field(default="imagenet", metadata={
        "help": "'imagenet' (backbone) or 'coco' (detector) from the torch hub cache, a weights file, or 'none'"})
    download_weights: bool = field(default=False, metadata={
        "help": "let torchvision download 'imagenet'/'coco' weights missing from the torch hub cache"})
    norm: Optional[str] = field(default=None, metadata={
        "help": "backbone norm: frozen, batch or group (ResNets only) (default: frozen from pretrained weights, "
                "batch from scratch)", "choices": ["frozen", "batch", "group"]})
    trainable_backbone_layers: Optional[int] = field(default=None, metadata={
        "help": "backbone stages trained (default: 3 from pretrained weights, all from scratch)"})
    min_size: int = field(default=800, metadata={"help": "shorter image side the model resizes to"})
    max_size: int = field(default=1333, metadata={"help": "longer image side cap"})
    scale_jitter: list[float] = field(default_factory=list, metadata={
        "help": "training scales of --min-size drawn per batch, e.g. 0.8,0.9,1.0,1.1 (empty: none)"})
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability"})
    anchor_sizes: list[int] = field(default_factory=list, metadata={
        "help": "anchor size per feature level, 5 (ResNet FPN) or 3 (MobileNet) (empty: torchvision's)"})
    rpn_pre_nms_top_n_train: Optional[int] = field(default=None, metadata={"help": "RPN proposals before NMS (train)"})
    rpn_post_nms_top_n_train: Optional[int] = field(default=None, metadata={"help": "RPN proposals kept (train)"})
    rpn_pre_nms_top_n_test: Optional[int] = field(default=None, metadata={"help": "RPN proposals before NMS (test)"})
    rpn_post_nms_top_n_test: Optional[int] = field(default=None, metadata={"help": "RPN proposals kept (test)"})
    box_batch_size_per_image: Optional[int] = field(default=None, metadata={"help": "RoIs sampled per image"})
    box_detections_per_img: Optional[int] = field(default=None, metadata={"help": "detections kept per image"})
    epochs: int = field(default=26, metadata={"help": "training epochs"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop (and export) after this many steps"})
    batch_size: int = field(default=2, metadata={"help": "images per step on each worker"})
    lr: Optional[float] = field(default=None, metadata={
        "help": "learning rate (default: --base-lr x total batch / --base-batch)"})
    base_lr: float = field(default=0.02, metadata={"help": "learning rate at --base-batch images per step"})
    base_batch: int = field(default=16, metadata={"help": "total batch of --base-lr"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay"})
    warmup_iters: int = field(default=1000, metadata={"help": "linear warmup steps (at most one epoch)"})
    warmup_factor: float = field(default=0.001, metadata={"help": "learning-rate factor at step 0 of the warmup"})
    lr_steps: list[int] = field(default_factory=lambda: [16, 22], metadata={"help": "epochs where lr drops"})
    lr_gamma: float = field(default=0.1, metadata={"help": "lr factor at each of --lr-steps"})
    clip_grad_norm: Optional[float] = field(default=None, metadata={
        "help": "clip the gradient norm to this (not in the reference recipe; from scratch, the new heads' "
                "first gradients are large enough to diverge without it)"})
    amp: bool = field(default=True, metadata={"help": "mixed precision (GPU only)"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers (data-parallel processes)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker (= torch threads on CPU)"})
    use_gpu: Optional[bool] = field(default=None, metadata={"help": "one GPU per worker (default: when present)"})
    resources: Optional[dict[str, float]] = field(default=None, metadata={
        "help": "custom Ray resources per worker, NAME=AMOUNT,... (default: a share of gpu_stage where nodes have it)"})
    loader_workers: int = field(default=2, metadata={"help": "image-decoding processes per worker"})
    log_every: int = field(default=20, metadata={"help": "steps between metric reports (and stop checks)"})
    checkpoint_every: int = field(default=0, metadata={"help": "also checkpoint every N steps (0: epochs only)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept under RUN/ray"})
    max_failures: int = field(default=2, metadata={"help": "worker-group restarts from the latest checkpoint"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def validate(self) -> None:
        if not self.data:
            raise ValueError("train needs --data: a shard dataset with pseudo masks (or --masks gt)")
        if not self.out:
            raise ValueError("train needs --out: the run folder")
        check_resources(self.resources)
        if self.masks not in MASK_SOURCES:
            raise ValueError(f"--masks must be one of {', '.join(MASK_SOURCES)}, got {self.masks!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("epochs", "batch_size", "workers", "min_size", "max_size", "base_batch", "log_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        resolve_norm(self.arch, self.weights, self.norm)
        if self.max_size < self.min_size:
            raise ValueError(f"--max-size ({self.max_size}) must be >= --min-size ({self.min_size})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if any(s <= 0 for s in self.scale_jitter):
            raise ValueError(f"--scale-jitter factors must be > 0, got {self.scale_jitter}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"--hflip must be in [0, 1], got {self.hflip}")
        if (self.lr is not None and self.lr <= 0) or self.base_lr <= 0:
            raise ValueError("--lr and --base-lr must be > 0")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"--clip-grad-norm must be > 0, got {self.clip_grad_norm}")
        if not 0.0 < self.warmup_factor <= 1.0 or self.warmup_iters < 0:
            raise ValueError("--warmup-factor must be in (0, 1] and --warmup-iters >= 0")
        if self.cpus_per_worker <= 0 or self.loader_workers < 0 or self.max_failures < -1 or self.checkpoint_every < 0:
            raise ValueError("--cpus-per-worker must be > 0, --loader-workers and --checkpoint-every >= 0, "
                             "--max-failures >= -1")

    def model_options(self) -> dict[str, Any]:
        """build_model keyword arguments (weights aside)."""
        return dict(arch=self.arch, min_size=self.min_size, max_size=self.max_size, norm=self.norm,
                    trainable_backbone_layers=self.trainable_backbone_layers,
                    anchor_sizes=list(self.anchor_sizes) or None,
                    rpn_pre_nms_top_n_train=self.rpn_pre_nms_top_n_train,
                    rpn_post_nms_top_n_train=self.rpn_post_nms_top_n_train,
                    rpn_pre_nms_top_n_test=self.rpn_pre_nms_top_n_test,
                    rpn_post_nms_top_n_test=self.rpn_post_nms_top_n_test,
                    box_batch_size_per_image=self.box_batch_size_per_image,
                    box_detections_per_img=self.box_detections_per_img)

    def total_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size * self.workers / self.base_batch


def learning_rate(cfg: TrainConfig, step: int, epoch: int, steps_per_epoch: int) -> float:
    """The reference schedule: linear warmup (capped at one epoch, as torchvision's reference), step decay."""
    lr = cfg.total_lr() * cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)
    warmup = min(cfg.warmup_iters, steps_per_epoch)
    if step < warmup:
        lr *= cfg.warmup_factor + (1 - cfg.warmup_factor) * step / warmup
    return lr


class Training:
    """One worker's model, optimizer, gradient scaler and step count: what a checkpoint holds, and one
    optimisation step. No Ray here, so a bare GPU machine runs the same step (bench/gpu.py)."""

    def __init__(self, cfg: TrainConfig, classes: list[str], device: torch.device):
        self.cfg, self.device = cfg, device
        self.amp = device.type == "cuda" and cfg.amp
        self.model = build_model(classes, weights=cfg.weights, download_weights=cfg.download_weights,
                                 **cfg.model_options())
        if cfg.scale_jitter:
            # torchvision's transform draws a training size per batch from min_size and evaluates at min_size[-1]
            self.model.transform.min_size = tuple(round(cfg.min_size * s) for s in cfg.scale_jitter) + (cfg.min_size,)
        self.model.to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.total_lr(), momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.step = 0

    @property
    def net(self) -> torch.nn.Module:
        """The model itself, also when DDP wraps it."""
        return getattr(self.model, "module", self.model)

    def state(self, epoch: int, done: bool) -> dict:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": epoch, "done": done}

    def load(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]

    def train_step(self, images: list[torch.Tensor], targets: list[dict], lr: float) -> torch.Tensor:
        """One SGD step at learning rate lr; returns the detached losses in LOSSES order."""
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, enabled=self.amp):
            losses = self.model(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(sum(losses.values())).backward()
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return torch.stack([losses[k].detach().float() for k in LOSSES])


def interval_metrics(loss_sums: torch.Tensor, steps: int, step: int, epoch: int, lr: float, seconds: float,
                     batch_size: int, world: int) -> dict[str, Any]:
    """The report of the steps since the last one; a non-finite mean loss stops the run with advice."""
    values = (loss_sums / steps).tolist()
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"loss is not finite at step {step} (lr {lr:.3g}): "
                                 f"lower --lr, set --clip-grad-norm, or raise --warmup-iters")
    return {"step": step, "epoch": epoch, "lr": lr, "loss": sum(values), **dict(zip(LOSSES, values)),
            "images_per_s": steps * batch_size * world / seconds,
            "images_per_s_per_worker": steps * batch_size / seconds, "workers": world}


def _report(training: Training, metrics: dict, epoch: int, done: bool, rank: int, with_checkpoint: bool) -> None:
    """ray.train.report every rank must call; rank 0 attaches the checkpoint when one is due."""
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save(training.state(epoch, done), os.path.join(d, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def train_loop(lc: dict) -> None:
    """One Ray Train worker: resume from the latest checkpoint, train, report, checkpoint."""
    import ray.train
    import ray.train.torch
    from ray.train.collective import broadcast_from_rank_zero

    cfg = TrainConfig(**lc["cfg"])
    entries, classes, spe = lc["entries"], lc["classes"], lc["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    training = Training(cfg, classes, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            training.load(torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True))
    training.model = ray.train.torch.prepare_model(training.model)
    total = cfg.epochs * spe if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * spe)
    dataset = ShardDataset(entries, classes, cfg.score_threshold)
    stop_file = storage.join(cfg.out, STOP_FILE)
    saved_for_preemption = False
    training.model.train()
    while training.step < total:
        epoch, start = divmod(training.step, spe)
        batches = rank_batches(entries, cfg.batch_size, rank, world, epoch, cfg.seed, cfg.hflip)[start:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=cfg.loader_workers, pin_memory=device.type == "cuda")
        sums, n, t0 = torch.zeros(len(LOSSES), device=device), 0, time.perf_counter()
        for images, targets in loader:
            lr = learning_rate(cfg, training.step, epoch, spe)
            sums, n = sums + training.train_step(images, targets, lr), n + 1
            step = training.step
            end_of_epoch = step % spe == 0 or step >= total
            if not (step % cfg.log_every == 0 or end_of_epoch):
                continue
            metrics = interval_metrics(sums, n, step, epoch, lr, time.perf_counter() - t0, cfg.batch_size, world)
            stop = bool(broadcast_from_rank_zero(storage.exists(stop_file) if rank == 0 else None))
            preempted = ray.train.get_preemption_info() is not None and not saved_for_preemption
            saved_for_preemption = saved_for_preemption or preempted
            every = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            _report(training, metrics, epoch, step >= total, rank, end_of_epoch or stop or preempted or every)
            if stop:
                return
            sums, n, t0 = torch.zeros_like(sums), 0, time.perf_counter()
            if step >= total:
                break


def metrics_writer(out: str):
    """A Ray Train callback on the controller: rank 0's metrics of each report as one line of metrics.jsonl."""
    from ray.train import UserCallback

    class MetricsWriter(UserCallback):
        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            append_metrics(out, {**metrics[0], "time": time.time()}, "step")

    return MetricsWriter()


def _check_run_folder(cfg: TrainConfig, classes: list[str]) -> None:
    claim_run_folder(storage.join(cfg.out, RUN_FILE), "train", dataclasses.asdict(cfg), RUN_IDENTITY, classes)


class _StopOnSignal:
    """While training, the first Ctrl-C / SIGTERM asks the workers to checkpoint and stop (RUN/STOP);
    a second one interrupts at once."""

    def __init__(self, stop_file: str):
        self.stop_file, self.saved = stop_file, {}

    def _handle(self, signum, frame) -> None:
        log.warning("train: stopping at the next log point after a checkpoint (again to abort now)")
        storage.write_bytes_atomic(self.stop_file, b"stop\n")
        for s, h in self.saved.items():
            signal.signal(s, h)

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.saved.items():
            signal.signal(s, h)


def run_train(cfg: TrainConfig) -> dict:
    """Train (or continue training) Mask R-CNN; writes RUN/model.pt, metrics.jsonl, summary.json.

    Assumes Ray is initialized by the caller."""
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.validate()
    entries, classes, counts = build_index(cfg.data, cfg.masks, cfg.score_threshold, cfg.keep_empty)
    spe = steps_per_epoch(len(entries), cfg.batch_size, cfg.workers)
    if spe == 0:
        raise ValueError(f"{len(entries)} training images cannot fill one batch of {cfg.batch_size} on each of "
                         f"{cfg.workers} workers: lower --batch-size or --workers")
    weights_file(cfg.arch, cfg.weights, cfg.download_weights)  # missing weights fail (or download) here first
    storage.makedirs(cfg.out)
    _check_run_folder(cfg, classes)
    stop_file = storage.join(cfg.out, STOP_FILE)
    storage.delete(stop_file)
    use_ray_train_env()

    use_gpu = has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "entries": entries, "classes": classes,
                           "steps_per_epoch": spe},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=train_scaling(cfg.workers, cfg.cpus_per_worker, use_gpu, cfg.resources),
        run_config=ray_run_config(cfg.out, cfg.max_failures, cfg.keep_checkpoints, [metrics_writer(cfg.out)]),
    )
    t0 = time.time()
    with _StopOnSignal(stop_file):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"train stopped before its first checkpoint in {cfg.out}: rerun to start again")
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    history = read_metrics(cfg.out)
    speeds = [m["images_per_s"] for m in history[1:]] or [m["images_per_s"] for m in history]
    summary = {
        "stage": "train", "out": cfg.out, "status": "finished" if state["done"] else "interrupted",
        "step": state["step"], "epoch": state["epoch"], "steps_per_epoch": spe, "classes": classes,
        "data": counts, "train_images": len(entries), "device": "gpu" if use_gpu else "cpu",
        "workers": cfg.workers, "lr": cfg.total_lr(), "fit_time_s": round(time.time() - t0, 2),
        "images_per_s_median": statistics.median(speeds) if speeds else None,
        "final": {k: v for k, v in (history[-1] if history else {}).items() if k != "time"},
        "checkpoint": result.checkpoint.path, "config": dataclasses.asdict(cfg),
    }
    if state["done"]:
        options = cfg.model_options()
        build = build_options(**{**options, "norm": resolve_norm(cfg.arch, cfg.weights, cfg.norm)})
        summary["model"] = storage.join(cfg.out, EXPORT_NAME)
        save_model(summary["model"], state["model"], classes, {"build": build, "train": dataclasses.asdict(cfg)})
    else:
        log.warning("train: interrupted at step %d; rerun the same command to resume", state["step"])
    storage.delete(stop_file)
    storage.write_json_atomic(storage.join(cfg.out, SUMMARY_FILE), summary)
    return summary

"""Bench: every GPU path of maskless, a bounded number of steps each, on synthetic data, in one command.

Figures (images/s unless said otherwise; peak memory is torch.cuda.max_memory_allocated of that step):
  classifier  PeakClassifier ResNet-50 at 448 px, batch 16, 20 classes (pseudo/classifier.py), random
              weights with frozen BatchNorm (the compute of examples/voc2012.yaml's ImageNet start;
              nothing is downloaded): the train step of pseudo/classify.train_step in fp32 (as the stage
              trains) and with AMP (fp16 autocast + GradScaler), the peak memory of each, the held-out
              evaluation forward, and PRM peak backpropagation (pseudo/peak_response.py) in peaks/s
  pseudo      VOC-size images (375 x 500) through pseudo/instances.PseudoMasker with the default rule:
              the peak responses alone (the GPU part), then the whole masker (+ response masks, GrabCut,
              NMS, RLE); and examples/voc2012.yaml's rule (PRM retrieval over selective-search proposals,
              the proposals computed in the same process)
  maskrcnn    Mask R-CNN ResNet-50-FPN (train/maskrcnn.py; random weights, frozen BatchNorm, 3 trainable
              stages, as from ImageNet weights) at min/max size 480/640 (examples/voc2012.yaml) and
              800/1333: the step of train/trainer.Training (AMP with GradScaler on CUDA) at batch 2, 4
              and 8, its peak memory and its last loss (a non-finite loss is an error); predict
              (train/predict.detect, fp32, batch 4, score threshold 0 so all 100 detections are kept)
  projection  examples/voc2012.yaml's run time computed from those rates and PASCAL VOC's image counts
              (10,582 labelled / 1,464 train / 1,449 val): a projection, not a measurement

On a GPU machine, from the root of a copy of the repository (nothing to install, no network):

    python -m bench.gpu --device cuda --json gpu.json

It prints one table and writes the JSON (bench/common.write_result). It needs torch and torchvision
with CUDA, numpy, pillow, pyarrow and opencv, and neither Ray, webdataset, icrawler nor protego. Three
optional packages each feed a few rows; without one, those rows print as "not measured" and say why:
  pycocotools                      the whole pseudo masker (its NMS and RLE masks), and so the pseudo
                                   part of the projection
  PyYAML                           the projection and voc2012.yaml's pseudo rule (they read the YAML)
  opencv-contrib-python-headless   cv2.ximgproc, the selective-search proposals of voc2012.yaml's rule
(opencv-contrib is a large wheel that would shadow the machine's own opencv: without it the pseudo
part of the projection stays open.) pycocotools and PyYAML travel as two small wheels (0.4 and 0.9 MB)
built for the GPU machine's Python (`python3 -V` there; 3.12 below):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        --platform manylinux_2_17_x86_64 -d wheels pycocotools pyyaml
    # on the GPU machine:
    pip install --no-index --no-deps --target /tmp/site wheels/*.whl
    PYTHONPATH=/tmp/site python -m bench.gpu --device cuda --json gpu.json

The full run is sized for well under 5 minutes on one GPU (not yet timed on one). `--device cpu --tiny`
shrinks every model and image so the same code runs in seconds on a CPU (tests/test_gpu_bench.py);
its figures mean nothing. `maskless bench` runs this module only where torch sees CUDA.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
import torch

from bench.common import write_result
from maskless.pseudo.classifier import PeakClassifier
from maskless.pseudo.classify import ClassifyConfig, build_optimizer, train_step
from maskless.pseudo.instances import MaskerOptions, PseudoMasker
from maskless.pseudo.peak_response import Peak, peak_response_maps
from maskless.pseudo.proposals import make_source
from maskless.train.dataset import steps_per_epoch
from maskless.train.maskrcnn import build_model
from maskless.train.predict import detect
from maskless.train.trainer import TrainConfig, Training, learning_rate

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "voc2012.yaml")
# PASCAL VOC 2012 as examples/voc2012.yaml's comments count it: train_aug (the classifier's labels),
# the segmentation train split (pseudo masks, Mask R-CNN) and val (evaluation)
VOC_LABELLED, VOC_TRAIN, VOC_VAL = 10_582, 1_464, 1_449
VOC_CLASSES = 20
VOC_IMAGE = (375, 500)  # (h, w): VOC's most common image size


@dataclass(frozen=True)
class Plan:
    """What is measured and for how many steps: FULL on a GPU, TINY in seconds on a CPU."""

    backbone: str
    classifier_size: int
    classifier_batch: int
    classes: int
    image: tuple[int, int]  # pseudo-mask and Mask R-CNN images (h, w); the model resizes them
    prm_peaks: int
    pseudo_images: int
    recipe_rule_images: int
    arch: str
    maskrcnn_sizes: tuple[tuple[int, int], ...]  # (min, max); with --tiny the first stands in for the recipe's
    maskrcnn_batches: tuple[int, ...]
    predict_batch: int
    warmup: int  # untimed calls before each timed run
    steps: int  # timed calls
    detector: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields


FULL = Plan("resnet50", 448, 16, VOC_CLASSES, VOC_IMAGE, prm_peaks=32, pseudo_images=4, recipe_rule_images=2,
            arch="maskrcnn_resnet50_fpn", maskrcnn_sizes=((480, 640), (800, 1333)), maskrcnn_batches=(2, 4, 8),
            predict_batch=4, warmup=2, steps=6)
TINY = Plan("tiny", 64, 2, 3, (48, 64), prm_peaks=4, pseudo_images=2, recipe_rule_images=1,
            arch="resnet18_fpn", maskrcnn_sizes=((48, 64), (64, 96)), maskrcnn_batches=(1, 4),
            predict_batch=2, warmup=0, steps=1,
            detector=dict(anchor_sizes=[8, 16, 32, 64, 128], rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                          rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=8,
                          box_detections_per_img=20))


class Figures:
    """The rows measured (bench/common.py's rows), the rows that could not be measured here and why,
    and the errors of the measurements that failed (the others still run)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.not_measured: list[dict] = []
        self.errors: list[dict] = []

    def add(self, metric: str, value: float, unit: str) -> None:
        self.rows.append({"metric": metric, "value": float(value), "unit": unit})

    def skip(self, metric: str, reason: str) -> None:
        self.not_measured.append({"metric": metric, "reason": reason})

    def get(self, metric: str) -> float | None:
        return next((r["value"] for r in self.rows if r["metric"] == metric), None)

    def attempt(self, what: str, fn: Callable[[], None]) -> None:
        """Run one measurement; a failure is recorded (and printed) instead of ending the bench."""
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            self.errors.append({"measurement": what, "error": f"{type(e).__name__}: {e}"})
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Mean wall time of `steps` calls after `warmup` untimed ones, the device's queue drained at both ends."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(fig: Figures, metric: str, device: torch.device) -> None:
    if device.type == "cuda":
        fig.add(metric, torch.cuda.max_memory_allocated(device) / 2**20, "MiB")
    else:
        fig.skip(metric, "peak GPU memory: CUDA only")


def _check_finite(what: str, value: float) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"{what}: the loss is {value}")
    return value


def synthetic_images(n: int, hw: tuple[int, int], seed: int) -> list[np.ndarray]:
    """RGB uint8 (h, w, 3) images: smooth colour fields plus noise, so GrabCut and the proposals see
    regions rather than pure noise."""
    rng = np.random.default_rng(seed)
    h, w = hw
    out = []
    for _ in range(n):
        low = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
        image = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 8, (h, w, 3))
        out.append(np.clip(image, 0, 255).astype(np.uint8))
    return out


def synthetic_detection_batch(n: int, hw: tuple[int, int], classes: int, seed: int) -> tuple[list, list]:
    """n float images in [0, 1] (3, h, w) with three box-shaped instances each, as the dataset yields them."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=g))
        size = torch.rand(3, 2, generator=g) * 0.3 + 0.15  # box sides: 15-45% of the image's
        corner = torch.rand(3, 2, generator=g) * (1 - size)
        boxes = torch.cat([corner, corner + size], 1) * torch.tensor([w, h, w, h])
        masks = torch.zeros(3, h, w, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, classes + 1, (3,), generator=g), "masks": masks})
    return images, targets


def _classifier(plan: Plan, device: torch.device) -> PeakClassifier:
    torch.manual_seed(0)
    return PeakClassifier(plan.classes, plan.backbone, frozen_bn=True).to(device)


def classifier_name(plan: Plan) -> str:
    return f"classifier {plan.backbone} {plan.classifier_size}px b{plan.classifier_batch}"


def bench_classifier(plan: Plan, device: torch.device, fig: Figures) -> None:
    name = classifier_name(plan)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(plan.classifier_batch, 3, plan.classifier_size, plan.classifier_size, generator=g).to(device)
    y = torch.zeros(plan.classifier_batch, plan.classes)
    y[torch.arange(plan.classifier_batch), torch.randint(plan.classes, (plan.classifier_batch,), generator=g)] = 1
    y = y.to(device)
    settings = dataclasses.asdict(ClassifyConfig())  # the stage's learning rates, momentum, weight decay

    def train(precision: str) -> None:
        metric = f"{name}: train step, {precision}"
        if precision == "AMP" and device.type != "cuda":
            fig.skip(metric, "AMP: CUDA only")
            fig.skip(f"{name}: train peak memory, AMP", "AMP: CUDA only")
            return
        model = _classifier(plan, device).train()
        optimizer = build_optimizer(model, settings)
        scaler = torch.amp.GradScaler("cuda") if precision == "AMP" else None
        losses: list[torch.Tensor] = []
        _reset_peak_memory(device)
        s = seconds_per_call(lambda: losses.append(train_step(model, optimizer, x, y, scaler)),
                             plan.warmup, plan.steps, device)
        _check_finite(metric, float(losses[-1]))
        fig.add(metric, plan.classifier_batch / s, "images/s")
        _peak_memory(fig, f"{name}: train peak memory, {precision}", device)

    def evaluate() -> None:
        model = _classifier(plan, device).eval()
        with torch.no_grad():
            s = seconds_per_call(lambda: model(x), plan.warmup, plan.steps, device)
        fig.add(f"{name}: held-out evaluation forward", plan.classifier_batch / s, "images/s")

    def prm() -> None:
        model = _classifier(plan, device).eval()
        one = x[:1]
        with torch.no_grad():
            h, w = model.class_response_maps(one).shape[2:]
        n = (plan.prm_peaks,)
        cls, ys, xs = (torch.randint(k, n, generator=g) for k in (plan.classes, h, w))
        peaks = [Peak(int(c), int(py), int(px), 1.0) for c, py, px in zip(cls, ys, xs)]
        s = seconds_per_call(lambda: peak_response_maps(model, one, peaks, "prm", MaskerOptions.peak_batch),
                             plan.warmup, max(1, plan.steps // 2), device)
        fig.add(f"{name}: PRM peak backpropagation", len(peaks) / s, "peaks/s")

    fig.attempt("classifier train fp32", lambda: train("fp32"))
    fig.attempt("classifier train AMP", lambda: train("AMP"))
    fig.attempt("classifier evaluation", evaluate)
    fig.attempt("PRM peak backpropagation", prm)


def _images_per_s(fn: Callable[[np.ndarray, list[str]], Any], images: list[np.ndarray],
                  labels: list[list[str]]) -> tuple[float, list]:
    """(images/s, results) of fn over images[1:] (images[0] warms up); fn returns its results on the CPU."""
    fn(images[0], labels[0])
    start = time.perf_counter()
    results = [fn(image, lab) for image, lab in zip(images[1:], labels[1:])]
    return (len(images) - 1) / (time.perf_counter() - start), results


def bench_pseudo(plan: Plan, device: torch.device, fig: Figures, recipe: Recipe | None, recipe_missing: str) -> None:
    classes = [f"class{i}" for i in range(plan.classes)]
    rng = np.random.default_rng(1)
    n = max(plan.pseudo_images, plan.recipe_rule_images) + 1
    images = synthetic_images(n, plan.image, seed=1)
    labels = [list(rng.choice(classes, size=int(rng.integers(1, 3)), replace=False)) for _ in range(n)]
    model = _classifier(plan, device).eval()
    train_config = {"image_size": plan.classifier_size}
    masker = PseudoMasker(model, classes, train_config, MaskerOptions(), device.type)
    no_pycocotools = "needs pycocotools (NMS and RLE masks): bring its wheel, see --help"

    def responses() -> None:
        rate, found = _images_per_s(masker.responses, images[:plan.pseudo_images + 1], labels)
        fig.add("pseudo default rule: peak responses", rate, "images/s")
        fig.add("pseudo default rule: peaks per image", float(np.mean([len(r.peaks) for r in found])), "peaks")

    def whole() -> None:
        metric = "pseudo default rule: whole masker"
        if importlib.util.find_spec("pycocotools") is None:
            fig.skip(metric, no_pycocotools)
            return
        rate, _ = _images_per_s(lambda im, lab: masker(im, lab, None), images[:plan.pseudo_images + 1], labels)
        fig.add(metric, rate, "images/s")

    def recipe_rule() -> None:
        metric = "pseudo voc2012.yaml rule: proposals + whole masker"
        missing = recipe_missing or ("" if hasattr(cv2, "ximgproc") else
                                     "needs cv2.ximgproc (selective search): opencv-contrib-python-headless")
        missing = missing or ("" if importlib.util.find_spec("pycocotools") else no_pycocotools)
        if missing:
            fig.skip(metric, missing)
            return
        source = make_source(recipe.pseudo.proposals, recipe.pseudo.objectness)
        rule = PseudoMasker(model, classes, train_config, recipe.pseudo.masker_options(), device.type)
        rate, _ = _images_per_s(lambda im, lab: rule(im, lab, source(im)), images[:plan.recipe_rule_images + 1], labels)
        fig.add(metric, rate, "images/s")

    fig.attempt("pseudo peak responses", responses)
    fig.attempt("pseudo whole masker", whole)
    fig.attempt("pseudo voc2012.yaml rule", recipe_rule)


def maskrcnn_name(min_size: int, max_size: int) -> str:
    return f"maskrcnn {min_size}/{max_size}"


def bench_maskrcnn(plan: Plan, device: torch.device, fig: Figures) -> str:
    """Train step and predict rows; returns the precision the train steps ran in."""
    classes = [f"class{i}" for i in range(plan.classes)]
    precision = "no train step ran"

    def train(sizes: tuple[int, int], batch: int) -> None:
        nonlocal precision
        name = f"{maskrcnn_name(*sizes)} b{batch}"
        cfg = TrainConfig(data="synthetic", out="unused", arch=plan.arch, weights="none", norm="frozen",
                          trainable_backbone_layers=3, min_size=sizes[0], max_size=sizes[1], batch_size=batch,
                          **plan.detector)
        torch.manual_seed(0)
        training = Training(cfg, classes, device)
        training.model.train()
        precision = "AMP (fp16 autocast + GradScaler)" if training.amp else "fp32 (Training uses AMP on CUDA only)"
        images, targets = synthetic_detection_batch(batch, plan.image, plan.classes, seed=batch)
        losses: list[torch.Tensor] = []

        def step() -> None:
            lr = learning_rate(cfg, training.step, 0, steps_per_epoch=10**6)  # the warmup's first steps
            losses.append(training.train_step(images, targets, lr))

        _reset_peak_memory(device)
        s = seconds_per_call(step, plan.warmup, plan.steps, device)
        for loss in losses:
            _check_finite(name, float(loss.sum()))
        fig.add(f"{name}: train step", batch / s, "images/s")
        _peak_memory(fig, f"{name}: train peak memory", device)
        fig.add(f"{name}: loss at the last step", float(losses[-1].sum()), "")

    def predict(sizes: tuple[int, int]) -> None:
        name = f"{maskrcnn_name(*sizes)}: predict b{plan.predict_batch}"
        cfg = TrainConfig(data="synthetic", out="unused", arch=plan.arch, weights="none", norm="frozen",
                          trainable_backbone_layers=3, min_size=sizes[0], max_size=sizes[1], **plan.detector)
        torch.manual_seed(0)
        model = build_model(classes, weights="none", box_score_thresh=0.0, **cfg.model_options()).to(device).eval()
        images, _ = synthetic_detection_batch(plan.predict_batch, plan.image, plan.classes, seed=0)
        images = [(im * 255).to(torch.uint8) for im in images]  # detect() takes decoded uint8 images
        found: list[int] = []
        s = seconds_per_call(lambda: found.append(sum(len(d) for d in detect(model, images, device, 0.0))),
                             plan.warmup, max(1, plan.steps // 2), device)
        fig.add(name, plan.predict_batch / s, "images/s")
        fig.add(f"{name}: detections per image", found[-1] / plan.predict_batch, "detections")

    for sizes in plan.maskrcnn_sizes:
        for batch in plan.maskrcnn_batches:
            fig.attempt(f"maskrcnn train {sizes} batch {batch}", lambda s=sizes, b=batch: train(s, b))
    for sizes in plan.maskrcnn_sizes:
        fig.attempt(f"maskrcnn predict {sizes}", lambda s=sizes: predict(s))
    return precision


@dataclass
class Recipe:
    """examples/voc2012.yaml's stage settings, read through the same config code as `maskless run`."""

    classify: Any
    pseudo: Any
    train: Any
    fully_supervised: bool


def load_recipe(path: str = RECIPE) -> Recipe:
    from maskless import config  # PyYAML: a ModuleNotFoundError without it
    from maskless.pseudo.stage import PseudoConfig
    from maskless.run import RunConfig

    raw = config.load_yaml(path)
    paths = {"data": "unused", "out": "unused-out", "classifier": "unused"}  # the pipeline's to fill in
    return Recipe(config.build(ClassifyConfig, raw.get("classify", {}), paths),
                  config.build(PseudoConfig, raw.get("pseudo", {}), paths),
                  config.build(TrainConfig, raw.get("train", {}), paths),
                  config.build(RunConfig, raw.get("run", {})).fully_supervised)


def recipe_or_reason() -> tuple[Recipe | None, str]:
    """(the recipe, "") or (None, why it cannot be read here)."""
    try:
        return load_recipe(), ""
    except ModuleNotFoundError as e:
        return None, f"needs {e.name} to read examples/voc2012.yaml (PyYAML: bring its wheel, see --help)"


PROJECTION = ("classify", "pseudo", "train", "eval")
PROJECTION_NOTE = (
    "a projection from the rates above, not a measured run. Counted: the training steps, the classifier's "
    "per-epoch held-out pass, the pseudo masks (proposals included, one process) and the predictions of eval. "
    "Not counted: Ray and process start-up, decoding and loading images, checkpoints, scoring, fidelity, reports")


def project(plan: Plan, fig: Figures, recipe: Recipe, tiny: bool) -> dict:
    """Hours of each GPU stage of examples/voc2012.yaml from the measured rates (PROJECTION_NOTE says
    what is counted), and the inputs of each. With --tiny the first measured size stands in for the
    recipe's: the figures are then meaningless, the arithmetic is not."""
    c, t = recipe.classify, recipe.train
    inputs: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    missing: dict[str, str] = {}

    measured = (plan.backbone, plan.classifier_size, plan.classifier_batch)
    asked = (c.backbone, c.image_size, c.batch_size)
    train_rate = fig.get(f"{classifier_name(plan)}: train step, fp32")
    eval_rate = fig.get(f"{classifier_name(plan)}: held-out evaluation forward")
    if not tiny and asked != measured:
        missing["classify"] = f"voc2012.yaml's classify {asked} is not the measured {measured}"
    elif train_rate is None or eval_rate is None:
        missing["classify"] = "its classifier rows were not measured"
    else:
        train_n = round(VOC_LABELLED * (1 - c.val_fraction))  # the pipeline holds val_fraction out (no val_data)
        held_out = VOC_LABELLED - train_n
        steps = c.steps_per_epoch or max(1, math.ceil(train_n / (c.batch_size * c.workers)))
        inputs["classify"] = {"epochs": c.epochs, "train_images": train_n, "held_out_images": held_out,
                              "steps_per_epoch": steps, "batch_size": c.batch_size, "workers": c.workers,
                              "train_images_per_s": train_rate, "eval_images_per_s": eval_rate,
                              "precision": "fp32 (the stage's)"}
        seconds["classify"] = c.epochs * (steps * c.batch_size / train_rate + held_out / eval_rate)

    pseudo_rate = fig.get("pseudo voc2012.yaml rule: proposals + whole masker")
    if pseudo_rate is None:
        missing["pseudo"] = "the row 'pseudo voc2012.yaml rule: proposals + whole masker' was not measured"
    else:
        inputs["pseudo"] = {"images": VOC_TRAIN, "images_per_s": pseudo_rate, "rule": recipe.pseudo.rule,
                            "actors": 1}
        seconds["pseudo"] = VOC_TRAIN / pseudo_rate

    sizes = plan.maskrcnn_sizes[0] if tiny else (t.min_size, t.max_size)
    runs = 2 if recipe.fully_supervised else 1  # on pseudo masks, and on true masks (the upper bound)
    step_rate = fig.get(f"{maskrcnn_name(*sizes)} b{t.batch_size}: train step")
    if not t.amp:
        missing["train"] = "voc2012.yaml turns AMP off; the train steps were measured with it"
    elif step_rate is None:
        missing["train"] = f"Mask R-CNN at {sizes} batch {t.batch_size} was not measured"
    else:
        steps = steps_per_epoch(VOC_TRAIN, t.batch_size, t.workers) * t.epochs
        steps = min(steps, t.max_steps) if t.max_steps else steps
        inputs["train"] = {"runs": runs, "epochs": t.epochs, "images": VOC_TRAIN, "steps": steps, "sizes": sizes,
                           "batch_size": t.batch_size, "workers": t.workers, "images_per_s": step_rate}
        seconds["train"] = runs * steps * t.batch_size / step_rate
    predict_rate = fig.get(f"{maskrcnn_name(*sizes)}: predict b{plan.predict_batch}")
    if predict_rate is None:
        missing["eval"] = f"predict at {sizes} was not measured"
    else:
        inputs["eval"] = {"runs": runs, "images": VOC_VAL, "sizes": sizes, "images_per_s": predict_rate}
        seconds["eval"] = runs * VOC_VAL / predict_rate

    for stage in PROJECTION:
        metric = f"projection voc2012.yaml: {stage}"
        if stage in seconds:
            fig.add(metric, seconds[stage] / 3600, "h")
        else:
            fig.skip(metric, missing[stage])
    if missing:
        fig.skip("projection voc2012.yaml: total", f"stages not projected: {', '.join(missing)}")
    else:
        fig.add("projection voc2012.yaml: total", sum(seconds.values()) / 3600, "h")
    return inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the models run (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="tiny models, images and step counts: seconds on a CPU")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench.gpu: torch {torch.__version__} sees no CUDA device here: run it on a GPU machine, "
              f"or with --device cpu --tiny for the CPU check", file=sys.stderr)
        return 2
    plan, device, fig = TINY if args.tiny else FULL, torch.device(args.device), Figures()
    start = time.time()
    recipe, recipe_missing = recipe_or_reason()

    precision: list[str] = []  # each measurement records its own failure; these catch a section's set-up
    fig.attempt("classifier", lambda: bench_classifier(plan, device, fig))
    fig.attempt("pseudo", lambda: bench_pseudo(plan, device, fig, recipe, recipe_missing))
    fig.attempt("maskrcnn", lambda: precision.append(bench_maskrcnn(plan, device, fig)))
    projection: dict = {}
    if recipe is None:
        for stage in PROJECTION + ("total",):
            fig.skip(f"projection voc2012.yaml: {stage}", recipe_missing)
    else:
        fig.attempt("projection", lambda: projection.update(project(plan, fig, recipe, args.tiny)))

    write_result("gpu", fig.rows, args.json, device=str(device), tiny=args.tiny, plan=dataclasses.asdict(plan),
                 maskrcnn_train_precision=precision[0] if precision else "not run", projection_inputs=projection,
                 projection_note=PROJECTION_NOTE,
                 not_measured=fig.not_measured, errors=fig.errors, wall_s=round(time.time() - start, 1))
    for skipped in fig.not_measured:
        print(f"{'gpu':<12} {skipped['metric']:<48} not measured: {skipped['reason']}")
    for error in fig.errors:
        print(f"{'gpu':<12} {error['measurement']:<48} FAILED: {error['error']}", file=sys.stderr)
    return 1 if fig.errors else 0


if __name__ == "__main__":
    sys.exit(main())

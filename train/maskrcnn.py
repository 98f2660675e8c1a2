"""torchvision Mask R-CNN for maskless: the backbones, their starting weights, and the one-file export.

Pretrained files come from the torch hub cache under core/weights.py's policy (downloaded only when the
user asks) or from an explicit path; a missing file is a clear error, never a silent fall back to random
weights.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum, detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from maskless.core import storage
from maskless.core.weights import torchvision_file

EXPORT_FORMAT = "maskless-maskrcnn"
EXPORT_VERSION = 1

# Detector settings a config may pass through to torchvision's MaskRCNN (the rest keep its defaults).
DETECTOR_OPTIONS = (
    "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
    "rpn_batch_size_per_image", "box_batch_size_per_image", "box_detections_per_img", "box_score_thresh",
)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


# Backbone normalisation. Frozen statistics suit pretrained weights (and are a no-op on an untrained
# net, so from scratch BatchNorm trains). GroupNorm does not depend on the images per device, the
# usual choice for detectors trained from scratch ("Rethinking ImageNet Pre-training", He et al.);
# on the tiny world, 100 steps from scratch, BatchNorm did at least as well, so it stays the default.
NORMS = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d, "group": _group_norm}
_RESNET_LAYERS = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _resnet_fpn(name: str, num_classes: int, norm: str, layers: int, min_size: int, max_size: int,
                options: dict) -> detection.MaskRCNN:
    backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=NORMS[norm], trainable_layers=layers)
    return detection.MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **options)


def _resnet50_fpn_v2(num_classes: int, norm: str, layers: int, min_size: int, max_size: int,
                     options: dict) -> detection.MaskRCNN:
    # Its FPN and heads use BatchNorm; only torchvision's builder assembles them (private helpers). The
    # builder sets its own anchor generator, so ours (same 3 anchors per location) replaces it afterwards.
    options = dict(options)
    anchors = options.pop("rpn_anchor_generator", None)
    model = detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes,
                                               min_size=min_size, max_size=max_size, **options)
    if anchors is not None:
        model.rpn.anchor_generator = anchors
    if norm == "frozen":
        _freeze_batchnorm(model.backbone.body)
    _freeze_resnet(model.backbone.body, layers)
    return model


def _mobilenet_v3_fpn(num_classes: int, norm: str, layers: int, min_size: int, max_size: int,
                      options: dict) -> detection.MaskRCNN:
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, norm_layer=NORMS[norm],
                                  trainable_layers=layers)
    # Three feature maps (two stages + pool): anchors and RoI pools must match, or torchvision asserts.
    options = {"rpn_anchor_generator": AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3),
               **options}
    return detection.MaskRCNN(
        backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
        box_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1"], output_size=14, sampling_ratio=2), **options)


def _mobilenet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torchvision's MobileNet backbone body is the classifier's `features` Sequential itself.
    return {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}


@dataclass(frozen=True)
class Arch:
    """A Mask R-CNN network: how it is built, the torchvision weights it can start from, its feature
    levels (one anchor size each), its trainable backbone stages and norms, and how a classification
    backbone's state dict maps onto its FPN body. Adding a network is one entry of ARCHS."""

    build: Callable[..., detection.MaskRCNN]  # (num_classes, norm, layers, min_size, max_size, options)
    imagenet: WeightsEnum
    coco: Optional[WeightsEnum] = None
    levels: int = 5
    max_trainable_layers: int = 5
    norms: tuple[str, ...] = ("frozen", "batch", "group")
    body_state: Callable[[dict], dict] = lambda state: state


ARCHS: dict[str, Arch] = {
    "maskrcnn_resnet50_fpn": Arch(partial(_resnet_fpn, "resnet50"), torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                                  detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
    "maskrcnn_resnet50_fpn_v2": Arch(_resnet50_fpn_v2, torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                                     detection.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, norms=("frozen", "batch")),
    "resnet18_fpn": Arch(partial(_resnet_fpn, "resnet18"), torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "mobilenet_v3_fpn": Arch(_mobilenet_v3_fpn, torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
                             levels=3, max_trainable_layers=6, norms=("frozen", "batch"), body_state=_mobilenet_state),
}


def weights_file(arch: str, weights: str, download: bool = False) -> str | None:
    """The file `weights` names for `arch`: torchvision's in the torch hub cache for 'imagenet'/'coco'
    (core/weights.py: downloaded only when `download` is set), else the path itself; None for 'none'."""
    kind = weights.lower()
    if kind == "none":
        return None
    if kind in ("imagenet", "coco"):
        enum = ARCHS[arch].imagenet if kind == "imagenet" else ARCHS[arch].coco
        if enum is None:
            raise ValueError(f"torchvision has no COCO Mask R-CNN weights for {arch}: use "
                             f"{' or '.join(n for n, a in ARCHS.items() if a.coco)}, --weights imagenet, a file, "
                             f"or none")
        return torchvision_file(enum, f"{'ImageNet' if kind == 'imagenet' else 'COCO'} weights for {arch}", download,
                                "--weights PATH to a file you have, or --weights none to train from scratch")
    if not storage.exists(weights):
        raise FileNotFoundError(f"weights file {weights} does not exist: pass an existing file, "
                                f"--weights imagenet|coco (torch hub cache), or --weights none")
    return weights


def _read_state(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"weights file {path} cannot be read as a torch state dict: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a maskless export or training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} is not a state dict of tensors")
    return state


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Load every tensor whose name and shape match (class-specific heads of another class list and a
    classifier's fc are skipped); an error when under half of the module's tensors match, so a file of
    another architecture never passes silently."""
    own = module.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(keep) < len(own) / 2:
        raise ValueError(f"{source}: only {len(keep)} of this model's {len(own)} tensors match "
                         f"(weights of another architecture?)")
    module.load_state_dict(keep, strict=False)
    return len(keep)


def _freeze_resnet(body: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule for pretrained ResNets: train only the last `trainable_layers` stages."""
    train = _RESNET_LAYERS[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
    for name, p in body.named_parameters():
        if not any(name.startswith(layer) for layer in train):
            p.requires_grad_(False)


def resolve_norm(arch: str, weights: str, norm: str | None = None) -> str:
    """The backbone norm: as asked, else frozen from pretrained weights and batch from scratch."""
    norm = norm or ("frozen" if weights.lower() != "none" else "batch")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if norm not in ARCHS[arch].norms:
        raise ValueError(f"norm {norm!r} needs one of the backbones "
                         f"{', '.join(n for n, a in ARCHS.items() if norm in a.norms)}; {arch} takes "
                         f"{' or '.join(repr(n) for n in ARCHS[arch].norms)}")
    return norm


def build_model(classes: list[str], arch: str = "maskrcnn_resnet50_fpn", weights: str = "imagenet",
                min_size: int = 800, max_size: int = 1333, trainable_backbone_layers: int | None = None,
                anchor_sizes: list[int] | None = None, norm: str | None = None, download_weights: bool = False,
                **detector_options: Any) -> nn.Module:
    """A Mask R-CNN for `classes` (plus background) with its starting weights.

    weights: 'none' (random init, trainable BatchNorm: frozen statistics of an untrained net are a no-op),
    'imagenet' (backbone), 'coco' (whole detector but the class-specific heads; ResNet-50 archs only),
    or a file (torchvision backbone or detector state dict, or a maskless model.pt); download_weights lets
    torchvision download 'imagenet'/'coco' into the torch hub cache when they are not there.
    anchor_sizes: one size per feature level (5 for the ResNet FPNs, 3 for MobileNet); None keeps
    torchvision's (32..512), too large for images much smaller than 800 px.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if not classes:
        raise ValueError("build_model needs at least one class")
    unknown = set(detector_options) - set(DETECTOR_OPTIONS)
    if unknown:
        raise ValueError(f"unknown detector options {sorted(unknown)}; known: {', '.join(DETECTOR_OPTIONS)}")
    path = weights_file(arch, weights, download_weights)
    spec = ARCHS[arch]
    options = {k: v for k, v in detector_options.items() if v is not None}
    pretrained = path is not None
    norm = resolve_norm(arch, weights, norm)
    layers = spec.max_trainable_layers if trainable_backbone_layers is None and not pretrained else (
        3 if trainable_backbone_layers is None else trainable_backbone_layers)
    if not 0 <= layers <= spec.max_trainable_layers:
        raise ValueError(f"trainable_backbone_layers must be in 0..{spec.max_trainable_layers} for {arch}, got {layers}")
    if anchor_sizes is not None:
        if len(anchor_sizes) != spec.levels:
            raise ValueError(f"{arch} has {spec.levels} feature levels: anchor_sizes needs {spec.levels} sizes, "
                             f"got {len(anchor_sizes)}")
        options["rpn_anchor_generator"] = AnchorGenerator(tuple((int(s),) for s in anchor_sizes),
                                                          ((0.5, 1.0, 2.0),) * spec.levels)
    model = spec.build(len(classes) + 1, norm, layers, min_size, max_size, options)
    if pretrained:
        state = _read_state(path)
        if any(k.startswith(("backbone.", "roi_heads.", "rpn.")) for k in state):  # a whole detector
            _load_matching(model, state, path)
        else:  # a classification backbone (its fc is skipped)
            _load_matching(model.backbone.body, spec.body_state(state), path)
    return model


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace BatchNorm2d by FrozenBatchNorm2d: a few images per device give no usable batch statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_batchnorm(child)


def build_options(arch: str, min_size: int, max_size: int, trainable_backbone_layers: int | None,
                  anchor_sizes: list[int] | None, norm: str, **detector_options: Any) -> dict[str, Any]:
    """The build_model arguments an export records, so load_model rebuilds the same network."""
    return {"arch": arch, "min_size": min_size, "max_size": max_size,
            "trainable_backbone_layers": trainable_backbone_layers, "anchor_sizes": anchor_sizes,
            "norm": norm, **{k: v for k, v in detector_options.items() if v is not None}}


def save_model(path: str, state: dict[str, torch.Tensor], classes: list[str], config: dict[str, Any]) -> None:
    """Write a model's state dict + classes + config as one file, atomically (path or URI);
    config["build"] holds build_options(...), what load_model rebuilds the network from."""
    if "build" not in config:
        raise ValueError("export config needs a 'build' entry (build_options(...))")
    state = {k: v.detach().cpu() for k, v in state.items()}
    buf = io.BytesIO()
    torch.save({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": state, "classes": list(classes),
                "config": config}, buf)
    storage.write_bytes_atomic(path, buf.getvalue())


def load_model(path: str) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """An exported model (eval mode, CPU), its class list and its config."""
    if not storage.exists(path):
        raise FileNotFoundError(f"model file {path} does not exist (export it with `maskless train`)")
    try:
        data = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a maskless model: {e}") from e
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a maskless Mask R-CNN export (no format {EXPORT_FORMAT!r})")
    if data.get("version") != EXPORT_VERSION:
        raise ValueError(f"{path}: export version {data.get('version')} is not {EXPORT_VERSION}")
    classes, config = list(data["classes"]), dict(data["config"])
    model = build_model(classes, weights="none", **config["build"])
    model.load_state_dict(data["model"])
    return model.eval(), classes, config

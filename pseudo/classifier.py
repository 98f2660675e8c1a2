"""The stage-one classifier: a fully convolutional network whose class scores come from peaks.

backbone (stride 32 for the ResNets, 8 for `tiny`) -> 1x1 conv class-response head (with bias) -> bilinear
upsampling x8 (align_corners=True) -> peak stimulation -> class scores, as in PRM/WISE. The class response
maps stay differentiable so the pseudo stage can back-propagate from a peak to the input.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from maskless.core import storage
from maskless.core.weights import torchvision_file
from maskless.pseudo.peak_stimulation import BACKWARD_MODES, peak_stimulation

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

# torchvision is imported where a ResNet or its weights are needed, not here: it costs about 2 s of CPU
# per process (pseudo/preprocess.py), and a pseudo-stage actor with the `tiny` backbone needs none of it

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "maskless-classifier"
CHECKPOINT_VERSION = 1
EXPORT_NAME = "classifier.pt"


def _tiny_backbone(norm: type[nn.Module]) -> nn.Sequential:
    """For tests and CPU runs on small images: three stride-2 conv blocks, then two at stride 1.
    Output stride 8, 128 channels, receptive field 107 px. Why not stride 32 like ResNet: at 128 px a
    stride-32 map is 4 x 4 cells, too coarse for a peak to land inside an object of 30-60 px (on the
    demo world 29% of instances got a peak of their class). Why no dilation in the last blocks: it
    widened the receptive field to the whole image and some classes' maps then lit up everywhere but
    on the objects (docs/CLASSIFIER.md has the measurements)."""
    layers, cin = [], 3
    for cout, stride in ((16, 2), (32, 2), (64, 2), (128, 1), (128, 1)):
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True),
                   nn.Conv2d(cout, cout, 3, padding=1, bias=False), norm(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers)


_RESNET_MODULES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def _resnet(name: str, norm: type[nn.Module]) -> tuple[nn.Sequential, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
    return nn.Sequential(*(getattr(net, m) for m in _RESNET_MODULES)), net.fc.in_features


def _resnet_key(key: str) -> str | None:
    """torchvision names ResNet modules; our Sequential numbers them in the same order (its fc is skipped)."""
    top, _, rest = key.partition(".")
    return f"{_RESNET_MODULES.index(top)}.{rest}" if top in _RESNET_MODULES else None


@dataclass(frozen=True)
class Backbone:
    """A classifier backbone: its feature network and channels for a norm layer, the torchvision ImageNet
    weights it can start from (named as in torchvision.models, e.g. "ResNet50_Weights.IMAGENET1K_V1"),
    and how a torchvision state dict's keys map onto it."""

    build: Callable[[type[nn.Module]], tuple[nn.Sequential, int]]
    imagenet_name: Optional[str]
    state_key: Callable[[str], Optional[str]]

    @property
    def imagenet(self) -> Optional[WeightsEnum]:
        if self.imagenet_name is None:
            return None
        import torchvision

        enum, member = self.imagenet_name.split(".")
        return getattr(getattr(torchvision.models, enum), member)


BACKBONES: dict[str, Backbone] = {
    # the ResNet-50 ImageNet weights are the ones PRM and WISE started from
    "resnet50": Backbone(partial(_resnet, "resnet50"), "ResNet50_Weights.IMAGENET1K_V1", _resnet_key),
    "resnet34": Backbone(partial(_resnet, "resnet34"), "ResNet34_Weights.IMAGENET1K_V1", _resnet_key),
    "resnet18": Backbone(partial(_resnet, "resnet18"), "ResNet18_Weights.IMAGENET1K_V1", _resnet_key),
    "tiny": Backbone(lambda norm: (_tiny_backbone(norm), 128), None, lambda key: key.removeprefix("backbone.")),
}


def imagenet_file(backbone: str, download: bool = False) -> str:
    """The file of torchvision's ImageNet weights for a backbone, under core/weights.py's policy (the
    torch hub cache; downloaded only when `download` is set)."""
    weights = BACKBONES[backbone].imagenet if backbone in BACKBONES else None
    if weights is None:
        raise ValueError(f"backbone {backbone!r} has no ImageNet weights; use backbone_weights='none' "
                         f"or a file, or one of {sorted(n for n, b in BACKBONES.items() if b.imagenet_name)}")
    return torchvision_file(weights, f"ImageNet weights for {backbone}", download,
                            "--backbone-weights PATH to a file you have, or --backbone-weights none to train "
                            "from scratch")


def load_backbone_file(path: str) -> dict[str, torch.Tensor]:
    """A torchvision-format backbone state dict (e.g. resnet50-0676ba61.pth) from a path or URI."""
    if not storage.exists(path):
        raise FileNotFoundError(f"backbone weights file {path} does not exist: pass an existing torchvision "
                                f"state dict, 'imagenet', or 'none' to train from scratch")
    state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (expected torchvision backbone weights)")
    return state


class PeakClassifier(nn.Module):
    """Image-level multi-label classifier with peak-stimulated class scores.

    frozen_bn=True uses FrozenBatchNorm2d (statistics and affine fixed, as when fine-tuning from
    ImageNet); frozen_bn=False trains plain BatchNorm (from scratch, where frozen BN is a no-op).
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", frozen_bn: bool = False,
                 peak_backward: str = "prm", upsample: int = 8):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        if peak_backward not in BACKWARD_MODES:
            raise ValueError(f"peak_backward must be one of {BACKWARD_MODES}, got {peak_backward!r}")
        if frozen_bn:
            from torchvision.ops import FrozenBatchNorm2d as norm
        else:
            norm = nn.BatchNorm2d
        self.backbone, channels = BACKBONES[backbone].build(norm)
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1, bias=True)
        self.backbone_name, self.frozen_bn = backbone, frozen_bn
        self.peak_backward, self.upsample = peak_backward, upsample

    def load_backbone(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load torchvision-format backbone weights (the classification fc is ignored)."""
        rename = BACKBONES[self.backbone_name].state_key
        own = {rename(k): v for k, v in state.items() if rename(k) is not None}
        try:
            result = self.backbone.load_state_dict(own, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{source} does not fit backbone {self.backbone_name}: {e}") from e
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{source} does not fit backbone {self.backbone_name}: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}")

    def class_response_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Class response maps [B, C, h, w] (h = 8 H / stride: H / 4 for the ResNets, H for `tiny`),
        differentiable with respect to x."""
        crm = self.head(self.backbone(x))
        return F.interpolate(crm, scale_factor=self.upsample, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores [B, C] (logits for a multi-label soft-margin loss)."""
        return peak_stimulation(self.class_response_maps(x), backward=self.peak_backward)

    def crm_to_input(self, yx: torch.Tensor, crm_hw: tuple[int, int], input_hw: tuple[int, int]) -> torch.Tensor:
        """Input-pixel coordinates (float [K, 2]) of class-response-map coordinates yx [K, 2].

        The maps are feature maps (one cell per `stride` input pixels, centred at stride * j + stride / 2)
        upsampled with align_corners=True, so map index i sits at feature coordinate i (f - 1) / (h - 1).
        """
        out = []
        for d in range(2):
            h, size = crm_hw[d], input_hw[d]
            f = h // self.upsample  # the feature map the head saw
            stride = size / f
            feat = yx[:, d].float() * ((f - 1) / (h - 1) if h > 1 else 0.0)
            out.append(feat * stride + stride / 2)
        return torch.stack(out, dim=1)

    def model_config(self) -> dict[str, Any]:
        return {"backbone": self.backbone_name, "frozen_bn": self.frozen_bn, "peak_backward": self.peak_backward,
                "upsample": self.upsample, "num_classes": self.head.out_channels}


def build_classifier(num_classes: int, backbone: str = "resnet50", backbone_weights: str = "imagenet",
                     peak_backward: str = "prm", download_weights: bool = False) -> PeakClassifier:
    """A PeakClassifier with its starting weights: 'imagenet' (torchvision's, from the torch hub cache;
    downloaded only with download_weights), a file path, or 'none' (from scratch, plain BatchNorm)."""
    pretrained = backbone_weights.lower() != "none"
    if pretrained and backbone_weights.lower() == "imagenet":
        path = imagenet_file(backbone, download_weights)
        state, source = load_backbone_file(path), f"ImageNet weights of {backbone} ({path})"
    elif pretrained:
        state, source = load_backbone_file(backbone_weights), backbone_weights
    model = PeakClassifier(num_classes, backbone, frozen_bn=pretrained, peak_backward=peak_backward)
    if pretrained:
        model.load_backbone(state, source)
    return model


def checkpoint_dict(model: PeakClassifier, classes: list[str], config: dict[str, Any]) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
            "model_config": model.model_config(), "classes": list(classes), "config": dict(config)}


def save_classifier(model: PeakClassifier, classes: list[str], config: dict[str, Any], path: str) -> None:
    """Write the exported classifier (weights, class list, config) atomically to a path or URI."""
    if len(classes) != model.head.out_channels:
        raise ValueError(f"{len(classes)} class names for a model with {model.head.out_channels} outputs")
    buf = io.BytesIO()
    torch.save(checkpoint_dict(model, classes, config), buf)
    storage.write_bytes_atomic(path, buf.getvalue())


def classifier_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> PeakClassifier:
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{source} is not a maskless classifier checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{source}: classifier checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION}")
    mc = ckpt["model_config"]
    model = PeakClassifier(mc["num_classes"], mc["backbone"], frozen_bn=mc["frozen_bn"],
                           peak_backward=mc["peak_backward"], upsample=mc["upsample"])
    model.load_state_dict(ckpt["model"])
    return model


def load_classifier(run_or_file: str) -> tuple[PeakClassifier, list[str], dict[str, Any]]:
    """(model in eval mode on CPU, class names, training config) from a classify run folder or its
    classifier.pt."""
    path = run_or_file
    if not run_or_file.endswith(".pt"):
        path = storage.join(run_or_file, EXPORT_NAME)
    if not storage.exists(path):
        raise FileNotFoundError(f"no classifier at {path}: pass a finished `maskless classify` run folder "
                                f"or its {EXPORT_NAME}")
    ckpt = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    model = classifier_from_checkpoint(ckpt, path)
    model.eval()
    return model, list(ckpt["classes"]), dict(ckpt["config"])

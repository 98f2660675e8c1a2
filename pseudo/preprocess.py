"""The classifier's input at test time: an image resized to the training side and normalised.

Why not torchvision.transforms: importing torchvision costs about 2 s of CPU per process (its ops
import torch._dynamo), and every pseudo-stage actor needs this and nothing else of torchvision when the
backbone is `tiny`. The three steps are torchvision's Resize (on a PIL image: PIL's bilinear resize),
ToTensor and Normalize, written out; tests/test_classifier.py checks that both give the same tensor.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, size, size) float tensor: bilinear resize, scaled to [0, 1], ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # no copy of what is RGB already
        resized = rgb.resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (x - mean) / std
    return transform

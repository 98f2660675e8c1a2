"""Pretrained weights of the classifier and Mask R-CNN stages: one policy for both.

torchvision's weight files are read from the torch hub cache (`torch.hub.get_dir()/checkpoints`, where
torchvision itself puts its downloads). Nothing is downloaded unless the user asks for it
(`--download-weights`, `download_weights: true` in a run YAML); then torchvision's own download fetches
the file into that cache and checks its hash. Otherwise a missing file is a FileNotFoundError naming
the expected path, the URL and the other choices, and nothing falls back to random weights.
"""
from __future__ import annotations

import os
import urllib.error
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

DOWNLOAD_HINT = "--download-weights (download_weights: true in a run YAML)"


def cached_path(weights: WeightsEnum) -> str:
    """Where torchvision keeps (or would put) this weights file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def torchvision_file(weights: WeightsEnum, what: str, download: bool, instead: str) -> str:
    """The local file of torchvision `weights` (`what` names them in messages), downloaded into the torch hub
    cache by torchvision only when `download` is set. `instead` says which other values the option takes."""
    path = cached_path(weights)
    if os.path.exists(path):
        return path
    if not download:
        raise FileNotFoundError(f"{what} not found: expected {path} (torch hub cache); maskless downloads nothing "
                                f"unless asked. Pass {DOWNLOAD_HINT} to fetch {weights.url}, put the file there "
                                f"yourself, or pass {instead}")
    try:
        weights.get_state_dict(progress=False, check_hash=True)  # torchvision's download, into the hub cache
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise FileNotFoundError(f"{what} could not be downloaded from {weights.url} into {path} ({e}); put the "
                                f"file there yourself, or pass {instead}") from e
    return path

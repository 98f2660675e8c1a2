"""Peak stimulation (PRM): class scores from the local maxima of class response maps.

A score that averages the response over local peaks (instead of the whole map) makes the
classifier's gradients flow only through peak locations, so training pushes single instances
to light up as peaks. torch has no such operator, hence this module.

Peak rule (as the method's code does it): a pixel is a peak when it is the maximum of its 3x3
window, with the map padded by -inf and ties resolved to the first index in row-major order
(what `max_pool2d(return_indices=True)` returns); peaks under the per-image, per-class median of
the map are dropped. The first occurrence of a map's global maximum is always a peak, so every map
has at least one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKWARD_MODES = ("prm", "mean")


def peak_map(crm: torch.Tensor, window: int = 3, median_filter: bool = True) -> torch.Tensor:
    """Boolean map [B, C, H, W] of the local maxima of class response maps crm [B, C, H, W]."""
    if crm.dim() != 4:
        raise ValueError(f"class response maps must be [B, C, H, W], got shape {tuple(crm.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"peak window must be an odd size >= 1, got {window}")
    b, c, h, w = crm.shape
    pad = window // 2
    crm = crm.detach()
    padded = F.pad(crm, (pad, pad, pad, pad), mode="constant", value=float("-inf"))
    _, argmax = F.max_pool2d(padded, kernel_size=window, stride=1, return_indices=True)
    # flat index of every pixel inside the padded map: a pixel is a peak when its window's
    # (first) maximum is the pixel itself
    own = torch.arange((h + 2 * pad) * (w + 2 * pad), device=crm.device).view(h + 2 * pad, w + 2 * pad)
    own = own[pad:pad + h, pad:pad + w]
    peaks = argmax == own
    if median_filter:
        median = crm.flatten(2).median(dim=2).values  # lower median for an even count, as torch defines it
        peaks &= crm >= median[:, :, None, None]
    return peaks


class _PeakStimulation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, crm: torch.Tensor, window: int, backward: str) -> torch.Tensor:
        peaks = peak_map(crm, window).to(crm.dtype)
        count = peaks.sum(dim=(2, 3))
        scores = (crm * peaks).sum(dim=(2, 3)) / count
        ctx.save_for_backward(peaks, count)
        ctx.backward_mode = backward
        return scores

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor):
        peaks, count = ctx.saved_tensors
        grad = peaks * grad_scores[:, :, None, None]
        if ctx.backward_mode == "mean":
            grad = grad / count[:, :, None, None]
        return grad, None, None


def peak_stimulation(crm: torch.Tensor, window: int = 3, backward: str = "prm") -> torch.Tensor:
    """Class scores [B, C]: the mean response over each map's median-filtered peaks.

    backward="prm" passes the score's gradient unscaled to every kept peak (grad = peaks * dL/ds),
    as PRM's code does; backward="mean" is the exact gradient of the mean (divided by the number
    of peaks). PRM's rule gives maps with many peaks proportionally larger updates.
    """
    if backward not in BACKWARD_MODES:
        raise ValueError(f"peak backward must be one of {BACKWARD_MODES}, got {backward!r}")
    return _PeakStimulation.apply(crm, window, backward)


def find_peaks(crm: torch.Tensor, threshold: float | None = None, relative_threshold: float | None = None,
               window: int = 3, median_filter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Peaks of class response maps for inference: (coords [K, 4] as (b, c, y, x), values [K]).

    threshold keeps peaks whose response is >= that absolute value (PRM used 30 for its pretrained
    ResNet-50); relative_threshold keeps peaks >= that fraction of their map's maximum, the usable
    rule for a model trained from scratch whose response scale is unknown. Both may be given.
    """
    if relative_threshold is not None and not 0.0 <= relative_threshold <= 1.0:
        raise ValueError(f"relative_threshold must be in [0, 1], got {relative_threshold}")
    peaks = peak_map(crm, window, median_filter)
    crm = crm.detach()
    if threshold is not None:
        peaks &= crm >= threshold
    if relative_threshold is not None:
        top = crm.flatten(2).max(dim=2).values[:, :, None, None]
        # for a map whose maximum is negative, a fraction of it is above it: compare in a way that
        # keeps the maximum itself (top - |top| * (1 - r))
        peaks &= crm >= top - top.abs() * (1.0 - relative_threshold)
    coords = peaks.nonzero()
    return coords, crm[peaks]

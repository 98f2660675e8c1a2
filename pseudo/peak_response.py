"""Peak response maps: which input pixels made a class-response peak fire.

Two backward rules (WISE's and PRM's code, docs/REFERENCES.md), chosen by `rule`:
  - "gradient" (WISE's code): plain gradient of the class response at the peak w.r.t. the input;
  - "prm" (PRM's peak backpropagation): every Conv2d keeps its forward values but back-propagates
    as a probabilistic Winner-Take-All over positive weights and shifted inputs:
    g_in = x' * conv_transpose_{W+}(g_out / (conv_{W+}(x') + 1e-10)), x' = x - min(x), W+ = relu(W).
Both end alike: sum over input channels, clamp at 0, normalise to sum 1.

Peaks are batched: the input is repeated once per peak and one backward pass gives every peak's map
(BatchNorm is in eval mode, so the copies do not interact).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from maskless.pseudo.peak_stimulation import find_peaks

RULES = ("prm", "gradient")


@dataclass
class Peak:
    """A local maximum of class `cls`'s response map at (y, x) in map coordinates."""

    cls: int
    y: int
    x: int
    value: float


def select_peaks(crm: torch.Tensor, class_ids: list[int], relative_threshold: float = 0.5,
                 max_peaks: int = 10) -> list[Peak]:
    """Test-time peaks of one image's (C, h, w) class response maps for the given classes: the
    classifier's peak rule with a relative threshold (PRM's absolute 30 only fits its pretrained
    ResNet-50), at most max_peaks per class, strongest first."""
    coords, values = find_peaks(crm[None], relative_threshold=relative_threshold)
    peaks = []
    for c in class_ids:
        sel = torch.nonzero(coords[:, 1] == c, as_tuple=True)[0]
        order = sel[torch.argsort(values[sel], descending=True)][:max_peaks]
        peaks += [Peak(c, int(coords[i, 2]), int(coords[i, 3]), float(values[i])) for i in order]
    return peaks


class _PeakBackpropConv(torch.autograd.Function):
    """Forward: the convolution's own output. Backward: PRM's positive-weight, shifted-input rule."""

    @staticmethod
    def forward(ctx, x, out, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        return out.detach().clone()

    @staticmethod
    def backward(ctx, g_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        shifted = x - x.amin(dim=(1, 2, 3), keepdim=True)
        w_pos = weight.clamp(min=0)
        norm = F.conv2d(shifted, w_pos, None, stride, padding, dilation, groups)
        ratio = torch.where(norm > 1e-10, g_out / (norm + 1e-10), torch.zeros_like(g_out))
        g_in = torch.nn.grad.conv2d_input(x.shape, w_pos, ratio, stride, padding, dilation, groups)
        return shifted * g_in, None, None, None, None, None, None


def _prm_conv_forward(conv: nn.Conv2d):
    def forward(x: torch.Tensor) -> torch.Tensor:
        padding = conv.padding
        if conv.padding_mode != "zeros" or isinstance(padding, str):
            # reflect/replicate/circular or 'same' padding: pad explicitly (autograd carries the gradient
            # back through the pad), then the rule applies to an unpadded convolution
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        with torch.no_grad():
            out = F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
        return _PeakBackpropConv.apply(x, out, conv.weight.detach(), conv.stride, padding, conv.dilation,
                                       conv.groups)
    return forward


@contextlib.contextmanager
def peak_backprop(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every Conv2d of `model` back-propagates with PRM's rule."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv.forward = _prm_conv_forward(conv)
    try:
        yield model
    finally:
        for conv in convs:
            del conv.forward  # back to the class's forward


def peak_response_maps(model: nn.Module, x: torch.Tensor, peaks: list[Peak], rule: str = "prm",
                       batch: int = 16) -> torch.Tensor:
    """(len(peaks), H, W) maps over the input x (1, 3, H, W), each non-negative and summing to 1
    (all zeros where nothing flowed back). `model.class_response_maps(x)` -> (B, C, h, w)."""
    if rule not in RULES:
        raise ValueError(f"unknown peak response rule {rule!r}; use one of {RULES}")
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image as a (1, 3, H, W) tensor, got shape {tuple(x.shape)}")
    out = torch.zeros(len(peaks), x.shape[2], x.shape[3])
    ctx = peak_backprop(model) if rule == "prm" else contextlib.nullcontext(model)
    with ctx, torch.enable_grad():
        for start in range(0, len(peaks), batch):
            chunk = peaks[start:start + batch]
            xs = x.detach().repeat(len(chunk), 1, 1, 1).requires_grad_(True)
            crm = model.class_response_maps(xs)
            dev = crm.device
            idx = torch.arange(len(chunk), device=dev)
            cls = torch.tensor([p.cls for p in chunk], device=dev)
            ys, xx = torch.tensor([p.y for p in chunk], device=dev), torch.tensor([p.x for p in chunk], device=dev)
            (grad,) = torch.autograd.grad(crm[idx, cls, ys, xx].sum(), xs)
            maps = grad.sum(dim=1).clamp(min=0)
            total = maps.flatten(1).sum(1).clamp(min=1e-12)
            out[start:start + len(chunk)] = (maps / total[:, None, None]).detach().cpu()
    return out

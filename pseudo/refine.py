"""Refining a peak's mask to the object's colour boundary with GrabCut (OpenCV).

Why: a classifier trained on image labels responds to the most discriminative part of an object, so
the peak-response mask often covers half a square or the middle of a disc; proposals, on the other
hand, leak into a cluttered background. GrabCut fits colour models to the object and its
surroundings and cuts along the colour boundary, which fixes both. It is seeded, not free:
  - definitely object: the mask's pixels where the smoothed peak response is >= `core` x its maximum;
  - probably object: the rest of the mask; probably background: the pixels around it;
  - definitely background: everything outside the mask's box grown by `margin` x its height and width
    (without this, GrabCut spreads into same-coloured background far from the peak).
The connected parts of the cut that touch the mask are kept. Measured in docs/PSEUDO.md.
"""
from __future__ import annotations

import cv2
import numpy as np

REFINERS = ("grabcut", "none")
MIN_PIXELS = 25  # GrabCut fits 5-component colour models: both sides need a few samples each


def grabcut(image: np.ndarray, mask: np.ndarray, response: np.ndarray, core: float = 0.6,
            margin: float = 0.25, iterations: int = 5) -> np.ndarray:
    """The GrabCut refinement of `mask` (H, W bool) on `image` (H, W, 3 RGB uint8), seeded by the
    smoothed peak `response` (H, W). Returns the mask unchanged when it is too small, covers almost
    the whole image, or the cut keeps nothing of it."""
    if mask.sum() < MIN_PIXELS or (~mask).sum() < MIN_PIXELS:
        return mask
    seed = np.full(mask.shape, cv2.GC_PR_BGD, np.uint8)
    seed[mask] = cv2.GC_PR_FGD
    top = float(response[mask].max())
    if top > 0:
        seed[mask & (response >= core * top)] = cv2.GC_FGD
    ys, xs = np.nonzero(mask)
    dy, dx = margin * (ys.max() - ys.min() + 1), margin * (xs.max() - xs.min() + 1)
    inside = np.zeros(mask.shape, bool)
    inside[max(0, int(ys.min() - dy)): int(ys.max() + dy) + 1, max(0, int(xs.min() - dx)): int(xs.max() + dx) + 1] = True
    seed[~inside] = cv2.GC_BGD
    if (seed == cv2.GC_BGD).sum() + (seed == cv2.GC_PR_BGD).sum() < MIN_PIXELS:
        return mask
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    # GrabCut seeds its colour models by k-means from OpenCV's per-thread RNG: reseeded, a mask does not
    # depend on what the process cut before (which actor, which unit, which order)
    cv2.setRNGSeed(0)
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), seed, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    cut = (seed == cv2.GC_FGD) | (seed == cv2.GC_PR_FGD)
    _, labels = cv2.connectedComponents(cut.astype(np.uint8))
    touching = np.unique(labels[cut & mask])
    refined = cut & np.isin(labels, touching)
    return refined if refined.any() else mask

"""One mask per peak (PRM's retrieval score, WISE's rule, or the peak response map itself), then NMS."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from maskless.core import masks as rle
from maskless.pseudo.proposals import Proposals

RULES = ("prm", "wise", "response")


@dataclass
class RetrievalOptions:
    """PRM's retrieval constants (all options): score = inside_weight * R(mask) +
    contour_weight * R(contour) - background_weight * |mask & background|."""

    inside_weight: float = 0.8
    contour_weight: float = 1.0
    background_weight: float = 1e-5
    background_ratio: float = 0.95   # background = class response < ratio * mean(class response)
    contour_width: int = 5           # kernel of the morphological gradient
    min_area: float = 2e-5           # fraction of the image; smaller proposals are skipped
    max_area: float = 0.85           # larger-or-equal proposals are skipped
    max_proposals: int = 100         # the first N proposals by objectness are considered (0 = all)
    response_blur: float = 0.03      # rule "response": Gaussian sigma, fraction of the image's shorter side
    response_threshold: float = 0.4  # rule "response": mask where the smoothed map >= this x its maximum
    nms_iou: float = 0.3
    merge_responses: bool = True     # a group's mask is made again from its peaks' summed response maps
    class_agnostic_nms: bool = False

    def validate(self) -> None:
        if not 0 <= self.min_area < self.max_area <= 1:
            raise ValueError(f"need 0 <= min_area < max_area <= 1, got {self.min_area}, {self.max_area}")
        if self.contour_width < 1:
            raise ValueError("contour_width must be at least 1 pixel")
        if not 0 < self.nms_iou <= 1:
            raise ValueError("nms_iou must be in (0, 1]")
        if self.max_proposals < 0:
            raise ValueError("max_proposals must be >= 0 (0 = all)")
        if self.response_blur < 0 or not 0 < self.response_threshold < 1:
            raise ValueError(f"need response_blur >= 0 and 0 < response_threshold < 1, got "
                             f"{self.response_blur}, {self.response_threshold}")


@dataclass
class Candidate:
    """One peak's chosen proposal: class index, score, mask, peak (y, x) in image pixels, response."""

    cls: int
    score: float
    mask: np.ndarray
    peak: tuple[int, int]
    response: np.ndarray


def considered(proposals: Proposals, opts: RetrievalOptions) -> np.ndarray:
    """Indices of the proposals a peak may take: the first max_proposals by objectness, minus those
    outside [min_area, max_area) of the image."""
    order = np.argsort(-proposals.scores, kind="stable")
    if opts.max_proposals:
        order = order[: opts.max_proposals]
    frac = proposals.areas()[order] / float(np.prod(proposals.image_size))
    return order[(frac >= opts.min_area) & (frac < opts.max_area)]


def background(class_response: np.ndarray, ratio: float) -> np.ndarray:
    """PRM's background: where the class response (at image size) is under ratio x its mean."""
    return class_response < ratio * class_response.mean()


def contour(mask: np.ndarray, width: int) -> np.ndarray:
    """Morphological gradient (dilation minus erosion) with a width x width square kernel."""
    kernel = np.ones((width, width), np.uint8)
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, kernel).astype(bool)


class PrmScorer:
    """PRM's retrieval score for every peak of one image and class. The considered proposals, their
    contours and background counts are computed once, so a peak costs two matrix-vector products."""

    def __init__(self, proposals: Proposals, class_response: np.ndarray, opts: RetrievalOptions):
        self.proposals, self.opts = proposals, opts
        self.index = considered(proposals, opts)
        bg = background(class_response, opts.background_ratio).astype(np.float64)
        self.bg = proposals.region_sums(bg)[self.index]
        self.contours = np.stack([contour(proposals.mask(n), opts.contour_width).ravel() for n in self.index]
                                 ).astype(np.float32) if len(self.index) else np.zeros((0, bg.size), np.float32)

    def scores(self, response: np.ndarray) -> np.ndarray:
        """Scores of the considered proposals (self.index) for one peak response map (H, W)."""
        inside = self.proposals.region_sums(response)[self.index]
        edge = self.contours @ response.ravel().astype(np.float32)
        return self.opts.inside_weight * inside + self.opts.contour_weight * edge - self.opts.background_weight * self.bg

    def select(self, response: np.ndarray) -> tuple[int, float] | None:
        """(proposal index, score) of the best proposal, None when no proposal is considered."""
        if len(self.index) == 0:
            return None
        s = self.scores(response)
        best = int(np.argmax(s))
        return int(self.index[best]), float(s[best])


def wise_select(response: np.ndarray, proposals: Proposals, index: np.ndarray) -> tuple[int, tuple[int, int]] | None:
    """WISE's rule: the point is the argmax of the peak response map; among the considered proposals
    (`index`, see considered()) containing it, the one of highest objectness. Returns (proposal, point)."""
    y, x = np.unravel_index(int(np.argmax(response)), response.shape)
    containing = [int(n) for n in index if proposals.members[n, proposals.base[proposals.which[n], y, x]]]
    if not containing:
        return None
    return max(containing, key=lambda n: proposals.scores[n]), (int(y), int(x))


def smooth(response: np.ndarray, blur: float) -> np.ndarray:
    """The response map (float32) smoothed by a Gaussian of sigma = blur x the image's shorter side."""
    r = response.astype(np.float32)
    return cv2.GaussianBlur(r, (0, 0), blur * min(r.shape)) if blur > 0 else r


def response_mask(response: np.ndarray, points: tuple[int, int] | list[tuple[int, int]], blur: float,
                  threshold: float) -> np.ndarray:
    """maskless's rule: the peak response map as the mask, no proposals. Peak backpropagation lights
    an object's texture and edges rather than its whole surface, so the map is first smoothed (Gaussian,
    sigma = blur x the image's shorter side), then kept where >= threshold x its maximum; the connected
    components holding the peak points (one peak, or a group's: pseudo/grouping.py) are the mask (the
    one holding the map's maximum when no point is inside). Its shape is what the map gives: long,
    concave or holed. Measured against PRM's proposal score on the world in docs/PSEUDO.md."""
    r = smooth(response, blur)
    keep = (r >= threshold * float(r.max())).astype(np.uint8) if r.max() > 0 else np.zeros(r.shape, np.uint8)
    if not keep.any():
        return np.zeros(r.shape, bool)
    _, labels = cv2.connectedComponents(keep)
    points = [points] if isinstance(points, tuple) else points
    held = {int(labels[y, x]) for y, x in points if keep[y, x]}
    if not held:
        held = {int(labels[np.unravel_index(int(np.argmax(r)), r.shape)])}
    return np.isin(labels, list(held))


def nms(candidates: list[Candidate], opts: RetrievalOptions) -> list[Candidate]:
    """Greedy NMS in score order at opts.nms_iou (per class unless class_agnostic_nms). Response maps
    are merged before, when peaks are grouped (pseudo/grouping.py): here the masks are final."""
    todo = sorted(range(len(candidates)), key=lambda i: -candidates[i].score)
    encoded = [rle.encode(c.mask) for c in candidates]
    iou = rle.iou_matrix(encoded, encoded)
    kept: list[Candidate] = []
    while todo:
        i = todo.pop(0)
        kept.append(candidates[i])
        todo = [j for j in todo if not ((opts.class_agnostic_nms or candidates[j].cls == candidates[i].cls)
                                        and iou[i, j] >= opts.nms_iou)]
    return kept


def to_instance(c: Candidate, classes: list[str]) -> dict:
    """docs/FORMAT.md INSTANCE."""
    enc = rle.encode(c.mask)
    return {"class": classes[c.cls], "score": float(c.score), "mask": enc, "bbox": rle.bbox_xywh(enc),
            "peak": [int(c.peak[0]), int(c.peak[1])]}

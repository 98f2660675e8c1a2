"""Peaks of one object grouped into one instance, before its mask is refined.

Why: one peak = one instance fails for objects a classifier lights in several places (a bar lit at
both ends, a star in two arms, a crescent at its tips): each peak's response covers a part, so the
object gets two or three small masks, each under IoU 0.5 with it. Grouping the peaks first and making
one mask from their summed response maps gives one mask over the whole object.

Two same-class peaks are one object when
  - their smoothed response maps overlap: sum over pixels of min(a, b), both normalised to sum 1 (1 =
    the same map, 0 = disjoint), at least `overlap`; or
  - their masks (as the rule picked them, before GrabCut) overlap at IoU >= `iou` (NMS's criterion).
Groups are the connected components of that relation (single linkage: the peaks at both ends of a
bar join through one in its middle). With `merge` the group's mask is made again from the sum of its
members' response maps (PRM merged the response maps of the peaks NMS suppressed); without it the
strongest peak's mask stands for the group and the others are dropped (plain NMS).
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from maskless.core import masks as rle
from maskless.core.linked import linked_groups
from maskless.pseudo.peak_response import Peak
from maskless.pseudo.retrieval import Candidate, smooth


def response_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """sum(min(a, b)) of two non-negative maps each normalised to sum 1 (0 when either is all zero)."""
    sa, sb = float(a.sum()), float(b.sum())
    if sa <= 0 or sb <= 0:
        return 0.0
    return float(np.minimum(a / sa, b / sb).sum())


def peak_groups(candidates: list[Candidate], blur: float, overlap: float | None, iou: float,
                class_agnostic: bool = False) -> list[list[int]]:
    """Indices of the candidates grouped per object, each group in score order (best first), groups in
    the order of their best member. overlap None: by mask IoU alone."""
    n = len(candidates)
    smoothed = [smooth(c.response, blur) for c in candidates]
    encoded = [rle.encode(c.mask) for c in candidates]
    ious = rle.iou_matrix(encoded, encoded) if n else np.zeros((0, 0))

    def one_object(i: int, j: int) -> bool:
        if not class_agnostic and candidates[i].cls != candidates[j].cls:
            return False
        return ious[i, j] >= iou or (overlap is not None and response_overlap(smoothed[i], smoothed[j]) >= overlap)

    group = linked_groups(n, one_object)
    by_score = sorted(range(n), key=lambda i: -candidates[i].score)
    groups: dict[int, list[int]] = {}
    for i in by_score:
        groups.setdefault(group[i], []).append(i)
    return list(groups.values())


def merge_groups(candidates: list[Candidate], groups: list[list[int]], merge: bool,
                 remask: Callable[[np.ndarray, list[tuple[int, int]], int], np.ndarray | None]) -> list[Candidate]:
    """One candidate per group: its best member's class, score and peak; with `merge`, the summed
    response of the members and the mask `remask(response, member peaks, class)` makes of it (the best
    member's mask when remask finds none)."""
    out = []
    for group in groups:
        head = candidates[group[0]]
        if not merge or len(group) == 1:
            out.append(head)
            continue
        response = np.sum([candidates[i].response for i in group], axis=0)
        mask = remask(response, [candidates[i].peak for i in group], head.cls)
        out.append(Candidate(head.cls, head.score, head.mask if mask is None or not mask.any() else mask,
                             head.peak, response))
    return out


def unexplained_peaks(class_maps: np.ndarray, class_ids: list[int], peaks: list[Peak], covered: list[np.ndarray],
                      relative_threshold: float, max_peaks: int, cell: int = 1) -> list[Peak]:
    """One more peak per class where the class map is still high outside what its peaks explain.

    Why: touching same-class objects make one smooth blob in the class map with one local maximum, so
    the second object gets no peak (on the demo world 70% of the squares had none). Once the masks of the
    peaks found so far are known (`covered`: one boolean map per peak, at the class map's resolution),
    the class map's maximum outside them, if it is at least `relative_threshold` x the map's maximum,
    is taken as a new peak: its own response map then says which object it lights (grouping merges it
    with a peak of the same object). The `cell` x `cell` square around every peak counts as covered too
    (a response may light another place than its peak; `cell` = map pixels per feature cell). At most
    `max_peaks` per class."""
    new = []
    for c in class_ids:
        own = [k for k, p in enumerate(peaks) if p.cls == c]
        if len(own) >= max_peaks:
            continue
        m = class_maps[c]
        taken = np.zeros(m.shape, bool)
        for k in own:
            taken |= covered[k]
            p = peaks[k]
            taken[max(0, p.y - cell // 2): p.y + cell // 2 + 1, max(0, p.x - cell // 2): p.x + cell // 2 + 1] = True
        free = np.where(taken, -np.inf, m)
        y, x = np.unravel_index(int(np.argmax(free)), m.shape)
        top = float(m.max())
        if np.isfinite(free[y, x]) and free[y, x] >= top - abs(top) * (1.0 - relative_threshold):
            new.append(Peak(c, int(y), int(x), float(m[y, x])))
    return new


def covered_area(response: np.ndarray, point: tuple[int, int], blur: float, threshold: float,
                 shape: tuple[int, int], cell: int) -> np.ndarray:
    """What a peak explains, at a class map's resolution `shape`: its response mask (input resolution),
    grown by one feature cell (`cell` map pixels), because the class map, made of cells, spreads an
    object's blob about that far beyond the object."""
    from maskless.pseudo.retrieval import response_mask

    mask = response_mask(response, point, blur, threshold).astype(np.uint8)
    mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return cv2.dilate(mask, np.ones((2 * cell + 1, 2 * cell + 1), np.uint8)).astype(bool)

"""Pseudo instances of one image: class response -> peaks -> peak responses -> one mask per peak ->
peaks grouped per object (their responses merged) -> GrabCut -> NMS.

Kept apart from the Ray stage so the benchmark and tests run the same per-image code in-process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from maskless.pseudo.classifier import PeakClassifier
from maskless.pseudo.preprocess import eval_transform
from maskless.pseudo.grouping import covered_area, merge_groups, peak_groups, unexplained_peaks
from maskless.pseudo.peak_response import RULES as RESPONSE_RULES, Peak, peak_response_maps, select_peaks
from maskless.pseudo.proposals import Proposals
from maskless.pseudo.refine import REFINERS, grabcut
from maskless.pseudo.retrieval import (RULES, Candidate, PrmScorer, RetrievalOptions, considered, nms, response_mask, to_instance,
                              smooth, wise_select)

CLASS_SOURCES = ("labels", "predicted")


@dataclass
class MaskerOptions:
    rule: str = "response"            # response (map itself), prm (retrieval score), wise (objectness at the point)
    response: str = "prm"             # peak response backward rule: prm or gradient
    classes_from: str = "labels"      # peaks for the image's labels, or for the classes the classifier predicts
    class_threshold: float = 0.0      # a class is predicted when its score (logit) is above this
    peak_threshold: float = 0.5       # peaks >= this fraction of their class map's maximum
    max_peaks: int = 10               # per class
    peak_batch: int = 16              # peaks back-propagated together
    input_size: int | None = None     # classifier input side; None = the classifier's training image_size
    refine: str = "grabcut"           # each peak's mask refined by GrabCut (pseudo/refine.py), or "none"
    refine_core: float = 0.6          # GrabCut: definitely object where the smoothed response >= this x max
    refine_margin: float = 0.25       # GrabCut: definitely background outside the mask's box grown by this
    refine_iterations: int = 5
    group_overlap: float | None = 0.5  # peaks whose smoothed responses share this much mass: one object (None: IoU only)
    explain_rounds: int = 0           # rounds adding a peak per class where the class map is high but unexplained
    explain_threshold: float = 0.5    # such a peak needs the class map >= this x its maximum
    retrieval: RetrievalOptions = field(default_factory=RetrievalOptions)

    def validate(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; use one of {RULES}")
        if self.response not in RESPONSE_RULES:
            raise ValueError(f"unknown peak response rule {self.response!r}; use one of {RESPONSE_RULES}")
        if self.classes_from not in CLASS_SOURCES:
            raise ValueError(f"classes_from must be one of {CLASS_SOURCES}, got {self.classes_from!r}")
        if not 0 <= self.peak_threshold <= 1:
            raise ValueError(f"peak_threshold is relative to the map maximum: in [0, 1], got {self.peak_threshold}")
        if self.max_peaks < 1 or self.peak_batch < 1:
            raise ValueError("max_peaks and peak_batch must be >= 1")
        if self.refine not in REFINERS:
            raise ValueError(f"unknown refine {self.refine!r}; use one of {REFINERS}")
        if not 0 < self.refine_core <= 1 or self.refine_margin < 0 or self.refine_iterations < 1:
            raise ValueError("need 0 < refine_core <= 1, refine_margin >= 0 and refine_iterations >= 1")
        if self.group_overlap is not None and not 0 < self.group_overlap <= 1:
            raise ValueError(f"group_overlap is a shared fraction of response mass: in (0, 1], got {self.group_overlap}")
        if self.explain_rounds < 0 or not 0 <= self.explain_threshold <= 1:
            raise ValueError(f"need explain_rounds >= 0 and explain_threshold in [0, 1], got {self.explain_rounds}, "
                             f"{self.explain_threshold}")
        if self.input_size is not None and (self.input_size < 32 or self.input_size % 32):
            raise ValueError(f"input_size must be a multiple of 32 (the backbone stride), got {self.input_size}")
        self.retrieval.validate()


@dataclass
class PeakResponses:
    """One image (H, W, 3), its peaks, their points (y, x) in image pixels, response maps (N, H, W)
    summing to 1, and the class response maps resized to the image (C, H, W)."""

    image: np.ndarray
    peaks: list[Peak]
    points: np.ndarray
    responses: np.ndarray
    class_maps: np.ndarray


class PseudoMasker:
    """Holds a classifier and turns (image, labels, proposals) into FORMAT.md instances."""

    def __init__(self, model: PeakClassifier, classes: list[str], train_config: dict, opts: MaskerOptions,
                 device: str = "cpu"):
        opts.validate()
        self.model, self.classes, self.opts, self.device = model.eval().to(device), list(classes), opts, device
        size = opts.input_size or int(train_config.get("image_size", 448))
        self.transform = eval_transform(size)

    def class_ids(self, labels: list[str], x: torch.Tensor) -> list[int]:
        if self.opts.classes_from == "predicted":
            with torch.no_grad():
                scores = self.model(x)[0]
            return [int(c) for c in torch.nonzero(scores > self.opts.class_threshold).flatten()]
        return sorted({self.classes.index(l) for l in labels if l in self.classes})  # unknown labels: no peaks

    def class_response_maps(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier inputs (B, 3, S, S) and class response maps (B, C, h, w) of several images in one
        forward pass (the Ray stage batches this; peaks and their back-propagation stay per image)."""
        x = torch.stack([self.transform(Image.fromarray(im)) for im in images]).to(self.device)
        with torch.no_grad():
            return x, self.model.class_response_maps(x)

    def responses(self, image: np.ndarray, labels: list[str],
                  forward: tuple[torch.Tensor, torch.Tensor] | None = None) -> PeakResponses:
        """Peaks of the image's classes and their response maps, at image size. forward: this image's
        (input (1, 3, S, S), class response maps (C, h, w)) from class_response_maps, else computed here."""
        h, w = image.shape[:2]
        if forward is None:
            x, crms = self.class_response_maps([image])
            forward = (x, crms[0])
        x, crm = forward
        ids = self.class_ids(labels, x)
        peaks = select_peaks(crm, ids, self.opts.peak_threshold, self.opts.max_peaks) if ids else []
        if not peaks:
            return PeakResponses(image, [], np.zeros((0, 2), int), np.zeros((0, h, w)), np.zeros((0, h, w)))
        maps = peak_response_maps(self.model, x, peaks, self.opts.response, self.opts.peak_batch)
        crm_np, blur, thr = crm.cpu().numpy(), self.opts.retrieval.response_blur, self.opts.retrieval.response_threshold
        covered = []
        for _ in range(self.opts.explain_rounds):
            input_yx = self.model.crm_to_input(torch.tensor([[p.y, p.x] for p in peaks]), tuple(crm.shape[1:]),
                                               tuple(x.shape[2:])).long()
            input_yx = torch.minimum(input_yx, torch.tensor([x.shape[2] - 1, x.shape[3] - 1])).tolist()
            covered += [covered_area(maps[k].numpy(), tuple(input_yx[k]), blur, thr, crm_np.shape[1:],
                                     self.model.upsample)
                        for k in range(len(covered), len(peaks))]
            new = unexplained_peaks(crm_np, ids, peaks, covered, self.opts.explain_threshold, self.opts.max_peaks,
                                    self.model.upsample)
            if not new:
                break
            peaks = peaks + new
            maps = torch.cat([maps, peak_response_maps(self.model, x, new, self.opts.response, self.opts.peak_batch)])
        resp = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].clamp(min=0)
        resp = resp / resp.flatten(1).sum(1).clamp(min=1e-12)[:, None, None]
        class_maps = F.interpolate(crm[None].cpu(), size=(h, w), mode="bilinear", align_corners=True)[0]
        yx = self.model.crm_to_input(torch.tensor([[p.y, p.x] for p in peaks]), tuple(crm.shape[1:]), tuple(x.shape[2:]))
        yx = yx * torch.tensor([h / x.shape[2], w / x.shape[3]])
        points = np.minimum(yx.long().numpy(), [h - 1, w - 1])
        return PeakResponses(image, peaks, points, resp.numpy(), class_maps.numpy())

    def instances(self, pr: PeakResponses, proposals: Proposals | None) -> list[dict]:
        """One mask per peak by the configured rule; peaks of one object grouped (pseudo/grouping.py), a
        group's mask made again from its summed response (merge_responses); refined (GrabCut) unless
        refine is "none"; then NMS -> FORMAT.md instances. The response rule needs no proposals (None)."""
        h, w = pr.responses.shape[1:]
        if proposals is None:
            if self.opts.rule != "response":
                raise ValueError(f"rule {self.opts.rule!r} picks proposals: pass them")
        elif proposals.image_size != (h, w):
            raise ValueError(f"proposals are for a {proposals.image_size} image, the image is {(h, w)}")
        opts, candidates = self.opts.retrieval, []
        pick = self._picker(pr, proposals)
        for p, point, r in zip(pr.peaks, pr.points, pr.responses):
            yx = (int(point[0]), int(point[1]))
            picked = pick(r, [yx], p.cls)
            if picked is not None and picked[0].any():
                score = p.value if picked[1] is None else picked[1]
                candidates.append(Candidate(p.cls, float(score), picked[0], yx, r))
        groups = peak_groups(candidates, opts.response_blur, self.opts.group_overlap, opts.nms_iou,
                             opts.class_agnostic_nms)

        def remask(response: np.ndarray, points: list[tuple[int, int]], cls: int) -> np.ndarray | None:
            picked = pick(response, points, cls)
            return None if picked is None else picked[0]

        candidates = merge_groups(candidates, groups, opts.merge_responses, remask)
        if self.opts.refine == "grabcut":
            for c in candidates:
                c.mask = grabcut(pr.image, c.mask, smooth(c.response, opts.response_blur), self.opts.refine_core,
                                 self.opts.refine_margin, self.opts.refine_iterations)
        return [to_instance(c, self.classes) for c in nms(candidates, opts)]

    def _picker(self, pr: PeakResponses, proposals: Proposals | None):
        """The rule as a function (response map, peak points, class) -> (mask, score or None for the peak's
        own value), or None when the rule finds no mask."""
        opts = self.opts.retrieval
        if self.opts.rule == "response":
            return lambda r, points, cls: (response_mask(r, points, opts.response_blur, opts.response_threshold), None)
        if self.opts.rule == "wise":
            index = considered(proposals, opts)

            def wise(r, points, cls):
                found = wise_select(r, proposals, index)
                return None if found is None else (proposals.mask(found[0]), None)
            return wise
        scorers: dict[int, PrmScorer] = {}

        def prm(r, points, cls):
            if cls not in scorers:
                scorers[cls] = PrmScorer(proposals, pr.class_maps[cls], opts)
            picked = scorers[cls].select(r)
            return None if picked is None else (proposals.mask(picked[0]), picked[1])
        return prm

    def mask_images(self, images: list[np.ndarray], labels: list[list[str]],
                    proposals: list[Proposals | None]) -> list[tuple[PeakResponses, list[dict]]]:
        """(peak responses, instances) of each image: one forward pass for all of them, then peaks,
        back-propagation and masks image by image. The Ray stage's actors and the benchmark's plain
        processes both call this, so both measure the same work."""
        x, crm = self.class_response_maps(images)
        out = []
        for j, (image, image_labels, props) in enumerate(zip(images, labels, proposals)):
            responses = self.responses(image, image_labels, (x[j:j + 1], crm[j]))
            out.append((responses, self.instances(responses, props)))
        return out

    def __call__(self, image: np.ndarray, labels: list[str], proposals: Proposals | None,
                 forward: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
        return self.instances(self.responses(image, labels, forward), proposals)

"""Pseudo masks: peak responses, proposals, retrieval, NMS, the Ray stage and the fidelity report."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from maskless.core import masks as rle
from maskless.core import errors, shards
from maskless.pseudo.fidelity import FidelityAccumulator, FidelityConfig, image_size, run_fidelity
from maskless.pseudo.peak_response import Peak, peak_response_maps
from maskless.pseudo.proposals import (CACHE_ENTRY, Proposals, SelectiveSearch, SuperpixelMerging, cached_or_compute,
                                       make_source)
from maskless.pseudo.retrieval import Candidate, PrmScorer, RetrievalOptions, contour, nms, response_mask, wise_select
from maskless.pseudo.stage import PseudoConfig, run_pseudo


class TinyCRM(nn.Module):
    """Positive filters: the class response at a pixel sums the brightness around it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            for conv in (self.features[0], self.features[4], self.head):
                conv.weight.uniform_(0.1, 1.0)
                conv.bias.zero_()

    def class_response_maps(self, x):
        return F.interpolate(self.head(self.features(x)), scale_factor=2, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("rule", ["prm", "gradient"])
def test_peak_response_is_peaked_at_its_object(rule):
    model = TinyCRM().eval()
    x = torch.zeros(1, 3, 48, 48)
    x[..., 6:14, 6:14] = 1.0     # object A
    x[..., 30:40, 28:40] = 1.0   # object B
    crm = model.class_response_maps(x)[0]
    peak_a = Peak(0, *divmod(int(crm[0, :24, :24].argmax()), 24), 0.0)
    sub = crm[1, 24:, 24:]
    y, xx = divmod(int(sub.argmax()), 24)
    peak_b = Peak(1, 24 + y, 24 + xx, 0.0)
    maps = peak_response_maps(model, x, [peak_a, peak_b], rule=rule, batch=1)  # batch=1: chunking too
    assert maps.shape == (2, 48, 48)
    assert torch.allclose(maps.sum(dim=(1, 2)), torch.ones(2), atol=1e-5) and (maps >= 0).all()
    for m, (ys, xs) in zip(maps, [(slice(6, 14), slice(6, 14)), (slice(30, 40), slice(28, 40))]):
        y, xx = divmod(int(m.argmax()), 48)
        assert ys.start <= y < ys.stop and xs.start <= xx < xs.stop
        assert float(m[ys, xs].sum()) > 0.9
    # the PRM rule patches the convolutions only inside the call
    assert all("forward" not in vars(c) for c in model.modules() if isinstance(c, nn.Conv2d))


def test_prm_rule_differs_from_plain_gradient():
    torch.manual_seed(0)
    model = TinyCRM().eval()
    model.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model.class_response_maps = lambda x: model.head(model.features(x))  # mixed-sign weights, no pooling
    x = torch.rand(1, 3, 16, 16)
    peaks = [Peak(0, 8, 8, 0.0)]
    prm, grad = (peak_response_maps(model, x, peaks, rule=r) for r in ("prm", "gradient"))
    assert not torch.allclose(prm, grad)
    # both stay within the peak's 5x5 receptive field
    for m in (prm, grad):
        assert m[0, :6].sum() == 0 and m[0, 6:11, 6:11].sum() > 0.99


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_peak_backprop_conserves_relevance_and_keeps_forward(padding_mode):
    """PRM's rule redistributes a peak's unit relevance over the inputs in proportion to their positive
    contributions: through convolutions alone the input map sums to 1; forward values are unchanged."""
    from maskless.pseudo.peak_response import peak_backprop

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode),
                        nn.Conv2d(4, 2, 3, stride=2, padding=1, padding_mode=padding_mode))
    x = torch.rand(1, 3, 9, 9)
    plain = net(x)
    with peak_backprop(net):
        xs = x.clone().requires_grad_(True)
        y = net(xs)
        (g,) = torch.autograd.grad(y[0, 0, 2, 2], xs)
    assert torch.allclose(y, plain) and float(g.sum()) == pytest.approx(1.0, abs=1e-5)


def _proposals(masks: list[np.ndarray], scores: list[float]) -> Proposals:
    """Proposals over a base label map in which every given mask is a union of regions."""
    stack = np.stack(masks)
    codes = np.zeros(stack.shape[1:], dtype=np.int64)
    for k in range(len(masks)):
        codes = codes * 2 + stack[k]
    _, labels = np.unique(codes, return_inverse=True)
    labels = labels.reshape(codes.shape)
    members = np.zeros((len(masks), labels.max() + 1), bool)
    for k, m in enumerate(masks):
        members[k, np.unique(labels[m])] = True
    return Proposals(labels[None].astype(np.int32), np.zeros(len(masks), np.int32), members,
                     np.asarray(scores, np.float32), "hand")


def _box(y0, y1, x0, x1, size=40):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_prm_score_picks_the_object_proposal():
    obj, half, wide, tiny = _box(10, 20, 10, 20), _box(10, 20, 10, 15), _box(5, 35, 5, 35), _box(12, 13, 12, 13)
    props = _proposals([half, wide, obj, tiny], [0.9, 0.8, 0.1, 1.0])
    response = np.zeros((40, 40))
    response[9:21, 9:21] = 1.0      # the object and a 1 px ring around it
    response /= response.sum()
    class_map = np.where(_box(8, 22, 8, 22), 5.0, 0.0)
    opts = RetrievalOptions(min_area=2 / 1600)  # the 1-pixel proposal is skipped by area
    scorer = PrmScorer(props, class_map, opts)
    assert sorted(scorer.index.tolist()) == [0, 1, 2]
    n, score = scorer.select(response)
    assert n == 2
    bg = class_map < 0.95 * class_map.mean()
    hand = 0.8 * response[obj].sum() + response[contour(obj, 5)].sum() - 1e-5 * (obj & bg).sum()
    assert score == pytest.approx(hand)
    # the proposal considered are the first max_proposals by objectness: drop the object
    assert PrmScorer(props, class_map, RetrievalOptions(max_proposals=2)).select(response)[0] != 2
    # WISE: highest objectness among the proposals containing the argmax of the response
    response[15, 12] = 1.0
    assert wise_select(response, props, scorer.index) == (0, (15, 12))


def test_response_mask_is_the_peaks_component_of_the_smoothed_map():
    r = np.zeros((40, 40))
    r[5:15, 5:15] = 1.0             # the peak's object
    r[25:35, 25:35] = 0.6           # another bright region, not connected to it
    r[8, 8] = 3.0                   # the peak's maximum
    # no smoothing: above 0.3 x max (0.9) -> the peak's pixel only, the 1.0 square is under it
    assert (response_mask(r, (8, 8), blur=0.0, threshold=0.3) == (r >= 0.9)).all()
    low = response_mask(r, (8, 8), blur=0.0, threshold=0.1)           # 0.3: both squares pass ...
    assert low.sum() == 100 and low[5:15, 5:15].all()                 # ... but only the peak's is kept
    # a peak outside the kept pixels takes the component of the map's maximum
    assert (response_mask(r, (30, 2), blur=0.0, threshold=0.1) == low).all()
    # smoothing (sigma = 0.05 x 40 = 2 px) spreads the maximum's square a little beyond its edge
    import cv2
    blurred = cv2.GaussianBlur(r.astype(np.float32), (0, 0), 2.0)
    smooth = response_mask(r, (8, 8), blur=0.05, threshold=0.2)
    top_left = np.zeros(r.shape, bool)
    top_left[:20, :20] = True       # the smoothed squares stay apart: the other one is not in the mask
    assert (smooth == ((blurred >= 0.2 * blurred.max()) & top_left)).all() and smooth.sum() > 100
    assert not response_mask(np.zeros((10, 10)), (5, 5), 0.05, 0.4).any()


def test_grabcut_grows_a_partial_mask_to_the_object_and_keeps_degenerate_masks():
    from maskless.pseudo.refine import grabcut

    rng = np.random.default_rng(0)
    image = np.clip(rng.normal((40, 60, 200), 12, (64, 64, 3)), 0, 255).astype(np.uint8)  # noisy blue
    obj = _box(16, 44, 20, 48, size=64)
    image[obj] = np.clip(rng.normal((220, 40, 30), 12, (int(obj.sum()), 3)), 0, 255).astype(np.uint8)  # red square
    partial = _box(24, 40, 26, 42, size=64)              # the response lit only the middle
    response = np.where(partial, 1.0, 0.0)
    refined = grabcut(image, partial, response, core=0.8, margin=0.5)
    iou = (refined & obj).sum() / (refined | obj).sum()
    assert iou > 0.9 and (partial & obj).sum() / (partial | obj).sum() < 0.5
    # definitely background outside the grown box (cols 18-50 here): a red bar joined to the square and
    # running to the image edge is cut there, while a box grown without limit lets it in
    image[28:32, 48:] = (220, 40, 30)
    assert not grabcut(image, partial, response, margin=0.5)[:, 51:].any()
    assert grabcut(image, partial, response, margin=10.0)[28:32, 51:].all()
    # too small or nearly the whole image: returned as it is
    tiny = _box(30, 33, 30, 33, size=64)
    assert (grabcut(image, tiny, response) == tiny).all()
    everything = np.ones((64, 64), bool)
    assert (grabcut(image, everything, response) == everything).all()


def test_nms_keeps_the_best_mask_per_class():
    a, b, c = _box(0, 10, 0, 10), _box(1, 11, 0, 10), _box(20, 30, 20, 30)
    r = np.zeros((40, 40))
    cands = [Candidate(0, 0.5, b, (5, 5), r), Candidate(0, 0.9, a, (4, 4), r),
             Candidate(0, 0.7, c, (25, 25), r), Candidate(1, 0.6, a, (3, 3), r)]
    kept = nms(cands, RetrievalOptions(nms_iou=0.3))
    assert [(k.cls, k.score) for k in kept] == [(0, 0.9), (0, 0.7), (1, 0.6)]
    agnostic = nms(cands, RetrievalOptions(nms_iou=0.3, class_agnostic_nms=True))
    assert [k.score for k in agnostic] == [0.9, 0.7]


def _shape_image(shapes, size=64, seed=0):
    """A noisy grey-blue image with each (mask, colour) painted on it."""
    rng = np.random.default_rng(seed)
    image = rng.normal((70, 90, 160), 10, (size, size, 3))
    for m, colour in shapes:
        image[m] = rng.normal(colour, 10, (int(m.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _masker(**opts):
    """A masker for hand-made responses (the classifier is not used), options by name."""
    import dataclasses

    from maskless.pseudo.classifier import PeakClassifier
    from maskless.pseudo.instances import MaskerOptions, PseudoMasker

    names = {f.name for f in dataclasses.fields(RetrievalOptions)}
    retrieval = RetrievalOptions(**{k: v for k, v in opts.items() if k in names})
    masker_opts = MaskerOptions(**{k: v for k, v in opts.items() if k not in names}, retrieval=retrieval)
    return PseudoMasker(PeakClassifier(1, backbone="tiny"), ["a"], {"image_size": 64}, masker_opts)


def _responses(image, points, maps):
    from maskless.pseudo.instances import PeakResponses

    maps = np.stack([m / m.sum() for m in maps])
    peaks = [Peak(0, y, x, 1.0 - 0.1 * k) for k, (y, x) in enumerate(points)]
    return PeakResponses(image, peaks, np.array(points), maps, np.zeros((1,) + maps.shape[1:]))


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_peaks_of_one_bar_make_one_instance_and_merge_responses_makes_its_mask():
    """A bar lit by two peaks, one near each end, each response strongest at its end and fading along
    the bar: grouped by response overlap, one instance covering the bar (from the summed responses);
    without merging the responses, the group keeps its first peak's mask, part of the bar (GrabCut grows
    it only within its margin); without grouping, two parts."""
    yy, xx = np.mgrid[:64, :64]
    bar = (yy >= 28) & (yy < 36) & (xx >= 4) & (xx < 60)
    image = _shape_image([(bar, (220, 60, 40))])
    ends = [(32, 10), (32, 53)]
    maps = [np.where(bar, np.exp(-np.abs(xx - x) / 10.0) + 0.4, 0.0) for _, x in ends]
    from maskless.pseudo.grouping import response_overlap
    assert 0.6 < response_overlap(*maps) < 0.7
    pr = _responses(image, ends, maps)
    for refine in ("none", "grabcut"):
        grouped = _masker(group_overlap=0.5, refine=refine).instances(pr, None)
        assert len(grouped) == 1 and _iou(rle.decode(grouped[0]["mask"]).astype(bool), bar) > 0.85
        assert grouped[0]["peak"] == [32, 10]  # the group's strongest peak
        unmerged = _masker(group_overlap=0.5, refine=refine, merge_responses=False).instances(pr, None)
        assert len(unmerged) == 1 and _iou(rle.decode(unmerged[0]["mask"]).astype(bool), bar) < 0.7
        apart = _masker(group_overlap=None, refine=refine, nms_iou=0.5).instances(pr, None)
        assert len(apart) == 2 and all(_iou(rle.decode(i["mask"]).astype(bool), bar) < 0.7 for i in apart)
        assert _masker(group_overlap=0.7, refine=refine, nms_iou=0.5).instances(pr, None) == apart  # too little shared


def test_touching_discs_with_a_peak_each_stay_two_instances():
    yy, xx = np.mgrid[:64, :64]
    left, right = np.hypot(yy - 32, xx - 20) < 11, np.hypot(yy - 32, xx - 42) < 11
    image = _shape_image([(left, (220, 60, 40)), (right, (200, 70, 50))])
    maps = [np.exp(-np.hypot(yy - 32, xx - x) ** 2 / 60.0) for x in (20, 42)]
    found = _masker(group_overlap=0.5).instances(_responses(image, [(32, 20), (32, 42)], maps), None)
    assert len(found) == 2
    masks = [rle.decode(i["mask"]).astype(bool) for i in found]
    assert _iou(masks[0], left) > 0.7 and _iou(masks[1], right) > 0.7


def test_a_ring_keeps_its_hole():
    yy, xx = np.mgrid[:64, :64]
    d = np.hypot(yy - 32, xx - 32)
    ring = (d >= 9) & (d < 20)
    image = _shape_image([(ring, (220, 60, 40))])
    response = np.where(ring, 1.0, 0.0) * (1 + 0.2 * np.cos(np.arctan2(yy - 32, xx - 32)))  # lit unevenly
    for refine in ("none", "grabcut"):
        (inst,) = _masker(refine=refine).instances(_responses(image, [(32, 46)], [response]), None)
        m = rle.decode(inst["mask"]).astype(bool)
        assert _iou(m, ring) > 0.75 and not m[28:37, 28:37].any()  # the hole is not in the mask


@pytest.mark.parametrize("source", [SelectiveSearch(ks=(100,)), SuperpixelMerging(n_segments=60)])
def test_proposals_are_unions_of_base_regions_and_cache(source):
    rng = np.random.default_rng(0)
    image = np.full((48, 48, 3), 90, np.uint8)
    image[10:30, 12:36] = (220, 40, 40)
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    p = source(image)
    masks = p.masks()
    assert len(p) > 2 and masks.shape == (len(p), 48, 48) and ((p.scores >= 0) & (p.scores <= 1)).all()
    assert np.allclose(p.areas(), masks.sum(axis=(1, 2)))
    obj = _box(10, 30, 12, 36, 48)
    best = max(((m & obj).sum() / (m | obj).sum()) for m in masks)
    assert best > 0.9
    again, reused = cached_or_compute(source, image, {CACHE_ENTRY: p.to_bytes()})
    assert reused and np.array_equal(again.masks(), masks) and np.allclose(again.scores, p.scores)
    _, reused = cached_or_compute(source, image[:40], {CACHE_ENTRY: p.to_bytes()})
    assert not reused  # another image size: recomputed


def test_fidelity_equals_hand_computation():
    def inst(cls, m, score=1.0):
        enc = rle.encode(m)
        return {"class": cls, "score": score, "mask": enc, "bbox": rle.bbox_xywh(enc)}

    g1, g2 = _box(0, 10, 0, 10, 20), _box(10, 20, 10, 20, 20)  # 100 px each
    p1 = _box(0, 10, 0, 8, 20)                                  # IoU with g1 = 80/100
    p2 = _box(10, 20, 10, 14, 20)                               # IoU with g2 = 40/100
    void = _box(0, 1, 19, 20, 20)
    gt = {"instances": [inst("a", g1), inst("b", g2)], "void": rle.encode(void)}
    pseudo = {"instances": [inst("a", p1, 0.9), inst("a", p2, 0.8)]}
    acc = FidelityAccumulator(["a", "b"], iou=0.5)
    acc.add(gt, pseudo, (20, 20))
    r = acc.result()
    assert r["abo_same_class"] == pytest.approx((0.8 + 0.0) / 2)      # b has no pseudo of its class
    assert r["abo_any_class"] == pytest.approx((0.8 + 0.4) / 2)
    assert r["precision"] == pytest.approx(1 / 2) and r["recall"] == pytest.approx(1 / 2)
    assert r["per_class"]["b"]["recall"] == 0 and r["per_class"]["b"]["precision"] is None
    iou_a = 80 / 140                  # union of a's pseudo (120 px) vs a's gt (100 px)
    iou_b = 0 / 100
    iou_bg = (200 - 1) / (280 - 1)    # background: 200 px in gt, 280 in pseudo; the void pixel is ignored
    assert r["per_class"]["a"]["iou"] == pytest.approx(iou_a)
    assert r["miou"] == pytest.approx((iou_a + iou_b + iou_bg) / 3)


@pytest.fixture(scope="module")
def classifier_file(world_shards, tmp_path_factory):
    from maskless.pseudo.classifier import PeakClassifier, save_classifier

    torch.manual_seed(0)
    model = PeakClassifier(len(world_shards["classes"]), backbone="tiny").eval()
    path = str(tmp_path_factory.mktemp("clf") / "classifier.pt")
    save_classifier(model, world_shards["classes"], {"image_size": 64}, path)
    return path


def _tars(root):
    return {n: os.stat(os.path.join(root, n + ".tar")).st_mtime_ns for n in shards.shard_names(root)}


def _assert_same_instances(found: list[dict], expected: list[dict], key: str) -> None:
    assert len(found) == len(expected), key
    for f, e in zip(found, expected):
        assert (f["class"], f["mask"], f["bbox"], f["peak"]) == (e["class"], e["mask"], e["bbox"], e["peak"]), key
        assert f["score"] == pytest.approx(e["score"], rel=1e-5, abs=1e-6), key  # batched forward: float noise


def test_ray_stage_two_actors_failed_and_killed_units_rerun(ray_local, world_shards, classifier_file, tmp_path):
    from maskless.core.units import unit_names
    from maskless.pseudo.classifier import load_classifier
    from maskless.pseudo.instances import PseudoMasker

    data, out = world_shards["train"], str(tmp_path / "pseudo")
    names = shards.shard_names(data)
    assert len(names) >= 3
    inputs = list(shards.read_dataset(data))
    keys = {s.key for s in inputs}
    # units of 4 samples: each 6-sample input shard is two units (4 + 2), each its own output shard
    units = {n: unit_names(n, 6, 4) for n in names}
    assert units[names[1]] == [f"{names[1]}_000000-000004", f"{names[1]}_000004-000006"]
    every = {u for us in units.values() for u in us}
    cfg = dict(classifier=classifier_file, data=data, out=out, actors=2, max_peaks=3, max_proposals=50, unit_size=4,
               forward_batch=3)

    with pytest.raises(RuntimeError, match=names[1]):          # an exception halfway through one shard's units
        run_pseudo(PseudoConfig(**cfg, fail_units=[names[1]], fail_mode="raise"))
    assert set(shards.shard_names(out)) == every - set(units[names[1]])  # no half unit reads as complete
    assert not os.path.exists(os.path.join(out, "dataset.json"))

    # an actor process that dies on every attempt: retried unit_retries times, then the run fails naming it
    cut = units[names[1]][0]
    with pytest.raises(errors.IncompleteRun, match=cut):  # the CLI's exit 2 with this message, no traceback
        run_pseudo(PseudoConfig(**cfg, fail_units=[cut], fail_mode="exit_always", unit_retries=1))
    assert cut not in shards.shard_names(out)
    summary = json.load(open(os.path.join(out, "pseudo.summary.json")))
    assert list(summary["failed"]) == [cut] and "actor was lost on all 2 attempts" in summary["failed"][cut], summary["failed"]
    assert summary["processed"] == 1 and set(shards.shard_names(out)) == every - {cut}  # the shard's other unit went on

    # the rerun does only the missing units; an actor process dies halfway through one, Ray restarts it, it is redone
    committed = set(shards.shard_names(out))
    summary = run_pseudo(PseudoConfig(**cfg, fail_units=[cut], fail_mode="exit"))
    assert os.path.exists(os.path.join(out, f".crash-{cut}.tmp"))  # the actor really died mid-unit
    assert summary["units"] == len(every) and summary["skipped"] == len(committed)
    assert summary["processed"] == len(every - committed) and summary["failed"] == {}
    assert set(shards.shard_names(out)) == every
    samples = list(shards.read_dataset(out))
    assert sorted(s.key for s in samples) == sorted(keys)        # one sample per input, no duplicates
    assert all(s.pseudo is not None and s.gt is not None for s in samples)
    assert shards.read_dataset_info(out)["samples"] == len(keys)
    # what the stage wrote is what the in-process masker gives on the same images and labels
    model, classes, train_config = load_classifier(classifier_file)
    masker = PseudoMasker(model, classes, train_config, PseudoConfig(**cfg).masker_options())
    by_key = {s.key: s for s in samples}
    for s in inputs:
        _assert_same_instances(by_key[s.key].pseudo["instances"], masker(np.asarray(s.image()), s.labels, None), s.key)
    assert sum(len(s.pseudo["instances"]) for s in samples) > 0

    before = _tars(out)
    again = run_pseudo(PseudoConfig(**cfg))                      # a rerun adds nothing
    assert again["processed"] == 0 and again["skipped"] == len(every) and _tars(out) == before
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the dead writer's temp files are gone

    report = run_fidelity(FidelityConfig(data=out, out=str(tmp_path / "report"), grid_images=2))
    assert report["images"] == len(keys) and report["gt_instances"] > 0
    assert {"fidelity.json", "fidelity.md", "fidelity.png"} <= set(os.listdir(tmp_path / "report"))
    assert again["rule"] == "response" and again["proposals"] is None  # the default rule computes no proposals

    # PRM's rule goes through the proposal tasks and can keep the proposals in the shards
    prm_out = str(tmp_path / "pseudo-prm")
    run_pseudo(PseudoConfig(**{**cfg, "out": prm_out}, rule="prm", cache_proposals=True))
    prm = {s.key: s for s in shards.read_dataset(prm_out)}
    assert sorted(prm) == sorted(keys)
    prm_masker = PseudoMasker(model, classes, train_config, PseudoConfig(**cfg, rule="prm").masker_options())
    source = make_source("selective_search", "stability")  # the stage's default source
    for s in inputs:
        out_sample, image = prm[s.key], np.asarray(s.image())
        assert out_sample.pseudo["rule"] == "prm" and out_sample.pseudo["proposals"].startswith("selective_search")
        cached = Proposals.from_bytes(out_sample.extra[CACHE_ENTRY])
        assert cached.image_size == image_size(out_sample) and np.array_equal(cached.masks(), source(image).masks())
        _assert_same_instances(out_sample.pseudo["instances"], prm_masker(image, s.labels, cached), s.key)


def _dataset(root: str, parts: list[list[shards.Sample]], classes: list[str]) -> list[str]:
    """A shard dataset of the given shards (one list of samples each); returns the shard names."""
    for i, samples in enumerate(parts):
        name = f"part-{i:06d}"
        if name in shards.shard_names(root):
            shards.delete_shard(root, name)
        with shards.ShardWriter(root, name) as w:
            for s in samples:
                w.write(s)
    shards.write_dataset_info(root, classes, stage="test")
    return shards.shard_names(root)


def test_masks_do_not_depend_on_the_order_images_are_masked(world_shards, classifier_file):
    """GrabCut seeds its colour models from OpenCV's RNG: without a reseed per cut, an image's masks
    depended on what the process had cut before, so on which actor and in which unit it was masked."""
    from maskless.pseudo.classifier import load_classifier
    from maskless.pseudo.instances import PseudoMasker

    model, classes, train_config = load_classifier(classifier_file)
    masker = PseudoMasker(model, classes, train_config, PseudoConfig(max_peaks=3).masker_options())
    samples = list(shards.read_dataset(world_shards["train"]))[:8]
    images = [np.asarray(s.image()) for s in samples]
    forward = [masker(im, s.labels, None) for im, s in zip(images, samples)]
    backward = [masker(im, s.labels, None) for im, s in zip(images[::-1], samples[::-1])][::-1]
    assert sum(map(len, forward)) > 0
    for s, f, b in zip(samples, forward, backward):
        _assert_same_instances(f, b, s.key)
    # the batched forward pass of the stage (mask_images) gives the same instances as one image at a time
    batched = masker.mask_images(images, [s.labels for s in samples], [None] * len(samples))
    assert len(batched) == len(samples)
    for (responses, instances), f, s in zip(batched, forward, samples):
        assert len(responses.peaks) >= len(instances)
        _assert_same_instances(instances, f, s.key)


def test_one_input_shard_is_cut_into_units_for_every_actor(ray_local, world_shards, classifier_file, tmp_path):
    samples = list(shards.read_dataset(world_shards["train"]))
    data, out = str(tmp_path / "one"), str(tmp_path / "out")
    (name,) = _dataset(data, [samples], world_shards["classes"])
    summary = run_pseudo(PseudoConfig(classifier=classifier_file, data=data, out=out, actors=2, unit_size=2,
                                      max_peaks=2, readers=1))
    starts = range(0, len(samples), 2)
    # --readers 1: the nine units were read one at a time, by one reader process that Ray reused
    assert len({st["reader_pid"] for st in shards.read_stats(out)}) == 1
    assert summary["input_shards"] == 1 and summary["units"] == len(starts) == 9 and summary["failed"] == {}
    assert shards.shard_names(out) == [f"{name}_{a:06d}-{a + 2:06d}" for a in starts]
    per_actor = summary["per_actor"]
    assert len(per_actor) == 2 and all(a["units"] >= 1 and a["images_per_s"] > 0 for a in per_actor.values())
    assert sum(a["images"] for a in per_actor.values()) == len(samples)
    # the units read as one dataset, in the input's order; each unit's stats say which slice it holds
    assert [s.key for s in shards.read_dataset(out)] == [s.key for s in samples]
    assert ray_local.data.read_webdataset(shards.list_shards(out)).count() == len(samples)
    assert sorted((st["input_shard"], st["input_samples"]) for st in shards.read_stats(out)) == \
        [(name, [a, a + 2]) for a in starts]


def test_unit_reads_only_its_bytes_and_equals_the_streamed_slice(world_shards, tmp_path):
    from maskless.core.units import plan_shard

    name = shards.shard_names(world_shards["train"])[0]
    tar = os.path.join(world_shards["train"], name + ".tar")
    streamed = list(shards.read_shard(tar))
    plan = plan_shard(world_shards["train"], name, 4)
    assert plan.samples == len(streamed) == 6 and [(u.start, u.stop) for u in plan.units] == [(0, 4), (4, 6)]
    for u in plan.units:
        assert u.span[1] - u.span[0] < os.path.getsize(tar)
        got = list(u.samples())
        assert [(s.key, s.jpg, s.meta, s.gt) for s in got] == \
            [(s.key, s.jpg, s.meta, s.gt) for s in streamed[u.start:u.stop]]
    with pytest.raises(ValueError, match="unit size"):
        plan_shard(world_shards["train"], name, 0)
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=r"bad\.tar is not a readable tar"):
        plan_shard(str(tmp_path), "bad", 4)


def test_rerun_refuses_rewritten_input_and_another_unit_size(ray_local, world_shards, classifier_file, tmp_path,
                                                             capsys):
    from maskless.cli import main

    samples = list(shards.read_dataset(world_shards["train"]))
    classes = world_shards["classes"]
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    a, b = _dataset(data, [samples[:4], samples[4:8]], classes)
    cfg = dict(classifier=classifier_file, data=data, out=out, actors=2, unit_size=2, max_peaks=2)
    with pytest.raises(RuntimeError, match=b):
        run_pseudo(PseudoConfig(**cfg, fail_units=[b]))           # a partial run: a's two units only
    before = _tars(out)
    assert sorted(before) == [f"{a}_000000-000002", f"{a}_000002-000004"]

    with pytest.raises(ValueError, match="--unit-size 3: the units already in .* hold 2 samples"):
        run_pseudo(PseudoConfig(**{**cfg, "unit_size": 3}))
    _dataset(data, [samples[:3] + samples[8:9], samples[4:8]], classes)  # shard a now holds other samples
    with pytest.raises(ValueError, match=f"input shard {a} of .* was rewritten"):
        run_pseudo(PseudoConfig(**cfg))
    args = ["pseudo", "--classifier", classifier_file, "--data", data, "--out", out, "--unit-size", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "maskless: error: input shard" in err and "rewritten" in err and "Traceback" not in err
    assert _tars(out) == before                                 # nothing mixed in, nothing lost
    shards.delete_shard(data, a)
    with pytest.raises(ValueError, match=f"input shard {a} is gone"):
        run_pseudo(PseudoConfig(**cfg))

    # a restored, and b (none of whose units is committed) rewritten: accepted, only b's units are new
    _dataset(data, [samples[:4], samples[10:16]], classes)
    summary = run_pseudo(PseudoConfig(**cfg))
    assert summary["skipped"] == 2 and summary["processed"] == 3 and _tars(out).items() >= before.items()
    assert [s.key for s in shards.read_dataset(out)] == [s.key for s in samples[:4] + samples[10:16]]

    assert main(args[:-1] + ["0"]) == 2                        # a unit size < 1
    assert "--unit-size and --forward-batch must be >= 1" in capsys.readouterr().err


def test_a_class_with_no_peak_is_named_by_the_stage_and_the_fidelity_report(ray_local, world_shards, classifier_file,
                                                                           tmp_path, caplog):
    """As when a crawl finds no image for a class: no train image is labelled triangle, yet triangles are there."""
    import logging

    samples = [s for s in shards.read_dataset(world_shards["train"])]
    with_triangles = [s for s in samples if any(g["class"] == "triangle" for g in s.gt["instances"])]
    chosen = (with_triangles[:3] + [s for s in samples if s not in with_triangles])[:6]
    relabelled = [shards.Sample(s.key, s.jpg, {**s.meta, "labels": [l for l in s.labels if l != "triangle"]}, s.gt)
                  for s in chosen]
    data, out = str(tmp_path / "no-triangle"), str(tmp_path / "pseudo")
    shards.write_shards(relabelled, data, "t", max_count=6)
    shards.write_dataset_info(data, world_shards["classes"], stage="test")
    with caplog.at_level(logging.WARNING, logger="maskless"):
        summary = run_pseudo(PseudoConfig(classifier=classifier_file, data=data, out=out, actors=1))
    assert summary["classes_without_peaks"] == ["triangle"]
    assert summary["per_class"]["triangle"] == {"images_labelled": 0, "peaks": 0, "instances": 0}
    labelled = {c: sum(c in s.labels for s in relabelled) for c in ("disc", "square")}
    for c, n in labelled.items():
        assert summary["per_class"][c]["images_labelled"] == n and summary["per_class"][c]["peaks"] >= n
    assert sum(v["instances"] for v in summary["per_class"].values()) == summary["instances"]
    assert any("no peak in any train image" in r.message and "triangle" in r.message for r in caplog.records)
    assert shards.read_dataset_info(out)["classes_without_peaks"] == ["triangle"]

    report = run_fidelity(FidelityConfig(data=out, out=str(tmp_path / "report"), grid_images=0))
    assert "triangle" in report["classes_without_pseudo_instances"]
    md = open(tmp_path / "report" / "fidelity.md").read()
    assert "triangle: no pseudo instance at all" in md and "no peak in any image" in md


def test_bad_inputs_are_clear_errors(tmp_path, classifier_file):
    with pytest.raises(ValueError, match="classifier"):
        PseudoConfig(data="a", out="b").validate()
    with pytest.raises(ValueError, match="rule"):
        PseudoConfig(classifier="c", data="a", out="b", rule="best").validate()
    with pytest.raises(ValueError, match="response_threshold"):
        PseudoConfig(classifier="c", data="a", out="b", response_threshold=1.5).validate()
    with pytest.raises(ValueError, match="refine"):
        PseudoConfig(classifier="c", data="a", out="b", refine="crf").validate()
    with pytest.raises(ValueError, match="differ"):
        PseudoConfig(classifier="c", data="a", out="a").validate()
    with pytest.raises(ValueError, match="cache-proposals"):   # the default rule computes no proposals to keep
        PseudoConfig(classifier="c", data="a", out="b", cache_proposals=True).validate()
    with pytest.raises(ValueError, match="unit-size"):
        PseudoConfig(classifier="c", data="a", out="b", unit_size=0).validate()
    with pytest.raises(ValueError, match="--readers"):
        PseudoConfig(classifier="c", data="a", out="b", readers=0).validate()
    with pytest.raises(FileNotFoundError, match="no complete shard"):
        os.makedirs(tmp_path / "empty")
        run_pseudo(PseudoConfig(classifier=classifier_file, data=str(tmp_path / "empty"), out=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_pseudo(PseudoConfig(classifier=classifier_file, data=str(tmp_path / "nowhere"), out=str(tmp_path / "o")))


@pytest.mark.parametrize("classes_from", ["labels", "predicted"])
def test_masker_instances_follow_the_class_choice(classes_from):
    from maskless.pseudo.classifier import PeakClassifier
    from maskless.pseudo.instances import MaskerOptions, PseudoMasker

    torch.manual_seed(0)
    model = PeakClassifier(3, backbone="tiny").eval()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    image[16:40, 20:50] = (230, 30, 30)
    masker = PseudoMasker(model, ["a", "b", "c"], {"image_size": 64},
                          MaskerOptions(classes_from=classes_from, class_threshold=-1e9))
    found = masker(image, ["b", "unknown"], SelectiveSearch(ks=(100,))(image))
    assert found, "every labelled class has at least one peak"
    if classes_from == "labels":
        assert {i["class"] for i in found} == {"b"}
    else:  # every class scores above -1e9, none above 1e9
        x = masker.transform(Image.fromarray(image))[None]
        assert masker.class_ids(["b"], x) == [0, 1, 2]
        masker.opts.class_threshold = 1e9
        assert masker.class_ids(["b"], x) == [] and masker(image, ["b"], SelectiveSearch(ks=(100,))(image)) == []
    for inst in found:
        m = rle.decode(inst["mask"])
        assert m.shape == (64, 64) and m.any() and 0 <= inst["peak"][0] < 64 and 0 <= inst["peak"][1] < 64
        assert inst["bbox"] == rle.bbox_xywh(inst["mask"])
    # the response rule needs no proposals, the proposal rules do
    masker.opts.class_threshold = -1e9
    masker.opts.rule = "response"
    assert masker(image, ["b"], None)
    masker.opts.rule = "prm"
    with pytest.raises(ValueError, match="pass them"):
        masker(image, ["b"], None)


def test_linked_groups_joins_chains_and_asks_each_pair_once():
    from maskless.core.linked import linked_groups

    asked = []

    def joined(i, j):
        asked.append((i, j))
        return (i, j) in {(0, 2), (2, 4), (1, 3)}

    group = linked_groups(6, joined)
    assert len(asked) == 15 and len(set(asked)) == 15 and all(i < j for i, j in asked)
    same = {(i, j) for i in range(6) for j in range(6) if group[i] == group[j]}
    assert {i for i in range(6) if group[i] == group[0]} == {0, 2, 4}  # 0-4 through 2
    assert {i for i in range(6) if group[i] == group[1]} == {1, 3} and (5, 5) in same
    assert len(set(group)) == 3 and linked_groups(0, joined) == []

"""Object proposals as region MASKS with an objectness proxy score, from a pluggable source.

Why the merging hierarchy is written here: opencv-contrib's selective search
(`cv2.ximgproc.segmentation.createSelectiveSearchSegmentation().process()`) returns rectangles only,
and the retrieval rules need masks. So we take opencv's Felzenszwalb graph segmentation (or skimage's
SLIC superpixels) as the base label map and rebuild the selective-search hierarchy ourselves: every
proposal is a union of base regions, stored as a row of a membership matrix, and its mask is
`members[labels]`. That representation also makes per-proposal sums (peak response inside a
proposal) a matrix product instead of N full-image masks.

Selective search and superpixel merging give no objectness score; two proxies from the hierarchy are
offered and measured (bench/pseudo.py):
  - "stability": how many merge steps a region survives before it is absorbed (a long-lived region
    is distinct from its surroundings), normalised to [0, 1];
  - "contrast": 1 - the (normalised) similarity at which the region is absorbed into its parent.
"""
from __future__ import annotations

import heapq
import io
from dataclasses import dataclass
from typing import Callable, Protocol

import cv2
import numpy as np

SCORES = ("stability", "contrast")
CACHE_ENTRY = "proposals.npz"


@dataclass
class Proposals:
    """Region proposals over one or more base label maps.

    base: (S, H, W) int32 label maps; which: (N,) index of the label map of each proposal;
    members: (N, R) bool, proposal n = union of regions r of base[which[n]] with members[n, r];
    scores: (N,) objectness proxy in [0, 1]; source: name + parameters, recorded with pseudo masks.
    """

    base: np.ndarray
    which: np.ndarray
    members: np.ndarray
    scores: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.base.shape[1]), int(self.base.shape[2])

    def mask(self, n: int) -> np.ndarray:
        return self.members[n][self.base[self.which[n]]]

    def masks(self, index: np.ndarray | list[int] | None = None) -> np.ndarray:
        """(K, H, W) bool masks of the proposals in `index` (all when None)."""
        idx = np.arange(len(self)) if index is None else np.asarray(index, dtype=int)
        out = np.empty((len(idx), *self.image_size), dtype=bool)
        for k, n in enumerate(idx):
            out[k] = self.mask(n)
        return out

    def region_sums(self, values: np.ndarray) -> np.ndarray:
        """Sum of a per-pixel HxW array inside each proposal, (N,), via per-region sums."""
        per_map = np.stack([np.bincount(b.ravel(), weights=values.ravel(), minlength=self.members.shape[1])
                            [: self.members.shape[1]] for b in self.base])
        return (self.members * per_map[self.which]).sum(axis=1)

    def areas(self) -> np.ndarray:
        return self.region_sums(np.ones(self.image_size))

    def to_bytes(self) -> bytes:
        """Compressed npz, the `proposals.npz` entry of a shard sample (a cache)."""
        buf = io.BytesIO()
        np.savez_compressed(buf, base=self.base, which=self.which, members=np.packbits(self.members, axis=1),
                            n_regions=self.members.shape[1], scores=self.scores, source=np.array(self.source))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Proposals":
        z = np.load(io.BytesIO(data))
        members = np.unpackbits(z["members"], axis=1, count=int(z["n_regions"])).astype(bool)
        return cls(z["base"], z["which"], members, z["scores"], str(z["source"]))


class ProposalSource(Protocol):
    """Anything that turns an RGB uint8 HxWx3 image into Proposals; `name` identifies it and its
    parameters (a cached entry is reused only when the names match)."""

    name: str

    def __call__(self, image: np.ndarray) -> Proposals: ...


# ---------------------------------------------------------------- region features and similarity

def _colour_space(image: np.ndarray, space: str) -> np.ndarray:
    if space == "rgb":
        return image
    if space == "hsv":
        return cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
    if space == "lab":
        return cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    raise ValueError(f"unknown colour space {space!r}; use rgb, hsv or lab")


def _histograms(labels: np.ndarray, codes: np.ndarray, n_regions: int, n_bins: int) -> np.ndarray:
    """Per-region histogram of integer pixel codes (H, W, K) in [0, n_bins), L1-normalised."""
    flat = labels.reshape(-1, 1).astype(np.int64) * n_bins + codes.reshape(labels.size, -1)
    hist = np.bincount(flat.ravel(), minlength=n_regions * n_bins).reshape(n_regions, n_bins).astype(np.float64)
    return hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)


def _colour_codes(image: np.ndarray, bins: int = 25) -> tuple[np.ndarray, int]:
    q = (image.astype(np.int64) * bins) // 256
    return q + np.arange(3) * bins, 3 * bins


def _texture_codes(image: np.ndarray, orientations: int = 8, bins: int = 10) -> tuple[np.ndarray, int]:
    """Selective search's texture: per channel, gradient magnitude binned per orientation."""
    codes = []
    for ch in range(3):
        c = cv2.GaussianBlur(image[..., ch].astype(np.float32), (0, 0), 1.0)
        gx, gy = cv2.Sobel(c, cv2.CV_32F, 1, 0), cv2.Sobel(c, cv2.CV_32F, 0, 1)
        mag, ang = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), 2 * np.pi)
        o = np.minimum((ang / (2 * np.pi) * orientations).astype(np.int64), orientations - 1)
        m = np.minimum((mag / max(float(mag.max()), 1e-6) * bins).astype(np.int64), bins - 1)
        codes.append(ch * orientations * bins + o * bins + m)
    return np.stack(codes, axis=-1), 3 * orientations * bins


def _adjacent_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        diff = a != b
        lo, hi = np.minimum(a[diff], b[diff]), np.maximum(a[diff], b[diff])
        pairs.update(zip(lo.tolist(), hi.tolist()))
    return pairs


def _boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 4) [y0, x0, y1, x1] inclusive boxes of the regions of a label map."""
    ys, xs = np.indices(labels.shape)
    flat = labels.ravel()
    box = np.empty((n, 4), dtype=np.int64)
    box[:, 0] = np.full(n, labels.shape[0]); box[:, 1] = np.full(n, labels.shape[1]); box[:, 2:] = -1
    np.minimum.at(box[:, 0], flat, ys.ravel()); np.minimum.at(box[:, 1], flat, xs.ravel())
    np.maximum.at(box[:, 2], flat, ys.ravel()); np.maximum.at(box[:, 3], flat, xs.ravel())
    return box


# ---------------------------------------------------------------- the merging hierarchy

def merge_hierarchy(labels: np.ndarray, features: dict[str, np.ndarray],
                    similarity: Callable[[dict, int, int, float], float]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Greedy hierarchical grouping over a region adjacency graph (selective search's algorithm).

    labels: HxW base label map 0..R-1; features: per-region arrays (first axis R) merged by
    size-weighted mean, except "size" (summed) and "box" (union); similarity(features, i, j, image_area).
    Returns members (2R-1, R) bool, the step at which each region was created and absorbed
    ((2R-1,) ints; the root is never absorbed: its value is the number of steps), and the similarity
    at which each region was absorbed (root: -inf).
    """
    n = int(labels.max()) + 1
    total = 2 * n - 1
    feats = {k: np.concatenate([v, np.zeros((total - n, *v.shape[1:]), dtype=v.dtype)]) for k, v in features.items()}
    members = np.zeros((total, n), dtype=bool)
    members[np.arange(n), np.arange(n)] = True
    created = np.zeros(total, dtype=np.int64)
    absorbed = np.zeros(total, dtype=np.int64)
    absorbed_sim = np.full(total, -np.inf)
    area = float(labels.size)
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    heap = []
    for i, j in _adjacent_pairs(labels):
        neighbours[i].add(j); neighbours[j].add(i)
        heap.append((-similarity(feats, i, j, area), i, j))
    heapq.heapify(heap)
    alive = np.zeros(total, dtype=bool)
    alive[:n] = True
    new = n
    while heap:
        neg, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue  # lazy deletion: a pair whose region was merged away
        si, sj = feats["size"][i], feats["size"][j]
        for k, v in feats.items():
            if k == "size":
                v[new] = si + sj
            elif k == "box":
                v[new] = [min(v[i][0], v[j][0]), min(v[i][1], v[j][1]), max(v[i][2], v[j][2]), max(v[i][3], v[j][3])]
            else:
                v[new] = (v[i] * si + v[j] * sj) / (si + sj)
        members[new] = members[i] | members[j]
        step = new - n + 1
        created[new] = step
        absorbed[i] = absorbed[j] = step
        absorbed_sim[i] = absorbed_sim[j] = -neg
        alive[i] = alive[j] = False
        alive[new] = True
        nb = (neighbours.pop(i) | neighbours.pop(j)) - {i, j}
        neighbours[new] = nb
        for k in nb:
            neighbours[k] -= {i, j}
            neighbours[k].add(new)
            heapq.heappush(heap, (-similarity(feats, k, new, area), k, new))
        new += 1
    # regions never absorbed (the root; several roots when the base map has disconnected parts) live to the end
    absorbed[alive] = new - n
    return members[:new], created[:new], absorbed[:new], absorbed_sim[:new]


def _objectness(created: np.ndarray, absorbed: np.ndarray, absorbed_sim: np.ndarray, score: str) -> np.ndarray:
    steps = max(int(absorbed.max()), 1)
    if score == "stability":
        return (absorbed - created) / steps
    if score == "contrast":
        finite = absorbed_sim[np.isfinite(absorbed_sim)]
        if finite.size == 0:
            return np.ones_like(absorbed_sim)
        lo, hi = float(finite.min()), float(finite.max())
        s = np.where(np.isfinite(absorbed_sim), absorbed_sim, lo)
        return 1.0 - (s - lo) / max(hi - lo, 1e-12)
    raise ValueError(f"unknown objectness proxy {score!r}; use one of {SCORES}")


def _hist_intersection(h: np.ndarray, i: int, j: int) -> float:
    return float(np.minimum(h[i], h[j]).sum())


SIMILARITIES = {
    "c": lambda f, i, j, a: _hist_intersection(f["colour"], i, j),
    "t": lambda f, i, j, a: _hist_intersection(f["texture"], i, j),
    "s": lambda f, i, j, a: 1.0 - (f["size"][i] + f["size"][j]) / a,
    "f": lambda f, i, j, a: 1.0 - (_box_area(f["box"], i, j) - f["size"][i] - f["size"][j]) / a,
}


def _box_area(box: np.ndarray, i: int, j: int) -> float:
    y0, x0 = min(box[i][0], box[j][0]), min(box[i][1], box[j][1])
    y1, x1 = max(box[i][2], box[j][2]), max(box[i][3], box[j][3])
    return float((y1 - y0 + 1) * (x1 - x0 + 1))


def _combined(terms: str) -> Callable:
    unknown = set(terms) - set(SIMILARITIES)
    if not terms or unknown:
        raise ValueError(f"similarity {terms!r}: use letters from 'ctsf' (colour, texture, size, fill)")
    fns = [SIMILARITIES[t] for t in terms]
    return lambda f, i, j, a: sum(fn(f, i, j, a) for fn in fns)


def _hierarchy_proposals(labels_list: list[np.ndarray], runs: list[tuple[int, Callable, dict]],
                         score: str, source: str) -> Proposals:
    """Run merge_hierarchy per (label map index, colour image, similarity, features) and stack the
    results, dropping duplicate region sets of one label map."""
    r_max = max(int(l.max()) + 1 for l in labels_list)
    which, members, scores, seen = [], [], [], set()
    for map_index, sim, feats in runs:
        m, created, absorbed, absorbed_sim = merge_hierarchy(labels_list[map_index], feats, sim)
        obj = _objectness(created, absorbed, absorbed_sim, score)
        for row, s in zip(m, obj):
            key = (map_index, np.packbits(row).tobytes())
            if key in seen:
                continue
            seen.add(key)
            padded = np.zeros(r_max, dtype=bool)
            padded[: len(row)] = row
            which.append(map_index); members.append(padded); scores.append(float(s))
    return Proposals(np.stack(labels_list).astype(np.int32), np.asarray(which, dtype=np.int32),
                     np.stack(members), np.asarray(scores, dtype=np.float32), source)


def _features(image: np.ndarray, labels: np.ndarray, space: str, terms: str) -> dict[str, np.ndarray]:
    n = int(labels.max()) + 1
    img = _colour_space(image, space)
    feats = {"size": np.bincount(labels.ravel(), minlength=n).astype(np.float64), "box": _boxes(labels, n)}
    if "c" in terms:
        codes, nb = _colour_codes(img)
        feats["colour"] = _histograms(labels, codes, n, nb)
    if "t" in terms:
        codes, nb = _texture_codes(img)
        feats["texture"] = _histograms(labels, codes, n, nb)
    return feats


# ---------------------------------------------------------------- the two sources

class SelectiveSearch:
    """Selective search with masks: opencv's Felzenszwalb graph segmentation at each scale `k`, then
    hierarchical grouping per strategy "SPACE:TERMS" (e.g. "hsv:ctsf", "lab:tsf"). The defaults were
    picked on the synthetic world: a min_size of 50 px instead of 20 trades a little best-case overlap
    for far fewer fragments among the 100 proposals the rules consider."""

    def __init__(self, ks: tuple[int, ...] = (100, 200, 400), sigma: float = 0.8, min_size: int = 50,
                 strategies: tuple[str, ...] = ("hsv:ctsf", "lab:tsf"), score: str = "stability"):
        if score not in SCORES:
            raise ValueError(f"unknown objectness proxy {score!r}; use one of {SCORES}")
        for s in strategies:
            space, _, terms = s.partition(":")
            _colour_space(np.zeros((1, 1, 3), np.uint8), space)
            _combined(terms)
        self.ks, self.sigma, self.min_size, self.strategies, self.score = tuple(ks), sigma, min_size, tuple(strategies), score
        self.name = (f"selective_search(k={list(self.ks)},sigma={sigma},min_size={min_size},"
                     f"strategies={list(self.strategies)},score={score})")

    def __call__(self, image: np.ndarray) -> Proposals:
        labels_list, runs = [], []
        for k in self.ks:
            seg = cv2.ximgproc.segmentation.createGraphSegmentation(self.sigma, float(k), self.min_size)
            labels = seg.processImage(cv2.cvtColor(image, cv2.COLOR_RGB2BGR)).astype(np.int64)
            labels_list.append(labels)
            for s in self.strategies:
                space, _, terms = s.partition(":")
                runs.append((len(labels_list) - 1, _combined(terms), _features(image, labels, space, terms)))
        return _hierarchy_proposals(labels_list, runs, self.score, self.name)


class SuperpixelMerging:
    """SLIC superpixels merged greedily by mean Lab colour similarity plus a size term (small regions
    merge first, as in selective search), every intermediate region a proposal."""

    def __init__(self, n_segments: int = 80, compactness: float = 10.0, score: str = "stability"):
        if score not in SCORES:
            raise ValueError(f"unknown objectness proxy {score!r}; use one of {SCORES}")
        self.n_segments, self.compactness, self.score = n_segments, compactness, score
        self.name = f"superpixel(n={n_segments},compactness={compactness},score={score})"

    def __call__(self, image: np.ndarray) -> Proposals:
        from skimage.segmentation import slic

        labels = slic(image, n_segments=self.n_segments, compactness=self.compactness, start_label=0,
                      channel_axis=-1).astype(np.int64)
        _, labels = np.unique(labels, return_inverse=True)
        labels = labels.reshape(image.shape[:2])
        n = int(labels.max()) + 1
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float64)
        size = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
        mean = np.stack([np.bincount(labels.ravel(), weights=lab[..., c].ravel(), minlength=n) for c in range(3)], 1)
        feats = {"size": size, "box": _boxes(labels, n), "mean": mean / np.maximum(size[:, None], 1)}

        def sim(f, i, j, a):
            colour = 1.0 - min(float(np.linalg.norm(f["mean"][i] - f["mean"][j])) / 100.0, 1.0)
            return colour + SIMILARITIES["s"](f, i, j, a)

        return _hierarchy_proposals([labels], [(0, sim, feats)], self.score, self.name)


SOURCES = ("selective_search", "superpixel")


def make_source(name: str, score: str = "stability") -> ProposalSource:
    """The proposal source called `name` (one of SOURCES) with default parameters."""
    if name == "selective_search":
        return SelectiveSearch(score=score)
    if name == "superpixel":
        return SuperpixelMerging(score=score)
    raise ValueError(f"unknown proposal source {name!r}; use one of {SOURCES}")


def cached_or_compute(source: ProposalSource, image: np.ndarray, extra: dict[str, bytes]) -> tuple[Proposals, bool]:
    """Proposals from a sample's cached `proposals.npz` when it was made by the same source on an
    image of this size, else computed now. Returns (proposals, reused)."""
    data = extra.get(CACHE_ENTRY)
    if data is not None:
        p = Proposals.from_bytes(data)
        if p.source == source.name and p.image_size == tuple(image.shape[:2]):
            return p, True
    return source(image), False


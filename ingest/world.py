"""The synthetic world: a small PASCAL VOC-format dataset drawn from a seed.

It is the embedded default of the demo and the tests: no download, deterministic, and hard in the
ways that matter for instance segmentation from image tags:
- classes differ in shape *and* texture, so a classifier has something to learn;
- same-class instances touch and occlude each other, so a method that only finds blobs
  (connected components of a class map) merges them and fails;
- objects vary in scale, and the background is cluttered with textured distractor shapes.

Written in VOC's layout (JPEGImages, SegmentationObject, SegmentationClass palette PNGs with 255 on
instance borders, Annotations XML, ImageSets/Segmentation), plus classes.txt, so the same importer
reads it and PASCAL VOC.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from xml.etree import ElementTree as ET

import cv2
import numpy as np
from PIL import Image

from maskless.core import storage

# (name, shape, texture) per class, in class-index order (index 1 = first entry).
CLASS_STYLES: list[tuple[str, str, str]] = [
    ("disc", "disc", "stripes"),
    ("square", "square", "checker"),
    ("triangle", "triangle", "dots"),
    ("star", "star", "rings"),
    ("cross", "cross", "grid"),
    ("hexagon", "hexagon", "diagonal"),
    ("moon", "moon", "waves"),
    ("bar", "bar", "speckle"),
]
MAX_CLASSES = len(CLASS_STYLES)
VOID = 255


def voc_palette() -> list[int]:
    """PASCAL VOC's 256-colour palette (bit-interleaved label -> RGB), flattened for PIL."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _shape_mask(shape: str, h: int, w: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """Filled binary mask of one shape of radius r centred at (cy, cx), rotated by angle (radians)."""
    canvas = np.zeros((h, w), np.uint8)

    def poly(points: np.ndarray) -> None:
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = points @ rot.T * r + np.array([cx, cy])
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1)

    def regular(n: int, inner: float | None = None) -> np.ndarray:
        k = n * (2 if inner else 1)
        t = np.arange(k) * 2 * np.pi / k
        rad = np.ones(k) if inner is None else np.where(np.arange(k) % 2 == 0, 1.0, inner)
        return np.stack([np.cos(t) * rad, np.sin(t) * rad], 1)

    if shape == "disc":
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(r)), 1, -1)
    elif shape == "square":
        poly(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8)
    elif shape == "triangle":
        poly(regular(3))
    elif shape == "star":
        poly(regular(5, inner=0.45))
    elif shape == "cross":
        a, b = 1.0, 0.35
        poly(np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a],
                       [-b, b], [-a, b], [-a, -b], [-b, -b]]))
    elif shape == "hexagon":
        poly(regular(6))
    elif shape == "moon":
        cv2.circle(canvas, (int(round(cx)), int(round(cy))), int(round(r)), 1, -1)
        off = 0.5 * r
        cv2.circle(canvas, (int(round(cx + off * np.cos(angle))), int(round(cy + off * np.sin(angle)))),
                   int(round(0.8 * r)), 0, -1)
    elif shape == "bar":
        poly(np.array([[-1, -0.3], [1, -0.3], [1, 0.3], [-1, 0.3]]))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return canvas.astype(bool)


def _texture(kind: str, h: int, w: int, rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """An HxWx3 float image in [0, 255]: the class's texture in its colour family."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5, 8)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        t = np.sin(2 * np.pi * yy / period + phase) > 0
    elif kind == "checker":
        t = ((xx // (period / 1.5)).astype(int) + (yy // (period / 1.5)).astype(int)) % 2 == 0
    elif kind == "dots":
        t = (np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.5
    elif kind == "rings":
        t = np.sin(np.hypot(xx - w / 2, yy - h / 2) * 2 * np.pi / period + phase) > 0
    elif kind == "grid":
        t = (np.abs(np.sin(np.pi * xx / period)) < 0.3) | (np.abs(np.sin(np.pi * yy / period)) < 0.3)
    elif kind == "diagonal":
        t = np.sin(2 * np.pi * (xx + yy) / period + phase) > 0
    elif kind == "waves":
        t = np.sin(2 * np.pi * yy / period + 2 * np.sin(2 * np.pi * xx / (3 * period))) > 0
    else:  # speckle
        t = rng.random((h, w)) > 0.5
    light = np.clip(base * 1.0 + 60, 0, 255)
    dark = np.clip(base * 0.45, 0, 255)
    return np.where(t[..., None], light, dark)


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Cluttered background: smooth colour noise plus textured distractor strokes of random colours."""
    low = rng.uniform(40, 200, (4, 4, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 12, (h, w, 3))
    for _ in range(rng.integers(3, 8)):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        p1 = tuple(int(v) for v in rng.integers(0, [w, h]))
        p2 = tuple(int(v) for v in rng.integers(0, [w, h]))
        cv2.line(img, p1, p2, colour, int(rng.integers(1, 3)))
    return np.clip(img, 0, 255)


@dataclass
class _Instance:
    class_index: int  # 1-based
    mask: np.ndarray  # full (un-occluded) shape


def _draw_image(rng: np.random.Generator, size: int, n_classes: int, colours: np.ndarray):
    h = w = size
    img = _background(h, w, rng)
    n = int(rng.integers(1, 6))
    present = rng.choice(np.arange(1, n_classes + 1), size=min(n_classes, int(rng.integers(1, 3))), replace=False)
    instances: list[_Instance] = []
    for i in range(n):
        c = int(rng.choice(present))
        _, shape, _ = CLASS_STYLES[c - 1]
        r = float(rng.uniform(0.11, 0.22) * size)
        same = [p for p in instances if p.class_index == c]
        if same and rng.random() < 0.7:
            # Place it touching (or slightly overlapping) an instance of the same class.
            ys, xs = np.nonzero(same[-1].mask)
            cy0, cx0 = ys.mean(), xs.mean()
            r0 = np.sqrt(same[-1].mask.sum() / np.pi)
            theta = rng.uniform(0, 2 * np.pi)
            d = (r0 + r) * rng.uniform(0.8, 0.95)
            cy, cx = cy0 + d * np.sin(theta), cx0 + d * np.cos(theta)
        else:
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        mask = _shape_mask(shape, h, w, cy, cx, r, float(rng.uniform(0, 2 * np.pi)))
        if mask.sum() < 30:
            continue
        instances.append(_Instance(c, mask))
    # Paint in order; later instances occlude earlier ones. Each instance gets its own texture phase.
    object_map = np.zeros((h, w), np.uint8)
    for idx, inst in enumerate(instances, start=1):
        _, _, texture = CLASS_STYLES[inst.class_index - 1]
        base = colours[inst.class_index - 1] * rng.uniform(0.8, 1.2)
        tex = _texture(texture, h, w, rng, base)
        img[inst.mask] = tex[inst.mask]
        object_map[inst.mask] = idx
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, object_map, [inst.class_index for inst in instances]


def _finish_maps(object_map: np.ndarray, classes: list[int], min_pixels: int):
    """Renumber visible instances 1..n, mark VOC's void band (255) on every instance border,
    and build the class map. Returns (object PNG array, class PNG array, [(class_index, bbox)])."""
    kernel = np.ones((3, 3), np.uint8)
    border = cv2.dilate(object_map, kernel) != cv2.erode(object_map, kernel)
    obj = np.zeros_like(object_map)
    cls = np.zeros_like(object_map)
    kept, slivers = [], np.zeros_like(border)
    for old_id, c in enumerate(classes, start=1):
        visible = object_map == old_id
        if (visible & ~border).sum() < min_pixels:
            slivers |= visible  # nearly hidden: too ambiguous to be an instance, void as VOC does
            continue
        new_id = len(kept) + 1
        kept.append(c)
        obj[visible] = new_id
        cls[visible] = c
    void = (border & ((obj > 0) | (cv2.dilate(obj, kernel) > 0))) | slivers
    obj[void] = VOID
    cls[void] = VOID
    boxes = []  # VOC boxes, 1-based inclusive, of each instance's pixels as its mask shows them
    for new_id, c in enumerate(kept, start=1):
        ys, xs = np.nonzero(obj == new_id)
        boxes.append((c, (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1)))
    return obj, cls, boxes


def _annotation_xml(image_id: str, w: int, h: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "maskless-world"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, val in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(val)
    ET.SubElement(root, "segmented").text = "1"
    for name, (x1, y1, x2, y2) in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = name
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = "0"
        box = ET.SubElement(o, "bndbox")
        for tag, val in (("xmin", x1), ("ymin", y1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(val)
    return ET.tostring(root, encoding="utf-8")


def class_names(n_classes: int) -> list[str]:
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"the world has 1 to {MAX_CLASSES} classes, not {n_classes}")
    return [name for name, _, _ in CLASS_STYLES[:n_classes]]


def make_world(out: str, classes: int = 3, images: int = 40, seed: int = 0, size: int = 128,
               val_fraction: float = 0.25, quality: int = 92) -> dict:
    """Write a synthetic VOC-format world to `out` (a path or URI) and return its summary.

    Deterministic: the same arguments give byte-identical files. Rerunning into an existing world
    with the same arguments rewrites the same files (atomic writes), so a killed run is finished by a rerun.
    """
    names = class_names(classes)
    if images < 2:
        raise ValueError("the world needs at least 2 images (one train, one val)")
    if size < 48:
        raise ValueError("image size must be at least 48 px")
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be between 0 and 1")
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        storage.makedirs(storage.join(out, *sub.split("/")))
    palette = voc_palette()
    colour_rng = np.random.default_rng(seed + 7919)
    colours = colour_rng.uniform(60, 200, (classes, 3))
    ids, counts = [], np.zeros(classes, int)
    for i in range(images):
        rng = np.random.default_rng([seed, i])
        image_id = f"world_{i:06d}"
        while True:
            img, object_map, inst_classes = _draw_image(rng, size, classes, colours)
            obj, cls, kept = _finish_maps(object_map, inst_classes, min_pixels=max(12, size * size // 800))
            if kept:
                break
        for c, _ in kept:
            counts[c - 1] += 1
        def png(arr: np.ndarray) -> bytes:
            im = Image.fromarray(arr, mode="P")
            im.putpalette(palette)
            return _encode(im, "PNG")
        storage.write_bytes_atomic(storage.join(out, "JPEGImages", image_id + ".jpg"),
                                   _encode(Image.fromarray(img), "JPEG", quality=quality))
        storage.write_bytes_atomic(storage.join(out, "SegmentationObject", image_id + ".png"), png(obj))
        storage.write_bytes_atomic(storage.join(out, "SegmentationClass", image_id + ".png"), png(cls))
        storage.write_bytes_atomic(storage.join(out, "Annotations", image_id + ".xml"),
                                   _annotation_xml(image_id, size, size, [(names[c - 1], b) for c, b in kept]))
        ids.append(image_id)
    n_val = max(1, int(round(images * val_fraction)))
    split = {"train": ids[:-n_val], "val": ids[-n_val:], "trainval": ids}
    for name, members in split.items():
        storage.write_bytes_atomic(storage.join(out, "ImageSets", "Segmentation", f"{name}.txt"),
                                   ("\n".join(members) + "\n").encode())
    storage.write_bytes_atomic(storage.join(out, "classes.txt"), ("\n".join(names) + "\n").encode())
    root = out if "://" in out else os.path.abspath(out)
    summary = {"root": root, "classes": names, "images": images, "train": len(split["train"]),
               "val": len(split["val"]), "instances": int(counts.sum()),
               "instances_per_class": dict(zip(names, counts.tolist())), "seed": seed, "size": size}
    storage.write_json_atomic(storage.join(out, "world.json"), summary)
    return summary


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()

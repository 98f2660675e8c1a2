"""`maskless predict`: instance masks of an exported model on images (COCO RLE JSON + overlay PNGs),
and predict_dataset, the same inference over a shard dataset for evaluation."""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import pyarrow.fs as pafs
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from maskless.core import masks as rle
from maskless.core import shards, storage
from maskless.train.maskrcnn import load_model

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SUMMARY_FILE = "summary.json"


@dataclass
class PredictConfig:
    images: list[str] = field(default_factory=list, metadata={"help": "image files or folders of images"})
    model: str = field(default="", metadata={"help": "exported model file (RUN/model.pt of `maskless train`)"})
    out: str = field(default="", metadata={"help": "output folder: NAME.json (RLE instances) and NAME.png per image"})
    score_threshold: float = field(default=0.5, metadata={"help": "keep detections scored at least this"})
    mask_threshold: float = field(default=0.5, metadata={"help": "mask probability at which a pixel is in"})
    batch_size: int = field(default=4, metadata={"help": "images per forward pass"})
    device: str = field(default="auto", metadata={"help": "where to run", "choices": ["auto", "cpu", "cuda"]})
    overlay: bool = field(default=True, metadata={"help": "also write an overlay PNG per image"})

    def validate(self) -> None:
        if not self.images:
            raise ValueError("predict needs IMAGES: image files or folders")
        if not self.model:
            raise ValueError("predict needs --model: an exported model file (RUN/model.pt)")
        if not self.out:
            raise ValueError("predict needs --out: the output folder")
        if not 0.0 <= self.score_threshold <= 1.0 or not 0.0 < self.mask_threshold < 1.0:
            raise ValueError("--score-threshold must be in [0, 1] and --mask-threshold in (0, 1)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no GPU here: use --device cpu")
    return torch.device(name)


def decode(data: bytes, what: str) -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB CHW tensor, or a ValueError naming the image."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{what} is not a readable image: {e}") from e


@torch.inference_mode()
def detect(model: torch.nn.Module, images: list[torch.Tensor], device: torch.device, score_threshold: float,
           mask_threshold: float = 0.5) -> list[list[tuple[int, float, torch.Tensor]]]:
    """(label index into classes, score, bool HxW mask at the image's own size) per kept detection."""
    outputs = model([im.to(device).float().div_(255) for im in images])
    results = []
    for out in outputs:
        keep = out["scores"] >= score_threshold
        masks = (out["masks"][keep, 0] >= mask_threshold).cpu()
        results.append([(int(l) - 1, float(s), m) for l, s, m in
                        zip(out["labels"][keep].tolist(), out["scores"][keep].tolist(), masks)])
    return results


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_dataset(model: torch.nn.Module, classes: list[str], root: str, score_threshold: float = 0.05,
                    batch_size: int = 4, device: str | None = None, mask_threshold: float = 0.5) -> list[dict]:
    """COCO-result dicts {"image_id": key, "category": name, "segmentation": RLE, "score"} for every
    image of a shard dataset (masks pasted at the image's size and cut at mask_threshold).
    Detections under the model's own box_score_thresh (torchvision default 0.05) never appear."""
    dev = _device(device)
    model = model.to(dev).eval()
    results = []
    for batch in _batches(shards.read_dataset(root), batch_size):
        images = [decode(s.jpg, f"sample {s.key} of {root}") for s in batch]
        for s, dets in zip(batch, detect(model, images, dev, score_threshold, mask_threshold)):
            results += [{"image_id": s.key, "category": classes[c], "segmentation": rle.encode(m.numpy()),
                         "score": score} for c, score, m in dets]
    return results


def image_files(inputs: list[str]) -> list[str]:
    """The image files named by inputs (folders expand to their images, sorted); errors for missing paths."""
    files = []
    for path in inputs:
        if not storage.exists(path):
            raise FileNotFoundError(f"image or folder {path} does not exist")
        fs, p = storage.resolve(path)
        if fs.get_file_info(p).type == pafs.FileType.Directory:
            found = [storage.join(path, n) for n in storage.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise FileNotFoundError(f"folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        else:
            files.append(path)
    return files


def _output_names(files: list[str]) -> list[str]:
    names = [os.path.splitext(os.path.basename(f.rstrip("/")))[0] for f in files]
    seen: dict[str, str] = {}
    for f, n in zip(files, names):
        if n in seen:
            raise ValueError(f"{seen[n]} and {f} would both write {n}.json: predict them into separate --out folders")
        seen[n] = f
    return names


def overlay(image: torch.Tensor, masks: list[torch.Tensor], instances: list[dict]) -> bytes:
    """PNG bytes of the image with each instance's mask tinted and its box labelled."""
    if instances:
        image = draw_segmentation_masks(image, torch.stack(masks), alpha=0.5)
        boxes = torch.tensor([i["bbox"] for i in instances])
        boxes[:, 2:] += boxes[:, :2]
        image = draw_bounding_boxes(image, boxes, labels=[f"{i['class']} {i['score']:.2f}" for i in instances])
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def run_predict(cfg: PredictConfig) -> dict:
    """Write OUT/NAME.json (and NAME.png) per image; a rerun skips images already written."""
    cfg.validate()
    files = image_files(cfg.images)
    names = _output_names(files)
    model, classes, _ = load_model(cfg.model)
    device = _device(cfg.device)
    model.to(device)
    storage.makedirs(cfg.out)
    storage.remove_stale_temps(cfg.out)

    def done(name: str) -> bool:
        return storage.exists(storage.join(cfg.out, name + ".json")) and (
            not cfg.overlay or storage.exists(storage.join(cfg.out, name + ".png")))

    from tqdm import tqdm  # here, not at the top: bench/gpu.py imports detect() on a bare GPU machine

    todo = [(f, n) for f, n in zip(files, names) if not done(n)]
    instances = 0
    for batch in tqdm(list(_batches(todo, cfg.batch_size)), desc="predict", disable=None):
        images = [decode(storage.read_bytes(f), f) for f, _ in batch]
        for (f, n), image, dets in zip(batch, images, detect(model, images, device, cfg.score_threshold,
                                                             cfg.mask_threshold)):
            h, w = image.shape[-2:]
            record = {"image": f, "width": int(w), "height": int(h), "model": cfg.model, "instances": []}
            for c, score, m in dets:
                mask = rle.encode(m.numpy())
                record["instances"].append({"class": classes[c], "score": score, "mask": mask,
                                            "bbox": rle.bbox_xywh(mask)})
            instances += len(dets)
            if cfg.overlay:
                storage.write_bytes_atomic(storage.join(cfg.out, n + ".png"),
                                           overlay(image, [m for _, _, m in dets], record["instances"]))
            storage.write_json_atomic(storage.join(cfg.out, n + ".json"), record)
    summary = {"stage": "predict", "out": cfg.out, "model": cfg.model, "classes": classes, "images": len(files),
               "predicted": len(todo), "skipped_done": len(files) - len(todo), "instances": instances,
               "score_threshold": cfg.score_threshold, "device": device.type}
    storage.write_json_atomic(storage.join(cfg.out, SUMMARY_FILE), summary)
    return summary

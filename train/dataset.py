"""Training samples from shards: an index of byte ranges, a map-style Dataset, per-rank batches.

Why an index instead of streaming the tars: random access by byte offset gives a true shuffle of the
whole dataset every epoch, exactly equal batch counts on every rank (DDP needs them), and a resume at
any step that skips the batches already trained without reading a single image. Building it reads the
tar headers and only the small annotation entries, once, on the driver.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler
from torchvision.io import ImageReadMode, decode_image

from maskless.core import masks as rle
from maskless.core import shards, storage

MASK_SOURCES = ("pseudo", "gt")


@dataclass(frozen=True)
class Entry:
    """Where one training image and its annotation live, and how many instances it keeps."""

    shard: str
    key: str
    jpg: tuple[int, int]  # (offset, size) inside the tar
    ann: tuple[int, int] | None
    width: int
    height: int
    instances: int


def _read_range(f, span: tuple[int, int]) -> bytes:
    f.seek(span[0])
    return f.read(span[1])


def keep_instances(ann: dict, classes: list[str], score_threshold: float) -> list[dict]:
    """The instances a model trains on: known class, score at or above the threshold, a box of >= 1 px."""
    kept = []
    for inst in ann.get("instances", []):
        if inst["class"] not in classes:
            raise ValueError(f"instance of class {inst['class']!r} is not in the dataset classes {classes}: "
                             f"the shards and dataset.json disagree (rerun the stage that wrote them)")
        if float(inst.get("score", 1.0)) < score_threshold:
            continue
        x, y, w, h = inst.get("bbox") or rle.bbox_xywh(inst["mask"])
        if w >= 1 and h >= 1:
            kept.append(inst)
    return kept


def build_index(root: str, masks: str = "pseudo", score_threshold: float = 0.0,
                keep_empty: bool = False) -> tuple[list[Entry], list[str], dict[str, int]]:
    """(entries, classes, counts) of a shard dataset for training on its `masks` annotations."""
    if masks not in MASK_SOURCES:
        raise ValueError(f"masks must be one of {MASK_SOURCES}, got {masks!r}")
    classes = list(shards.read_dataset_info(root)["classes"])
    manifest = shards.read_manifest(root).to_pydict()
    sizes = {k: (w, h) for k, w, h in zip(manifest["key"], manifest["width"], manifest["height"])}
    entries: list[Entry] = []
    counts = {"images": 0, "missing": 0, "empty": 0, "instances": 0, "below_threshold": 0}
    ext = f"{masks}.json"
    for shard in shards.list_shards(root):
        fs, path = storage.resolve(shard)
        with fs.open_input_file(path) as f:
            for sample in shards.index_tar(shard):
                key, members = sample.key, sample.members
                if "jpg" not in members:
                    continue
                counts["images"] += 1
                span = members.get(ext)
                kept = []
                if span is None:
                    counts["missing"] += 1
                else:
                    ann = json.loads(_read_range(f, span))
                    kept = keep_instances(ann, classes, score_threshold)
                    counts["below_threshold"] += len(ann.get("instances", [])) - len(kept)
                if not kept:
                    counts["empty"] += 1
                    if not keep_empty:
                        continue
                counts["instances"] += len(kept)
                w, h = sizes.get(key, (0, 0))
                entries.append(Entry(shard, key, members["jpg"], span, int(w or 0), int(h or 0), len(kept)))
    if counts["images"] and counts["missing"] == counts["images"]:
        hint = "run `maskless pseudo` on it first, or train on --masks gt" if masks == "pseudo" else \
            "it has no ground truth: train on --masks pseudo"
        raise ValueError(f"no sample of {root} has {ext}: {hint}")
    if not entries:
        raise ValueError(f"{root}: no image left to train on ({counts}); lower --score-threshold, "
                         f"or pass --keep-empty to train on images without instances")
    return entries, classes, counts


class ShardDataset(Dataset):
    """Map-style dataset over an index: item (i, flip) -> (image float CHW in [0, 1], target dict)."""

    def __init__(self, entries: list[Entry], classes: list[str], score_threshold: float = 0.0):
        self.entries, self.classes, self.score_threshold = entries, classes, score_threshold
        self._files: dict[str, Any] = {}  # opened lazily in each loader process (file handles don't pickle)

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def _file(self, shard: str):
        if shard not in self._files:
            fs, path = storage.resolve(shard)
            self._files[shard] = fs.open_input_file(path)
        return self._files[shard]

    def __getitem__(self, item: int | tuple[int, bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, flip = item if isinstance(item, tuple) else (item, False)
        e = self.entries[index]
        f = self._file(e.shard)
        data = torch.frombuffer(bytearray(_read_range(f, e.jpg)), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB)
        h, w = image.shape[-2:]
        insts = keep_instances(json.loads(_read_range(f, e.ann)), self.classes, self.score_threshold) if e.ann \
            else []
        if insts:
            m = np.stack([rle.decode(i["mask"]) for i in insts])
            if m.shape[1:] != (h, w):
                raise ValueError(f"sample {e.key} in {e.shard}: mask size {m.shape[1:]} is not the image's {(h, w)}")
            mask_t = torch.from_numpy(m.astype(np.uint8))
            boxes = torch.tensor([i.get("bbox") or rle.bbox_xywh(i["mask"]) for i in insts], dtype=torch.float32)
            boxes[:, 2:] += boxes[:, :2]
        else:
            mask_t = torch.zeros((0, h, w), dtype=torch.uint8)
            boxes = torch.zeros((0, 4), dtype=torch.float32)
        labels = torch.tensor([self.classes.index(i["class"]) + 1 for i in insts], dtype=torch.int64)
        if flip:
            image, mask_t = image.flip(-1), mask_t.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        target = {"boxes": boxes, "labels": labels, "masks": mask_t}
        return image.float().div_(255), target


def collate(batch: list) -> tuple[tuple, tuple]:
    """Images of different sizes stay a list: the model's transform resizes and pads them."""
    return tuple(zip(*batch))


def rank_batches(entries: list[Entry], batch_size: int, rank: int, world: int, epoch: int, seed: int = 0,
                 hflip: float = 0.5, group_aspect: bool = True) -> list[list[tuple[int, bool]]]:
    """One rank's batches of one epoch: [(index, flip), ...] lists, the same count on every rank.

    A DistributedSampler built here (Ray's prepare_data_loader would replace any custom batching)
    splits the shuffled indices evenly; batches are then grouped by orientation so padding wastes
    little, as torchvision's reference does; the last incomplete batch is dropped. Flips are drawn from
    (seed, epoch), so a resumed epoch repeats the same batches.
    """
    sampler = DistributedSampler(entries, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch * 7919 + rank)
    flips = (torch.rand(len(order), generator=g) < hflip).tolist()
    batches, pending = [], {True: [], False: []}
    for i, flip in zip(order, flips):
        group = pending[entries[i].width >= entries[i].height] if group_aspect else pending[True]
        group.append((i, flip))
        if len(group) == batch_size:
            batches.append(list(group))
            group.clear()
    rest = pending[True] + pending[False]
    batches += [rest[k:k + batch_size] for k in range(0, len(rest) - batch_size + 1, batch_size)]
    return batches


def steps_per_epoch(n_entries: int, batch_size: int, world: int) -> int:
    """Batches each rank runs per epoch (DistributedSampler pads to an even split, the last partial batch drops)."""
    return (-(-n_entries // world)) // batch_size

"""What a model that learned nothing scores, for tests that must show a run learned something."""
from __future__ import annotations

import random

import numpy as np

from maskless.core import masks
from maskless.core.metrics import GroundTruth


def chance_predictions(gt: GroundTruth, classes: list[str], per_image: int = 20, seed: int = 0) -> list[dict]:
    """Random rectangles of random classes and scores, `per_image` in every image of `gt`."""
    rng, out = random.Random(seed), []
    for key, (h, w) in zip(gt.keys, gt.sizes):
        for _ in range(per_image):
            x0, y0 = rng.randrange(w // 2), rng.randrange(h // 2)
            m = np.zeros((h, w), bool)
            m[y0:y0 + rng.randrange(8, h // 2), x0:x0 + rng.randrange(8, w // 2)] = True
            out.append({"image_id": key, "category": rng.choice(classes), "segmentation": masks.encode(m),
                        "score": rng.random()})
    return out

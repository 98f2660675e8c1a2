"""Test-wide fixtures: one small local Ray for the whole session (start-up costs seconds)."""
import os

import pytest

from maskless.core.resources import use_ray_train_env

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
use_ray_train_env()  # before any test starts a Ray of its own, as the CLI does


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray with 4 logical CPUs on this 2-core machine (actor pools of 1-CPU actors would
    otherwise starve Ray Data's read tasks), no dashboard, quiet logs."""
    import ray

    from maskless.ray_runtime import init_ray

    init_ray(num_cpus=4, temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A VOC-format synthetic world: 3 classes, 24 images of 96 px (18 train, 6 val)."""
    from maskless.ingest.world import make_world

    root = tmp_path_factory.mktemp("world")
    make_world(str(root), classes=3, images=24, seed=0, size=96)
    return str(root)


@pytest.fixture(scope="session")
def world_shards(tiny_world, tmp_path_factory):
    """The tiny world's train and val splits imported as shards with gt.json."""
    from maskless.ingest.voc import import_voc

    out = tmp_path_factory.mktemp("world_shards")
    train = import_voc(tiny_world, str(out / "train"), split="train", shard_size=6)
    import_voc(tiny_world, str(out / "val"), split="val", shard_size=6)
    return {"train": str(out / "train"), "val": str(out / "val"), "classes": train["classes"]}


# The files whose tests take longest (train Mask R-CNN or a classifier, start clusters), longest first.
SLOW_FIRST = ("test_train.py", "test_pseudo.py", "test_cluster.py", "test_run.py", "test_classifier.py",
              "test_crawl.py", "test_ablate.py")


def pytest_collection_modifyitems(items):
    """Longest files first (stable within a file): `make test` runs whole files on pytest-xdist
    workers in collection order, so the suite ends on short files instead of waiting on one long one."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


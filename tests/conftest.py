"""Test-wide fixtures: one small local Ray for the whole session (start-up costs seconds)."""
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A local Ray with 4 logical CPUs on this 2-core machine (actor pools of 1-CPU actors would
    otherwise starve Ray Data's read tasks), no dashboard, quiet logs."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=False)
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

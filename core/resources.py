"""What a stage's Ray tasks, actors and training workers ask for, so that a cluster routes them to
the right node type (cluster.yaml, cluster-local.yaml) and a laptop runs them all the same.

The node types of cluster.yaml carry one unit of a custom resource as a tag: `crawl` on the CPU
workers, `gpu_stage` on the GPU workers. Work asks for a small share of the tag, so the tag picks
the node type while CPUs and GPUs bound how much runs at once. On a machine without the tags
nothing extra is asked for. An autoscaling cluster with no node of a type yet cannot be detected
that way: pass the resources explicitly, and the autoscaler starts a node type that offers them.
"""
from __future__ import annotations

CRAWL = "crawl"          # tag of the CPU worker type: crawl tasks
GPU_STAGE = "gpu_stage"  # tag of the GPU worker type: pseudo-mask actors, classifier and Mask R-CNN workers
ROUTE_SHARE = 0.001      # share of a tag one task asks for: at most 1,000 per node, CPUs/GPUs bind first
# Ray Train's health check polls the workers every 0.25 s instead of its default: a fit notices its workers'
# start and end sooner (bench/ray_train.py measures each setting's fixed cost per fit). Ray Train reads these
# from the driver's environment at each fit and forwards them to its controller and workers.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# Ray Train's preemption watcher: a 0-CPU actor per worker group that polls Ray for nodes being drained (an
# autoscaler reclaiming a spot node), so that `ray.train.get_preemption_info()` tells the workers to checkpoint.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def use_ray_train_env(local_ray: bool = False) -> None:
    """Put RAY_TRAIN_ENV into this (the driver's) environment, where the user has not set them.

    local_ray: this process has just started Ray on its own machine (maskless.ray_runtime.init_ray).
    No autoscaler drains the node of such a Ray, so the preemption watcher would watch for nothing and
    only cost its actor's start at every fit: it is turned off there, unless the user set it. A driver
    that joins a cluster keeps Ray Train's default (the watcher on), so a node's preemption is seen."""
    import os

    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if local_ray:
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


def cluster_resources() -> dict[str, float]:
    """Total resources of the Ray cluster this process is connected to (empty when none)."""
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else {}


def has_gpus() -> bool:
    """Whether any node of the cluster has a GPU. Ask Ray, not torch: the driver of a cluster job
    runs on the head, which has none even when every worker has one."""
    return cluster_resources().get("GPU", 0) > 0


def check_resources(resources: dict | None) -> None:
    """A stage's `resources` option: None (route by tag) or custom resource names -> amounts >= 0."""
    if resources is None:
        return
    if not isinstance(resources, dict):
        raise ValueError(f"resources must map Ray resource names to amounts, got {resources!r}")
    bad = {k: v for k, v in resources.items()
           if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or k in ("CPU", "GPU")}
    if bad:
        raise ValueError(f"resources must map custom resource names to amounts >= 0 (CPUs and GPUs have their "
                         f"own options), got {bad}")


def route(tag: str, resources: dict[str, float] | None = None) -> dict[str, float]:
    """Custom resources to ask for: `resources` when given, else a share of `tag` when some node
    offers it, else none."""
    if resources is not None:
        check_resources(resources)
        return {k: float(v) for k, v in resources.items()}
    return {tag: ROUTE_SHARE} if cluster_resources().get(tag, 0) > 0 else {}


def crawl_options(num_cpus: float, resources: dict[str, float] | None = None) -> dict:
    """`.options(...)` of a crawl task: CPUs only, on `crawl` nodes where the cluster has them."""
    return {"num_cpus": num_cpus, "num_gpus": 0, "resources": route(CRAWL, resources)}


def gpu_stage_options(num_cpus: float, num_gpus: float | None = None,
                      resources: dict[str, float] | None = None) -> dict:
    """Options of a pseudo-mask actor or training worker: one GPU each when the cluster has GPUs
    (`num_gpus` overrides), on `gpu_stage` nodes where the cluster has them. Also valid as
    `map_batches(**options)`."""
    gpus = (1.0 if has_gpus() else 0.0) if num_gpus is None else float(num_gpus)
    if gpus < 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
    return {"num_cpus": num_cpus, "num_gpus": gpus, "resources": route(GPU_STAGE, resources)}


def worker_resources(options: dict) -> dict[str, float]:
    """The same options as Ray Train's `ScalingConfig(resources_per_worker=...)` wants them."""
    out = {"CPU": float(options["num_cpus"]), **options.get("resources", {})}
    if options.get("num_gpus"):
        out["GPU"] = float(options["num_gpus"])
    return out


def train_scaling(workers: int, cpus_per_worker: float, use_gpu: bool,
                  resources: dict[str, float] | None = None):
    """Ray Train's ScalingConfig of the classifier and Mask R-CNN stages: `workers` workers with
    `cpus_per_worker` CPUs and one GPU each when `use_gpu`, on `gpu_stage` nodes where the cluster
    has them, or on nodes offering `resources` when given (an autoscaler starts such a node)."""
    import ray.train

    options = gpu_stage_options(cpus_per_worker, 1.0 if use_gpu else 0.0, resources)
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                   resources_per_worker=worker_resources(options))


def node_id() -> str | None:
    """The Ray node this code runs on (None outside Ray): worth recording in a work unit's stats."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

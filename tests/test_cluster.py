"""Ray clusters: cluster.yaml and cluster-local.yaml pass Ray's own cluster-config validation, and on a
3-node cluster on this machine (ray.cluster_utils.Cluster) the crawl and pseudo-mask stages spread
their work over the nodes and, when a worker node dies mid-stage, still end with every sample exactly
once: the dead node's unfinished work units are redone on another node.

This module runs its own Ray cluster instead of the session `ray_local` fixture, because a driver
joins one Ray only. If an earlier module's `ray_local` is up, the `cluster` fixture shuts it down
first and, when this module is done, starts a local Ray with the same settings again, so modules
after this one still find one. Which node ran which attempt of which task comes from Ray's task
events in the GCS (this venv has no dashboard, hence no State API). While the cluster is up, Ray's
/tmp/ray/ray_current_cluster names it, so a bare `ray.init()` elsewhere on this machine would join
it: maskless and conftest always pass address="local" (or RAY_ADDRESS).
"""
from __future__ import annotations

import glob
import io
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import yaml

from maskless.core import resources, shards, storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fast node-death detection (the default takes ~15 s) and task events flushed every 100 ms.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                 "health_check_failure_threshold": 5, "task_events_report_interval_ms": 100}
WORKER_CPUS = 2  # logical CPUs per worker node; the head has none, like cluster.yaml's head
BUCKET = "maskless-test"


# ------------------------------------------------------------------ cluster configs, no Ray needed
def ray_validate(config: dict) -> dict:
    """What `ray up` checks before it contacts any cloud: defaults filled in (prepare_config), then
    the JSON schema of the installed Ray and its cross-field rules (validate_config). The later
    steps of `ray up` (instance-type lookup, IAM, key pairs) talk to the provider and are not run."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def load(name: str) -> dict:
    with open(os.path.join(REPO, name)) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_ray_validation_and_routes_stages():
    cfg = ray_validate(load("cluster.yaml"))
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}                  # no stage work on the head
    assert types["crawl"]["resources"] == {resources.CRAWL: 1}       # the tags core/resources.py asks for
    assert types["gpu"]["resources"] == {resources.GPU_STAGE: 1}
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    for name in ("crawl", "gpu"):                                     # every worker installs maskless
        assert any("pip install" in c and "~/maskless" in c for c in types[name]["worker_setup_commands"])
    assert "~/maskless" in cfg["file_mounts"] and ".venv" in cfg["rsync_exclude"]


def test_cluster_local_yaml_passes_ray_validation():
    raw = load("cluster-local.yaml")
    cfg = ray_validate(raw)
    assert cfg["provider"]["type"] == "local"
    (node_type,) = cfg["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"])
    start = " ".join(cfg["worker_start_ray_commands"])
    assert resources.CRAWL in start and resources.GPU_STAGE in start


@pytest.mark.parametrize("breakage, error", [
    (lambda c: c.update(bucket="s3://x"), "Additional properties"),                     # unknown top-level key
    (lambda c: c["available_node_types"]["crawl"]["resources"].update(crawl=0.5), "not of type 'integer'"),
    (lambda c: c.update(head_node_type="nowhere"), "head_node_type"),
    (lambda c: c["available_node_types"]["gpu"].update(min_workers=99), "max_workers"),
    (lambda c: c["available_node_types"]["gpu"].pop("node_config"), "'node_config' is a required property"),
])
def test_broken_cluster_yaml_fails_ray_validation(breakage, error):
    import jsonschema

    cfg = load("cluster.yaml")
    breakage(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=error):
        ray_validate(cfg)


def test_broken_cluster_local_yaml_fails_ray_validation():
    import click

    cfg = load("cluster-local.yaml")
    del cfg["provider"]["worker_ips"]
    with pytest.raises(click.ClickException, match="worker_ips"):
        ray_validate(cfg)


def test_route_options_follow_the_cluster(monkeypatch):
    laptop, cluster = {"CPU": 4.0}, {"CPU": 64.0, "GPU": 4.0, resources.CRAWL: 8.0, resources.GPU_STAGE: 4.0}
    monkeypatch.setattr(resources, "cluster_resources", lambda: laptop)
    assert resources.crawl_options(0.5) == {"num_cpus": 0.5, "num_gpus": 0, "resources": {}}
    assert resources.gpu_stage_options(1) == {"num_cpus": 1, "num_gpus": 0.0, "resources": {}}
    monkeypatch.setattr(resources, "cluster_resources", lambda: cluster)
    share = resources.ROUTE_SHARE
    assert resources.crawl_options(0.5)["resources"] == {resources.CRAWL: share}
    assert resources.gpu_stage_options(1) == {"num_cpus": 1, "num_gpus": 1.0, "resources": {resources.GPU_STAGE: share}}
    explicit = resources.gpu_stage_options(2, num_gpus=0.5, resources={"gpu_stage": 1})  # an autoscaler request
    assert resources.worker_resources(explicit) == {"CPU": 2.0, "GPU": 0.5, "gpu_stage": 1.0}
    with pytest.raises(ValueError, match="resources"):
        resources.route(resources.CRAWL, {resources.CRAWL: -1})
    with pytest.raises(ValueError, match="num_gpus"):
        resources.gpu_stage_options(1, num_gpus=-1)


# ------------------------------------------------------------------ a 3-node cluster on this machine
@dataclass
class Attempt:
    task_id: str
    name: str
    attempt: int
    node: str
    states: set[str]
    job: str
    started: int = 0  # when it began to run, ns since the epoch (0: not yet)
    ended: int = 0    # when it finished (0: not finished)


def attempts(name_part: str) -> list[Attempt]:
    """Every attempt of every task whose name contains name_part, with the node it ran on."""
    from ray._private import state
    from ray.core.generated import common_pb2

    names = {v: k for k, v in common_pb2.TaskStatus.items()}
    by_key: dict[tuple, Attempt] = {}
    for e in state.state._get_all_task_events():
        key = (e.task_id, e.attempt_number)
        a = by_key.setdefault(key, Attempt(e.task_id.hex(), "", e.attempt_number, "", set(), e.job_id.hex()))
        if e.HasField("task_info") and e.task_info.name:
            a.name = e.task_info.name
        if e.HasField("state_updates"):
            if e.state_updates.node_id:
                a.node = e.state_updates.node_id.hex()
            ts = e.state_updates.state_ts_ns
            a.states |= {names[k] for k in ts}
            a.started = ts.get(common_pb2.RUNNING, a.started)
            a.ended = ts.get(common_pb2.FINISHED, a.ended)
    return [a for a in by_key.values() if name_part in a.name]


def finished_nodes(name_part: str) -> set[str]:
    return {a.node for a in attempts(name_part) if "FINISHED" in a.states}


def redone_elsewhere(name_part: str, victim: str) -> list[str]:
    """Tasks that had an unfinished attempt on the victim node and finished on another node."""
    tries = attempts(name_part)
    cut = {a.task_id for a in tries if a.node == victim and "FINISHED" not in a.states}
    return sorted({a.task_id for a in tries if a.task_id in cut and a.node != victim and "FINISHED" in a.states})


class Cluster3:
    """A head without CPUs (like cluster.yaml's) and two 2-CPU worker nodes, the driver on the head."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG})
        self.ensure_workers(2)

    def ensure_workers(self, n: int) -> None:
        """Add worker nodes up to n, as an autoscaler replaces lost ones."""
        while len(self.cluster.worker_nodes) < n:
            self.cluster.add_node(num_cpus=WORKER_CPUS)

    def workers(self) -> list:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)

    def kill_busy_worker(self, name_part: str, fresh: bool, timeout: float = 90.0) -> str:
        """Kill (no graceful shutdown) the first worker node that has finished one attempt of the
        stage and has another in flight (see `busy`); returns its node id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tries = attempts(name_part)
            for node in self.workers():
                if busy(tries, node.node_id, fresh):
                    self.cluster.remove_node(node, allow_graceful=False)
                    return node.node_id
            time.sleep(0.05)
        seen = Counter((a.node[:8], tuple(sorted(a.states))) for a in attempts(name_part))
        raise AssertionError(f"no worker finished one {name_part} and had another in flight; "
                             f"attempts by node and states: {dict(seen)}")


@pytest.fixture(scope="module")
def s3():
    """An S3 server (moto) on 127.0.0.1 with one bucket, and the AWS_* variables that point pyarrow at
    it. Set before the cluster starts, so that the worker processes of every node inherit them."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    import ray

    from maskless.ray_runtime import init_ray

    restore = ray.is_initialized()  # an earlier module's session `ray_local` is up: make way
    if restore:
        ray.shutdown()
    # joined as the CLI joins a cluster (RAY_ADDRESS): without the setting a local Ray made here
    watcher = os.environ.pop(resources.PREEMPTION_WATCHER_ENV, None)
    c = Cluster3()
    init_ray(address=c.cluster.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.cluster.shutdown()
        if watcher is not None:
            os.environ[resources.PREEMPTION_WATCHER_ENV] = watcher
        if restore:  # the same settings as conftest's ray_local, for the modules after this one
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=False)


def in_background(fn, *args):
    """Run fn(*args) in a thread; join() returns its result or raises its exception."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def join(timeout: float):
        t.join(timeout)
        assert not t.is_alive(), f"the stage did not finish within {timeout} s"
        if "error" in box:
            raise box["error"]
        return box["result"]
    return join


def busy(tries: list[Attempt], node: str, fresh: bool) -> bool:
    """Whether the node has finished one attempt and has another in flight. fresh: the one in flight
    began to run less than half the shortest attempt ago, so the node dies mid-unit (for tasks; an
    actor's in-flight tasks also wait in its queue, cut off all the same, and their RUNNING events
    arrive late)."""
    took = [a.ended - a.started for a in tries if a.ended and a.started]
    if not took or not any(a.node == node and a.ended for a in tries):
        return False
    now, quick = time.time_ns(), min(took) / 2
    return any(a.node == node and not a.ended and a.states & {"SUBMITTED_TO_WORKER", "RUNNING"}
               and (not fresh or (a.started and now - a.started < quick)) for a in tries)


def test_routing_resources_place_tasks_on_tagged_nodes(cluster):
    import ray

    assert resources.route(resources.CRAWL) == {}  # no node offers the tag yet: nothing is asked for
    node = cluster.cluster.add_node(num_cpus=1, resources={resources.CRAWL: 1})
    try:
        opts = resources.crawl_options(0.5)
        assert opts["resources"] == {resources.CRAWL: resources.ROUTE_SHARE}
        where = ray.get([ray.remote(resources.node_id).options(**opts).remote() for _ in range(6)])
        assert set(where) == {node.node_id}  # never on the untagged workers, though they have CPUs free
    finally:
        cluster.cluster.remove_node(node)


@pytest.mark.slow
def test_crawl_job_spreads_over_nodes_and_a_lost_node_loses_no_sample(cluster, tmp_path):
    """The crawl as `ray job submit -- maskless crawl --config ...` runs it: the CLI in its own process
    with RAY_ADDRESS set, joining the cluster (Ray's job server itself needs the dashboard, which
    this venv lacks). A worker node dies mid-crawl."""
    import subprocess
    import sys

    import ray

    from maskless.ingest.crawl import UNITS_DIR, CrawlConfig, plan_units
    from maskless.ingest.validator import clean_image
    from maskless.ingest.world import make_world

    cluster.ensure_workers(2)
    world = str(tmp_path / "world")
    info = make_world(world, classes=3, images=36, seed=3, size=64)
    expected = set()
    for name in os.listdir(os.path.join(world, "JPEGImages")):
        with open(os.path.join(world, "JPEGImages", name), "rb") as f:
            expected.add(clean_image(f.read(), image_size=512, quality=90, min_size=16).sha256[:24])
    # three queries per class, one result window each: 9 units, 2 at a time on each worker; each
    # class's images are found three times (merged as exact duplicates)
    section = dict(engine=["local"], local_root=world, out=str(tmp_path / "crawl"),
                   classes={c: [c, f"{c} photo", f"{c} picture"] for c in info["classes"]},
                   images_per_query=40, shard_size=40, min_size=16, per_host_rps=8, threads=4,
                   workers=4, task_cpus=0.5, near_dup_bits=-1, progress=False, timeout=5.0)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"crawl": section}))
    proc = subprocess.Popen([sys.executable, "-m", "maskless.cli", "crawl", "--config", str(job)], cwd=REPO,
                            env=dict(os.environ, RAY_ADDRESS=cluster.cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = cluster.kill_busy_worker("crawl_unit", fresh=True)
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    out = section["out"]
    summary = storage.read_json(os.path.join(out, "crawl_summary.json"))  # stdout has Ray's notices too
    keys = Counter(s.key for s in shards.read_dataset(out))
    assert set(keys) == expected and set(keys.values()) == {1}, "every world image exactly once"
    assert summary["units_failed"] == [] and summary["samples"] == len(expected) == info["images"]
    assert shards.read_dataset_info(out)["samples"] == len(expected)
    units = {u.name for u in plan_units(CrawlConfig(**section))}
    assert set(shards.shard_names(os.path.join(out, UNITS_DIR))) == units  # every unit committed once
    tries = [a for a in attempts("crawl_unit") if a.job != ray.get_runtime_context().get_job_id()]
    assert tries, "the CLI joined this cluster: its tasks are in this cluster's task events"
    assert len({a.node for a in tries if "FINISHED" in a.states}) == 2, "units finished on both workers"
    assert redone_elsewhere("crawl_unit", victim), "a unit cut off by the lost node was redone"


def test_crawl_of_a_folder_of_parquet_lists_on_s3_runs_on_every_worker(cluster, s3, tmp_path):
    """URL lists at web scale on a cluster: a folder of parquet lists in the (moto) S3 bucket, planned on
    the driver from the files' footers alone, each unit's rows read from S3 by the worker that runs it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from maskless.ingest.crawl import CrawlConfig, plan_units, run_crawl
    from maskless.ingest.local_engine import LocalSearchServer
    from maskless.ingest.validator import clean_image
    from maskless.ingest.world import make_world

    cluster.ensure_workers(2)
    world = str(tmp_path / "world")
    make_world(world, classes=2, images=24, seed=11, size=64)
    server = LocalSearchServer(world)
    base = server.start()
    try:
        rows, expected = [], {}
        for label, paths in server.index.items():  # an image with both classes is listed under each
            for i, path in enumerate(paths):
                rows.append((f"{base}/img/{label}/{i}.jpg", label))
                with open(path, "rb") as f:
                    key = clean_image(f.read(), image_size=512, quality=90, min_size=16).sha256[:24]
                expected.setdefault(key, set()).add(label)
        for k in range(3):
            part = rows[k::3]
            buf = pa.BufferOutputStream()
            pq.write_table(pa.table({"url": [u for u, _ in part], "label": [lb for _, lb in part]}), buf,
                           row_group_size=4)
            storage.write_bytes_atomic(f"{s3}/lists/part-{k}.parquet", buf.getvalue().to_pybytes())
        storage.write_bytes_atomic(f"{s3}/lists/_SUCCESS", b"")
        cfg = CrawlConfig(engine=["urls"], urls=[f"{s3}/lists"], out=str(tmp_path / "crawl"), shard_size=4,
                          allow_private=True, per_host_rps=0, min_size=16, threads=4, workers=4, task_cpus=0.5,
                          near_dup_bits=-1, progress=False, timeout=5.0)
        units = plan_units(cfg)
        assert len(units) == sum(-(-len(rows[k::3]) // 4) for k in range(3)) >= 8
        by_glob = CrawlConfig(**{**cfg.__dict__, "urls": [f"{s3}/lists/part-*.parquet"]})
        assert [u.name for u in plan_units(by_glob)] == [u.name for u in units]  # the same files, by a glob
        since = time.time_ns()
        summary = run_crawl(cfg)
    finally:
        server.stop()
    got = Counter(s.key for s in shards.read_dataset(cfg.out))
    assert set(got.values()) == {1} and {s.key: set(s.labels) for s in shards.read_dataset(cfg.out)} == expected
    assert summary["units_failed"] == [] and summary["units_run"] == len(units)
    assert summary["by_engine_class"]["urls/(list)"]["found"] == len(rows)  # every row read, by some worker
    nodes = {a.node for a in attempts("crawl_unit") if a.started >= since and "FINISHED" in a.states}
    assert nodes == {n.node_id for n in cluster.workers()}, "units finished on every worker"


@pytest.fixture(scope="module")
def pseudo_inputs(s3, tmp_path_factory):
    """ONE input shard of a small world's 12 images, in the S3 bucket, and an untrained tiny classifier:
    the tests are about where work runs and what gets written, not about mask quality."""
    import torch

    from maskless.ingest.voc import import_voc
    from maskless.ingest.world import make_world
    from maskless.pseudo.classifier import PeakClassifier, save_classifier

    root = tmp_path_factory.mktemp("pseudo_inputs")
    make_world(str(root / "world"), classes=2, images=12, seed=5, size=64)
    data = f"{s3}/pseudo-inputs"
    info = import_voc(str(root / "world"), data, split="all", shard_size=12)
    assert len(shards.shard_names(data)) == 1
    torch.manual_seed(0)
    model = PeakClassifier(len(info["classes"]), backbone="tiny").eval()
    save_classifier(model, info["classes"], {"image_size": 64}, f"{s3}/classifier.pt")
    return data, f"{s3}/classifier.pt"


@pytest.mark.slow
def test_pseudo_on_s3_spreads_over_nodes_and_a_lost_node_loses_no_sample(cluster, s3, pseudo_inputs):
    """Inputs, classifier and outputs all in the (moto) S3 bucket: the shared storage of a cluster.
    The single input shard is cut into units of 2 images, so actors on both nodes have work."""
    from maskless.core.units import unit_names
    from maskless.pseudo.stage import PseudoConfig, run_pseudo

    cluster.ensure_workers(2)  # the crawl test left one: a new node joins, as the autoscaler's would
    data, classifier = pseudo_inputs
    inputs = Counter(s.key for s in shards.read_dataset(data))
    cfg = PseudoConfig(classifier=classifier, data=data, out=f"{s3}/pseudo", actors=2, unit_size=2,
                       actor_cpus=0.5, reader_cpus=0.5, max_peaks=2, max_proposals=30)
    join = in_background(run_pseudo, cfg)
    victim = cluster.kill_busy_worker("PseudoActor", fresh=False, timeout=240)  # actors start slowly on a busy machine
    summary = join(240)

    keys = Counter(s.key for s in shards.read_dataset(cfg.out))
    assert keys == inputs, "every input sample exactly once"
    (shard,) = shards.shard_names(data)
    assert shards.shard_names(cfg.out) == unit_names(shard, sum(inputs.values()), 2) and summary["failed"] == {}
    assert all(s.pseudo is not None for s in shards.read_dataset(cfg.out))
    assert shards.read_dataset_info(cfg.out)["samples"] == sum(inputs.values())
    assert len(finished_nodes("PseudoActor")) >= 2, "units of the one shard finished on both worker nodes"
    assert redone_elsewhere("PseudoActor", victim), "a unit cut off by the lost node was redone"


@pytest.mark.slow
def test_gpu_stages_run_on_gpu_stage_nodes_or_where_resources_say(cluster, s3, pseudo_inputs, tmp_path):
    """A node tagged `gpu_stage` (cluster.yaml's GPU type) joins: the pseudo stage's actors go to it
    by the tag alone, and a Ray Train fit built like classify's and train's goes where its explicit
    `resources` option points (the request an autoscaler starts a node type for)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from maskless.pseudo.stage import PseudoConfig, run_pseudo

    cluster.ensure_workers(2)
    tagged = cluster.cluster.add_node(num_cpus=2, resources={resources.GPU_STAGE: 1, "big_memory": 1})
    try:
        since = time.time_ns()
        data, classifier = pseudo_inputs
        cfg = PseudoConfig(classifier=classifier, data=data, out=f"{s3}/pseudo-routed", actors=2,
                           actor_cpus=0.5, max_peaks=2)
        assert run_pseudo(cfg)["failed"] == {}
        # (some actor-task events carry no node id; those say nothing about placement)
        nodes = {a.node for a in attempts("PseudoActor") if a.started >= since and "FINISHED" in a.states and a.node}
        assert nodes == {tagged.node_id}, "pseudo actors only on the gpu_stage node, though others have CPUs"

        def where(config):  # the same machine's disk is every node's disk here
            with open(config["path"], "w") as f:
                f.write(ray.get_runtime_context().get_node_id())
        for i, explicit in enumerate((None, {"big_memory": 0.5})):
            path = tmp_path / f"where{i}"
            TorchTrainer(where, train_loop_config={"path": str(path)},
                         scaling_config=resources.train_scaling(1, 0.5, False, explicit),
                         run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"))).fit()
            assert path.read_text() == tagged.node_id
    finally:
        cluster.cluster.remove_node(tagged)


# ------------------------------------------------------------------ the world source and imports on S3
def _files(uri: str, prefix: str = "") -> dict[str, bytes]:
    """Every file under a folder or prefix, by relative name."""
    out = {}
    for name in storage.listdir(uri):
        path = storage.join(uri, name)
        if storage.is_dir(path):
            out.update(_files(path, prefix + name + "/"))
        else:
            out[prefix + name] = storage.read_bytes(path)
    return out


class _StopBeforeClassify(Exception):
    pass


@pytest.mark.slow
def test_the_world_source_runs_on_s3_through_the_crawl(cluster, s3, tmp_path, monkeypatch):
    """`maskless run --out s3://...` with the world source failed at once (the world, the imports and
    the demo's web folder were local-only). Now world, import, web folder and crawl all live in the
    bucket, byte for byte what a local run writes; the run is stopped when classify starts (the later
    stages are tested on S3 above). The demo's crawl keeps the private-address guard on."""
    import maskless.ingest.crawl as crawl
    import maskless.pseudo.classify as classify
    from maskless.ingest.voc import import_voc
    from maskless.ingest.world import make_world
    from maskless.run import run_pipeline

    cluster.ensure_workers(2)
    crawled = []

    def run_crawl(cfg):
        crawled.append(cfg)
        return crawl_run(cfg)

    def stop(cfg):
        raise _StopBeforeClassify(cfg.data)
    crawl_run = crawl.run_crawl
    monkeypatch.setattr(crawl, "run_crawl", run_crawl)
    monkeypatch.setattr(classify, "run_classify", stop)
    world = {"classes": 2, "images": 6, "seed": 3, "size": 64}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run": {"world": world, "fully_supervised": False},
                                      "crawl": {"image_size": 64, "shard_size": 20, "workers": 2,
                                                "progress": False, "per_host_rps": 0}}))
    out = f"{s3}/run"
    with pytest.raises(_StopBeforeClassify, match="s3://"):
        run_pipeline(str(config), out=out)

    local = tmp_path / "world"
    make_world(str(local), **world)
    assert _files(f"{out}/world") == {k: v for k, v in _files(str(local)).items() if k != "world.json"} | {
        "world.json": storage.read_bytes(f"{out}/world/world.json")}
    assert storage.read_json(f"{out}/world/world.json")["root"] == f"{out}/world"
    import_voc(str(local), str(tmp_path / "train"), split="train")
    expect = {s.key: s.meta["sha256"] for s in shards.read_dataset(str(tmp_path / "train"))}
    assert {s.key: s.meta["sha256"] for s in shards.read_dataset(f"{out}/data/train")} == expect
    classes = storage.read_json(f"{out}/stages/import.json")["result"]["train"]["classes"]
    assert sorted(storage.listdir(f"{out}/web")) == sorted(classes)
    (cfg,) = crawled
    assert cfg.engine == ["local"] and cfg.local_root == f"{out}/web" and cfg.allow_private is False
    summary = storage.read_json(f"{out}/data/crawl/crawl_summary.json")
    assert shards.read_dataset_info(f"{out}/data/crawl")["samples"] == len(expect)  # every train image once
    assert all(g["rejected"] == {} for g in summary["by_engine_class"].values())
    assert {n[:-5] for n in storage.listdir(f"{out}/stages")} == {"world", "import", "web", "crawl"}


def test_coco_import_reads_and_writes_s3(s3, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from maskless.ingest.coco import import_coco

    rng = np.random.default_rng(2)
    images = f"{s3}/coco/images"
    for name in ("a.jpg", "sub/b.jpg"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
        storage.write_bytes_atomic(f"{images}/{name}", buf.getvalue())
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
                      {"id": 2, "file_name": "sub/b.jpg", "width": 40, "height": 30}],
           "annotations": [{"id": 5, "image_id": 2, "category_id": 1, "iscrowd": 0,
                            "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]}],
           "categories": [{"id": 1, "name": "thing"}]}
    storage.write_bytes_atomic(f"{s3}/coco/instances.json", json.dumps(doc).encode())
    result = import_coco(f"{s3}/coco/instances.json", images, f"{s3}/coco/shards")
    got = {s.meta["source_id"]: s for s in shards.read_dataset(f"{s3}/coco/shards")}
    assert result["images"] == 2 and got[2].labels == ["thing"] and len(got[2].gt["instances"]) == 1
    assert got[1].jpg == storage.read_bytes(f"{images}/a.jpg")
def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_train_checkpoints_when_its_node_is_preempted_and_resumes_from_there(cluster, world_shards, tmp_path,
                                                                               monkeypatch):
    """A spot node reclaimed mid-training, the way an autoscaler does it: Ray drains the node with a
    deadline (reason: preemption) and a replacement node joins. Ray Train's preemption watcher (kept on
    when maskless joins a cluster) tells the workers; they checkpoint at their next log point, keep
    training until the deadline, and are then restarted on the new node from that checkpoint's step
    (a preemption, not a failure: --max-failures 0 allows no other restart)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    from maskless.core.run_folder import STATE_FILE, read_metrics
    from maskless.train.trainer import STOP_FILE, TrainConfig, run_train

    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")  # Ray's default polls every 5 s
    cluster.ensure_workers(2)
    out = str(tmp_path / "run")
    cfg = TrainConfig(data=world_shards["train"], masks="gt", out=out, arch="resnet18_fpn", weights="none",
                      min_size=64, max_size=64, anchor_sizes=[16, 32, 64, 128, 256], rpn_pre_nms_top_n_train=100,
                      rpn_post_nms_top_n_train=50, box_batch_size_per_image=32, batch_size=1, epochs=20,
                      lr=0.01, warmup_iters=5, clip_grad_norm=5.0, log_every=1, keep_checkpoints=20,
                      loader_workers=0, max_failures=0)
    spe = 18  # 18 train images, 1 a step, 1 worker
    join = in_background(run_train, cfg)
    doomed = cluster.workers()
    try:
        wait_for(lambda: any(m["step"] >= 2 for m in read_metrics(out)), 180, "training's second step")
        cluster.cluster.add_node(num_cpus=WORKER_CPUS)  # the autoscaler's replacement
        deadline = time.time() + 12
        gcs = ray._raylet.GcsClient(address=cluster.cluster.address)
        for node in doomed:  # the training worker is on one of them
            accepted, why = gcs.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value(
                "DRAIN_NODE_REASON_PREEMPTION"), "spot instance reclaimed", int(deadline * 1000))
            assert accepted, why
        wait_for(lambda: any(m["time"] > deadline for m in read_metrics(out)), 180, "a step after the deadline")
        storage.write_bytes_atomic(storage.join(out, STOP_FILE), b"stop\n")
        summary = join(180)
    finally:
        for node in doomed:
            cluster.cluster.remove_node(node)
    import torch

    steps = sorted(torch.load(path, weights_only=True)["step"]
                   for path in glob.glob(os.path.join(out, "ray", "checkpoint_*", STATE_FILE)))
    # the first checkpoint is mid-epoch, so it is the preemption's (an epoch's end gives one at a multiple of
    # spe, and the stop's is the last one)
    preempted = steps[0]
    assert len(steps) >= 2 and 2 <= preempted < spe and summary["status"] == "interrupted"
    history = read_metrics(out)
    assert [m["step"] for m in history] == list(range(1, summary["step"] + 1))
    # the new workers resumed from the last checkpoint taken before the deadline (the preemption's, or an
    # epoch's end the first workers reached before the deadline on a fast machine): steps up to it are the
    # first workers', every later one was (re)done after the deadline
    resumed = min(m["step"] for m in history if m["time"] > deadline) - 1
    assert resumed in steps and resumed >= preempted and summary["step"] > resumed
    assert all(m["time"] < deadline for m in history if m["step"] <= resumed)

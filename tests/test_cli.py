"""The maskless command: help everywhere, clear errors and exit code 2 on bad input, YAML < flags."""
import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import pytest

from maskless import config
from maskless.cli import STAGES, main

COMMANDS = [c.name for c in STAGES] + ["world", "import", "run", "bench"]


def _maskless(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "maskless.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_top_level_help_lists_every_subcommand():
    out = _maskless("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0, capsys.readouterr().err
    assert "usage: maskless " + name in capsys.readouterr().out


def test_world_command_writes_a_world_and_rejects_bad_input(tmp_path, capsys):
    assert main(["world", str(tmp_path / "w"), "--classes", "2", "--images", "3", "--size", "64"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["classes"] == ["disc", "square"]
    assert (tmp_path / "w" / "ImageSets" / "Segmentation" / "val.txt").exists()
    assert main(["world", str(tmp_path / "x"), "--classes", "0"]) == 2
    assert "1 to 8 classes" in capsys.readouterr().err
    assert main(["import", "voc", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a VOC folder" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_unknown_command_and_no_command_exit_2():
    assert _maskless("frobnicate").returncode == 2
    assert _maskless().returncode == 2


@dataclass
class _Demo:
    data: str = field(default="", metadata={"help": "input"})
    steps: int = 10
    lr: float = 0.1
    flip: bool = True
    classes: list[str] = field(default_factory=list)
    queries: dict = field(default_factory=dict)
    resources: Optional[dict[str, float]] = None
    overlap: Optional[float] = 0.5

    def validate(self):
        if self.steps < 1:
            raise ValueError("steps must be at least 1")


def test_config_merges_defaults_yaml_and_flags():
    import argparse

    p = argparse.ArgumentParser()
    config.add_arguments(p, _Demo)
    args = p.parse_args(["--steps", "5", "--no-flip", "--classes", "a,b"])
    cfg = config.build(_Demo, {"lr": 0.5, "steps": 7, "queries": {"a": ["x"]}}, args)
    assert (cfg.steps, cfg.lr, cfg.flip, cfg.classes, cfg.queries) == (5, 0.5, False, ["a", "b"], {"a": ["x"]})
    assert config.build(_Demo, {}, p.parse_args([])) == _Demo()
    with pytest.raises(ValueError, match="unknown _Demo option 'stepz'"):
        config.build(_Demo, {"stepz": 1})
    with pytest.raises(ValueError, match="steps must be at least 1"):
        config.build(_Demo, {"steps": 0})
    assert not any(a.dest == "queries" for a in p._actions)  # dicts are YAML-only, but for NAME=AMOUNT ones
    assert p.parse_args(["--resources", "gpu_stage=1, big=0.25"]).resources == {"gpu_stage": 1.0, "big": 0.25}
    assert config.build(_Demo, {"resources": {"a": 1}}, p.parse_args(["--resources", "b=2"])).resources == {"b": 2.0}
    for bad in ("gpu_stage", "gpu_stage=many", "=1", "a=1,,b=2"):
        with pytest.raises(SystemExit):
            p.parse_args(["--resources", bad])
    # an Optional field with a default is set to None by `none` (a flag's None means "not given")
    assert config.build(_Demo, {}, p.parse_args(["--overlap", "none"])).overlap is None
    assert config.build(_Demo, {"overlap": None}, p.parse_args(["--overlap", "0.25"])).overlap == 0.25
    assert config.build(_Demo, {}, p.parse_args([])).overlap == 0.5
    with pytest.raises(SystemExit):
        p.parse_args(["--overlap", "half"])


@pytest.mark.parametrize("stage", ["crawl", "pseudo", "classify", "train"])
def test_stage_resources_reject_cpus_gpus_and_negative_amounts(stage):
    from maskless.ingest.crawl import CrawlConfig
    from maskless.pseudo.classify import ClassifyConfig
    from maskless.pseudo.stage import PseudoConfig
    from maskless.train.trainer import TrainConfig

    cls, needed = {"crawl": (CrawlConfig, {"keywords": ["car"]}),
                   "pseudo": (PseudoConfig, {"classifier": "c.pt", "data": "d", "out": "o"}),
                   "classify": (ClassifyConfig, {"data": "d", "out": "o"}),
                   "train": (TrainConfig, {"data": "d", "out": "o"})}[stage]
    assert config.build(cls, {**needed, "resources": {"gpu_stage": 1}}).resources == {"gpu_stage": 1}
    for bad in ({"GPU": 1}, {"CPU": 2}, {"gpu_stage": -1}, {"gpu_stage": "one"}, ["gpu_stage"]):
        with pytest.raises(ValueError, match="resources must map"):
            config.build(cls, {**needed, "resources": bad})


def test_bad_yaml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        config.load_yaml(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        config.load_yaml(str(bad))


def test_relative_paths_become_absolute_for_ray_workers(tmp_path, monkeypatch):
    """Ray workers do not share the driver's working directory."""
    from maskless.pseudo.classify import ClassifyConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"x")
    cfg = config.absolute_paths(ClassifyConfig(data="shards/crawl", out="s3://bucket/run", backbone_weights="w.pt"))
    assert cfg.data == str(tmp_path / "shards" / "crawl") and cfg.out == "s3://bucket/run"
    assert cfg.backbone_weights == str(tmp_path / "w.pt")
    assert config.absolute_paths(ClassifyConfig(data="d", out="o", backbone_weights="imagenet")).backbone_weights == "imagenet"

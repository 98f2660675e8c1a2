"""The `maskless` command: one subcommand per stage, each a thin wrapper over the stage's config
dataclass and run function. Options come from `--config FILE` (the stage's section of a run YAML)
and from flags; flags win. Bad input and failures the user can act on (core/errors.py: a full disk,
a run that kept its finished part) print `maskless: error: ...` and exit 2, without a traceback."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import dataclass

from maskless import __version__, config
from maskless.core import errors

log = logging.getLogger("maskless")


@dataclass(frozen=True)
class StageCommand:
    """A subcommand backed by a stage: `module.config_class` holds its options, `module.run` runs it."""

    name: str
    help: str
    module: str
    config_class: str
    run: str
    section: str  # the run YAML section its --config reads
    positionals: tuple[tuple[str, str, str], ...] = ()  # (field, metavar, nargs)
    needs_ray: bool = True


STAGES = [
    StageCommand("crawl", "crawl images by keyword into shards (Ray tasks through icrawler)",
                 "maskless.ingest.crawl", "CrawlConfig", "run_crawl", "crawl"),
    StageCommand("classify", "train the image-level classifier with peak stimulation (Ray Train)",
                 "maskless.pseudo.classify", "ClassifyConfig", "run_classify", "classify"),
    StageCommand("pseudo", "write pseudo instance masks into new shards (Ray actors, units of --unit-size images)",
                 "maskless.pseudo.stage", "PseudoConfig", "run_pseudo", "pseudo"),
    StageCommand("pseudo-eval", "fidelity report of pseudo masks against ground truth",
                 "maskless.pseudo.fidelity", "FidelityConfig", "run_fidelity", "pseudo_eval", needs_ray=False),
    StageCommand("train", "train Mask R-CNN on pseudo (or true) masks (Ray Train)",
                 "maskless.train.trainer", "TrainConfig", "run_train", "train"),
    StageCommand("relabel", "self-training: a Mask R-CNN trained on pseudo masks relabels their images (Ray actors)",
                 "maskless.train.relabel", "RelabelConfig", "run_relabel", "relabel"),
    StageCommand("predict", "instance masks (COCO RLE JSON) and overlays for images",
                 "maskless.train.predict", "PredictConfig", "run_predict", "predict",
                 positionals=(("images", "IMAGES", "+"),), needs_ray=False),
    StageCommand("eval", "score a model or a predictions file (mAP^r at IoU 0.25/0.5/0.75, ABO)",
                 "maskless.train.evaluate", "EvalConfig", "run_eval", "eval", needs_ray=False),
    StageCommand("ablate", "noise-sensitivity ablation: degraded true masks -> Mask R-CNN -> mAP",
                 "maskless.train.ablate", "AblateConfig", "run_ablate", "ablate"),
]
OTHER = {
    "world": "write the synthetic VOC-format world",
    "import": "import PASCAL VOC or COCO into shards with ground truth",
    "run": "the whole pipeline from one YAML config, every stage resumable",
    "bench": "run the benchmarks of bench/ and print one table",
}


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def _load_stage(cmd: StageCommand):
    module = importlib.import_module(cmd.module)
    return getattr(module, cmd.config_class), getattr(module, cmd.run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="show Ray's and the libraries' own logs")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray (default: 2 x cores, at least 4)")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard with a local Ray (needs ray[default])")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's stage is imported (its options come from its dataclass)."""
    parser = argparse.ArgumentParser(prog="maskless", description="Instance segmentation from image tags.")
    parser.add_argument("--version", action="version", version=f"maskless {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in STAGES:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.name != command:
            continue
        _common(p)
        p.add_argument("--config", default=None, help=f"a run YAML; its '{cmd.section}:' section gives defaults")
        cls, _ = _load_stage(cmd)
        for field, metavar, nargs in cmd.positionals:
            p.add_argument(field, metavar=metavar, nargs=nargs)
        config.add_arguments(p, cls, skip=tuple(f for f, _, _ in cmd.positionals))

    p = sub.add_parser("world", help=OTHER["world"], description=OTHER["world"])
    p.add_argument("out", help="output folder or URI (VOC layout)")
    p.add_argument("--classes", type=int, default=3, help="number of object classes (1-8)")
    p.add_argument("--images", type=int, default=40, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--verbose", action="store_true")

    p = sub.add_parser("import", help=OTHER["import"], description=OTHER["import"])
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    shard_size: dict = {"type": int}
    if command == "import":  # core.units brings pyarrow: imported for this command only, like a stage's module
        from maskless.core.units import SHARD_SIZE, UNIT_SIZE

        shard_size.update(default=SHARD_SIZE, help=f"samples per shard (default {SHARD_SIZE}: {SHARD_SIZE // UNIT_SIZE} "
                          f"work units of {UNIT_SIZE}); stages cut shards into units, so this sets file sizes, "
                          f"not parallelism")
    v = kinds.add_parser("voc", help="a VOC folder (VOCdevkit/VOC2012 or a world)")
    v.add_argument("root")
    v.add_argument("--split", default="val", help="ImageSets/Segmentation split name, or 'all'")
    v.add_argument("--out", required=True)
    v.add_argument("--shard-size", **shard_size)
    c = kinds.add_parser("coco", help="COCO instances JSON + image folder")
    c.add_argument("annotations")
    c.add_argument("images")
    c.add_argument("--out", required=True)
    c.add_argument("--shard-size", **shard_size)
    for k in (v, c):
        k.add_argument("--skip-invalid", action="store_true",
                       help="leave out images whose file, mask or annotation is broken, and count them "
                            "(default: stop at the first, naming it)")
        k.add_argument("--verbose", action="store_true")

    p = sub.add_parser("run", help=OTHER["run"], description=OTHER["run"])
    _common(p)
    p.add_argument("--config", required=True, help="run YAML (see examples/demo.yaml)")
    p.add_argument("--out", default=None, help="run folder (overrides the YAML's run.out)")

    p = sub.add_parser("bench", help=OTHER["bench"], description=OTHER["bench"])
    p.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run, e.g. gpu (default: all)")
    p.add_argument("--only", default=None, help="comma-separated benchmark names")
    p.add_argument("--out", default="bench/out", help="where each benchmark writes its JSON")
    p.add_argument("--verbose", action="store_true")
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("maskless").setLevel(logging.INFO)  # every stage logs under maskless.*


def _run_stage(cmd: StageCommand, args: argparse.Namespace) -> dict:
    cls, run = _load_stage(cmd)
    section = config.load_yaml(args.config).get(cmd.section, {}) if args.config else {}
    cfg = config.absolute_paths(config.build(cls, section, args))
    if cmd.needs_ray and not getattr(cfg, "dry_run", False):  # a dry run only plans
        from maskless.ray_runtime import init_ray

        init_ray(args.address, args.num_cpus, args.verbose, dashboard=args.dashboard)
    return run(cfg)


def dispatch(args: argparse.Namespace) -> dict:
    stage = {c.name: c for c in STAGES}.get(args.command)
    if stage:
        return _run_stage(stage, args)
    if args.command == "world":
        from maskless.ingest.world import make_world

        return make_world(args.out, classes=args.classes, images=args.images, seed=args.seed, size=args.size,
                          val_fraction=args.val_fraction)
    if args.command == "import":
        if args.kind == "voc":
            from maskless.ingest.voc import import_voc

            return import_voc(args.root, args.out, split=args.split, shard_size=args.shard_size,
                              skip_invalid=args.skip_invalid)
        from maskless.ingest.coco import import_coco

        return import_coco(args.annotations, args.images, args.out, shard_size=args.shard_size,
                           skip_invalid=args.skip_invalid)
    if args.command == "run":
        from maskless.run import run_pipeline

        return run_pipeline(args.config, out=args.out, address=args.address, num_cpus=args.num_cpus,
                            verbose=args.verbose, dashboard=args.dashboard)
    if args.command == "bench":
        from maskless.bench import run_benchmarks

        return run_benchmarks(only=args.only, out=args.out, names=args.names)
    raise UsageError("no command given; see 'maskless --help'")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        _setup_logging(getattr(args, "verbose", False))
        result = dispatch(args)
    except UsageError as e:
        print(f"maskless: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
            errors.IncompleteRun) as e:
        print(f"maskless: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not errors.disk_full(e):
            raise
        hint = "" if "rerun" in str(e) else ("\nmaskless: free space and rerun the same command: what was "
                                             "already written is kept and not redone")
        print(f"maskless: error: {e}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maskless: interrupted; rerun the same command to finish the rest", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

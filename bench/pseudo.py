"""Bench: pseudo masks on the synthetic world: fidelity per proposal source and rule, and throughput.

1. Fidelity table (in-process, no Ray): for each peak response rule (prm, gradient), proposal source
   (selective search, superpixel merging) x objectness proxy (stability, contrast) and proposal rule
   (prm retrieval, wise), plus the response rule (no proposals) once per response rule, each without
   and with GrabCut refinement, the pseudo masks of the first --images images are scored against gt.json:
   ABO (same-class), instance precision and recall at IoU 0.5, semantic mIoU (pseudo/fidelity.py).
   Peak responses are computed once per response rule and proposals once per source, then reused.
   Oracle rows: each gt instance takes its best proposal (an upper bound on any rule; the recall
   column is then the fraction of instances with a proposal at IoU >= 0.5, and pseudo/gt counts
   proposals per image set).
2. Throughput: `run_pseudo` over ONE input shard of the first --throughput-images train images (200),
   cut into units of --unit-size, with 1 and 2 CPU actors; images/s from the first unit's start to the
   last unit's commit (the units' stats), the same with Ray Data and actor start-up included, and per
   actor while busy (the stage summary's per_actor) with its busy seconds and how long after the
   stage's first unit its own first unit was read (a late actor's start); the 1 -> 2 actor scaling efficiency =
   throughput(2) / (2 x throughput(1)) on the first-to-last figure, with the load average around each
   run (the machine may be shared: the figure means something only on an idle one). With --repeats N the
   1- and 2-actor pair runs N times, in the order 1,2 then 2,1 and so on (the machine's own speed drifts
   between minutes, so each repeat pairs two runs next to each other), and the efficiencies are printed
   per repeat and as their median and range.
3. The machine's own ceiling for that figure (`--skip-plain` to leave it out): the same per-image work
   as an actor's (decode, classifier forward in batches of the stage's --forward-batch, peaks, their
   back-propagation, masks, GrabCut; no tar writing) in 1 and then 2 plain processes of 1 torch and
   OpenCV thread each, no Ray, the images split in halves; each process loads the classifier, then all
   start together (a barrier). throughput(2) / (2 x throughput(1)) here is what the machine's cores
   give two copies of this work with no scheduler, no reading or writing, and nothing else running:
   the ceiling the stage's figure above is to be read against (both swing from run to run).

    .venv/bin/python -m bench.pseudo --classifier RUN --data SHARDS_WITH_GT [--images 60] [--out /tmp/bench-pseudo]
    .venv/bin/python -m bench.pseudo --skip-fidelity        # the scaling check alone
Without --classifier, a world is built and a tiny classifier trained first (bench/classifier.py does
the same with its own figures).
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import time

import numpy as np
import torch

from bench.common import write_result
from bench.ingest import TreeCPU
from maskless.core import shards
from maskless.core.units import UNIT_SIZE
from maskless.pseudo.classifier import load_classifier
from maskless.pseudo.fidelity import FidelityAccumulator, image_size
from maskless.pseudo.instances import MaskerOptions, PseudoMasker
from maskless.pseudo.proposals import SCORES, SOURCES, make_source
from maskless.pseudo.refine import REFINERS
from maskless.pseudo.retrieval import RetrievalOptions
from maskless.pseudo.stage import PseudoConfig, run_pseudo


def fidelity_table(run: str, samples: list[shards.Sample]) -> list[dict]:
    model, classes, train_config = load_classifier(run)
    images = [np.asarray(s.image()) for s in samples]
    sources = {(name, score): make_source(name, score) for name in SOURCES for score in SCORES}
    proposals, prop_time = {}, {}
    for key, src in sources.items():
        t = time.time()
        proposals[key] = [src(im) for im in images]
        prop_time[key] = (time.time() - t) / len(images)
    rows = []
    for key, props in proposals.items():
        rows.append({"response": "-", "source": key[0], "objectness": key[1], "rule": "oracle (best considered)",
                     "refine": "-",
                     **_oracle(samples, props, True), "s_per_image": prop_time[key]})
        rows.append({"response": "-", "source": key[0], "objectness": key[1], "rule": "oracle (best of all)",
                     "refine": "-",
                     **_oracle(samples, props, False), "s_per_image": prop_time[key]})
    for response in ("prm", "gradient"):
        def masker(rule: str, refine: str, top: int = 100) -> PseudoMasker:
            return PseudoMasker(model, classes, train_config, MaskerOptions(
                rule=rule, response=response, refine=refine, retrieval=RetrievalOptions(max_proposals=top)))

        t = time.time()
        responses = [masker("response", "none").responses(im, s.labels) for im, s in zip(images, samples)]
        resp_time = (time.time() - t) / len(images)
        for refine in REFINERS:
            rows.append(_masked_row(masker("response", refine), samples, responses, [None] * len(samples), classes,
                                    response, ("-", "-"), "response", refine, resp_time))
        variants = [("prm", "none", 100), ("wise", "none", 100), ("prm", "none", 0), ("prm", "grabcut", 100),
                    ("wise", "grabcut", 100)]
        for key in sources:
            for rule, refine, top in variants:
                rows.append(_masked_row(masker(rule, refine, top), samples, responses, proposals[key], classes,
                                        response, key, rule if top else f"{rule} (all proposals)", refine,
                                        prop_time[key] + resp_time))
    return rows


def _masked_row(masker: PseudoMasker, samples: list[shards.Sample], responses: list, proposals: list,
                classes: list[str], response: str, source: tuple[str, str], rule: str, refine: str,
                seconds: float) -> dict:
    """One fidelity row: the masker's instances from precomputed responses and proposals."""
    acc = FidelityAccumulator(classes)
    t = time.time()
    for s, pr, props in zip(samples, responses, proposals):
        acc.add(s.gt, {"instances": masker.instances(pr, props)}, image_size(s))
    r = acc.result()
    return {"response": response, "source": source[0], "objectness": source[1], "rule": rule, "refine": refine,
            "abo": r["abo_same_class"], "precision": r["precision"], "recall": r["recall"], "miou": r["miou"],
            "pseudo_instances": r["pseudo_instances"], "gt_instances": r["gt_instances"],
            "s_per_image": seconds + (time.time() - t) / len(samples)}


def _oracle(samples: list[shards.Sample], proposals: list, considered_only: bool) -> dict:
    """Upper bound of any rule: each gt instance takes its best proposal (of those the rules may
    take: top max_proposals by objectness within the area limits, or of all)."""
    from maskless.core import masks as rle
    from maskless.pseudo.retrieval import considered

    best, n_props = [], 0
    for s, p in zip(samples, proposals):
        index = considered(p, RetrievalOptions()) if considered_only else np.arange(len(p))
        n_props += len(index)
        cand = [rle.encode(m) for m in p.masks(index)]
        gts = [g["mask"] for g in s.gt["instances"]]
        best += rle.iou_matrix(cand, gts).max(axis=0).tolist() if cand else [0.0] * len(gts)
    return {"abo": float(np.mean(best)), "precision": None, "recall": float(np.mean(np.asarray(best) >= 0.5)),
            "miou": None, "pseudo_instances": n_props, "gt_instances": len(best)}


# the three 1 -> 2 actor efficiencies: result key, the rate it compares, what its window is
EFFICIENCIES = (("efficiency", "images_per_s", "first unit read to last committed"),
                ("efficiency_from_actor_ready", "images_per_s_from_actor_ready", "first actor ready to last unit"),
                ("efficiency_end_to_end", "images_per_s_end_to_end", "whole stage (run_pseudo's call)"))


def throughput(run: str, samples: list[shards.Sample], out: str, unit_size: int, cfg_kw: dict,
               repeats: int = 1) -> dict:
    """The stage on ONE shard with 1 and 2 actors, `repeats` times in the order 1,2 / 2,1 / 1,2 ...:
    the machine's speed drifts by up to a fifth between runs (BENCHMARKS.md), so each repeat's
    efficiency pairs two runs next to each other in time, and the spread over repeats is printed."""
    data = os.path.join(out, f"throughput-data-{len(samples)}")
    if not shards.list_shards(data):  # ONE shard: the stage's parallelism must come from its units
        shards.write_shards(samples, data, "bench", max_count=len(samples))
        shards.write_dataset_info(data, load_classifier(run)[1], stage="bench")
    result: dict = {"input_shards": len(shards.shard_names(data)), "unit_size": unit_size, "repeats": []}
    for rep in range(repeats):
        runs = {a: _stage_run(run, data, os.path.join(out, f"throughput-{a}"), a, unit_size, cfg_kw)
                for a in ((1, 2) if rep % 2 == 0 else (2, 1))}
        for key, rate, _ in EFFICIENCIES:
            runs[key] = runs[2][rate] / (2 * runs[1][rate])
        result["repeats"].append(runs)
    first = result["repeats"][0]
    result.update({1: first[1], 2: first[2]})  # the detailed rows: the first repeat's
    for key, _, _ in EFFICIENCIES:
        values = [r[key] for r in result["repeats"]]
        result[key] = float(np.median(values))
        result[key + "_range"] = [min(values), max(values)]
    return result


def _stage_run(run: str, data: str, dest: str, actors: int, unit_size: int, cfg_kw: dict) -> dict:
    """One run of the stage (a fresh local Ray) over `data` with `actors` actors: its rates and timings."""
    import ray

    from maskless.ray_runtime import init_ray

    shutil.rmtree(dest, ignore_errors=True)
    init_ray(num_cpus=4)
    try:
        load_before = os.getloadavg()[0]
        tree = TreeCPU()  # this process and its descendants: Ray's processes, the actors, the readers
        tree.watch(os.getpid())
        t = time.time()
        summary = run_pseudo(PseudoConfig(classifier=run, data=data, out=dest, actors=actors, unit_size=unit_size,
                                          **cfg_kw))
        wall = time.time() - t
        tree.stop()
    finally:
        ray.shutdown()
    cpu = {k: round(v, 2) for k, v in tree.by_title().items() if v >= 0.05}
    stats = shards.read_stats(dest)
    first, last = min(s["read_started"] for s in stats), max(s["finished"] for s in stats)
    span = last - first
    # when each actor's first unit was read, after the stage's first: a late actor's start is time
    # the window counts and no actor's busy time does
    lag, start_up = {}, {}
    for s in stats:
        lag[s["actor"]] = min(lag.get(s["actor"], float("inf")), s["read_started"] - first)
        # when the actor's constructor began and ended, after the stage began (run_pseudo's call)
        start_up[s["actor"]] = [round(s["actor_started"] - t, 2), round(s["actor_ready"] - t, 2)]
    # from the first actor's constructor end: the start-up of Ray and of the actors left out,
    # which reading (ahead of the actors) would otherwise put inside the window
    ready_span = last - min(s["actor_ready"] for s in stats)
    return {"images": summary["images"], "units": summary["units"], "wall_s": wall,
            "images_per_s_from_actor_ready": summary["images"] / ready_span,
            "images_per_s_end_to_end": summary["images"] / wall,
            "images_per_s": summary["images"] / span, "window_s": span,
            "first_read_after_s": round(first - t, 2),
            "per_actor": {k: {**v, "first_unit_after_s": round(lag.get(k, float("nan")), 2),
                              "constructor_s_after_start": start_up.get(k)}
                          for k, v in summary["per_actor"].items()},
            "cpu_s_by_process": cpu, "cpu_s": round(sum(cpu.values()), 2),
            "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def _plain_worker(run: str, data: str, first: int, stop: int, barrier, results) -> None:
    """One plain process of the ceiling measurement: the actor's per-image work on samples [first, stop)."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cfg = PseudoConfig(classifier=run, data=data, out="-", max_peaks=10)
    model, classes, train_config = load_classifier(run)
    masker = PseudoMasker(model, classes, train_config, cfg.masker_options())
    samples = list(itertools.islice(shards.read_dataset(data), first, stop))
    barrier.wait()
    t0 = time.time()
    for b in range(0, len(samples), cfg.forward_batch):
        chunk = samples[b:b + cfg.forward_batch]
        masker.mask_images([np.asarray(s.image()) for s in chunk], [s.labels for s in chunk], [None] * len(chunk))
    results.put((first, len(samples), t0, time.time()))


def plain_ceiling(run: str, data: str, n: int) -> dict:
    """images/s of 1 and 2 plain processes doing an actor's per-image work, and the efficiency between them."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    result: dict = {"images": n}
    for procs in (1, 2):
        bounds = np.linspace(0, n, procs + 1).astype(int)
        barrier, results = ctx.Barrier(procs), ctx.Queue()
        workers = [ctx.Process(target=_plain_worker, args=(run, data, int(a), int(b), barrier, results))
                   for a, b in zip(bounds[:-1], bounds[1:])]
        load_before = os.getloadavg()[0]
        for w in workers:
            w.start()
        done = [results.get() for _ in workers]
        for w in workers:
            w.join()
        window = max(d[3] for d in done) - min(d[2] for d in done)
        result[procs] = {"images_per_s": n / window, "window_s": window,
                         "per_process_images_per_s": [d[1] / (d[3] - d[2]) for d in sorted(done)],
                         "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    result["efficiency"] = result[2]["images_per_s"] / (2 * result[1]["images_per_s"])
    return result


def train_classifier(out: str, images: int) -> tuple[str, str]:
    import ray

    from maskless.ingest.voc import import_voc
    from maskless.ingest.world import make_world
    from maskless.pseudo.classify import ClassifyConfig, run_classify
    from maskless.ray_runtime import init_ray

    world, data = os.path.join(out, "world"), os.path.join(out, "train")
    make_world(world, classes=3, images=images, seed=0, size=128)
    if not shards.list_shards(data):
        import_voc(world, data, split="train", shard_size=100)
    run = os.path.join(out, "classifier")
    init_ray(num_cpus=2)
    try:
        run_classify(ClassifyConfig(data=data, out=run, backbone="tiny", backbone_weights="none", epochs=40,
                                    lr=0.01, image_size=128, cpus_per_worker=2.0))
    finally:
        ray.shutdown()
    return run, data


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", default=None, help="classify run folder or classifier.pt")
    ap.add_argument("--data", default=None, help="shards with gt.json (the images the classifier saw)")
    ap.add_argument("--images", type=int, default=60, help="images for the fidelity table")
    ap.add_argument("--throughput-images", type=int, default=200, help="images of the throughput part's one shard")
    ap.add_argument("--unit-size", type=int, default=UNIT_SIZE, help="the stage's --unit-size in the throughput part")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of the throughput part's 1- and 2-actor pair (order 1,2 then 2,1 ...): median and range")
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-plain", action="store_true", help="leave out the plain-process ceiling (part 3)")
    ap.add_argument("--out", default="/tmp/bench-pseudo")
    ap.add_argument("--json", default=None, help="write the result here (default OUT/bench.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    run, data = args.classifier, args.data
    if run is None:
        run, data = train_classifier(args.out, images=400)
    if data is None:
        raise ValueError("--data is needed with --classifier: the shards (with gt.json) to make pseudo masks of")
    rows: list[dict] = []
    extra: dict = {"classifier": run, "data": data}
    if not args.skip_fidelity:
        samples = []
        for s in shards.read_dataset(data):
            if s.gt is None:
                raise ValueError(f"{data}: sample {s.key} has no gt.json; the fidelity table needs ground truth")
            samples.append(s)
            if len(samples) >= args.images:
                break
        table = fidelity_table(run, samples)
        print("| response | source | objectness | rule | refine | ABO | precision@0.5 | recall@0.5 | mIoU | pseudo/gt | "
              "s/image |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in table:
            print(f"| {r['response']} | {r['source']} | {r['objectness']} | {r['rule']} | {r['refine']} | "
                  f"{r['abo']:.3f} | {_f(r['precision'])} | {_f(r['recall'])} | {_f(r['miou'])} | "
                  f"{r['pseudo_instances']}/{r['gt_instances']} | {r['s_per_image']:.2f} |")
        rows += [{"metric": f"ABO {r['response']}/{r['source']}/{r['objectness']}/{r['rule']}/{r['refine']}",
                  "value": r["abo"], "unit": ""} for r in table]
        extra.update(table=table, images=len(samples))
    if not args.skip_throughput:
        samples = list(itertools.islice(shards.read_dataset(data), args.throughput_images))
        tp = throughput(run, samples, args.out, args.unit_size, {"max_peaks": 10}, args.repeats)
        for a in (1, 2):
            rows += [{"metric": f"{a} CPU actor(s): images/s, first to last unit", "value": tp[a]["images_per_s"],
                      "unit": "img/s"},
                     {"metric": f"{a} CPU actor(s): images/s, first actor ready to last unit",
                      "value": tp[a]["images_per_s_from_actor_ready"], "unit": "img/s"},
                     {"metric": f"{a} CPU actor(s): images/s incl. Ray and actor start",
                      "value": tp[a]["images_per_s_end_to_end"], "unit": "img/s"}]
            rows += [{"metric": f"{a} CPU actor(s): actor {k[:8]} images/s while busy", "value": v["images_per_s"],
                      "unit": "img/s"} for k, v in tp[a]["per_actor"].items()]
            rows += [{"metric": f"{a} CPU actor(s): actor {k[:8]} busy / first unit after the stage's first",
                      "value": f"{v['busy_s']:.1f} / {v['first_unit_after_s']:.1f}", "unit": "s"}
                     for k, v in tp[a]["per_actor"].items()]
            rows += [{"metric": f"{a} CPU actor(s): actor {k[:8]} constructor began / ended, s after the stage began",
                      "value": " / ".join(map(str, v["constructor_s_after_start"] or ["-"])), "unit": "s"}
                     for k, v in tp[a]["per_actor"].items()]
            rows.append({"metric": f"{a} CPU actor(s): first unit read, s after the stage began",
                         "value": tp[a]["first_read_after_s"], "unit": "s"})
            rows.append({"metric": f"{a} CPU actor(s): window, first unit read to last committed",
                         "value": tp[a]["window_s"], "unit": "s"})
            rows.append({"metric": f"{a} CPU actor(s): CPU seconds in the stage, all processes (wall {tp[a]['wall_s']:.1f} s)",
                         "value": tp[a]["cpu_s"], "unit": "s"})
            rows += [{"metric": f"{a} CPU actor(s): CPU seconds of {name}", "value": v, "unit": "s"}
                     for name, v in tp[a]["cpu_s_by_process"].items()]
            rows.append({"metric": f"{a} CPU actor(s): 1-min load average before, after", "unit": "",
                         "value": " / ".join(map(str, tp[a]["load_1min_before_after"]))})
        for i, r in enumerate(tp["repeats"]):
            rows.append({"metric": f"repeat {i + 1}: images/s 1 / 2 actors, first actor ready to last unit; whole stage",
                         "unit": "img/s", "value": f"{r[1]['images_per_s_from_actor_ready']:.2f} / "
                                                   f"{r[2]['images_per_s_from_actor_ready']:.2f}; "
                                                   f"{r[1]['images_per_s_end_to_end']:.2f} / {r[2]['images_per_s_end_to_end']:.2f}"})
            rows.append({"metric": f"repeat {i + 1}: efficiency first unit read / first actor ready / whole stage",
                         "unit": "", "value": f"{r['efficiency']:.3f} / {r['efficiency_from_actor_ready']:.3f} / "
                                             f"{r['efficiency_end_to_end']:.3f}"})
        over = f" (median of {len(tp['repeats'])} repeats; range {{:.3f}}-{{:.3f}})" if len(tp["repeats"]) > 1 else ""
        for key, _, what in EFFICIENCIES:
            rows.append({"metric": f"1 -> 2 actor scaling efficiency, one shard of {len(samples)}, {what}"
                                   + over.format(*tp[key + "_range"]),
                         "value": tp[key], "unit": ""})
        extra["throughput"] = tp
    if not args.skip_plain:
        data_one = os.path.join(args.out, f"throughput-data-{args.throughput_images}")
        plain = plain_ceiling(run, data_one if shards.list_shards(data_one) else data, args.throughput_images)
        for a in (1, 2):
            rows.append({"metric": f"{a} plain process(es), no Ray: images/s", "value": plain[a]["images_per_s"],
                         "unit": "img/s"})
            rows.append({"metric": f"{a} plain process(es): each process's images/s", "unit": "img/s",
                         "value": ", ".join(f"{v:.2f}" for v in plain[a]["per_process_images_per_s"])})
            rows.append({"metric": f"{a} plain process(es): 1-min load average before, after", "unit": "",
                         "value": " / ".join(map(str, plain[a]["load_1min_before_after"]))})
        rows.append({"metric": "1 -> 2 plain processes: the machine's own scaling efficiency",
                     "value": plain["efficiency"], "unit": ""})
        extra["plain"] = plain
    write_result("pseudo", rows, args.json or os.path.join(args.out, "bench.json"), **extra)


if __name__ == "__main__":
    main()

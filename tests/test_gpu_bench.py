"""bench/gpu.py on the CPU (--device cpu --tiny), so its GPU paths cannot rot while no GPU is around, and
the model-level stage modules on a "bare GPU machine": a subprocess where the packages such a machine
lacks cannot be imported."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a bare GPU machine lacks: the packages of the Ray, crawl and shard paths, pycocotools (RLE),
# and tqdm and PyYAML, which torch, torchvision, numpy, pillow, pyarrow, opencv and scikit-image do not bring
BARE = ("ray", "webdataset", "pycocotools", "icrawler", "protego", "tqdm", "yaml")
MODEL_LEVEL = ("maskless.core.masks", "maskless.core.shards", "maskless.core.storage", "maskless.core.run_folder",
               "maskless.core.resources", "maskless.pseudo.classifier", "maskless.pseudo.peak_stimulation",
               "maskless.pseudo.peak_response", "maskless.pseudo.classify", "maskless.pseudo.instances",
               "maskless.pseudo.proposals", "maskless.pseudo.refine", "maskless.pseudo.retrieval",
               "maskless.pseudo.stage", "maskless.train.dataset", "maskless.train.maskrcnn", "maskless.train.trainer",
               "maskless.train.predict", "maskless.ingest.world", "bench.gpu")
# A None in sys.modules is Python's own "not importable": `import NAME` raises ModuleNotFoundError and
# importlib.util.find_spec(NAME) answers None (torch asks it whether optional packages are installed)
BLOCKER = textwrap.dedent("""
    import sys

    for name in sys.argv[1].split(","):
        sys.modules[name] = None
""")


def _python(code: str, blocked: tuple[str, ...], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the shared 2-core machine, and the figures don't matter
    return subprocess.run([sys.executable, "-c", BLOCKER + code, ",".join(blocked), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_blocker_blocks():
    proc = _python("import pycocotools", ("pycocotools",))
    assert proc.returncode == 1 and "ModuleNotFoundError: import of pycocotools halted" in proc.stderr


def test_model_level_modules_import_and_mask_pseudo_labels_on_a_bare_machine():
    code = textwrap.dedent(f"""
        import importlib, json
        import numpy as np, torch
        for name in {MODEL_LEVEL!r}:
            importlib.import_module(name)
        from bench import gpu
        from maskless.core import masks
        try:
            masks.encode(np.ones((2, 2), bool))
            lazy = "encoded"
        except ModuleNotFoundError as e:
            lazy = e.name
        fig = gpu.Figures()
        recipe, reason = gpu.recipe_or_reason()
        gpu.bench_pseudo(gpu.TINY, torch.device("cpu"), fig, recipe, reason)
        loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.partition(".")[0] in {BARE!r})
        print(json.dumps({{"lazy": lazy, "rows": fig.rows, "not_measured": fig.not_measured, "errors": fig.errors,
                          "loaded": loaded}}))
    """)
    proc = _python(code, BARE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["errors"] == []
    assert out["lazy"] == "pycocotools"  # core.masks imports; only encoding needs pycocotools
    rows = {r["metric"]: r["value"] for r in out["rows"]}
    assert rows["pseudo default rule: peak responses"] > 0 and rows["pseudo default rule: peaks per image"] >= 1
    reasons = {r["metric"]: r["reason"] for r in out["not_measured"]}
    assert set(reasons) == {"pseudo default rule: whole masker", "pseudo voc2012.yaml rule: proposals + whole masker"}
    assert "pycocotools" in reasons["pseudo default rule: whole masker"]
    assert "needs yaml" in reasons["pseudo voc2012.yaml rule: proposals + whole masker"]


def test_tiny_gpu_bench_runs_on_the_cpu_with_every_row(tmp_path):
    """Every row, finite, where Ray, webdataset, icrawler, protego and tqdm cannot be imported; the
    projection is checked against examples/voc2012.yaml and VOC's image counts, computed here."""
    out = tmp_path / "gpu.json"
    code = ("import runpy; sys.argv = ['bench/gpu.py'] + sys.argv[2:]; "
            "runpy.run_module('bench.gpu', run_name='__main__')")
    proc = _python(code, ("ray", "webdataset", "icrawler", "protego", "tqdm"),
                   "--device", "cpu", "--tiny", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["tiny"] and result["device"] == "cpu"
    assert result["maskrcnn_train_precision"].startswith("fp32")
    plan = result["plan"]
    cls = f"classifier {plan['backbone']} {plan['classifier_size']}px b{plan['classifier_batch']}"
    sizes = [f"maskrcnn {a}/{b}" for a, b in plan["maskrcnn_sizes"]]
    measured = {f"{cls}: train step, fp32", f"{cls}: held-out evaluation forward", f"{cls}: PRM peak backpropagation",
                "pseudo default rule: peak responses", "pseudo default rule: peaks per image",
                "pseudo default rule: whole masker", "pseudo voc2012.yaml rule: proposals + whole masker"}
    measured |= {f"{s} b{b}: {what}" for s in sizes for b in plan["maskrcnn_batches"]
                 for what in ("train step", "loss at the last step")}
    predict = [f"{s}: predict b{plan['predict_batch']}" for s in sizes]
    measured |= set(predict) | {f"{p}: detections per image" for p in predict}
    measured |= {f"projection voc2012.yaml: {p}" for p in ("classify", "pseudo", "train", "eval", "total")}
    cuda_only = {f"{cls}: train peak memory, fp32", f"{cls}: train step, AMP", f"{cls}: train peak memory, AMP"}
    cuda_only |= {f"{s} b{b}: train peak memory" for s in sizes for b in plan["maskrcnn_batches"]}
    rows = {r["metric"]: r["value"] for r in result["rows"]}
    assert len(rows) == len(result["rows"]) and set(rows) == measured
    assert all(math.isfinite(v) and v > 0 for v in rows.values()), rows
    assert {r["metric"] for r in result["not_measured"]} == cuda_only
    assert all("CUDA only" in r["reason"] for r in result["not_measured"])

    recipe = yaml.safe_load(open(os.path.join(REPO, "examples", "voc2012.yaml")))
    c, t = recipe["classify"], recipe["train"]
    train_images = round(10_582 * 0.9)  # ClassifyConfig's default val_fraction (0.1) is held out
    train_images_per_epoch = math.ceil(train_images / c["batch_size"]) * c["batch_size"]
    classify_s = c["epochs"] * (train_images_per_epoch / rows[f"{cls}: train step, fp32"]
                                + (10_582 - train_images) / rows[f"{cls}: held-out evaluation forward"])
    pseudo_s = 1_464 / rows["pseudo voc2012.yaml rule: proposals + whole masker"]
    # two Mask R-CNNs (pseudo and true masks); with --tiny the first measured size stands in for 480/640
    maskrcnn_images = 2 * t["epochs"] * (1_464 // t["batch_size"]) * t["batch_size"]
    train_s = maskrcnn_images / rows[f"{sizes[0]} b{t['batch_size']}: train step"]
    eval_s = 2 * 1_449 / rows[predict[0]]
    for stage, seconds in (("classify", classify_s), ("pseudo", pseudo_s), ("train", train_s), ("eval", eval_s),
                           ("total", classify_s + pseudo_s + train_s + eval_s)):
        assert rows[f"projection voc2012.yaml: {stage}"] == pytest.approx(seconds / 3600, rel=1e-9), stage


def test_maskless_bench_skips_the_gpu_bench_without_cuda(tmp_path, capsys):
    import torch

    from maskless.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `maskless bench gpu` would run the full bench")
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[maskless bench] gpu skipped: torch sees no CUDA device here" in out
    assert json.loads(out[out.index("{"):])["skipped"] == {"gpu": "torch sees no CUDA device"}
    assert main(["bench", "--only", "gpu,nope", "--out", str(tmp_path)]) == 2  # unknown names are still an error
    assert not os.listdir(tmp_path)  # nothing ran


def test_the_classifier_step_the_bench_times_is_the_stages_step():
    """classify.train_step (the stage's loop and the bench call it) against the step written out by hand;
    with a gradient scaler (the bench's AMP row; bfloat16 autocast on a CPU) it still trains."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from maskless.pseudo.classifier import PeakClassifier
    from maskless.pseudo.classify import ClassifyConfig, build_optimizer, train_step

    settings = dataclasses.asdict(ClassifyConfig())
    x, y = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([[1., 0, 0], [0, 1, 1]])
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        models.append(PeakClassifier(3, "tiny"))
    by_hand, stage, scaled = models
    opt = build_optimizer(by_hand, settings)
    expected = F.multilabel_soft_margin_loss(by_hand(x), y)
    opt.zero_grad()
    expected.backward()
    opt.step()
    loss = train_step(stage, build_optimizer(stage, settings), x, y)
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-6)
    for a, b in zip(by_hand.parameters(), stage.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    before = [p.detach().clone() for p in scaled.parameters()]
    loss = train_step(scaled, build_optimizer(scaled, settings), x, y, torch.amp.GradScaler("cpu"))
    assert math.isfinite(float(loss)) and any(not torch.equal(p, q) for p, q in zip(before, scaled.parameters()))

"""The ablation's degradations do what they say, its fidelity numbers are right, its loop reruns cleanly
(training replaced by a stand-in there), and `maskless ablate` runs a level for real."""
import json

import numpy as np
import pytest

from maskless.core import shards
from maskless.train import ablate


def square(h=60, w=60, y=20, x=20, s=20):
    m = np.zeros((h, w), bool)
    m[y:y + s, x:x + s] = True
    return m


def test_erode_and_dilate_areas():
    m = square()
    (e,) = ablate.erode([m], 2)
    assert e.sum() == 16 * 16 and e[22:38, 22:38].all()  # 2 px off every side
    (d,) = ablate.dilate([m], 2)
    ys, xs = np.nonzero(d)
    assert d[m].all() and (ys.min(), ys.max(), xs.min(), xs.max()) == (18, 41, 18, 41)
    assert 20 * 20 + 4 * 2 * 20 < d.sum() < 24 * 24  # rounded corners: a disk, not a square
    keys, labels = ["a"], ["cat"]
    masks, _ = ablate.degrade(keys[0], [square(s=3)], labels, "erode:2", seed=0)
    assert masks == []  # a vanished instance is removed


def test_shift_moves_by_k_and_keeps_area():
    rng = np.random.default_rng(0)
    m = square(h=80, w=80, y=30, x=30, s=15)
    for _ in range(20):
        (s,) = ablate.shift([m], 5, rng)
        assert s.sum() == m.sum()
        d = np.subtract(np.argwhere(s).mean(0), np.argwhere(m).mean(0))
        assert 5 - 0.75 <= np.hypot(*d) <= 5 + 0.75
    (cut,) = ablate.shift([square(h=30, w=30, y=0, x=0, s=10)], 12, np.random.default_rng(1))
    assert cut.sum() < 100  # moved partly out of the image


def test_merge_touching_same_class_only():
    a, b, c, far = square(y=5, x=5, s=10), square(y=5, x=17, s=10), square(y=5, x=29, s=10), square(y=40, x=40, s=10)
    masks, labels = ablate.merge([a, b, c, far], ["cat", "cat", "cat", "cat"], gap=3)  # 2 px void gaps
    assert len(masks) == 2 and labels == ["cat", "cat"]
    assert masks[0].sum() == 300 and (masks[0] == (a | b | c)).all()  # transitive, pixels unchanged
    assert len(ablate.merge([a, b, c], ["cat", "cat", "cat"], gap=1)[0]) == 3  # the gap is wider than 1 px
    assert len(ablate.merge([a, b, c], ["cat", "dog", "cat"], gap=3)[0]) == 3  # classes never merge


def test_drop_plan_is_exact_and_seeded():
    counts = {f"k{i}": i % 4 for i in range(50)}
    total = sum(counts.values())
    plan = ablate.plan_drops(counts, 0.3, seed=0)
    assert len(plan) == round(0.3 * total)
    assert all(i < counts[k] for k, i in plan)
    assert plan == ablate.plan_drops(dict(reversed(list(counts.items()))), 0.3, seed=0)
    assert plan != ablate.plan_drops(counts, 0.3, seed=1)
    assert ablate.plan_drops(counts, 0.0, 0) == set() and len(ablate.plan_drops(counts, 1.0, 0)) == total


def test_level_parsing_errors():
    assert ablate.parse_level("drop:0.25") == ("drop", 0.25)
    for bad, msg in (("blur:2", "unknown degradation"), ("erode:x", "not a int"), ("drop:2", r"\[0, 1\]"),
                     ("clean:1", "no argument")):
        with pytest.raises(ValueError, match=msg):
            ablate.parse_level(bad)
    with pytest.raises(ValueError, match="set by the ablation"):
        ablate.AblateConfig(train={"data": "x"}).validate()


def test_degraded_shards_and_fidelity(world_shards, tmp_path):
    src = world_shards["train"]
    clean = ablate.write_degraded(src, str(tmp_path / "clean"), "clean")
    fid = ablate.fidelity(str(tmp_path / "clean"))
    assert fid["abo_same_class"] == 1.0 and fid["pseudo_instances"] == fid["gt_instances"] > 0
    assert fid["pixel_ratio"] == 1.0 and clean["samples"] == shards.read_dataset_info(src)["samples"]

    ablate.write_degraded(src, str(tmp_path / "drop"), "drop:0.5", seed=3)
    fid = ablate.fidelity(str(tmp_path / "drop"))
    n = fid["gt_instances"]
    assert fid["pseudo_instances"] == n - round(0.5 * n)
    assert fid["abo_same_class"] == pytest.approx((n - round(0.5 * n)) / n)  # kept ones are perfect

    ablate.write_degraded(src, str(tmp_path / "erode"), "erode:1")
    fid_e = ablate.fidelity(str(tmp_path / "erode"))
    assert 0.3 < fid_e["abo_same_class"] < 1 and fid_e["pixel_ratio"] < 1
    ablate.write_degraded(src, str(tmp_path / "dilate"), "dilate:1")
    assert ablate.fidelity(str(tmp_path / "dilate"))["pixel_ratio"] > 1

    # gt.json is untouched; a rerun after a lost shard rewrites only that shard, without duplicates
    first = sorted(shards.shard_names(str(tmp_path / "erode")))
    shards.delete_shard(str(tmp_path / "erode"), first[0])
    ablate.write_degraded(src, str(tmp_path / "erode"), "erode:1")
    again = list(shards.read_dataset(str(tmp_path / "erode")))
    orig = {s.key: s.gt for s in shards.read_dataset(src)}
    assert sorted(s.key for s in again) == sorted(orig)
    assert all(s.gt == orig[s.key] for s in again)
    assert ablate.fidelity(str(tmp_path / "erode")) == fid_e


def test_run_ablate_loop_and_rerun(tiny_world, tmp_path, monkeypatch):
    calls = []

    def stand_in(cfg, data, val, name):  # "training" reproduces the training masks' fidelity as mAP
        calls.append(name)
        abo = ablate.fidelity(data)["abo_same_class"]
        return {"mAP": {cfg.protocol: {"0.25": abo, "0.5": abo / 2, "0.75": abo / 4}}, "out": str(tmp_path / name)}

    monkeypatch.setattr(ablate, "_train_and_evaluate", stand_in)
    cfg = ablate.AblateConfig(gt=tiny_world, levels=["clean", "erode:2", "drop:0.5"], out=str(tmp_path / "a"))
    summary = ablate.run_ablate(cfg)
    assert calls == ["clean", "erode-2", "drop-0_5"]
    abo = [r["fidelity"]["abo_same_class"] for r in summary["levels"]]
    assert abo[0] == 1.0 and abo[1] < 1 and abo[2] < 1
    assert [r["mAP"]["0.5"] for r in summary["levels"]] == [a / 2 for a in abo]
    assert (tmp_path / "a" / "ablate.png").stat().st_size > 0
    assert json.loads((tmp_path / "a" / "ablate.json").read_text()) == json.loads(json.dumps(summary))
    cfg.levels.append("shift:3")
    ablate.run_ablate(cfg)
    assert calls == ["clean", "erode-2", "drop-0_5", "shift-3"]  # finished levels are not redone


@pytest.mark.slow
def test_maskless_ablate_runs_one_level_for_real(ray_local, tiny_world, tmp_path):
    """`maskless ablate` itself, nothing replaced: one level of the default recipe (at the tiny world's
    96 px, 4 steps) degrades, trains on exactly the degraded masks, evaluates and writes the curve."""
    import yaml

    from maskless.cli import main

    out = tmp_path / "ablate"
    train = {**ablate.DEFAULT_TRAIN, "min_size": 96, "max_size": 96, "batch_size": 2, "max_steps": 4,
             "cpus_per_worker": 1}
    (tmp_path / "ablate.yaml").write_text(yaml.safe_dump({"ablate": {"train": train}}))
    assert main(["ablate", "--config", str(tmp_path / "ablate.yaml"), "--gt", tiny_world, "--levels", "drop:0.5",
                 "--out", str(out)]) == 0
    (level,) = json.loads((out / "ablate.json").read_text())["levels"]
    n = level["fidelity"]["gt_instances"]
    assert level["fidelity"]["pseudo_instances"] == n - round(0.5 * n) and n > 0
    run = json.loads((out / "runs" / "drop-0_5" / "summary.json").read_text())
    assert run["status"] == "finished" and run["step"] == 4
    assert run["data"]["instances"] == n - round(0.5 * n)  # it trained on the degraded masks, not the true ones
    assert run["config"]["clip_grad_norm"] == ablate.DEFAULT_TRAIN["clip_grad_norm"] == 5.0
    scored = json.loads((out / "eval" / "drop-0_5" / "report.json").read_text())
    voc = scored["measured"]["protocols"]["voc"]["thresholds"]
    assert set(level["mAP"]) == {"0.25", "0.5", "0.75"} and level["mAP"] == {t: voc[t]["mAP"] for t in voc}
    assert (out / "ablate.png").stat().st_size > 0

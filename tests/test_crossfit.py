"""bench/crossfit.py: the cross-fitted evaluation of what the switches add. No test image ever reaches
training or selection; every image is tested once per seed; the quick scale runs the whole path (the stage
scripts as subprocesses, the fixed route, static at equal GFLOPs, the per-image evaluation, the report)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench import crossfit
from conftest import ROOT
from utils.dist import Context
from utils.data import load_dataset


def _ids(root, split):
    return {int(f.split(".")[0]) for c in os.listdir(os.path.join(root, split))
            for f in os.listdir(os.path.join(root, split, c))}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("crossfit")
    proc = subprocess.run([sys.executable, "bench/crossfit.py", "--quick", "--no_reinforce_check", "--out",
                           str(out / "work"), "--results", str(out / "results"), "--jobs", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.load(open(out / "results" / "crossfit-graded.json"))


@pytest.mark.slow
def test_no_test_image_is_trained_or_selected_on(quick):
    out, report = quick
    s = crossfit.SCALES["quick"]
    n = s["max_images"]
    units = sorted(d for d in os.listdir(out / "work") if d.startswith("s"))
    assert len(units) == s["folds"] * len(s["seeds"])
    tested = []
    for unit in units:
        root = out / "work" / unit / "data"
        train, test = _ids(root, "train"), _ids(root, "test")
        assert not train & test and len(train | test) == n
        tested += sorted(test)
        # the validation split the stages choose on is drawn from the train folder: none of its images is
        # one of the test images (pixels compared)
        w = crossfit.unit_where(s, str(out / "work" / unit))
        ckpt = str(out / "work" / unit / "rl" / "checkpoint.pt")
        _, data, _ = crossfit.load_unit(w, ckpt, Context(device=torch.device("cpu")))
        ds = load_dataset(str(root), "png", s["resize"])
        test_rows = {bytes(x.numpy()) for x in ds.test_x}
        assert data.eval_name == "val" and len(data.eval.y) > 0
        val_rows = {bytes(x.numpy()) for x in data.eval.x.cpu()}
        assert not val_rows & test_rows
        assert (data.test.y.cpu().numpy() == np.load(out / "work" / "images.npz")["labels"][
            crossfit.unit_ids(str(root))]).all()  # the ids name the test images in the loaders' order
    assert sorted(tested) == list(range(n))  # every image tested exactly once per seed
    assert report["n"] == n * len(s["seeds"]) and report["units"] == len(units)


@pytest.mark.slow
def test_the_report_is_of_the_saved_per_image_results(quick):
    out, report = quick
    evals = [np.load(out / "work" / u / "eval.npz") for u in sorted(os.listdir(out / "work")) if u.startswith("s")]
    for key, name in (("dyn", "dyn"), ("fix", "fix"), ("equal", "equal"), ("static", "static")):
        pooled = np.concatenate([e[f"{key}_correct"] for e in evals]).mean() * 100
        assert report["acc"][name] == pytest.approx(pooled)
    c = report["dynamic_vs_fixed"]["mcnemar"]
    dyn = np.concatenate([e["dyn_correct"] for e in evals])
    fix = np.concatenate([e["fix_correct"] for e in evals])
    assert (c["only_a"], c["only_b"]) == (int((dyn & ~fix).sum()), int((fix & ~dyn).sum()))
    # the controls' routes are the dynamic network's own: evaluated one fixed route at a time, each image's
    # assigned route gives the dynamic network's decision on it
    for e in evals:
        rows = np.arange(len(e["ids"]))
        assert (e["ctl_correct"][rows, e["ctl_assign"]] == e["dyn_correct"]).mean() >= 0.99
    assert os.path.isfile(out / "results" / "crossfit-graded.md")


@pytest.mark.slow
def test_the_curves_carry_static_pruning_at_each_budget_and_the_flops_match_check(quick):
    out, report = quick
    s = crossfit.SCALES["quick"]
    for u in sorted(d for d in os.listdir(out / "work") if d.startswith("s")):
        targets = json.load(open(out / "work" / u / "curve_targets.json"))
        curve = json.load(open(out / "work" / u / "curve.json"))
        assert [c["budget"] for c in curve["static"]] == list(s["curve"])
        for c in curve["static"]:  # pushed to the budget's GFLOPs (at the full budget: the stage-2 network)
            assert c["static_gflops"] <= targets[f"{c['budget']:.2f}"] * 1.001
            assert c["static_gflops"] >= targets[f"{c['budget']:.2f}"] * 0.97
        m = curve["matched_on_test"]
        assert abs(m["gflops_test"] / m["fixed_gflops"] - 1) <= 0.01
        mt = np.load(out / "work" / u / "curve.npz")["mt_flops"]
        assert mt.mean() / 1e9 == pytest.approx(m["gflops_test"])
    assert all("static_acc" in c for c in report["curve"])
    assert report["matched_on_test_max_rel_diff"] <= 0.01
    assert report["dynamic_vs_fixed_matched_on_test"]["n"] == report["n"]

"""evaluation/crossfit.py: the deconfounded evaluation of what the switches add. No test image ever reaches
training or selection; every image is tested once per seed; every arm gets the same epochs after stage 1; the
fixed route costs at most what the dynamic network is trained to and static pruning is pushed to; a run
resumes from the finished units' results alone. The quick scale runs the whole path (the stage scripts as
subprocesses, the doubled arms, the report)."""
import itertools
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from evaluation import crossfit, stats
from conftest import ROOT
from utils.dist import Context
from utils.data import load_dataset
from evaluation.digits import digits_images, transformed_digits


def _ids(root, split):
    return {int(f.split(".")[0]) for c in os.listdir(os.path.join(root, split))
            for f in os.listdir(os.path.join(root, split, c))}


def _run(out, *extra):
    return subprocess.run([sys.executable, "-m", "evaluation.crossfit", "--quick", "--out", str(out / "work"),
                           "--results", str(out / "results"), "--jobs", "2", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("crossfit")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.load(open(out / "results" / "transform" / "report.json"))


def _units(out):
    work = out / "work" / "transform"
    return work, sorted(d for d in os.listdir(work) if d.startswith("s") and os.path.isdir(work / d))


@pytest.mark.slow
def test_no_test_image_is_trained_or_selected_on(quick):
    out, report = quick
    s = {**crossfit.SCALES["quick"], "name": "quick"}
    n = s["max_images"]
    work, units = _units(out)
    assert len(units) == s["folds"] * len(s["seeds"])
    tested = []
    for unit in units:
        root = work / unit / "data"
        train, test = _ids(root, "train"), _ids(root, "test")
        assert not train & test and len(train | test) == n
        tested += sorted(test)
        # the validation split every choice is made on is drawn from the train folder (pixels compared)
        w = crossfit.unit_where(s, str(work / unit))
        ckpt = str(work / unit / crossfit.bkey(s["budgets"][0]) / "counterfactual" / "rl" / "checkpoint.pt")
        _, data, _, _ = crossfit.load_unit(w, ckpt, Context(device=torch.device("cpu")))
        ds = load_dataset(str(root), "png", s["resize"])
        test_rows = {bytes(x.numpy()) for x in ds.test_x}
        val_rows = {bytes(x.numpy()) for x in data.eval.x.cpu()}
        assert data.eval_name == "val" and val_rows and not val_rows & test_rows
        _, val_ids = crossfit.val_train_ids(w)  # the ids the diagnostics index levels by name the val images
        images = np.load(work / "images.npz")
        assert (data.eval.y.cpu().numpy() == images["labels"][val_ids]).all()
        assert (data.test.y.cpu().numpy() == images["labels"][crossfit.unit_ids(str(root))]).all()
    assert sorted(tested) == list(range(n))  # every image tested exactly once per seed
    assert report["units"] == len(units)


@pytest.mark.slow
def test_every_arm_gets_the_same_epochs_after_stage_1_and_the_doubled_arms_twice(quick):
    out, _ = quick
    s = crossfit.SCALES["quick"]
    work, units = _units(out)
    for unit in units:
        for factor in (1, 2):
            root = crossfit.arm_root(str(work / unit), factor)
            if not os.path.isdir(root):
                continue
            total = crossfit.total_epochs(s, factor)
            budgets = s["budgets"] if factor == 1 else (s["double"]["budget"],)
            assert json.load(open(os.path.join(root, "dense", "dense.json")))["epochs"] == total
            for b in budgets:
                d = os.path.join(root, crossfit.bkey(b))
                static = json.load(open(os.path.join(d, "static", "config.json")))["epochs"]
                prune = json.load(open(os.path.join(d, "prune_config.json")))["epochs"]
                rl = json.load(open(os.path.join(d, "counterfactual", "rl", "metrics.json")))
                fin = json.load(open(os.path.join(d, "counterfactual", "finish.json")))
                rl_epochs = torch.load(os.path.join(d, "counterfactual", "rl", "checkpoint.pt"),
                                       weights_only=True)["epoch"]
                assert rl["ending"].get("route_epochs") is None  # the last phase is the finish step's
                assert static == total == prune + rl_epochs + fin["epochs"]
                assert fin["epochs"] == s["epochs"]["routes"] * factor


@pytest.mark.slow
def test_budgets_match_and_the_report_is_of_the_committed_unit_results(quick):
    out, report = quick
    results = out / "results" / "transform"
    units = crossfit.load_results(str(results))
    assert len(units) == report["units"] and crossfit.load_results(str(results), factor=2)
    for x in units:
        for k, e in x["budgets"].items():
            assert e["fixed"]["gflops"] <= e["gflops"] * 1.0001  # never more than the budget
            assert abs(e["static"]["gflops"] / e["gflops"] - 1) <= 0.05  # static pruning pushed to it
            assert e["gflops"] <= e["limit_gflops"] * 1.0001
    for k, e in report["budgets"].items():
        for arm in ("dynamic", "fixed", "static", "level_ft"):
            pooled = np.concatenate([crossfit.unbits(x["budgets"][k][arm]["test"]) for x in units]).mean() * 100
            assert e["acc"][arm] == pytest.approx(pooled)
        dyn = np.concatenate([crossfit.unbits(x["budgets"][k]["dynamic"]["test"]) for x in units])
        fix = np.concatenate([crossfit.unbits(x["budgets"][k]["fixed"]["test"]) for x in units])
        c = e["dynamic_vs_fixed"]["mcnemar"]
        assert (c["only_a"], c["only_b"]) == (int((dyn & ~fix).sum()), int((fix & ~dyn).sum()))
    # a rerun elsewhere: the work is gone, the committed unit results are all it needs
    shutil.rmtree(out / "work" / "transform" / units[0]["unit"])
    proc = subprocess.run([sys.executable, "-m", "evaluation.crossfit", "report", "--quick", "--out", str(out / "work"),
                           "--results", str(out / "results")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.load(open(results / "report.json"))
    assert again["budgets"] == report["budgets"]


def test_a_finished_unit_plans_no_task(tmp_path):
    s = {**crossfit.SCALES["quick"], "name": "quick"}
    split = stats.Split(seed=0, fold=0, train=np.arange(2), val=np.arange(0), test=np.arange(2))
    units = [("s0f0", split)]
    res = str(tmp_path / "res")
    all_tasks = crossfit.plan(s, units, str(tmp_path / "work"), "counterfactual", res)
    assert {t.name for t in all_tasks} >= {"s0f0/sp", "s0f0/collect", "s0f0/x2/collect"}
    os.makedirs(os.path.join(res, "units"))
    open(crossfit.unit_result(res, "s0f0", "counterfactual"), "w").write("{}")
    left = [t.name for t in crossfit.plan(s, units, str(tmp_path / "work"), "counterfactual", res)]
    assert "s0f0/collect" not in left and "s0f0/x2/collect" in left  # only the doubling check, and what it needs
    assert not [n for n in left if "/x2/" not in n and n.split("/")[1] not in ("sp", "targets") and
                not n.split("/")[1].startswith(("prune", "budget"))]
    open(crossfit.unit_result(res, "s0f0", "counterfactual", 2), "w").write("{}")
    assert crossfit.plan(s, units, str(tmp_path / "work"), "counterfactual", res) == []


def test_level_router_is_the_best_assignment_at_the_average_budget():
    rng = np.random.default_rng(0)
    level = rng.integers(0, 3, 60)
    n = {k: (level == k).sum() for k in range(3)}
    exact = 0
    for trial in range(20):
        rows = [{"route": [i], "flops": f, "correct": rng.random(60) < p}
                for i, (f, p) in enumerate(zip(sorted(rng.uniform(1, 5, 4)), rng.uniform(0.3, 0.9, 4)))]
        budget = rng.uniform(1.5, 4.5)
        got = crossfit.level_routes(rows, level, budget)
        best = {}  # the most right answers at an average cost within the window, and at most the budget
        for pick in itertools.product(range(4), repeat=3):
            cost = sum(rows[r]["flops"] * n[k] for k, r in enumerate(pick)) / len(level)
            right = sum(rows[r]["correct"][level == k].sum() for k, r in enumerate(pick))
            for key, ok in (("window", 0.9 * budget <= cost <= budget), ("below", cost <= budget)):
                if ok and right > best.get(key, -1):
                    best[key] = right
        if not best:
            assert got is None
            continue
        right = sum(rows[got[k][0]]["correct"][level == k].sum() for k in range(3))
        cost = sum(rows[got[k][0]]["flops"] * n[k] for k in range(3)) / len(level)
        assert cost <= budget + 1e-9
        if "window" in best and cost >= 0.9 * budget:  # (the rounding of costs may leave it just below)
            assert right == best["window"]
            exact += 1
        else:
            assert right <= best["below"]
    assert exact >= 10
    assert crossfit.level_routes(rows, level, 0.5) is None  # nothing fits


def test_transformed_digits_grade_a_geometric_difficulty():
    images, labels, level = transformed_digits(16, seed=0, levels=5)
    plain, plain_labels, _ = digits_images(16, seed=0)
    assert (labels == plain_labels).all() and set(level.tolist()) == set(range(5))
    moved = np.abs(images.astype(float) - plain.astype(float)).mean((1, 2, 3))
    assert moved[level == 0].max() < 1.0  # level 0: the digit as bundled (up to resampling)
    by_level = [moved[level == k].mean() for k in range(5)]
    assert all(a < b for a, b in zip(by_level, by_level[1:]))  # harder levels move the digit more
    again, _, again_level = transformed_digits(16, seed=0, levels=5)
    assert (again == images).all() and (again_level == level).all()
    # no noise: a pixel off the digit and its clutter stays black, as in the bundled digits
    assert (images == 0).mean() >= 0.5 * (plain == 0).mean()


def test_knee_is_the_largest_budget_losing_a_point():
    curve = [{"fraction": 1.0, "val_acc": 90.0}, {"fraction": 0.4, "val_acc": 90.5},
             {"fraction": 0.15, "val_acc": 89.0}, {"fraction": 0.07, "val_acc": 86.0}]
    assert crossfit.knee(curve, "val_acc") == (90.5, 0.15, 0.07)


@pytest.mark.slow
def test_the_committed_report_is_what_the_committed_units_give(tmp_path):
    """The report command on a copy of the committed unit results (and the wall-clock's speed.json) rewrites
    the committed report exactly: the work folder holds nothing but the images it writes."""
    committed = os.path.join(ROOT, "evaluation", "results", "crossfit", "transform")
    shutil.copytree(committed, tmp_path / "results" / "transform", ignore=shutil.ignore_patterns("report.*"))
    proc = subprocess.run([sys.executable, "-m", "evaluation.crossfit", "report", "--family", "transform", "--out",
                           str(tmp_path / "work"), "--results", str(tmp_path / "results")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("report.json", "report.md"):
        with open(os.path.join(committed, name)) as a, open(tmp_path / "results" / "transform" / name) as b:
            assert b.read() == a.read(), name


def test_a_ladder_on_finished_units_plans_every_task_it_waits_for(tmp_path):
    """Units whose own results are committed but whose doubling ladder is not: the plan holds every task the
    ladder's tasks depend on, down to stage 1 (a dependency left out would be waited for forever)."""
    s = {**crossfit.SCALES["quick"], "name": "quick",
         "double": {**crossfit.SCALES["quick"]["double"], "factors": (2, 4)}}
    units = [(f"s0f{f}", SimpleNamespace(seed=0, fold=f)) for f in (0, 1)]
    results = tmp_path / "results"
    (results / "units").mkdir(parents=True)
    for name, _ in units:
        (results / "units" / f"{name}.json").write_text("{}")
    tasks = crossfit.plan(s, units, str(tmp_path / "work"), "counterfactual", str(results))
    names = {t.name for t in tasks}
    assert {d for t in tasks for d in t.deps} <= names
    assert {"s0f0/sp", "s0f0/x2/collect", "s0f0/x4/collect"} <= names and "s0f1/x4/collect" not in names


@pytest.mark.slow
def test_a_ladder_cut_short_keeps_its_finished_steps_whole(tmp_path):
    """One unit has gone a step further up the doubling ladder than the others: that step is pooled over it
    alone, and every step below it over all the units, as if the further step had not begun."""
    committed = os.path.join(ROOT, "evaluation", "results", "crossfit", "transform")
    factors = crossfit.factors({**crossfit.SCALES["digits"], "name": "digits"})
    units = sorted(f[:-len(".json")] for f in os.listdir(os.path.join(committed, "units")) if "-x" not in f)
    done = [f for f in factors if all(os.path.isfile(os.path.join(committed, "units", f"{u}-x{f}.json"))
                                      for u in units)]
    reports = []
    for keep in (units, units[:1]):  # the committed ladder's last whole step; then only the first unit's
        results = tmp_path / f"results{len(keep)}"
        shutil.copytree(committed, results / "transform", ignore=shutil.ignore_patterns("report.*", "speed.json"))
        for u, f in itertools.product(units, factors):
            if f > done[-1] or (f == done[-1] and u not in keep):
                (results / "transform" / "units" / f"{u}-x{f}.json").unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-m", "evaluation.crossfit", "report", "--family", "transform",
                               "--out", str(tmp_path / "work"), "--results", str(results)],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports.append(json.load(open(results / "transform" / "report.json"))["convergence"]["test_by_epochs"])
    whole, cut = reports
    assert [e["units"] for e in whole] == [len(units)] * (len(done) + 1)
    assert [e["units"] for e in cut] == [len(units)] * len(done) + [1]
    assert cut[:-1] == whole[:-1] and cut[-1]["dynamic"] != whole[-1]["dynamic"]

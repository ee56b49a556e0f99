"""main_search.py on a tiny written dataset (4 classes of 16x16 images, ResNet-8 at width 1, 1 epoch per
stage): the table's rows keep the budget on the validation split, the test split is read once per chosen
network and never by the search, a search killed mid-trial resumes without redoing finished trials, and
two processes sharing one SQLite study split its trials without running any twice."""
import json
import os
import subprocess
import sys

import pytest

import main_search
import main_sp
import utils.stage as stage
from conftest import ROOT
from helpers import assert_one_line_error, run_script, snapshot, tiny_dataset

STAGE_FLAGS = ["--rl_epochs", "1", "--rl_lr", "0.01", "--rl_bs", "16", "--rl_weight", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stage-1 result trained with a validation split, and a small stage-2 config."""
    root = tmp_path_factory.mktemp("search")
    data = tiny_dataset(root / "data", classes=4, train_per_class=24, test_per_class=6, size=16)
    # SkipNet's recipe, as the demo: a dense start, then the supervised phase with hard switches (one epoch of
    # the latter from a random start leaves the network at chance, its validation accuracy noise)
    main_sp.main(["--depth", "8", "--width", "1", "--epochs", "4", "--dense_epochs", "2", "--lr", "0.05", "--bs", "16",
                  "--num_workers", "0", "--resize", "16", "--val_split", "0.25", "--device", "cpu", "--data_dir", data,
                  "--result_dir", str(root / "base")])
    config = root / "prune.json"
    # EigenDamage's plain ranking: on this 4-class net (24 validation images, one is 4.2 points) it is the one
    # whose static trials stay within the tests' budget; the search's machinery is what is tested here
    config.write_text(json.dumps({"epochs": 1, "lr": 0.01, "bs": 16, "fisher_batches": 2, "criterion": "score"}))
    return root


def search_argv(stage1, result_dir, *extra):
    return ["--result_dir", str(result_dir), "--checkpoint", str(stage1 / "base" / "sp" / "checkpoint.pt"),
            "--prune_config", str(stage1 / "prune.json"), *STAGE_FLAGS, *extra]


def fresh_result_dir(stage1, name):
    """A result dir of its own (the search writes <result_dir>/search/)."""
    path = stage1 / name
    path.mkdir()
    return path


def count_test_reads(monkeypatch):
    """Every pass over a loader of the test images, recorded as True when inside the search's final
    evaluation (every stage and the search build their loaders through utils.stage.load_data)."""
    reads, test_sets, in_final = [], [], [False]
    real_load, real_loader, real_final = stage.load_dataset, stage.BatchLoader, main_search.evaluate_on_test

    def load_dataset(*args, **kwargs):
        ds = real_load(*args, **kwargs)
        test_sets.append(ds.test_x)
        return ds

    class Loader(real_loader):
        def __init__(self, x, *args, **kwargs):
            super().__init__(x, *args, **kwargs)
            self.is_test = any(x is t for t in test_sets)

        def __iter__(self):
            if self.is_test:
                reads.append(in_final[0])
            return super().__iter__()

    def final(*args, **kwargs):
        in_final[0] = True
        try:
            return real_final(*args, **kwargs)
        finally:
            in_final[0] = False

    monkeypatch.setattr(stage, "load_dataset", load_dataset)
    monkeypatch.setattr(stage, "BatchLoader", Loader)
    monkeypatch.setattr(main_search, "evaluate_on_test", final)
    return reads


def test_search_keeps_the_budget_and_reads_test_once_per_chosen_network(stage1, monkeypatch):
    out = fresh_result_dir(stage1, "one")
    reads = count_test_reads(monkeypatch)
    main_search.main(search_argv(stage1, out, "--budget", "5", "--static_trials", "3", "--dynamic_trials", "2"))
    search = out / "search"
    table = json.loads((search / "table.json").read_text())
    threshold = table["baseline_val_acc"] - 5
    rows = {r["stage"]: r for r in table["rows"]}
    assert rows["sp"]["present"] and rows["prune"]["present"], table
    for r in table["rows"]:
        if r["present"]:
            assert r["val_acc"] >= threshold, r  # chosen within the budget, on the validation split
    assert rows["prune"]["settings"]["compression target"] > 0
    # three networks in the table, each read once on test, all inside the final evaluation
    assert reads == [True] * sum(r["present"] for r in table["rows"])

    trials = json.loads((search / "trials.json").read_text())["trials"]
    ran = [t for t in trials if t["state"] == "COMPLETE"]
    assert sum(t["phase"] == "static" for t in ran) == 3 and 1 <= sum(t["phase"] == "dynamic" for t in ran) <= 2
    for t in ran:  # every trial is a stage folder that ended on the validation split
        metrics = json.loads(open(os.path.join(t["dir"], "prune" if t["phase"] == "static" else "rl",
                                               "metrics.json")).read())
        assert metrics["final_split"] == "val" and "val_acc" in metrics
        assert not [k for k in metrics if k.startswith("test")], metrics
        assert t["feasible"] == (t["val_acc"] >= threshold)
    assert (search / "pareto.png").stat().st_size > 0 and "| static + dynamic pruning |" in \
        (search / "table.md").read_text()

    # the same command again: nothing to run, nothing read on test
    reads.clear()
    main_search.main(search_argv(stage1, out, "--budget", "5", "--static_trials", "3", "--dynamic_trials", "2"))
    assert reads == [] and json.loads((search / "table.json").read_text())["rows"] == table["rows"]


def test_search_resumes_after_being_killed_mid_trial(stage1):
    out = fresh_result_dir(stage1, "killed")
    argv = ["main_search.py", *search_argv(stage1, out, "--static_trials", "3", "--dynamic_trials", "1",
                                           "--budget", "50")]
    killed = run_script(*argv, env={"DYNPRUNE_KILL_AT": "trial:3:saved:1", "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    static = out / "search" / "trials" / "static"
    finished = {d: snapshot(static / d) for d in os.listdir(static)
                if (static / d / "prune" / "metrics.json").is_file()}
    assert len(finished) == 2 and len(os.listdir(static)) == 3
    (interrupted,) = set(os.listdir(static)) - set(finished)
    assert (static / interrupted / "prune" / "checkpoint.pt").is_file()

    again = run_script(*argv, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [line for line in again.stdout.splitlines() if line.startswith("[search] static")]
    assert len(lines) == 1 and f"compression {interrupted[1:]}:" in lines[0], again.stdout[-3000:]
    for d, files in finished.items():
        assert snapshot(static / d) == files  # finished trials not redone
    config = json.loads((static / interrupted / "prune_config.json").read_text())
    assert config["resume"] is True  # the interrupted trial continued from its checkpoint
    trials = json.loads((out / "search" / "trials.json").read_text())["trials"]
    states = sorted(t["state"] for t in trials if t["phase"] == "static")
    assert states == ["COMPLETE"] * 3 + ["FAIL"]  # the killed process's trial, retried at the same point
    assert (out / "search" / "table.md").is_file()


def test_two_processes_share_one_study_without_running_a_trial_twice(stage1):
    out = fresh_result_dir(stage1, "shared")
    storage = f"sqlite:///{out}/shared.db"
    argv = [sys.executable, "main_search.py", *search_argv(stage1, out, "--static_trials", "4", "--dynamic_trials",
                                                           "0", "--budget", "50", "--storage", storage)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert not (out / "search" / "search.db").exists()  # --storage was used
    ran = [line.split(":")[0] for stdout, _ in outputs for line in stdout.splitlines()
           if line.startswith("[search] static")]
    pruned = sum(stdout.count("[prune] round 1:") for stdout, _ in outputs)
    assert len(ran) == len(set(ran)) == pruned == 4, outputs
    trials = json.loads((out / "search" / "trials.json").read_text())["trials"]
    complete = [t["point"]["compression"] for t in trials if t["state"] == "COMPLETE"]
    assert len(complete) == len(set(complete)) == 4


def test_final_split_val_needs_a_validation_split(tmp_path):
    data = tiny_dataset(tmp_path / "data", classes=2, train_per_class=8, test_per_class=2, size=16)
    proc = run_script("main_sp.py", "--depth", "8", "--width", "1", "--epochs", "1", "--num_workers", "0",
                      "--resize", "16", "--device", "cpu", "--data_dir", data, "--result_dir",
                      str(tmp_path / "r"), "--final_split", "val")
    assert_one_line_error(proc, "--final_split val", "--val_split")


@pytest.mark.parametrize("flags,words", [(["--gamma", "2"], ["--gamma 2.0", "stage 3"]),
                                         (["--rl_lr", "inf"], ["--rl_lr inf", "finite"]),
                                         (["--rl_route_epochs", "2", "--rl_route_lr", "0"], ["--rl_route_lr"])])
def test_stage3_flags_are_refused_before_any_work(tmp_path, flags, words):
    """What stage 3 would refuse fails the search at once (not after its static phase, as failed trials),
    and naming the search's flag; no checkpoint is needed to find out, nothing is written."""
    proc = run_script("main_search.py", "--result_dir", str(tmp_path / "r"), *flags)
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "r").exists()

"""main_search.py on a tiny written dataset (4 classes of 16x16 images, ResNet-8 at width 1, 1 epoch per
stage): the table's rows keep the budget on the validation split, the test split is read once per chosen
network and never by the search, a search killed mid-trial resumes without redoing finished trials, two
processes sharing one SQLite study split its trials without running any twice, three workers started
together never claim one point or folder twice, and a phase that ran no trial says why."""
import collections
import dataclasses
import json
import os
import subprocess
import sys

import optuna

import pytest

import main_search
import utils.data as stage
from conftest import ROOT
from helpers import assert_one_line_error, run_script, snapshot, tiny_dataset
from search import protocol
from search.bisection import Knob, next_point, no_trial_reason
from search.phase import open_storage, open_study
from search.report import missing_notes

STAGE_FLAGS = ["--rl_epochs", "1", "--rl_lr", "0.01", "--rl_bs", "16", "--rl_weight", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, trained_stage1):
    """The session's stage-1 result (conftest.trained_stage1: trained with a validation split, SkipNet's
    recipe) seen as base/, beside a small stage-2 config; the searches write their own folders here."""
    root = tmp_path_factory.mktemp("search")
    (root / "base").symlink_to(trained_stage1[2], target_is_directory=True)  # read only
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
    evaluation (every stage and the search build their loaders through utils.data.load_data)."""
    reads, test_sets, in_final = [], [], [False]
    real_load, real_loader, real_final = stage.load_dataset, stage.BatchLoader, protocol.evaluate_on_test

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
    monkeypatch.setattr(protocol, "evaluate_on_test", final)
    return reads


@pytest.mark.slow
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


@pytest.mark.slow
def test_search_resumes_after_being_killed_mid_trial(stage1, monkeypatch, capsys):
    """Killed mid-trial (SIGKILL: no chance to say so), the same command again waits for the dead trial's
    heartbeat to lapse (here 1 s: search.phase.GRACE_SECONDS), fails it and resumes its folder."""
    import search.phase
    out = fresh_result_dir(stage1, "killed")
    argv = ["main_search.py", *search_argv(stage1, out, "--static_trials", "3", "--dynamic_trials", "1",
                                           "--budget", "50")]
    killed = run_script(*argv, env={"DYNPRUNE_KILL_AT": "trial:3:saved:1", "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    static = out / "search" / "trials" / "search.static"  # <study>/<trial number>-compression<c>
    finished = {d: snapshot(static / d) for d in os.listdir(static)
                if (static / d / "prune" / "metrics.json").is_file()}
    assert len(finished) == 2 and len(os.listdir(static)) == 3
    (interrupted,) = set(os.listdir(static)) - set(finished)
    assert (static / interrupted / "prune" / "checkpoint.pt").is_file()

    monkeypatch.setattr(search.phase, "GRACE_SECONDS", 1)
    monkeypatch.setattr(search.phase, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(search.phase, "POLL_SECONDS", 0.2)
    capsys.readouterr()
    main_search.main(argv[1:])
    stdout = capsys.readouterr().out
    lines = [line for line in stdout.splitlines() if line.startswith("[search] static")]
    point = interrupted.split("compression")[1]
    assert len(lines) == 1 and f"compression {point}:" in lines[0], stdout[-3000:]
    assert len(os.listdir(static)) == 3  # the retry took over the dead trial's folder
    for d, files in finished.items():
        assert snapshot(static / d) == files  # finished trials not redone
    assert "[prune] resuming from round 1," in stdout  # the interrupted trial continued from its checkpoint
    trials = json.loads((out / "search" / "trials.json").read_text())["trials"]
    states = sorted(t["state"] for t in trials if t["phase"] == "static")
    assert states == ["COMPLETE"] * 3 + ["FAIL"]  # the killed process's trial, retried at the same point
    assert (out / "search" / "table.md").is_file()


@pytest.mark.slow
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


# One worker of the collision test: for each launch, opens the study named on stdin, says "opened", waits for
# "go" (the barrier: the test releases all three at once), then runs a phase of the search's Worker whose
# trial marks its folder exclusively (a second run in it fails) and logs its point.
WORKER = r"""
import json, os, sys
import optuna
from search.bisection import Knob
import search.phase
from search.phase import Worker, open_storage, open_study
optuna.logging.set_verbosity(optuna.logging.WARNING)
search.phase.POLL_SECONDS = 0.05  # trials of milliseconds: a worker waiting for the others looks often
knob = Knob("compression", 0.1, 0.9, "high", 0.01)
for round_dir in iter(sys.stdin.readline, ""):
    round_dir = round_dir.strip()
    study = open_study(open_storage(f"sqlite:///{round_dir}/study.db"), "s.static", knob, {"budget": 6})
    print("opened", flush=True)
    assert sys.stdin.readline() == "go\n"

    def run(x, folder):
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(os.path.join(folder, "ran"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        with open(os.path.join(round_dir, "log"), "a") as f:
            f.write(json.dumps([x, folder]) + "\n")
        return {"val_acc": 90.0 if x <= 0.6 else 10.0, "val_gflops": 1 - x, "feasible": x <= 0.6}

    Worker(os.path.join(round_dir, "trials"), log=lambda s: None).run_phase(
        study, knob, 6, run, lambda *a: "")
    print("done", flush=True)
"""


@pytest.mark.slow
def test_three_workers_started_together_never_claim_a_point_or_folder_twice(tmp_path):
    """Five launches of three workers released together on a fresh study: every point and every folder
    runs once, the phase runs exactly its 6 trials, and every worker (a loser of a race included) exits 0.
    The workers' Python stays up between launches, so that each launch costs trials, not imports."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(3)]

    def tell_all(message, answer):
        for w in workers:
            w.stdin.write(message + "\n")
            w.stdin.flush()
        for w in workers:
            assert w.stdout.readline() == answer + "\n", w.stderr.read()[-3000:]

    try:
        for launch in range(5):
            round_dir = tmp_path / f"launch{launch}"
            round_dir.mkdir()
            url = f"sqlite:///{round_dir}/study.db"
            open_study(open_storage(url), "s.static", Knob("compression", 0.1, 0.9, "high", 0.01), {"budget": 6})
            tell_all(str(round_dir), "opened")  # each then blocks on stdin
            tell_all("go", "done")
            ran = [tuple(json.loads(line)) for line in (round_dir / "log").read_text().splitlines()]
            points = collections.Counter(x for x, _ in ran)
            folders = collections.Counter(folder for _, folder in ran)
            assert len(ran) == 6 and max(points.values()) == 1 and max(folders.values()) == 1, (launch, ran)
            complete = [t.params["compression"] for t in optuna.load_study(study_name="s.static", storage=url)
                        .get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
            assert sorted(complete) == sorted(points), (launch, complete)
    finally:
        for w in workers:
            w.stdin.close()  # end of input: the worker exits
        errors = [w.stderr.read() for w in workers]
        for w in workers:
            w.wait(timeout=60)
    for w, err in zip(workers, errors):
        assert w.returncode == 0 and "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_a_dynamic_phase_that_ran_no_trial_says_why(stage1, monkeypatch, capsys):
    """A GFLOPs interval too narrow for a trial: no dynamic trial, and the table says so (not "no trial within
    the budget", which says that trials ran)."""
    real = protocol.dynamic_knob

    def narrow(*args, **kwargs):
        knob = real(*args, **kwargs)
        return dataclasses.replace(knob, low=knob.high - knob.resolution)

    monkeypatch.setattr(protocol, "dynamic_knob", narrow)
    out = fresh_result_dir(stage1, "narrow")
    main_search.main(search_argv(stage1, out, "--budget", "50", "--min_compression", "0.5", "--max_compression",
                                 "0.5", "--static_trials", "1", "--dynamic_trials", "2"))
    search = out / "search"
    rows = {r["stage"]: r for r in json.loads((search / "table.json").read_text())["rows"]}
    assert rows["prune"]["present"] and not rows["rl"]["present"]
    note = rows["rl"]["note"]
    assert note.startswith("the dynamic phase ran no trial: on the network at compression 0.5") \
        and "target_gflops interval [" in note and "too narrow" in note and "within the budget" not in note, note
    assert note in (search / "table.md").read_text()
    assert "[search] dynamic (compression 0.5): no trial" in capsys.readouterr().out
    trials = json.loads((search / "trials.json").read_text())["trials"]
    assert [t["phase"] for t in trials] == ["static"]


def test_why_a_phase_ran_no_trial_is_told_apart_from_trials_outside_the_budget():
    knob = Knob("target_gflops", 1.0, 2.0, "low", 0.03)
    assert no_trial_reason(knob) is None and next_point(knob, [], []) == 1.5
    empty = dataclasses.replace(knob, low=2.5)
    assert "is empty" in no_trial_reason(empty) and next_point(empty, [], []) is None
    narrow = dataclasses.replace(knob, low=1.95)
    assert "too narrow" in no_trial_reason(narrow) and next_point(narrow, [], []) is None
    assert no_trial_reason(dataclasses.replace(knob, low=2.0)) is None  # one fixed value: one trial

    def study(*feasible):
        s = optuna.create_study(directions=["maximize", "minimize"])
        for i, ok in enumerate(feasible):
            s.add_trial(optuna.trial.create_trial(params={"x": i / 10}, distributions={
                "x": optuna.distributions.FloatDistribution(0, 1)}, values=[1.0, 1.0], user_attrs={"feasible": ok}))
        return s

    ran = missing_notes(study(False), [(0.5, study(False, False))], False, 2, [])
    assert ran == {"prune": "1 static trial ran, none within the budget on the validation split",
                   "rl": "the dynamic phase ran no trial: no static network within the budget to start from"}
    notes = missing_notes(study(True), [(0.5, study(False, False))], True, 2, [])
    assert notes["rl"] == "2 dynamic trials ran, none within the budget on the validation split"
    notes = missing_notes(study(True), [], True, 2, ["on the network at compression 0.5, its x interval is empty"])
    assert notes["rl"] == "the dynamic phase ran no trial: on the network at compression 0.5, its x interval is empty"
    assert missing_notes(study(True), [], True, 0, [])["rl"] == "the dynamic phase was not run (--dynamic_trials 0)"


@pytest.mark.slow
def test_final_split_val_needs_a_validation_split(tmp_path):
    data = tiny_dataset(tmp_path / "data", classes=2, train_per_class=8, test_per_class=2, size=16)
    proc = run_script("main_sp.py", "--depth", "8", "--width", "1", "--epochs", "1", "--num_workers", "0",
                      "--resize", "16", "--device", "cpu", "--data_dir", data, "--result_dir",
                      str(tmp_path / "r"), "--final_split", "val")
    assert_one_line_error(proc, "--final_split val", "--val_split")


@pytest.mark.slow
@pytest.mark.parametrize("flags,words", [(["--gamma", "2"], ["--gamma 2.0", "stage 3"]),
                                         (["--rl_lr", "inf"], ["--rl_lr inf", "finite"]),
                                         (["--rl_route_epochs", "2", "--rl_route_lr", "0"], ["--rl_route_lr"])])
def test_stage3_flags_are_refused_before_any_work(tmp_path, flags, words):
    """What stage 3 would refuse fails the search at once (not after its static phase, as failed trials),
    and naming the search's flag; no checkpoint is needed to find out, nothing is written."""
    proc = run_script("main_search.py", "--result_dir", str(tmp_path / "r"), *flags)
    assert_one_line_error(proc, *words)
    assert not (tmp_path / "r").exists()


# A worker whose first trial holds until the file "release" appears in its round folder; it logs every
# point it runs, and says "holding" once inside the held trial.
HOLDING_WORKER = r"""
import json, os, sys, time
import optuna
from search.bisection import Knob
import search.phase
from search.phase import Worker, open_storage, open_study
optuna.logging.set_verbosity(optuna.logging.WARNING)
search.phase.POLL_SECONDS = 0.05
round_dir = sys.argv[1]
knob = Knob("compression", 0.1, 0.9, "high", 0.01)
study = open_study(open_storage(f"sqlite:///{round_dir}/study.db"), "s.static", knob, {"budget": 3})
held = []

def run(x, folder):
    with open(os.path.join(round_dir, "log"), "a") as f:
        f.write(json.dumps([x, folder]) + "\n")
    if not held:
        held.append(x)
        print("holding", flush=True)
        while not os.path.exists(os.path.join(round_dir, "release")):
            time.sleep(0.05)
    return {"val_acc": 90.0, "val_gflops": 1 - x, "feasible": True}

Worker(os.path.join(round_dir, "trials"), log=lambda s: None).run_phase(study, knob, 3, run, lambda *a: "")
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_live_trial_of_a_worker_in_another_pid_namespace_is_never_failed(tmp_path):
    """Workers in other containers or machines on one storage: a live worker's trial whose recorded host and
    pid look like a dead process of this machine (another PID namespace, the same host name) is neither
    failed nor run again by a worker here; both workers end, every point runs once."""
    import socket
    import search.phase
    from search.bisection import Knob
    from search.phase import Worker
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    other = subprocess.Popen([sys.executable, "-c", HOLDING_WORKER, str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline() == "holding\n", other.stderr.read()[-3000:]
        gone = subprocess.Popen(["true"])
        gone.wait()  # a pid no process of this machine has now: what the other worker's pid means here
        knob = Knob("compression", 0.1, 0.9, "high", 0.01)
        study = open_study(open_storage(f"sqlite:///{tmp_path}/study.db"), "s.static", knob, {"budget": 3})
        (held,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        study._storage.set_trial_user_attr(held._trial_id, "host", socket.gethostname())
        study._storage.set_trial_user_attr(held._trial_id, "pid", gone.pid)

        def run(x, folder):
            with open(tmp_path / "log", "a") as f:
                f.write(json.dumps([x, folder]) + "\n")
            (tmp_path / "release").touch()  # the other worker's trial ends once this one has run
            return {"val_acc": 90.0, "val_gflops": 1 - x, "feasible": True}

        search.phase.POLL_SECONDS, before = 0.05, search.phase.POLL_SECONDS
        try:
            Worker(str(tmp_path / "trials"), log=lambda s: None).run_phase(study, knob, 3, run, lambda *a: "")
        finally:
            search.phase.POLL_SECONDS = before
        (tmp_path / "release").touch()
        stdout, stderr = other.communicate(timeout=120)
    finally:
        other.kill()
    assert other.returncode == 0 and stdout == "done\n" and "Traceback" not in stderr, stderr[-3000:]
    ran = [tuple(json.loads(line)) for line in (tmp_path / "log").read_text().splitlines()]
    assert len(ran) == 3 and len({x for x, _ in ran}) == 3 and len({f for _, f in ran}) == 3, ran
    states = [t.state for t in study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and optuna.trial.TrialState.FAIL not in states


def test_a_failed_trial_is_one_line(tmp_path):
    """A trial its stage refuses (a UserError: one line) is the search's one line, without Optuna's
    warning and traceback beside it; a later trial's failure is reported the same way."""
    from search.bisection import Knob
    from search.phase import Worker
    from utils.errors import UserError
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as main_search.py
    knob = Knob("compression", 0.1, 0.9, "high", 0.01)
    study = open_study(open_storage(f"sqlite:///{tmp_path}/s.db"), "s.static", knob, {"budget": 2})

    def run(x, folder):
        raise UserError(f"compression {x} is out of reach")

    import logging

    class Records(logging.Handler):  # what Optuna's loggers would print (its handler's stream is its own)
        def __init__(self):
            super().__init__(logging.WARNING)
            self.seen = []

        def emit(self, record):
            self.seen.append(record)

    records = Records()
    logging.getLogger("optuna").addHandler(records)
    lines = []
    try:
        Worker(str(tmp_path / "trials"), log=lines.append).run_phase(
            study, knob, 2, run, lambda x, r, s: f"[search] static compression {x}: failed ({r['error']})")
    finally:
        logging.getLogger("optuna").removeHandler(records)
    assert len(lines) == 2 and all("out of reach" in line for line in lines), lines
    assert [r.getMessage() for r in records.seen] == [] and not any(r.exc_info for r in records.seen)


def test_a_trial_folder_is_reused_only_under_its_own_settings(tmp_path, capsys):
    """A fresh --storage numbers its trials from 0 again, into folders an earlier search made: a folder is
    read (or resumed) only when it records the same settings and starting network, else it is moved aside
    and the trial runs (never the old network reported as the new settings' result)."""
    from search.trials import Trials
    from stages.rl import RLSettings
    ran = []

    def finish(result_dir, stage, epochs, gflops):  # what a stage leaves and returns, as far as the search sees it
        os.makedirs(os.path.join(result_dir, stage), exist_ok=True)
        with open(os.path.join(result_dir, stage, "checkpoint.pt"), "w") as f:
            f.write(f"network of {epochs} epochs")
        with open(os.path.join(result_dir, stage, "metrics.json"), "w") as f:
            json.dump({"val_acc": epochs, "val_gflops": gflops}, f)
        return {"val_acc": epochs, "val_gflops": gflops}

    def prune(cfg):  # stage 2's function
        ran.append(("prune", cfg.epochs))
        return finish(cfg.result_dir, "prune", cfg.epochs, 1.0)

    def rl(settings):
        ran.append(("rl", settings.epochs))
        return finish(settings.result_dir, "rl", settings.epochs, 0.5)

    stage1 = tmp_path / "sp.pt"
    stage1.write_text("stage-1 network")
    data = {"data_dir": "d", "img_type": "png", "resize": 16, "num_workers": 0, "val_split": 0.25, "seed": 0}

    def trials(epochs, rl_epochs, device="cpu", data_dir="d"):
        return Trials(str(tmp_path / "search"), str(stage1), {**data, "data_dir": data_dir}, {"epochs": epochs},
                      RLSettings(epochs=rl_epochs, **{**data, "data_dir": data_dir}), device, prune, rl)

    static = str(tmp_path / "search" / "trials" / "s.static" / "0-compression0.5")
    dynamic = str(tmp_path / "search" / "trials" / "s.dynamic.c0.5" / "0-alpha1")
    assert trials(1, 1).static(0.5, static)["val_acc"] == 1 and ran == [("prune", 1)]
    # the same settings (another device, data mounted elsewhere): read, not run again
    assert trials(1, 1, device="cuda", data_dir="/mnt/d").static(0.5, static)["val_acc"] == 1 and len(ran) == 1
    source = os.path.join(static, "prune", "checkpoint.pt")
    assert trials(1, 1).dynamic(source, "alpha", 1.0, dynamic)["val_acc"] == 1 and ran[-1] == ("rl", 1)
    assert trials(1, 1).dynamic(source, "alpha", 1.0, dynamic)["val_acc"] == 1 and len(ran) == 2

    # the prune config's epochs changed (and a new storage numbers this trial 0 again): run, never the old one
    assert trials(3, 1).static(0.5, static)["val_acc"] == 3 and ran[-1] == ("prune", 3)
    assert "epochs" in capsys.readouterr().out
    # the same stage-3 flags, but from another static network in that folder now: run again
    assert trials(3, 1).dynamic(source, "alpha", 1.0, dynamic)["val_acc"] == 1 and ran[-1] == ("rl", 1) \
        and len(ran) == 4
    assert trials(3, 2).dynamic(source, "alpha", 1.0, dynamic)["val_acc"] == 2 and ran[-1] == ("rl", 2)
    # nothing was deleted: the earlier folders are aside, with their results
    aside = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "search" / "trials") for f in files
             if f == "metrics.json" and "stale-" in d]
    assert sorted(json.loads(open(p).read())["val_acc"] for p in aside) == [1, 1, 1]

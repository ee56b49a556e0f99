"""Never lose work (issue: scale out, crash and resume, hostile input).

- a table of hostile inputs against all three entry points: one line naming the problem, exit status 2, no
  traceback, and --result_dir byte for byte as it was;
- a run killed with SIGKILL mid-epoch and restarted with --resume ends with the weights of an uninterrupted
  run, for every stage; a kill during a checkpoint write leaves the last good checkpoint;
- every stage under torchrun --nproc_per_node=2 (gloo) completes, and its checkpoint loads in one process.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import main_prune
import main_rl_prune
import main_sp
from conftest import ROOT
from helpers import run_script, snapshot, tiny_dataset
from runtime.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.errors import UserError, run_main

DATA = dict(classes=6, train_per_class=32, test_per_class=8, size=16)
COMMON = ["--bs", "16", "--num_workers", "0", "--device", "cpu"]
SP = ["--depth", "8", "--width", "1", "--lr", "0.05", "--resize", "16", *COMMON]
RL = ["--lr", "0.01", "--alpha", "0.5", *COMMON]  # the resize comes from the checkpoint


def prune_config(path, results, data, **over):
    cfg = {"result_dir": str(results), "data_dir": str(data), "num_workers": 0,
           "device": "cpu", "compression": 0.4, "epochs": 1, "lr": 0.01, "bs": 16, "fisher_batches": 2, **over}
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Tiny data and a finished three-stage run (checkpoints of every stage) to be hostile against."""
    tmp = tmp_path_factory.mktemp("robust")
    data = tiny_dataset(tmp / "data", **DATA)
    res = tmp / "results"
    main_sp.main([*SP, "--data_dir", data, "--result_dir", str(res), "--epochs", "1"])
    main_prune.main(["--config_path", prune_config(tmp / "config.json", res, data)])
    main_rl_prune.main([*RL, "--data_dir", data, "--result_dir", str(res), "--epochs", "1"])
    return tmp, data, res


def _evil_checkpoint(path, marker):
    class Evil:  # unpickling this would run a shell command that creates `marker`
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"format": FORMAT, "stage": "sp", "arch": {}, "model": {}, "payload": Evil()}, path)


def _mismatched_checkpoint(src, path):
    ckpt = torch.load(src, weights_only=True)
    ckpt["arch"] = {**ckpt["arch"], "depth": 14}  # says ResNet-14, holds the weights of a ResNet-8
    torch.save(ckpt, path)


def _non_finite_checkpoint(src, path, value, plain=False):
    """A copy of checkpoint `src` with one weight poisoned (as after an overflow); plain: a bare state dict."""
    ckpt = torch.load(src, weights_only=True)
    key = sorted(k for k, v in ckpt["model"].items() if v.is_floating_point())[-1]
    ckpt["model"][key] = ckpt["model"][key].clone().view(-1).index_fill(0, torch.tensor([0]), value) \
        .view_as(ckpt["model"][key])
    torch.save(ckpt["model"] if plain else ckpt, path)


def hostile_cases(tmp, data, res):
    """(entry point, argv, words the one error line must contain), built over files made here."""
    bad = tmp / "bad"
    if bad.exists():
        shutil.rmtree(bad)
    bad.mkdir()
    (bad / "empty").mkdir()
    (bad / "notes").mkdir()
    (bad / "notes" / "readme.txt").write_text("no images here")
    (bad / "file").write_text("a file where a folder should be")
    good_sp, good_prune, good_rl = (str(res / s / "checkpoint.pt") for s in ("sp", "prune", "rl"))
    raw = open(good_sp, "rb").read()
    (bad / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    (bad / "random.pt").write_bytes(os.urandom(4096))
    _evil_checkpoint(bad / "evil.pt", bad / "PWNED")
    _mismatched_checkpoint(good_sp, bad / "mismatch.pt")
    cfg = lambda name, **over: prune_config(bad / f"{name}.json", res, data, **over)  # noqa: E731
    _non_finite_checkpoint(good_sp, bad / "nan_sp.pt", float("nan"))
    _non_finite_checkpoint(good_sp, bad / "inf_state.pt", float("inf"), plain=True)
    _non_finite_checkpoint(good_prune, bad / "inf_prune.pt", float("-inf"))
    _non_finite_checkpoint(good_rl, bad / "nan_rl.pt", float("nan"))
    (bad / "invalid.json").write_text('{"result_dir": "x", "data_dir": ')
    missing = json.load(open(cfg("base")))
    del missing["data_dir"]
    json.dump(missing, open(bad / "missing.json", "w"))
    renamed = bad / "renamed"  # the same number of classes under other names
    shutil.copytree(data, renamed)
    for split in ("train", "test"):
        first = sorted(os.listdir(renamed / split))[0]
        os.rename(renamed / split / first, renamed / split / "zz_other")
    sp = lambda *a: ("sp", [*SP, "--epochs", "1", "--result_dir", str(res), *a])  # noqa: E731
    rl = lambda *a: ("rl", [*RL, "--epochs", "1", "--result_dir", str(res), *a])  # noqa: E731
    pr = lambda path, *a: ("prune", ["--config_path", path, *a])  # noqa: E731
    return [
        # data
        (*sp("--data_dir", str(bad / "missing")), ["does not exist"]),
        (*sp("--data_dir", str(bad / "empty")), ["empty"]),
        (*sp("--data_dir", str(bad / "notes")), ["train/"]),
        (*sp("--data_dir", data, "--img_type", "jpg"), ["jpg"]),
        (*pr(cfg("nodata", data_dir=str(bad / "missing"))), ["does not exist"]),
        (*pr(cfg("wrongtype", img_type="bmp")), ["bmp"]),
        (*rl("--data_dir", str(bad / "empty")), ["empty"]),
        (*rl("--data_dir", data, "--img_type", "jpg"), ["jpg"]),
        # config
        (*pr(cfg("unknown", learning_rate=0.1)), ["learning_rate"]),
        (*pr(str(bad / "missing.json")), ["data_dir"]),
        (*pr(cfg("range", compression=1.5)), ["compression"]),
        (*pr(cfg("negative", epochs=-1)), ["epochs"]),
        (*pr(cfg("ratio", compression=None, ratio=1.0)), ["ratio"]),
        (*pr(str(bad / "invalid.json")), ["invalid json"]),
        (*pr(str(bad / "nowhere.json")), ["no such file"]),
        (*sp("--data_dir", data, "--depth", "33"), ["depth"]),
        (*sp("--data_dir", data, "--network", "vgg"), ["vgg"]),
        (*rl("--data_dir", data, "--gamma", "2"), ["gamma"]),
        # checkpoints
        (*sp("--data_dir", data, "--resume", str(bad / "truncated.pt")), ["truncated"]),
        (*sp("--data_dir", data, "--resume", str(bad / "random.pt")), ["random.pt"]),
        (*sp("--data_dir", data, "--resume", good_prune), ["stage 2", "stage 1"]),
        (*sp("--data_dir", data, "--resume", str(bad / "mismatch.pt")), ["mismatch.pt"]),
        (*sp("--data_dir", data, "--resume", str(bad / "evil.pt")), ["refused"]),
        (*sp("--data_dir", data, "--pretrained", str(bad / "evil.pt")), ["refused"]),
        (*sp("--data_dir", data, "--pretrained", str(bad / "random.pt")), ["random.pt"]),
        (*pr(cfg("truncated", checkpoint=str(bad / "truncated.pt"))), ["truncated"]),
        (*pr(cfg("random", checkpoint=str(bad / "random.pt"))), ["random.pt"]),
        (*pr(cfg("stage", checkpoint=good_rl)), ["stage 3", "stage 1"]),
        (*pr(cfg("mismatch", checkpoint=str(bad / "mismatch.pt"))), ["mismatch.pt"]),
        (*pr(cfg("evil", checkpoint=str(bad / "evil.pt"))), ["refused"]),
        (*pr(cfg("resume", resume=good_sp)), ["stage 1", "stage 2"]),
        (*rl("--data_dir", data, "--checkpoint", str(bad / "truncated.pt")), ["truncated"]),
        (*rl("--data_dir", data, "--checkpoint", str(bad / "random.pt")), ["random.pt"]),
        (*rl("--data_dir", data, "--checkpoint", good_rl), ["stage 3"]),
        (*rl("--data_dir", data, "--checkpoint", str(bad / "mismatch.pt")), ["mismatch.pt"]),
        (*rl("--data_dir", data, "--checkpoint", str(bad / "evil.pt")), ["refused"]),
        (*rl("--data_dir", data, "--resume", good_prune), ["stage 2", "stage 3"]),
        # weights holding NaN or inf: refused before anything is written, in every stage and config
        (*sp("--data_dir", data, "--resume", str(bad / "nan_sp.pt")), ["nan_sp.pt", "nan or inf"]),
        (*sp("--data_dir", data, "--pretrained", str(bad / "nan_sp.pt")), ["nan_sp.pt", "nan or inf"]),
        (*sp("--data_dir", data, "--pretrained", str(bad / "inf_state.pt")), ["inf_state.pt", "nan or inf"]),
        (*pr(cfg("nan_true", checkpoint=str(bad / "nan_sp.pt"))), ["nan_sp.pt", "nan or inf"]),
        (*pr(cfg("nan_emp", checkpoint=str(bad / "nan_sp.pt"), fisher_type="empirical")), ["nan or inf"]),
        (*pr(cfg("nan_iter", checkpoint=str(bad / "nan_sp.pt"), compression=None, prune_mode="iterative",
                 rounds=[{"ratio": 0.2}])), ["nan or inf"]),
        (*pr(cfg("inf_resume", resume=str(bad / "inf_prune.pt"))), ["inf_prune.pt", "nan or inf"]),
        (*rl("--data_dir", data, "--checkpoint", str(bad / "inf_prune.pt")), ["inf_prune.pt", "nan or inf"]),
        (*rl("--data_dir", data, "--checkpoint", str(bad / "nan_sp.pt")), ["nan_sp.pt", "nan or inf"]),
        (*rl("--data_dir", data, "--resume", str(bad / "nan_rl.pt")), ["nan_rl.pt", "nan or inf"]),
        # stages out of order: nothing before them in a fresh result dir
        (*pr(cfg("order", result_dir=str(tmp / "fresh"))), ["run main_sp.py"]),
        ("rl", [*RL, "--epochs", "1", "--result_dir", str(tmp / "fresh"), "--data_dir", data], ["main_sp.py"]),
        # stages that disagree with the input pipeline their checkpoint records (stage 1 ran at 16 pixels)
        (*pr(cfg("resize32", resize=32)), ["resize 32", "16"]),
        (*rl("--data_dir", data, "--resize", "32"), ["resize 32", "16"]),
        (*pr(cfg("renamed", data_dir=str(renamed))), ["classes", "zz_other"]),
        (*rl("--data_dir", str(renamed)), ["classes", "zz_other"]),
        (*sp("--data_dir", data, "--resume", good_sp, "--resize", "32"), ["resize 32", "16"]),
        (*sp("--data_dir", data, "--resume", good_sp, "--augment", "none"), ["augment none", "cifar"]),
        (*sp("--data_dir", data, "--augment", "flip"), ["augment", "flip"]),
        (*pr(cfg("augment", augment="flip")), ["augment", "flip"]),
        # result dir
        (*sp("--data_dir", data, "--result_dir", str(bad / "file" / "sub")), ["not writable"]),
        (*sp("--data_dir", data, "--result_dir", str(bad / "file")), ["not a directory"]),
        (*pr(cfg("resultdir", result_dir=str(bad / "file"))), ["not a directory"]),
        (*rl("--data_dir", data, "--result_dir", str(bad / "file")), ["not a directory"]),
        # numbers argparse's float() takes but no training survives
        (*sp("--data_dir", data, "--lr", "nan"), ["--lr", "finite"]),
        (*rl("--data_dir", data, "--alpha", "inf"), ["--alpha", "finite"]),
        (*rl("--data_dir", data, "--switch_lr", "nan"), ["--switch_lr", "finite"]),
    ]


MAINS = {"sp": main_sp.main, "prune": main_prune.main, "rl": main_rl_prune.main}


def test_hostile_input_table(pipeline, capsys):
    """In-process for speed (run_main is the same wrapper the scripts' __main__ uses); the real-process
    exit path is covered by test_hostile_input_real_processes and tests/test_sp.py."""
    tmp, data, res = pipeline
    cases = hostile_cases(tmp, data, res)
    before = snapshot(res)
    outcomes = []
    for stage, argv, words in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: MAINS[stage](argv))
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        outcomes.append((stage, argv[-1], exit_info.value.code, err[-1] if err else ""))
        assert exit_info.value.code == 2, (stage, argv, err)
        assert len(err) == 1, (stage, argv, err)
        for word in words:
            assert word.lower() in err[0].lower(), (stage, argv, word, err[0])
        assert snapshot(res) == before, (stage, argv)
    assert not (tmp / "bad" / "PWNED").exists(), "a crafted checkpoint ran code when loaded"
    with open(tmp / "hostile_outcomes.json", "w") as f:
        json.dump(outcomes, f, indent=1)


def test_hostile_input_real_processes(pipeline):
    """A few of the cases as real processes: exit status 2, one line, no traceback, nothing written."""
    from helpers import assert_one_line_error
    tmp, data, res = pipeline
    cases = hostile_cases(tmp, data, res)
    before = snapshot(res)
    scripts = {"sp": "main_sp.py", "prune": "main_prune.py", "rl": "main_rl_prune.py"}
    for stage, argv, words in [cases[i] for i in (8, 22, 27, 35)]:
        assert_one_line_error(run_script(scripts[stage], *argv), *words)
    assert snapshot(res) == before
    assert not (tmp / "bad" / "PWNED").exists()


def test_kill_during_checkpoint_write_keeps_the_last_good_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {"stage": "sp", "epoch": 1, "model": {"w": torch.ones(3)}})
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time, torch
sys.path.insert(0, {ROOT!r})
import runtime.checkpoint as c
real_save = torch.save
def slow_save(obj, f):
    f.write(b"PK" * 1000); f.flush()
    open({str(tmp_path / 'writing')!r}, 'w').close()
    time.sleep(600)  # killed here, half-way through writing
c.torch.save = slow_save
c.save_checkpoint({str(path)!r}, {{"stage": "sp", "epoch": 2, "model": {{"w": torch.zeros(3)}}}})
"""])
    deadline = time.time() + 600
    while not (tmp_path / "writing").exists() and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    # the next save cleans up the half-written temporary file the killed process left
    save_checkpoint(str(path), {"stage": "sp", "epoch": 3, "model": {}})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "writing"]


def _epoch_of(path):
    return torch.load(path, weights_only=True)["epoch"]


def _kill_mid_run(argv, checkpoint, at="step:2:3"):
    """Run a stage that kills itself with SIGKILL at the fault-injection point `at` (utils/faults.py:
    by default epoch 2, before step 3's update), so the kill lands at the same place however busy the
    machine is. Returns the epoch its last checkpoint records."""
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DYNPRUNE_KILL_AT": at})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    return _epoch_of(checkpoint)


def _same_weights(a, b):
    a = torch.load(a, weights_only=True)
    b = torch.load(b, weights_only=True)
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("stage", ["sp", "prune", "rl", "rl-target"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(pipeline, tmp_path, stage):
    """Killed in epoch 2, the resumed run's weights are the uninterrupted run's bit for bit. rl-target
    (alpha adapted towards a GFLOPs target, then 2 route epochs) is killed twice: in epoch 2 (alpha's
    trajectory resumes exactly), and after resuming, in the second route epoch (the calibrations, route
    epochs and BN re-estimate after the last epoch are redone from its checkpoint)."""
    tmp, data, res = pipeline
    target, kills = [], [("step:2:3", 1)]  # (fault-injection point, epoch the last checkpoint then holds)
    if stage == "rl-target":
        stage = "rl"
        target = ["--target_gflops", str(0.8 * json.load(open(res / "prune" / "metrics.json"))["dense_gflops"]),
                  "--route_epochs", "2"]
        kills.append(("step:6:2", 4))  # loader epochs 5 and 6 are the route epochs
    runs = {}
    for name in ("straight", "killed"):
        out = tmp_path / name
        if stage != "sp":  # later stages start from the shared stage-1 (and stage-2) results
            shutil.copytree(res / "sp", out / "sp")
            if stage == "rl":
                shutil.copytree(res / "prune", out / "prune")
        if stage == "prune":
            argv = ["main_prune.py", "--config_path", prune_config(tmp_path / f"{name}.json", out, data, epochs=4)]
        else:
            script = "main_sp.py" if stage == "sp" else "main_rl_prune.py"
            argv = [script, *(SP if stage == "sp" else RL), "--epochs", "4", "--data_dir", data,
                    "--result_dir", str(out), "--seed", "5", *target]
        runs[name] = (argv, out / stage / "checkpoint.pt")
    argv, ckpt = runs["straight"]
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    argv, ckpt_killed = runs["killed"]
    for i, (at, epoch) in enumerate(kills):
        assert _kill_mid_run(argv + ["--resume"] * (i > 0), ckpt_killed, at) == epoch  # its last checkpoint
    proc = subprocess.run([sys.executable, *argv, "--resume"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    _same_weights(ckpt, ckpt_killed)
    if target:
        a, b = (torch.load(c, weights_only=True)["extra"]["price"]["alpha"] for c in (ckpt, ckpt_killed))
        assert torch.equal(a, b) and a.item() != 0.5
        a, b = (json.load(open(os.path.join(os.path.dirname(c), "metrics.json"))) for c in (ckpt, ckpt_killed))
        assert a["ending"] == b["ending"]  # calibrated after training, before route epoch 2, after the BN
        assert len(a["ending"]["calibration"]) == 3 and len(a["ending"]["route_epochs"]) == 2, a["ending"]


@pytest.mark.parametrize("stage", ["sp", "prune", "rl"])
def test_torchrun_two_processes(pipeline, tmp_path, stage):
    tmp, data, res = pipeline
    out = tmp_path / "ddp"
    if stage != "sp":
        shutil.copytree(res / "sp", out / "sp")
        if stage == "rl":
            shutil.copytree(res / "prune", out / "prune")
    if stage == "prune":
        argv = ["main_prune.py", "--config_path", prune_config(tmp_path / "c.json", out, data, bs=8)]
    else:
        argv = ["main_sp.py" if stage == "sp" else "main_rl_prune.py", *(SP if stage == "sp" else RL),
                "--bs", "8", "--epochs", "1", "--data_dir", data, "--result_dir", str(out)]
    if stage == "rl":  # the dual ascent, the calibrations and a route epoch (greedy_step) under DDP too
        target = 0.8 * json.load(open(res / "prune" / "metrics.json"))["dense_gflops"]
        argv += ["--target_gflops", str(target), "--route_epochs", "1"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    # the workers' own lines come first, torchrun's summary last: show both
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    path = str(out / stage / "checkpoint.pt")
    ckpt = load_checkpoint(path, (stage,))
    model = model_from_checkpoint(ckpt, path).eval()
    logits, _, _ = model(torch.randn(2, 3, 16, 16))
    assert torch.isfinite(logits).all()
    metrics = json.load(open(out / stage / "metrics.json"))
    assert metrics["test_images"] == DATA["classes"] * DATA["test_per_class"]  # every test image, once
    if stage == "rl":
        assert len(metrics["ending"]["route_epochs"]) == 1 and len(metrics["ending"]["calibration"]) == 2


def _factors_on_rank(rank, world_size, init_file, out_dir):
    import torch.distributed as dist
    from models import build_model, make_arch
    from pruners import collect_factors
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=5)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
    mine = [(x[rank::world_size], y[rank::world_size]) for x, y in batches]  # this rank's share of each batch
    factors = collect_factors(model, mine, "empirical", progress=False)
    if rank == 0:
        torch.save({n: (f.A, f.G) for n, f in factors.items()}, os.path.join(out_dir, f"factors{world_size}.pt"))
    dist.destroy_process_group()


def test_stage2_factors_of_two_ranks_equal_one_rank(tmp_path):
    import torch.multiprocessing as mp
    for world_size in (1, 2):
        mp.spawn(_factors_on_rank, args=(world_size, str(tmp_path / f"init{world_size}"), str(tmp_path)),
                 nprocs=world_size)
    one = torch.load(tmp_path / "factors1.pt", weights_only=True)
    two = torch.load(tmp_path / "factors2.pt", weights_only=True)
    assert one.keys() == two.keys() and len(one) >= 7
    for name in one:
        torch.testing.assert_close(two[name][0], one[name][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(two[name][1], one[name][1], rtol=1e-5, atol=1e-7)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(pipeline, tmp_path, monkeypatch):
    tmp, data, res = pipeline
    from runtime.loop import TrainingDiverged
    from runtime.steps import supervised_step
    calls = {"n": 0}
    steps_per_epoch = DATA["classes"] * DATA["train_per_class"] // 16

    def poisoned(model, x, y, **kw):
        loss, stats = supervised_step(model, x, y, **kw)
        if kw.get("mode") == "open":  # stage 1's default step also takes the dense loss: count steps once
            return loss, stats
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 3:  # the third step of the second epoch
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(main_sp, "supervised_step", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 3"):
        main_sp.main([*SP, "--epochs", "3", "--data_dir", data, "--result_dir", str(tmp_path)])
    assert torch.load(tmp_path / "sp" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_every_checkpoint_records_the_pipeline_later_stages_inherit_it(pipeline):
    tmp, data, res = pipeline
    records = [torch.load(res / s / "checkpoint.pt", weights_only=True)["pipeline"] for s in ("sp", "prune", "rl")]
    assert records[0]["resize"] == 16 and records[0]["augment"] == "cifar"
    assert records[0]["classes"] == sorted(os.listdir(os.path.join(data, "train")))
    assert len(records[0]["mean"]) == len(records[0]["std"]) == 3 and min(records[0]["std"]) > 0
    assert records[1] == records[0] and records[2] == records[0]  # stages 2 and 3 used stage 1's


@pytest.mark.parametrize("stage", ["sp", "rl"])
def test_model_from_checkpoint_works_on_raw_images_without_the_training_set(pipeline, stage):
    """load_model gives the network and its preprocessing: on the raw test PNGs it scores what the tool
    reported, with no statistics recomputed. Each number as its stage defines it: stage 1's test_acc is the
    dense network's (open mode, every block) and routed_acc its switches' routes; later stages' test_acc is
    the routed network's (the model's own mode)."""
    from runtime.checkpoint import load_model
    tmp, data, res = pipeline
    model, preprocess = load_model(str(res / stage / "checkpoint.pt"))
    test_dir = os.path.join(data, "test")
    files = [(os.path.join(test_dir, c, f), preprocess.classes.index(c))
             for c in sorted(os.listdir(test_dir)) for f in sorted(os.listdir(os.path.join(test_dir, c)))]
    x, y = preprocess([f for f, _ in files]), torch.tensor([y for _, y in files])
    metrics = json.load(open(res / stage / "metrics.json"))

    def accuracy(mode=None):
        with torch.no_grad():
            logits, _, _ = model(x, mode)
        return 100 * (logits.argmax(1) == y).double().mean().item()
    if stage == "sp":
        assert accuracy("open") == pytest.approx(metrics["test_acc"], abs=1e-9)
        assert accuracy() == pytest.approx(metrics["routed_acc"], abs=1e-9)
    else:
        assert accuracy() == pytest.approx(metrics["test_acc"], abs=1e-9)
    from PIL import Image  # a single image as an array, as a user might hold it
    x = preprocess(np.asarray(Image.open(files[0][0])))
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


def _run(argv, at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if at:
        env["DYNPRUNE_KILL_AT"] = at
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == (-signal.SIGKILL if at else 0), (at, proc.returncode, proc.stderr[-2000:])


@pytest.fixture
def one_thread():
    """In-process runs computing exactly as the one-thread subprocesses that are killed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stage2_killed_at_the_end_or_resumed_when_finished_ends_exactly_as_uninterrupted(pipeline, tmp_path,
                                                                                         one_thread):
    """Killed right after the last epoch's checkpoint or during the final BN re-estimation, then resumed;
    and a finished run resumed: weights AND BN buffers bit for bit those of the uninterrupted run. Only
    the killed runs are processes of their own (the suite must stay fast)."""
    tmp, data, res = pipeline
    ckpts = {}
    for name in ("straight", "saved:2", "bn:2"):
        out = tmp_path / name.replace(":", "_")
        shutil.copytree(res / "sp", out / "sp")
        argv = ["--config_path", prune_config(out / "c.json", out, data, epochs=2)]
        if name != "straight":
            _run(["main_prune.py", *argv], at=name)
        main_prune.main(argv + (["--resume"] if name != "straight" else []))
        ckpts[name] = (argv, out / "prune" / "checkpoint.pt")
    argv, straight = ckpts["straight"]
    for name in ("saved:2", "bn:2"):
        _same_weights(straight, ckpts[name][1])
    before = torch.load(straight, weights_only=True)["model"]
    main_prune.main([*argv, "--resume"])  # resuming a finished run changes nothing
    assert all(torch.equal(v, before[k]) for k, v in torch.load(straight, weights_only=True)["model"].items())


def test_iterative_rounds_checked_up_front_and_resume_after_a_later_round_changes(pipeline, tmp_path):
    tmp, data, res = pipeline
    rounds = lambda *targets: [{"ratio": t, "epochs": 1} for t in targets]  # noqa: E731
    iterative = dict(compression=None, prune_mode="iterative", fisher_batches=1)
    straight, grown = tmp_path / "straight", tmp_path / "grown"
    for out in (straight, grown):
        shutil.copytree(res / "sp", out / "sp")
    main_prune.main(["--config_path", prune_config(tmp_path / "s.json", straight, data, **iterative,
                                                   rounds=rounds(0.2, 0.3))])
    # the same two rounds, the second one added once the first is done: --resume continues from round 1
    main_prune.main(["--config_path", prune_config(tmp_path / "g1.json", grown, data, **iterative,
                                                   rounds=rounds(0.2))])
    main_prune.main(["--config_path", prune_config(tmp_path / "g2.json", grown, data, **iterative,
                                                   rounds=rounds(0.2, 0.3)), "--resume"])
    _same_weights(straight / "prune" / "checkpoint.pt", grown / "prune" / "checkpoint.pt")
    # a round already pruned may not change
    with pytest.raises(UserError, match="only rounds not yet begun may change"):
        main_prune.main(["--config_path", prune_config(tmp_path / "g3.json", grown, data, **iterative,
                                                       rounds=rounds(0.25, 0.3)), "--resume"])
    # a later round out of reach is refused before any work (not after round 1's fine-tuning)
    fresh = tmp_path / "fresh"
    shutil.copytree(res / "sp", fresh / "sp")
    before = snapshot(fresh)
    with pytest.raises(UserError, match=r"rounds\[1\]: compression 0.97 is out of reach"):
        main_prune.main(["--config_path", prune_config(tmp_path / "f.json", fresh, data, compression=None,
                                                       prune_mode="iterative", rounds=[
                                                           {"compression": 0.3, "epochs": 2},
                                                           {"compression": 0.97, "epochs": 1}])])
    assert snapshot(fresh) == before


def test_recalibrate_bn_reads_a_fixed_sequence_and_leaves_the_rng_alone():
    from models import build_model, make_arch
    from utils.data import BatchLoader
    from utils.dist import Context
    from runtime.evaluate import recalibrate_bn
    ctx = Context(device=torch.device("cpu"), rank=0, world_size=1, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (32, 3, 8, 8), generator=g).to(torch.uint8), torch.zeros(32, dtype=torch.long)
    loader = BatchLoader(x, y, 8, train=True, device="cpu", mean=[0.5] * 3, std=[0.25] * 3)
    model = build_model(make_arch(depth=8, width=1, num_classes=2, gate="ff"))
    buffers = []
    for epoch in (3, 7):  # whatever epoch the loader was last set to
        loader.set_epoch(epoch)
        rng = torch.get_rng_state()
        recalibrate_bn(model, loader, ctx, mode="sample", batches=3)
        assert torch.equal(rng, torch.get_rng_state()) and loader.epoch == epoch
        buffers.append({k: v.clone() for k, v in model.state_dict().items() if "running" in k})
    assert buffers[0].keys() and all(torch.equal(buffers[0][k], buffers[1][k]) for k in buffers[0])


@pytest.mark.parametrize("ratio,limit", [(0.02, 0.05), (0.3, 0.95)])
def test_ratio_reports_the_directions_actually_removed(pipeline, tmp_path, capsys, ratio, limit):
    """Stage 2 reports the directions it removed, not those under the threshold. With prune_ratio_limit 0.05 a
    side of 16 / 32 / 64 channels (the width-1 net) loses at most 0 / 1 / 3 directions, and no such cut makes
    a layer's factored form smaller: the ratio removes nothing, and says so."""
    tmp, data, res = pipeline
    shutil.copytree(res / "sp", tmp_path / "sp")
    main_prune.main(["--config_path", prune_config(tmp_path / "c.json", tmp_path, data, compression=None,
                                                   ratio=ratio, epochs=0, prune_ratio_limit=limit)])
    report = json.load(open(tmp_path / "prune" / "metrics.json"))["rounds"][0]
    stage1 = model_from_checkpoint(load_checkpoint(str(res / "sp" / "checkpoint.pt")))
    convs = dict(stage1.named_modules())
    ranks = torch.load(tmp_path / "prune" / "checkpoint.pt", weights_only=True)["arch"]["ranks"]
    removed = sum(convs[n].in_channels - r_in + convs[n].out_channels - r_out for n, (r_in, r_out) in ranks.items())
    assert report["directions_cut"] == removed
    assert report["ratio"] == pytest.approx(removed / report["directions"])
    err = capsys.readouterr().err
    assert ("removes nothing" in err) == (removed == 0)
    assert (removed == 0) == (limit == 0.05)
    assert report["directions_under_threshold"] == int(ratio * report["directions"]) > 0  # cut, but kept by the rules


@pytest.mark.parametrize("gate", ["rnn", "ff"])
def test_batch_of_one_and_smallest_resolution_in_all_three_stages(tmp_path, gate, capsys):
    """--bs 1, the smallest --resize (8), and a last evaluation batch of one image (9 test images in
    stage 2's batches of 2, with ff) work with both switch kinds in every stage; where training would hand a BatchNorm a
    single value per channel (ff switches on 1x1 maps in a deeper net) every stage refuses up front."""
    data = tiny_dataset(tmp_path / "data", classes=3, train_per_class=4, test_per_class=3, size=8)
    res = tmp_path / "res"
    tiny = ["--num_workers", "0", "--device", "cpu", "--data_dir", data, "--result_dir", str(res), "--epochs", "1"]
    main_sp.main([*tiny, "--depth", "8", "--width", "1", "--gate", gate, "--resize", "8", "--bs", "1"])
    main_prune.main(["--config_path", prune_config(tmp_path / "c.json", res, data, compression=None, ratio=0.3,
                                                   bs=1 if gate == "rnn" else 2, fisher_batches=2)])
    main_rl_prune.main([*tiny, "--bs", "1"])
    for stage in ("sp", "prune", "rl"):
        metrics = json.load(open(res / stage / "metrics.json"))
        assert metrics["test_images"] == 9 and 0 <= metrics["test_acc"] <= 100
    if gate == "rnn":
        return
    deep = tmp_path / "deep"
    main_sp.main([*tiny[:-4], "--result_dir", str(deep), "--epochs", "1", "--depth", "14", "--width", "1",
                  "--gate", "ff", "--resize", "8", "--bs", "2"])
    before = snapshot(deep)
    for stage, argv in [("sp", [*tiny[:-4], "--result_dir", str(tmp_path / "new"), "--epochs", "1", "--depth", "14",
                                "--width", "1", "--gate", "ff", "--resize", "8", "--bs", "1"]),
                        ("prune", ["--config_path", prune_config(tmp_path / "d.json", deep, data, bs=1)]),
                        ("rl", [*tiny[:-4], "--result_dir", str(deep), "--epochs", "1", "--bs", "1"])]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main(lambda: MAINS[stage](argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "one value per channel" in err[0]
        # stage 1 chooses the resize; stages 2 and 3 take the checkpoint's, so only the batch size is advised
        assert ("resize 9" in err[0]) == (stage == "sp"), err[0]
    assert snapshot(deep) == before and not (tmp_path / "new").exists()


def test_an_error_ends_the_process_group_before_the_exit(tmp_path, capsys):
    """A rank stopping on an error destroys its process group before exiting (without waiting for the
    others): gloo's threads alive at interpreter shutdown would abort the process and hide its message."""
    import torch.distributed as dist

    def main():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise UserError("bad input")

    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad input\n"
    assert not dist.is_initialized()

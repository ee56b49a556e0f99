"""Never lose work (issue: crash and resume): a run killed with SIGKILL mid-epoch (by fault injection,
utils/faults.py) and restarted with --resume ends with the weights of an uninterrupted run, for every stage;
a kill during a checkpoint write leaves the last good checkpoint; a NaN loss stops naming the step; stage 2
killed at its end, or resumed when finished, or given a later round ends exactly as uninterrupted."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_prune
import main_sp
import stages.sp
import conftest
from conftest import PIPELINE_RL as RL
from conftest import ROOT, STAGE1_DATA, STAGE1_FLAGS, prune_config
from helpers import snapshot
from runtime.checkpoint import save_checkpoint
from utils.errors import UserError

SP = [*STAGE1_FLAGS, "--bs", "16"]


@pytest.mark.slow
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


def _run(argv, at=None):
    """A stage as a process of its own, on one thread; with `at`, killed with SIGKILL at that fault-injection
    point (else it must finish)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if at:
        env["DYNPRUNE_KILL_AT"] = at
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == (-signal.SIGKILL if at else 0), (at, proc.returncode, proc.stderr[-2000:])


def _epoch_of(path):
    return torch.load(path, weights_only=True)["epoch"]


def _kill_mid_run(argv, checkpoint, at="step:2:3"):
    """Run a stage that kills itself with SIGKILL at the fault-injection point `at` (utils/faults.py:
    by default epoch 2, before step 3's update), so the kill lands at the same place however busy the
    machine is. Returns the epoch its last checkpoint records."""
    _run(argv, at)
    return _epoch_of(checkpoint)


def _same_weights(a, b):
    a = torch.load(a, weights_only=True)
    b = torch.load(b, weights_only=True)
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
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
    _run(argv)
    argv, ckpt_killed = runs["killed"]
    for i, (at, epoch) in enumerate(kills):
        assert _kill_mid_run(argv + ["--resume"] * (i > 0), ckpt_killed, at) == epoch  # its last checkpoint
    _run([*argv, "--resume"])
    _same_weights(ckpt, ckpt_killed)
    if target:
        a, b = (torch.load(c, weights_only=True)["extra"]["price"]["alpha"] for c in (ckpt, ckpt_killed))
        assert torch.equal(a, b) and a.item() != 0.5
        a, b = (json.load(open(os.path.join(os.path.dirname(c), "metrics.json"))) for c in (ckpt, ckpt_killed))
        assert a["ending"] == b["ending"]  # calibrated after training, before route epoch 2, after the BN
        assert len(a["ending"]["calibration"]) == 3 and len(a["ending"]["route_epochs"]) == 2, a["ending"]


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(pipeline, tmp_path, monkeypatch):
    tmp, data, res = pipeline
    from runtime.loop import TrainingDiverged
    from runtime.steps import supervised_step
    calls = {"n": 0}
    steps_per_epoch = STAGE1_DATA["classes"] * STAGE1_DATA["train_per_class"] // 16

    def poisoned(model, x, y, **kw):
        loss, stats = supervised_step(model, x, y, **kw)
        if kw.get("mode") == "open":  # stage 1's default step also takes the dense loss: count steps once
            return loss, stats
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 3:  # the third step of the second epoch
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(stages.sp, "supervised_step", poisoned)  # stage 1's joint step calls it
    with pytest.raises(TrainingDiverged, match="epoch 2, step 3"):
        main_sp.main([*SP, "--epochs", "3", "--data_dir", data, "--result_dir", str(tmp_path)])
    assert torch.load(tmp_path / "sp" / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.fixture
def one_thread():
    """In-process runs computing exactly as the one-thread subprocesses that are killed."""
    yield from conftest.one_thread()


@pytest.mark.slow
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


@pytest.mark.slow
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

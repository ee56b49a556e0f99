"""Quiet wrong results and misleading messages, each now one true line (exit status 2) before any work:
a batch baseline over one image, a --val_split that holds out nothing, class lists that differ from a
checkpoint's, the batch-of-one advice of stages that cannot change the resize, a class left without a
training image, and operating-system errors while writing results (nothing earlier lost)."""
import errno
import json
import os
import pickle
import re
import shutil

import pytest
import torch

import main_rl_prune
import main_sp
from stages.rl import check_settings as check_rl_settings
from conftest import write_and_train
from helpers import assert_one_line_error, run_script, tiny_dataset
from gates.policy import Baseline, policy_loss
from runtime.checkpoint import save_checkpoint
from runtime.stage import check_batch_shapes
from utils.data import DataSettings, channel_stats, load_data, load_dataset, make_pipeline, split_val
from utils.dist import Context
from utils.errors import UserError, run_main
from utils.files import write_json

DATA = dict(classes=4, train_per_class=8, test_per_class=4, size=16)  # 32 training images
COMMON = ["--num_workers", "0", "--device", "cpu"]
SP = ["--depth", "8", "--width", "1", "--lr", "0.05", "--resize", "16", "--bs", "8", *COMMON]
CPU = Context(device=torch.device("cpu"))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Tiny data and a stage-1 run of one epoch (checkpoint and metrics.json). Its own, not the session's
    (conftest.trained_stage1): the messages asserted name its 32 training images (the smallest --val_split
    that holds one out is 1/32), and the full-disk test resumes it with these flags."""
    return write_and_train(tmp_path_factory.mktemp("messages"), DATA, [*SP, "--epochs", "1"])


def one_line_exit_2(capsys, main, argv, *words):
    """In-process (run_main is what the scripts' __main__ runs): exit 2, one line holding `words`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1, (e.value.code, err)
    for word in words:
        assert word.lower() in err[0].lower(), (word, err[0])
    return err[0]


def data_args(data, **over):
    return DataSettings(**{"data_dir": data, "img_type": "png", "resize": 16, "download": False,
                              "num_workers": 0, "val_split": 0.0, "seed": 0, "bs": 4, "final_split": "test",
                              **over})


def load_error(args, **kw):
    with pytest.raises(UserError) as e:
        load_data(args, CPU, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def same_bytes(*paths):
    return {str(p): open(p, "rb").read() for p in paths}


# --------------------------------------------------------------------- 1. a batch baseline of one image

def test_batch_baseline_with_one_image_per_process_is_refused(tmp_path):
    # why: one image's mean return is its own return, so the policy loss is exactly 0
    returns = torch.tensor([[0.3, -1.2, 0.7]])
    assert policy_loss(torch.randn(1, 3), returns, returns.mean(0)).item() == 0
    with pytest.raises(ValueError):
        Baseline("batch", 3)(returns)
    proc = run_script("main_rl_prune.py", "--controller", "reinforce", "--baseline", "batch", "--bs", "1",
                      "--data_dir", str(tmp_path), "--result_dir", str(tmp_path / "res"), *COMMON)
    assert_one_line_error(proc, "--baseline batch", "--bs 2", "per process")
    assert not (tmp_path / "res").exists()
    # two images, or the moving baseline with one, pass the flag checks
    for flags in (["--baseline", "batch", "--bs", "2"], ["--baseline", "moving", "--bs", "1"]):
        check_rl_settings(main_rl_prune.parse_args(["--controller", "reinforce", *flags]))


def test_a_controllers_own_flag_given_to_another_warns_that_it_does_nothing(capsys):
    for argv, named in ((["--controller", "gumbel", "--tau", "0.2", "--rl_weight", "0.01"],
                         ["--tau 0.2 only applies to --controller counterfactual",
                          "--rl_weight 0.01 only applies to --controller counterfactual and reinforce"]),
                        (["--gumbel_tau", "0.5", "--gamma", "0.9"],
                         ["--gumbel_tau 0.5 only applies to --controller gumbel",
                          "--gamma 0.9 only applies to --controller reinforce"]),
                        (["--controller", "reinforce", "--explore_bound", "0.2"],
                         ["--explore_bound 0.2 only applies to --controller counterfactual"]),
                        (["--controller", "gumbel", "--gumbel_tau", "0.5", "--alpha", "0.3"], [])):
        check_rl_settings(main_rl_prune.parse_args(argv))
        err = capsys.readouterr().err
        assert all(n in err for n in named) and (err.count("\n") == 1 if named else err == ""), (argv, err)
    with pytest.raises(UserError, match="--gumbel_tau 0.0 must be > 0"):
        check_rl_settings(main_rl_prune.parse_args(["--controller", "gumbel", "--gumbel_tau", "0"]))


# ------------------------------------------------------------ 2. a --val_split that holds out no image

def test_val_split_holding_out_no_image_is_refused_with_the_smallest_that_does(stage1, capsys):
    tmp, data, res = stage1
    for final in ("test", "val"):
        line = load_error(data_args(data, val_split=0.01, final_split=final))
        assert "--val_split 0.01" in line and "32 training images" in line and "give --val_split > 0" not in line
    smallest = float(re.search(r"holds one out is ([0-9.e-]+)", line).group(1))
    assert smallest == pytest.approx(1 / 32, rel=0.01)
    loaded = load_data(data_args(data, val_split=smallest, final_split="val"), CPU)
    assert loaded.eval_name == "val" and loaded.eval.num_samples == 1
    # through the script: one line, and the earlier results untouched
    before = same_bytes(res / "sp" / "checkpoint.pt", res / "sp" / "metrics.json")
    one_line_exit_2(capsys, main_sp.main, [*SP, "--data_dir", data, "--result_dir", str(res), "--epochs", "1",
                                           "--val_split", "0.01"], "--val_split 0.01", "32 training images")
    assert same_bytes(*before) == before
    # one training image: nothing can be held out
    one = tmp / "one"
    tiny_dataset(one, classes=1, train_per_class=1, test_per_class=1, size=8)
    assert "there is 1 training image, and one must be left" in load_error(data_args(str(one), resize=8,
                                                                                    val_split=0.5))


# ------------------------------------------------------------ 3. classes other than the checkpoint's

def test_class_mismatch_says_what_differs(stage1, capsys):
    tmp, data, res = stage1
    ds = load_dataset(data, "png", 16)
    mean, std = channel_stats(ds.train_x)
    names = ds.classes  # class_00 .. class_03

    def mismatch(recorded):
        return load_error(data_args(data), recorded=make_pipeline(16, mean, std, recorded, "cifar"),
                          source="--checkpoint c.pt")

    fewer = mismatch(names[:2])
    assert "the data has 4 classes, the checkpoint 2" in fewer and "only in the data: class_02, class_03" in fewer
    assert "same names" not in fewer and "only in the checkpoint" not in fewer
    more = mismatch(names + ["cat", "dog"])
    assert "the data has 4 classes, the checkpoint 6" in more and "only in the checkpoint: cat, dog" in more
    assert "same names" not in more and "only in the data" not in more
    renamed = mismatch(names[:3] + ["zebra"])
    assert "4 classes each" in renamed and "only in the data: class_03; only in the checkpoint: zebra" in renamed
    assert "same names" not in renamed
    assert "same names, other order" in mismatch(names[::-1])
    # end to end: stage 3 on a data dir of 6 classes from the 4-class stage-1 network
    wider = tiny_dataset(tmp / "wider", classes=6, train_per_class=4, test_per_class=2, size=16)
    one_line_exit_2(capsys, main_rl_prune.main, ["--data_dir", wider, "--result_dir", str(res), "--epochs", "1",
                                                 "--bs", "8", *COMMON],
                    "the data has 6 classes, the checkpoint 4", "only in the data: class_04, class_05")


# ------------------------------------------------- 4. the batch-of-one advice where the resize is fixed

def test_batch_of_one_advice_names_only_what_the_stage_can_change(tmp_path, capsys):
    """ff switches on 1x1 maps (depth 14 at resize 8): stage 1 may change bs or resize; stages 2 and 3
    take the checkpoint's resize, so only the batch size is suggested."""
    data = tiny_dataset(tmp_path / "data", classes=2, train_per_class=4, test_per_class=2, size=8)
    res = tmp_path / "res"
    ff = ["--depth", "14", "--width", "1", "--gate", "ff", "--resize", "8", *COMMON, "--data_dir", data]
    one_line_exit_2(capsys, main_sp.main, [*ff, "--result_dir", str(tmp_path / "new"), "--epochs", "0",
                                           "--bs", "1"], "one value per channel", "bs 2 or more", "resize 9")
    main_sp.main([*ff, "--result_dir", str(res), "--epochs", "0", "--bs", "2"])
    line = one_line_exit_2(capsys, main_rl_prune.main, ["--data_dir", data, "--result_dir", str(res), "--epochs",
                                                        "1", "--bs", "1", *COMMON],
                           "one value per channel", "bs 2 or more", "checkpoint's")
    assert "resize 9" not in line
    # stage 2's refusal is the same call with resize_fixed=True (its resize is the checkpoint's too)
    from runtime.checkpoint import load_checkpoint, model_from_checkpoint
    model = model_from_checkpoint(load_checkpoint(str(res / "sp" / "checkpoint.pt")))
    with pytest.raises(UserError) as e:
        check_batch_shapes(model, 8, 1, resize_fixed=True)
    assert "bs 2 or more" in str(e.value) and "resize 9" not in str(e.value)
    check_batch_shapes(model, 8, 2, resize_fixed=True)


# ----------------------------------------------------------------- 5. a class with no training image

def test_a_class_without_training_images_is_named(tmp_path, capsys):
    data = tiny_dataset(tmp_path / "data", classes=3, train_per_class=4, test_per_class=2, size=8)
    small = os.path.join(data, "train", "class_00")
    for name in sorted(os.listdir(small))[1:]:  # class_00 keeps one training image
        os.remove(os.path.join(small, name))
    ds = load_dataset(data, "png", 8)
    # a seed whose split holds out that one image
    seed = next(s for s in range(100) if 0 not in split_val(ds.train_x, ds.train_y, 0.5, s)[1].tolist())
    line = load_error(data_args(data, resize=8, val_split=0.5, seed=seed))
    assert "class class_00 has no training image" in line and "--val_split 0.5" in line
    one_line_exit_2(capsys, main_sp.main, ["--depth", "8", "--width", "1", "--resize", "8", "--bs", "2", *COMMON,
                                           "--data_dir", data, "--result_dir", str(tmp_path / "res"), "--epochs",
                                           "1", "--val_split", "0.5", "--seed", str(seed)],
                    "class class_00 has no training image", "--val_split 0.5")
    assert not (tmp_path / "res").exists()
    # a class folder whose images are all in test
    shutil.rmtree(small)
    os.makedirs(small)
    assert "class_00" in load_error(data_args(data, resize=8))
    # the pickle layout: a class named in meta that no training label uses
    pk = tiny_dataset(tmp_path / "pickle", classes=3, train_per_class=2, test_per_class=2, size=32, layout="pickle")
    train_file = os.path.join(pk, "cifar-100-python", "train")
    with open(train_file, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    keep = [i for i, label in enumerate(d[b"fine_labels"]) if label != 2]
    d[b"data"], d[b"fine_labels"] = d[b"data"][keep], [d[b"fine_labels"][i] for i in keep]
    with open(train_file, "wb") as f:
        pickle.dump(d, f, protocol=2)
    assert "class class_02 has no training image" in load_error(data_args(pk, resize=8))


# --------------------------------------------------------- 6. operating-system errors while writing

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fail", ["torch.save", "fsync", "replace"])
def test_checkpoint_write_errors_keep_the_previous_checkpoint(tmp_path, monkeypatch, fail):
    path = tmp_path / "sp" / "checkpoint.pt"
    save_checkpoint(str(path), {"stage": "sp", "epoch": 1, "model": {"w": torch.ones(3)}})
    before = same_bytes(path)
    monkeypatch.setattr(*{"torch.save": (torch, "save"), "fsync": (os, "fsync"), "replace": (os, "replace")}[fail],
                        no_space)
    with pytest.raises(UserError) as e:
        save_checkpoint(str(path), {"stage": "sp", "epoch": 2, "model": {"w": torch.zeros(3)}})
    assert str(e.value) == f"cannot write {path}: No space left on device"
    assert same_bytes(path) == before and os.listdir(path.parent) == ["checkpoint.pt"]


@pytest.mark.parametrize("fail", ["write", "fsync", "replace"])
def test_json_write_errors_keep_the_previous_file(tmp_path, monkeypatch, fail):
    path = tmp_path / "metrics.json"
    write_json(str(path), {"acc": 1})
    before = same_bytes(path)
    if fail == "write":  # json.dump itself writing into a full disk
        monkeypatch.setattr(json, "dump", no_space)
    else:
        monkeypatch.setattr(os, fail, no_space)
    with pytest.raises(UserError) as e:
        write_json(str(path), {"acc": 2})
    assert str(e.value) == f"cannot write {path}: No space left on device"
    assert same_bytes(path) == before and os.listdir(tmp_path) == ["metrics.json"]


class FailingFile:
    """A file being written that fills the disk: past its first ROOM bytes every write fails as the disk
    answers it (OSError `err`)."""
    ROOM = 100  # torch.save's zip writer has written its first record: it then wraps the error

    def __init__(self, f, err):
        self.f, self.err, self.written = f, err, 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.ROOM:
            raise OSError(self.err, os.strerror(self.err))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("err", [errno.EFBIG, errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("what", ["checkpoint.pt", "metrics.json", "table.md"])
def test_a_failing_write_is_one_line_and_keeps_the_earlier_file(tmp_path, monkeypatch, what, err):
    """Every write of a result, its file's write() failing for real (torch.save's own zip writer turns that
    OSError into a RuntimeError): a UserError naming the file and the reason, the earlier files (the table:
    table.md and table.json) as they were, no temporary file left."""
    import builtins
    from helpers import snapshot
    from runtime.table import save_table
    writers = {"checkpoint.pt": lambda v: save_checkpoint(str(tmp_path / what), {"stage": "sp", "epoch": v,
                                                                                  "model": {"w": torch.ones(3) * v}}),
               "metrics.json": lambda v: write_json(str(tmp_path / what), {"acc": v, "note": "x" * 200}),
               "table.md": lambda v: save_table(str(tmp_path), f"| {v} | {'x' * 200} |\n", [{"v": v}])}
    writers[what](1)
    before = snapshot(tmp_path)
    real_open, real_fdopen = builtins.open, os.fdopen
    failing = lambda opener: lambda file, mode="r", *a, **k: (
        FailingFile(opener(file, mode, *a, **k), err) if any(c in mode for c in "wax+") else opener(file, mode, *a, **k))
    monkeypatch.setattr(os, "fdopen", failing(real_fdopen))
    monkeypatch.setattr(builtins, "open", failing(real_open))
    with pytest.raises(UserError) as e:
        writers[what](2)
    monkeypatch.undo()
    assert str(e.value) == f"cannot write {tmp_path / what}: {os.strerror(err)}"
    assert snapshot(tmp_path) == before


def test_path_errors_name_the_path_and_the_reason(tmp_path):
    (tmp_path / "file").write_text("a file where a folder should be")
    cases = [(lambda p: save_checkpoint(p, {"stage": "sp"}), tmp_path / "file" / "sp" / "checkpoint.pt",
              "Not a directory"),
             (lambda p: save_checkpoint(p, {"stage": "sp"}), tmp_path / "file" / "checkpoint.pt", "Not a directory"),
             (lambda p: write_json(p, {}), tmp_path / "file" / "metrics.json", "Not a directory"),
             (lambda p: write_json(p, {}), tmp_path / ("m" * 300 + ".json"), "File name too long"),
             (lambda p: save_checkpoint(p, {"stage": "sp"}), tmp_path / ("c" * 300 + ".pt"), "File name too long")]
    (tmp_path / "isdir" / "metrics.json").mkdir(parents=True)  # a result file that is a folder
    cases.append((lambda p: write_json(p, {}), tmp_path / "isdir" / "metrics.json", "Is a directory"))
    for write, path, why in cases:
        with pytest.raises(UserError) as e:
            write(str(path))
        assert str(e.value).startswith(f"cannot write {path}: {why}"), (str(e.value), why)
    assert os.listdir(tmp_path / "isdir" / "metrics.json") == []
    assert sorted(os.listdir(tmp_path)) == ["file", "isdir"]


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_loses_nothing(stage1, tmp_path, monkeypatch, capsys):
    """A resumed stage-1 run whose next checkpoint, then whose metrics.json, cannot be written: one line
    naming the file and the reason, and the previous file byte for byte as it was."""
    _, data, res = stage1
    # a 2-epoch run killed right after its first checkpoint, resumed with its next checkpoint unwritable
    killed = tmp_path / "killed"
    argv = [*SP, "--data_dir", data, "--result_dir", str(killed), "--epochs", "2"]
    assert run_script("main_sp.py", *argv, env={"DYNPRUNE_KILL_AT": "saved:1"}).returncode == -9
    ckpt = killed / "sp" / "checkpoint.pt"
    before = same_bytes(ckpt)
    monkeypatch.setattr(torch, "save", no_space)
    one_line_exit_2(capsys, main_sp.main, [*argv, "--resume"], f"cannot write {ckpt}", "no space left")
    monkeypatch.undo()
    assert same_bytes(ckpt) == before

    # a finished run resumed (nothing left to train) whose metrics.json cannot be written
    copy = tmp_path / "results"
    shutil.copytree(res, copy)
    metrics = copy / "sp" / "metrics.json"
    before = same_bytes(metrics)
    argv = [*SP, "--data_dir", data, "--result_dir", str(copy), "--resume"]

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: no_space() if str(b).endswith("metrics.json")
                        else real_replace(a, b))
    one_line_exit_2(capsys, main_sp.main, [*argv, "--epochs", "1"], f"cannot write {metrics}", "no space left")
    monkeypatch.undo()
    assert same_bytes(metrics) == before
    assert not [n for n in os.listdir(copy / "sp") if n.startswith(".tmp")]  # no temporary file left
    json.load(open(metrics))


def test_an_os_error_no_writer_wrapped_is_still_one_line(capsys):
    def main():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/results/tb/events")
    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: Permission denied: /results/tb/events"


# ------------------------------------------------------------------- 7. quiet nonsense, refused up front

def test_one_class_is_refused_before_anything_is_written(tmp_path, capsys):
    """Data of one class trains to "100%" (every prediction is right): refused in one line, nothing written."""
    data = tiny_dataset(tmp_path / "one", classes=1, train_per_class=8, test_per_class=2, size=8)
    one_line_exit_2(capsys, main_sp.main, ["--depth", "8", "--width", "1", "--resize", "8", "--bs", "4", *COMMON,
                                           "--data_dir", data, "--result_dir", str(tmp_path / "res"), "--epochs",
                                           "1"], "holds one class (class_00)", "two or more")
    assert not (tmp_path / "res").exists()


def test_a_result_dir_too_long_is_refused_before_any_folder_is_made(stage1, tmp_path, capsys):
    """A folder name longer than the file system allows, or a path whose files would be too long, is refused
    by the check before any work, not half-way through making the folders (the first ones left behind)."""
    tmp, data, res = stage1
    for result_dir, words in [(tmp_path / "a" / "b" / ("x" * 300) / "c", ["300 bytes long"]),
                              (tmp_path / "a" / "/".join(["y" * 250] * 16), ["is too long"])]:
        one_line_exit_2(capsys, main_sp.main, [*SP, "--data_dir", data, "--result_dir", str(result_dir),
                                               "--epochs", "1"], "--result_dir", *words)
        assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["argparse", "numpy"])
def test_pretrained_with_foreign_objects_names_them_and_how_to_resave(stage1, tmp_path, capsys, kind):
    """A training script's checkpoint holding its argparse flags or numpy scalars beside the weights: refused
    (loading them could run code), naming the type and how to save the weights alone."""
    import argparse
    import numpy as np
    tmp, data, res = stage1
    state = torch.load(res / "sp" / "checkpoint.pt", weights_only=True)["model"]
    extra = {"argparse": argparse.Namespace(lr=0.1), "numpy": np.float64(93.5)}[kind]
    torch.save({"state_dict": state, "extra": extra}, tmp_path / "theirs.pt")
    line = one_line_exit_2(capsys, main_sp.main, [*SP, "--data_dir", data, "--result_dir", str(tmp_path / "r"),
                                                  "--epochs", "1", "--pretrained", str(tmp_path / "theirs.pt")],
                           "refused", {"argparse": "argparse.Namespace", "numpy": "numpy."}[kind],
                           "torch.save(model.state_dict(), ")
    assert not (tmp_path / "r").exists(), line
    torch.save(state, tmp_path / "weights.pt")  # what the message says to do works
    main_sp.main([*SP, "--data_dir", data, "--result_dir", str(tmp_path / "r"), "--epochs", "0", "--pretrained",
                  str(tmp_path / "weights.pt")])


@pytest.mark.slow
@pytest.mark.parametrize("streams", ["stdout", "both"])
def test_ctrl_c_under_tee_is_one_line_and_status_130(stage1, tmp_path, streams):
    """`main_sp.py ... | tee log` (and `2>&1 | tee log`) interrupted by Ctrl-C, which reaches tee too: exit
    status 130 and, where stderr still has a reader, the one line "interrupted"; never a traceback, never
    status 1 with nothing said (tee gone, the line and the last flush found no reader). Ctrl-C comes at a
    deterministic point (utils/faults.py): the second step of epoch 1, to the whole pipeline's process group."""
    import subprocess
    import sys
    from conftest import ROOT
    tmp, data, res = stage1
    argv = " ".join([sys.executable, "main_sp.py", *SP, "--data_dir", data, "--result_dir", str(tmp_path / "r"),
                     "--epochs", "2"])
    redirect = "2>&1" if streams == "both" else ""
    status = tmp_path / "status"
    # `trap : INT`: the shell (in the same process group) outlives the signal to report the stage's status
    script = f"trap : INT; {argv} {redirect} | tee {tmp_path / 'log'} > /dev/null; echo ${{PIPESTATUS[0]}} > {status}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DYNPRUNE_KILL_AT": "step:1:2", "DYNPRUNE_KILL_SIGNAL": "SIGINT"}
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          start_new_session=True)  # its own process group, as a terminal's job
    assert status.read_text().strip() == "130", (status.read_text(), proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.strip()]
    assert said == (["interrupted"] if streams == "stdout" else []), said

"""Hostile and unusual input (issue: never lose work): a table of hostile inputs against all three entry
points gives one line naming the problem, exit status 2, no traceback, and --result_dir byte for byte as it
was; a crafted checkpoint never runs code; batches of one and the smallest resolution work in every stage,
or are refused up front where a BatchNorm would see one value per channel."""
import json
import os
import shutil

import pytest
import torch

import main_prune
import main_rl_prune
import main_sp
from conftest import PIPELINE_RL as RL
from conftest import STAGE1_FLAGS, prune_config
from helpers import assert_one_line_error, run_script, snapshot, tiny_dataset
from runtime.checkpoint import FORMAT
from utils.errors import run_main

SP = [*STAGE1_FLAGS, "--bs", "16"]


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


@pytest.mark.slow
def test_hostile_input_real_processes(pipeline):
    """A few of the cases as real processes: exit status 2, one line, no traceback, nothing written."""
    tmp, data, res = pipeline
    cases = hostile_cases(tmp, data, res)
    before = snapshot(res)
    scripts = {"sp": "main_sp.py", "prune": "main_prune.py", "rl": "main_rl_prune.py"}
    for stage, argv, words in [cases[i] for i in (8, 22, 27, 35)]:
        assert_one_line_error(run_script(scripts[stage], *argv), *words)
    assert snapshot(res) == before
    assert not (tmp / "bad" / "PWNED").exists()


@pytest.mark.slow
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

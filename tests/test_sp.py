"""Stage 1 (main_sp.py): learning, resume, bad input."""
import os

import pytest
import torch

import main_sp
import utils.stage
from helpers import assert_one_line_error, run_script, snapshot, tiny_dataset

class Stop(Exception):
    pass


TINY = ["--depth", "8", "--width", "1", "--bs", "32", "--lr", "0.05", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data") / "png")


def test_tiny_training_gets_well_above_chance(data, tmp_path):
    main_sp.main([*TINY, "--data_dir", data, "--result_dir", str(tmp_path), "--epochs", "4"])
    import json
    metrics = json.load(open(tmp_path / "sp" / "metrics.json"))
    assert metrics["test_acc"] > 35  # 10 classes: chance is 10%
    assert metrics["gflops_per_image"] > 0 and metrics["params"] > 0
    assert os.listdir(tmp_path / "sp" / "tb")
    ckpt = torch.load(tmp_path / "sp" / "checkpoint.pt", weights_only=True)
    assert ckpt["stage"] == "sp" and ckpt["epoch"] == 4 and ckpt["arch"]["depth"] == 8


def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path, monkeypatch):
    args = [*TINY, "--data_dir", data, "--epochs", "3", "--seed", "3"]
    main_sp.main([*args, "--result_dir", str(tmp_path / "straight")])

    real_train_epoch = utils.stage.train_epoch

    def dies_mid_epoch_2(ddp, loader, *a, epoch, **kw):
        def batches():
            for i, batch in enumerate(loader):
                if epoch == 1 and i == 3:
                    raise Stop  # the process dies here, in the middle of the second epoch
                yield batch
        proxy = type("Proxy", (), {"__iter__": lambda self: batches(), "__len__": lambda self: len(loader)})()
        return real_train_epoch(ddp, proxy, *a, epoch=epoch, **kw)

    monkeypatch.setattr(utils.stage, "train_epoch", dies_mid_epoch_2)
    with pytest.raises(Stop):
        main_sp.main([*args, "--result_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(utils.stage, "train_epoch", real_train_epoch)
    assert torch.load(tmp_path / "cut" / "sp" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    main_sp.main([*args, "--result_dir", str(tmp_path / "cut"), "--resume"])

    a = torch.load(tmp_path / "straight" / "sp" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "sp" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)


def _bad_cases(tmp, data):
    (tmp / "empty").mkdir()
    (tmp / "notes").mkdir()
    (tmp / "notes" / "README.txt").write_text("not a dataset")
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(open(os.path.join(tmp / "good", "sp", "checkpoint.pt"), "rb").read()[:5000])
    return [
        (["--data_dir", str(tmp / "missing")], ["does not exist"]),
        (["--data_dir", str(tmp / "empty")], ["empty"]),
        (["--data_dir", str(tmp / "notes")], ["train/"]),
        (["--data_dir", data, "--img_type", "jpg"], ["jpg"]),
        (["--data_dir", data, "--depth", "33"], ["depth", "6n+2"]),
        (["--data_dir", data, "--network", "vgg"], ["network", "vgg"]),
        (["--data_dir", data, "--resume", str(truncated)], ["truncated"]),
        (["--data_dir", data, "--pretrained", str(truncated)], ["pretrained", "truncated"]),
        (["--data_dir", data, "--epochs", "-1"], ["epochs"]),
    ]


def test_bad_input_is_one_line_exit_2_and_touches_nothing(data, tmp_path):
    good = tmp_path / "good"
    main_sp.main([*TINY, "--data_dir", data, "--result_dir", str(good), "--epochs", "1"])
    before = snapshot(good)
    for argv, words in _bad_cases(tmp_path, data):
        proc = run_script("main_sp.py", *TINY, "--epochs", "1", "--result_dir", str(good), *argv)
        assert_one_line_error(proc, *words)
        assert snapshot(good) == before, argv

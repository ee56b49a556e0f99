"""Stage 1 (main_sp.py): learning, resume, bad input."""
import os

import pytest
import torch

import main_sp
import runtime.stage
from helpers import assert_one_line_error, run_script, snapshot, tiny_dataset

class Stop(Exception):
    pass


TINY = ["--depth", "8", "--width", "1", "--bs", "32", "--lr", "0.05", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data") / "png")


@pytest.mark.slow
def test_tiny_training_gets_well_above_chance(data, tmp_path):
    # 2 dense epochs, then 2 of SkipNet's supervised phase (skipping from the first step of a 4-epoch run
    # leaves the dense network, the table's row 1, near chance)
    main_sp.main([*TINY, "--data_dir", data, "--result_dir", str(tmp_path), "--epochs", "4", "--dense_epochs", "2"])
    import json
    metrics = json.load(open(tmp_path / "sp" / "metrics.json"))
    assert metrics["test_acc"] > 35 and metrics["routed_acc"] > 35  # 10 classes: chance is 10%
    assert metrics["gflops_per_image"] > 0 and metrics["params"] > 0
    assert os.listdir(tmp_path / "sp" / "tb")
    ckpt = torch.load(tmp_path / "sp" / "checkpoint.pt", weights_only=True)
    assert ckpt["stage"] == "sp" and ckpt["epoch"] == 4 and ckpt["arch"]["depth"] == 8


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path, monkeypatch):
    args = [*TINY, "--data_dir", data, "--epochs", "3", "--seed", "3"]
    main_sp.main([*args, "--result_dir", str(tmp_path / "straight")])

    real_train_epoch = runtime.stage.train_epoch

    def dies_mid_epoch_2(ddp, loader, *a, epoch, **kw):
        def batches():
            for i, batch in enumerate(loader):
                if epoch == 1 and i == 3:
                    raise Stop  # the process dies here, in the middle of the second epoch
                yield batch
        proxy = type("Proxy", (), {"__iter__": lambda self: batches(), "__len__": lambda self: len(loader)})()
        return real_train_epoch(ddp, proxy, *a, epoch=epoch, **kw)

    monkeypatch.setattr(runtime.stage, "train_epoch", dies_mid_epoch_2)
    with pytest.raises(Stop):
        main_sp.main([*args, "--result_dir", str(tmp_path / "cut")])
    monkeypatch.setattr(runtime.stage, "train_epoch", real_train_epoch)
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


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_touches_nothing(data, tmp_path):
    good = tmp_path / "good"
    main_sp.main([*TINY, "--data_dir", data, "--result_dir", str(good), "--epochs", "1"])
    before = snapshot(good)
    for argv, words in _bad_cases(tmp_path, data):
        proc = run_script("main_sp.py", *TINY, "--epochs", "1", "--result_dir", str(good), *argv)
        assert_one_line_error(proc, *words)
        assert snapshot(good) == before, argv


@pytest.mark.slow
def test_switches_route_per_image_and_row_1_is_the_dense_network(data, tmp_path):
    """SkipNet's supervised phase: after a short stage 1 every switch's p varies over the test images, the
    LSTM and the projections have learnt, and metrics.json's row is the dense network (every block, no
    switch) with the greedy routes' numbers beside it."""
    import json
    from models import build_model
    from utils.data import BatchLoader, channel_stats, load_dataset
    from utils.flops import dense_flops, measure_costs
    args = [*TINY, "--data_dir", data, "--seed", "2"]
    main_sp.main([*args, "--result_dir", str(tmp_path / "init"), "--epochs", "0"])  # the initial weights
    main_sp.main([*args, "--result_dir", str(tmp_path / "trained"), "--epochs", "2"])
    init = torch.load(tmp_path / "init" / "sp" / "checkpoint.pt", weights_only=True)
    ckpt = torch.load(tmp_path / "trained" / "sp" / "checkpoint.pt", weights_only=True)
    for name in ("switches.lstm.weight_ih", "switches.lstm.weight_hh", "switches.proj.0.weight",
                 "switches.proj.1.weight", "switches.head.weight"):
        assert (ckpt["model"][name] - init["model"][name]).abs().max() > 1e-3, name

    model = build_model(ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    ds = load_dataset(data, "png", 32, False, 0)
    mean, std = channel_stats(ds.train_x)
    x, _ = next(iter(BatchLoader(ds.test_x, ds.test_y, len(ds.test_y), train=False, device="cpu", mean=mean,
                                 std=std)))
    with torch.no_grad():
        _, _, p = model(x, "hard")
    assert (p.std(0) > 0.02).all(), p.std(0)  # every switch: its decision depends on the image

    metrics = json.load(open(tmp_path / "trained" / "sp" / "metrics.json"))
    costs = measure_costs(model, 32)
    assert metrics["gflops_per_image"] == metrics["dense_gflops"] == dense_flops(costs) / 1e9
    assert len(metrics["exec_rate"]) == model.num_switches and "routed_acc" in metrics
    assert metrics["routed_gflops"] < metrics["gflops_per_image"] + costs["switches"] / 1e9


@pytest.mark.parametrize("gate", ["rnn", "ff"])
def test_spread_decisions_centres_many_images_and_never_makes_a_weight_non_finite(gate):
    """Over a batch, the switches' logits have mean 0 and std 1; one image (no spread) or a switch input that
    does not vary leaves every weight finite."""
    from models.switches import spread_decisions
    from models import build_model, make_arch
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=3, gate=gate))
    x = torch.randn(32, 3, 8, 8)
    spread_decisions(model, x)
    logits = []
    heads = [model.switches.head] if gate == "rnn" else list(model.switches.heads)
    hooks = [h.register_forward_hook(lambda m, i, o: logits.append(o.detach())) for h in heads]
    model.train()
    model(x, "hard")
    for h in hooks:
        h.remove()
    # ff: each head is normalised seeing the routing it will see; rnn: the one shared head is normalised once
    # over every switch, and the decisions it then takes change what later switches see, so only nearly
    z = torch.cat(logits)[None] if gate == "rnn" else torch.stack(logits)  # (heads, images, 1)
    tol = 1e-3 if gate == "ff" else 0.3
    assert (z.mean(1).abs() < tol).all() and ((z.std(1) - 1).abs() < tol).all()
    for images in (x[:1], torch.zeros(4, 3, 8, 8)):  # one image; four identical ones
        model = build_model(make_arch(depth=8, width=1, num_classes=3, gate=gate))
        spread_decisions(model, images)
        assert all(torch.isfinite(p).all() for p in model.parameters())

"""Stage 3 (gates/policy.py, main_rl_prune.py, runtime/table.py): the REINFORCE arithmetic by hand, that the
rewards move the switches, that dynamic GFLOPs are what the images execute, and the stage end to end."""
import functools
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import main_rl_prune
import main_sp
import runtime.stage
import conftest
from conftest import ROOT, mix_switches
from gates.policy import Baseline, ReinforceStep, discounted_returns, discounts, policy_loss, skip_rewards
from gates.price import SkipPrice, shares
from models.switches import log_prob
from helpers import assert_one_line_error, run_script, tiny_dataset
from models import build_model, make_arch
from runtime.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from utils.data import BatchLoader, channel_stats
from utils.dist import Context
from runtime.evaluate import evaluate
from runtime.steps import supervised_step
from runtime.loop import train_epoch
from utils.files import write_json
from utils.flops import count_params, measure_costs
from utils.synthetic import make_synthetic
from runtime.table import build_table

CPU = Context(device=torch.device("cpu"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from conftest.one_thread()


# ------------------------------------------------------------------------------- 1. by hand

def test_rewards_returns_and_policy_loss_by_hand():
    # 3 switches, block FLOPs 1, 2, 1 (C = 4), alpha 0.4: skipping earns 0.1, 0.2, 0.1
    actions = torch.tensor([[0., 1., 0.],    # image 1 skips blocks 1 and 3
                            [1., 0., 1.]])   # image 2 skips block 2
    rewards = skip_rewards(actions, shares([1, 2, 1]), alpha=0.4)
    torch.testing.assert_close(rewards, torch.tensor([[0.1, 0.0, 0.1], [0.0, 0.2, 0.0]]))

    # final reward -CE: -1.0 and -0.5; gamma 0.5, R_4 = final, R_i = r_i + 0.5 R_{i+1}
    #   image 1: R3 = 0.1 + 0.5(-1.0) = -0.4    R2 = 0 + 0.5(-0.4) = -0.2     R1 = 0.1 + 0.5(-0.2) = 0.0
    #   image 2: R3 = 0 + 0.5(-0.5) = -0.25     R2 = 0.2 + 0.5(-0.25) = 0.075 R1 = 0 + 0.5(0.075) = 0.0375
    returns = discounted_returns(rewards, discounts(0.5, 3), final=torch.tensor([-1.0, -0.5]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, -0.2, -0.4], [0.0375, 0.075, -0.25]]))

    # pi(a): image 1 p = (0.2, 0.9, 0.4) with a = (0, 1, 0) -> 0.8, 0.9, 0.6
    #        image 2 p = (0.5, 0.5, 0.75) with a = (1, 0, 1) -> 0.5, 0.5, 0.75
    probs = torch.tensor([[0.2, 0.9, 0.4], [0.5, 0.5, 0.75]])
    lp = log_prob(probs, actions)
    baseline = torch.tensor([0.1, -0.1, -0.3])
    # advantages R - b: image 1 (-0.1, -0.1, -0.1); image 2 (-0.0625, 0.175, 0.05)
    image1 = -0.1 * math.log(0.8) - 0.1 * math.log(0.9) - 0.1 * math.log(0.6)
    image2 = -0.0625 * math.log(0.5) + 0.175 * math.log(0.5) + 0.05 * math.log(0.75)
    expected = -(image1 + image2)  # summed over images: SkipNet's per-image REINFORCE convention
    assert policy_loss(lp, returns, baseline).item() == pytest.approx(expected, abs=1e-6)

    # gamma 1: the final reward reaches every switch undiscounted; gamma 0: each switch sees its own reward
    torch.testing.assert_close(discounted_returns(rewards, discounts(1.0, 3), torch.tensor([-1.0, -0.5])),
                               torch.tensor([[-0.8, -0.9, -0.9], [-0.3, -0.3, -0.5]]))
    torch.testing.assert_close(discounted_returns(rewards, discounts(0.0, 3), torch.tensor([-1.0, -0.5])), rewards)


def test_policy_gradient_pushes_towards_rewarded_actions():
    p = torch.tensor([[0.5, 0.5]], requires_grad=True)
    actions = torch.tensor([[1., 0.]])
    policy_loss(log_prob(p, actions), torch.tensor([[1.0, 1.0]]), torch.zeros(2)).backward()
    assert p.grad[0, 0] < 0 < p.grad[0, 1]  # descending raises p of the executed, lowers p of the skipped


def test_baselines():
    batch1, batch2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    batch = Baseline("batch", 2)
    torch.testing.assert_close(batch(batch2), torch.tensor([6.0, 7.0]))
    moving = Baseline("moving", 2, momentum=0.5)
    torch.testing.assert_close(moving(batch1), torch.tensor([2.0, 3.0]))  # first batch: its own mean
    torch.testing.assert_close(moving(batch2), torch.tensor([2.0, 3.0]))  # then the average of those before
    torch.testing.assert_close(moving(batch2), torch.tensor([4.0, 5.0]))  # 0.5 * 2 + 0.5 * 6
    restored = Baseline("moving", 2, momentum=0.5)
    restored.load_state_dict(moving.state_dict())
    torch.testing.assert_close(restored(batch1), moving(batch1))


# ---------------------------------------------------------------------- 2. rewards move switches

def _loaders(size=8, classes=4):
    tx, ty, vx, vy, _ = make_synthetic(num_classes=classes, train_per_class=64, test_per_class=32, size=size)
    tx, ty, vx, vy = map(torch.from_numpy, (tx, ty, vx, vy))
    mean, std = channel_stats(tx)
    common = dict(device="cpu", mean=mean, std=std)
    return BatchLoader(tx, ty, 32, train=True, **common), BatchLoader(vx, vy, 128, train=False, **common)


def _mean_execute_probability(model, loader):
    """Mean p = P(execute) over the test images and switches: continuous in the weights, so a float-order
    difference moves it by ~1e-6 where a 0/1 greedy decision at p ~ 0.5 could flip."""
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(x, "greedy")[2] for x, _ in loader])
    model.train()
    return probs.mean().item()


def test_large_alpha_learns_to_skip_and_alpha_zero_does_not():
    train, test = _loaders()
    torch.manual_seed(0)
    model = build_model(make_arch(depth=14, width=1, num_classes=4))
    costs = measure_costs(model, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dense_step = functools.partial(supervised_step, mode="open")
    for epoch in range(2):  # a trained backbone, switches as initialised (p around 0.5)
        train.set_epoch(epoch)
        train_epoch(model, train, optimizer, None, dense_step, CPU, epoch)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    p_start = _mean_execute_probability(model, test)

    def reinforce(alpha, epochs=3):
        model.load_state_dict(trained)
        torch.manual_seed(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        # the policy loss is summed over the 32 images of a batch: rl_weight 1/32 is a per-image mean's 1
        step = ReinforceStep(costs, alpha, gamma=1.0, rl_weight=1 / 32, baseline=Baseline("moving", 5))
        rates = []
        for epoch in range(epochs):
            train.set_epoch(epoch)
            stats = train_epoch(model, train, optimizer, None, step, CPU, epoch)
            rates.append(sum(stats["exec_rate"]) / 5)
        return rates, _mean_execute_probability(model, test), evaluate(model, test, CPU, costs)

    # The same start, the same sampling seed: only the skip reward differs. The switches start at p ~ 0.45,
    # just below the greedy threshold, so the greedy routes of the start already skip nearly everything and
    # cannot tell the two runs apart; what training moves is p itself. Measured on AVX-512, AVX2 and the
    # default kernels with 1 and 2 threads: sampled execution rate in the last epoch 0.04 (alpha 2) against
    # 0.44-0.47 (alpha 0), mean test p 0.011-0.014 against 0.43-0.45; every bound below sits over 0.1 from
    # both, where float order moves p by ~1e-3 at most.
    rates, p, end = reinforce(alpha=2.0)
    rates0, p0, _ = reinforce(alpha=0.0)
    assert 0.3 < p_start < 0.7, p_start
    assert rates[-1] < 0.15 and rates0[-1] > 0.3, (rates, rates0)  # the sampled routes skip clearly more
    assert p < 0.15 < 0.3 < p0, (p, p0, p_start)  # the skip reward, not drift, drove p down
    assert sum(end["exec_rate"]) < 0.1  # greedy routes of the rewarded run skip every block


@pytest.mark.parametrize("controller", ["reinforce", "counterfactual", "counterfactual_2"])
@pytest.mark.parametrize("gate", ["rnn", "ff"])
def test_nan_switch_probabilities_are_reported_by_the_loss_check(controller, gate):
    """A switch whose parameters went NaN (its p NaN; the backbone and the logits still finite): no sampling
    or BCE kernel refuses the NaN (on CUDA a device-side assert, the context lost, DDP's other ranks left
    waiting); the step's loss is NaN and the training loop's check stops with its one-line TrainingDiverged."""
    from gates.counterfactual import CounterfactualStep
    from runtime.loop import TrainingDiverged
    train, _ = _loaders()
    torch.manual_seed(0)
    model = build_model(make_arch(depth=14, width=1, num_classes=4, gate=gate))
    costs = measure_costs(model, 8)
    with torch.no_grad():
        head = model.switches.head if gate == "rnn" else model.switches.heads[2]  # ff: one switch of five
        head.bias.fill_(float("nan"))
    if controller == "reinforce":
        step = ReinforceStep(costs, 0.1, gamma=1.0, rl_weight=0.1, baseline=Baseline("moving", 5))
    else:
        step = CounterfactualStep(costs, SkipPrice(0.1), 0.05, 0.1, **({"blocks": 2} if controller.endswith("2") else {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(TrainingDiverged, match="loss became nan at epoch 1, step 1"):
        train_epoch(model, train, optimizer, None, step, CPU, 0)


# ------------------------------------------------------------------------ 3. dynamic GFLOPs

@pytest.mark.parametrize("gate,ranks", [("rnn", {}), ("ff", {}),
                                        ("rnn", {"blocks.1.conv1": [5, 3], "blocks.2.conv2": [4, 6],
                                                 "blocks.4.shortcut": [7, 9], "stem": [2, 8]})])
def test_dynamic_gflops_are_what_each_image_executes(gate, ranks):
    model = mix_switches(build_model(make_arch(depth=14, width=1, num_classes=10, gate=gate, ranks=ranks)))
    model.eval()
    # per-image cost of every block's residual path and of the switches, counted by torch itself
    with FlopCounterMode(display=False) as dense:
        model(torch.zeros(1, 3, 32, 32), "open")
    counts = {name: sum(c.values()) for name, c in dense.get_flop_counts().items()}
    block = [counts[f"ResNet.blocks.{j + 1}.conv1"] + counts[f"ResNet.blocks.{j + 1}.conv2"]
             for j in range(model.num_switches)]
    with FlopCounterMode(display=False) as gated:
        model(torch.zeros(1, 3, 32, 32), "hard")
    switches = sum(gated.get_flop_counts()["ResNet.switches"].values())

    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    loader = BatchLoader(images, torch.zeros(48, dtype=torch.int64), 48, train=False, device="cpu",
                         mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25))
    x, _ = next(iter(loader))
    with torch.no_grad(), FlopCounterMode(display=False) as batch:  # eval mode: skip execution
        _, actions, _ = model(x)
    assert 0.2 < actions.mean() < 0.8
    # always-run parts + switches + the blocks each image executed, averaged over the images
    by_hand = (dense.get_total_flops() + switches - ((1 - actions.double()) * torch.tensor(block, dtype=torch.float64)).sum(1)).mean()
    assert batch.get_total_flops() / 48 == pytest.approx(by_hand.item(), rel=1e-9)
    reported = evaluate(model, loader, CPU, measure_costs(model, 32))["gflops"]
    assert reported * 1e9 == pytest.approx(by_hand.item(), rel=1e-9)


# --------------------------------------------------------------- 4. from stage 2 and stage 1

TINY = ["--bs", "32", "--num_workers", "0", "--device", "cpu", "--resize", "16"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory, trained_stage1):
    """A stage-1 result (real, main_sp.py: the session's, conftest.trained_stage1, copied with its data, into
    which a test writes a file list) and a stage-2 result beside it: the stage-1 network with some convs
    factored (random eigenbases; stage 3 only needs the architecture and the weights)."""
    tmp = tmp_path_factory.mktemp("rl")
    _, shared_data, shared_results = trained_stage1
    data = str(shutil.copytree(shared_data, tmp / "data"))
    results = tmp / "results"
    shutil.copytree(shared_results / "sp", results / "sp")
    sp = load_checkpoint(str(results / "sp" / "checkpoint.pt"))
    arch = {**sp["arch"], "ranks": {"blocks.1.conv1": [8, 8], "blocks.1.conv2": [8, 8],
                                    "blocks.2.conv1": [10, 10], "blocks.2.conv2": [12, 12]}}
    torch.manual_seed(0)
    pruned = build_model(arch)
    unfactored = {k: v for k, v in sp["model"].items() if k in pruned.state_dict() and
                  v.shape == pruned.state_dict()[k].shape}
    pruned.load_state_dict(unfactored, strict=False)
    (results / "prune").mkdir()
    save_checkpoint(str(results / "prune" / "checkpoint.pt"), {"stage": "prune", "arch": arch,
                    "model": pruned.state_dict(), "epoch": 0})
    sp_params = json.load(open(results / "sp" / "metrics.json"))["params"]
    write_json(str(results / "prune" / "metrics.json"), {
        "stage": "prune", "test_acc": 41.25, "gflops_per_image": 0.00123, "params": count_params(pruned),
        "compression": 1 - count_params(pruned) / sp_params})
    return data, results


def _rl(data, results, *more):
    main_rl_prune.main([*TINY, "--network", "resnet", "--depth", "8", "--lr", "0.01", "--alpha", "0.5",
                        "--gamma", "1", "--rl_weight", "0.1", "--data_dir", data, "--result_dir", str(results),
                        *more])
    return json.load(open(results / "rl" / "metrics.json"))


@pytest.mark.slow
def test_from_a_pruned_checkpoint_and_the_table(stages):
    data, results = stages
    rl = _rl(data, results, "--epochs", "1")
    prune = json.load(open(results / "prune" / "metrics.json"))
    sp = json.load(open(results / "sp" / "metrics.json"))
    assert rl["source_stage"] == "prune" and rl["params"] == prune["params"] < sp["params"]
    ckpt = load_checkpoint(str(results / "rl" / "checkpoint.pt"), ("rl",))
    assert ckpt["arch"]["ranks"] and model_from_checkpoint(ckpt).num_switches == 2
    assert set(ckpt["extra"]["baseline"]) >= {"value", "steps"}

    rows = build_table(str(results))
    assert [r["method"] for r in rows] == ["w/o pruning", "static pruning only", "static + dynamic pruning"]
    for row, m in zip(rows, (sp, prune, rl)):
        assert row["accuracy"] == m["test_acc"] and row["gflops_per_image"] == m["gflops_per_image"]
        assert row["compression"] == pytest.approx(1 - m["params"] / sp["params"])
    assert rows[0]["compression"] == 0 and rows[1]["compression"] == rows[2]["compression"] > 0
    table = json.load(open(results / "table.json"))
    assert table["rows"] == rows
    markdown = open(results / "table.md").read()
    assert f"| static pruning only | 41.25% | 0.00123 | {100 * rows[1]['compression']:.0f}% |" in markdown
    assert f"{rl['test_acc']:.2f}%" in markdown


@pytest.mark.slow
def test_route_epochs_train_the_backbone_on_greedy_routes_and_leave_the_switches(stages, tmp_path):
    """--route_epochs 1 after zero stage-3 epochs: the switches (the routes) are the source's exactly, the
    backbone has moved, the greedy routes in hard mode are what the saved model runs, and the ending is
    recorded. Run twice, the saved weights are bit-identical (the fine-tuning has its own RNG stream)."""
    data, results = stages
    source = load_checkpoint(str(results / "prune" / "checkpoint.pt"))
    saved = []
    for name in ("a", "b"):
        run = tmp_path / name
        shutil.copytree(results / "prune", run / "prune")
        rl = _rl(data, run, "--epochs", "0", "--route_epochs", "1", "--route_lr", "0.05")
        assert len(rl["ending"]["route_epochs"]) == 1 and 0 <= rl["ending"]["route_epochs"][0]["acc"] <= 100
        saved.append(load_checkpoint(str(run / "rl" / "checkpoint.pt"), ("rl",))["model"])
    for k, v in saved[0].items():
        assert torch.equal(v, saved[1][k]), k
        if k.startswith("switches."):
            assert torch.equal(v, source["model"][k]), k
    moved = [k for k, v in saved[0].items() if v.is_floating_point() and not k.startswith("switches.") and
             "running" not in k and not torch.equal(v, source["model"][k])]
    assert any(k.startswith("blocks.") for k in moved) and any(k.startswith("fc") for k in moved), moved


@pytest.mark.slow
def test_a_run_that_cuts_next_to_nothing_ends_saying_so_and_what_would_cut_more(stages, tmp_path, capsys):
    """The original stage-3 flags (--alpha 0.1 --gamma 1 --rl_weight 0.1) on a network whose switches all
    execute: row 3 costs what row 2 does, and stage 3's last line says so, with the --alpha from which
    skipping a block pays on half the training images and a --target_gflops. Switches that skip: no line."""
    data, results = stages
    ckpt = load_checkpoint(str(results / "prune" / "checkpoint.pt"))
    seed_flags = ["--epochs", "0", "--alpha", "0.1", "--gamma", "1", "--rl_weight", "0.1"]
    for name, bias in (("executes", 30.0), ("skips", -30.0)):
        run = tmp_path / name
        (run / "prune").mkdir(parents=True)
        shutil.copy(results / "prune" / "metrics.json", run / "prune" / "metrics.json")
        model = {**ckpt["model"], "switches.head.weight": torch.zeros_like(ckpt["model"]["switches.head.weight"]),
                 "switches.head.bias": torch.full_like(ckpt["model"]["switches.head.bias"], bias)}
        save_checkpoint(str(run / "prune" / "checkpoint.pt"), {**ckpt, "model": model})
        capsys.readouterr()
        rl = _rl(data, run, *seed_flags)
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        if bias > 0:
            assert rl["exec_rate"] == [1.0, 1.0], rl["exec_rate"]
            assert err and err[-1].startswith("warning: the switches cut "), err
            # which of the two alphas skip_alphas measured is its own test (below and tests/test_gumbel.py)
            assert ("pays on half the training images from --alpha " in err[-1]
                    or "already pays on half the training images at this run's alpha 0.1" in err[-1]), err[-1]
            target = float(err[-1].split("--target_gflops ")[1].split()[0])
            assert 0 < target < rl["gflops_per_image"], err[-1]
        else:
            assert rl["exec_rate"] == [0.0, 0.0] and not any("the switches cut" in line for line in err), err


def test_the_small_cut_warning_names_the_alpha_measured_or_says_it_was_not_learnt(monkeypatch):
    import gates.ending
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=4))
    costs = measure_costs(model, 8)
    dense = (costs["base"] + sum(costs["blocks"])) / 1e9
    monkeypatch.setattr(gates.ending, "skip_alphas", lambda *a: [2.5, 0.75])
    monkeypatch.setattr(gates.ending, "calibration_batches", lambda data: [])
    line = gates.ending.small_cut_warning(model, None, costs, dense * 1.001, 0.1)
    assert "cut -0.1% of the GFLOPs" in line and "block 2 of 2 pays on half the training images from --alpha 0.75 " \
        "(this run ended at 0.1)" in line and "--target_gflops" in line, line
    line = gates.ending.small_cut_warning(model, None, costs, dense, 1.0)
    assert "block 2 of 2 already pays on half the training images at this run's alpha 1," in line, line
    assert gates.ending.small_cut_warning(model, None, costs, dense * 0.99, 0.1) is None  # 1% cut: no warning


class Stop(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("controller", ["counterfactual", "reinforce", "gumbel"])
def test_from_an_unpruned_checkpoint_and_exact_resume(stages, tmp_path, monkeypatch, controller):
    data, results = stages
    for run in ("straight", "cut"):
        shutil.copytree(results / "sp", tmp_path / run / "sp")  # no prune/: stage 3 starts from stage 1
    # with a target, so that the price's dual ascent (state carried by the checkpoint) is resumed too
    args = ["--epochs", "2", "--seed", "4", "--controller", controller, "--target_gflops", "0.0045"]
    straight = _rl(data, tmp_path / "straight", *args)

    real_train_epoch = runtime.stage.train_epoch

    def dies_in_epoch_2(ddp, loader, *a, epoch, **kw):
        if epoch == 1:
            raise Stop  # the process dies after the checkpoint of epoch 1
        return real_train_epoch(ddp, loader, *a, epoch=epoch, **kw)

    monkeypatch.setattr(runtime.stage, "train_epoch", dies_in_epoch_2)
    with pytest.raises(Stop):
        _rl(data, tmp_path / "cut", *args)
    monkeypatch.setattr(runtime.stage, "train_epoch", real_train_epoch)
    ckpt = torch.load(tmp_path / "cut" / "rl" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["extra"]["source"]["stage"] == "sp"
    if controller == "reinforce":
        assert ckpt["extra"]["baseline"]["steps"] > 0
    resumed = _rl(data, tmp_path / "cut", *args, "--resume")

    a = torch.load(tmp_path / "straight" / "rl" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "rl" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert torch.equal(a["extra"]["baseline"]["value"], b["extra"]["baseline"]["value"])
    assert torch.equal(a["extra"]["price"]["alpha"], b["extra"]["price"]["alpha"])
    assert a["extra"]["price"]["alpha"] != 0.5  # it moved
    assert resumed["test_acc"] == straight["test_acc"] and resumed["controller"] == controller

    assert straight["source_stage"] == "sp" and straight["compression"] == 0
    rows = build_table(str(tmp_path / "straight"))
    assert [r["present"] for r in rows] == [True, False, True]
    assert rows[2]["method"] == "dynamic pruning only" and rows[2]["compression"] == 0
    assert "not run" in open(tmp_path / "straight" / "table.md").read()


# ------------------------------------------------------------ 5. SkipNet's sum convention

def test_duplicating_every_image_doubles_the_policy_gradient(monkeypatch):
    """The policy loss is summed over images (SkipNet: action.reinforce(rl_weight * R) per sampled action):
    a batch holding every image twice gives the switches twice the policy gradient. By hand, for the
    shared head bias z of the rnn switches (p = sigmoid(.. + z), d log pi(a) / dz = a - p):
        d/dz [rl_weight * policy loss] = -rl_weight * sum_n sum_i (a_ni - p_ni) * (R_ni - b_i)."""
    import models.resnet
    torch.manual_seed(0)
    model = build_model(make_arch(depth=14, width=1, num_classes=4)).train()
    costs = measure_costs(model, 8)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    routes = torch.tensor([[1., 0., 1., 1., 0.], [0., 1., 1., 0., 1.], [1., 1., 0., 1., 0.], [0., 0., 1., 1., 1.]])

    def fixed_actions(batch):  # "sampled" actions that we choose: image n takes route n (n mod 4)
        calls = iter(range(model.num_switches))
        return lambda p, mode, training, *bound: batch[:, next(calls)] if mode == "sample" else None

    alpha, rl_weight = 0.6, 0.1
    grads = []
    for copies in (1, 2):
        xs, ys, route = x.repeat(copies, 1, 1, 1), y.repeat(copies), routes.repeat(copies, 1)
        monkeypatch.setattr(models.resnet, "act", fixed_actions(route))
        model.zero_grad()
        step = ReinforceStep(costs, alpha, gamma=1.0, rl_weight=rl_weight, baseline=Baseline("batch", 5))
        loss, _ = step(model, xs, ys)
        loss.backward()
        grads.append(model.switches.head.bias.grad.item())

        monkeypatch.setattr(models.resnet, "act", fixed_actions(route))
        with torch.no_grad():  # the same forward pass (BN batch statistics of a doubled batch are the same)
            logits, actions, p = model(xs, "sample")
        ce = F.cross_entropy(logits, ys, reduction="none").double()
        c = torch.tensor(costs["blocks"], dtype=torch.float64)
        r = alpha * (1 - actions.double()) * c / c.sum()
        returns = r.flip(1).cumsum(1).flip(1) - ce.view(-1, 1)  # gamma 1: R_i = sum_{j >= i} r_j - CE
        advantage = returns - returns.mean(0)
        by_hand = -rl_weight * ((actions.double() - p.double()) * advantage).sum().item()
        assert grads[-1] == pytest.approx(by_hand, rel=1e-4, abs=1e-7)
    assert grads[1] == pytest.approx(2 * grads[0], rel=1e-4)
    assert abs(grads[0]) > 1e-4  # the check is not vacuous


# ------------------------------------------------- 6. a GFLOPs target; the model exactly as saved

FRESH_EVAL = """
import argparse, json, sys
import torch
from runtime.checkpoint import load_checkpoint, model_from_checkpoint
from runtime.evaluate import evaluate
from utils.data import DataSettings, load_data
from utils.dist import Context
from utils.flops import measure_costs
ckpt = load_checkpoint(sys.argv[1], ("rl",))
args = argparse.Namespace(**ckpt["args"])
ctx = Context(device=torch.device("cpu"))
model = model_from_checkpoint(ckpt)
data = load_data(DataSettings.of(args), ctx)
print(json.dumps(evaluate(model, data.test, ctx, measure_costs(model, args.resize))))
"""


@pytest.fixture(scope="module")
def deeper_stage1(tmp_path_factory):
    """A stage-1 ResNet-14 (5 switches) on a little more data than `stages`: enough routes per image for a
    FLOPs target to be met closely. Its own, not the session's ResNet-8 (conftest.trained_stage1): the
    target's 3% tolerance rests on these 5 switches and 160 test images."""
    tmp = tmp_path_factory.mktemp("target")
    data = tiny_dataset(tmp / "data", classes=4, train_per_class=80, test_per_class=40, size=16)
    main_sp.main([*TINY, "--depth", "14", "--width", "1", "--lr", "0.05", "--epochs", "2", "--data_dir", data,
                  "--result_dir", str(tmp / "results")])
    return data, tmp / "results"


@pytest.mark.slow
@pytest.mark.parametrize("controller", ["counterfactual", "gumbel"])
def test_target_gflops_is_met_and_the_saved_model_gives_the_metrics_exactly(deeper_stage1, tmp_path, controller):
    """With route epochs after the training: the threshold is calibrated after the training, before every
    further route epoch and after the BN re-estimate, and the saved model meets the target."""
    data, shared = deeper_stage1
    results = tmp_path / "results"
    shutil.copytree(shared / "sp", results / "sp")
    sp = json.load(open(results / "sp" / "metrics.json"))
    target = round(0.6 * sp["dense_gflops"], 6)
    main_rl_prune.main([*TINY, "--lr", "0.01", "--epochs", "2", "--alpha", "0.5", "--rl_weight", "0.02",
                        "--route_epochs", "2", "--target_gflops", str(target), "--data_dir", data,
                        "--result_dir", str(results), "--controller", controller])
    rl = json.load(open(results / "rl" / "metrics.json"))
    # the last calibration meets the target on the training images it measures; the test split's 160 images
    # follow within their sampling: measured +0.3% (AVX-512), +0.6% (AVX2), +3.0% (default kernels, whose
    # rounding trains other weights), calibration within 0.5% on all three
    assert rl["ending"]["calibration"][-1]["gflops"] == pytest.approx(target, rel=0.01), rl["ending"]
    assert rl["gflops_per_image"] == pytest.approx(target, rel=0.06), rl["ending"]
    assert len(rl["ending"]["route_epochs"]) == 2 and len(rl["ending"]["calibration"]) == 3, rl["ending"]
    assert rl["target_gflops"] == target and rl["alpha_final"] != rl["alpha"]  # alpha moved
    ckpt = torch.load(results / "rl" / "checkpoint.pt", weights_only=True)
    assert ckpt["extra"]["price"]["alpha"].item() == rl["alpha_final"]

    # a fresh process (one thread, as this module) rebuilds the model from the checkpoint alone
    proc = subprocess.run([sys.executable, "-c", FRESH_EVAL, str(results / "rl" / "checkpoint.pt")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["acc"] == rl["test_acc"] and fresh["gflops"] == rl["gflops_per_image"]
    assert fresh["exec_rate"] == rl["exec_rate"]


@pytest.mark.slow
def test_unreachable_target_is_refused_up_front(deeper_stage1, tmp_path):
    data, results = deeper_stage1
    shutil.copytree(results / "sp", tmp_path / "sp")
    proc = run_script("main_rl_prune.py", *TINY, "--epochs", "1", "--target_gflops", "1e-6", "--data_dir", data,
                      "--result_dir", str(tmp_path))
    assert_one_line_error(proc, "--target_gflops", "out of reach")
    assert not (tmp_path / "rl").exists()


def test_skip_price_dual_ascent():
    price = SkipPrice(0.5, target_flops=100.0, lr=0.1)
    price.update(torch.tensor([150.0, 150.0]))  # 50% over the target: alpha rises by exp(0.1 * 0.5)
    assert price.alpha.item() == pytest.approx(0.5 * math.exp(0.05))
    price.update(torch.tensor([50.0]))  # 50% under: back down
    assert price.alpha.item() == pytest.approx(0.5)
    resumed = SkipPrice(0.5, target_flops=100.0, lr=0.1)
    price.update(torch.tensor([120.0]))
    resumed.load_state_dict(price.state_dict())
    assert torch.equal(resumed.alpha, price.alpha)
    fixed = SkipPrice(0.5)
    fixed.update(torch.tensor([1e9]))
    assert fixed.alpha.item() == 0.5


# ------------------------------------------------- 7. the fixed-route baseline (evaluation/routes.py)

def test_best_fixed_route_meets_its_budget_and_costs_what_it_runs():
    from evaluation.routes import best_fixed_route, evaluate_route, route_flops
    train, test = _loaders()
    torch.manual_seed(0)
    model = build_model(make_arch(depth=14, width=1, num_classes=4)).eval()
    costs = measure_costs(model, 8)
    route = [1, 0, 1, 0, 1]
    model.route = route
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # what the fixed route really runs
        model(torch.zeros(1, 3, 8, 8), "open")
    model.route = None
    assert counter.get_total_flops() == route_flops(costs, route)
    assert evaluate_route(model, test, CPU, costs, route)["gflops"] * 1e9 == route_flops(costs, route)

    budget = 0.6 * route_flops(costs, [1] * 5) / 1e9
    best = best_fixed_route(model, test, CPU, costs, budget)
    assert best["gflops"] <= budget and len(best["history"]) == best["route"].count(0) >= 1
    assert best["acc"] == evaluate_route(model, test, CPU, costs, best["route"])["acc"]
    assert model.route is None  # the model is left as it was


@pytest.mark.slow
def test_routes_by_difficulty_splits_the_stage_evaluation_exactly(stages, tmp_path):
    """evaluation/routes_by_difficulty.py on a stage-3 network, half the test images listed as hard: its two
    groups, weighted by their sizes, give back exactly the accuracy, GFLOPs and execution rates of the
    stage's own final test (the same images through the checkpoint's recorded pipeline)."""
    from evaluation import routes_by_difficulty
    data, results = stages
    run = tmp_path / "run"
    shutil.copytree(results / "prune", run / "prune")
    rl = _rl(data, run, "--epochs", "1")
    test = os.path.join(data, "test")
    listed = [f"test/{c}/{f}" for c in sorted(os.listdir(test)) for f in sorted(os.listdir(os.path.join(test, c)))]
    with open(os.path.join(data, "hard.txt"), "w") as f:
        f.write("\n".join(listed[::2]) + "\n")
    try:
        out = routes_by_difficulty.main([str(run / "rl" / "checkpoint.pt"), "--data_dir", data, "--bs", "7"])
    finally:
        os.remove(os.path.join(data, "hard.txt"))
    (groups,) = out.values()
    n = {k: g["images"] for k, g in groups.items()}
    assert n == {"hard": (len(listed) + 1) // 2, "easy": len(listed) // 2}
    mean = lambda key: sum(g[key] * n[k] for k, g in groups.items()) / len(listed)  # noqa: E731
    assert mean("acc") == pytest.approx(rl["test_acc"], abs=1e-9)
    assert mean("gflops_per_image") == pytest.approx(rl["gflops_per_image"], rel=1e-9)
    for j, rate in enumerate(rl["exec_rate"]):
        assert sum(g["exec_rate"][j] * n[k] for k, g in groups.items()) / len(listed) == pytest.approx(rate)

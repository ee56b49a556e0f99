"""Stage 3's counterfactual controller (gates/counterfactual.py): exploration within its bound, the benefit
of a block measured on the image itself, a switch loss that trains the switches and nothing else, the
switches' own learning rate, and the price steering the routes."""
import functools
import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import conftest
from gates.counterfactual import CounterfactualStep, execution_benefit, flip_losses, switch_targets
from gates.optim import make_optimizer
from gates.price import SkipPrice
from models import build_model, make_arch
from test_rl import CPU, _loaders, _mean_execute_probability
from runtime.steps import supervised_step
from runtime.loop import train_epoch
from utils.flops import measure_costs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from conftest.one_thread()


def _model(depth=8, seed=0):
    torch.manual_seed(seed)
    return build_model(make_arch(depth=depth, width=1, num_classes=4))


def _saturate(model, logit):
    """Every switch's logit pushed to about `logit` (the head's bias; its weights zeroed)."""
    with torch.no_grad():
        model.switches.head.weight.zero_()
        model.switches.head.bias.fill_(logit)


@pytest.mark.parametrize("logit,rate", [(30.0, 0.9), (-30.0, 0.1)])
def test_explore_draws_within_the_bound(logit, rate):
    """p saturated at 1 (or 0): in `explore` mode the decisions still skip (run) a tenth of the time; the
    returned p is the switches' own."""
    model = _model(depth=14)
    _saturate(model, logit)
    model.train()
    torch.manual_seed(1)
    _, actions, probs = model(torch.randn(400, 3, 8, 8), "explore")  # 400 x 5 = 2,000 decisions
    assert abs(actions.mean().item() - rate) < 0.03  # binomial std 0.0067: 4.5 std
    assert torch.all((probs > 1 - 1e-6) if logit > 0 else (probs < 1e-6))
    _, greedy, _ = model(torch.randn(50, 3, 8, 8), "sample")  # unbounded sampling follows p
    assert greedy.mean().item() == (1.0 if logit > 0 else 0.0)


def test_benefit_is_each_images_own_loss_with_the_block_flipped():
    """flip_losses against the network run image by image on the fixed route with block j flipped (`open`
    mode, evaluation): the counterfactual is the image's own, per block."""
    model = _model(depth=14)
    model.train()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    torch.manual_seed(2)
    actions = torch.bernoulli(torch.full((6, 5), 0.5))
    taken, flipped = flip_losses(model, x, y, actions)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        for i in range(6):
            for j in range(5):
                for route, expect in ((actions[i].tolist(), taken[i]),
                                      ([1 - a if k == j else a for k, a in enumerate(actions[i].tolist())],
                                       flipped[i, j])):
                    model.route = [int(a) for a in route]
                    logits, _, _ = model(x[i:i + 1], "open")
                    torch.testing.assert_close(F.cross_entropy(logits, y[i:i + 1]), expect, rtol=1e-5, atol=1e-5)
    benefit = execution_benefit(taken, flipped, actions)
    ran = actions.bool()
    torch.testing.assert_close(benefit[ran], (flipped - taken[:, None])[ran])  # skipping it costs this much
    torch.testing.assert_close(benefit[~ran], (taken[:, None] - flipped)[~ran])  # running it would save this
    t = switch_targets(torch.tensor([[0.3, 0.1]]), torch.tensor([0.1, 0.1]), 0.05)
    torch.testing.assert_close(t, torch.tensor([[torch.sigmoid(torch.tensor(4.0)).item(), 0.5]]))


def test_switch_loss_trains_the_switches_and_never_the_backbone():
    """The same step (same draws) with rl_weight 0 and 1: the backbone's gradients are identical (the
    switches read detached inputs, the decisions carry no gradient), the switches' are 0 and non-zero."""
    model = _model(depth=14)
    costs = measure_costs(model, 8)
    model.train()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    grads = []
    for w in (0.0, 1.0):
        model.zero_grad(set_to_none=False)
        torch.manual_seed(3)
        loss, stats = CounterfactualStep(costs, SkipPrice(0.5), 0.05, w)(model, x, y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert stats["switch_loss"] > 0 and 0 < stats["exec_rate"].mean() < 1
        # the loss reported is the backbone's (the cross-entropy: the whole loss at rl_weight 0), never the sum
        assert stats["loss"] == (loss if w == 0 else ce) and "alpha" not in stats
        ce = loss.detach()
    for n in grads[0]:
        if n.startswith("switches."):
            assert grads[0][n].abs().max() == 0, n
        else:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0, msg=n)
    assert any(grads[1][n].abs().max() > 0 for n in grads[1] if n.startswith("switches."))


def test_switches_step_at_their_own_learning_rate():
    model = _model()
    args = SimpleNamespace(lr=0.1, switch_lr=0.001, weight_decay=0.0, switch_weight_decay=None, momentum=0.0)
    opt = make_optimizer(model, args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    loss, _ = supervised_step(model, torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        lr = 0.001 if n.startswith("switches.") else 0.1
        torch.testing.assert_close(before[n] - p.detach(), lr * p.grad, rtol=1e-3, atol=3e-7, msg=n)


def test_the_price_steers_the_routes():
    """A trained backbone, switches as initialised: a price far above any block's benefit drives every
    switch to skip, a price of 0 does not."""
    train, test = _loaders()
    torch.manual_seed(0)
    model = build_model(make_arch(depth=14, width=1, num_classes=4))
    costs = measure_costs(model, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(2):
        train.set_epoch(epoch)
        train_epoch(model, train, optimizer, None, functools.partial(supervised_step, mode="open"), CPU, epoch)
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    def run(alpha):
        model.load_state_dict(trained)
        torch.manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = CounterfactualStep(costs, SkipPrice(alpha), tau=0.05, rl_weight=1 / 32)
        for epoch in range(3):
            train.set_epoch(epoch)
            train_epoch(model, train, opt, None, step, CPU, epoch)
        return _mean_execute_probability(model, test)

    # measured on AVX-512, AVX2 and the default kernels: mean p 0.0004-0.0005 (price 10) against 0.431-0.432
    # (price 0); the bounds sit 0.1 from both
    p, p0 = run(10.0), run(0.0)
    assert p < 0.1 and p0 > 0.3, (p, p0)


def test_a_subset_of_flipped_blocks_is_the_full_passs_columns():
    """flip_losses with blocks {1, 3} gives the taken route's losses and the flipped columns 1 and 3 of the
    full pass (the stacked pass only carries fewer branches)."""
    model = _model(depth=14)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    actions = torch.bernoulli(torch.full((6, 5), 0.5), generator=torch.Generator().manual_seed(4))
    taken, flipped = flip_losses(model, x, y, actions)
    taken2, flipped2 = flip_losses(model, x, y, actions, [1, 3])
    torch.testing.assert_close(taken2, taken, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flipped2, flipped[:, [1, 3]], rtol=1e-6, atol=1e-6)


def test_sampled_flips_estimate_the_full_switch_loss_without_bias(monkeypatch):
    """K of S blocks flipped per step, their terms weighed by S / K: averaged over every K-subset the switch
    loss, its gradient and the per-switch benefit are the full form's; with K = S the step is the full one."""
    model = _model(depth=14)  # 5 switches
    costs = measure_costs(model, 8)
    model.train()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    start = {k: v.clone() for k, v in model.state_dict().items()}  # a step moves BN's running statistics

    def run(blocks, subset=None):
        step = CounterfactualStep(costs, SkipPrice(0.5), 0.05, 1.0, blocks=blocks)
        if subset is not None:
            monkeypatch.setattr(step, "draw", lambda s: list(subset))
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same explore draws every time
        loss, stats = step(model, x, y)
        loss.backward()
        return stats, model.switches.head.weight.grad.clone()

    full_stats, full_grad = run(None)
    same_stats, same_grad = run(5)  # K = S: the full form
    torch.testing.assert_close(same_stats["switch_loss"], full_stats["switch_loss"], rtol=0, atol=0)
    torch.testing.assert_close(same_grad, full_grad, rtol=0, atol=0)
    subsets = list(itertools.combinations(range(5), 2))  # all 10 subsets of K = 2
    runs = [run(2, c) for c in subsets]
    mean = lambda key: torch.stack([s[key] for s, _ in runs]).mean(0)
    torch.testing.assert_close(mean("switch_loss"), full_stats["switch_loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean("benefit"), full_stats["benefit"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([g for _, g in runs]).mean(0), full_grad, rtol=1e-4, atol=1e-6)
    assert all(s["switch_loss"] != full_stats["switch_loss"] for s, _ in runs)  # each subset alone differs
    drawn = CounterfactualStep(costs, SkipPrice(0.5), 0.05, 1.0, blocks=2).draw(5)
    assert len(drawn) == 2 and drawn == sorted(set(drawn)) and all(0 <= b < 5 for b in drawn)

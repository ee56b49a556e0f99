"""Stage 3's gumbel controller (gates/gumbel.py, models/switches.gumbel_decisions): decisions drawn as
Bernoulli(p) and passed forward as 0/1, the Gumbel-softmax gradient backward, by hand; that gradient
reaching the switches and, through them, the backbone on the route taken, for both switch kinds; the
price steering the routes; and the measure of why a run cut next to nothing (gates/ending.skip_alphas)."""
import functools

import pytest
import torch
import torch.nn.functional as F

import conftest
from gates.ending import skip_alphas
from gates.gumbel import GumbelStep
from gates.price import SkipPrice
from models import build_model, make_arch
from models.switches import act, gumbel_decisions
from runtime.evaluate import evaluate
from runtime.loop import train_epoch
from runtime.steps import supervised_step
from test_rl import CPU
from utils.data import BatchLoader, channel_stats
from utils.flops import measure_costs
from utils.synthetic import make_synthetic


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from conftest.one_thread()


def _model(gate="rnn", depth=14, seed=0):
    torch.manual_seed(seed)
    return build_model(make_arch(depth=depth, width=1, num_classes=4, gate=gate))


def test_decisions_are_drawn_as_bernoulli_p_and_pass_the_relaxed_gradient():
    """Forward exactly 0/1 with P(1) = p; backward d a / d p = s (1 - s) / (temperature p (1 - p)), s the
    relaxed decision sigmoid((logit p + L) / temperature) for the noise L drawn; out of training p > 0.5."""
    torch.manual_seed(0)
    p = torch.tensor([0.1, 0.5, 0.8]).repeat(4000)
    a = act(p, "gumbel", True)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    for value, share in zip((0.1, 0.5, 0.8), a.view(4000, 3).mean(0).tolist()):
        assert abs(share - value) < 0.035, (value, share)  # binomial std <= 0.008: over 4 std

    p = torch.tensor([0.3, 0.6, 0.95], requires_grad=True)
    noise = torch.tensor([0.5, -1.0, 2.0])
    for temperature in (1.0, 0.5):
        p.grad = None
        a = gumbel_decisions(p, temperature, noise=noise)
        z = torch.logit(p.detach()) + noise
        assert a.tolist() == (z > 0).float().tolist()
        (a * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        s = torch.sigmoid(z / temperature)
        by_hand = torch.tensor([1.0, 2.0, 3.0]) * s * (1 - s) / temperature / (p.detach() * (1 - p.detach()))
        torch.testing.assert_close(p.grad, by_hand, rtol=1e-4, atol=1e-6)
    q = torch.tensor([0.2, 0.7])
    assert act(q, "gumbel", False).tolist() == [0.0, 1.0]  # evaluation: the greedy decision, no draw


@pytest.mark.parametrize("gate", ["rnn", "ff"])
def test_gradients_reach_switches_and_backbone_through_the_route_taken(gate):
    """One step of the controller, and the same step (same draws) with the switches' outputs detached: the
    routes are the same 0/1 routes, the loss the same; the switches get a gradient only through the decisions,
    and the backbone below the first switch gets another gradient: the decisions' gradient reaches it
    through the switches' inputs."""
    model = _model(gate)
    costs = measure_costs(model, 8)
    model.train()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    runs = []
    for detach in (False, True):
        hook = model.switches.register_forward_hook(
            lambda m, i, out: (out[0].detach(), *out[1:])) if detach else None
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss, stats = GumbelStep(costs, SkipPrice(0.5))(model, x, y)
        loss.backward()
        if hook:
            hook.remove()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        assert 0 < stats["exec_rate"].mean() < 1 and stats["price_loss"] > 0
    (loss, grads), (loss_cut, grads_cut) = runs
    assert torch.equal(loss, loss_cut)  # the same routes forward
    switches = [n for n in grads if n.startswith("switches.")]
    assert any(grads[n] is not None and grads[n].abs().max() > 0 for n in switches)
    assert all(grads_cut[n] is None or grads_cut[n].abs().max() == 0 for n in switches)
    for n in ("stem.weight", "blocks.0.conv1.weight"):  # below every switch: reached through their inputs
        assert not torch.allclose(grads[n], grads_cut[n], rtol=1e-3, atol=1e-7), n


def _trained(epochs=3):
    """ResNet-14 trained densely on 4 synthetic classes at 8x8, unaugmented (so that its blocks matter: about
    80% on held-out images), switches as initialised; with its training and held-out loaders."""
    tx, ty, vx, vy, _ = make_synthetic(num_classes=4, train_per_class=64, test_per_class=32, size=8)
    tx, ty, vx, vy = map(torch.from_numpy, (tx, ty, vx, vy))
    mean, std = channel_stats(tx)
    common = dict(device="cpu", mean=mean, std=std)
    train = BatchLoader(tx, ty, 32, train=True, augment="none", **common)
    test = BatchLoader(vx, vy, 128, train=False, **common)
    model = _model()
    costs = measure_costs(model, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(epochs):
        train.set_epoch(epoch)
        train_epoch(model, train, optimizer, None, functools.partial(supervised_step, mode="open"), CPU, epoch)
    return model, costs, train, test


@pytest.mark.slow
def test_the_price_steers_the_routes():
    """From the same trained backbone and draws, only alpha differs: a price far above any block's worth
    drives every switch to skip, a price of 0 keeps most blocks running. (A GFLOPs target through the dual
    price and the calibration: tests/test_rl.py, per controller.)"""
    model, costs, train, test = _trained()
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    def run(alpha):
        model.load_state_dict(trained)
        torch.manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for epoch in range(3):
            train.set_epoch(epoch)
            train_epoch(model, train, opt, None, GumbelStep(costs, SkipPrice(alpha)), CPU, epoch)
        ev = evaluate(model, test, CPU, costs)
        return sum(ev["exec_rate"]) / len(ev["exec_rate"])

    rate, rate0 = run(10.0), run(0.0)
    assert rate < 0.1 and rate0 > 0.5, (rate, rate0)


def test_skip_alphas_are_the_median_benefit_per_share_of_the_price():
    """skip_alphas against the network run with each block removed by a fixed route (`open` mode): per
    block, the median over the images of (CE without the block - CE with every block) / the block's share
    of the gated FLOPs; at that alpha skipping the block pays on half the images."""
    model, costs, train, _ = _trained(epochs=1)
    with torch.no_grad():  # every switch executes: the greedy routes are the full network
        model.switches.head.weight.zero_()
        model.switches.head.bias.fill_(30.0)
    batches = [b for _, b in zip(range(2), train)]
    alphas = skip_alphas(model, batches, costs)
    model.eval()
    w = torch.tensor(costs["blocks"], dtype=torch.float64) / sum(costs["blocks"])
    with torch.no_grad():
        full = torch.cat([F.cross_entropy(model(x, "open")[0], y, reduction="none") for x, y in batches])
        for j in range(model.num_switches):
            model.route = [int(k != j) for k in range(model.num_switches)]
            without = torch.cat([F.cross_entropy(model(x, "open")[0], y, reduction="none") for x, y in batches])
            assert alphas[j] == pytest.approx(((without - full).double().median() / w[j]).item(), rel=1e-4, abs=1e-6)
    model.route = None

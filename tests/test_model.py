"""The network, its switches and the FLOPs/parameter counter."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import mix_switches
from models import build_model, make_arch
from utils.errors import UserError
from runtime.predict import image_flops
from utils.flops import count_params, dense_flops, measure_costs


def test_resnet32_k4_counts_2_20_gflops_and_7_45m_params():
    model = build_model(make_arch(depth=32, width=4, num_classes=100)).eval()
    costs = measure_costs(model)
    assert dense_flops(costs) / 1e9 == pytest.approx(2.20, rel=0.01)
    backbone = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("switches."))
    assert backbone / 1e6 == pytest.approx(7.45, rel=0.01)
    assert count_params(model) > backbone  # switches are parameters too
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 32, 32), "open")
    assert counter.get_total_flops() == dense_flops(costs)
    assert len(costs["blocks"]) == model.num_switches == 14


@pytest.mark.parametrize("gate", ["rnn", "ff"])
def test_counter_agrees_with_flopcountermode_on_routed_batch(gate):
    model = mix_switches(build_model(make_arch(depth=14, width=1, num_classes=10, gate=gate))).eval()
    costs = measure_costs(model)
    x = torch.randn(12, 3, 32, 32)
    model.execution = "skip"
    with FlopCounterMode(display=False) as counter:
        _, actions, _ = model(x)
    assert 0 < actions.mean() < 1
    assert image_flops(costs, actions).sum().item() == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_ff_switch_costs_about_an_eighth_of_a_block():
    costs = measure_costs(build_model(make_arch(depth=32, width=1, num_classes=10, gate="ff")))
    assert 0.08 < costs["switches"] / sum(costs["blocks"]) < 0.2


@pytest.mark.parametrize("gate", ["rnn", "ff"])
def test_skip_execution_equals_masked_execution(gate):
    model = mix_switches(build_model(make_arch(depth=20, width=1, num_classes=10, gate=gate)), seed=1).eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        model.execution = "mask"
        masked, a_masked, _ = model(x)
        model.execution = "skip"
        skipped, a_skipped, _ = model(x)
    assert torch.equal(a_masked, a_skipped)
    rates = a_masked.mean(0)
    # mixed decisions, including at the downsampling blocks (blocks 3 and 6 of depth 20 -> switches 2 and 5)
    assert ((rates > 0) & (rates < 1)).sum() >= 4
    assert 0 < rates[2] < 1 or 0 < rates[5] < 1
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=0)


def test_skip_execution_keeps_channels_last():
    """A partly skipped block's output keeps the batch's memory format (an out-of-place index_copy returned
    NCHW, and every later block then ran outside channels_last)."""
    model = mix_switches(build_model(make_arch(depth=20, width=1, num_classes=10)), seed=1).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    layouts = []
    # what every convolution reads (a gated block's own forward is called directly: no module hook on it)
    convs = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [c.register_forward_pre_hook(lambda m, inputs: layouts.append(
        inputs[0].is_contiguous(memory_format=torch.channels_last))) for c in convs]
    with torch.no_grad():
        model.execution = "skip"
        _, actions, _ = model(x)
    for h in hooks:
        h.remove()
    rates = actions.mean(0)
    assert ((rates > 0) & (rates < 1)).any()  # some blocks partly skipped
    assert len(layouts) >= len(convs) // 2 and all(layouts), layouts


def test_modes_and_shapes():
    model = build_model(make_arch(depth=8, width=1, num_classes=7))
    x = torch.randn(3, 3, 16, 16)
    for mode in ("open", "hard", "greedy", "sample"):
        logits, actions, probs = model(x, mode)
        assert logits.shape == (3, 7) and actions.shape == probs.shape == (3, 2)
        assert set(actions.detach().unique().tolist()) <= {0.0, 1.0}


def test_hard_mode_straight_through_reaches_switches():
    model = build_model(make_arch(depth=8, width=1, num_classes=5)).train()
    logits, _, _ = model(torch.randn(4, 3, 16, 16), "hard")
    logits.square().sum().backward()
    assert model.switches.head.weight.grad.abs().sum() > 0


def test_greedy_mode_takes_the_hard_routes_and_passes_no_gradient_through_them():
    """Stage 3's route fine-tuning: the same routes and logits as `hard`, but no gradient reaches the
    switches' parameters (in `hard` mode the straight-through gradient does); an unknown mode is refused."""
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=5)).train()
    x = torch.randn(4, 3, 16, 16)
    grads = {}
    for mode in ("hard", "greedy"):
        model.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats move in train mode
        logits, actions, _ = model(x, mode)
        logits.square().sum().backward()
        model.load_state_dict(state)
        grads[mode] = (logits.detach(), actions.detach(),
                       {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads["greedy"][0], grads["hard"][0])
    assert torch.equal(grads["greedy"][1], grads["hard"][1])
    assert not any(n.startswith("switches.") for n in grads["greedy"][2])
    assert any(n.startswith("switches.") for n in grads["hard"][2])
    with pytest.raises(ValueError, match="unknown mode"):
        model(x, "gready")


@pytest.mark.parametrize("arch", [dict(depth=33), dict(depth=4), dict(network="vgg"), dict(gate="lstm"),
                                  dict(width=0)])
def test_bad_architecture_is_a_user_error(arch):
    with pytest.raises(UserError):
        make_arch(**arch)


def test_measuring_costs_leaves_a_training_model_as_it_was():
    """Every forward of the count runs in evaluation mode: BN running statistics are not moved."""
    model = build_model(make_arch(depth=8, width=1, num_classes=10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_costs(model, 8)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

"""A switch kind defined here, outside models/, and registered with @switch_kind: stage 3's default
controller trains it, masked and skipping execution agree, its FLOPs are counted and it exports (ONNX and
torch.export, skipping kept) with the eager outputs. Nothing else in the project is told about it."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import conftest
from conftest import mix_switches
from gates.counterfactual import CounterfactualStep
from gates.policy import SkipPrice
from models import Switches, build_model, make_arch, switch_kind
from runtime.loop import train_epoch
from test_export import gated_model, images, save_stage  # noqa: F401 (images: a fixture)
from test_rl import CPU, _loaders, _mean_execute_probability
from deploy.export import export, reference_outputs, run_onnx
from runtime.predict import image_flops
from utils.flops import dense_flops, measure_costs

FILTERS = 4


@switch_kind("eca")
class ECASwitches(Switches):
    """ECA-Net's channel mixing as a switch: global average pool -> a 1-D conv across the pooled channels
    (FILTERS filters of width 3) -> ReLU -> linear to one logit; one of each per switch. A Conv1d: no layer
    the other kinds have."""

    def __init__(self, channels):
        super().__init__()
        self.mix = nn.ModuleList(nn.Conv1d(1, FILTERS, 3, padding=1) for _ in channels)
        self.heads = nn.ModuleList(nn.Linear(FILTERS * c, 1) for c in channels)

    def forward(self, j, x, state):
        z = F.relu(self.mix[j](x.mean((2, 3)).unsqueeze(1))).flatten(1)
        return torch.sigmoid(self.heads[j](z).float()).squeeze(1), state

    def logit_layers(self):
        return list(self.heads)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from conftest.one_thread()


def test_default_controller_trains_the_new_kind():
    """A price far above any block's benefit: the switches learn to skip (their mean p falls from about 0.5)."""
    train, test = _loaders()
    torch.manual_seed(0)
    model = build_model(make_arch(depth=14, width=1, num_classes=4, gate="eca"))
    before = _mean_execute_probability(model, test)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = CounterfactualStep(measure_costs(model, 8), SkipPrice(10.0), tau=0.05, rl_weight=1 / 32)
    for epoch in range(2):
        train.set_epoch(epoch)
        train_epoch(model, train, opt, None, step, CPU, epoch)
    after = _mean_execute_probability(model, test)
    assert before > 0.2 and after < before / 2, (before, after)


def test_masked_and_skipping_execution_agree():
    model = mix_switches(build_model(make_arch(depth=14, width=1, num_classes=10, gate="eca")), seed=1).eval()
    x = torch.randn(16, 3, 16, 16)
    outputs = {}
    with torch.no_grad():
        for execution in ("mask", "skip"):
            model.execution = execution
            outputs[execution] = model(x)
    assert torch.equal(outputs["mask"][1], outputs["skip"][1])
    assert 0 < outputs["mask"][1].mean() < 1
    torch.testing.assert_close(outputs["skip"][0], outputs["mask"][0], atol=1e-5, rtol=0)


def test_flops_of_the_new_kind_are_counted():
    model = mix_switches(build_model(make_arch(depth=14, width=1, num_classes=10, gate="eca"))).eval()
    costs = measure_costs(model, 16)
    # per switch and image: the Conv1d's 2 x (FILTERS x C) x 3 and the head's 2 x (FILTERS x C)
    assert costs["switches"] == sum(8 * head.in_features for head in model.switches.heads)
    model.execution = "skip"
    with FlopCounterMode(display=False) as counter:
        _, actions, _ = model(torch.randn(12, 3, 16, 16))
    assert 0 < actions.mean() < 1
    assert image_flops(costs, actions).sum().item() == counter.get_total_flops()


@pytest.mark.slow
def test_the_new_kind_exports_with_skipping_kept(images, tmp_path):
    x, mean, std = images
    model = gated_model("eca", x, mean, std, depth=14, pruned=False)
    path = str(tmp_path / "checkpoint.pt")
    save_stage(path, model, "rl", mean, std)
    report = export(path, str(tmp_path / "out"), mode="hard")  # checks every file against the checkpoint
    assert set(report["check"]) == {"onnx", "pt2", "onnx_b1", "pt2_b1"}
    assert report["gflops_every_block"] * 1e9 == dense_flops(measure_costs(model, x.shape[1]))  # BN: no FLOPs
    logits, routes = reference_outputs(model, x, mean, std, "hard")
    assert 0 < routes.mean() < 1
    got_logits, got_routes = run_onnx(report["files"]["onnx"], x, threads=2)
    assert torch.equal(got_routes, routes)
    assert (got_logits - logits).abs().max() <= 1e-4 * logits.abs().max()

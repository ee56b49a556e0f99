"""runtime/predict.py, the one per-image evaluator: its images add up to the stage's own evaluation, each
image costs the FLOPs it executes, files through the recorded pipeline give the same outcome as the loaders,
and the decoded data is shared between checkpoints of one pipeline."""
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import mix_switches
from models import build_model, make_arch
from runtime import predict
from runtime.checkpoint import load_model
from utils.data import DataSettings
from utils.dist import Context
from utils.flops import measure_costs

CPU = Context(device=torch.device("cpu"))


def test_per_image_outcomes_add_up_to_the_stage_evaluation(pipeline):
    _, data, results = pipeline
    path = str(results / "rl" / "checkpoint.pt")
    metrics = json.load(open(results / "rl" / "metrics.json"))
    net = predict.load(path, DataSettings(data_dir=data, bs=16), CPU, ("rl",))
    got = predict.predict(net.ddp, net.data.test, net.costs)
    assert 100 * got.correct.double().mean().item() == pytest.approx(metrics["test_acc"], abs=1e-9)
    assert got.flops.mean().item() / 1e9 == pytest.approx(metrics["gflops_per_image"], rel=1e-9)
    assert got.routes.double().mean(0).tolist() == pytest.approx(metrics["exec_rate"], abs=1e-9)
    assert got.logits.shape == (len(got.labels), net.data.num_classes)

    # the test images as files through the pipeline the checkpoint records: the same outcome per image
    model, prep = load_model(path)
    test = os.path.join(data, "test")
    classes = sorted(os.listdir(test))
    files = [(os.path.join(test, c, f), c) for c in classes for f in sorted(os.listdir(os.path.join(test, c)))]
    again = predict.predict(model, predict.file_batches(prep, [p for p, _ in files], [c for _, c in files], 7),
                            net.costs)
    assert torch.equal(again.labels, got.labels) and torch.equal(again.correct, got.correct)
    assert torch.equal(again.routes, got.routes) and torch.equal(again.flops, got.flops)

    # another network of the same pipeline is evaluated on the images already decoded
    other = predict.load(str(results / "prune" / "checkpoint.pt"), DataSettings(data_dir=data, bs=16), CPU,
                         data=net.data)
    assert other.data is net.data and other.model is not net.model


@pytest.mark.parametrize("gate", ["rnn", "ff"])
def test_each_image_costs_what_it_executes(gate):
    model = mix_switches(build_model(make_arch(depth=14, width=1, num_classes=10, gate=gate))).eval()
    model.execution = "skip"
    costs = measure_costs(model)
    x = torch.randn(12, 3, 32, 32)
    batches = [(x[:7], torch.zeros(7, dtype=torch.long)), (x[7:], torch.zeros(5, dtype=torch.long))]
    got = predict.predict(model, batches, costs)
    assert 0 < got.routes.double().mean() < 1 and len(set(got.flops.tolist())) > 1
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for xb, _ in batches:
            model(xb)
    assert got.flops.sum().item() == pytest.approx(counter.get_total_flops(), rel=1e-9)

    route = [1, 0, 0, 1, 1]
    fixed = predict.predict(model, batches, costs, mode="open", route=route)
    assert model.route is None  # the model's own route again
    assert fixed.routes.tolist() == [route] * 12
    model.route = route
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1], "open")
    model.route = None
    assert fixed.flops.tolist() == [counter.get_total_flops()] * 12

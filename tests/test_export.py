"""utils/export.py: the deployed form (BN folded, cheapest exact conv forms, normalisation inside) and the
exported ONNX / torch.export files reproduce the checkpoint, routes included."""
import json

import onnx
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_one_line_error, run_script, tiny_dataset
from models import FactoredConv, build_model, make_arch
from pruners import model_flops, prune
from utils.checkpoint import save_checkpoint
from utils.data import channel_stats, load_dataset, make_pipeline
from utils.errors import UserError
from utils.export import InferenceNet, cheapest_form, export, reference_outputs, run_onnx
from utils.flops import count_params

SIZE = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Test images of the learnable synthetic dataset as uint8 NHWC, and the training set's mean / std."""
    ds = load_dataset(tiny_dataset(tmp_path_factory.mktemp("data") / "png", size=SIZE), "png", SIZE)
    mean, std = channel_stats(ds.train_x)
    return ds.test_x[:48].permute(0, 2, 3, 1).contiguous(), mean.tolist(), std.tolist()


def pruned_model(gate, images, mean, std):
    """A depth-8 width-1 net pruned to 50% (factored convs of every kind), with BN statistics that are
    not the identity and switches whose routes split the images at every switch."""
    torch.manual_seed(0)
    model = build_model(make_arch(depth=8, width=1, num_classes=10, gate=gate)).eval()
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / \
        torch.tensor(std).view(1, 3, 1, 1)
    model, _ = prune(model, [(x, torch.randint(0, 10, (len(x),)))], target="compression", value=0.5,
                     params_reference=count_params(model), fisher_type="empirical", progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for p in model.switches.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if gate == "ff":
            split_every_switch(model, x)
    return model.eval()


def split_every_switch(model, x):
    """Set each ff switch's bias so that its threshold sits in the widest gap between the logits of the
    middle half of the images: mixed routes, and no image near the boundary (rounding cannot flip it)."""
    for j, head in enumerate(model.switches.heads):
        seen = {}
        hook = head.register_forward_hook(lambda m, i, o: seen.__setitem__("z", o.flatten()))
        model(x)
        hook.remove()
        z = seen["z"].sort().values
        n = len(z)
        lo = n // 4 + (z[n // 4:3 * n // 4 + 1].diff().argmax().item())
        head.bias -= (z[lo] + z[lo + 1]) / 2


def test_cheapest_form_merges_rot_out_only_where_it_saves_flops():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    for r_in, r_out, merged in ((4, 30, True), (30, 4, False), (32, 4, False)):
        conv = FactoredConv(32, 32, 3, 1, 1, r_in, r_out).eval()
        form = cheapest_form(conv)
        assert len(form) == 1 + (r_in < 32) + (not merged)
        assert all(c.kernel_size == (1, 1) for c in form[:r_in < 32])  # rot_in is never merged
        with torch.no_grad():
            torch.testing.assert_close(nn.Sequential(*form)(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate", ["rnn", "ff"])
def test_deployed_form_equals_the_saved_model(images, gate):
    x, mean, std = images
    model = pruned_model(gate, x, mean, std)
    for mode in ("hard", "open"):
        expected = reference_outputs(model, x, mean, std, mode)
        for single in ((False, True) if mode == "hard" else (False,)):
            net = InferenceNet(model, mean, std, mode, single).to(memory_format=torch.channels_last)
            with torch.no_grad():
                outs = [net(x[i:i + 1]) for i in range(len(x))] if single else [net(x)]
            got = [torch.cat([o[k] if mode == "hard" else o for o in outs]) for k in range(len(expected))]
            scale = expected[0].abs().max()
            assert (got[0] - expected[0]).abs().max() <= 1e-4 * scale, (mode, single)
            if mode == "hard":
                assert torch.equal(got[1], expected[1])
                if gate == "ff":
                    rates = expected[1].mean(0)
                    assert ((rates > 0) & (rates < 1)).all()  # both branches taken at every switch
    deployed = InferenceNet(model, mean, std, "open")
    assert sum(p.numel() for p in deployed.parameters()) <= count_params(model)
    with FlopCounterMode(display=False) as counter:
        deployed(x[:1])
    assert counter.get_total_flops() <= model_flops(model, SIZE)


def test_exported_onnx_and_pt2_reproduce_the_checkpoint(images, tmp_path):
    x, mean, std = images
    model = pruned_model("ff", x, mean, std)
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"stage": "rl", "arch": model.arch, "model": model.state_dict(), "epoch": 0,
                           "pipeline": make_pipeline(SIZE, mean, std, list("abcdefghij"), "crop")})
    report = export(path, str(tmp_path / "out"))
    assert report["mode"] == "hard" and all(c["routes_equal"] for c in report["check"].values())
    assert json.load(open(tmp_path / "out" / "export.json"))["files"] == report["files"]
    expected = reference_outputs(model, x, mean, std, "hard")
    assert 0 < expected[1].mean() < 1
    scale = expected[0].abs().max()
    logits, routes = run_onnx(report["files"]["onnx"], x, threads=2)  # the whole batch, sub-batches inside
    assert (logits - expected[0]).abs().max() <= 1e-4 * scale and torch.equal(routes, expected[1])
    for i in range(0, len(x), 7):  # one image at a time: gated blocks are ONNX If nodes
        logits, routes = run_onnx(report["files"]["onnx_b1"], x[i:i + 1], threads=2)
        assert (logits - expected[0][i:i + 1]).abs().max() <= 1e-4 * scale
        assert torch.equal(routes, expected[1][i:i + 1])
    ops = [n.op_type for n in onnx.load(report["files"]["onnx_b1"]).graph.node]
    assert ops.count("If") == model.num_switches
    loaded = torch.export.load(report["files"]["pt2"]).module()
    with torch.no_grad():
        logits, routes = loaded(x)
    assert (logits - expected[0]).abs().max() <= 1e-4 * scale and torch.equal(routes, expected[1])


def test_export_needs_the_pipeline_and_refuses_conflicts(images, tmp_path):
    x, mean, std = images
    model = build_model(make_arch(depth=8, width=1, num_classes=10))
    path = str(tmp_path / "sp.pt")
    save_checkpoint(path, {"stage": "sp", "arch": model.arch, "model": model.state_dict(), "epoch": 0})
    assert_one_line_error(run_script("-m", "utils.export", path, "--out", str(tmp_path / "out")),
                          "pipeline", "--mean")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="reads 3 channels"):
        export(path, str(tmp_path / "out"), mean=[0.5], std=[0.2], resize=SIZE)
    save_checkpoint(path, {"stage": "sp", "arch": model.arch, "model": model.state_dict(), "epoch": 0,
                           "pipeline": make_pipeline(SIZE, mean, std, list("abcdefghij"), "none")})
    with pytest.raises(UserError, match="conflicts"):
        export(path, str(tmp_path / "out"), resize=SIZE * 2)

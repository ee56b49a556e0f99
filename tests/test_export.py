"""deploy/export.py: the deployed form (BN folded, cheapest exact conv forms, normalisation inside) and the
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
from runtime.checkpoint import save_checkpoint
from utils.data import channel_stats, load_dataset, make_pipeline
from utils.errors import UserError, run_main
from deploy.export import InferenceNet, cheapest_form, export, main, reference_outputs, run_onnx
from utils.flops import count_params

SIZE = 16


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Test images of the learnable synthetic dataset as uint8 NHWC, and the training set's mean / std."""
    ds = load_dataset(tiny_dataset(tmp_path_factory.mktemp("data") / "png", size=SIZE), "png", SIZE)
    mean, std = channel_stats(ds.train_x)
    return ds.test_x[:48].permute(0, 2, 3, 1).contiguous(), mean.tolist(), std.tolist()


def gated_model(gate, images, mean, std, depth=14, pruned=True):
    """A width-1 net (depth 14 and up: gated blocks with identity shortcuts and projecting ones), pruned to
    50% (factored convs of every kind) unless not `pruned`, with BN statistics that are not the identity and
    switches whose routes split the images at every switch."""
    torch.manual_seed(0)
    model = build_model(make_arch(depth=depth, width=1, num_classes=10, gate=gate)).eval()
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / \
        torch.tensor(std).view(1, 3, 1, 1)
    if pruned:
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
        split_every_switch(model, x, g)
    return model.eval()


def split_every_switch(model, x, g):
    """Mixed routes at every switch, and no image near the boundary (rounding cannot flip it). ff: each
    switch's bias sits in the widest gap between the logits of the middle half of the images. rnn (one head
    shared by every switch, its biases and the head's zeroed): switch j's projection is redrawn, whitened
    over the images (per embedding unit mean 0 and a spread of about 1 across images: the images differ
    more than the LSTM's offsets), until a quarter of the images or more take each branch, none within 0.01
    of logit 0."""
    if hasattr(model.switches, "lstm"):
        for b in (model.switches.lstm.bias_ih, model.switches.lstm.bias_hh, model.switches.head.bias):
            b.zero_()
        for j, proj in enumerate(model.switches.proj):
            seen = {}
            hook = proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", i[0].flatten(1)))
            model(x)
            hook.remove()
            mean, std = seen["v"].mean(0), seen["v"].std(0) + 1e-6
            for _ in range(100):
                w = torch.randn(proj.weight.shape[:2], generator=g) / (std * len(std) ** 0.5)
                proj.weight.copy_(w.view(proj.weight.shape))
                proj.bias.copy_(-w @ mean)
                p = model(x)[2][:, j].double()
                if 0.25 <= (p > 0.5).double().mean() <= 0.75 and torch.logit(p).abs().min() > 0.01:
                    break
            else:
                raise AssertionError(f"no projection of switch {j} splits the images")
        return
    for j, head in enumerate(model.switches.heads):
        seen = {}
        hook = head.register_forward_hook(lambda m, i, o: seen.__setitem__("z", o.flatten()))
        model(x)
        hook.remove()
        z = seen["z"].sort().values
        n = len(z)
        lo = n // 4 + (z[n // 4:3 * n // 4 + 1].diff().argmax().item())
        head.bias -= (z[lo] + z[lo + 1]) / 2


def save_stage(path, model, stage, mean, std):
    save_checkpoint(path, {"stage": stage, "arch": model.arch, "model": model.state_dict(), "epoch": 0,
                           "pipeline": make_pipeline(SIZE, mean, std, list("abcdefghij"), "crop")})


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
    model = gated_model(gate, x, mean, std)
    assert {b.projects for b in model.blocks[1:]} == {True, False}  # identity and projecting gated blocks
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
                rates = expected[1].mean(0)
                assert ((rates > 0) & (rates < 1)).all()  # both branches taken at every switch
    deployed = InferenceNet(model, mean, std, "open")
    assert sum(p.numel() for p in deployed.parameters()) <= count_params(model)
    with FlopCounterMode(display=False) as counter:
        deployed(x[:1])
    assert counter.get_total_flops() <= model_flops(model, SIZE)


def covering(routes):
    """Indices of a few images that between them take both branches of every switch."""
    picked, seen = [], set()
    for i, r in enumerate(routes.tolist()):
        new = set(enumerate(r)) - seen
        if new:
            picked.append(i)
            seen |= new
    assert len(seen) == 2 * routes.shape[1], "some switch takes one branch only"
    return picked


@pytest.mark.parametrize("gate, depth, pruned, stage", [
    ("rnn", 14, True, "prune"),  # stage 2's checkpoint: factored convs (the fast loop's case)
    pytest.param("rnn", 14, False, "rl", marks=pytest.mark.slow),  # stage 3's on an unpruned net
    pytest.param("ff", 14, True, "rl", marks=pytest.mark.slow),
    pytest.param("rnn", 32, True, "prune", marks=pytest.mark.slow),  # the seed's depth
    pytest.param("rnn", 32, True, "rl", marks=pytest.mark.slow),
])
def test_exported_onnx_and_pt2_reproduce_the_checkpoint(images, tmp_path, gate, depth, pruned, stage):
    x, mean, std = images
    model = gated_model(gate, x, mean, std, depth, pruned)
    assert {b.projects for b in model.blocks[1:]} == {True, False}  # identity and projecting gated blocks
    assert any(isinstance(m, FactoredConv) for m in model.modules()) == pruned
    path = str(tmp_path / "checkpoint.pt")
    save_stage(path, model, stage, mean, std)
    report = export(path, str(tmp_path / "out"), mode="hard")  # the routed network, both batch forms
    assert report["mode"] == "hard" and all(c["routes_equal"] for c in report["check"].values())
    assert set(report["check"]) == {"onnx", "pt2", "onnx_b1", "pt2_b1"}
    assert json.load(open(tmp_path / "out" / "export.json"))["files"] == report["files"]
    expected = reference_outputs(model, x, mean, std, "hard")
    scale = expected[0].abs().max()
    logits, routes = run_onnx(report["files"]["onnx"], x, threads=2)  # the whole batch, sub-batches inside
    assert (logits - expected[0]).abs().max() <= 1e-4 * scale and torch.equal(routes, expected[1])
    loaded = torch.export.load(report["files"]["pt2"]).module()
    with torch.no_grad():
        logits, routes = loaded(x)
    assert (logits - expected[0]).abs().max() <= 1e-4 * scale and torch.equal(routes, expected[1])
    # one image at a time, gated blocks as control flow (ONNX If, torch.cond): both branches of every switch
    ops = [n.op_type for n in onnx.load(report["files"]["onnx_b1"]).graph.node]
    assert ops.count("If") == model.num_switches
    loaded = torch.export.load(report["files"]["pt2_b1"]).module()
    for i in covering(expected[1]):
        with torch.no_grad():
            got = [run_onnx(report["files"]["onnx_b1"], x[i:i + 1], threads=2), loaded(x[i:i + 1])]
        for logits, routes in got:
            assert (logits - expected[0][i:i + 1]).abs().max() <= 1e-4 * scale
            assert torch.equal(routes, expected[1][i:i + 1])


def test_export_failure_is_one_line(images, tmp_path, monkeypatch, capsys):
    x, mean, std = images
    model = build_model(make_arch(depth=8, width=1, num_classes=10))
    path = str(tmp_path / "rl.pt")
    save_stage(path, model, "rl", mean, std)

    def fails(*args, **kwargs):
        raise RuntimeError("exporter\n  failed\n\non several lines")

    monkeypatch.setattr(torch.export, "export", fails)
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main([path, "--out", str(tmp_path / "out")]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: cannot export model (hard mode): RuntimeError: exporter failed on several "
                                "lines"]
    assert not (tmp_path / "out" / "export.json").exists()


@pytest.mark.slow
def test_export_needs_the_pipeline_and_refuses_conflicts(images, tmp_path):
    x, mean, std = images
    model = build_model(make_arch(depth=8, width=1, num_classes=10))
    path = str(tmp_path / "sp.pt")
    save_checkpoint(path, {"stage": "sp", "arch": model.arch, "model": model.state_dict(), "epoch": 0})
    assert_one_line_error(run_script("-m", "deploy.export", path, "--out", str(tmp_path / "out")),
                          "pipeline", "--mean")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="reads 3 channels"):
        export(path, str(tmp_path / "out"), mean=[0.5], std=[0.2], resize=SIZE)
    save_checkpoint(path, {"stage": "sp", "arch": model.arch, "model": model.state_dict(), "epoch": 0,
                           "pipeline": make_pipeline(SIZE, mean, std, list("abcdefghij"), "none")})
    with pytest.raises(UserError, match="conflicts"):
        export(path, str(tmp_path / "out"), resize=SIZE * 2)

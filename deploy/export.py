"""Export a checkpoint of any stage as an inference model: ONNX (run by onnxruntime) and torch.export.

    python -m deploy.export CHECKPOINT --out DIR [--mode hard|open] [--mean R G B --std R G B --resize N]

What is exported (the network as deployed), its inputs and outputs, and how export.json records the check of
every file against the checkpoint: docs/export.md.
"""
import contextlib
import copy
import io
import json
import os
import warnings

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

from models import FactoredConv
from runtime.checkpoint import load_checkpoint, model_from_checkpoint, row_mode
from utils.lineage import ORDER, check_chain
from utils.cli import Parser
from utils.errors import UserError, run_main
from utils.flops import probe
from utils.nets import unwrap

TOLERANCE = 1e-4  # exported outputs equal the checkpoint's within this (relative to the largest logit)


def cheapest_form(conv):
    """The convs (in order) that compute `conv` (a Conv2d or FactoredConv) with fewest FLOPs: rot_out
    multiplied into the core where that costs no more; rot_in never merged (docs/export.md)."""
    if not isinstance(conv, FactoredConv):
        return [conv]
    core, rot_out = conv.core, conv.rot_out
    convs = [conv.rot_in] if conv.rot_in is not None else []
    if rot_out is None:
        return convs + [core]
    r_out, r_in = core.weight.shape[:2]
    c_out, k2 = rot_out.out_channels, core.kernel_size[0] * core.kernel_size[1]
    if r_in * c_out * k2 <= r_in * r_out * k2 + r_out * c_out:
        merged = nn.Conv2d(r_in, c_out, core.kernel_size, core.stride, core.padding, bias=False)
        with torch.no_grad():
            merged.weight.copy_(torch.einsum("po,oikl->pikl", rot_out.weight.double().flatten(1),
                                             core.weight.double()).to(core.weight.dtype))
        return convs + [merged]
    return convs + [core, rot_out]


def deployed(model, mode):
    """A float32 eval copy of `model` as deployed: factored convs in their cheapest form, each BatchNorm folded
    into the conv it reads (seen in a forward pass), in `open` mode without switches."""
    model = copy.deepcopy(unwrap(model)).float().eval()
    made, reads = {}, {}  # id(output) -> (output, conv name): outputs kept alive, ids unique; bn -> conv

    def record(name, m, inputs, output):
        if isinstance(m, nn.BatchNorm2d):
            conv = made.get(id(inputs[0]), (None,))
            if conv[0] is inputs[0]:
                reads[name] = conv[1]
        else:  # a FactoredConv's hook runs after its last conv's: the output is named after the whole
            made[id(output)] = (output, name)

    probe(model, 32, [(n, m) for n, m in model.named_modules()  # which conv: the same at any image size
                      if isinstance(m, (nn.Conv2d, FactoredConv, nn.BatchNorm2d))], record)
    folds = {conv: bn for bn, conv in reads.items()}
    for name, m in list(model.named_modules()):
        if isinstance(m, FactoredConv) or name in folds:
            convs = cheapest_form(m)
            if name in folds:
                convs[-1] = fuse_conv_bn_eval(convs[-1].eval(), model.get_submodule(folds[name]))
            model.set_submodule(name, nn.Sequential(*convs))
    for bn in reads:
        model.set_submodule(bn, nn.Identity())
    if mode == "open":
        model.switches = None
    return model


class InferenceNet(nn.Module):
    """The deployed form of a checkpoint's network: its own forward on the deployed copy. `single`: one image
    per call, gated blocks as torch.cond; else each gated block on the sub-batch of images that run it."""

    def __init__(self, model, mean, std, mode="hard", single=False):
        super().__init__()
        self.mode = mode
        self.net = deployed(unwrap(model), mode)
        self.net.execution = "branch" if single else "skip"
        std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1 / (255 * std))
        self.register_buffer("shift", -mean / std)
        self.eval()

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift  # NHWC uint8 -> channels_last NCHW
        logits, routes, _ = self.net(x, self.mode)
        return logits if self.mode == "open" else (logits, routes)


def check_lineage(ckpt_path):
    """A checkpoint exported from <result_dir>/<stage>/checkpoint.pt must belong to that folder's chain."""
    stage_dir = os.path.dirname(os.path.abspath(ckpt_path))
    stage, result_dir = os.path.basename(stage_dir), os.path.dirname(stage_dir)
    if os.path.basename(ckpt_path) == "checkpoint.pt" and stage in ORDER:
        check_chain(result_dir, ORDER[:ORDER.index(stage) + 1])



def export_files(net, out_dir, in_channels, size, single):
    """Write <out_dir>/model[_b1].{onnx,pt2}; returns their paths."""
    stem = "model_b1" if single else "model"
    example = torch.zeros(2 - single, size, size, in_channels, dtype=torch.uint8)
    dynamic = None if single else ({0: torch.export.Dim("batch", min=1)},)
    program = torch.export.export(net, (example,), dynamic_shapes=dynamic)
    pt2, onnx_path = os.path.join(out_dir, stem + ".pt2"), os.path.join(out_dir, stem + ".onnx")
    with warnings.catch_warnings():  # channels_last weights: a harmless note about their storage layout
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(program, pt2)
    names = ["logits"] + (["routes"] if net.mode == "hard" else [])
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        onnx_program = torch.onnx.export(program, (example,), input_names=["images"], output_names=names,
                                         dynamo=True, external_data=False, verbose=False)
    onnx_program.save(onnx_path)
    return {"onnx": onnx_path, "pt2": pt2}


def onnx_session(path, threads=None):
    """An onnxruntime session (CPU) of an exported ONNX file; its input "images" is raw uint8 NHWC."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one graph runs at a time
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not spin
    options.log_severity_level = 3  # no warnings about initialisers the exporter left unused
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(path, images, threads=None):
    """Outputs of an exported ONNX file in onnxruntime (CPU), as torch tensors."""
    return [torch.from_numpy(o) for o in onnx_session(path, threads).run(None, {"images": images.numpy()})]


def reference_outputs(model, images, mean, std, mode):
    """The checkpoint's own model on `images` (uint8 NHWC), normalised as in training: (logits[, routes])."""
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / \
        torch.tensor(std).view(1, -1, 1, 1)
    model.eval()
    with torch.no_grad():
        logits, routes, _ = model(x, mode)
    return (logits,) if mode == "open" else (logits, routes)


def compare(got, expected):
    """Largest difference of logits relative to the largest logit, and whether routes agree."""
    scale = max(1.0, expected[0].abs().max().item())
    diff = (got[0].float() - expected[0]).abs().max().item() / scale
    routes = len(expected) == 1 or torch.equal(got[1].float(), expected[1].float())
    return diff, routes


def export_form(model, pipeline, mode, single, out_dir, channels, images, expected):
    """One batch form of `model` exported and checked against `expected`: (files, checks) as in export.json."""
    suffix = "_b1" if single else ""
    net = InferenceNet(model, pipeline["mean"], pipeline["std"], mode, single).to(memory_format=torch.channels_last)
    files = export_files(net, out_dir, channels, pipeline["resize"], single)
    batch = [images[i:i + 1] for i in range(len(images))] if single else [images]
    loaded = torch.export.load(files["pt2"]).module()
    check = {}
    for kind, run in (("onnx", lambda b: run_onnx(files["onnx"], b)), ("pt2", lambda b: loaded(b))):
        with torch.no_grad():
            outs = [run(b) for b in batch]
        got = [torch.cat([o[i] if isinstance(o, (list, tuple)) else o for o in outs]) for i in range(len(expected))]
        diff, routes = compare(got, expected)
        name = kind + suffix
        check[name] = {"max_relative_diff": diff, "routes_equal": routes}
        if diff > TOLERANCE or not routes:
            raise UserError(f"exported {name} does not reproduce the checkpoint (difference {diff:.2g}, "
                            f"routes {'equal' if routes else 'differ'})")
    return {k + suffix: v for k, v in files.items()}, check


def export(ckpt_path, out_dir, mean=None, std=None, resize=None, mode=None, check_images=8, seed=0):
    """Export the checkpoint at `ckpt_path` into `out_dir`; returns the export.json dict. UserError when the
    pipeline is unknown or conflicts with the flags, or an exported file does not reproduce the checkpoint."""
    ckpt = load_checkpoint(ckpt_path, None, "CHECKPOINT")
    check_lineage(ckpt_path)
    pipeline = dict(ckpt.get("pipeline") or {})
    for key, value in (("mean", mean), ("std", std), ("resize", resize)):
        if value is None:
            continue
        if key in pipeline and pipeline[key] != value:
            raise UserError(f"--{key} {value} conflicts with the checkpoint's pipeline {key} {pipeline[key]}")
        pipeline[key] = value
    missing = [k for k in ("mean", "std", "resize") if pipeline.get(k) is None]
    if missing:
        raise UserError(f"CHECKPOINT {ckpt_path}: holds no pipeline {'/'.join(missing)} (checkpoints before "
                        f"ckpt['pipeline']); give --{' --'.join(missing)}")
    channels = ckpt["arch"].get("in_channels", 3)
    for key in ("mean", "std"):
        if len(pipeline[key]) != channels:
            raise UserError(f"--{key}: {len(pipeline[key])} values, the network reads {channels} channels")
    if min(pipeline["std"]) <= 0:
        raise UserError("--std: every value must be > 0")
    mode = mode or row_mode(ckpt)
    model = model_from_checkpoint(ckpt, ckpt_path, "CHECKPOINT").float().eval()
    os.makedirs(out_dir, exist_ok=True)
    size = pipeline["resize"]
    images = torch.randint(0, 256, (check_images, size, size, channels), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    expected = reference_outputs(model, images, pipeline["mean"], pipeline["std"], mode)
    dense = InferenceNet(model, pipeline["mean"], pipeline["std"], "open")
    with FlopCounterMode(display=False) as counter:
        dense(images[:1])
    report = {"checkpoint": os.path.abspath(ckpt_path), "stage": ckpt.get("stage"), "mode": mode,
              "pipeline": pipeline, "input": f"uint8 (N, {size}, {size}, {channels}), RGB, 0-255",
              "gflops_every_block": counter.get_total_flops() / 1e9,
              "outputs": ["logits"] + (["routes"] if mode == "hard" else []), "files": {}, "check": {}}
    for single in ((False, True) if mode == "hard" else (False,)):
        try:
            files, check = export_form(model, pipeline, mode, single, out_dir, channels, images, expected)
        except (UserError, OSError):  # one line already (run_main words an OSError)
            raise
        except Exception as e:  # torch.export's, the ONNX exporter's, onnxruntime's: one line, no traceback
            why = " ".join(f"{type(e).__name__}: {e}".split())  # its type and the start of its message
            raise UserError(f"cannot export {'model_b1' if single else 'model'} ({mode} mode): "
                            f"{why if len(why) <= 300 else why[:297] + '...'}") from None
        report["files"].update(files)
        report["check"].update(check)
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None):
    p = Parser(prog="python -m deploy.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--out", required=True, help="folder for model.onnx, model.pt2, export.json")
    p.add_argument("--mode", choices=["hard", "open"], default=None,
                   help="hard: switches route each image (default for stage 3); open: every block (stages 1, 2)")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean in [0, 1] units, for checkpoints "
                   "without ckpt['pipeline']")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std in [0, 1] units (idem)")
    p.add_argument("--resize", type=int, help="image side the network reads (idem)")
    args = p.parse_args(argv)
    report = export(args.checkpoint, args.out, args.mean, args.std, args.resize, args.mode)
    print(json.dumps({"files": report["files"], "check": report["check"]}, indent=1))


if __name__ == "__main__":
    run_main(main)

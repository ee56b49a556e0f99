"""The peer comparison: Torch-Pruning (PyPI `torch-pruning`) on our stage-1 network and data.

    python bench/peer_torch_pruning.py finetune --result_dir RUN --method magnitude|taylor
    python bench/peer_torch_pruning.py measure --result_dir RUN [--threads 2] [--out FILE]

RUN is a --result_dir that stages 1-3 filled (sp/, prune/, rl/). `finetune` prunes the stage-1 network with
Torch-Pruning's group pruning (magnitude: group L2 norm; taylor: group first-order Taylor, |w * dL/dw|)
to the parameter count of our stage-2 model (the pruning ratio is found by bisection on copies), then
fine-tunes it with stage 2's budget (its config: epochs, lr, optimizer, schedule, batch size, seed, the same
data loaders) and BN re-estimation. Writes RUN/peer/<method>/{weights.pt, metrics.json}. `measure`
evaluates every model of RUN in one process (stage 1, our stage 2 and 3, both Torch-Pruning models):
test accuracy, GFLOPs per image, parameters and CPU latency at batch 128 and 1 (median of repeats).

The switches. Torch-Pruning's dependency graph traces the network with every block open (a wrapper whose
forward is `model(x, "open")[0]`), so the switches are outside its graph and are never pruning targets.
They keep their stage-1 weights; the only change to them is that each switch's input conv loses the same
input channels that Torch-Pruning removed from the activation that switch reads, so they still route the
pruned network. Every model is then fine-tuned, evaluated and timed exactly like our stage 2: switches in
`hard` mode, skipped blocks not computed, FLOPs counted as each image runs (utils/flops.py).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names
from models import build_model  # noqa: E402
from pruners import evenly_spaced  # noqa: E402
from runtime.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from utils.dist import setup  # noqa: E402
from runtime.evaluate import evaluate, recalibrate_bn
from runtime.loop import make_scheduler, seed_epoch, train_epoch
from runtime.steps import supervised_step
from utils.files import write_json
from utils.flops import compression, count_params, measure_costs  # noqa: E402
from utils.data import DataSettings, load_data  # noqa: E402

METHODS = ("magnitude", "taylor", "global_magnitude")  # global: one threshold over all layers' groups


# ------------------------------------------------------------------------------------- the run's files

def stage_checkpoint(run_dir, stage):
    path = os.path.join(run_dir, stage, "checkpoint.pt")
    return load_checkpoint(path, (stage,), "checkpoint"), path


def stage_metrics(run_dir, stage):
    with open(os.path.join(run_dir, stage, "metrics.json")) as f:
        return json.load(f)


def stage2_config(run_dir, data_dir=None):
    """Stage 2's resolved config (stored in its checkpoint): the fine-tuning budget and the data."""
    cfg = dict(stage_checkpoint(run_dir, "prune")[0]["config"])
    if data_dir:
        cfg["data_dir"] = data_dir
    if len(cfg["schedule"]) != 1:
        raise SystemExit("the peer comparison expects a one-pass stage 2 (one pruning round)")
    return cfg


def load_run_data(cfg):
    ctx = setup("cpu", cfg["seed"])
    return load_data(DataSettings.of(cfg, download=False), ctx), ctx


# ---------------------------------------------------------------------------------- Torch-Pruning

class OpenRoute(nn.Module):
    """The network with every block run: the fixed route Torch-Pruning's dependency graph traces."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, "open")[0]


def switch_input_conv(model, j):
    """The conv of switch j that reads the activation entering block j + 1."""
    switches = model.switches
    return switches.proj[j] if hasattr(switches, "proj") else switches.convs[j]


def importance(method):
    import torch_pruning as tp

    if method in ("magnitude", "global_magnitude"):
        return tp.importance.GroupMagnitudeImportance(p=2)
    return tp.importance.GroupTaylorImportance()


def tp_prune(model, method, ratio, image_size):
    """Prune `model` in place with Torch-Pruning to channel pruning ratio `ratio` (uniform over layers,
    the library's default, or one global ranking for global_magnitude), keeping the switches' input convs in step with the activations they read."""
    import torch_pruning as tp

    model.eval()
    example = torch.zeros(1, model.arch.get("in_channels", 3), image_size, image_size)
    pruner = tp.pruner.MetaPruner(OpenRoute(model), example, importance=importance(method), pruning_ratio=ratio,
                                  ignored_layers=[model.fc, model.switches],
                                  global_pruning=method == "global_magnitude")
    block_out = {id(block.bn2): j for j, block in enumerate(model.blocks[:-1])}  # block j's output -> switch j
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            j = block_out.get(id(dep.target.module))
            if j is not None and dep.handler == tp.prune_batchnorm_out_channels:
                tp.prune_conv_in_channels(switch_input_conv(model, j), list(idxs))
        group.prune()
    return model


def taylor_gradients(model, batches):
    """dL/dw on the given batches (real labels, the network as stage 1 routes it: hard switches, BN
    statistics frozen, every block computed for every image), as Torch-Pruning's Taylor importance reads
    them from .grad; the same batches our factor pass used."""
    model.eval()
    model.execution = "mask"
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(model(x, "hard")[0], y).backward()
    model.execution = "auto"


def pruned_copy(model, method, ratio, image_size):
    clone = copy.deepcopy(model)
    for p, q in zip(model.parameters(), clone.parameters()):  # deepcopy drops .grad: Taylor needs it
        q.grad = None if p.grad is None else p.grad.clone()
    return tp_prune(clone, method, ratio, image_size)


def search_ratio(model, method, target_params, image_size, steps=16, high=0.95):
    """The channel pruning ratio whose pruned model holds the parameter count closest to target_params
    (bisection: the count falls as the ratio grows)."""
    low, tried = 0.0, {}
    for _ in range(steps):
        mid = (low + high) / 2
        tried[mid] = count_params(pruned_copy(model, method, mid, image_size))
        low, high = (mid, high) if tried[mid] > target_params else (low, mid)
    return min(tried, key=lambda r: (abs(tried[r] - target_params), r))


# ------------------------------------------------------------------------- fine-tuning, as stage 2 does

def finetune(model, data, ctx, cfg):
    """Stage 2's fine-tuning loop with its budget: SGD (nesterov), per-step schedule, hard switches,
    then BN statistics re-estimated over one epoch of training batches."""
    spec = cfg["schedule"][0]
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"], nesterov=cfg["momentum"] > 0)
    scheduler = make_scheduler(optimizer, cfg["scheduler"], spec["epochs"], len(data.train))
    for epoch in range(spec["epochs"]):
        seed_epoch(ctx, epoch)
        data.train.set_epoch(epoch)
        stats = train_epoch(model, data.train, optimizer, scheduler, supervised_step, ctx, epoch=epoch,
                            desc="peer epoch")
        print(f"[peer] epoch {epoch + 1}/{spec['epochs']}  train loss {stats['loss']:.3f} "
              f"acc {stats['acc']:.2f}%", flush=True)
    recalibrate_bn(model, data.train, ctx, batches=len(data.train))
    return model


def shaped_like(state, arch):
    """Rebuild a Torch-Pruning model from its state dict: the stage-1 network with every conv, BN and
    linear resized to the shapes the state dict holds (no pickled modules)."""
    model = build_model(arch)
    for name, module in list(model.named_modules()):
        w = state.get(f"{name}.weight")
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(w.shape[1], w.shape[0], module.kernel_size, module.stride, module.padding,
                            bias=module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(w.shape[0])
        elif isinstance(module, nn.Linear):
            new = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None)
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    model.load_state_dict(state)
    return model


def run_finetune(args):
    torch.set_num_threads(args.threads)
    cfg = stage2_config(args.result_dir, args.data_dir)
    data, ctx = load_run_data(cfg)
    stage1, stage1_path = stage_checkpoint(args.result_dir, "sp")
    model = model_from_checkpoint(stage1, stage1_path)
    target = stage_metrics(args.result_dir, "prune")["params"]
    t0 = time.perf_counter()
    if args.method == "taylor":
        taylor_gradients(model, evenly_spaced(data.plain_train, cfg["fisher_batches"]))
    ratio = search_ratio(model, args.method, target, data.image_size)
    tp_prune(model, args.method, ratio, data.image_size)
    model.zero_grad(set_to_none=True)
    prune_seconds = time.perf_counter() - t0
    costs = measure_costs(model, data.image_size)
    before = evaluate(model, data.test, ctx, costs, desc="test after pruning")
    print(f"[peer] torch-pruning {args.method}: ratio {ratio:.4f} -> {count_params(model)} params "
          f"(ours {target}); test acc after pruning {before['acc']:.2f}%", flush=True)
    t0 = time.perf_counter()
    finetune(model, data, ctx, cfg)
    after = evaluate(model, data.test, ctx, costs, desc="test")
    out = os.path.join(args.result_dir, "peer", args.method)
    os.makedirs(out, exist_ok=True)
    torch.save({"arch": stage1["arch"], "model": model.state_dict()}, os.path.join(out, "weights.pt"))
    metrics = {"method": f"torch-pruning {args.method}", "torch_pruning": _tp_version(), "ratio": ratio,
               "params": count_params(model), "params_target": target, "params_stage1": count_params(
                   model_from_checkpoint(stage1, stage1_path)), "test_acc_after_prune": before["acc"],
               "test_acc": after["acc"], "gflops_per_image": after["gflops"], "exec_rate": after["exec_rate"],
               "finetune": {k: cfg["schedule"][0][k] for k in ("epochs", "lr")} | {
                   k: cfg[k] for k in ("momentum", "weight_decay", "scheduler", "bs", "seed")},
               "prune_seconds": prune_seconds, "finetune_seconds": time.perf_counter() - t0}
    metrics["compression"] = compression(metrics["params"], metrics["params_stage1"])
    write_json(os.path.join(out, "metrics.json"), metrics)
    print(f"[peer] torch-pruning {args.method}: test acc {after['acc']:.2f}% after fine-tuning, "
          f"{after['gflops']:.4f} GFLOPs/image -> {out}/metrics.json", flush=True)


def _tp_version():
    from importlib.metadata import version

    return version("torch-pruning")  # the package's own __version__ string lags its release


# --------------------------------------------------------------------------------------- measuring

def test_images(data, n):
    xs = [x for x, _ in data.test]
    return torch.cat(xs)[:n]


@torch.no_grad()
def latencies_ms(models, images, batch, repeats):
    """Median wall-clock milliseconds per forward of `batch` images for each of `models` (batch 1: the
    mean over the first 32 test images, one at a time, so that per-image routes are averaged). The models
    take turns within every repeat, so that a busy spell of the machine hits them all alike."""
    if batch == 1:
        inputs, per = images[:32].split(1), 32
    else:
        inputs, per = [images[:batch]], 1
    for model in models:
        model.eval()
        for x in inputs:  # warm-up
            model(x)
    times = [[] for _ in models]
    for _ in range(repeats):
        for model, own in zip(models, times):
            t0 = time.perf_counter()
            for x in inputs:
                model(x)
            own.append((time.perf_counter() - t0) / per)
    return [1e3 * statistics.median(t) for t in times]


def measured_models(run_dir):
    """(key, label, model, extra) for every model of the run that exists."""
    out = []
    for stage, key, label in (("sp", "unpruned", "w/o pruning (stage 1)"),
                              ("prune", "ours_static", "ours: static (stage 2)"),
                              ("rl", "ours_dynamic", "ours: static + dynamic (stage 3)")):
        ckpt, path = stage_checkpoint(run_dir, stage)
        m = stage_metrics(run_dir, stage)
        extra = {"metrics_test_acc": m["test_acc"]}
        if stage == "prune":
            extra["test_acc_after_prune"] = m["rounds"][0].get("test_acc_before_finetune")
        out.append((key, label, model_from_checkpoint(ckpt, path), extra))
    for method in METHODS:
        path = os.path.join(run_dir, "peer", method)
        if os.path.isfile(os.path.join(path, "metrics.json")):
            saved = torch.load(os.path.join(path, "weights.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(path, "metrics.json")) as f:
                m = json.load(f)
            out.append((f"tp_{method}", f"Torch-Pruning {method}", shaped_like(saved["model"], saved["arch"]),
                        {"metrics_test_acc": m["test_acc"], "test_acc_after_prune": m["test_acc_after_prune"],
                         "ratio": m["ratio"]}))
    return out


def run_measure(args):
    torch.set_num_threads(args.threads)
    cfg = stage2_config(args.result_dir, args.data_dir)
    data, ctx = load_run_data(cfg)
    images = test_images(data, 128)
    params_stage1 = stage_metrics(args.result_dir, "sp")["params"]
    rows, models = {}, measured_models(args.result_dir)
    for key, label, model, extra in models:
        costs = measure_costs(model, data.image_size)
        ev = evaluate(model, data.test, ctx, costs, desc=key)
        rows[key] = {"label": label, "test_acc": ev["acc"], "gflops_per_image": ev["gflops"],
                     "params": count_params(model), "compression": compression(count_params(model), params_stage1),
                     "exec_rate": sum(ev["exec_rate"]) / len(ev["exec_rate"]), **extra}
    for batch in (128, 1):
        for (key, *_), ms in zip(models, latencies_ms([m for _, _, m, _ in models], images, batch, args.repeats)):
            rows[key][f"latency_ms_b{batch}"] = ms
    for r in rows.values():
        print(f"[measure] {r['label']:34s} acc {r['test_acc']:.2f}%  {r['gflops_per_image']:.4f} GFLOPs  "
              f"{r['params']} params  b128 {r['latency_ms_b128']:.1f} ms  b1 {r['latency_ms_b1']:.2f} ms", flush=True)
    out = args.out or os.path.join(args.result_dir, "peer", "measure.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, {"threads": torch.get_num_threads(), "repeats": args.repeats, "torch": torch.__version__,
                     "finetune_budget": {k: cfg["schedule"][0][k] for k in ("epochs", "lr")},
                     "models": rows})
    print(f"[measure] -> {out}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("finetune", "measure"):
        s = sub.add_parser(name)
        s.add_argument("--result_dir", required=True, help="a results root that stages 1-3 filled")
        s.add_argument("--data_dir", default=None, help="default: the one of stage 2's config")
        s.add_argument("--threads", type=int, default=2 if name == "measure" else 1)
        if name == "finetune":
            s.add_argument("--method", choices=METHODS, required=True)
        else:
            s.add_argument("--repeats", type=int, default=20)
            s.add_argument("--out", default=None, help="default: <result_dir>/peer/measure.json")
    args = p.parse_args(argv)
    (run_finetune if args.command == "finetune" else run_measure)(args)


if __name__ == "__main__":
    main()

"""Stage 2 benchmark on a trained network (prints, asserts nothing): does static pruning pay where the model
runs, eagerly as saved and exported?

    python bench/bench_prune.py [--width 2|4] [--repeats 15] [--threads 2] [--set KEY=VALUE ...]
    python bench/bench_prune.py --width 2|4 --candidates score:1,score_per_cost:8,score_per_flop:16 ...

Run it with OpenMP's default wait policy: OMP_WAIT_POLICY=passive (threads sleep between parallel regions)
makes batch-1 eager PyTorch about 1.8x slower, most for the model with the most kernels (measured: the
saved pruned model 0.89x of dense at batch 1 under passive, 1.26x under the default).

Needs the bench dependencies (`pip install -c <(echo torch==2.14.1) -r bench/requirements.txt`). The first
run trains, once, and caches under bench/out/w<width>/ (git-ignored): scikit-learn's digits as 32x32 PNGs,
ResNet-32 at --width 2 or 4 trained as a plain dense network by main_sp.py (`--train_mode open`: the timing
needs trained weights, not switches; 3 epochs, lr 0.02: at 0.1 it diverges in the first epoch), stage 2 by
main_prune.py with the shipped config.json's pruning settings (compression, criterion, round_to, ...; --set
overrides a key, to try another setting) scaled to 1,437 images (SCALE: epochs, bs, fisher_batches, workers,
device, paths), Torch-Pruning (global magnitude) at the same parameter count by bench/peer_torch_pruning.py
with stage 2's fine-tuning, and the exports of the dense and pruned networks by deploy/export.py. Stage 2 and
what follows it run again whenever the resulting config differs from the cached one. Then, in one process,
every model is timed at batch 128 and batch 1, NCHW and channels_last, 2 threads, the models taking turns in
every repeat (median): the dense stage-1 network and the pruned one as saved (PyTorch eager), the
Torch-Pruning network (eager), and the exported dense and pruned networks in onnxruntime (thread spinning
off). All run the static network: every block, no switch (`open` mode). Prints speed-ups over dense eager
(and exported pruned over exported dense), GFLOPs, parameters and test accuracy; writes
bench/out/w<width>/bench_prune.json.

--candidates, to choose criterion and round_to: one factor pass on the stage-1 network, stage 2's plan for
each setting (the config's target), rebuilt without fine-tuning (the speed depends on the shapes only) and
timed eagerly against dense as above; writes bench/out/w<width>/candidates.json.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names
from bench.peer_torch_pruning import shaped_like  # noqa: E402
from evaluation.runner import run_script  # noqa: E402
from models import build_model  # noqa: E402
from pruners import model_flops  # noqa: E402
from runtime.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from utils.data import channel_stats, load_dataset  # noqa: E402
from deploy.export import export, onnx_session  # noqa: E402
from utils.flops import count_params  # noqa: E402
from evaluation.digits import write_digits  # noqa: E402

OUT = os.path.join(ROOT, "bench", "out")
STAGE1 = dict(depth=32, epochs=3, lr=0.02, bs=32, train_mode="open")
# Stage 2's settings are the shipped config's; only these scale keys change (1,437 training images: bs 32 as
# in stage 1, 45 batches = every image in the factor pass)
SCALE = dict(epochs=2, bs=32, fisher_batches=45, num_workers=0, device="cpu", checkpoint=None, resume=False)


def run(argv, log):
    """Run a project script as a user would (2 threads), its output to `log`."""
    print(f"[bench] {' '.join(argv)}  (log: {log})", flush=True)
    with open(log, "w") as f:
        run_script(argv, env={"OMP_NUM_THREADS": "2"}, stdout=f, stderr=subprocess.STDOUT, check=True)


def digits(out=OUT):
    path = os.path.join(out, "digits")
    if not os.path.isdir(os.path.join(path, "test")):
        write_digits(path, size=32)
    return path


def same_json(run_dir, name, value):
    """Whether run_dir/name holds `value` (a cached run is reused only if made with the same settings)."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f) == value


def shipped_config(overrides=None):
    """config.json as shipped, with --set overrides (KEY=VALUE, VALUE as JSON or a bare string)."""
    with open(os.path.join(ROOT, "config.json")) as f:
        config = json.load(f)
    for item in overrides or ():
        key, _, text = item.partition("=")
        try:
            config[key] = json.loads(text)
        except ValueError:
            config[key] = text
    return config


def stage2_config(run_dir, data, stage2):
    return {**stage2, **SCALE, "result_dir": run_dir, "data_dir": data}


def prepare_stage1(run_dir, data, width, stage1=STAGE1, seed=0):
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.isfile(os.path.join(run_dir, "sp", "metrics.json")):
        run(["main_sp.py", "--depth", str(stage1["depth"]), "--width", str(width), "--epochs",
             str(stage1["epochs"]), "--lr", str(stage1["lr"]), "--bs", str(stage1["bs"]), "--train_mode",
             stage1["train_mode"], "--resize", "32", "--num_workers", "0", "--device", "cpu", "--seed", str(seed),
             "--data_dir", data, "--result_dir", run_dir], os.path.join(run_dir, "sp.log"))


def prepare(run_dir, data, width, stage2, stage1=STAGE1, seed=0, peer="global_magnitude"):
    """Stage 1, stage 2 (the config `stage2` with SCALE) and the Torch-Pruning peer of one run, each only if
    its result is missing (stage 2 also if it was made with another config; then the peer and the pruned
    export go too)."""
    prepare_stage1(run_dir, data, width, stage1, seed)
    config = stage2_config(run_dir, data, stage2)
    cached = os.path.isfile(os.path.join(run_dir, "prune", "metrics.json")) and same_json(run_dir, "prune.json", config)
    if not cached:
        for stale in ("prune", "peer", os.path.join("export", "prune")):  # made from another stage 2
            shutil.rmtree(os.path.join(run_dir, stale), ignore_errors=True)
        with open(os.path.join(run_dir, "prune.json"), "w") as f:
            json.dump(config, f, indent=1)
        run(["main_prune.py", "--config_path", os.path.join(run_dir, "prune.json")], os.path.join(run_dir, "prune.log"))
    if peer and not os.path.isfile(os.path.join(run_dir, "peer", peer, "metrics.json")):
        run(["bench/peer_torch_pruning.py", "finetune", "--result_dir", run_dir, "--method", peer, "--threads", "2"],
            os.path.join(run_dir, f"peer_{peer}.log"))


def exported(run_dir, stage, mean, std):
    """deploy/export.py on the run's stage checkpoint (open mode), once; the ONNX path."""
    out = os.path.join(run_dir, "export", stage)
    if not os.path.isfile(os.path.join(out, "export.json")):
        ckpt = load_checkpoint(os.path.join(run_dir, stage, "checkpoint.pt"))
        given = {} if ckpt.get("pipeline") else {"mean": mean, "std": std, "resize": 32}
        export(os.path.join(run_dir, stage, "checkpoint.pt"), out, mode="open", **given)
    return os.path.join(out, "model.onnx")


class Eager:
    """A model of this project in `open` mode on normalised float images."""

    def __init__(self, model, memory_format):
        self.model = model.eval().to(memory_format=memory_format)
        self.memory_format = memory_format

    def __call__(self, x_float, x_uint8):
        with torch.inference_mode():
            return self.model(x_float, "open")[0]


class Onnx:
    """An exported model in onnxruntime on raw uint8 NHWC images."""

    def __init__(self, path, threads):
        self.session = onnx_session(path, threads)

    def __call__(self, x_float, x_uint8):
        return self.session.run(None, {"images": x_uint8})


def median_times(models, inputs, repeats):
    """Median seconds per call of each model over `inputs` (a list of (float, uint8) batches), the models
    taking turns within every repeat."""
    for m in models.values():
        for xf, xu in inputs:
            m(xf, xu)  # warm-up (oneDNN primitives, allocator, onnxruntime's first run)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            for xf, xu in inputs:
                m(xf, xu)
            times[name].append((time.perf_counter() - t0) / len(inputs))
    return {name: statistics.median(t) for name, t in times.items()}


def peer_model(state, arch):
    """The Torch-Pruning network from its weights. shaped_like rebuilds every nn.Linear as a plain one; a
    module of the stage-1 architecture that subclasses it (the switches' head) gets its class back."""
    model, reference = shaped_like(state, arch), dict(build_model(arch).named_modules())
    for name, module in model.named_modules():
        kind = type(reference.get(name))
        if kind is not type(module) and issubclass(kind, type(module)):
            module.__class__ = kind
    return model


def test_batch(ds, mean, std):
    """The first 128 test images: uint8 NHWC (onnxruntime) and normalised float NCHW (eager)."""
    test_u8 = ds.test_x[:128].permute(0, 2, 3, 1).contiguous()
    test_f = (test_u8.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / \
        torch.tensor(std).view(1, 3, 1, 1)
    return test_f, test_u8


def timings(nets, onnx, test_f, test_u8, repeats, threads):
    """{model: {"b128 NCHW": seconds, ...}}: the eager `nets` at batch 128 and 1 (16 images one at a time),
    NCHW and channels_last, and the `onnx` models ({name: path}) once per batch, all taking turns."""
    rows = {}
    for batch in (128, 1):
        for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xf = test_f.contiguous(memory_format=fmt)
            inputs = [(xf, test_u8.numpy())] if batch > 1 else \
                [(xf[i:i + 1], test_u8[i:i + 1].numpy()) for i in range(16)]
            models = {name: Eager(m, fmt) for name, m in nets.items()}
            if fmt_name == "NCHW":  # onnxruntime chooses its own layouts: timed once per batch size
                models.update({name: Onnx(path, threads) for name, path in onnx.items()})
            t = median_times(models, inputs, repeats if batch > 1 else 3 * repeats)
            for name, seconds in t.items():
                rows.setdefault(name, {})[f"b{batch} {fmt_name if name not in onnx else 'ort'}"] = seconds
    return rows


def candidates(args, data, specs):
    """Stage 2's plan for each "criterion:round_to" of `specs` (the shipped config's target and limits)
    from one factor pass on the stage-1 network, rebuilt without fine-tuning (the speed depends on the
    shapes only) and timed eagerly against dense in one process; writes <run_dir>/candidates.json."""

    from pruners import TOLERANCE, collect_factors, decompose, evenly_spaced, rebuild, top_directions
    from pruners.config import validate
    from pruners.threshold import plan_for_flops, plan_for_params
    from utils.dist import setup
    from runtime.evaluate import evaluate
    from utils.flops import measure_costs
    from utils.data import DataSettings, load_data

    cfg = validate(stage2_config(args.run_dir, data, shipped_config(args.overrides)))
    target = cfg["schedule"][0]
    if target["target"] not in ("compression", "gflops"):
        raise SystemExit("--candidates needs a one-pass compression or gflops target in the config")
    ctx = setup("cpu", cfg["seed"], "off", False)
    stage1 = load_checkpoint(os.path.join(args.run_dir, "sp", "checkpoint.pt"))
    loaders = load_data(DataSettings.of(cfg), ctx, recorded=stage1["pipeline"], source="stage 1")
    dense = model_from_checkpoint(stage1)
    params, flops = count_params(dense), model_flops(dense, 32)
    torch.manual_seed(cfg["seed"] * 1_000_003)  # as main_prune.py's first round
    t0 = time.perf_counter()
    factors = collect_factors(dense, evenly_spaced(loaders.plain_train, cfg["fisher_batches"]), cfg["fisher_type"],
                              min(cfg["fisher_batches"], len(loaders.plain_train)), False, cfg["mode"])
    layers = decompose(dense, factors, cfg["damping"])
    print(f"factor pass and eigendecompositions {time.perf_counter() - t0:.0f} s", flush=True)
    by_name = {layer.name: layer for layer in layers}
    nets, info = {"dense": dense}, {}
    for spec in specs:
        criterion, round_to = spec.split(":")
        if target["target"] == "compression":
            plan = plan_for_params(layers, (1 - target["value"]) * params, cfg["prune_ratio_limit"], params,
                                   TOLERANCE * params, flops, criterion, int(round_to))
        else:
            plan = plan_for_flops(layers, target["value"] * 1e9, cfg["prune_ratio_limit"], params, flops,
                                  TOLERANCE * target["value"] * 1e9, criterion, int(round_to))
        nets[spec] = rebuild(dense, layers, {n: top_directions(by_name[n], *r) for n, r in plan.ranks.items()})
    for name, model in nets.items():
        acc = evaluate(model.eval(), loaders.test, ctx, measure_costs(model, 32), mode="open", desc="test")["acc"]
        info[name] = {"gflops": model_flops(model, 32) / 1e9, "params": count_params(model),
                      "convs": sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
                      "test_acc_before_finetune": acc, "ranks": model.arch.get("ranks", {})}
    torch.set_num_threads(args.threads)
    ds = load_dataset(data, "png", 32)
    test_f, test_u8 = test_batch(ds, *(t.tolist() for t in channel_stats(ds.train_x)))
    rows = timings(nets, {}, test_f, test_u8, args.repeats, args.threads)
    keys = list(rows["dense"])
    print(f"\nwidth {args.width}, {target['target']} {target['value']}, not fine-tuned; speed-up over dense eager, "
          f"{args.repeats} repeats (batch 1: {3 * args.repeats})")
    print(f"  {'criterion:round_to':22s} GFLOPs  params  convs  acc    " + "  ".join(f"{k:>16s}" for k in keys))
    for name, i in info.items():
        print(f"  {name:22s} {i['gflops']:.3f} {i['params'] / 1e6:6.3f}M {i['convs']:4d} "
              f"{i['test_acc_before_finetune']:6.2f}% " +
              "  ".join(f"{rows['dense'][k] / rows[name][k]:16.2f}" for k in keys))
    with open(os.path.join(args.run_dir, "candidates.json"), "w") as f:
        json.dump({"info": info, "seconds": rows, "repeats": args.repeats, "threads": args.threads}, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=4, choices=(2, 4), help="ResNet-32's width multiplier")
    p.add_argument("--run_dir", default=None, help="default bench/out/w<width>")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prepare_only", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a key of the shipped config.json for stage 2 (e.g. --set criterion=score)")
    p.add_argument("--candidates", default=None, metavar="CRITERION:ROUND_TO,...",
                   help="instead of the benchmark: time stage 2's pruned network for each of these settings "
                        "(not fine-tuned) against dense, e.g. score:1,score_per_flop:8")
    args = p.parse_args()
    args.run_dir = args.run_dir or os.path.join(OUT, f"w{args.width}")
    data = digits()
    if args.candidates:
        prepare_stage1(args.run_dir, data, args.width)
        return candidates(args, data, args.candidates.split(","))
    prepare(args.run_dir, data, args.width, shipped_config(args.overrides))
    if args.prepare_only:
        return
    torch.set_num_threads(args.threads)
    ds = load_dataset(data, "png", 32)
    mean, std = (t.tolist() for t in channel_stats(ds.train_x))
    onnx_paths = {stage: exported(args.run_dir, stage, mean, std) for stage in ("sp", "prune")}

    nets = {"dense": model_from_checkpoint(load_checkpoint(os.path.join(args.run_dir, "sp", "checkpoint.pt"))),
            "pruned": model_from_checkpoint(load_checkpoint(os.path.join(args.run_dir, "prune", "checkpoint.pt")))}
    peer = torch.load(os.path.join(args.run_dir, "peer", "global_magnitude", "weights.pt"), weights_only=True)
    nets["torch-pruning"] = peer_model(peer["model"], peer["arch"])
    metrics = {"dense": "sp/metrics.json", "pruned": "prune/metrics.json",
               "torch-pruning": "peer/global_magnitude/metrics.json"}
    info = {}
    for name, model in nets.items():
        with open(os.path.join(args.run_dir, metrics[name])) as f:
            m = json.load(f)
        info[name] = {"gflops": model_flops(model, 32) / 1e9, "params": count_params(model), "test_acc": m["test_acc"]}
    info["dense exported"] = dict(info["dense"])
    info["pruned exported"] = dict(info["pruned"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {args.repeats} repeats; width {args.width}; every model "
          f"in open mode")
    for name, i in info.items():
        print(f"  {name:16s} {i['gflops']:.3f} GFLOPs  {i['params'] / 1e6:.3f} M params  test acc {i['test_acc']:.2f}%")
    with open(os.path.join(args.run_dir, "prune", "metrics.json")) as f:
        r = json.load(f)["rounds"][0]
    print(f"stage 2's own costs: factor pass {r['factor_seconds']:.1f} s, eigendecompositions "
          f"{r['eigen_seconds']:.2f} s, rebuild {r['rebuild_seconds']:.2f} s (criterion {r['criterion']}, "
          f"round_to {r['round_to']})")
    flops_ratio = info["dense"]["gflops"] / info["pruned"]["gflops"]
    print(f"FLOPs ratio dense / pruned {flops_ratio:.2f}x")

    test_f, test_u8 = test_batch(ds, mean, std)
    rows = timings(nets, {f"{k} exported": onnx_paths[s] for k, s in (("dense", "sp"), ("pruned", "prune"))},
                   test_f, test_u8, args.repeats, args.threads)
    results = {"width": args.width, "criterion": r["criterion"], "round_to": r["round_to"], "info": info,
               "flops_ratio": flops_ratio, "seconds": rows, "threads": args.threads, "repeats": args.repeats}
    dense = rows["dense"]
    print("\nspeed-up over dense eager (same batch and memory format); ms per batch in brackets")
    for name, r in rows.items():
        cells = []
        for key, seconds in r.items():
            base = dense[key] if key in dense else dense[key.replace("ort", "NCHW")]
            cells.append(f"{key}: {base / seconds:.2f}x ({1e3 * seconds:.2f} ms)")
        print(f"  {name:16s} " + "  ".join(cells))
    for batch, goal in ((128, 0.9), (1, 0.6)):
        s = rows["dense exported"][f"b{batch} ort"] / rows["pruned exported"][f"b{batch} ort"]
        results[f"exported_speedup_b{batch}"] = s
        print(f"exported pruned vs exported dense, batch {batch}: {s:.2f}x = {s / flops_ratio:.2f} of the FLOPs "
              f"ratio (goal >= {goal})")
    with open(os.path.join(args.run_dir, "bench_prune.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

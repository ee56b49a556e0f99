"""What stage 3's controllers cost per training step, against a plain dense step: wall time and peak memory.

    python bench/bench_controller.py                       # ResNet-32 width 4, bs 128 and 256, 2 threads
    python bench/bench_controller.py --bs 256 --repeats 3 --flip_blocks 2 4

Steps (forward + backward + SGD step, bf16 off, NCHW: the CPU's defaults), each on its own copy of the same
randomly initialised network (100 classes, 32x32 inputs, rnn switches; masked execution costs the same
whatever the decisions):
  dense           runtime.steps.dense_step: every block, no switch (plain dense training)
  reinforce       gates.policy.ReinforceStep: sampled routes, REINFORCE (SkipNet's)
  counterfactual  gates.counterfactual.CounterfactualStep, full form: every gated block flipped per step
  cf_K            the same with K gated blocks flipped per step (--flip_blocks)

Time: after a warm-up step each, the steps take turns, one step each per repeat (interleaved, so that
the load of a shared machine falls on all of them alike); the median of each, and the median over
repeats of each repeat's ratio to reinforce and to dense. Memory: each step in a fresh process (one step):
the peak resident set (VmHWM, reset before the step) above the resident set just before the first step
(the network, its batch and the interpreter), i.e. activations, gradients, optimizer state and the
counterfactual's stacked pass; and on CUDA torch.cuda.max_memory_allocated. Prints a table and writes
--out (JSON).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names

import torch  # noqa: E402

from gates.counterfactual import CounterfactualStep  # noqa: E402
from gates.optim import make_optimizer  # noqa: E402
from gates.policy import Baseline, ReinforceStep  # noqa: E402
from gates.price import SkipPrice  # noqa: E402
from models import build_model, make_arch  # noqa: E402
from runtime.steps import dense_step  # noqa: E402
from utils.flops import measure_costs  # noqa: E402


def step_names(flip_blocks):
    return ["dense", "reinforce", "counterfactual"] + [f"cf_{k}" for k in flip_blocks]


def build(name, args, bs):
    """(step(), model) for one step kind: its own network (same initialisation), optimizer and batch."""
    torch.manual_seed(0)
    model = build_model(make_arch(depth=args.depth, width=args.width, num_classes=100, gate="rnn"))
    model = model.to(args.device).train()
    costs = measure_costs(model, 32)
    flags = types.SimpleNamespace(lr=0.01, momentum=0.9, weight_decay=5e-4, switch_lr=None, switch_weight_decay=None)
    optimizer = make_optimizer(model, flags)
    price = SkipPrice(0.1, None, 0.05, args.device)
    if name == "dense":
        step_fn = dense_step
    elif name == "reinforce":
        step_fn = ReinforceStep(costs, price, 1.0, 0.1, Baseline("moving", model.num_switches, 0.9, args.device))
    else:
        blocks = None if name == "counterfactual" else int(name.split("_")[1])
        step_fn = CounterfactualStep(costs, price, 0.05, 0.1, blocks=blocks)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(bs, 3, 32, 32, generator=g).to(args.device)
    y = torch.randint(0, 100, (bs,), generator=g).to(args.device)

    def step():
        loss, _ = step_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    return step


def rss_gib():
    """This process's resident set now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def reset_peak_rss():
    """Linux keeps a process's peak resident set across exec (ru_maxrss of a child forked from a large
    parent starts at the parent's): reset it, so that the peak is this step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_gib():
    """The peak resident set since reset_peak_rss (VmHWM)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def memory(args):
    """In a fresh process: peak memory of one step of a kind above the resident set before it (the
    optimizer's momentum buffers, made by that step, included)."""
    step = build(args._memory, args, args._bs)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before_cuda = torch.cuda.memory_allocated()
    before = rss_gib()
    reset_peak_rss()
    step()
    peak = peak_rss_gib()
    out = {"peak_rss_gib": round(peak, 3), "rss_before_gib": round(before, 3),
           "step_peak_gib": round(peak - before, 3)}
    if args.device.startswith("cuda"):
        out["cuda_step_peak_gib"] = round((torch.cuda.max_memory_allocated() - before_cuda) / 2**30, 3)
    print(json.dumps(out))


def timings(args, bs):
    names = step_names(args.flip_blocks)
    steps = {}
    for name in names:
        steps[name] = build(name, args, bs)
        steps[name]()  # warm-up: momentum buffers, oneDNN's primitive caches, lazy initialisation
    seconds = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            seconds[name].append(time.perf_counter() - t0)
        print(f"  bs {bs} repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names), flush=True)
    out = {}
    for name in names:
        out[name] = {"seconds": statistics.median(seconds[name]), "all_seconds": [round(t, 3) for t in seconds[name]]}
        for ref in ("reinforce", "dense"):
            out[name][f"vs_{ref}"] = statistics.median(a / b for a, b in zip(seconds[name], seconds[ref]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--bs", type=int, nargs="+", default=[128, 256])
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed steps of each kind")
    p.add_argument("--flip_blocks", type=int, nargs="*", default=[4], help="K of the cf_K rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_memory", action="store_true", help="skip the memory processes")
    p.add_argument("--out", default=os.path.join("bench", "results", "controller_cost.json"))
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    p.add_argument("--_bs", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._memory:
        return memory(args)
    result = {"argv": sys.argv[1:], "torch": torch.__version__, "threads": args.threads, "device": args.device,
              "load_average_at_start": os.getloadavg()[0], "net": f"ResNet-{args.depth} width {args.width}",
              "time": {}, "memory": {}}
    for bs in args.bs:
        result["time"][bs] = timings(args, bs)
    if not args.no_memory:
        for bs in args.bs:
            result["memory"][bs] = {}
            for name in step_names(args.flip_blocks):
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--depth", str(args.depth), "--width",
                                       str(args.width), "--threads", str(args.threads), "--device", args.device,
                                       "--_memory", name, "--_bs", str(bs)],
                                      capture_output=True, text=True, check=True)
                result["memory"][bs][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_average_at_end"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{result['net']}, {args.device}, {args.threads} threads: median of {args.repeats} interleaved steps")
    print(f"{'bs':>4} {'step':<15} {'s/step':>8} {'x reinforce':>12} {'x dense':>8} {'step peak GiB':>14}")
    for bs in args.bs:
        for name, t in result["time"][bs].items():
            mem = result["memory"].get(bs, {}).get(name, {}).get("step_peak_gib", float("nan"))
            print(f"{bs:>4} {name:<15} {t['seconds']:>8.2f} {t['vs_reinforce']:>12.2f} {t['vs_dense']:>8.2f} "
                  f"{mem:>14.2f}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

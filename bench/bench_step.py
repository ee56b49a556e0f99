"""ATen ops one training step dispatches (forward + backward + SGD step): the host's share of a GPU step.

A CIFAR step of a narrow ResNet runs thousands of tiny kernels; when the host spends longer launching them
than the GPU running them, the step is bound by the op count, not the FLOPs. Counted, per step (after two
warm-up steps, so SGD's momentum buffers exist), for
  dense   supervised_step in mode "open" (every block, no switch): the plain dense loop
  hard    supervised_step in mode "hard" (stage 1's SkipNet phase; stage 2's fine-tuning)
  joint   stages.sp.joint_step: CE(open) + CE(hard), stage 1's default
  rl      gates.policy.ReinforceStep (stage 3: sampled routes, REINFORCE)
with RNN switches, eager and (--compile) through models.resnet.compile_step. Two counts:
  top      top-level ATen ops in torch.profiler (an op's own sub-ops not counted: what Python dispatched)
  all      every op reaching the dispatcher below autograd (TorchDispatchMode): composite ops decomposed,
           closer to the kernels launched; eager only (compiled code runs outside that mode)
SGD runs with foreach=True, as it does by default on CUDA (on CPU it loops over the parameters).
On the CPU the counts are those of the CPU kernels: on CUDA nn.LSTMCell-style fused kernels or cuDNN
variants can differ by a few ops; the compiled counts on CUDA with CUDA graphs are a graph launch or two.

    python bench/bench_step.py                     # ResNet-32 width 1, eager
    python bench/bench_step.py --compile           # also compiled (inductor: minutes on 2 cores)
    python bench/bench_step.py --compile --backend aot_eager
"""
import argparse
import collections
import functools
import os
import sys
import types

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # before torch: the profiler logs every start and stop below it
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names

from stages import sp as main_sp  # noqa: E402
from gates.optim import make_optimizer  # noqa: E402
from gates.policy import Baseline, ReinforceStep  # noqa: E402
from models import build_model, make_arch  # noqa: E402
from models.resnet import compile_step  # noqa: E402
from runtime.steps import supervised_step  # noqa: E402
from utils.flops import measure_costs  # noqa: E402

STEPS = ("dense", "hard", "joint", "rl")


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def top_level_ops(fn):
    """Counter of the ATen ops fn dispatches that no other ATen op dispatched (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            ops[event.name] += 1
    return ops


def make_step(name, model, costs):
    if name == "dense":
        return functools.partial(supervised_step, mode="open")
    if name == "hard":
        return supervised_step
    if name == "joint":
        return main_sp.joint_step
    return ReinforceStep(costs, 0.1, gamma=1.0, rl_weight=0.1, baseline=Baseline("moving", model.num_switches))


def setup(name, args, compiled):
    torch.manual_seed(0)
    model = build_model(make_arch(depth=args.depth, width=args.width, num_classes=10, gate="rnn")).to(args.device)
    model.train()
    costs = measure_costs(model, 32)
    flags = types.SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=5e-4, switch_lr=None, switch_weight_decay=None)
    optimizer = make_optimizer(model, flags)
    for group in optimizer.param_groups:
        group["foreach"] = True  # CUDA's default
    step_fn = make_step(name, model, costs)
    if compiled:
        step_fn = compile_step(step_fn, args.device, backend=args.backend)
    x = torch.randn(args.bs, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.bs,), device=args.device)

    def step():
        loss, _ = step_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up: momentum buffers, compilation
        step()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--bs", type=int, default=8, help="the count does not depend on it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--compile", action="store_true", help="also count the compiled steps")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled count")
    p.add_argument("--top", type=int, default=0, help="print the N most frequent ops of each step")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    rows = []
    for name in args.steps:
        step = setup(name, args, compiled=False)
        top = top_level_ops(step)
        with CountOps() as every:
            step()
        row = {"step": name, "top": sum(top.values()), "all": sum(every.ops.values())}
        if args.compile:
            step = setup(name, args, compiled=True)
            row["compiled"] = sum(top_level_ops(step).values())
        rows.append(row)
        if args.top:
            print(f"{name}: {', '.join(f'{k} {v}' for k, v in top.most_common(args.top))}")
    dense = next((r for r in rows if r["step"] == "dense"), None)
    print(f"ResNet-{args.depth} width {args.width}, rnn switches, {args.device}: ATen ops per training step")
    head = f"{'step':<6} {'top':>6} {'all':>6}" + (" x dense" if dense else "") + \
        (f" {'compiled (' + args.backend + ')':>22}" if args.compile else "")
    print(head)
    for r in rows:
        line = f"{r['step']:<6} {r['top']:>6} {r['all']:>6}"
        if dense:
            line += f" {r['top'] / dense['top']:>7.2f}"
        if args.compile:
            line += f" {r['compiled']:>22}"
        print(line)


if __name__ == "__main__":
    main()

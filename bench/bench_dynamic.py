"""Does dynamic pruning save wall-clock time, not only FLOPs on paper? CPU inference, batch 128.

Three runs of the same statically pruned ResNet-32 (every 3x3 conv of the blocks factored to half its
directions, about 60% of the parameters removed, as stage 2 leaves it):
  static only        every switch executes its block (the row "static pruning only")
  static + dynamic   the switches skip a given fraction of the images at every gated block, and skipped
                     images are not computed (the block runs on the sub-batch that executes it)
  masked             the same decisions, but every image computes every block and the output is mixed
                     with the 0/1 mask: the reference SkipNet code's way, which saves nothing
The switches are the real ones (random weights, so that their decisions differ between images), shifted
per switch so that each skips the wanted fraction of the batch; timing does not depend on the weights.
The three run in turn, in a rotating order, round after round; the savings are computed within each
round and their median is reported, so that the load of other processes on the machine, which changes
over seconds, cancels out.

    python bench/bench_dynamic.py [--width 4] [--skip_rate 0.3] [--reps 5]

Pass: the wall-clock saving of static + dynamic over static only is at least 70% of its FLOPs saving.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names
from models import build_model, make_arch  # noqa: E402
from runtime.predict import image_flops  # noqa: E402
from utils.flops import count_params, measure_costs  # noqa: E402

MUST_KEEP = 0.7  # wall-clock saving / FLOPs saving


class ShiftedSwitches(nn.Module):
    """The model's switches with a per-switch shift of the logit: p' = sigmoid(logit(p) - shift[j])."""

    def __init__(self, inner, num_switches):
        super().__init__()
        self.inner = inner
        self.register_buffer("shift", torch.full((num_switches,), -1e4))  # -1e4: always execute
        self.calibrate_to = None  # a skip rate: set each switch's shift from the batch passing through

    def forward(self, j, x, state):
        p, state = self.inner(j, x, state)
        z = torch.logit(p.double(), eps=1e-12)
        if self.calibrate_to is not None:
            # switch j sees the routes that the switches before it (already shifted) took
            self.shift[j] = torch.quantile(z, self.calibrate_to)
        return torch.sigmoid(z - self.shift[j]).to(p.dtype), state


def pruned_model(depth, width, keep):
    """ResNet-`depth` whose block convs keep `keep` of their input and output directions."""
    dense = build_model(make_arch(depth=depth, width=width, num_classes=100))
    ranks = {name: [max(1, round(keep * m.in_channels)), max(1, round(keep * m.out_channels))]
             for name, m in dense.named_modules()
             if isinstance(m, nn.Conv2d) and name.startswith("blocks.") and m.kernel_size == (3, 3)}
    model = build_model(make_arch(depth=depth, width=width, num_classes=100, ranks=ranks))
    return model, count_params(model) / count_params(dense)


@torch.no_grad()
def calibrate(model, x, skip_rate):
    """Random head weights for the switches (decisions that differ per image; the rest keeps its default
    initialisation, which does not saturate the LSTM), then in one pass, switch by switch in network
    order, the shift that makes each skip `skip_rate` of the batch. Returns the shifted switches."""
    nn.init.normal_(model.switches.head.weight, generator=torch.Generator().manual_seed(0))
    shifted = ShiftedSwitches(model.switches, model.num_switches)
    model.switches, shifted.calibrate_to = shifted, skip_rate
    model(x, "hard")
    shifted.calibrate_to = None
    return shifted


@torch.no_grad()
def run(model, x, execution):
    model.execution = execution
    return model(x, "hard")[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=4, help="4: the headline network (64/128/256 channels)")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of directions each block conv keeps")
    p.add_argument("--skip_rate", type=float, default=0.3, help="fraction of images each switch skips")
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, kept = pruned_model(args.depth, args.width, args.keep)
    model.eval()
    x = torch.randn(args.bs, 3, 32, 32)
    costs = measure_costs(model, 32)
    static = ShiftedSwitches(model.switches, model.num_switches)  # shift -1e4: every block executes
    dynamic = calibrate(model, x, args.skip_rate)

    runs = {"static only": (static, "skip"), "static + dynamic": (dynamic, "skip"), "masked": (dynamic, "mask")}
    names = list(runs)
    times = {name: [] for name in runs}
    flops, routes = {}, {}
    for rep in range(args.reps + 1):  # the first round warms up and is dropped
        for name in names[rep % 3:] + names[:rep % 3]:
            switches, execution = runs[name]
            model.switches = switches
            t0 = time.perf_counter()
            actions = run(model, x, execution)
            if rep:
                times[name].append(time.perf_counter() - t0)
            flops[name], routes[name] = image_flops(costs, actions).mean().item(), actions
    flops["masked"] = flops["static only"]  # it computes every block of every image
    saved = {name: statistics.median(1 - a / b for a, b in zip(times[name], times["static only"]))
             for name in runs}
    t = {name: statistics.median(v) for name, v in times.items()}

    base_f = flops["static only"]
    print(f"ResNet-{args.depth} width {args.width}, block convs at {args.keep:.0%} of their directions "
          f"({1 - kept:.0%} of the parameters removed), batch {args.bs}, CPU {args.threads} threads, "
          f"median of {args.reps} rounds")
    print(f"switches execute {routes['static + dynamic'].mean().item():.1%} of the (image, block) pairs\n")
    print(f"{'':18} {'GFLOPs/image':>12} {'ms/batch':>9} {'FLOPs saved':>11} {'time saved':>10}")
    for name in runs:
        print(f"{name:18} {flops[name] / 1e9:12.4f} {1e3 * t[name]:9.1f} {1 - flops[name] / base_f:11.1%} "
              f"{saved[name]:10.1%}")
    flops_saved = 1 - flops["static + dynamic"] / base_f
    time_saved = saved["static + dynamic"]
    ratio = time_saved / flops_saved
    print(f"\nstatic + dynamic: time saved / FLOPs saved = {ratio:.2f} (must be >= {MUST_KEEP}); "
          f"masked execution: time saved {saved['masked']:.1%}")
    print("PASS" if ratio >= MUST_KEEP else "FAIL")
    sys.exit(0 if ratio >= MUST_KEEP else 1)


if __name__ == "__main__":
    main()

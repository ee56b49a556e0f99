"""Stage-1 benchmarks (CPU by default): what the switches cost in training, and what skip execution
saves at inference against masked execution (SkipNet's way: every block computed, output masked).

    python bench/bench_sp.py                 # ResNet-32, k=4, batch 128
    python bench/bench_sp.py --width 1       # quicker
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as python bench/<script>.py: bench.* and the packages by their full names
from bench.common import force_routes, timeit  # noqa: E402
from models import build_model, make_arch  # noqa: E402
from runtime.predict import image_flops  # noqa: E402
from utils.flops import dense_flops, measure_costs  # noqa: E402


def train_throughput(model, x, y, mode, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step():
        logits, _, _ = model(x, mode)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return x.shape[0] / timeit(step, repeats=steps, warmup=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--bs", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(make_arch(depth=args.depth, width=args.width, num_classes=args.classes)).to(device)
    x = torch.randn(args.bs, 3, 32, 32, device=device)
    y = torch.randint(0, args.classes, (args.bs,), device=device)
    print(f"ResNet-{args.depth} k={args.width}, batch {args.bs}, {args.device}, {torch.get_num_threads()} threads")

    dense = train_throughput(model, x, y, "open", args.steps)
    gated = train_throughput(model, x, y, "hard", args.steps)
    print(f"training  without switches {dense:8.1f} img/s | with rnn switches {gated:8.1f} img/s | "
          f"switch overhead {100 * (dense / gated - 1):.1f}%")

    model.eval()
    force_routes(model, keep_fraction=0.5)
    costs = measure_costs(model)
    with torch.no_grad():
        _, actions, _ = model(x)
        routed = image_flops(costs, actions).mean().item()
        masked_flops = dense_flops(costs) + costs["switches"]
        times = {}
        for execution in ("mask", "skip"):
            model.execution = execution
            times[execution] = timeit(lambda: model(x), repeats=args.steps)
    flops_saved = 1 - routed / masked_flops
    time_saved = 1 - times["skip"] / times["mask"]
    print(f"inference masked {1e3 * times['mask']:.1f} ms | skipping {1e3 * times['skip']:.1f} ms "
          f"(exec rate {actions.mean():.2f}) | FLOPs saved {100 * flops_saved:.1f}% | time saved "
          f"{100 * time_saved:.1f}% | time/FLOPs saving ratio {time_saved / flops_saved:.2f}")


if __name__ == "__main__":
    main()

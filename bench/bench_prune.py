"""Stage 2 benchmark (prints, asserts nothing): does pruning in the eigenbasis buy wall-clock time on the CPU,
and what does the pruning step itself cost?

    OMP_WAIT_POLICY=passive python bench/bench_prune.py [--compression 0.6] [--batches 4] [--repeats 7]

1. Inference, eval mode, batch 128 and batch 1: the k=4 ResNet-32 (100 classes) dense vs pruned to the
   target compression: wall-clock speed-up against the FLOPs ratio, measured in the same run (interleaved,
   median of repeats). Random-init weights and factors from random images: the timing depends only on
   the ranks.
2. The pruning step: factor pass (as a multiple of the same number of plain training steps), the
   eigendecompositions, and the rebuild.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import build_model, make_arch  # noqa: E402
from pruners import prune  # noqa: E402
from utils.engine import supervised_step  # noqa: E402
from utils.flops import count_params, dense_flops, measure_costs  # noqa: E402


def inference_times(models, batch, repeats, memory_format):
    """Median seconds per forward of each model, interleaved so that load changes hit all alike."""
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=memory_format)
    models = {name: model.to(memory_format=memory_format) for name, model in models.items()}
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(x)  # warm-up (allocator, oneDNN primitive caches)
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def training_step_seconds(model, batches):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def steps():
        for x, y in batches:
            loss, _ = supervised_step(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    steps()  # warm-up
    t0 = time.perf_counter()
    steps()
    model.eval()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compression", type=float, default=0.6)
    p.add_argument("--batches", type=int, default=4, help="factor-pass batches of 128 random images")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = build_model(make_arch(depth=32, width=4, num_classes=100)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 100, (128,), generator=g))
               for _ in range(args.batches)]
    # a first call pays one-off costs (oneDNN primitives, LAPACK start-up) that the timed one should not
    prune(dense, batches[:1], target="compression", value=args.compression, params_reference=count_params(dense),
          progress=False)
    pruned, report = prune(dense, batches, target="compression", value=args.compression,
                           params_reference=count_params(dense), progress=False)
    pruned.eval()
    train_seconds = training_step_seconds(build_model(dense.arch), batches)

    flops = {name: dense_flops(measure_costs(m)) for name, m in (("dense", dense), ("pruned", pruned))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"ResNet-32 k=4, 100 classes: dense {count_params(dense) / 1e6:.3f} M params {flops['dense'] / 1e9:.3f} "
          f"GFLOPs; pruned {count_params(pruned) / 1e6:.3f} M params {flops['pruned'] / 1e9:.3f} GFLOPs "
          f"(compression {report['compression']:.3f}, {len(pruned.arch['ranks'])} convs factored)")
    ratio = flops["dense"] / flops["pruned"]
    print(f"FLOPs ratio {ratio:.2f}x; 'realised' = share of the ideal time saving (1 - 1/speed-up) / (1 - 1/ratio)")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for batch in (128, 1):
            t = inference_times({"dense": dense, "pruned": pruned}, batch,
                                args.repeats if batch > 1 else 10 * args.repeats, memory_format)
            speedup = t["dense"] / t["pruned"]
            print(f"{str(memory_format).split('.')[-1]:17s} batch {batch:3d}: dense {1e3 * t['dense']:8.2f} ms  "
                  f"pruned {1e3 * t['pruned']:8.2f} ms  speed-up {speedup:.2f}x = {speedup / ratio:.0%} of the "
                  f"FLOPs ratio (target 60%), realised {(1 - 1 / speedup) / (1 - 1 / ratio):.0%}")
    print(f"factor pass: {report['factor_seconds']:.2f} s for {args.batches} batches of 128 = "
          f"{report['factor_seconds'] / train_seconds:.2f} x the same number of training steps "
          f"({train_seconds:.2f} s)")
    print(f"eigendecompositions: {report['eigen_seconds']:.3f} s; rebuild: {report['rebuild_seconds']:.3f} s")


if __name__ == "__main__":
    main()

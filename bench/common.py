"""Timing helpers for the benchmarks (wall clock, median of repeats, after warm-up)."""
import statistics
import time

import torch


def timeit(fn, repeats=5, warmup=2):
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def force_routes(model, keep_fraction, seed=0):
    """Make every switch execute its block for a fixed random `keep_fraction` of the images of a batch
    (a forward hook on the real switch output), to time execution at a known skip rate."""
    g = torch.Generator().manual_seed(seed)

    def hook(module, inputs, output):
        p, state = output
        keep = (torch.rand(p.shape[0], generator=g) < keep_fraction).to(p.device, p.dtype)
        return keep * 0.98 + 0.01, state

    return model.switches.register_forward_hook(hook)

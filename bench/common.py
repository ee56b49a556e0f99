"""Shared by the benchmarks, the evaluation and the tests: running a script as a user runs it, timing
(wall clock, median of repeats, after warm-up), routes forced at a known skip rate."""
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(argv, env=None, **kwargs):
    """`python *argv` from the repository root (a script's path, or -m and a module), `env` added to this
    process's environment; the other keyword arguments are subprocess.run's. Returns the CompletedProcess."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env={**os.environ, **(env or {})}, **kwargs)


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

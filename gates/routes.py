"""The calibration of the switches' threshold to a FLOPs target (stage 3's --target_gflops)."""
import torch

from runtime.evaluate import evaluate
from utils.flops import from_gflops, to_gflops
from utils.nets import unwrap


@torch.no_grad()
def calibrate_to_flops(ddp, batches, ctx, costs, target, steps=24, bound=16.0, tolerance=0.005):
    """Shift every switch's logit by one constant (the heads' biases) so that the greedy routes on `batches`
    (training data) cost the closest to `target` FLOPs per image: bisection in [-bound, bound], stopping within
    `tolerance`. Returns {"shift", "gflops", "gflops_before"}. Dual ascent brings alpha only near the target."""
    heads = unwrap(ddp).switches.logit_layers()
    original = [h.bias.detach().clone() for h in heads]

    def flops_at(shift):
        for h, b in zip(heads, original):
            h.bias.copy_(b + shift)
        return from_gflops(evaluate(ddp, batches, ctx, costs, desc="calibrate")["gflops"])

    before = best_flops = flops_at(0.0)
    best, lo, hi = 0.0, -bound, bound
    for _ in range(steps):
        if abs(best_flops - target) <= tolerance * target:
            break
        mid = (lo + hi) / 2
        f = flops_at(mid)
        if abs(f - target) < abs(best_flops - target):
            best, best_flops = mid, f
        lo, hi = (mid, hi) if f < target else (lo, mid)
    flops_at(best)
    return {"shift": best, "gflops": to_gflops(best_flops), "gflops_before": to_gflops(before)}

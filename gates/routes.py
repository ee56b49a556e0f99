"""The calibration of the switches' threshold to a FLOPs target (stage 3's --target_gflops)."""
import torch
import torch.nn as nn

from runtime.evaluate import evaluate


def _heads(model):
    """The linear heads that turn each switch's features into its logit (one shared head for `rnn`, one per
    switch for `ff`)."""
    return [m for m in model.switches.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def calibrate_to_flops(ddp, batches, ctx, costs, target, steps=24, bound=16.0, tolerance=0.005):
    """Shift every switch's logit by one constant (added to the heads' biases: the greedy threshold p > 0.5
    moves the same for every switch) so that the greedy routes on `batches` cost the closest to `target`
    FLOPs per image. Bisection on the shift in [-bound, bound] (a larger shift executes more blocks);
    stops early within `tolerance` (relative). `batches`: a list of (x, y), training data (never test).
    Returns {"shift", "gflops" (on `batches`, after), "gflops_before"}. Stage 3's --target_gflops ends with
    it (gates/ending.py; also before every route epoch but the first), after dual ascent brought alpha near
    the target: a training batch's greedy FLOPs estimate is only an estimate, and the deployed model must
    meet the target."""
    model = getattr(ddp, "module", ddp)
    heads = _heads(model)
    original = [h.bias.detach().clone() for h in heads]

    def flops_at(shift):
        for h, b in zip(heads, original):
            h.bias.copy_(b + shift)
        return evaluate(ddp, batches, ctx, costs, desc="calibrate")["gflops"] * 1e9

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
    return {"shift": best, "gflops": best_flops / 1e9, "gflops_before": before / 1e9}

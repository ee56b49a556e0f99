"""Routes that are not learnt per image: a calibration of the switches' threshold to a FLOPs target, and the
best fixed route (the same blocks skipped for every image), the baseline that per-image routing must beat.

FLOPs per image of a fixed route r (0/1 per gated block): base + sum_j r_j * blocks[j] (no switch is
evaluated: utils/flops.py's split of the costs).
"""
import torch

from runtime.evaluate import evaluate, recalibrate_bn
from utils.flops import from_gflops, to_gflops
from utils.nets import unwrap


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
    model = unwrap(ddp)
    heads = model.switches.logit_layers()
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


def route_flops(costs, route):
    """FLOPs per image of a fixed route (no switch evaluated)."""
    return costs["base"] + sum(c for c, r in zip(costs["blocks"], route) if r)


@torch.no_grad()
def evaluate_route(ddp, loader, ctx, costs, route):
    """Accuracy (%), loss and GFLOPs per image of the network with the fixed route `route` (list of 0/1 per
    gated block, or None: every block), in `open` mode (no switch evaluated), over every image of `loader`.
    The model's BN statistics are used as they are (recalibrate_route re-estimates them for the route)."""
    model = unwrap(ddp)
    saved, model.route = model.route, None if route is None else list(route)
    try:
        ev = evaluate(ddp, loader, ctx, costs, mode="open", desc="route")
    finally:
        model.route = saved
    full = route if route is not None else [1] * len(costs["blocks"])
    return {**ev, "gflops": route_flops(costs, full) / 1e9, "route": list(full)}


@torch.no_grad()
def best_fixed_route(ddp, loader, ctx, costs, budget_gflops):
    """The best set of blocks to skip for every image at a FLOPs budget, chosen greedily on `loader` (a
    validation split held out of train): starting from every block executed, repeatedly drop the block
    whose removal keeps the highest accuracy (ties: the lower loss) until the route costs at most
    `budget_gflops` per image. Returns {"route", "gflops", "acc", "loss", "history": [(dropped block
    index j (switch j+1's block), acc, gflops), ...]}; the accuracies are on `loader`.
    Cost: at most S(S+1)/2 evaluations of `loader` for S gated blocks."""
    route = [1] * len(costs["blocks"])
    current = evaluate_route(ddp, loader, ctx, costs, route)
    history = []
    while route_flops(costs, route) > budget_gflops * 1e9 and any(route):
        trials = []
        for j in (j for j, r in enumerate(route) if r):
            candidate = route[:j] + [0] + route[j + 1:]
            ev = evaluate_route(ddp, loader, ctx, costs, candidate)
            trials.append((ev["acc"], -ev["loss"], j, ev))
        acc, _, j, current = max(trials, key=lambda t: t[:2])
        route[j] = 0
        history.append((j, acc, current["gflops"]))
    return {"route": route, "gflops": route_flops(costs, route) / 1e9, "acc": current["acc"],
            "loss": current["loss"], "history": history}


def recalibrate_route(ddp, loader, ctx, route, batches=100):
    """Re-estimate BN statistics of the network under a fixed route (runtime.evaluate.recalibrate_bn in `open`
    mode with the route set); the model keeps no route afterwards."""
    model = unwrap(ddp)
    saved, model.route = model.route, list(route)
    try:
        recalibrate_bn(ddp, loader, ctx, mode="open", batches=batches)
    finally:
        model.route = saved

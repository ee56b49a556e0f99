"""Fixed routes, the baseline per-image routing must beat: the same blocks skipped for every image, chosen
greedily on a validation split, BN statistics re-estimated under the route.

FLOPs per image of a fixed route r (0/1 per gated block): base + sum_j r_j * blocks[j] (no switch is
evaluated: utils/flops.py's split of the costs).
"""
import torch

from runtime.evaluate import evaluate, recalibrate_bn
from runtime.predict import fixed_route


def route_flops(costs, route):
    """FLOPs per image of a fixed route (no switch evaluated)."""
    return costs["base"] + sum(c for c, r in zip(costs["blocks"], route) if r)


@torch.no_grad()
def evaluate_route(ddp, loader, ctx, costs, route):
    """Accuracy (%), loss and GFLOPs per image of the network with the fixed route `route` (list of 0/1 per
    gated block, or None: every block), in `open` mode (no switch evaluated), over every image of `loader`.
    The model's BN statistics are used as they are (recalibrate_route re-estimates them for the route)."""
    with fixed_route(ddp, route):
        ev = evaluate(ddp, loader, ctx, costs, mode="open", desc="route")
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
    with fixed_route(ddp, route):
        recalibrate_bn(ddp, loader, ctx, mode="open", batches=batches)

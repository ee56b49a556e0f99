"""Stage 2, step 5: one global threshold over the keys of all input and output directions of all layers.

A direction's key is its score (criterion "score": EigenDamage's OBD estimate of the loss increase when it
is removed), or its score divided by what the direction costs ("score_per_param", "score_per_flop":
Layer.direction_costs); "score_per_cost" divides by the cost the target counts (docs/config.md).
Cutting the c lowest-keyed directions of the pool gives every layer its ranks, subject to four rules:
a side (inputs or outputs) of a layer loses at most floor(limit * n) directions and keeps at least one;
with round_to m, a side keeps a multiple of m directions (or all n); and each side either takes its cut or
keeps every direction it holds, whichever leaves the layer cheaper in the measure the target counts, never
taking a form that costs more than the layer as it is in the other measure. The model's parameters and FLOPs
never grow with c, so a target is met by bisection on c; where one more direction would jump past the target's
tolerance, the directions after it are tried in order (_fill).
"""
import math
from dataclasses import dataclass

import torch

from utils.errors import UserError
from utils.flops import to_gflops

CRITERIA = ("score", "score_per_param", "score_per_flop", "score_per_cost")
MEASURES = ("params", "flops")


def rules_text(limit, round_to):
    """The per-side rules a reach is bounded by, for error messages."""
    return f"prune_ratio_limit {limit}" + (f" and round_to {round_to}" if round_to > 1 else "")


@dataclass
class Plan:
    ranks: dict  # name -> (r_in, r_out) of every layer that shrinks; the others stay as they are
    cut: int     # directions under the global threshold (before the per-layer rules)
    total: int   # directions in the pool
    params: int  # parameters of the whole model once rebuilt
    flops: int   # FLOPs per image of the whole model once rebuilt, every block run (None if not counted)
    removed: int = 0  # directions actually removed: those of the layers that shrink, after the rules


class Threshold:
    """The ranks of every layer as a function of the number of pooled directions cut (the rules above);
    `measure` ("params" or "flops"): which allowed form is kept. ValueError for a bad criterion, measure, round_to."""

    def __init__(self, layers, limit, params_now, flops_now=None, criterion="score", measure="params",
                 round_to=1):
        if criterion not in CRITERIA or measure not in MEASURES or round_to < 1:
            raise ValueError(f"criterion {criterion!r} / measure {measure!r} / round_to {round_to!r}")
        self.limit, self.round_to = limit, int(round_to)
        self.layers, self.params_now, self.flops_now = layers, params_now, flops_now
        self.measure = 0 if measure == "params" else 1
        if criterion == "score_per_cost":
            criterion = "score_per_param" if measure == "params" else "score_per_flop"
        keys = []
        for layer in layers:
            if criterion == "score":
                keys += [layer.in_scores, layer.out_scores]
            else:
                cost_in, cost_out = layer.direction_costs("params" if criterion == "score_per_param" else "flops")
                keys += [layer.in_scores / cost_in, layer.out_scores / cost_out]
        self.sizes = torch.tensor([len(k) for k in keys])
        side_of = torch.repeat_interleave(torch.arange(len(keys)), self.sizes)
        # the side of every direction, lowest key first (stable: ties cut in a fixed order)
        self.sides_by_key = side_of[torch.cat(keys).argsort(stable=True)]
        self.max_cut = torch.tensor([min(math.floor(limit * n + 1e-9), n - 1) for n in self.sizes.tolist()])
        self.total = int(self.sizes.sum())

    def plan(self, cut):
        return self.plan_counts(torch.bincount(self.sides_by_key[:cut], minlength=len(self.sizes)), cut)

    def plan_counts(self, counts, cut):
        """The plan when each side loses counts[side] directions (its lowest-scoring ones)."""
        kept = self.sizes - torch.minimum(counts, self.max_cut)
        if self.round_to > 1:  # up to a multiple of round_to, at most the whole side: never smaller with c
            kept = torch.minimum(self.sizes, (kept + self.round_to - 1) // self.round_to * self.round_to)
        kept = kept.tolist()
        ranks, params, flops, removed = {}, self.params_now, self.flops_now, 0
        for layer, r_in, r_out in zip(self.layers, kept[0::2], kept[1::2]):
            n_in, n_out = layer.ranks
            # the layer as it is first, then forms that keep more before those that keep less: the first
            # cheapest wins, so a tie keeps directions
            options = [(n_in, n_out), (r_in, n_out), (n_in, r_out), (r_in, r_out)]
            costs = [layer.cost(*o) for o in options]
            # only forms that cost no more than the layer as it is in both measures: a form with fewer
            # parameters can need more FLOPs (a rotation in front of a strided conv runs at the input's
            # resolution), and pruning must never make the network more expensive in either
            allowed = [i for i, c in enumerate(costs) if c[0] <= costs[0][0] and c[1] <= costs[0][1]]
            best = min(allowed, key=lambda i: costs[i][self.measure])
            if best == 0:  # nothing strictly cheaper than the layer as it is
                continue
            ranks[layer.name] = options[best]
            removed += n_in - options[best][0] + n_out - options[best][1]
            params -= layer.params - costs[best][0]
            if flops is not None:
                flops -= layer.flops - costs[best][1]
        return Plan(ranks=ranks, cut=cut, total=self.total, params=params, flops=flops, removed=removed)


def plan_for_ratio(layers, ratio, limit, params_now, flops_now=None, criterion="score", round_to=1):
    """Cut the fraction `ratio` of all pooled directions."""
    threshold = Threshold(layers, limit, params_now, flops_now, criterion, round_to=round_to)
    return threshold.plan(int(ratio * threshold.total))


def plan_for_params(layers, target, limit, params_now, tolerance, flops_now=None, criterion="score", round_to=1):
    """The fewest cuts to at most `target` parameters, within `tolerance`; UserError otherwise."""
    threshold = Threshold(layers, limit, params_now, flops_now, criterion, "params", round_to)
    return _bisect(threshold, lambda plan: plan.params, target, tolerance, "parameter",
                   lambda v: f"{int(v)} parameters")


def plan_for_flops(layers, target, limit, params_now, flops_now, tolerance, criterion="score", round_to=1):
    """The fewest cuts to at most `target` FLOPs per image (every block run), within `tolerance`; else UserError."""
    threshold = Threshold(layers, limit, params_now, flops_now, criterion, "flops", round_to)
    return _bisect(threshold, lambda plan: plan.flops, target, tolerance, "GFLOPs",
                   lambda v: f"{to_gflops(v):.4g} GFLOPs per image")


def _bisect(threshold, value, target, tolerance, what, amount):
    """The plan of the fewest cuts that meet `target` within `tolerance`; `amount` words a value."""
    lo, hi = 0, threshold.total
    fewest, now = value(threshold.plan(hi)), value(threshold.plan(0))
    if fewest > target:
        raise UserError(f"the {what} target is out of reach: with {rules_text(threshold.limit, threshold.round_to)} "
                        f"the model keeps at least {amount(fewest)}, the target is {amount(target)}")
    if target - now > tolerance:  # above the network as it is: no cut comes nearer
        raise UserError(f"the {what} target {amount(target)} is above what the network holds now, {amount(now)}: "
                        f"nothing to prune; give a target between {amount(fewest)} and {amount(now)}")
    while lo < hi:
        mid = (lo + hi) // 2
        if value(threshold.plan(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    plan = threshold.plan(lo)
    if target - value(plan) > tolerance:
        plan = _fill(threshold, value, target, tolerance, lo)
    if plan is None:
        finer = " (a smaller round_to gives finer steps)" if threshold.round_to > 1 else ""
        raise UserError(f"cannot meet the {what} target {amount(target)} within {amount(tolerance)}: the nearest "
                        f"cut gives {amount(value(threshold.plan(lo)))}{finer}")
    return plan


def _fill(threshold, value, target, tolerance, lo):
    """When the last cut direction jumps too far below the target, cut the first lo - 1, then the following
    directions in key order, passing over each that would land more than `tolerance` below; None if none meets it."""
    counts = torch.bincount(threshold.sides_by_key[:lo - 1], minlength=len(threshold.sizes))
    cut = lo - 1
    for side in threshold.sides_by_key[lo - 1:].tolist():
        counts[side] += 1
        plan = threshold.plan_counts(counts, cut + 1)
        if value(plan) > target:
            cut += 1  # still above: keep this cut and go on
        elif target - value(plan) <= tolerance:
            return plan
        else:
            counts[side] -= 1  # too far below: pass over it
    return None

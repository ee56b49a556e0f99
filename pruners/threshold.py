"""Stage 2, step 5: one global threshold over the scores of all input and output directions of all layers.

Cutting the c lowest-scoring directions of the pool gives every layer its ranks, subject to three rules:
a side (inputs or outputs) of a layer loses at most floor(limit * n) directions and keeps at least one
(its highest-scoring), and a layer whose factored form would not hold fewer parameters than it holds now
is left as it is. The model's parameter count never grows with c, so a parameter target is met by
bisection on c.
"""
import math
from dataclasses import dataclass

import torch

from utils.errors import UserError


@dataclass
class Plan:
    ranks: dict  # name -> (r_in, r_out) of every layer that shrinks; the others stay as they are
    cut: int     # directions under the global threshold (before the per-layer rules)
    total: int   # directions in the pool
    params: int  # parameters of the whole model once rebuilt
    removed: int = 0  # directions actually removed: those of the layers that shrink, after the rules


class Threshold:
    """The ranks of every layer as a function of the number of pooled directions cut."""

    def __init__(self, layers, limit, params_now):
        self.layers, self.params_now = layers, params_now
        sides = [s for layer in layers for s in (layer.in_scores, layer.out_scores)]
        self.sizes = torch.tensor([len(s) for s in sides])
        side_of = torch.repeat_interleave(torch.arange(len(sides)), self.sizes)
        # the side of every direction, lowest score first (stable: ties cut in a fixed order)
        self.sides_by_score = side_of[torch.cat(sides).argsort(stable=True)]
        self.max_cut = torch.tensor([min(math.floor(limit * n + 1e-9), n - 1) for n in self.sizes.tolist()])
        self.total = int(self.sizes.sum())

    def plan(self, cut):
        counts = torch.bincount(self.sides_by_score[:cut], minlength=len(self.sizes))
        kept = (self.sizes - torch.minimum(counts, self.max_cut)).tolist()
        ranks, params, removed = {}, self.params_now, 0
        for layer, r_in, r_out in zip(self.layers, kept[0::2], kept[1::2]):
            new = layer.factored_params(r_in, r_out)
            if new < layer.params:
                ranks[layer.name] = (r_in, r_out)
                params -= layer.params - new
                removed += len(layer.in_scores) - r_in + len(layer.out_scores) - r_out
        return Plan(ranks=ranks, cut=cut, total=self.total, params=params, removed=removed)


def plan_for_ratio(layers, ratio, limit, params_now):
    """Cut the fraction `ratio` of all pooled directions."""
    threshold = Threshold(layers, limit, params_now)
    return threshold.plan(int(ratio * threshold.total))


def plan_for_params(layers, target, limit, params_now, tolerance):
    """The fewest cuts that bring the model to at most `target` parameters; UserError if no cut reaches it
    or the nearest one overshoots by more than `tolerance` parameters."""
    threshold = Threshold(layers, limit, params_now)
    lo, hi = 0, threshold.total
    fewest = threshold.plan(hi).params
    if fewest > target:
        raise UserError(f"the parameter target is out of reach: with prune_ratio_limit {limit} this model "
                        f"keeps at least {fewest} parameters, the target is {int(target)}")
    while lo < hi:
        mid = (lo + hi) // 2
        if threshold.plan(mid).params <= target:
            hi = mid
        else:
            lo = mid + 1
    plan = threshold.plan(lo)
    if target - plan.params > tolerance:
        raise UserError(f"cannot meet the parameter target {int(target)} within {int(tolerance)}: the nearest "
                        f"cut gives {plan.params}")
    return plan

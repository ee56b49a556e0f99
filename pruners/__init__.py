"""Static pruning in the Kronecker-factored eigenbasis (EigenDamage, Wang et al., ICML 2019): SPEC.md stage 2.

    factors = collect_factors(model, batches)   kfac.py       step 1: A and G of every prunable conv
    layers = decompose(model, factors, damping) eigen.py      steps 2-4: eigenbases, W', scores
    plan = plan_for_params(layers, ...)         threshold.py  step 5: one global threshold
    model = rebuild(model, layers, keep)        eigen.py      step 6: rot_in -> core -> rot_out
prune() runs the four in a row; main_prune.py adds the data, fine-tuning, checkpoints and metrics.
"""
import time

from pruners.eigen import decompose, in_channel_basis, rebuild, set_rotations_trainable, top_directions
from pruners.kfac import collect_factors, evenly_spaced, prunable_convs
from pruners.threshold import Threshold, plan_for_params, plan_for_ratio
from utils.dist import broadcast_object
from utils.errors import UserError
from utils.flops import count_params

TOLERANCE = 0.01  # a compression target is met within 1 point of the reference model's parameters

__all__ = ["prune", "max_compression", "check_reachable", "collect_factors", "decompose", "rebuild", "top_directions",
           "in_channel_basis", "plan_for_params", "plan_for_ratio", "prunable_convs", "evenly_spaced",
           "set_rotations_trainable"]


def prune(model, batches, *, target, value, params_reference, limit=0.95, damping=1e-3, fisher_type="true",
          num_batches=None, progress=True):
    """One pruning step of `model` on `batches` of (x, y). target "compression": remove the fraction
    `value` of params_reference's parameters (the stage-1 model's); "ratio": cut the fraction `value` of all
    pooled directions. Returns (the rebuilt model, a report of plain data)."""
    t0 = time.perf_counter()
    factors = collect_factors(model, batches, fisher_type, num_batches, progress)
    t1 = time.perf_counter()
    layers = decompose(model, factors, damping)
    t2 = time.perf_counter()
    params_now = count_params(model)
    if target == "compression":
        plan = plan_for_params(layers, (1 - value) * params_reference, limit, params_now,
                               TOLERANCE * params_reference)
    else:
        plan = plan_for_ratio(layers, value, limit, params_now)
    plan = broadcast_object(plan)  # every rank builds the same architecture, whatever eigh's rounding
    by_name = {layer.name: layer for layer in layers}
    new = rebuild(model, layers, {name: top_directions(by_name[name], *r) for name, r in plan.ranks.items()})
    t3 = time.perf_counter()
    params = count_params(new)
    if params != plan.params:
        raise RuntimeError(f"rebuilt model holds {params} parameters, the plan said {plan.params}")
    return new, {"target": target, "value": value, "directions": plan.total, "directions_cut": plan.cut,
                 "ratio": plan.cut / plan.total, "params": params, "compression": 1 - params / params_reference,
                 "layers_pruned_now": sorted(plan.ranks), "factor_seconds": t1 - t0, "eigen_seconds": t2 - t1,
                 "rebuild_seconds": t3 - t2}


def max_compression(model, limit, params_reference):
    """The largest compression (against params_reference) one pruning step of `model` can reach with
    prune_ratio_limit `limit`: every side cut to its limit. Needs no data, so it is checked up front."""
    threshold = Threshold(in_channel_basis(model), limit, count_params(model))
    return 1 - threshold.plan(threshold.total).params / params_reference


def check_reachable(model, target, value, limit, params_reference):
    """UserError, before any work, when a compression target is beyond one step's reach."""
    if target != "compression":
        return
    reach = max_compression(model, limit, params_reference)
    if value > reach + TOLERANCE:
        raise UserError(f"compression {value} is out of reach: with prune_ratio_limit {limit} one pass removes "
                        f"at most {reach:.3f} of this network's parameters")

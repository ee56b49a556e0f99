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
from models import build_model
from utils.flops import count_params

TOLERANCE = 0.01  # a compression target is met within 1 point of the reference model's parameters

__all__ = ["prune", "max_compression", "check_reachable", "check_schedule", "collect_factors", "decompose", "rebuild", "top_directions",
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
    # what was removed, not what fell under the threshold: a side's limit and layers whose factored form
    # would not be smaller keep directions the threshold cut
    return new, {"target": target, "value": value, "directions": plan.total, "directions_cut": plan.removed,
                 "directions_under_threshold": plan.cut, "ratio": plan.removed / plan.total, "params": params, "compression": 1 - params / params_reference,
                 "layers_pruned_now": sorted(plan.ranks), "factor_seconds": t1 - t0, "eigen_seconds": t2 - t1,
                 "rebuild_seconds": t3 - t2}


def max_compression(model, limit, params_reference, rounds=1):
    """The largest compression (against params_reference) that `rounds` pruning steps of `model` can reach
    with prune_ratio_limit `limit`: every side cut to its limit in every step. An upper bound for any
    sequence of targets (a layer can keep no fewer after a round the more it kept before it). Needs no
    data (only the shapes of the pruned networks), so it is checked up front."""
    for r in range(rounds):
        threshold = Threshold(in_channel_basis(model), limit, count_params(model))
        plan = threshold.plan(threshold.total)
        if r + 1 < rounds:  # the shapes the next step starts from; the weights do not matter
            ranks = {**model.arch.get("ranks", {}), **{k: list(v) for k, v in plan.ranks.items()}}
            model = build_model({**model.arch, "ranks": ranks})
    return 1 - plan.params / params_reference


def check_reachable(model, target, value, limit, params_reference):
    """UserError, before any work, when a compression target is beyond one step's reach."""
    check_schedule(model, [{"target": target, "value": value}], limit, params_reference)


def check_schedule(model, schedule, limit, params_reference, first_round=0):
    """UserError, before any work, naming the first round of `schedule` (a list of {"target", "value"},
    run from `model`; numbered from `first_round` in the message) whose compression target no earlier
    rounds could bring within reach."""
    model = getattr(model, "module", model)
    for i, spec in enumerate(schedule):
        if spec["target"] != "compression":
            continue
        reach = max_compression(model, limit, params_reference, rounds=i + 1)
        if spec["value"] > reach + 1e-9:  # the first round's reach is exact: the target would fail later
            where = f"rounds[{first_round + i}]: " if len(schedule) > 1 or first_round else ""
            steps = "one pass removes" if i == 0 else f"{i + 1} passes remove"
            raise UserError(f"{where}compression {spec['value']} is out of reach: with prune_ratio_limit {limit} "
                            f"{steps} at most {reach:.3f} of the stage-1 network's parameters")

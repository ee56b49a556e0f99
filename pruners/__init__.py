"""Static pruning in the Kronecker-factored eigenbasis (EigenDamage, Wang et al., ICML 2019): stage 2.

    factors = collect_factors(model, batches)   kfac.py       step 1: A and G of every prunable conv
    layers = decompose(model, factors, damping) eigen.py      steps 2-4: eigenbases, W', scores
    plan = plan_for_params(layers, ...)         threshold.py  step 5: one global threshold
    model = rebuild(model, layers, keep)        eigen.py      step 6: rot_in -> core -> rot_out
prune() runs the four in a row; stages/prune.py adds the data, fine-tuning, checkpoints and metrics.
"""
import itertools
import time

from pruners.eigen import decompose, in_channel_basis, rebuild, set_rotations_trainable, top_directions
from pruners.kfac import collect_factors, evenly_spaced, prunable_convs
from pruners.threshold import CRITERIA, Threshold, plan_for_flops, plan_for_params, plan_for_ratio, rules_text
from utils.dist import broadcast_object
from utils.errors import UserError
from models import build_model
from utils.flops import compression, count_params, dense_flops, from_gflops, measure_costs, to_gflops
from utils.nets import unwrap

TOLERANCE = 0.01  # a compression target is met within 1 point of the reference's parameters, GFLOPs within 1%

__all__ = ["prune", "check_schedule", "collect_factors", "decompose", "rebuild", "top_directions", "in_channel_basis",
           "plan_for_params", "plan_for_ratio", "plan_for_flops", "prunable_convs", "evenly_spaced",
           "set_rotations_trainable", "model_flops", "CRITERIA"]


def model_flops(model, image_size):
    """FLOPs per image of `model` with every block run and no switch evaluated (utils/flops.dense_flops)."""
    return dense_flops(measure_costs(model, image_size))


def prune(model, batches, *, target, value, params_reference, limit=0.95, damping=1e-3, fisher_type="true",
          criterion="score_per_cost", round_to=1, image_size=None, num_batches=None, progress=True,
          mode="open"):
    """One pruning step of `model` on `batches` of (x, y) to `target` = `value` (docs/config.md; compression of
    params_reference, the stage-1 model's; gflops at image_size, default the batches'). Returns (the rebuilt
    model, a report of plain data). UserError when there are no batches or the target cannot be met;
    RuntimeError if the rebuilt model does not hold the parameters and FLOPs the plan counted."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise UserError("the factor pass got no batches (fisher_batches or the training set is empty)")
    image_size = image_size or first[0].shape[-1]
    t0 = time.perf_counter()
    factors = collect_factors(model, itertools.chain([first], batches), fisher_type, num_batches, progress, mode)
    t1 = time.perf_counter()
    layers = decompose(model, factors, damping)
    t2 = time.perf_counter()
    params_now, flops_now = count_params(model), model_flops(model, image_size)
    if target == "compression":
        plan = plan_for_params(layers, (1 - value) * params_reference, limit, params_now,
                               TOLERANCE * params_reference, flops_now, criterion, round_to)
    elif target == "gflops":
        plan = plan_for_flops(layers, from_gflops(value), limit, params_now, flops_now, TOLERANCE * from_gflops(value),
                              criterion, round_to)
    else:
        plan = plan_for_ratio(layers, value, limit, params_now, flops_now, criterion, round_to)
    plan = broadcast_object(plan)  # every rank builds the same architecture, whatever eigh's rounding
    by_name = {layer.name: layer for layer in layers}
    new = rebuild(model, layers, {name: top_directions(by_name[name], *r) for name, r in plan.ranks.items()})
    t3 = time.perf_counter()
    params, flops = count_params(new), model_flops(new, image_size)
    if (params, flops) != (plan.params, plan.flops):
        raise RuntimeError(f"rebuilt model holds {params} parameters and {flops} FLOPs, the plan said "
                           f"{plan.params} and {plan.flops}")
    # what was removed, not what fell under the threshold: a side's limit and layers whose factored form
    # would not be cheaper keep directions the threshold cut
    return new, {"target": target, "value": value, "criterion": criterion, "round_to": round_to,
                 "directions": plan.total, "directions_cut": plan.removed, "directions_under_threshold": plan.cut,
                 "ratio": plan.removed / plan.total, "params": params,
                 "compression": compression(params, params_reference), "gflops": to_gflops(flops),
                 "layers_pruned_now": sorted(plan.ranks), "factor_seconds": t1 - t0, "eigen_seconds": t2 - t1,
                 "rebuild_seconds": t3 - t2}


def smallest(model, limit, image_size=32, rounds=1, round_to=1):
    """(parameters, FLOPs per image at image_size) of `model` after `rounds` pruning steps that each cut
    every side to its limit (and round_to), each layer in its fewest-parameter (resp. -FLOPs) form: a lower
    bound for any sequence of targets, from shapes alone, so it is checked up front."""
    model = unwrap(model)
    out = []
    for measure in ("params", "flops"):
        m = model
        for r in range(rounds):
            threshold = Threshold(in_channel_basis(m, image_size), limit, count_params(m),
                                  model_flops(m, image_size), measure=measure, round_to=round_to)
            plan = threshold.plan(threshold.total)
            if r + 1 < rounds:  # the shapes the next step starts from; the weights do not matter
                ranks = {**m.arch.get("ranks", {}), **{k: list(v) for k, v in plan.ranks.items()}}
                m = build_model({**m.arch, "ranks": ranks})
        out.append(plan.params if measure == "params" else plan.flops)
    return tuple(out)


def check_schedule(model, schedule, limit, params_reference, first_round=0, image_size=32, round_to=1):
    """UserError, before any work, naming the first round of `schedule` (a list of {"target", "value"}, run
    from `model`, numbered from `first_round`) whose target no earlier rounds could bring within reach."""
    rules = rules_text(limit, round_to)
    where = lambda i: f"rounds[{first_round + i}]: " if len(schedule) > 1 or first_round else ""  # noqa: E731
    first = schedule[0] if schedule else {}
    if first.get("target") == "gflops" and from_gflops(first["value"]) >= model_flops(model, image_size):
        now = to_gflops(model_flops(model, image_size))
        fewest = to_gflops(smallest(model, limit, image_size, round_to=round_to)[1])
        raise UserError(f"{where(0)}gflops {first['value']} is not below the {now:.4g} GFLOPs per image this network "
                        f"costs at {image_size}x{image_size} (every block run): nothing to prune; give a value "
                        f"between {fewest:.4g} (the least that one pass leaves with {rules}) and {now:.4g}")
    for i, spec in enumerate(schedule):
        if spec["target"] not in ("compression", "gflops"):
            continue
        params, flops = smallest(model, limit, image_size, rounds=i + 1, round_to=round_to)
        steps = "one pass removes" if i == 0 else f"{i + 1} passes remove"
        leave = "one pass leaves" if i == 0 else f"{i + 1} passes leave"
        # the first round's reach is exact: a target beyond it would only fail later
        if spec["target"] == "compression" and spec["value"] > compression(params, params_reference) + 1e-9:
            raise UserError(f"{where(i)}compression {spec['value']} is out of reach: with {rules} {steps} at most "
                            f"{compression(params, params_reference):.3f} of the stage-1 network's parameters")
        if spec["target"] == "gflops" and from_gflops(spec["value"]) < flops:
            raise UserError(f"{where(i)}gflops {spec['value']} is out of reach: with {rules} {leave} at least "
                            f"{to_gflops(flops):.4g} GFLOPs per image at {image_size}x{image_size}")

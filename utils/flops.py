"""FLOPs and parameters, measured on the model as deployed (the README's conventions): FlopCounterMode counts
what the model's own forward runs, whatever a switch kind computes. A network's cost splits into
  base      what every image runs: stem, ungated first block, shortcuts, classifier
  switches  every switch (run for every image whenever the switches are on)
  blocks[j] the residual of gated block j+1, paid only by the images that execute it
so the FLOPs of one image are base + switches + sum_j a_j * blocks[j] for its route a.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from utils.nets import executing, unwrap


@torch.no_grad()
def probe(model, image_size, modules, record, mode="hard"):
    """Run one all-zero image through `model` in `mode`, every block computed (eval, masked), calling
    record(name, module, inputs, output) for each of `modules`; mode and execution restored after."""
    model = unwrap(model)
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: record(name, m, i, o)) for name, m in modules]
    route = model.route
    param = next(model.parameters())
    x = torch.zeros(1, model.arch.get("in_channels", 3), image_size, image_size, device=param.device,
                    dtype=param.dtype)
    try:
        with executing(model, "mask", training=False):
            model.route = None
            model(x, mode)
    finally:
        model.route = route
        for h in hooks:
            h.remove()


def _flops(fn, *args):
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@torch.no_grad()
def measure_costs(model, image_size=32):
    """Split the FLOPs of one image through `model` into base / switches / per gated block (see above); a
    gated block's residual is measured on the input its switch saw."""
    model = unwrap(model)
    blocks = [0] * model.num_switches

    def residual(name, switches, args, output):  # switch j sees gated block j + 1's input
        blocks[args[0]] = _flops(model.blocks[args[0] + 1].residual, args[1])

    probe(model, image_size, [("switches", model.switches)], residual)  # in eval mode, as every probe
    routed = _flops(probe, model, image_size, [], None)
    dense = _flops(probe, model, image_size, [], None, "open")
    return {"base": dense - sum(blocks), "switches": routed - dense, "blocks": blocks}


def to_gflops(flops):
    """FLOPs -> GFLOPs (10^9 FLOPs: the unit of every flag, report and table)."""
    return flops / 1e9


def from_gflops(gflops):
    """GFLOPs -> FLOPs."""
    return gflops * 1e9


def dense_flops(costs):
    """FLOPs of one image with every block run and no switch evaluated (`open` mode)."""
    return costs["base"] + sum(costs["blocks"])


def skipped_flops(costs):
    """FLOPs of one image that skips every gated block, its switches evaluated: the least any route costs."""
    return costs["base"] + costs["switches"]


def gflops_bounds(costs):
    """GFLOPs per image of the cheapest and dearest routes, switches evaluated: a target's range."""
    return to_gflops(skipped_flops(costs)), to_gflops(skipped_flops(costs) + sum(costs["blocks"]))


def count_params(model):
    """Every parameter the model holds: convs, rotations, BN affine, classifier, switches."""
    return sum(p.numel() for p in unwrap(model).parameters())


def compression(params, params_stage1):
    """The share of the stage-1 network's parameters that a network of `params` parameters has removed."""
    return 1 - params / params_stage1

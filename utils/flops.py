"""FLOPs and parameters, measured on the model as deployed (the README's conventions).

FLOPs = 2 x multiply-accumulates of convolutions and linear layers (and the LSTM cell's matmuls), the
convention of torch.utils.flop_counter.FlopCounterMode. A network's cost splits into
  base      what every image runs: stem, ungated first block, shortcut projections, classifier
  switches  every switch (they run for every image whenever the switches are on)
  blocks[j] the residual path of gated block j+1, paid only by the images that execute it
so the FLOPs of one image are base + switches + sum_j a_j * blocks[j] for its route a.
"""
import re

import torch
import torch.nn as nn

_GATED_RESIDUAL = re.compile(r"^blocks\.(\d+)\.(conv1|conv2)(\.|$)")


def _leaf_flops(module, inputs, output):
    """FLOPs of one call of a conv / linear / LSTM cell, per image (the batch is 1 when we measure)."""
    if isinstance(module, nn.Conv2d):
        c_in = module.in_channels // module.groups
        kh, kw = module.kernel_size
        return 2 * output[0].numel() * c_in * kh * kw
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features
    if isinstance(module, nn.LSTMCell):
        return 2 * 4 * module.hidden_size * (module.input_size + module.hidden_size)
    return 0


@torch.no_grad()
def probe(model, image_size, modules, record):
    """Run one all-zero image of image_size x image_size through `model` with every block and switch
    computed (eval mode, masked execution, `hard` switches), calling record(name, module, inputs, output)
    for each (name, module) of `modules` it passes; the model's mode and execution are restored after.
    The shapes and FLOPs of a forward pass, measured without any data."""
    model = getattr(model, "module", model)  # DDP
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: record(name, m, i, o)) for name, m in modules]
    was_training, execution = model.training, model.execution
    param = next(model.parameters())
    x = torch.zeros(1, model.arch.get("in_channels", 3), image_size, image_size, device=param.device,
                    dtype=param.dtype)
    try:
        model.eval()
        model.execution = "mask"
        model(x, "hard")
    finally:
        model.train(was_training)
        model.execution = execution
        for h in hooks:
            h.remove()


@torch.no_grad()
def measure_costs(model, image_size=32):
    """Split the FLOPs of one image through `model` into base / switches / per gated block (see above).
    Runs one image with the switches on and every block computed (masked execution)."""
    model = getattr(model, "module", model)  # DDP
    flops = {}
    probe(model, image_size, [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.LSTMCell))],
          lambda name, m, i, o: flops.__setitem__(name, flops.get(name, 0) + _leaf_flops(m, i, o)))
    costs = {"base": 0, "switches": 0, "blocks": [0] * model.num_switches}
    for name, f in flops.items():
        gated = _GATED_RESIDUAL.match(name)
        if gated and int(gated.group(1)) > 0:
            costs["blocks"][int(gated.group(1)) - 1] += f
        elif name.startswith("switches."):
            costs["switches"] += f
        else:
            costs["base"] += f
    return costs


def dense_flops(costs):
    """FLOPs of one image with every block run and no switch evaluated (`open` mode)."""
    return costs["base"] + sum(costs["blocks"])


def skipped_flops(costs):
    """FLOPs of one image that skips every gated block, its switches evaluated: the least any route costs."""
    return costs["base"] + costs["switches"]


def count_params(model):
    """Every parameter the model holds: convs, rotations, BN affine, classifier, switches."""
    model = getattr(model, "module", model)
    return sum(p.numel() for p in model.parameters())

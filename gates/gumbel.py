"""Stage 3's gumbel controller (ConvNet-AIG's gates, Veit & Belongie, ECCV 2018; docs/stages.md): the
backbone and the switches train together on the routes the switches draw (the model's `gumbel` mode,
models/switches.gumbel_decisions), one loss for both, per image the cross-entropy of its route plus the
price of the blocks it ran:

  loss = mean over the batch of [ CE(x_i | route a_i) + alpha * sum_j w_j a_ij ],   w_j = c_j / C

alpha as under the other controllers; the price is averaged like the cross-entropy (no --rl_weight).
"""
import torch
import torch.nn.functional as F

from gates.price import BlockCosts
from models.switches import autocast_off
from runtime.steps import accuracy


class GumbelStep:
    """step_fn(model, x, y) -> (loss, stats) with a gates.price.SkipPrice; stats as the other controllers'."""

    def __init__(self, costs, price):
        self.costs, self.price = costs, price
        self.costs_on = None  # gates.price.BlockCosts on the batch's device, made once

    def __call__(self, model, x, y):
        self.costs_on = BlockCosts.on(x.device, self.costs, self.costs_on)
        logits, actions, probs = model(x, "gumbel")
        with autocast_off(x.device.type):  # float32: the price is a small number beside the cross-entropy
            ce = F.cross_entropy(logits if logits.dtype == torch.float32 else logits.float(), y)
            alpha = self.price.alpha.float()
            # the decisions carry the relaxed gradient
            price_loss = alpha * (actions.float() @ self.costs_on.shares).mean()
            loss = ce + price_loss
            with torch.no_grad():
                # "loss" is the cross-entropy, as under every controller; the price's part has its own tag
                stats = {"loss": ce.detach(), "acc": accuracy(logits, y), "price_loss": price_loss.detach(),
                         **self.price.route_stats(self.costs_on, actions, probs)}
        return loss, stats

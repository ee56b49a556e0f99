"""Stage 3's gumbel controller: the backbone and the switches train together, on the routes the switches take
(ConvNet-AIG's gates, Veit & Belongie, ECCV 2018), the FLOPs paid for through the price of the blocks run.

Every training image takes the route its switches draw, a_j ~ Bernoulli(p_j) (the model's `gumbel` mode,
models/switches.gumbel_decisions): the 0/1 decisions go forward, so the backbone learns on the routes the
switches take, not on routes drawn apart from them; backward, the gradient of the decisions' Gumbel-softmax
relaxation reaches the switches and, through the switches' inputs, the backbone. One loss trains both, per
image the cross-entropy of its route plus the price of the blocks it ran:

  loss = mean over the batch of [ CE(x_i | route a_i) + alpha * sum_j w_j a_ij ],   w_j = c_j / C

(c_j block j's FLOPs, C all gated blocks' FLOPs). alpha means what it means under the other controllers:
the price of running every gated block, in cross-entropy units, so that executing block j pays for an image
iff it lowers that image's cross-entropy by more than alpha * w_j (gates/counterfactual.py's price, and
REINFORCE's reward for skipping, gates/policy.py). It is fixed (--alpha) or the dual variable of a GFLOPs
target (gates.price.SkipPrice: the loss is then the Lagrangian of "greedy FLOPs per image = G", alpha
adapted by dual ascent). Where ConvNet-AIG asks each gate for a target execution rate, one price shared out
by the blocks' FLOPs leaves the network free to choose which blocks to skip. The price is averaged over
the images like the cross-entropy, so --rl_weight plays no part; under DDP each process averages over its
own images and DDP averages the gradients.

Out of training the switches decide p > 0.5 (ending, evaluation, the deployed model): the routes drawn in
training are those decisions once the switches are sure, and the threshold calibration of a GFLOPs target
(gates/ending.py) moves them as under the other controllers.
"""
import torch
import torch.nn.functional as F

from gates.price import BlockCosts
from models.switches import autocast_off
from runtime.steps import accuracy


class GumbelStep:
    """step_fn(model, x, y) -> (loss, stats) for runtime.stage.StageRun.fit. `price`: a gates.price.SkipPrice.

    stats (per batch): loss (the cross-entropy), acc (of the routes drawn), price_loss (alpha times the mean
    share of the gated FLOPs run) and SkipPrice.route_stats' of the drawn routes (exec_rate, sampled_gflops,
    greedy_gflops: what the dual ascent steers, alpha where it moves)."""

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

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
target (gates.policy.SkipPrice: the loss is then the Lagrangian of "greedy FLOPs per image = G", alpha
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

from models.switches import autocast_off
from runtime.steps import accuracy
from utils.flops import skipped_flops


class GumbelStep:
    """step_fn(model, x, y) -> (loss, stats) for runtime.stage.StageRun.fit. `price`: a gates.policy.SkipPrice.

    stats (per batch): loss, ce, acc (of the routes drawn), price_loss (alpha times the mean share of the
    gated FLOPs run), exec_rate (drawn), gflops (per image, drawn routes, switches included), greedy_gflops
    (p > 0.5 along the drawn routes: what the dual ascent steers) and alpha."""

    def __init__(self, costs, price):
        self.costs, self.price = costs, price
        self.consts = None

    def _constants(self, device):
        blocks = torch.tensor(self.costs["blocks"], dtype=torch.float64)
        self.consts = {"w": (blocks / blocks.sum()).float().to(device), "blocks": (blocks / 1e9).to(device),
                       "always": torch.tensor(skipped_flops(self.costs) / 1e9, dtype=torch.float64, device=device)}

    def __call__(self, model, x, y):
        if self.consts is None or self.consts["w"].device != x.device:
            self._constants(x.device)
        k = self.consts
        logits, actions, probs = model(x, "gumbel")
        with autocast_off(x.device.type):  # float32: the price is a small number beside the cross-entropy
            ce = F.cross_entropy(logits if logits.dtype == torch.float32 else logits.float(), y)
            alpha = self.price.alpha.float()
            price_loss = alpha * (actions.float() @ k["w"]).mean()  # the decisions carry the relaxed gradient
            loss = ce + price_loss
            with torch.no_grad():
                exec_rate = actions.detach().mean(0)
                greedy = k["always"] + (probs > 0.5).mean(0, dtype=torch.float64) @ k["blocks"]
                if self.price.target is not None:
                    self.price.update(greedy * 1e9)
                # "loss" is the cross-entropy, as under every controller; the price's part has its own tag
                stats = {"loss": ce.detach(), "acc": accuracy(logits, y), "price_loss": price_loss.detach(),
                         "exec_rate": exec_rate, "sampled_gflops": k["always"] + exec_rate.double() @ k["blocks"],
                         "greedy_gflops": greedy}
                if self.price.target is not None:
                    stats["alpha"] = self.price.alpha
        return loss, stats

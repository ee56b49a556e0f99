"""Stage 3's counterfactual controller: every switch learns, per image, whether its block is worth its FLOPs
(docs/stages.md, "How stage 3 trains and ends": why, and what it costs).

For training image i and gated block j the step measures what executing the block buys that image,

  benefit  b_ij = CE(x_i | route_i with a_j = 0) - CE(x_i | route_i with a_j = 1)

(one route is the one taken, the other flipped from block j's input onwards), against the block's price
pi_j = alpha * c_j / C (c_j its FLOPs, C all gated blocks'; alpha fixed or gates.price.SkipPrice's):

  switch loss    sum over images and switches of BCE(p_ij, sigmoid((b_ij - pi_j) / tau))
  total loss     CE (mean over the batch, on the sampled routes) + rl_weight * switch loss

Summed over images as REINFORCE's policy loss is (gates/policy.py), and weighed by the number of processes
under DDP. `blocks` = K < S flips K gated blocks per step, drawn from the global RNG (seeded per epoch: a
resumed run draws the same), their terms weighed by S / K: unbiased estimates of the full form's loss and
gradient. A NaN probability (a diverged network) reaches the loss, whose check reports it, never a kernel
that asserts on it (the switch loss written out, not F.binary_cross_entropy).
"""
import torch
import torch.nn.functional as F

from gates.price import BlockCosts
from models.switches import autocast_off, log_prob
from runtime.steps import accuracy
from utils.dist import exact_fp32
from utils.nets import executing


@torch.no_grad()
def flip_losses(model, x, y, actions, blocks=None):
    """(taken (N,), flipped (N, K)): per-image cross-entropy of the route `actions` (N, S) and of that route
    with block j flipped, for every gated block j in `blocks` (sorted indices; None: all S). Evaluation mode
    (BN running statistics: what the deployed network computes), float32 with TF32 off (the benefit is a
    small difference of two losses, which bf16 or TF32 would round by about the targets' temperature)."""
    with executing(model, training=False) as net, autocast_off(x.device.type), exact_fp32():
        return _flip_losses(net, x, y, actions.to(torch.float32), blocks)


def _flip_losses(net, x, y, a, blocks=None):
    """The flipped routes and the taken one go through each block as one batch (branch j joins at block j from
    the taken route's input): S block calls instead of about K * S / 2; eval-mode BN keeps images apart."""
    n = x.shape[0]
    flip_set = set(range(net.num_switches)) if blocks is None else set(blocks)
    h = net.blocks[0](F.relu(net.stem_bn(net.stem(x))))
    branches = h[:0]  # the flipped routes so far, stacked: (k * n, C, H, W) after the k-th flipped block
    for k, block in enumerate(net.blocks[1:]):
        taken = a[:, k]
        m = branches.shape[0] // n
        if k in flip_set:
            out = block.forward_masked(torch.cat([branches, h, h]), torch.cat([taken.repeat(m), taken, 1 - taken]))
            branches = torch.cat([out[:m * n], out[(m + 1) * n:]])
        else:
            out = block.forward_masked(torch.cat([branches, h]), torch.cat([taken.repeat(m), taken]))
            branches = out[:m * n]
        h = out[m * n:(m + 1) * n]
    count = len(flip_set)
    logits = net.fc(F.adaptive_avg_pool2d(torch.cat([branches, h]), 1).flatten(1))
    losses = F.cross_entropy(logits.float(), y.repeat(count + 1), reduction="none")
    return losses[-n:], losses[:-n].view(count, n).T


def execution_benefit(taken, flipped, actions):
    """b (N, S): CE with the block skipped minus CE with it executed, per image and block."""
    sign = 2 * actions.float() - 1  # +1 where the block ran (the flip skipped it), -1 where it was skipped
    return (flipped - taken.view(-1, 1)) * sign


def switch_targets(benefit, prices, tau):
    """The soft targets sigmoid((b - pi) / tau) (N, S) of the switches; prices (S,)."""
    return torch.sigmoid((benefit - prices) / tau)


class CounterfactualStep:
    """step_fn(model, x, y) -> (loss, stats) (the module docstring), `tau` the targets' temperature in
    cross-entropy units. stats' benefit and exec_target: per switch; with K < S, S / K x the drawn blocks'
    means, 0 elsewhere (unbiased over an epoch)."""

    def __init__(self, costs, price, tau, rl_weight, blocks=None, scale=1.0):
        self.costs, self.price, self.tau, self.rl_weight = costs, price, tau, rl_weight
        self.blocks, self.scale = blocks, scale
        self.costs_on = None  # gates.price.BlockCosts on the batch's device, made once

    def draw(self, num_switches):
        """The gated blocks flipped at this step (sorted), or None for all of them."""
        if self.blocks is None or self.blocks >= num_switches:
            return None
        return sorted(torch.randperm(num_switches)[:self.blocks].tolist())  # the global (CPU) RNG: no device sync

    def __call__(self, model, x, y):
        self.costs_on = BlockCosts.on(x.device, self.costs, self.costs_on)
        logits, actions, probs = model(x, "explore")
        actions = actions.detach()
        s = actions.shape[1]
        chosen = self.draw(s)
        taken, flipped = flip_losses(model, x, y, actions, chosen)
        with autocast_off(x.device.type), exact_fp32():
            ce = F.cross_entropy(logits if logits.dtype == torch.float32 else logits.float(), y)
            p = probs if probs.dtype == torch.float32 else probs.float()
            alpha = self.price.alpha.float()
            if chosen is None:
                weight, a, p_used, w = 1.0, actions, p, self.costs_on.shares
            else:
                idx = torch.tensor(chosen, device=x.device)
                weight, a, p_used, w = s / len(chosen), actions[:, idx], p[:, idx], self.costs_on.shares[idx]
            benefit = execution_benefit(taken, flipped, a)
            target = switch_targets(benefit, alpha * w, self.tau)
            # BCE(p, target) summed, as -log-likelihood: a NaN p makes the loss NaN (reported by the loss check)
            # where F.binary_cross_entropy would assert on CUDA
            switch_loss = -log_prob(p_used, target).sum() * weight
            if chosen is not None:  # a NaN p of a block not drawn this step makes the loss NaN too (no gradient)
                switch_loss = switch_loss + p.detach().sum() * 0
            loss = torch.add(ce, switch_loss, alpha=self.rl_weight * self.scale)
            with torch.no_grad():
                mean_benefit, mean_target = benefit.mean(0), target.mean(0)
                if chosen is not None:
                    mean_benefit = benefit.new_zeros(s).index_copy_(0, idx, mean_benefit * weight)
                    mean_target = target.new_zeros(s).index_copy_(0, idx, mean_target * weight)
                stats = {"loss": ce.detach(), "acc": accuracy(logits, y),
                         "switch_loss": switch_loss.detach(), "benefit": mean_benefit,
                         "exec_target": mean_target, **self.price.route_stats(self.costs_on, actions, probs)}
        return loss, stats

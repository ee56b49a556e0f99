"""Stage 3's counterfactual controller: every switch learns, per image, whether its block is worth its FLOPs.

For each training image i and gated block j, the step measures what executing the block buys that image:
the cross-entropy with block j skipped minus the cross-entropy with it executed, every other block on the
route the image took,

  benefit  b_ij = CE(x_i | route_i with a_j = 0) - CE(x_i | route_i with a_j = 1)

(one of the two is the route taken, the other the flipped one, run from block j's input onwards). Block j
costs the price pi_j = alpha * c_j / C (c_j its FLOPs, C all gated blocks' FLOPs, alpha as in REINFORCE:
the reward for skipping every gated block), so executing it pays for image i iff b_ij > pi_j. The switch
learns that decision as a soft target,

  switch loss    sum over images and switches of BCE(p_ij, sigmoid((b_ij - pi_j) / tau))

whose minimum is at logit(p_ij) = E[b_ij - pi_j | what the switch sees] / tau. The other action's loss on
the same image is the baseline of each decision: the signal is per image and per block, not a return shared
by the whole route and compared with an average over images, which is what buries the per-image signal in
REINFORCE at this scale. The target is bounded, so no logit runs off to saturation, and no update pushes
every image's logit the same way unless every image's benefit moves.

  total loss     CE (mean over the batch, on the sampled routes) + rl_weight * switch loss

Summed over images as REINFORCE's policy loss is (gates/policy.py), so that --rl_weight weighs each decision
the same under both controllers; under DDP each process sums over its own images, weighed by the number of
processes, so that the averaged gradient is the sum over the global batch, as on one process.

The backbone learns by cross-entropy only: in the model's `explore` mode the switches read their blocks'
inputs detached, and the decisions are drawn from p clamped to [explore_bound, 1 - explore_bound], so every
block keeps being trained on images that skip it and images that run it. The counterfactual passes run
without gradient in evaluation mode (BN running statistics: what the deployed network computes, and no
update of those statistics), in float32 with TF32 off: about S^2 / 2 block evaluations forward only for S
switches (flipping block j costs every block from j on), stacked so that they take S block calls.

Flipping every block at every step is the dearest part of the step (its cost: docs/speed.md).
`blocks` = K < S flips only K gated blocks per step, drawn uniformly without replacement (the global RNG,
seeded per epoch: a resumed run draws the same), and weighs their terms by S / K: the switch loss and its
gradient are unbiased estimates of the full ones, each image and block still has its own counterfactual
and its own baseline (the other action on the same image), and every switch is trained on average every
S / K steps. K = S is the full form.
alpha is fixed or adapted towards a GFLOPs target by gates.price.SkipPrice.

The probabilities are the switches' own; a NaN among them (a diverged network) reaches the loss at once
(with K < S too), whose check reports it, and never a kernel that asserts on it: the decisions are drawn from finite probabilities
(models.switches.act) and the switch loss is the Bernoulli log-likelihood written out, not
F.binary_cross_entropy (which asserts on CUDA on an input outside [0, 1], NaN included).
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
    with block j flipped, for every gated block j in `blocks` (sorted indices, K of them; None: all S); in
    evaluation mode (BN running statistics), masked execution, float32 even under bf16 autocast and with
    TF32 off on CUDA (the benefit is a small difference of two losses, which bf16's 8-bit or TF32's 11-bit
    mantissa would round by about the temperature of the targets). The model's training mode is restored
    after."""
    with executing(model, training=False) as net, autocast_off(x.device.type), exact_fp32():
        return _flip_losses(net, x, y, actions.to(torch.float32), blocks)


def _flip_losses(net, x, y, a, blocks=None):
    """The flipped routes and the taken one go through each block as one batch: branch j (block j flipped)
    joins at block j from the taken route's input there, and follows the taken actions after it. The same
    FLOPs as K separate passes from each flipped block on, in S block calls instead of about K * S / 2
    (evaluation-mode BN treats every image on its own, so stacking changes no image's result)."""
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
    losses = _ce(net, torch.cat([branches, h]), y.repeat(count + 1))
    return losses[-n:], losses[:-n].view(count, n).T


def _ce(net, h, y):
    logits = net.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
    return F.cross_entropy(logits.float(), y, reduction="none")


def execution_benefit(taken, flipped, actions):
    """b (N, S): CE with the block skipped minus CE with it executed, per image and block."""
    sign = 2 * actions.float() - 1  # +1 where the block ran (the flip skipped it), -1 where it was skipped
    return (flipped - taken.view(-1, 1)) * sign


def switch_targets(benefit, prices, tau):
    """The soft targets sigmoid((b - pi) / tau) (N, S) of the switches; prices (S,)."""
    return torch.sigmoid((benefit - prices) / tau)


class CounterfactualStep:
    """step_fn(model, x, y) -> (loss, stats) for runtime.stage.StageRun.fit. `price` a gates.price.SkipPrice
    (alpha), `tau` the temperature of the targets, in cross-entropy units; `blocks` the gated blocks
    flipped per step (None or >= S: all, the full form; K < S: K drawn per step, terms weighed by S / K);
    `scale` multiplies the switch loss in the total (under DDP the number of processes, so that the
    gradient DDP averages is that of the sum over the global batch, as on one process).

    stats: loss (the cross-entropy, which trains the backbone), acc (%, of the sampled routes), switch_loss
    (which trains the switches), benefit (mean over images of b per switch), exec_target (mean target per
    switch) and SkipPrice.route_stats' (exec_rate, sampled_gflops, greedy_gflops, alpha where it moves).
    With K < S, benefit and exec_target are per step S / K x the sampled blocks' means (0 elsewhere): their
    averages over an epoch estimate the full form's without bias."""

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

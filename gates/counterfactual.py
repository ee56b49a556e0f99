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
the same under both controllers; under DDP each process sums over its own images.

The backbone learns by cross-entropy only: in the model's `explore` mode the switches read their blocks'
inputs detached, and the decisions are drawn from p clamped to [explore_bound, 1 - explore_bound], so every
block keeps being trained on images that skip it and images that run it. The counterfactual passes run
without gradient in evaluation mode (BN running statistics: what the deployed network computes, and no
update of those statistics): about S^2 / 2 block evaluations forward only for S switches, stacked so
that they take S block calls. alpha is fixed or adapted towards a GFLOPs target by gates.policy.SkipPrice.
"""
import torch
import torch.nn.functional as F

from models.switches import autocast_off
from runtime.steps import accuracy
from utils.flops import skipped_flops


def unwrap(model):
    """The ResNet under torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


@torch.no_grad()
def flip_losses(model, x, y, actions):
    """(taken (N,), flipped (N, S)): per-image cross-entropy of the route `actions` (N, S) and of that route
    with block j flipped, for every gated block j; in evaluation mode (BN running statistics), masked
    execution, float32 even under bf16 autocast (the benefit is a small difference of two losses, which
    bf16's 8-bit mantissa would round by about the temperature of the targets). The model's training mode
    is restored after."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        with autocast_off(x.device.type):
            return _flip_losses(net, x, y, actions.to(torch.float32))
    finally:
        net.train(was_training)


def _flip_losses(net, x, y, a):
    """All S flipped routes and the taken one go through each block as one batch: branch j (block j flipped)
    joins at block j from the taken route's input there, and follows the taken actions after it. The same
    FLOPs as S separate passes from each block on, in S block calls instead of about S^2 / 2 (evaluation-mode
    BN treats every image on its own, so stacking changes no image's result)."""
    n = x.shape[0]
    h = net.blocks[0](F.relu(net.stem_bn(net.stem(x))))
    branches = h[:0]  # the flipped routes so far, stacked: (j * n, C, H, W) after block j
    for k, block in enumerate(net.blocks[1:]):
        taken, flip = a[:, k], 1 - a[:, k]
        m = branches.shape[0] // n
        out = block.forward_masked(torch.cat([branches, h, h]), torch.cat([taken.repeat(m), taken, flip]))
        branches = torch.cat([out[:m * n], out[(m + 1) * n:]])
        h = out[m * n:(m + 1) * n]
    losses = _ce(net, torch.cat([branches, h]), y.repeat(net.num_switches + 1))
    return losses[-n:], losses[:-n].view(net.num_switches, n).T


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
    """step_fn(model, x, y) -> (loss, stats) for runtime.stage.StageRun.fit. `price` a gates.policy.SkipPrice
    (alpha), `tau` the temperature of the targets, in cross-entropy units.

    stats: loss (the cross-entropy, which trains the backbone), acc (%, of the sampled routes), switch_loss
    (which trains the switches), benefit (mean over images of b per switch), exec_target (mean target per
    switch), exec_rate and sampled_gflops (of the sampled routes), greedy_gflops, and alpha where it moves
    (with a GFLOPs target)."""

    def __init__(self, costs, price, tau, rl_weight):
        self.costs, self.price, self.tau, self.rl_weight = costs, price, tau, rl_weight
        self.consts = None

    def _constants(self, device):
        blocks = torch.tensor(self.costs["blocks"], dtype=torch.float64)
        self.consts = {"w": (blocks / blocks.sum()).float().to(device), "blocks": (blocks / 1e9).to(device),
                       "always": torch.tensor(skipped_flops(self.costs) / 1e9,
                                              dtype=torch.float64, device=device)}

    def __call__(self, model, x, y):
        if self.consts is None or self.consts["w"].device != x.device:
            self._constants(x.device)
        k = self.consts
        logits, actions, probs = model(x, "explore")
        actions = actions.detach()
        taken, flipped = flip_losses(model, x, y, actions)
        with autocast_off(x.device.type):
            ce = F.cross_entropy(logits if logits.dtype == torch.float32 else logits.float(), y)
            benefit = execution_benefit(taken, flipped, actions)
            alpha = self.price.alpha.float()
            target = switch_targets(benefit, alpha * k["w"], self.tau)
            p = probs if probs.dtype == torch.float32 else probs.float()
            switch_loss = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), target, reduction="sum")
            loss = torch.add(ce, switch_loss, alpha=self.rl_weight)
            with torch.no_grad():
                exec_rate = actions.mean(0)
                greedy = k["always"] + (probs > 0.5).mean(0, dtype=torch.float64) @ k["blocks"]
                if self.price.target is not None:
                    self.price.update(greedy * 1e9)
                stats = {"loss": ce.detach(), "acc": accuracy(logits, y),
                         "switch_loss": switch_loss.detach(), "benefit": benefit.mean(0),
                         "exec_target": target.mean(0), "exec_rate": exec_rate,
                         "sampled_gflops": k["always"] + exec_rate.double() @ k["blocks"], "greedy_gflops": greedy}
                if self.price.target is not None:
                    stats["alpha"] = self.price.alpha
        return loss, stats

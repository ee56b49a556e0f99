"""Stage 3's training step: SkipNet's hybrid learning, REINFORCE for the switches.

Every switch samples a_i ~ Bernoulli(p_i) per image (`sample` mode). The backbone learns by cross-entropy
on the routes taken; the switches by the policy gradient of a per-image return:

  skip rewards   r_i = alpha * c_i / C  if block i is skipped, else 0   (c_i: that block's FLOPs,
                                                                          C: all gated blocks' FLOPs)
  final reward   r_final = -CE(image)  (detached), received after the last switch
  returns        R_{S+1} = r_final,  R_i = r_i + gamma * R_{i+1}   for i = S .. 1
  policy loss    -sum over the images of this process's batch of sum_i log pi(a_i) * (R_i - b_i)
  total loss     CE (mean over the batch) + rl_weight * policy loss

The policy loss is summed over images, as in SkipNet's code, where the original flags come from (why, and how
DDP weighs it: docs/stages.md). alpha: fixed or gates.price.SkipPrice's. The baseline b_i is per switch
(Baseline, saved in the checkpoint); nothing is stored in the modules between forward and backward, so the
step works under DDP.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gates.price import BlockCosts, SkipPrice
from models.switches import autocast_off, log_prob
from runtime.steps import accuracy
from utils.dist import all_reduce_sum, exact_fp32

BASELINES = ("moving", "batch")


def skip_rewards(actions, shares, alpha):
    """(N, S) immediate rewards: alpha * w_i for every skipped block i, else 0 (`shares`: the w_i)."""
    return alpha * (1 - actions) * shares


def discounts(gamma, switches, device=None):
    """D (S + 1, S): D[k, i] = gamma^(k - i) for k >= i, else 0, the weight of reward k (k = S: the final
    reward) in switch i's return. torch.pow(0, 0) = 1, so gamma = 0 leaves R_i = r_i."""
    k = torch.arange(switches + 1, dtype=torch.float32, device=device)
    lag = k.view(-1, 1) - k.view(1, -1)  # lag[k, i] = k - i: how many steps after switch i reward k comes
    return torch.where(lag >= 0, torch.pow(float(gamma), lag.clamp(min=0)), 0.0)[:, :switches]


def discounted_returns(rewards, discount, final):
    """Returns R (N, S) of rewards (N, S) and the final reward (N,), as one matrix product with D = discounts."""
    return torch.cat([rewards, final.view(-1, 1)], dim=1) @ discount


def policy_loss(log_probs, returns, baseline):
    """-sum over images and switches of log pi(a_i) * (R_i - b_i) (SkipNet's per-image convention, above);
    log_probs and returns (N, S), baseline (S,); the advantage carries no gradient."""
    return (log_probs * (baseline - returns).detach()).sum()


class Baseline:
    """Per-switch baseline b_i of the returns. moving: an exponential moving average over the batches before
    this one (the first batch: its own mean), averaged over DDP ranks so that rank 0's checkpoint resumes
    all; batch: this process's batch mean of each switch, no state (needs 2 or more images per batch)."""

    def __init__(self, kind, num_switches, momentum=0.9, device="cpu"):
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r} (expected one of {BASELINES})")
        self.kind, self.momentum = kind, momentum
        self.value = torch.zeros(num_switches, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, returns):
        """b (S,) for this batch's returns (N, S); advances the moving average."""
        mean = returns.detach().mean(0)
        if self.kind == "batch":
            if returns.shape[0] < 2:  # a shape, no host sync; the stage refuses such a --bs up front
                raise ValueError("the batch baseline of a one-image batch is its own return: zero advantage")
            return mean
        mean = all_reduce_sum(mean) / (dist.get_world_size() if dist.is_initialized() else 1)
        b = torch.where(self.steps > 0, self.value, mean)  # tensor ops: no host sync per step
        self.value = self.momentum * b + (1 - self.momentum) * mean
        self.steps = self.steps + 1
        return b

    def state_dict(self):
        return {"kind": self.kind, "momentum": self.momentum, "value": self.value.cpu(),
                "steps": self.steps.cpu()}

    def load_state_dict(self, state):
        """Restore a moving average; a checkpoint of the other kind (or none) starts it afresh."""
        if state and state.get("kind") == self.kind == "moving":
            self.value = state["value"].to(self.value.device, self.value.dtype)
            self.steps = state["steps"].to(self.steps.device)


class ReinforceStep:
    """step_fn(model, x, y) -> (loss, stats): the arithmetic above. `price` a gates.price.SkipPrice or a fixed
    alpha; stats' reward: the mean over images of all rewards, undiscounted."""

    def __init__(self, costs, price, gamma, rl_weight, baseline, scale=1.0):
        self.price = price if isinstance(price, SkipPrice) else SkipPrice(price)
        self.costs, self.gamma, self.rl_weight, self.baseline = costs, gamma, rl_weight, baseline
        self.scale = scale  # under DDP the number of processes: the averaged gradient is the global batch's sum
        self.blocks = self.discount = None  # BlockCosts and discounts(gamma, S) on the batch's device, made once

    def __call__(self, model, x, y):
        if self.blocks is None or self.blocks.device != x.device:
            self.blocks = BlockCosts(self.costs, x.device)
            self.discount = discounts(self.gamma, len(self.costs["blocks"]), x.device)
        logits, actions, probs = model(x, "sample")
        actions = actions.detach()  # sampled: no gradient, but a hooked model might pass one
        # float32 with TF32 off whatever --tf32 allows (bf16 would round the returns to 3 digits, TF32 to 4)
        with autocast_off(x.device.type), exact_fp32():
            ce = F.cross_entropy(logits if logits.dtype == torch.float32 else logits.float(), y, reduction="none")
            ce_mean, ce_image = ce.mean(), ce.detach()
            rewards = skip_rewards(actions, self.blocks.shares, self.price.alpha)
            returns = discounted_returns(rewards, self.discount, -ce_image)  # the final reward: -CE
            p_loss = policy_loss(log_prob(probs if probs.dtype == torch.float32 else probs.float(), actions),
                                 returns, self.baseline(returns))
            loss = torch.add(ce_mean, p_loss, alpha=self.rl_weight * self.scale)
            with torch.no_grad():  # statistics: no graph
                ce_batch = ce_image.mean()
                stats = {"loss": ce_batch, "acc": accuracy(logits, y), "reward": rewards.sum(1).mean() - ce_batch,
                         "policy_loss": p_loss.detach(), **self.price.route_stats(self.blocks, actions, probs)}
        return loss, stats

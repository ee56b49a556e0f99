"""Stage 3's training step: SkipNet's hybrid learning, REINFORCE for the switches.

Every switch samples a_i ~ Bernoulli(p_i) per image (the model's `sample` mode). The backbone learns by
cross-entropy on the routes taken (masked execution carries no gradient to the switches); the switches
learn by the policy gradient of a per-image return:

  skip rewards   r_i = alpha * c_i / C  if block i is skipped, else 0   (c_i: that block's FLOPs,
                                                                          C: all gated blocks' FLOPs)
  final reward   r_final = -CE(image)  (detached), received after the last switch
  returns        R_{S+1} = r_final,  R_i = r_i + gamma * R_{i+1}   for i = S .. 1
                 i.e. R_i = sum_{j >= i} gamma^(j-i) r_j + gamma^(S+1-i) r_final
                 (the last switch gets R_S = r_S + gamma * r_final; with gamma = 1, as in the seed
                 command, the final reward reaches every switch undiscounted)
  policy loss    -mean over images of sum_i log pi(a_i) * (R_i - b_i)
  total loss     CE + rl_weight * policy loss

The baseline b_i is per switch: a moving average of the returns (state kept in a Baseline object outside
the model, saved in the checkpoint so that a resumed run continues exactly) or the batch mean.
Nothing is stored in the modules between forward and backward, so the step works under DDP.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gates.switches import log_prob
from utils.dist import all_reduce_sum

BASELINES = ("moving", "batch")


def skip_rewards(actions, block_flops, alpha):
    """(N, S) immediate rewards: alpha * c_i / C for every skipped block (actions 0 = skipped)."""
    c = torch.as_tensor(block_flops, device=actions.device).double()
    return (alpha * (1 - actions.detach().double()) * (c / c.sum())).float()


def discounted_returns(rewards, gamma, final):
    """Returns R (N, S) of rewards (N, S) and the final reward (N,) received after the last switch:
    R_{S+1} = final, R_i = r_i + gamma * R_{i+1}. One matrix product, no loop over images or switches."""
    s = rewards.shape[1]
    i = torch.arange(s + 1, device=rewards.device, dtype=torch.float32)
    lag = i.view(1, -1) - i.view(-1, 1)  # lag[j, k] = k - j: how many steps after switch j reward k comes
    # gamma ** lag for k >= j, else 0 (torch.pow(0, 0) = 1, so gamma = 0 leaves R_i = r_i)
    discount = torch.where(lag >= 0, torch.pow(float(gamma), lag.clamp(min=0)), 0.0)
    all_rewards = torch.cat([rewards.float(), final.float().view(-1, 1)], dim=1)  # (N, S + 1)
    return (all_rewards @ discount.T)[:, :s]


def policy_loss(log_probs, returns, baseline):
    """-mean over images of sum_i log pi(a_i) * (R_i - b_i); the advantage carries no gradient."""
    advantage = (returns - baseline).detach()
    return -(log_probs * advantage).sum(1).mean()


class Baseline:
    """Per-switch baseline b_i of the returns.

    moving: an exponential moving average over batches; the batch being trained on is compared with the
            average of the batches before it (the first batch with its own mean). Averaged over DDP ranks,
            so every rank holds the same state and the checkpoint of rank 0 resumes all of them.
    batch:  the mean return of each switch over the current batch; keeps no state.
    """

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
    """step_fn(model, x, y) -> (loss, stats) for utils.stage.StageRun.fit.

    stats (per batch; the engine averages them over the epoch): loss (total), ce, acc, reward (mean over
    images of all rewards received, undiscounted), policy_loss, exec_rate (per switch, of the sampled
    routes) and gflops (per image, of the sampled routes, switches and rotations included)."""

    def __init__(self, costs, alpha, gamma, rl_weight, baseline):
        self.costs, self.alpha, self.gamma, self.rl_weight = costs, alpha, gamma, rl_weight
        self.baseline = baseline
        self.blocks = None  # the blocks' FLOPs on the batch's device, made once

    def __call__(self, model, x, y):
        if self.blocks is None:
            self.blocks = torch.tensor(self.costs["blocks"], dtype=torch.float64, device=x.device)
        logits, actions, probs = model(x, "sample")
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        final = -ce.detach()
        rewards = skip_rewards(actions, self.blocks, self.alpha)
        returns = discounted_returns(rewards, self.gamma, final)
        p_loss = policy_loss(log_prob(probs.float(), actions.float()), returns, self.baseline(returns))
        loss = ce.mean() + self.rl_weight * p_loss
        flops = self.costs["base"] + self.costs["switches"] + actions.detach().double() @ self.blocks
        stats = {"loss": loss.detach(), "ce": ce.detach().mean(), "acc": (logits.argmax(1) == y).float().mean(),
                 "reward": rewards.sum(1).mean() + final.mean(), "policy_loss": p_loss.detach(),
                 "exec_rate": actions.detach().float().mean(0), "gflops": flops.mean() / 1e9}
        return loss, stats

"""Stage 3's training step: SkipNet's hybrid learning, REINFORCE for the switches.

Every switch samples a_i ~ Bernoulli(p_i) per image (the model's `sample` mode). The backbone learns by
cross-entropy on the routes taken (masked execution carries no gradient to the switches); the switches
learn by the policy gradient of a per-image return:

  skip rewards   r_i = alpha * c_i / C  if block i is skipped, else 0   (c_i: that block's FLOPs,
                                                                          C: all gated blocks' FLOPs)
  final reward   r_final = -CE(image)  (detached), received after the last switch
  returns        R_{S+1} = r_final,  R_i = r_i + gamma * R_{i+1}   for i = S .. 1
                 i.e. R_i = sum_{j >= i} gamma^(j-i) r_j + gamma^(S+1-i) r_final
                 (the last switch gets R_S = r_S + gamma * r_final; with gamma = 1, as in the original
                 command, the final reward reaches every switch undiscounted)
  policy loss    -sum over the images of this process's batch of sum_i log pi(a_i) * (R_i - b_i)
  total loss     CE (mean over the batch) + rl_weight * policy loss

The policy loss is summed over images, not averaged: SkipNet's code, where the original flags (alpha 0.1,
gamma 1, rl_weight 0.1) come from, gives every sampled action its own REINFORCE gradient
(`action.reinforce(rl_weight * R)`), so rl_weight there weighs each image's term; averaging would make it
batch-size times weaker (256x at the original --bs 256) and the switches would barely move in 100 epochs.
Under DDP each process sums over its own images, the sum weighed by the number of processes (`scale`), so
that the gradients DDP averages add up to the sum over the global batch (--bs), as on one process.

alpha is the price of skipping, fixed (--alpha) or adapted by dual ascent towards a GFLOPs target
(SkipPrice below).

The baseline b_i is per switch: a moving average of the returns (state kept in a Baseline object outside
the model, saved in the checkpoint so that a resumed run continues exactly) or the batch mean.
Nothing is stored in the modules between forward and backward, so the step works under DDP.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.switches import autocast_off, log_prob
from runtime.steps import accuracy
from utils.dist import all_reduce_sum, exact_fp32
from utils.flops import skipped_flops

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
    """-sum over images (N) and switches (S) of log pi(a_i) * (R_i - b_i): SkipNet's per-image REINFORCE
    convention (see above); log_probs and returns (N, S), baseline (S,). The advantage carries no gradient."""
    advantage = (returns - baseline).detach()
    return -(log_probs * advantage).sum()


class Baseline:
    """Per-switch baseline b_i of the returns.

    moving: an exponential moving average over batches; the batch being trained on is compared with the
            average of the batches before it (the first batch with its own mean). Averaged over DDP ranks,
            so every rank holds the same state and the checkpoint of rank 0 resumes all of them.
    batch:  the mean return of each switch over the current batch (this process's, not averaged over
            ranks); keeps no state. It needs 2 or more images per batch: one image's mean is its own
            return, every advantage 0, and REINFORCE would do nothing.
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


class SkipPrice:
    """alpha, the reward for skipping every gated block (per image), as a tensor on the device.

    Fixed (target None): the --alpha of the command line. With a target of G FLOPs per image, alpha is the
    dual variable of the constraint "FLOPs executed per image = G" and rises while the network spends more
    than G, falls while it spends less. The update is dual ascent in log alpha (exponentiated gradient),
    scale-free since the right alpha ranges over orders of magnitude:
        alpha <- alpha * exp(lr * (F - G) / G)
    F is the FLOPs per image of the *greedy* routes (p > 0.5: what the deployed model runs) on the batch
    just trained on, averaged over processes, so every process holds the same alpha. The switches'
    probabilities come from the sampled forward pass (the greedy route of the later switches is estimated
    along the sampled route: no second forward pass). Sampled routes would be the wrong measure: with p
    near 0.5 they execute about p of the blocks while greedy execution can be all or nothing.
    The state (alpha, steps) goes into the checkpoint, so a resumed run continues the trajectory exactly."""

    def __init__(self, alpha, target_flops=None, lr=0.05, device="cpu"):
        if target_flops is not None and not (alpha > 0 and target_flops > 0):
            raise ValueError("a FLOPs target needs alpha > 0 and target > 0")
        self.target, self.lr = target_flops, lr
        self.alpha = torch.tensor(float(alpha), dtype=torch.float64, device=device)

    def update(self, greedy_flops):
        """One dual-ascent step from the greedy FLOPs per image (N,) of the batch just trained on."""
        if self.target is None:
            return
        mean = greedy_flops.double().mean()
        if dist.is_initialized():
            mean = all_reduce_sum(mean.clone()) / dist.get_world_size()
        self.alpha = self.alpha * torch.exp(self.lr * (mean - self.target) / self.target)

    def state_dict(self):
        return {"alpha": self.alpha.cpu(), "target_flops": self.target, "lr": self.lr}

    def load_state_dict(self, state):
        """Continue the trajectory of a checkpoint made with the same target; otherwise start at --alpha."""
        if state and state.get("target_flops") == self.target and self.target is not None:
            self.alpha = state["alpha"].to(self.alpha.device, torch.float64)


class ReinforceStep:
    """step_fn(model, x, y) -> (loss, stats) for runtime.stage.StageRun.fit.

    stats (per batch; train_epoch averages them over the epoch): loss (the cross-entropy, which trains the
    backbone), acc (%), reward (mean over images of all rewards received, undiscounted), policy_loss (summed
    over the batch, which trains the switches), exec_rate (per switch, of the sampled routes),
    sampled_gflops (per image, of the sampled routes, switches and rotations included), greedy_gflops (per
    image, greedy decisions along the sampled routes), and alpha where it moves (with a GFLOPs target).
    `price` is a SkipPrice (or a number: a fixed alpha).

    The arithmetic is that of skip_rewards, discounted_returns and policy_loss above, folded into constants
    made once (the step's host time is its op count, not its FLOPs): with w = block FLOPs / their sum and
    K[j, i] = w_j gamma^(j - i) (j >= i), the returns are alpha (1 - a) K - CE gamma^(S - i)."""

    def __init__(self, costs, price, gamma, rl_weight, baseline, scale=1.0):
        self.price = price if isinstance(price, SkipPrice) else SkipPrice(price)
        self.costs, self.gamma, self.rl_weight = costs, gamma, rl_weight
        self.scale = scale  # under DDP the number of processes: the averaged gradient is the global batch's sum
        self.baseline = baseline
        self.consts = None  # the tensors below, on the batch's device, made once

    def _constants(self, device):
        blocks = torch.tensor(self.costs["blocks"], dtype=torch.float64)
        s = len(blocks)
        w = (blocks / blocks.sum()).float()
        i = torch.arange(s + 1, dtype=torch.float32)
        lag = i.view(1, -1) - i.view(-1, 1)  # lag[j, k] = k - j, as in discounted_returns
        discount = torch.where(lag >= 0, torch.pow(float(self.gamma), lag.clamp(min=0)), 0.0)
        k = w.view(-1, 1) * discount[:s, :s].T  # K[j, i] = w_j gamma^(j - i) for j >= i
        always = skipped_flops(self.costs) / 1e9
        self.consts = {"k": k.to(device), "k_sum": k.sum(0).to(device), "final": discount[:s, s].to(device),
                       "w": w.to(device), "blocks": (blocks / 1e9).to(device),
                       "always": torch.tensor(always, dtype=torch.float64, device=device)}

    def __call__(self, model, x, y):
        if self.consts is None or self.consts["k"].device != x.device:
            self._constants(x.device)
        k = self.consts
        logits, actions, probs = model(x, "sample")
        if actions.requires_grad:  # sampled: never, but a hooked model might
            actions = actions.detach()
        alpha = self.price.alpha
        # float32 with TF32 off whatever --tf32 allows (bf16 would round the returns to 3 digits, TF32 to 4)
        with autocast_off(x.device.type), exact_fp32():
            ce = F.cross_entropy(logits if logits.dtype == torch.float32 else logits.float(), y, reduction="none")
            ce_mean, final = ce.mean(), ce.detach()
            # R = alpha (1 - a) K - CE x gamma^(S - i): skip rewards and final reward -CE, discounted
            returns = torch.addcmul(alpha * (k["k_sum"] - actions @ k["k"]), final.view(-1, 1), k["final"], value=-1)
            p_loss = (log_prob(probs if probs.dtype == torch.float32 else probs.float(), actions)
                      * (self.baseline(returns) - returns)).sum()  # policy_loss: -sum log pi (R - b)
            loss = torch.add(ce_mean, p_loss, alpha=self.rl_weight * self.scale)
            with torch.no_grad():  # statistics: no graph, so no detach ops
                exec_rate = actions.mean(0)
                greedy = k["always"] + (probs > 0.5).mean(0, dtype=torch.float64) @ k["blocks"]  # GFLOPs/image
                if self.price.target is not None:
                    self.price.update(greedy * 1e9)
                stats = {"loss": final.mean(), "acc": accuracy(logits, y),
                         # the mean over images of all rewards received: alpha (1 - a . w) - CE (w sums to 1)
                         "reward": alpha * (1 - exec_rate @ k["w"]) - ce_mean, "policy_loss": p_loss.detach(),
                         "exec_rate": exec_rate, "sampled_gflops": k["always"] + exec_rate.double() @ k["blocks"],
                         "greedy_gflops": greedy}
                if self.price.target is not None:
                    stats["alpha"] = alpha
        return loss, stats

"""The price of running the gated blocks, shared by every stage-3 controller (counterfactual, reinforce,
gumbel): alpha, in cross-entropy units per image for running every gated block (block j's share: its FLOPs
over all gated blocks' FLOPs), fixed or adapted towards a GFLOPs target."""
import torch
import torch.distributed as dist

from utils.dist import all_reduce_sum
from utils.flops import from_gflops, skipped_flops, to_gflops


def shares(block_flops):
    """w (S,): each gated block's FLOPs over all gated blocks' (float32, sums to 1)."""
    c = torch.as_tensor(block_flops, dtype=torch.float64)
    return (c / c.sum()).float()


class BlockCosts:
    """A step's FLOPs costs on one device, made once: `shares` and the GFLOPs of routes (gflops)."""

    def __init__(self, costs, device):
        blocks = torch.tensor(costs["blocks"], dtype=torch.float64)
        self.shares = shares(blocks).to(device)
        self.device = self.shares.device
        self.blocks = to_gflops(blocks).to(device)
        self.always = torch.tensor(to_gflops(skipped_flops(costs)), dtype=torch.float64, device=device)

    @staticmethod
    def on(device, costs, made=None):
        """`made` (a BlockCosts or None) if it is on `device`, else `costs`' there: a step's, made once."""
        return made if made is not None and made.device == device else BlockCosts(costs, device)

    def gflops(self, rates):
        """GFLOPs per image (float64) of routes that run gated block j on a fraction rates[j] of the images."""
        return self.always + rates.double() @ self.blocks


class SkipPrice:
    """alpha, the reward for skipping every gated block (per image), as a tensor on the device: fixed (target
    None), or the dual variable of "FLOPs executed per image = G" (docs/stages.md, --target_gflops), by dual
    ascent in log alpha (scale-free: the right alpha spans orders of magnitude):
        alpha <- alpha * exp(lr * (F - G) / G)
    F the greedy routes' FLOPs per image, averaged over processes, estimated along the sampled routes (no second
    forward pass); sampled routes would be the wrong measure (with p near 0.5 they run about p of the blocks,
    greedy ones all or none)."""

    def __init__(self, alpha, target_flops=None, lr=0.05, device="cpu"):
        if target_flops is not None and not (alpha > 0 and target_flops > 0):
            raise ValueError("a FLOPs target needs alpha > 0 and target > 0")
        self.target, self.lr = target_flops, lr
        self.alpha = torch.tensor(float(alpha), dtype=torch.float64, device=device)

    def update(self, greedy_flops):
        """One dual-ascent step from the greedy FLOPs per image (N,) of the batch just trained on."""
        if self.target is None:
            return
        mean = all_reduce_sum(greedy_flops.double().mean()) / (dist.get_world_size() if dist.is_initialized() else 1)
        self.alpha = self.alpha * torch.exp(self.lr * (mean - self.target) / self.target)

    def state_dict(self):
        return {"alpha": self.alpha.cpu(), "target_flops": self.target, "lr": self.lr}

    def load_state_dict(self, state):
        """Continue the trajectory of a checkpoint made with the same target; otherwise start at --alpha."""
        if state and state.get("target_flops") == self.target and self.target is not None:
            self.alpha = state["alpha"].to(self.alpha.device, torch.float64)

    def route_stats(self, costs, actions, probs):
        """What every controller reports of a step's routes `actions`: exec_rate, sampled_gflops, greedy_gflops (what
        the deployed model runs) and alpha with a target; then the dual-ascent step. `costs`: a BlockCosts."""
        with torch.no_grad():  # statistics: no graph, so no detach ops
            exec_rate = actions.detach().mean(0)
            greedy = costs.gflops((probs > 0.5).mean(0, dtype=torch.float64))
            stats = {"exec_rate": exec_rate, "sampled_gflops": costs.gflops(exec_rate), "greedy_gflops": greedy}
            if self.target is not None:
                stats["alpha"] = self.alpha
                self.update(from_gflops(greedy))
        return stats

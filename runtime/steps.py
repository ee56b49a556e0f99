"""The step functions every stage uses (`step_fn(model, x, y) -> (loss, stats)`, run by train_epoch). stats:
"loss" the cross-entropy that trains the network (the switches' own loss has its own name), accuracies in
percent, execution rates fractions of the images."""
import torch
import torch.nn.functional as F

from utils.nets import unwrap


def supervised_step(model, x, y, mode="hard"):
    """Cross-entropy on the routes taken in `mode` ("hard", "greedy"), or of the dense network ("open")."""
    logits, actions, _ = model(x, mode)
    loss = F.cross_entropy(logits, y)
    with torch.no_grad():  # statistics: no graph, so no detach ops
        stats = {"loss": loss.detach(), "acc": accuracy(logits, y)}
        if mode != "open":  # every block runs in open mode: a rate of 1 would say nothing
            stats["exec_rate"] = actions.mean(0)
        return loss, stats


def accuracy(logits, y):
    """Top-1 accuracy of a batch in percent, the unit of every accuracy a run reports (evaluation's too)."""
    return (logits.argmax(1) == y).sum(dtype=torch.float32) * (100.0 / len(y))


def touch_switches(model, loss):
    """loss + 0 x the switches' parameters, so that DDP finds every parameter used where the switches don't train."""
    return loss + 0 * sum(p.sum() for p in unwrap(model).switches.parameters())


def dense_step(model, x, y):
    """Plain dense training: every block, no switch evaluated (touch_switches: DDP finds every parameter)."""
    loss, stats = supervised_step(model, x, y, mode="open")
    return touch_switches(model, loss), stats

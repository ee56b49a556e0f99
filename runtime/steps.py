"""The step functions every stage uses (a step: `step_fn(model, x, y) -> (loss, stats)`, run by
runtime/loop.train_epoch)."""
import torch
import torch.nn.functional as F


def supervised_step(model, x, y, mode="hard"):
    """Cross-entropy on the routes the switches take in `mode` (stages 1 and 2: "hard"; stage 3's route
    fine-tuning: "greedy"), or, mode "open", of the dense network, switches untouched."""
    logits, actions, _ = model(x, mode)
    loss = F.cross_entropy(logits, y)
    with torch.no_grad():  # statistics: no graph, so no detach ops
        return loss, {"loss": loss.detach(), "acc": (logits.argmax(1) == y).mean(dtype=torch.float32),
                      "exec_rate": actions.mean(0)}



def touch_switches(model, loss):
    """loss + 0 x the switches' parameters, for steps where the switches take no part in the loss (dense
    training, the route fine-tuning): DistributedDataParallel then finds every parameter used."""
    switches = getattr(model, "module", model).switches
    return loss + 0 * sum(p.sum() for p in switches.parameters())



def dense_step(model, x, y):
    """Plain dense training: every block, no switch evaluated. The switches' parameters enter the loss with
    weight 0, so that DistributedDataParallel finds every parameter used."""
    loss, stats = supervised_step(model, x, y, mode="open")
    return touch_switches(model, loss), stats

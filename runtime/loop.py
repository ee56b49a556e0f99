"""The epoch loop of all three stages (train_epoch: a `step_fn(model, x, y) -> (loss, stats)` of runtime/steps.py
over one epoch, stopping on a NaN or inf loss) and what sets a run up."""
import contextlib
import math

import torch
from torch.nn.parallel import DistributedDataParallel

from utils.dist import all_reduce_sum, broadcast_tensors
from utils.errors import UserError
from utils.faults import kill_point
from utils.log import progress
from utils.nets import unwrap


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def seed_epoch(ctx, epoch):
    """The global RNG seeded by (seed, epoch, rank) alone: a resumed run draws what the uninterrupted one drew."""
    torch.manual_seed(ctx.seed * 1_000_003 + epoch * 7919 + ctx.rank)


def autocast(ctx):
    """bf16 autocast on the run's device type (CPU too) when the run asked for it (ctx.amp)."""
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16) if ctx.amp else contextlib.nullcontext()


def prepare(model, ctx):
    """Move to the device in the run's memory format and wrap in DDP under torchrun. Returns (model, ddp): the
    plain module (checkpoints, FLOPs) and what the step calls."""
    model = model.to(ctx.device, memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
    if not ctx.distributed:
        return model, model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=ids)


def sgd(params, lr, momentum, weight_decay):
    """The optimizer of every stage: SGD, nesterov when momentum > 0. `params`: parameters or groups."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)


def make_scheduler(optimizer, name, epochs, steps_per_epoch):
    """Per-step schedules, so that a short run still sees the whole curve."""
    total = max(1, epochs * steps_per_epoch)
    schedules = {"cosine": lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)),
                 "step": lambda s: 0.1 ** ((s >= 0.5 * total) + (s >= 0.75 * total)),  # x0.1 at 50% and 75%
                 "constant": lambda s: 1.0}
    if name not in schedules:
        raise UserError(f"unknown --scheduler {name!r} (expected cosine, step or constant)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules[name])


def train_epoch(ddp, loader, optimizer, scheduler, step_fn, ctx, epoch, desc="train"):
    ddp.train()
    sums, n = {}, 0
    none_bad = 2**62
    first_bad = torch.tensor(none_bad, device=ctx.device)  # first step whose loss was NaN/inf, kept on device
    bar = progress(loader, ctx.is_main, desc=f"{desc} {epoch + 1}")
    for step, (x, y) in enumerate(bar):
        kill_point("step", epoch + 1, step + 1)
        with autocast(ctx):
            loss, stats = step_fn(ddp, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        # Bookkeeping in a few ops on the device (each op costs host time, each .item() a sync): the stats
        # summed by one foreach add, and a non-finite loss caught at the next sync point.
        with torch.no_grad():
            if sums:
                torch._foreach_add_(list(sums.values()), [stats[k] for k in sums])
            else:
                sums = {k: v.detach().float().clone() for k, v in stats.items()}
            first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(loss), none_bad, step))
        n += 1
        if step % 25 == 0 or step == len(loader) - 1:
            if first_bad.item() < none_bad:
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}, step "
                                       f"{first_bad.item() + 1}; stopped, last good checkpoint kept")
            bar.set_postfix(loss=f"{sums['loss'].item() / n:.3f}")
    # DDP hands rank 0's buffers (BatchNorm running statistics) to every rank at each training forward, and
    # the last one then updates each rank's with its own batch: the epoch ends with rank 0's on every rank,
    # the network the checkpoint saves, so that an evaluation over all ranks' shares is of that network
    if ctx.distributed:
        broadcast_tensors(list(unwrap(ddp).buffers()))
    out = {}  # means over all batches of all ranks; scalars become floats, vectors lists
    for k, v in sums.items():
        t = all_reduce_sum(torch.cat([v.flatten(), v.new_tensor([n])]))
        mean = t[:-1] / t[-1]
        out[k] = mean.item() if v.dim() == 0 else mean.tolist()
    return out


def summary_line(stage, epoch, epochs, train, ev, seconds, lr, name="routed"):
    """One line per epoch; `name`: the network evaluated (dense: every block; routed: the greedy routes)."""
    rate = sum(ev["exec_rate"]) / max(1, len(ev["exec_rate"]))
    return (f"[{stage}] epoch {epoch}/{epochs}  train loss {train['loss']:.3f} acc {train['acc']:.2f}%  "
            f"| eval {name} acc {ev['acc']:.2f}% loss {ev['loss']:.3f}  {ev['gflops']:.3f} GFLOPs/img  "
            f"exec {100 * rate:.0f}%  lr {lr:.2e}  {seconds:.0f}s")

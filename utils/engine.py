"""The training / evaluation loop shared by all three stages.

A stage supplies a `step_fn(model, x, y) -> (loss, stats)` (stats: dict of scalar or per-switch tensors,
averaged over the epoch) and gets back per-epoch training stats, evaluation results with the GFLOPs each
image really executed, TensorBoard curves, a tqdm bar (on a terminal), a one-line summary per epoch and an atomic
checkpoint per epoch.
"""
import contextlib
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from utils.dist import all_reduce_sum
from utils.flops import dense_flops
from utils.errors import UserError
from utils.faults import kill_point
from utils.files import atomic_write


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def progress(iterable, enabled=True, **kw):
    """A tqdm bar, only when stderr is a terminal: in a log file (nohup, a batch scheduler) every refresh
    would be written as one more fragment. The one-line summaries are printed either way."""
    return tqdm(iterable, leave=False, dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()), **kw)


def seed_epoch(ctx, epoch):
    """The global RNG (switch sampling, anything else random in a step) depends only on (seed, epoch,
    rank): a run resumed at epoch e draws exactly what the uninterrupted run drew."""
    torch.manual_seed(ctx.seed * 1_000_003 + epoch * 7919 + ctx.rank)


def autocast(ctx):
    """bf16 autocast on the run's device type (CPU too) when the run asked for it (ctx.amp)."""
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16) if ctx.amp else contextlib.nullcontext()


def prepare(model, ctx):
    """Move to the device in the run's memory format (ctx.channels_last, else NCHW) and wrap in DDP under
    torchrun. Returns (model, ddp): `model` is the plain module (for checkpoints, FLOPs), `ddp` what the
    step calls."""
    model = model.to(ctx.device, memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
    if not ctx.distributed:
        return model, model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=ids)


def make_scheduler(optimizer, name, epochs, steps_per_epoch):
    """Per-step schedules, so that a short run still sees the whole curve."""
    total = max(1, epochs * steps_per_epoch)
    if name == "cosine":
        f = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    elif name == "step":  # x0.1 at 50% and 75% of training
        f = lambda s: 0.1 ** ((s >= 0.5 * total) + (s >= 0.75 * total))
    elif name == "constant":
        f = lambda s: 1.0
    else:
        raise UserError(f"unknown --scheduler {name!r} (expected cosine, step or constant)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


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
    return reduce_means(sums, n)


def reduce_means(sums, n):
    """Means over all batches of all ranks; scalars become floats, vectors lists."""
    out = {}
    for k, v in sums.items():
        t = all_reduce_sum(torch.cat([v.flatten(), v.new_tensor([n])]))
        mean = t[:-1] / t[-1]
        out[k] = mean.item() if v.dim() == 0 else mean.tolist()
    return out


@torch.no_grad()
def evaluate(ddp, loader, ctx, costs, mode="hard", desc="eval", execution=None):
    """Top-1 accuracy, loss and the FLOPs each image's route executes (greedy switches), over every image of
    `loader` (all ranks together). `execution`: how the gated blocks run; None: the model's own setting
    (skipping at inference); "skip": each block runs on the sub-batch that executes it, so the time saved is
    real, at one host sync per gated block and batch (to size the sub-batch); "mask": every image computes
    every block and its decision selects the output: the same decisions, accuracy and GFLOPs (up to the
    float rounding of a sub-batch's convolutions), and no host sync until the end (per-epoch evaluation).
    GFLOPs count the blocks each route executes, whichever execution."""
    model = getattr(ddp, "module", ddp)
    model.eval()
    before, benchmark = model.execution, torch.backends.cudnn.benchmark
    if execution is not None:
        model.execution = execution
    if model.execution != "mask":
        # skipping runs each gated block on a sub-batch whose size changes with every batch: cudnn.benchmark
        # would autotune every new shape (most of an evaluation pass) for kernels used once
        torch.backends.cudnn.benchmark = False
    sums, images = None, 0
    try:
        for x, y in progress(loader, ctx.is_main, desc=desc):
            with autocast(ctx):
                logits, actions, _ = model(x, mode)
            batch = torch.cat([torch.stack([(logits.argmax(1) == y).sum(dtype=torch.float64),
                                            F.cross_entropy(logits.float(), y, reduction="sum").double()]),
                               actions.sum(0, dtype=torch.float64)])
            sums = batch if sums is None else sums.add_(batch)
            images += x.shape[0]  # counted on the host: no tensor made (and copied) per batch
    finally:
        model.execution, torch.backends.cudnn.benchmark = before, benchmark
    if sums is None:  # a rank without images still joins the sum
        sums = torch.zeros(2 + model.num_switches, dtype=torch.float64, device=ctx.device)
    total = all_reduce_sum(torch.cat([sums, sums.new_tensor([images])])).tolist()  # the one sync
    correct, ce, executed, n = total[0], total[1], total[2:-1], total[-1]
    if mode == "open":
        flops = dense_flops(costs) * n
    else:  # sum over images of base + switches + a . blocks, exact in float64 (integers)
        flops = (costs["base"] + costs["switches"]) * n + sum(e * b for e, b in zip(executed, costs["blocks"]))
    return {"acc": 100.0 * correct / n, "loss": ce / n, "gflops": flops / n / 1e9,
            "exec_rate": [e / n for e in executed], "images": int(n)}


BN_EPOCH = 2**31 - 1  # the loader epoch BN statistics are re-estimated on: one no training run reaches


@torch.no_grad()
def recalibrate_bn(ddp, loader, ctx, mode="hard", batches=100):
    """Re-estimate BatchNorm running statistics with the current weights (cumulative average over the
    first `batches` batches of `loader`).

    Deterministic, so that a resumed run ends exactly as an uninterrupted one (and re-running it on the
    same weights changes nothing): the batches are always those of loader epoch BN_EPOCH, whatever epoch
    the loader was last set to (a run resumed after its last epoch has not set one), and the global RNG
    (used by `sample` mode) is seeded inside and left as it was outside. The batch statistics in train
    mode do not depend on the running statistics, so the result depends only on the weights."""
    model = getattr(ddp, "module", ddp)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = model.training
    model.train()
    execution, model.execution = model.execution, "mask"
    last_epoch = getattr(loader, "epoch", None)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(BN_EPOCH)
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(ctx.seed * 1_000_003 + ctx.rank + BN_EPOCH)
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                kill_point("bn", i + 1)
                with autocast(ctx):
                    model(x, mode)
    finally:
        model.execution = execution
        model.train(was_training)
        if last_epoch is not None:
            loader.set_epoch(last_epoch)
        for bn in bns:
            bn.momentum = 0.1
    # BN buffers differ per rank after their own shards: average them so every rank holds the same model.
    if ctx.distributed:
        for bn in bns:
            for buf in (bn.running_mean, bn.running_var):
                buf.div_(ctx.world_size)
                all_reduce_sum(buf)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json(path, data):
    """Atomic JSON write (utils/files.py): a killed process never leaves half a metrics file."""
    def write(f):
        json.dump(data, f, indent=2)
        f.write("\n")
    atomic_write(path, write)


def summary_line(stage, epoch, epochs, train, ev, seconds, lr, name="routed"):
    """One line per epoch; `name` says which network the evaluation was of (dense: every block; routed:
    the greedy routes)."""
    rate = sum(ev["exec_rate"]) / max(1, len(ev["exec_rate"]))
    return (f"[{stage}] epoch {epoch}/{epochs}  train loss {train['loss']:.3f} acc {100 * train['acc']:.2f}%  "
            f"| eval {name} acc {ev['acc']:.2f}% loss {ev['loss']:.3f}  {ev['gflops']:.3f} GFLOPs/img  "
            f"exec {100 * rate:.0f}%  lr {lr:.2e}  {seconds:.0f}s")

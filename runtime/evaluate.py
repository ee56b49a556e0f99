"""Evaluation (accuracy, loss and the GFLOPs each image's route executes) and the re-estimation of
BatchNorm statistics, over every image of a loader and every rank."""
import contextlib

import torch
import torch.nn.functional as F

from runtime.loop import autocast
from utils.dist import all_reduce_sum
from utils.faults import kill_point
from utils.flops import dense_flops, skipped_flops, to_gflops
from utils.log import progress
from utils.nets import executing, unwrap


@contextlib.contextmanager
def no_autotune_when_skipping(model, mode="hard"):
    """torch.backends.cudnn.benchmark off inside when `model` would run its gated blocks on sub-batches: their
    sizes change with every batch, and cudnn.benchmark would autotune every new shape for kernels used once."""
    before = torch.backends.cudnn.benchmark
    if mode != "open" and (model.execution == "skip" or (model.execution == "auto" and not model.training)):
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@torch.no_grad()
def evaluate(ddp, loader, ctx, costs, mode="hard", desc="eval", execution=None):
    """Top-1 accuracy, loss and the FLOPs each image's route executes, over `loader` on every rank. `execution`:
    None, the model's own; "skip": blocks on sub-batches (a host sync per block and batch); "mask": every
    image computes every block, the same results up to rounding, no host sync until the end."""
    model = unwrap(ddp)
    model.eval()
    sums, images = None, 0
    with executing(model, execution), no_autotune_when_skipping(model, mode):
        for x, y in progress(loader, ctx.is_main, desc=desc):
            with autocast(ctx):
                logits, actions, _ = model(x, mode)
            batch = torch.cat([torch.stack([(logits.argmax(1) == y).sum(dtype=torch.float64),
                                            F.cross_entropy(logits.float(), y, reduction="sum").double()]),
                               actions.sum(0, dtype=torch.float64)])
            sums = batch if sums is None else sums.add_(batch)
            images += x.shape[0]  # counted on the host: no tensor made (and copied) per batch
    if sums is None:  # a rank without images still joins the sum
        sums = torch.zeros(2 + model.num_switches, dtype=torch.float64, device=ctx.device)
    total = all_reduce_sum(torch.cat([sums, sums.new_tensor([images])])).tolist()  # the one sync
    correct, ce, executed, n = total[0], total[1], total[2:-1], total[-1]
    if mode == "open":
        flops = dense_flops(costs) * n
    else:  # sum over images of base + switches + a . blocks, exact in float64 (integers)
        flops = skipped_flops(costs) * n + sum(e * b for e, b in zip(executed, costs["blocks"]))
    return {"acc": 100.0 * correct / n, "loss": ce / n, "gflops": to_gflops(flops / n),
            "exec_rate": [e / n for e in executed], "images": int(n)}


BN_EPOCH = 2**31 - 1  # the loader epoch BN statistics are re-estimated on: one no training run reaches


@torch.no_grad()
def recalibrate_bn(ddp, loader, ctx, mode="hard", batches=100):
    """Re-estimate BatchNorm running statistics over the first `batches` batches of `loader`, from the weights
    alone (loader epoch BN_EPOCH, the global RNG seeded inside and left as it was), so resumed runs end alike."""
    model = unwrap(ddp)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    last_epoch = getattr(loader, "epoch", None)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(BN_EPOCH)
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    try:
        with executing(model, "mask", training=True), torch.random.fork_rng(devices=devices):
            torch.manual_seed(ctx.seed * 1_000_003 + ctx.rank + BN_EPOCH)
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                kill_point("bn", i + 1)
                with autocast(ctx):
                    model(x, mode)
    finally:
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

"""How stage 3 ends, the same under every controller (docs/stages.md, "How the stage ends"): every controller
trains on drawn routes, the deployed model runs the greedy ones (p > 0.5), so the ending works on those. Every
step is deterministic, so a run killed during it redoes it from the last epoch's checkpoint.
"""
import functools

import torch

from gates.counterfactual import execution_benefit, flip_losses
from gates.optim import trainable
from gates.price import shares
from gates.routes import calibrate_to_flops
from runtime.loop import make_scheduler, sgd, train_epoch
from runtime.evaluate import recalibrate_bn
from runtime.steps import supervised_step, touch_switches
from utils.flops import dense_flops, gflops_bounds, to_gflops
from utils.nets import executing

CALIBRATION_BATCHES = 16  # training batches that the threshold calibration measures greedy FLOPs on
SMALL_CUT = 0.01  # routes that cut less than this share of the GFLOPs with every block run get a warning
ROUTE_SEED = 7_919  # the route fine-tuning's own RNG stream (augmentation), whatever ran before it


def calibration_batches(data):
    """The first CALIBRATION_BATCHES batches of the training images, not augmented, always the same ones."""
    data.plain_train.set_epoch(0)
    return [b for _, b in zip(range(CALIBRATION_BATCHES), data.plain_train)]


def greedy_step(model, x, y):
    """Cross-entropy on the greedy routes, no gradient through the decisions: a straight-through one (`hard`)
    would teach the backbone to turn blocks back on through the switches' inputs."""
    loss, stats = supervised_step(model, x, y, mode="greedy")
    return touch_switches(model, loss), stats


def finetune_on_routes(ddp, data, ctx, args, recalibrate=None):
    """--route_epochs epochs of SGD on the backbone on the greedy routes (lr --route_lr cosine to 0), `recalibrate`
    before every epoch but the first; deterministic. Returns each epoch's loss and accuracy, and the calibrations."""
    lr = args.route_lr if args.route_lr is not None else args.lr / 10
    optimizer = sgd(trainable(ddp)[0], lr, args.momentum, args.weight_decay)
    scheduler = make_scheduler(optimizer, "cosine", args.route_epochs, len(data.train))
    history, calibrations = [], []
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(ctx.seed * 1_000_003 + ctx.rank + ROUTE_SEED)
        for k in range(args.route_epochs):
            if k and recalibrate is not None:
                calibrations.append(recalibrate())
            epoch = args.epochs + k  # loader epochs (and fault-injection points) after the stage's own
            data.train.set_epoch(epoch)
            tr = train_epoch(ddp, data.train, optimizer, scheduler, greedy_step, ctx, epoch, desc="rl routes")
            history.append({"loss": tr["loss"], "acc": tr["acc"]})
            if ctx.is_main:
                print(f"[rl] greedy routes {k + 1}/{args.route_epochs}  train loss {tr['loss']:.3f} acc "
                      f"{tr['acc']:.2f}%  exec {100 * sum(tr['exec_rate']) / len(tr['exec_rate']):.0f}%",
                      flush=True)
    return history, calibrations


def end_training(ddp, data, ctx, costs, target, args):
    """After the last epoch, the steps of docs/stages.md; returns what was done ("calibration": every one, in order)."""
    ending = {"bn_batches": len(data.train)}
    calibrate = None
    if target is not None:
        calibrate = functools.partial(calibrate_to_flops, ddp, calibration_batches(data), ctx, costs, target)
        ending["calibration"] = [calibrate()]
    if args.route_epochs:
        ending["route_epochs"], during = finetune_on_routes(ddp, data, ctx, args, calibrate)
        if calibrate is not None:
            ending["calibration"] += during
    data.train.set_epoch(0)  # the same batches in a run resumed after its last epoch
    recalibrate_bn(ddp, data.train, ctx, batches=len(data.train))
    if calibrate is not None:
        ending["calibration"].append(calibrate())
    return ending


@torch.no_grad()
def skip_alphas(ddp, batches, costs):
    """Per gated block j, the alpha from which skipping it pays on half the images of `batches` (greedy routes):
    the median of b_ij / w_j (gates/counterfactual.py). A negative value: the block does harm on most images."""
    benefits = []
    with executing(ddp, training=False) as model:
        for x, y in batches:
            _, actions, _ = model(x, "greedy")
            benefits.append(execution_benefit(*flip_losses(model, x, y, actions), actions))
    return (torch.cat(benefits).double().median(0).values.cpu() / shares(costs["blocks"]).double()).tolist()


def small_cut_warning(ddp, data, costs, gflops, alpha):
    """None when the routes cut at least SMALL_CUT of the dense GFLOPs (`gflops`: the final evaluation's);
    else one line saying which --alpha (skip_alphas) or --target_gflops would cut more (`alpha`: the final one)."""
    dense = to_gflops(dense_flops(costs))
    cut = 1 - gflops / dense
    if cut >= SMALL_CUT:
        return None
    alphas = skip_alphas(ddp, calibration_batches(data), costs)
    j = min(range(len(alphas)), key=alphas.__getitem__)
    low, high = gflops_bounds(costs)
    target = min(max(0.9 * dense, low + 0.05 * (high - low)), low + 0.95 * (high - low))
    line = (f"warning: the switches cut {100 * cut:.1f}% of the GFLOPs ({gflops:.4g} per image against {dense:.4g} "
            f"with every block run), so row 3 is as costly as the network it started from. Skipping gated block "
            f"{j + 1} of {len(alphas)} ")
    if alphas[j] > alpha:
        line += f"pays on half the training images from --alpha {alphas[j]:.2g} (this run ended at {alpha:.2g}); "
    else:
        line += (f"already pays on half the training images at this run's alpha {alpha:.2g}, but the switches have "
                 f"not learnt it (more --epochs, or a larger --lr or --switch_lr); ")
    return line + f"--target_gflops {target:.4g} ({100 * (1 - target / dense):.0f}% fewer) sets the cut directly"

"""Stage 1: the network and its switches, trained by cross-entropy. --train_mode joint (default): every
step the cross-entropy of the dense network (every block) plus that of the routes the switches take
(`hard`: execute iff p > 0.5, straight-through gradient to p), so the backbone learns to tolerate skipping
while the dense network, the row "w/o pruning", trains as in plain dense training; the switches then
restart from their data-dependent spread on the trained network, so that stage 3 finds them where
REINFORCE can move them. hard: SkipNet's supervised phase alone (the dense network then is much weaker);
open: plain dense training. From scratch, or fine-tuning a dense network (--pretrained). Writes
<result_dir>/sp/{checkpoint.pt, metrics.json, tb/}: the row "w/o pruning" = the dense network (every block,
no switch evaluated): test_acc, gflops_per_image; beside it the greedy routes' routed_acc, routed_gflops
and per-switch exec_rate."""
import itertools
import sys

import torch

from gates.optim import add_switch_flags, check_switch_flags, make_optimizer
from models.switches import spread_decisions
from models import build_model, make_arch
from models.resnet import compile_report, compile_step
from runtime.checkpoint import load_checkpoint, load_pretrained, model_from_checkpoint
from utils.cli import base_parser, check_ranges
from utils.dist import broadcast_tensors, setup, teardown
from runtime.steps import dense_step, supervised_step
from runtime.loop import make_scheduler, prepare
from utils.errors import UserError, run_main
from utils.lineage import guard_rerun, parent_record
from utils.flops import dense_flops, measure_costs, to_gflops
from runtime.stage import (StageRun, check_batch_shapes, check_result_dir, check_resume_args, check_resume_world_size,
                           restore_training_state, resume_path)
from utils.data import DataSettings, load_data

LOW_LR = 1e-3  # at or below it, SGD from a random initialisation barely moves in a usual number of epochs
SPREAD_IMAGES = 256  # the switches' data-dependent start measures spreads over this many images, whatever --bs


def parse_args(argv=None):
    p = base_parser(__doc__)
    m = p.add_argument_group("model")
    m.add_argument("--network", default="resnet")
    m.add_argument("--depth", type=int, default=32, help="6n+2")
    m.add_argument("--width", type=int, default=4, help="stage widths 16k/32k/64k")
    m.add_argument("--gate", default="rnn", help="switch kind: rnn or ff")
    m.add_argument("--pretrained", default=None, metavar="PATH",
                   help="start from these weights (a checkpoint or a state dict; switches may be missing)")
    m.add_argument("--train_mode", default="joint", choices=["joint", "hard", "open"],
                   help="joint: cross-entropy of the dense network plus that of the switches' routes, then the "
                        "switches re-spread on the trained network; hard: SkipNet's supervised phase alone "
                        "(blocks skipped where the switches say so; the dense network is much weaker); open: "
                        "plain dense training, switches untouched (the reference for the dense accuracy)")
    m.add_argument("--dense_epochs", type=int, default=0,
                   help="train the first N epochs as a plain dense network (switches untouched), then SkipNet's "
                        "supervised phase: SkipNet starts that phase from a trained ResNet")
    add_switch_flags(p)
    return p.parse_args(argv)


def joint_step(model, x, y):
    """Cross-entropy of the dense network plus that of the routes the switches take (hard mode). The
    dense network's gradient is exactly plain dense training's; the routed term teaches the backbone to
    tolerate skipping. Two forward passes, one backward (DistributedDataParallel reduces once)."""
    dense, dense_stats = supervised_step(model, x, y, mode="open")
    routed, routed_stats = supervised_step(model, x, y, mode="hard")
    return dense + routed, {"loss": dense_stats["loss"], "acc": dense_stats["acc"],
                            "routed_loss": routed_stats["loss"], "routed_acc": routed_stats["acc"],
                            "exec_rate": routed_stats["exec_rate"]}


STEPS = {"joint": (joint_step, (("dense", "open"), ("routed", "hard"))),
         "hard": (supervised_step, (("routed", "hard"), ("dense", "open"))),
         "open": (dense_step, (("dense", "open"),))}


def spread_images(loader, n=SPREAD_IMAGES):
    """The first n (or all, if fewer) unaugmented training images of epoch 0, (n, C, H, W): enough for the
    spreads spread_decisions measures, whatever the batch size (a batch of one has no spread)."""
    loader.set_epoch(0)
    return torch.cat([x for x, _ in itertools.islice(loader, -(-n // loader.batch_size))])[:n]


def main(argv=None):
    args = parse_args(argv)
    check_ranges(args)
    if args.lr <= LOW_LR and not args.pretrained and not args.resume and args.epochs > 0:
        print(f"warning: --lr {args.lr:g} is a fine-tuning rate, but no --pretrained weights are given: the network "
              f"trains from scratch (use --lr 0.1, or give --pretrained PATH)", file=sys.stderr, flush=True)
    check_switch_flags(args)
    if not 0 <= args.dense_epochs <= args.epochs:
        raise UserError(f"--dense_epochs {args.dense_epochs} must be in [0, --epochs {args.epochs}]")
    make_arch(args.network, args.depth, args.width, 1, args.gate)  # flags checked before any work
    check_result_dir(args.result_dir)
    ctx = setup(args.device, args.seed, args.amp, args.channels_last, args.tf32)
    run = StageRun("sp", args.result_dir, ctx)
    ckpt = load_checkpoint(resume_path(args.resume, run), ("sp",), "--resume") if args.resume else None
    data = load_data(DataSettings.of(args), ctx, recorded=ckpt.get("pipeline") if ckpt else None,
                     source=f"--resume {resume_path(args.resume, run)}" if ckpt else None, resuming=True)
    arch = make_arch(args.network, args.depth, args.width, data.num_classes, args.gate)
    if ckpt:
        check_resume_args(ckpt, args, resume_path(args.resume, run))
        check_resume_world_size(ckpt, ctx, resume_path(args.resume, run))
        differ = [f"{k} {ckpt['arch'].get(k)} vs {v}" for k, v in arch.items() if ckpt["arch"].get(k) != v]
        if differ:
            raise UserError(f"--resume {resume_path(args.resume, run)}: its network differs from the flags' "
                            f"(checkpoint vs flags: {', '.join(differ)})")
        model = model_from_checkpoint(ckpt, resume_path(args.resume, run), "--resume")
    else:
        model = build_model(arch)
        fresh = [p.clone() for p in model.switches.parameters()]
        if args.pretrained:
            load_pretrained(model, args.pretrained)
        if all(torch.equal(a, b) for a, b in zip(fresh, model.switches.parameters())):  # no trained switches
            # decisions spread around 0.5 from the first step (DDP then copies rank 0's start to every rank)
            spread_decisions(model.to(ctx.device), spread_images(data.plain_train))
    model, ddp = prepare(model, ctx)
    check_batch_shapes(model, data.image_size, data.train.batch_size)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args.scheduler, args.epochs, len(data.train))
    start = restore_training_state(ckpt, optimizer, scheduler) if ckpt else 0
    costs = measure_costs(model, data.image_size)
    parent = parent_record("pretrained", args.pretrained) if args.pretrained and not ckpt else None
    guard_rerun(args.result_dir, "sp", args.overwrite, ctx.is_main, resuming=bool(ckpt))
    if args.epochs == 0 and not ckpt and ctx.is_main:
        weights = "the --pretrained weights" if args.pretrained else "its random initialisation"
        print(f"warning: --epochs 0 trains nothing: sp/checkpoint.pt will hold the network as it starts "
              f"({weights})", file=sys.stderr, flush=True)
    run.open(data.pipeline, parent=parent, resumed=ckpt)
    # done once, after the last epoch (again if a resumed run trains further epochs)
    respread = [bool((ckpt or {}).get("switches_respread")) and start >= args.epochs]
    own_state = lambda: {"args": vars(args), "switches_respread": respread[0]}
    common = dict(model=model, ddp=ddp, data=data, optimizer=optimizer, scheduler=scheduler, costs=costs,
                  own_state=own_state, total_epochs=args.epochs)
    compiled = (lambda fn: compile_step(fn, ctx.device)) if args.compile else (lambda fn: fn)
    last_step = [None]  # the compiled step, for what torch.compile did
    if start < args.dense_epochs:  # the network being trained is the dense one: evaluated as such
        run.fit(step_fn=compiled(dense_step), epochs=args.dense_epochs, start_epoch=start,
                evals=(("dense", "open"),), **common)
    step, evals = STEPS[args.train_mode]
    last_step[0] = compiled(step)
    run.fit(step_fn=last_step[0], epochs=args.epochs, start_epoch=max(start, args.dense_epochs), evals=evals,
            **common)
    if args.train_mode == "joint" and not respread[0]:
        # trained with the dense network beside them, the switches end up executing nearly every block
        # (p ~ 1, where REINFORCE's push p(1-p) vanishes); spread them again on the trained features
        spread_decisions(model, spread_images(data.plain_train))
        broadcast_tensors(list(model.switches.parameters()))  # rank 0's spread, on every rank
        respread[0] = True
        run.save(model, optimizer, scheduler, args.epochs, own_state())
    # the routes beside row 1 are those of the switches as saved: re-spread ones are named so in TensorBoard,
    # where they follow the curve of the routes trained before
    extra = {"dense_gflops": to_gflops(dense_flops(costs)), "train_mode": args.train_mode,
             "switches_respread": respread[0]}
    if args.compile:
        extra["compile"] = compile_report(last_step[0], say=ctx.is_main)
    run.finish(model, ddp, data, costs, extra, mode="open", routes="respread_routed" if respread[0] else "routed")
    teardown()


if __name__ == "__main__":
    run_main(main)
